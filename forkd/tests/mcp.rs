//! `forkd mcp` driven by the official MCP Python SDK (PyPI `mcp`) against a
//! real daemon: the client script (mcp/tests/client.py) initializes, lists
//! the tools, runs code one-shot and in a session, runs commands, moves
//! files, and checks errors; this side then checks what the MCP server left
//! behind (its sessions killed at exit, a kept one alive), that the daemon
//! still serves, and that nothing leaked.
//!
//! The client library is installed on first use into a venv under the
//! target directory (pip reads the machine's own index configuration); when
//! it cannot be installed the test says `skipped:` with the reason, or fails
//! with `FORKD_TEST_REQUIRE_MCP_CLIENT` set (CI).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use forkd_ipc::{SessionEnd, SessionState};

/// The client library's version the test pins.
const MCP_CLIENT: &str = "mcp==2.3.0";

/// A python with `mcp` importable, or why there is none.
fn mcp_python() -> Result<PathBuf, String> {
    // The tests of this file run in parallel: one installs, the others wait.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mcp-client-venv");
    let py = venv.join("bin/python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", "import mcp.client.stdio"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&py) {
        return Ok(py);
    }
    // The venv's base: the test interpreter (mcp needs Python >= 3.10).
    let base = python();
    let out = Command::new(&base)
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("{} -m venv: {e}", base.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -m venv failed: {}",
            base.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(MCP_CLIENT)
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !out.status.success() || !ready(&py) {
        return Err(format!(
            "pip install {MCP_CLIENT} failed (no package index reachable?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(py)
}

/// Runs the client script; returns its JSON report, panicking with its
/// stderr (the steps that passed, then the failure) when it fails.
fn run_client(py: &Path, socket: &Path, extra: &[&str]) -> serde_json::Value {
    let script = workspace_root().join("mcp/tests/client.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_forkd"))
        .arg(socket)
        .args(extra)
        .env_remove("FORKD_SOCKET")
        .output()
        .expect("run the MCP client script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "MCP client failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("client report {last:?}: {e}\n{stderr}"));
    for step in report["steps"].as_array().unwrap() {
        eprintln!("mcp client ok: {}", step.as_str().unwrap());
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_python_sdk_drives_forkd_mcp() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let Some(py) = install_or_skip(
        "the MCP Python client",
        Some("FORKD_TEST_REQUIRE_MCP_CLIENT"),
        mcp_python,
    )
    .await
    else {
        return;
    };
    let d = TestDaemon::start(|_| {}).await;

    // No daemon behind the socket: tool errors that say how to start one.
    let nowhere = d.socket.with_file_name("nobody-listens.sock");
    let (py2, no) = (py.clone(), nowhere.clone());
    let report = tokio::task::spawn_blocking(move || run_client(&py2, &no, &["--down"]))
        .await
        .unwrap();
    assert_eq!(report["steps"].as_array().unwrap().len(), 1);

    // Figures too when the zygote's interpreter has matplotlib
    // (scripts/venv.sh installs it).
    let has_mpl = Command::new(python())
        .args(["-c", "import matplotlib"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_mpl {
        skipped("the matplotlib figure step: matplotlib is not installed in the test python");
    }
    let extra: &'static [&'static str] = if has_mpl { &["--matplotlib"] } else { &[] };
    let (py2, socket) = (py.clone(), d.socket.clone());
    let report = tokio::task::spawn_blocking(move || run_client(&py2, &socket, extra))
        .await
        .unwrap();
    assert!(report["steps"].as_array().unwrap().len() >= 12, "{report}");

    // The MCP server has exited (its stdin closed): what it created without
    // keep is gone, the kept session is alive, and so is the daemon.
    let c = d.client().await;
    let left = report["left_open"].as_str().unwrap();
    let info = c.session_info(left).await.unwrap();
    assert_eq!(info.state, SessionState::Ended, "{info:?}");
    assert_eq!(info.ended_by, Some(SessionEnd::Killed), "{info:?}");
    let one_shot = BTreeMap::from([("forkd.mcp.one_shot".to_owned(), "true".to_owned())]);
    let one_shots = c.session_list(one_shot).await.unwrap();
    assert!(
        one_shots.iter().all(|s| s.state == SessionState::Ended),
        "one-shot sessions still running: {one_shots:?}"
    );
    let kept = report["kept"].as_str().unwrap();
    let info = c.session_info(kept).await.unwrap();
    assert_eq!(info.state, SessionState::Running, "{info:?}");
    assert!(info.labels["forkd.mcp"].parse::<u32>().is_ok(), "{info:?}");
    c.session_kill(kept).await.unwrap();

    // SIGTERM ends the server as a closed stdin does.
    let (py2, socket) = (py.clone(), d.socket.clone());
    let report = tokio::task::spawn_blocking(move || run_client(&py2, &socket, &["--sigterm"]))
        .await
        .unwrap();
    let info = c
        .session_info(report["session"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(info.ended_by, Some(SessionEnd::Killed), "{info:?}");
    let r = d.run("print(6 * 7)").await;
    assert_eq!(r.stdout_lossy(), "42\n");
    drop(c);
    d.finish().await;
}

/// Waits (up to a minute) for the client script's flag file.
async fn wait_flag(dir: &Path, n: u32) {
    let path = dir.join(format!("flag.{n}"));
    for _ in 0..1200 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the MCP client never wrote {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forkd_mcp_outlives_a_daemon_restart() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let Some(py) = install_or_skip(
        "the MCP Python client",
        Some("FORKD_TEST_REQUIRE_MCP_CLIENT"),
        mcp_python,
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("forkd.sock");
    let d1 = match TestDaemon::try_start(Some(socket.clone()), |_| {}).await {
        Ok(d) => d,
        Err((e, _)) => panic!("start: {e}"),
    };
    let (flags, sock) = (dir.path().to_owned(), socket.clone());
    let client = tokio::task::spawn_blocking(move || {
        run_client(&py, &sock, &["--restart", flags.to_str().unwrap()])
    });
    wait_flag(dir.path(), 1).await;
    // Leak checks once the MCP server (a child of this process) is gone.
    let d1 = d1.shutdown().await;
    std::fs::write(dir.path().join("flag.2"), "").unwrap();
    wait_flag(dir.path(), 3).await;
    let d2 = match TestDaemon::try_start(Some(socket.clone()), |_| {}).await {
        Ok(d) => d,
        Err((e, _)) => panic!("restart: {e}"),
    };
    std::fs::write(dir.path().join("flag.4"), "").unwrap();
    let report = client.await.unwrap();
    assert_eq!(report["steps"].as_array().unwrap().len(), 1, "{report}");
    d2.finish().await;
    d1.assert_no_leaks().await;
}
