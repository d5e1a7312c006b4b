//! The leak checks themselves, with an exact descriptor check.
//!
//! This file holds a single test on purpose: with nothing else running in
//! the test process, the fd comparison (every descriptor the test process
//! holds, before the daemon started vs. after shutdown) is exact. The test
//! also proves that each check can fail, by running it against a daemon that
//! is still up (cgroups, zygote process, descriptors) and against a real
//! mount (mount table).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_checks_fire_on_a_live_daemon_and_pass_after_shutdown() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;

    // Exercise the paths that own descriptors and processes: a normal run,
    // a timeout, an output flood, an error reply, a zygote restart.
    let r = d.run("import numpy; print(numpy.arange(3).sum())").await;
    assert_eq!(r.stdout, b"3\n");
    let mut busy = req("while True: pass");
    busy.timeout_ms = Some(300);
    assert_eq!(
        d.spawn(&busy).await.unwrap().killed_by,
        Some(KilledBy::Timeout)
    );
    let mut flood = req("import sys\nwhile True: sys.stdout.write('x' * 65536)");
    flood.limits.output_bytes = Some(100_000);
    assert_eq!(
        d.spawn(&flood).await.unwrap().killed_by,
        Some(KilledBy::OutputLimit)
    );
    let mut bad = req("print(1)");
    bad.limits.pids = Some(1_000_000);
    assert_eq!(
        server_error(d.spawn(&bad).await.unwrap_err()).code,
        ErrorCode::LimitExceedsPolicy
    );
    let old = d.zygote_pid().await;
    // SAFETY: the pid is our own zygote's (a positive pid).
    unsafe { libc::kill(old, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(10), || proc_stat(old)
            .is_none_or(|s| s.0 == 'Z'))
        .await,
        "killed zygote {old} did not go away"
    );
    let mut ok = false;
    for _ in 0..100 {
        match d.spawn(&req("print('again')")).await {
            Ok(r) if r.stdout == b"again\n" => {
                ok = true;
                break;
            }
            Ok(r) => panic!("unexpected result {r:?}"),
            Err(ClientError::Server(e)) if e.code == ErrorCode::ZygoteUnavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(ok, "zygote was not restarted");
    assert_ne!(d.zygote_pid().await, old);

    // While the daemon runs, the checks must see its cgroups, its zygote and
    // its descriptors.
    let live = d.report_now().await;
    println!("live daemon report: {live:#?}");
    assert!(
        !live.cgroups.is_empty(),
        "cgroup check did not see the running daemon's cgroups"
    );
    assert!(
        live.processes
            .iter()
            .any(|p| p.contains(&format!("marker Some(\"{}\")", d.instance))),
        "process check did not see the running zygote"
    );
    let fds = live
        .fds
        .as_ref()
        .expect("this file's single test must get an exact fd check");
    assert!(
        fds.iter().any(|f| f.contains("socket:")),
        "fd check did not see the daemon's sockets: {fds:?}"
    );
    assert!(live.mounts.is_empty(), "{live:#?}");

    // The mount check: a real tmpfs mount on the host appears, then goes.
    let mnt = tempfile::tempdir().unwrap();
    let target = CString::new(mnt.path().as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated strings; a plain tmpfs mount.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    let mounted = d.report_now().await;
    // SAFETY: unmounting what we just mounted.
    let rc = unsafe { libc::umount2(target.as_ptr(), 0) };
    assert_eq!(rc, 0, "umount: {}", std::io::Error::last_os_error());
    assert!(
        mounted
            .mounts
            .iter()
            .any(|m| m.contains(&mnt.path().display().to_string())),
        "mount check missed a new mount: {mounted:#?}"
    );
    assert!(d.report_now().await.mounts.is_empty());

    // After shutdown everything is back.
    let stopped = d.shutdown().await;
    assert!(!stopped.socket.exists());
    assert!(
        stopped.fd_check_is_exact(),
        "another session overlapped the only test of this file?"
    );
    let report = stopped.report().await;
    println!("after shutdown: {report:#?}");
    assert!(report.fds.is_some());
    report.assert_clean();
}
