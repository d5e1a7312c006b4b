//! Operations against in-process daemons: the metrics endpoint and the
//! audit log (the binary's JSON logs and `forkd doctor` are in `ops_cli.rs`,
//! a separate test process, because their child processes carry no leak-check
//! marker and would be reported by the leak checks of tests running alongside).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::scrape::{http, sample, scrape};
use common::*;

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_kills_pool_misses_and_zygote_restarts() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.metrics_listen = Some("127.0.0.1:0".into());
        c.zygotes[0].warm_pool = 2;
    })
    .await;
    let addr = d.metrics_addr().expect("a TCP metrics listener");
    assert!(addr.ip().is_loopback());
    let pool = &d.daemon.warm["default"];
    assert!(
        wait_until(Duration::from_secs(20), || pool.ready() == 2).await,
        "warm pool did not fill"
    );

    let mut results = Vec::new();
    let ok = d.run("print('hi')").await;
    assert_eq!(ok.exit_code, Some(0));
    results.push(ok);
    let failed = d.run("raise SystemExit(3)").await;
    assert_eq!(failed.exit_code, Some(3));
    results.push(failed);
    let mut slow = req("import time\ntime.sleep(30)");
    slow.timeout_ms = Some(300);
    let killed = d.spawn(&slow).await.unwrap();
    assert_eq!(killed.killed_by, Some(KilledBy::Timeout));
    results.push(killed);
    let mut unknown = req("print(1)");
    unknown.zygote = Some("no-such-zygote-xyz".into());
    let e = server_error(d.spawn(&unknown).await.unwrap_err());
    assert_eq!(e.code, ErrorCode::UnknownZygote);

    // Bursts larger than the pool until one request finds it empty (the
    // first burst nearly always does; the refill cannot fork 8 at once).
    let client = d.client().await;
    let mut bursts = 0;
    while pool
        .stats()
        .misses
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        bursts += 1;
        assert!(bursts <= 10, "10 bursts of 8 never found the pool empty");
        let r = req("print('burst')");
        let replies = futures_join(&client, &r, 8).await;
        results.extend(replies);
    }
    let ok_count = results
        .iter()
        .filter(|r| r.exit_code == Some(0) && r.killed_by.is_none())
        .count();
    drop(client);
    let cold = results.iter().filter(|r| !r.warm).count();
    assert!(cold >= 1, "a miss is served by an on-demand fork");

    let text = scrape(addr).await;
    let z = ("zygote", "default");
    let spawns = |labels: &[(&str, &str)]| sample(&text, "forkd_spawns_total", labels);
    assert_eq!(
        spawns(&[z, ("outcome", "ok"), ("killed_by", "none")]),
        Some(ok_count as f64),
        "{text}"
    );
    assert_eq!(spawns(&[z, ("outcome", "exit_nonzero")]), Some(1.0));
    assert_eq!(
        spawns(&[z, ("outcome", "killed"), ("killed_by", "timeout")]),
        Some(1.0)
    );
    assert_eq!(
        spawns(&[("zygote", "-"), ("outcome", "error")]),
        Some(1.0),
        "an unknown zygote is counted without its name"
    );
    assert_eq!(
        sample(
            &text,
            "forkd_spawn_errors_total",
            &[("code", "unknown_zygote")]
        ),
        Some(1.0)
    );
    assert!(
        !text.contains("no-such-zygote-xyz"),
        "request text must never become a label"
    );
    let stats = pool.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let misses = sample(&text, "forkd_warm_pool_misses_total", &[z]).unwrap();
    assert!(misses >= 1.0);
    assert_eq!(misses, load(&stats.misses) as f64);
    assert_eq!(
        sample(&text, "forkd_warm_pool_hits_total", &[z]),
        Some(load(&stats.hits) as f64)
    );
    assert_eq!(sample(&text, "forkd_warm_pool_target", &[z]), Some(2.0));
    assert!(sample(&text, "forkd_warm_pool_refills_total", &[z]).unwrap() >= 2.0);
    assert_eq!(
        sample(
            &text,
            "forkd_spawn_duration_seconds_count",
            &[z, ("warm", "false")]
        ),
        Some(cold as f64),
        "one latency observation per on-demand result"
    );
    assert_eq!(
        sample(&text, "forkd_spawn_duration_seconds_count", &[z]),
        Some(results.len() as f64)
    );
    assert!(text.contains("# UNIT forkd_spawn_duration_seconds seconds"));
    assert_eq!(sample(&text, "forkd_zygote_up", &[z]), Some(1.0));
    assert_eq!(
        sample(&text, "forkd_zygote_restarts_total", &[z]),
        Some(0.0)
    );
    assert_eq!(sample(&text, "forkd_zygote_starts_total", &[z]), Some(1.0));
    assert_eq!(sample(&text, "forkd_sandboxes_running", &[]), Some(0.0));
    assert!(sample(&text, "forkd_connections_total", &[("result", "accepted")]).unwrap() >= 5.0);

    // A zygote that dies is counted as a restart once its successor is up.
    let pid = d.zygote_pid().await;
    // SAFETY: kill with a positive pid signals exactly that process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(addr).await;
        if sample(&text, "forkd_zygote_restarts_total", &[z]) == Some(1.0)
            && sample(&text, "forkd_zygote_up", &[z]) == Some(1.0)
        {
            assert_eq!(sample(&text, "forkd_zygote_starts_total", &[z]), Some(2.0));
            break;
        }
        assert!(Instant::now() < deadline, "restart not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Only GET /metrics is served.
    let conn = || tokio::net::TcpStream::connect(addr);
    assert_eq!(
        http(conn().await.unwrap(), "GET", "/").await.0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        http(conn().await.unwrap(), "POST", "/metrics").await.0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    d.finish().await;
}

/// `n` copies of `r` at once on one multiplexed connection.
async fn futures_join(client: &AsyncClient, r: &SpawnRequest, n: usize) -> Vec<SpawnResult> {
    let mut set = Vec::new();
    for _ in 0..n {
        set.push(client.spawn(r));
    }
    let mut out = Vec::new();
    for f in set {
        let res = f.await.expect("burst request");
        assert_eq!(res.stdout, b"burst\n");
        out.push(res);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_metrics_address_is_refused() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let Err((e, stopped)) = TestDaemon::try_start(None, |c| {
        c.metrics_listen = Some("0.0.0.0:0".into());
    })
    .await
    else {
        panic!("a daemon with metrics on 0.0.0.0 started");
    };
    assert!(
        e.to_string().contains("metrics_allow_remote"),
        "the error names the way out: {e}"
    );
    stopped.assert_no_leaks().await;
}

// ---------------------------------------------------------------------------
// Audit log
// ---------------------------------------------------------------------------

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}")))
        .collect()
}

fn secret_request() -> SpawnRequest {
    let mut r = req("import sys\nprint('SECRET_OUTPUT', sys.stdin.read())");
    r.stdin = b"SECRET_STDIN".to_vec();
    r.env.insert("SECRET_ENV".into(), "SECRET_VALUE".into());
    r.argv = vec!["SECRET_ARG".into()];
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_has_one_line_per_request_with_the_peer_and_no_payload() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The directory does not exist yet: the daemon creates it.
    let path = dir.path().join("log/audit.jsonl");
    let p = path.clone();
    let d = TestDaemon::start(move |c| c.audit_log = Some(p)).await;
    let r = d.spawn(&secret_request()).await.unwrap();
    assert_eq!(r.stdout, b"SECRET_OUTPUT SECRET_STDIN\n");
    let mut slow = req("import time\ntime.sleep(30)");
    slow.timeout_ms = Some(300);
    assert_eq!(
        d.spawn(&slow).await.unwrap().killed_by,
        Some(KilledBy::Timeout)
    );
    let mut unknown = secret_request();
    unknown.zygote = Some("SECRET_ZYGOTE".into());
    assert_eq!(
        server_error(d.spawn(&unknown).await.unwrap_err()).code,
        ErrorCode::UnknownZygote
    );
    // Written off the request path: wait for the writer, then rotate the
    // file away; the next record starts a new file.
    assert!(
        wait_until(Duration::from_secs(10), || audit_lines(&path).len() == 3).await,
        "3 records expected, have {:?}",
        audit_lines(&path)
    );
    let rotated = dir.path().join("log/audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    assert_eq!(d.run("print(4)").await.exit_code, Some(0));
    // A peer that is not on the allow-list (nobody) is refused and audited.
    std::fs::set_permissions(d.socket.parent().unwrap(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.socket, PermissionsExt::from_mode(0o666)).unwrap();
    let socket = d.socket.clone();
    let refused = tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .arg("--socket")
            .arg(&socket)
            .args(["-c", "print(1)"])
            .uid(65534)
            .gid(65534)
            .current_dir("/")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(refused.status.code(), Some(3), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("may not use this forkd"),
        "{refused:?}"
    );
    d.finish().await;

    let text = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        !text.contains("SECRET"),
        "payloads must not be logged by default: {text}"
    );
    let lines = audit_lines(&rotated);
    assert_eq!(lines.len(), 3, "one line per request: {text}");
    let me = std::process::id() as i64;
    for l in &lines {
        assert_eq!(l["event"], "spawn");
        assert_eq!(l["peer"]["uid"], 0, "the test runs as root");
        assert_eq!(l["peer"]["pid"], me);
        assert!(l["time"].as_str().unwrap().ends_with('Z'));
        assert!(l["duration_ms"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(lines[0]["outcome"], "ok");
    assert_eq!(lines[0]["zygote"], "default");
    assert_eq!(lines[0]["policy"], "default");
    assert_eq!(lines[0]["exit_code"], 0);
    assert_eq!(lines[0]["requested"]["stdin_bytes"], 12);
    assert_eq!(lines[0]["requested"]["env"], 1);
    assert_eq!(lines[0]["stdout_bytes"], 27);
    assert!(lines[0]["sandbox"].as_u64().is_some());
    assert_eq!(lines[0]["limits"]["timeout_ms"], 20_000);
    assert_eq!(lines[1]["outcome"], "killed");
    assert_eq!(lines[1]["killed_by"], "timeout");
    assert_eq!(lines[1]["requested"]["timeout_ms"], 300);
    assert_eq!(lines[2]["outcome"], "error");
    assert_eq!(lines[2]["error"], "unknown_zygote");
    assert!(lines[2].get("zygote").is_none());
    let after = audit_lines(&path);
    assert_eq!(
        after.len(),
        2,
        "the records after rotation are in a new file"
    );
    assert_eq!(after[0]["outcome"], "ok");
    assert_eq!(after[1]["event"], "refused_connection");
    assert_eq!(after[1]["peer"]["uid"], 65534);
    assert_eq!(after[1]["outcome"], "refused");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "audit log mode");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_payloads_are_recorded_only_when_asked() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let p = path.clone();
    let d = TestDaemon::start(move |c| {
        c.audit_log = Some(p);
        c.audit_payloads = true;
    })
    .await;
    d.spawn(&secret_request()).await.unwrap();
    d.finish().await;
    let lines = audit_lines(&path);
    assert_eq!(lines.len(), 1);
    let payloads = &lines[0]["payloads"];
    assert!(payloads["code"].as_str().unwrap().contains("SECRET_OUTPUT"));
    assert_eq!(payloads["argv"][0], "SECRET_ARG");
    assert_eq!(payloads["env"]["SECRET_ENV"], "SECRET_VALUE");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        b64.decode(payloads["stdout_b64"].as_str().unwrap())
            .unwrap(),
        b"SECRET_OUTPUT SECRET_STDIN\n"
    );
}
