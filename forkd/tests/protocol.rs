//! The wire protocol against a real daemon, over raw Unix sockets: malformed
//! and hostile frames, pipelining, peer checks.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// What reading one frame from the daemon gave.
#[derive(Debug)]
enum Reply {
    Frame(Value),
    /// Clean end of stream.
    Eof,
    /// The daemon closed with bytes of ours unread (ECONNRESET).
    Reset,
}

struct Raw {
    s: UnixStream,
}

impl Raw {
    async fn connect(path: &Path) -> Raw {
        Raw {
            s: UnixStream::connect(path).await.expect("connect"),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write to the daemon");
    }

    async fn send_frame(&mut self, body: &[u8]) {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        self.send(&f).await;
    }

    async fn send_json(&mut self, v: &Value) {
        self.send_frame(v.to_string().as_bytes()).await;
    }

    async fn recv(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(15), self.recv_inner())
            .await
            .expect("no reply from the daemon within 15 s")
    }

    async fn recv_inner(&mut self) -> Reply {
        let mut header = [0u8; 4];
        match self.s.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Reply::Eof,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Reply::Reset,
            Err(e) => panic!("read: {e}"),
        }
        let len = u32::from_be_bytes(header) as usize;
        assert!(len <= 64 * 1024 * 1024, "absurd reply length {len}");
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).await.expect("reply body");
        Reply::Frame(serde_json::from_slice(&body).expect("reply is JSON"))
    }

    async fn recv_frame(&mut self) -> Value {
        match self.recv().await {
            Reply::Frame(v) => v,
            other => panic!("expected a reply frame, got {other:?}"),
        }
    }

    /// Expects the error reply `code` with `id`.
    async fn expect_error(&mut self, code: &str, id: u64, what: &str) {
        let v = self.recv_frame().await;
        assert_eq!(v["v"], 1, "{what}: {v}");
        assert_eq!(v["kind"], "error", "{what}: {v}");
        assert_eq!(v["code"], code, "{what}: {v}");
        assert_eq!(v["id"], id, "{what}: {v}");
        assert!(
            !v["message"].as_str().unwrap_or("").is_empty(),
            "{what}: {v}"
        );
    }

    async fn ping(&mut self, id: u64) {
        self.send_json(&json!({"v": 1, "id": id, "op": "ping"}))
            .await;
        let v = self.recv_frame().await;
        assert_eq!(
            (v["kind"].as_str(), v["id"].as_u64()),
            (Some("pong"), Some(id)),
            "{v}"
        );
    }

    /// The daemon closes without replying (EOF, or reset if it left bytes unread).
    async fn expect_closed(&mut self, what: &str) {
        match self.recv().await {
            Reply::Eof | Reply::Reset => {}
            Reply::Frame(v) => panic!("{what}: expected the connection to close, got {v}"),
        }
    }
}

/// Deterministic garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_frames() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;

    // A well-behaved client that must not notice anything of what follows.
    let bystander = d.client().await;
    let by = bystander.clone();
    let by_task = tokio::spawn(async move {
        by.spawn(&req("import time; time.sleep(1.5); print('bystander')"))
            .await
    });

    let mut c = Raw::connect(&d.socket).await;
    let spawn1 = json!({"code": "print(1)"});
    let cases: Vec<(&str, Vec<u8>, &str, u64)> = vec![
        ("not JSON", b"{not json".to_vec(), "malformed_frame", 0),
        ("not UTF-8", b"\xff\xfe\x00".to_vec(), "malformed_frame", 0),
        ("JSON array", b"[1,2,3]".to_vec(), "malformed_frame", 0),
        ("missing id", br#"{"v":1,"op":"ping"}"#.to_vec(), "malformed_frame", 0),
        ("unknown op", br#"{"v":1,"id":5,"op":"explode"}"#.to_vec(), "malformed_frame", 5),
        (
            "unknown field in spawn",
            json!({"v":1,"id":6,"op":"spawn","program":spawn1,"bogus":1}).to_string().into_bytes(),
            "malformed_frame",
            6,
        ),
        (
            "unknown field in limits",
            json!({"v":1,"id":16,"op":"spawn","program":spawn1,"limits":{"memroy_bytes":1}}).to_string().into_bytes(),
            "malformed_frame",
            16,
        ),
        ("unknown field beside ping", br#"{"v":1,"id":7,"op":"ping","extra":true}"#.to_vec(), "malformed_frame", 7),
        ("wrong v", br#"{"v":3,"id":8,"op":"ping"}"#.to_vec(), "unsupported_version", 8),
        ("wrong v, unknown shape", br#"{"v":3,"id":9,"op":"teleport","x":1}"#.to_vec(), "unsupported_version", 9),
        ("a version-2 operation asked in version 1", br#"{"v":1,"id":12,"op":"session_list"}"#.to_vec(), "unsupported_version", 12),
        (
            "invalid base64 stdin",
            json!({"v":1,"id":10,"op":"spawn","program":spawn1,"stdin":"***"}).to_string().into_bytes(),
            "malformed_frame",
            10,
        ),
        (
            "two programs",
            json!({"v":1,"id":11,"op":"spawn","program":{"code":"x","script":"y"}}).to_string().into_bytes(),
            "malformed_frame",
            11,
        ),
        ("spawn without program", br#"{"v":1,"id":12,"op":"spawn"}"#.to_vec(), "malformed_frame", 12),
        (
            "zero timeout",
            json!({"v":1,"id":13,"op":"spawn","program":spawn1,"timeout_ms":0}).to_string().into_bytes(),
            "invalid_request",
            13,
        ),
        (
            "unknown zygote",
            json!({"v":1,"id":14,"op":"spawn","program":spawn1,"zygote":"nope"}).to_string().into_bytes(),
            "unknown_zygote",
            14,
        ),
        (
            "unknown policy",
            json!({"v":1,"id":15,"op":"spawn","program":spawn1,"policy":"lax"}).to_string().into_bytes(),
            "unknown_policy",
            15,
        ),
        (
            "limit above max",
            json!({"v":1,"id":17,"op":"spawn","program":spawn1,"limits":{"memory_bytes": 1u64 << 50}})
                .to_string()
                .into_bytes(),
            "limit_exceeds_policy",
            17,
        ),
    ];
    let mut ping_id = 1000;
    for (what, body, code, id) in &cases {
        c.send_frame(body).await;
        c.expect_error(code, *id, what).await;
        // The connection is still usable.
        ping_id += 1;
        c.ping(ping_id).await;
    }

    // A zero-length frame: malformed, and the stream stays in sync.
    c.send(&[0, 0, 0, 0]).await;
    c.expect_error("malformed_frame", 0, "zero-length frame")
        .await;
    c.ping(2000).await;

    // A valid spawn over the raw connection.
    c.send_json(
        &json!({"v":1,"id":20,"op":"spawn","program":{"code":"print('raw')"},"timeout_ms":10000}),
    )
    .await;
    let v = c.recv_frame().await;
    assert_eq!(
        (v["kind"].as_str(), v["id"].as_u64()),
        (Some("result"), Some(20)),
        "{v}"
    );
    assert_eq!(v["stdout"], "cmF3Cg==", "{v}"); // "raw\n"
    assert_eq!(v["exit_code"], 0);

    // Pipelining: replies come in completion order, matched by id.
    c.send_json(&json!({"v":1,"id":30,"op":"spawn","program":{"code":"import time; time.sleep(0.5); print('slow')"},"timeout_ms":10000})).await;
    c.send_json(&json!({"v":1,"id":31,"op":"ping"})).await;
    let first = c.recv_frame().await;
    let second = c.recv_frame().await;
    assert_eq!(
        (first["kind"].as_str(), first["id"].as_u64()),
        (Some("pong"), Some(31)),
        "{first}"
    );
    assert_eq!(
        (second["kind"].as_str(), second["id"].as_u64()),
        (Some("result"), Some(30)),
        "{second}"
    );
    drop(c);

    // Oversized length prefix: frame_too_large, then the daemon closes.
    for len in [0x7fff_ffffu32, forkd_ipc::MAX_FRAME_BYTES as u32 + 1] {
        let mut c = Raw::connect(&d.socket).await;
        c.send(&len.to_be_bytes()).await;
        c.expect_error("frame_too_large", 0, "oversized prefix")
            .await;
        match c.recv().await {
            Reply::Eof => {}
            other => panic!("expected EOF after frame_too_large, got {other:?}"),
        }
    }

    // A frame cut short by EOF: no reply, the connection closes.
    let mut c = Raw::connect(&d.socket).await;
    c.send(&100u32.to_be_bytes()).await;
    c.send(b"{\"v\":1,\"id\"").await;
    c.s.shutdown().await.unwrap();
    c.expect_closed("truncated frame").await;
    drop(c);
    // EOF inside the header.
    let mut c = Raw::connect(&d.socket).await;
    c.send(&[0, 0]).await;
    c.s.shutdown().await.unwrap();
    c.expect_closed("truncated header").await;
    drop(c);

    // Random garbage, including a plausible length prefix followed by junk.
    for seed in 1..=8u64 {
        let mut c = Raw::connect(&d.socket).await;
        let mut bytes = Vec::new();
        if seed % 2 == 0 {
            bytes.extend_from_slice(&200u32.to_be_bytes());
        }
        bytes.extend(garbage(seed, 4096));
        // The daemon may close while we write (frame_too_large).
        let _ = c.s.write_all(&bytes).await;
        let _ = c.s.shutdown().await;
        let mut replies = Vec::new();
        while let Reply::Frame(v) = c.recv().await {
            replies.push(v);
        }
        assert!(
            !replies.is_empty() || seed % 2 == 1,
            "seed {seed}: a 200-byte junk frame deserves a reply"
        );
        for v in &replies {
            assert_eq!(v["kind"], "error", "seed {seed}: {v}");
            assert!(
                ["malformed_frame", "frame_too_large"].contains(&v["code"].as_str().unwrap_or("")),
                "seed {seed}: {v}"
            );
        }
    }

    // The daemon survived all of it: new clients and the bystander work.
    let mut c = Raw::connect(&d.socket).await;
    c.ping(3000).await;
    drop(c);
    let fresh = d.client().await;
    assert_eq!(
        fresh
            .spawn(&req("print('still here')"))
            .await
            .unwrap()
            .stdout,
        b"still here\n"
    );
    assert!(bystander.ping().await.is_ok());
    let by_result = by_task.await.unwrap().expect("bystander spawn");
    assert_eq!(by_result.stdout, b"bystander\n");
    assert_eq!((by_result.exit_code, by_result.killed_by), (Some(0), None));
    assert!(!bystander.is_closed());
    drop((fresh, bystander));
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorised_peer_gets_permission_denied_then_close() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        // No warm pool: the sandbox-id counter below proves nothing ran.
        c.zygotes[0].warm_pool = 0;
        c.allowed_uids = Some(vec![4242]);
        c.allowed_gids = Vec::new();
    })
    .await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "socket mode");

    // Raw: the refusal is sent unsolicited right after accept, then EOF.
    let mut c = Raw::connect(&d.socket).await;
    c.expect_error("permission_denied", 0, "unauthorised peer")
        .await;
    match c.recv().await {
        Reply::Eof => {}
        other => panic!("expected EOF after permission_denied, got {other:?}"),
    }
    drop(c);

    // The blocking client's call gets the refusal, not just a closed
    // connection, every time (its request races the daemon's reply; the
    // daemon keeps the connection half-open so the request never hits a
    // closed socket).
    for i in 0..200 {
        let path = d.socket.clone();
        let blocking = tokio::task::spawn_blocking(move || {
            let mut c =
                forkd_ipc::Client::connect(&path)?.with_timeout(Some(Duration::from_secs(10)));
            c.ping()
        })
        .await
        .unwrap();
        match blocking {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}"),
            other => {
                panic!("blocking client, attempt {i}: expected permission_denied, got {other:?}")
            }
        }
    }
    assert_eq!(
        d.daemon.next_sandbox_id(),
        1,
        "nothing ran for the unauthorised peer"
    );
    d.finish().await;

    // Allowed through the primary gid (root's is 0) although the uid is not listed.
    let d = TestDaemon::start(|c| {
        c.allowed_uids = Some(vec![4242]);
        c.allowed_gids = vec![0];
    })
    .await;
    let c = d.client().await;
    assert!(c.ping().await.is_ok());
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorised_peer_async_client_sees_permission_denied() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.allowed_uids = Some(vec![4242]);
        c.allowed_gids = Vec::new();
    })
    .await;
    for i in 0..20 {
        let c = d.client().await;
        match c.spawn(&req("print(1)")).await {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}"),
            other => panic!("async client, attempt {i}: expected permission_denied, got {other:?}"),
        }
        match c.ping().await {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}"),
            other => panic!(
                "async client, attempt {i}, second call: expected permission_denied, got {other:?}"
            ),
        }
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_frames_are_cut_off_but_idle_connections_stay() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.frame_timeout_ms = 300;
        c.zygotes[0].warm_pool = 0;
    })
    .await;
    let mut idle = Raw::connect(&d.socket).await;
    let mut bystander = Raw::connect(&d.socket).await;

    // Half a header, then nothing.
    let mut half_header = Raw::connect(&d.socket).await;
    half_header.send(&[0, 0]).await;
    // A whole header announcing 100 bytes, then 10 of them.
    let mut half_body = Raw::connect(&d.socket).await;
    half_body.send(&100u32.to_be_bytes()).await;
    half_body.send(&[b'{'; 10]).await;

    let t = std::time::Instant::now();
    half_header.expect_closed("half a header").await;
    half_body.expect_closed("half a body").await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "cut off too early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "stalled frames held for {took:?}"
    );

    // Nothing else was disturbed, and an idle connection is not a slow one.
    bystander.ping(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    idle.ping(2).await;
    drop((idle, bystander, half_header, half_body));
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_request_has_its_sandbox_killed() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = 0).await;
    let mut raw = Raw::connect(&d.socket).await;
    raw.send_json(&json!({
        "v": 1, "id": 1, "op": "spawn",
        "program": {"code": "import time\nprint('up', flush=True)\ntime.sleep(30)"},
        "timeout_ms": 60000
    }))
    .await;
    let instance = d.instance.clone();
    let sandbox = || {
        processes_of(&instance)
            .into_iter()
            .filter(|p| p.state != 'Z' && cgroup_under(&p.cgroup, &instance, None))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || sandbox() == 1).await,
        "the sandbox never started"
    );
    drop(raw);
    let t = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || sandbox() == 0).await,
        "the sandbox outlived its client"
    );
    assert!(
        wait_until(Duration::from_secs(5), || d.daemon.running() == 0).await,
        "the request still holds a slot"
    );
    println!("sandbox gone {:?} after its client", t.elapsed());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = 0).await;
    let mut clients = Vec::with_capacity(1000);
    for _ in 0..1000 {
        clients.push(
            forkd_ipc::AsyncClient::connect(&d.socket)
                .await
                .expect("connect"),
        );
    }
    let mut set = tokio::task::JoinSet::new();
    for c in &clients {
        let c = c.clone();
        set.spawn(async move { c.ping().await });
    }
    let mut pongs = 0;
    while let Some(r) = set.join_next().await {
        r.unwrap().expect("ping");
        pongs += 1;
    }
    assert_eq!(pongs, 1000);
    // And they still run sandboxes, a few of them at once.
    let mut set = tokio::task::JoinSet::new();
    for c in clients.iter().step_by(100) {
        let c = c.clone();
        set.spawn(async move { c.spawn(&req("print(6 * 7)")).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().expect("spawn").stdout, b"42\n");
    }
    drop(clients);
    d.finish().await;
}
