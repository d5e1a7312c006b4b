//! The E2B-compatible gateway driven by the unmodified E2B Python SDKs
//! (`e2b` 2.63.0, `e2b-code-interpreter` 2.11.5) against a real daemon:
//! `tests/e2b/sdk.py` creates sandboxes, runs code with state and
//! streaming, reads errors and rich results, moves files, runs commands,
//! checks two tenants against each other (with a quota of 2 sessions each)
//! and sends bad input; `tests/e2b/sdk.mjs` does the core of it with the
//! JS SDK (`@e2b/code-interpreter` 2.8.0, installed with npm into
//! `target/e2b-js`).
//!
//! The SDKs are installed into `target/e2b-venv` on first use (pip reads
//! the machine's own index configuration); without them the test is
//! skipped with the reason printed.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const SDKS: [&str; 2] = ["e2b==2.63.0", "e2b-code-interpreter==2.11.5"];

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn has_sdks(python: &Path) -> bool {
    std::process::Command::new(python)
        .args([
            "-c",
            "from importlib.metadata import version as v\n\
             assert v('e2b') == '2.63.0' and v('e2b-code-interpreter') == '2.11.5'",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A python with the pinned SDKs, or why there is none.
fn sdk_python() -> Result<PathBuf, String> {
    let venv = target_dir().join("e2b-venv");
    let py = venv.join("bin/python");
    if py.exists() && has_sdks(&py) {
        return Ok(py);
    }
    let out = std::process::Command::new(python())
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("cannot run python -m venv: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "python -m venv failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = std::process::Command::new(&py)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(SDKS)
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !out.status.success() || !has_sdks(&py) {
        return Err(format!(
            "pip could not install {} (no package index reachable?): {}",
            SDKS.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(py)
}

/// `forkd/tests/e2b/NAME` under the SDKs' python, talking only to loopback
/// (no proxy, no E2B domain or debug mode from the environment).
fn sdk_script(py: &Path, name: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(py);
    cmd.arg(workspace_root().join("forkd/tests/e2b").join(name))
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .kill_on_drop(true);
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs an SDK script within `limit`; it must succeed and print ALL OK.
/// Returns its stdout.
async fn run_to_all_ok(mut cmd: tokio::process::Command, limit: Duration) -> String {
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .expect("the SDK script finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the SDK script failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_e2b_sdks_drive_the_gateway() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let Some(py) = install_or_skip("the E2B Python SDKs", None, sdk_python).await else {
        return;
    };
    let d = TestDaemon::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (key_a, key_b) = ("tenant-a-key-0123456789", "tenant-b-key-0123456789");
    std::fs::write(
        &keys,
        format!("# two tenants\n{key_a} alice\n{key_b} bob\n"),
    )
    .unwrap();

    let mut opts = forkd_gateway::Options::new(d.socket.clone());
    opts.api_keys = Some(keys);
    opts.max_sessions_per_tenant = Some(2);
    opts.header_timeout = Duration::from_secs(2);
    let gw = forkd_gateway::Gateway::new(opts).unwrap();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", metrics_listener.local_addr().unwrap());
    let metrics = tokio::spawn(axum_serve_metrics(gw.clone(), metrics_listener));
    let listener = forkd_gateway::bind(&gw, "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(forkd_gateway::serve(gw, listener, async {
        let _ = stopped.await;
    }));

    let mut cmd = sdk_script(&py, "sdk.py");
    cmd.env("E2B_API_KEY", key_a)
        .env("FORKD_E2B_KEY_B", key_b)
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url);
    let stdout = run_to_all_ok(cmd, Duration::from_secs(300)).await;
    for line in stdout.lines().filter(|l| l.starts_with("SKIP")) {
        skipped(line);
    }

    // Requests are counted per route, status and (verified) tenant.
    let text = fetch(&py, &metrics_url).await;
    for want in [
        r#"route="/execute",method="POST",status="200",tenant="alice""#,
        r#"route="/v2/sandboxes",method="POST",status="201",tenant="bob""#,
        r#"route="/v2/sandboxes",method="GET",status="401",tenant="-""#,
        r#"route="/process.Process/{method}",method="POST",status="200",tenant="alice""#,
    ] {
        assert!(text.contains(want), "metrics lack {want}:\n{text}");
    }

    // SIGHUP reloads the key file: a new key works, a removed one does not.
    let key_c = "tenant-c-key-0123456789";
    std::fs::write(
        dir.path().join("keys"),
        format!("{key_c} carol\n{key_b} bob\n"),
    )
    .unwrap();
    // SAFETY: kill(2) on our own pid; serve() has a SIGHUP handler installed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    let probe = format!(
        "import httpx, time\n\
         time.sleep(0.5)\n\
         for k in ['{key_a}', '{key_c}']:\n    \
             print(httpx.get('{url}/v2/sandboxes', headers={{'X-API-KEY': k}}).status_code)"
    );
    let out = tokio::process::Command::new(&py)
        .args(["-c", &probe])
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "401\n200\n",
        "after SIGHUP the old key is refused and the new one accepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The daemon is unaffected and nothing the gateway made is left.
    let c = d.client().await;
    assert_eq!(d.run("print(6 * 7)").await.stdout_lossy(), "42\n");
    assert!(c.session_list(Default::default()).await.unwrap().is_empty());
    drop(c);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    metrics.abort();
    let _ = metrics.await;
    d.finish().await;
}

/// E2B's `fork()` on forkd's branch, snapshots refused with what to use
/// instead, and the checkpoint extension with its per-tenant quota
/// (`forkd/tests/e2b/fork.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_fork_maps_onto_branch_and_checkpoints_are_an_extension() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let Some(py) = install_or_skip("the E2B Python SDKs", None, sdk_python).await else {
        return;
    };
    let d = TestDaemon::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (key_a, key_b) = ("fork-tenant-a-0123456789", "fork-tenant-b-0123456789");
    std::fs::write(&keys, format!("{key_a} alice\n{key_b} bob\n")).unwrap();
    let mut opts = forkd_gateway::Options::new(d.socket.clone());
    opts.api_keys = Some(keys);
    opts.max_sessions_per_tenant = Some(3);
    opts.max_checkpoints_per_tenant = Some(2);
    let gw = forkd_gateway::Gateway::new(opts).unwrap();
    let listener = forkd_gateway::bind(&gw, "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(forkd_gateway::serve(gw, listener, async {
        let _ = stopped.await;
    }));
    let mut cmd = sdk_script(&py, "fork.py");
    cmd.env("E2B_API_KEY", key_a)
        .env("FORKD_E2B_KEY_B", key_b)
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url);
    run_to_all_ok(cmd, Duration::from_secs(300)).await;
    // The script killed the source: its forks ended with it.
    let c = d.client().await;
    let live: Vec<_> = c
        .session_list(Default::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.state != forkd_ipc::SessionState::Ended)
        .collect();
    assert!(live.is_empty(), "sessions left: {live:?}");
    drop(c);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    d.finish().await;
}

/// One HTTP/1.1 request to `addr` (`Connection: close`): status and body.
async fn http(addr: &str, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A sandbox whose session went dormant (`ended_with_checkpoints`: a
/// client of the daemon's uid checkpointed it with `keep`, then it was
/// killed; the gateway itself never sends `keep`) is gone for E2B, as an
/// ended one: 404 on info, absent from the list, its tenant's quota free.
/// Before, it was listed and shown as `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_sandbox_is_gone_for_e2b() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let key = "dormant-tenant-0123456789";
    std::fs::write(&keys, format!("{key} alice\n")).unwrap();
    let mut opts = forkd_gateway::Options::new(d.socket.clone());
    opts.api_keys = Some(keys);
    opts.max_sessions_per_tenant = Some(1);
    let gw = forkd_gateway::Gateway::new(opts).unwrap();
    let listener = forkd_gateway::bind(&gw, "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(forkd_gateway::serve(gw, listener, async {
        let _ = stopped.await;
    }));

    let (status, body) = http(
        &addr,
        "POST",
        "/sandboxes",
        key,
        r#"{"templateID":"default"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = v["sandboxID"].as_str().unwrap().to_owned();
    let (status, body) = http(&addr, "GET", &format!("/sandboxes/{id}"), key, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""state":"running""#), "{body}");

    let c = d.client().await;
    c.session_checkpoint_with(forkd_ipc::SessionCheckpoint {
        session: id.clone(),
        force: false,
        keep: true,
    })
    .await
    .unwrap();
    c.session_kill(&id).await.unwrap();
    assert_eq!(
        c.session_info(&id).await.unwrap().state,
        forkd_ipc::SessionState::EndedWithCheckpoints
    );
    let (status, body) = http(&addr, "GET", &format!("/sandboxes/{id}"), key, "").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = http(&addr, "GET", "/sandboxes", key, "").await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    // Its place in the quota (1) is free for a new sandbox.
    let (status, body) = http(
        &addr,
        "POST",
        "/sandboxes",
        key,
        r#"{"templateID":"default"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let second = v["sandboxID"].as_str().unwrap().to_owned();
    let (status, _) = http(&addr, "DELETE", &format!("/sandboxes/{second}"), key, "").await;
    assert_eq!(status, 204);
    // The dormant one ends for good with a kill from its uid.
    c.session_kill(&id).await.unwrap();
    drop(c);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    d.finish().await;
}

/// The gateway's metrics router on `listener` (as `forkd-gateway --metrics-listen`).
async fn axum_serve_metrics(
    gw: std::sync::Arc<forkd_gateway::Gateway>,
    l: tokio::net::TcpListener,
) {
    let app = forkd_gateway::metrics_router(gw);
    let _ = forkd_gateway::serve_router(l, app).await;
}

/// GET `url` with the SDK venv's httpx.
async fn fetch(py: &Path, url: &str) -> String {
    let out = tokio::process::Command::new(py)
        .args([
            "-c",
            &format!("import httpx; print(httpx.get('{url}').text)"),
        ])
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const JS_SDK: &str = "@e2b/code-interpreter@2.8.0";

/// A directory with the pinned JS SDK installed (and the test script), or
/// why there is none.
fn js_sdk_dir() -> Result<PathBuf, String> {
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok {
        return Err("node is not installed".into());
    }
    let dir = target_dir().join("e2b-js");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let pkg = dir.join("node_modules/@e2b/code-interpreter/package.json");
    let installed =
        std::fs::read_to_string(&pkg).is_ok_and(|p| p.contains("\"version\": \"2.8.0\""));
    if !installed {
        std::fs::write(
            dir.join("package.json"),
            r#"{"name": "forkd-e2b-js-test", "private": true, "type": "module"}"#,
        )
        .map_err(|e| e.to_string())?;
        let out = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", JS_SDK])
            .current_dir(&dir)
            .output()
            .map_err(|e| format!("cannot run npm: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "npm could not install {JS_SDK} (no registry reachable?): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    // ESM resolves packages from the script's own directory.
    std::fs::copy(
        workspace_root().join("forkd/tests/e2b/sdk.mjs"),
        dir.join("sdk.mjs"),
    )
    .map_err(|e| e.to_string())?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_e2b_js_sdk_drives_the_gateway() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let Some(js) = install_or_skip("the E2B JS SDK", None, js_sdk_dir).await else {
        return;
    };
    let d = TestDaemon::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let key = "tenant-js-key-0123456789";
    std::fs::write(dir.path().join("keys"), format!("{key} js\n")).unwrap();
    let mut opts = forkd_gateway::Options::new(d.socket.clone());
    opts.api_keys = Some(dir.path().join("keys"));
    let gw = forkd_gateway::Gateway::new(opts).unwrap();
    let listener = forkd_gateway::bind(&gw, "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(forkd_gateway::serve(gw, listener, async {
        let _ = stopped.await;
    }));

    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("sdk.mjs")
        .current_dir(&js)
        .env("E2B_API_KEY", key)
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true);
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the JS SDK script finished within 3 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the JS SDK script failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let c = d.client().await;
    assert!(c.session_list(Default::default()).await.unwrap().is_empty());
    drop(c);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    d.finish().await;
}

/// Two nodes on this machine, each a daemon with its gateway (node-a,
/// node-b, peers of each other; B also knows node-c, where nothing
/// listens): `tests/e2b/nodes.py` creates a sandbox on A and drives it
/// through B with the unmodified SDK (code, streamed output, files, a
/// streamed command, info, kill), and checks the errors for an unknown node,
/// a node that is down and a second hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_forward_to_the_node_that_holds_the_sandbox() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let Some(py) = install_or_skip("the E2B Python SDKs", None, sdk_python).await else {
        return;
    };
    let (da, db) = (
        TestDaemon::start(|_| {}).await,
        TestDaemon::start(|_| {}).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let key = "tenant-nodes-key-0123456789";
    std::fs::write(&keys, format!("{key} alice\n")).unwrap();
    // Ports first: each gateway names the other as its peer.
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (url_a, url_b, url_down) = (
        format!("http://{}", la.local_addr().unwrap()),
        format!("http://{}", lb.local_addr().unwrap()),
        format!("http://{}", down.local_addr().unwrap()),
    );
    drop(down); // node-c's gateway is down: nothing listens there.
    let opts = |d: &TestDaemon, node: &str, peers: &[(&str, &str)]| {
        let mut o = forkd_gateway::Options::new(d.socket.clone());
        o.api_keys = Some(keys.clone());
        o.node = Some(node.into());
        o.peers = peers
            .iter()
            .map(|(n, u)| ((*n).to_owned(), (*u).to_owned()))
            .collect();
        o
    };
    let mut servers = Vec::new();
    for (l, o) in [
        (la, opts(&da, "node-a", &[("node-b", &url_b)])),
        (
            lb,
            opts(&db, "node-b", &[("node-a", &url_a), ("node-c", &url_down)]),
        ),
    ] {
        let gw = forkd_gateway::Gateway::new(o).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(forkd_gateway::serve(gw, l, async {
            let _ = stopped.await;
        }));
        servers.push((stop, task));
    }

    let mut cmd = sdk_script(&py, "nodes.py");
    cmd.env("E2B_API_KEY", key)
        .env("FORKD_URL_A", &url_a)
        .env("FORKD_URL_B", &url_b)
        .env_remove("E2B_API_URL")
        .env_remove("E2B_SANDBOX_URL");
    run_to_all_ok(cmd, Duration::from_secs(180)).await;

    // Nothing is left on either node.
    for d in [&da, &db] {
        let c = d.client().await;
        assert!(c.session_list(Default::default()).await.unwrap().is_empty());
    }
    for (stop, task) in servers {
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
    da.finish().await;
    db.finish().await;
}
