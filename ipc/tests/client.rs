//! Client tests against small fake daemons on real Unix sockets in a
//! temporary directory.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use forkd_ipc::frame::{
    read_frame, read_frame_async, read_frame_bytes, write_frame, write_frame_async, FrameError,
};
use forkd_ipc::*;

/// A fresh directory for one test's socket, removed on drop.
struct TempSock {
    dir: PathBuf,
}

impl TempSock {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "forkd-ipc-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempSock { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("forkd.sock")
    }
}

impl Drop for TempSock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `serve` on the first connection to a new socket, on a thread.
fn blocking_server<F>(serve: F) -> (TempSock, thread::JoinHandle<()>)
where
    F: FnOnce(UnixStream) + Send + 'static,
{
    let tmp = TempSock::new();
    let listener = UnixListener::bind(tmp.path()).unwrap();
    let handle = thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        serve(conn);
    });
    (tmp, handle)
}

fn result_for(id: u64, stdout: &[u8]) -> SpawnResult {
    SpawnResult {
        sandbox: id,
        zygote: "default".into(),
        exit_code: Some(0),
        signal: None,
        killed_by: None,
        stdout: stdout.to_vec(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        timings: Timings::default(),
        usage: Usage::default(),
        limits: AppliedLimits::default(),
        warm: false,
        landlock: None,
        workspace_delta: None,
        workspace_error: None,
        network: None,
    }
}

fn reply(id: u64, body: ResponseBody) -> Response {
    Response {
        v: PROTOCOL_VERSION,
        id,
        body,
    }
}

/// Echo-style answer: stdout is the request's first argv entry.
fn answer(req: &Request) -> Response {
    match &req.body {
        RequestBody::Spawn(s) => {
            let out = s.argv.first().cloned().unwrap_or_default();
            reply(
                req.id,
                ResponseBody::Result(result_for(req.id, out.as_bytes())),
            )
        }
        RequestBody::Ping => reply(
            req.id,
            ResponseBody::Pong {
                daemon_version: "test-1".into(),
            },
        ),
        other => reply(
            req.id,
            ResponseBody::Error(forkd_ipc::ErrorReply {
                code: forkd_ipc::ErrorCode::InvalidRequest,
                message: format!("this test server does not serve {}", other.op()),
            }),
        ),
    }
}

fn spawn_req(arg: &str) -> SpawnRequest {
    SpawnRequest {
        program: Program::Code("import sys; print(sys.argv[1])".into()),
        argv: vec![arg.into()],
        timeout_ms: Some(1000),
        ..SpawnRequest::default()
    }
}

// ---------------------------------------------------------------------------
// Blocking client
// ---------------------------------------------------------------------------

#[test]
fn blocking_spawn_and_ping() {
    let (tmp, server) = blocking_server(|mut conn| {
        for expected_id in 1..=3 {
            let req: Request = read_frame(&mut conn).unwrap();
            assert_eq!(req.v, PROTOCOL_VERSION);
            assert_eq!(req.id, expected_id, "ids count up from 1");
            write_frame(&mut conn, &answer(&req)).unwrap();
        }
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    assert_eq!(client.path(), tmp.path());
    assert_eq!(client.ping().unwrap(), "test-1");
    let res = client.spawn(&spawn_req("hello")).unwrap();
    assert_eq!(res.stdout, b"hello");
    assert_eq!(res.sandbox, 2);
    let res = client.spawn(&spawn_req("again")).unwrap();
    assert_eq!(res.stdout_lossy(), "again");
    server.join().unwrap();
}

#[test]
fn blocking_server_error_becomes_server_and_keeps_connection() {
    let (tmp, server) = blocking_server(|mut conn| {
        let req: Request = read_frame(&mut conn).unwrap();
        let err = ErrorReply {
            code: ErrorCode::LimitExceedsPolicy,
            message: "memory_bytes 1 TiB is above the daemon maximum 4 GiB".into(),
        };
        write_frame(&mut conn, &reply(req.id, ResponseBody::Error(err))).unwrap();
        // An id-0 error (daemon could not parse the request) is still ours.
        let _req: Request = read_frame(&mut conn).unwrap();
        let err = ErrorReply {
            code: ErrorCode::MalformedFrame,
            message: "bad".into(),
        };
        write_frame(&mut conn, &reply(0, ResponseBody::Error(err))).unwrap();
        let req: Request = read_frame(&mut conn).unwrap();
        write_frame(&mut conn, &answer(&req)).unwrap();
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    match client.spawn(&spawn_req("x")) {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::LimitExceedsPolicy);
            let msg = ClientError::Server(e).to_string();
            assert!(
                msg.starts_with("forkd refused the request (limit_exceeds_policy): "),
                "{msg}"
            );
        }
        other => panic!("expected Server, got {other:?}"),
    }
    match client.spawn(&spawn_req("x")) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::MalformedFrame),
        other => panic!("expected Server, got {other:?}"),
    }
    assert_eq!(client.ping().unwrap(), "test-1");
    server.join().unwrap();
}

#[test]
fn blocking_server_closing_mid_request_gives_closed() {
    let (tmp, server) = blocking_server(|mut conn| {
        let _req: Request = read_frame(&mut conn).unwrap();
        // Drop without replying.
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    let started = Instant::now();
    let err = client.spawn(&spawn_req("x")).unwrap_err();
    assert!(matches!(err, ClientError::Closed), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The connection is abandoned; later calls say so instead of hanging.
    assert!(matches!(client.ping(), Err(ClientError::Broken)));
    server.join().unwrap();
}

#[test]
fn blocking_server_closing_mid_reply_gives_closed() {
    let (tmp, server) = blocking_server(|mut conn| {
        let req: Request = read_frame(&mut conn).unwrap();
        let frame = frame::encode_frame(&answer(&req)).unwrap();
        conn.write_all(&frame[..frame.len() / 2]).unwrap();
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    let err = client.spawn(&spawn_req("x")).unwrap_err();
    assert!(matches!(err, ClientError::Closed), "{err:?}");
    server.join().unwrap();
}

#[test]
fn connect_to_missing_socket_names_the_path() {
    let tmp = TempSock::new();
    let path = tmp.path();
    let err = Client::connect(&path).unwrap_err();
    match &err {
        ClientError::Connect { path: p, .. } => assert_eq!(p, &path),
        other => panic!("expected Connect, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
    assert!(msg.contains("FORKD_SOCKET"), "{msg}");
}

#[test]
fn blocking_timeout_fires() {
    let (tmp, server) = blocking_server(|mut conn| {
        let _req: Request = read_frame(&mut conn).unwrap();
        // Never answer; hold the connection open past the client's timeout.
        thread::sleep(Duration::from_millis(1500));
    });
    let mut client = Client::connect(tmp.path())
        .unwrap()
        .with_timeout(Some(Duration::from_millis(200)));
    let started = Instant::now();
    match client.spawn(&spawn_req("x")) {
        Err(ClientError::Timeout { after }) => assert_eq!(after, Duration::from_millis(200)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert!(took < Duration::from_millis(1400), "{took:?}");
    assert!(matches!(client.ping(), Err(ClientError::Broken)));
    server.join().unwrap();
}

#[test]
fn blocking_version_mismatch() {
    let (tmp, server) = blocking_server(|mut conn| {
        let req: Request = read_frame(&mut conn).unwrap();
        let mut resp = answer(&req);
        resp.v = PROTOCOL_VERSION + 1;
        write_frame(&mut conn, &resp).unwrap();
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    match client.ping() {
        Err(ClientError::Version { daemon, client }) => {
            assert_eq!((daemon, client), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION));
        }
        other => panic!("expected Version, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn blocking_mismatched_id_is_unexpected() {
    let (tmp, server) = blocking_server(|mut conn| {
        let req: Request = read_frame(&mut conn).unwrap();
        let mut resp = answer(&req);
        resp.id += 40;
        write_frame(&mut conn, &resp).unwrap();
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    let err = client.ping().unwrap_err();
    assert!(matches!(err, ClientError::UnexpectedReply(_)), "{err:?}");
    server.join().unwrap();
}

#[test]
fn blocking_oversized_request_is_refused_locally() {
    let (tmp, server) = blocking_server(|mut conn| {
        // Only the ping after the refused spawn arrives.
        let req: Request = read_frame(&mut conn).unwrap();
        assert_eq!(req.body, RequestBody::Ping);
        write_frame(&mut conn, &answer(&req)).unwrap();
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    let mut req = spawn_req("x");
    req.stdin = vec![7; MAX_FRAME_BYTES];
    let err = client.spawn(&req).unwrap_err();
    assert!(
        matches!(err, ClientError::Frame(FrameError::TooLarge { .. })),
        "{err:?}"
    );
    // Nothing was sent, so the connection is still good.
    assert_eq!(client.ping().unwrap(), "test-1");
    server.join().unwrap();
}

#[test]
fn blocking_reply_with_hostile_length_is_a_frame_error() {
    let (tmp, server) = blocking_server(|mut conn| {
        let _ = read_frame_bytes(&mut conn, MAX_FRAME_BYTES).unwrap();
        conn.write_all(&u32::MAX.to_be_bytes()).unwrap();
    });
    let mut client = Client::connect(tmp.path()).unwrap();
    let err = client.ping().unwrap_err();
    assert!(
        matches!(err, ClientError::Frame(FrameError::TooLarge { .. })),
        "{err:?}"
    );
    server.join().unwrap();
}

// ---------------------------------------------------------------------------
// Async client
// ---------------------------------------------------------------------------

/// Binds a tokio listener on a fresh socket.
fn async_listener() -> (TempSock, tokio::net::UnixListener) {
    let tmp = TempSock::new();
    let listener = tokio::net::UnixListener::bind(tmp.path()).unwrap();
    (tmp, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_fifty_concurrent_calls_answered_out_of_order() {
    const N: usize = 50;
    let (tmp, listener) = async_listener();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut reqs = Vec::new();
        while reqs.len() < N {
            let req: Request = read_frame_async(&mut conn).await.unwrap();
            reqs.push(req);
        }
        let mut ids: Vec<u64> = reqs.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), N, "every in-flight call has its own id");
        // Answer in a scrambled order: odd positions backwards, then even.
        let (odd, even): (Vec<_>, Vec<_>) =
            reqs.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);
        for (_, req) in odd.into_iter().rev().chain(even) {
            write_frame_async(&mut conn, &answer(&req)).await.unwrap();
        }
        // Then answer in order until the client hangs up.
        while let Ok(req) = read_frame_async::<_, Request>(&mut conn).await {
            write_frame_async(&mut conn, &answer(&req)).await.unwrap();
        }
    });

    let client = AsyncClient::connect(tmp.path()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..N {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let arg = format!("call-{i}");
            let res = client.spawn(&spawn_req(&arg)).await.unwrap();
            assert_eq!(res.stdout_lossy(), arg);
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    assert_eq!(client.ping().await.unwrap(), "test-1");
    assert!(!client.is_closed());
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server saw the client hang up")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_pending_calls_fail_when_server_drops_connection() {
    const N: usize = 5;
    let (tmp, listener) = async_listener();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        for _ in 0..N {
            let _req: Request = read_frame_async(&mut conn).await.unwrap();
        }
        // Drop the connection with every call pending.
    });
    let client = AsyncClient::connect(tmp.path()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..N {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client.spawn(&spawn_req(&i.to_string())).await
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(10), async {
        let mut out = Vec::new();
        for call in calls {
            out.push(call.await.unwrap());
        }
        out
    })
    .await
    .expect("pending calls must fail, not hang");
    for r in all {
        assert!(matches!(r, Err(ClientError::Closed)), "{r:?}");
    }
    server.await.unwrap();
    assert!(client.is_closed());
    // Later calls fail at once.
    let started = Instant::now();
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, ClientError::Closed), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_timeout_fires_and_late_reply_is_discarded() {
    let (tmp, listener) = async_listener();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let first: Request = read_frame_async(&mut conn).await.unwrap();
        let second: Request = read_frame_async(&mut conn).await.unwrap();
        // Answer the timed-out call late, then the live one.
        write_frame_async(&mut conn, &answer(&first)).await.unwrap();
        write_frame_async(&mut conn, &answer(&second))
            .await
            .unwrap();
        let _ = read_frame_async::<_, Request>(&mut conn).await;
    });
    let client = AsyncClient::connect(tmp.path()).await.unwrap();
    let short = client
        .clone()
        .with_timeout(Some(Duration::from_millis(200)));
    let started = Instant::now();
    match short.spawn(&spawn_req("late")).await {
        Err(ClientError::Timeout { after }) => assert_eq!(after, Duration::from_millis(200)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // The connection survives a timeout; the late reply to the first call
    // must not be taken for the second.
    let res = client.spawn(&spawn_req("live")).await.unwrap();
    assert_eq!(res.stdout_lossy(), "live");
    drop((client, short));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_unroutable_error_fails_all_pending() {
    const N: usize = 3;
    let (tmp, listener) = async_listener();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        for _ in 0..N {
            let _req: Request = read_frame_async(&mut conn).await.unwrap();
        }
        let err = ErrorReply {
            code: ErrorCode::MalformedFrame,
            message: "could not parse request".into(),
        };
        write_frame_async(&mut conn, &reply(0, ResponseBody::Error(err)))
            .await
            .unwrap();
        // The connection stays up: a later ping is answered.
        let req: Request = read_frame_async(&mut conn).await.unwrap();
        write_frame_async(&mut conn, &answer(&req)).await.unwrap();
        let _ = read_frame_async::<_, Request>(&mut conn).await;
    });
    let client = AsyncClient::connect(tmp.path()).await.unwrap();
    let mut calls = Vec::new();
    for i in 0..N {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client.spawn(&spawn_req(&i.to_string())).await
        }));
    }
    for call in calls {
        match call.await.unwrap() {
            Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::MalformedFrame),
            other => panic!("expected Server, got {other:?}"),
        }
    }
    assert_eq!(client.ping().await.unwrap(), "test-1");
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn async_connect_to_missing_socket_names_the_path() {
    let tmp = TempSock::new();
    let path = tmp.path();
    match AsyncClient::connect(&path).await {
        Err(ClientError::Connect { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[tokio::test]
async fn async_server_error_becomes_server() {
    let (tmp, listener) = async_listener();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let req: Request = read_frame_async(&mut conn).await.unwrap();
        let err = ErrorReply {
            code: ErrorCode::UnknownZygote,
            message: "no zygote named \"nope\"".into(),
        };
        write_frame_async(&mut conn, &reply(req.id, ResponseBody::Error(err)))
            .await
            .unwrap();
    });
    let client = AsyncClient::connect(tmp.path()).await.unwrap();
    let mut req = spawn_req("x");
    req.zygote = Some("nope".into());
    match client.spawn(&req).await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::UnknownZygote),
        other => panic!("expected Server, got {other:?}"),
    }
    server.await.unwrap();
}
