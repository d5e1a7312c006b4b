//! Daemon lifecycle (socket claiming, shutdown) and zygote supervision
//! (failed start-up, crash and restart, recycling).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_daemon_on_a_served_socket_is_refused() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let (err, attempt) = match TestDaemon::try_start(Some(d.socket.clone()), |_| {}).await {
        Ok(_) => panic!("a second daemon started on a socket that is being served"),
        Err(e) => e,
    };
    match &err {
        forkd::StartError::AlreadyServed(p) => assert_eq!(p, &d.socket),
        other => panic!("expected AlreadyServed, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&d.socket.display().to_string()),
        "{err}"
    );
    // The failed attempt cleaned up its own cgroups and zygote...
    attempt.assert_no_leaks().await;
    // ...and did not disturb the first daemon or its socket.
    assert!(std::fs::metadata(&d.socket)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(d.run("print('first')").await.stdout, b"first\n");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_other_files_are_not_touched() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    // A leftover socket with no listener (a daemon that died).
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
    assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
    let d = match TestDaemon::try_start(Some(path.clone()), |_| {}).await {
        Ok(d) => d,
        Err((e, _)) => panic!("stale socket not replaced: {e}"),
    };
    assert_eq!(d.run("print('replaced')").await.stdout, b"replaced\n");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o660
    );
    d.finish().await; // also asserts the socket file is gone
    assert!(!path.exists());

    // A socket in a directory that does not exist (a mistyped --socket):
    // refused, saying so, and no directory is created (only the default
    // socket's own directory is made).
    let nested = dir.path().join("run/forkd/forkd.sock");
    let (err, attempt) = match TestDaemon::try_start(Some(nested.clone()), |_| {}).await {
        Ok(_) => panic!("the daemon created directories for a mistyped socket path"),
        Err(e) => e,
    };
    assert_eq!(
        err.to_string(),
        format!(
            "cannot use socket {}: its directory {} does not exist; create it, or check the socket path for a typo (forkd creates only the directory of its default socket, /run/forkd/forkd.sock)",
            nested.display(),
            nested.parent().unwrap().display()
        )
    );
    assert!(!dir.path().join("run").exists(), "a directory was created");
    attempt.assert_no_leaks().await;

    // Something that is not a socket is never deleted.
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let (err, attempt) = match TestDaemon::try_start(Some(file.clone()), |_| {}).await {
        Ok(_) => panic!("the daemon took over a regular file's path"),
        Err(e) => e,
    };
    assert!(matches!(err, forkd::StartError::Socket { .. }), "{err:?}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"keep me",
        "the daemon deleted a regular file"
    );
    attempt.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_running_sandboxes_and_replies() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    // Drained for a second, then killed.
    let d = TestDaemon::start(|c| c.shutdown_grace_ms = 1000).await;
    let client = d.client().await;
    let c = client.clone();
    let task = tokio::spawn(async move {
        let mut r = req("import time\nopen('/tmp/started', 'w').close()\nprint('sleeping', flush=True)\ntime.sleep(30)");
        r.timeout_ms = Some(60_000);
        c.spawn(&r).await
    });
    let running = d
        .wait_for_scratch_file("started", Duration::from_secs(10))
        .await;
    assert_eq!(d.daemon.running(), 1);
    let socket = d.socket.clone();

    let t0 = Instant::now();
    let stopped = d.shutdown().await;
    let shutdown_took = t0.elapsed();
    let res = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("no reply within 5 s of shutdown")
        .unwrap()
        .expect("the running request gets a result, not an error");
    let replied = t0.elapsed();
    println!(
        "shutdown took {shutdown_took:?}, reply after {replied:?}: {:?} {:?}",
        res.killed_by, res.signal
    );
    assert_eq!(res.killed_by, Some(KilledBy::Shutdown));
    assert_eq!((res.exit_code, res.signal), (None, Some(9)));
    assert_eq!(res.stdout, b"sleeping\n");
    assert!(shutdown_took >= Duration::from_secs(1), "{shutdown_took:?}");
    assert!(shutdown_took < Duration::from_secs(5), "{shutdown_took:?}");
    assert!(replied < Duration::from_secs(5), "{replied:?}");
    for (pid, start) in running {
        assert!(
            !process_alive(pid, start),
            "sandbox {pid} survived shutdown"
        );
    }

    // The socket is gone; the connection that was open gets refusals.
    assert!(!socket.exists());
    assert!(AsyncClient::connect(&socket).await.is_err());
    match client.spawn(&req("print(1)")).await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}"),
        other => panic!("expected shutting_down, got {other:?}"),
    }
    drop(client);
    stopped.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_import_error_fails_start_naming_module_and_interpreter() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let (err, attempt) = match TestDaemon::try_start(None, |c| {
        c.zygotes[0].preload = vec!["numpy".into(), "forkd_no_such_module".into()];
    })
    .await
    {
        Ok(_) => panic!("started with a preload module that does not exist"),
        Err(e) => e,
    };
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, forkd::StartError::Zygote(_)), "{err:?}");
    assert!(msg.contains("forkd_no_such_module"), "{msg}");
    assert!(
        msg.contains(&python().display().to_string()),
        "interpreter path missing: {msg}"
    );
    assert!(msg.contains("ModuleNotFoundError"), "{msg}");
    attempt.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_crash_or_hang_fails_start_with_the_reason() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("forkd_it_segv.py"),
        "import ctypes\nctypes.string_at(0)\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("forkd_it_slow.py"),
        "import time\ntime.sleep(60)\n",
    )
    .unwrap();
    let pythonpath = dir.path().display().to_string();

    let pp = pythonpath.clone();
    let (err, attempt) = match TestDaemon::try_start(None, move |c| {
        c.zygotes[0].preload = vec!["numpy".into(), "forkd_it_segv".into()];
        c.zygotes[0].env.insert("PYTHONPATH".into(), pp);
    })
    .await
    {
        Ok(_) => panic!("started although a preload module segfaults"),
        Err(e) => e,
    };
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, forkd::StartError::Zygote(_)), "{err:?}");
    assert!(msg.contains("forkd_it_segv"), "module not named: {msg}");
    assert!(
        msg.contains("signal 11") && msg.contains("SIGSEGV"),
        "signal not named: {msg}"
    );
    attempt.assert_no_leaks().await;

    let started = Instant::now();
    let (err, attempt) = match TestDaemon::try_start(None, move |c| {
        c.zygotes[0].preload = vec!["forkd_it_slow".into()];
        c.zygotes[0].env.insert("PYTHONPATH".into(), pythonpath);
        c.zygotes[0].start_timeout_secs = 1;
    })
    .await
    {
        Ok(_) => panic!("started although a preload module hangs"),
        Err(e) => e,
    };
    let msg = err.to_string();
    println!("{msg} (after {:?})", started.elapsed());
    assert!(
        msg.contains("forkd_it_slow") && msg.contains("start_timeout_secs"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    attempt.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_zygote_fails_its_requests_and_is_restarted() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let zygote = d.zygote_pid().await;
    let zygote_start = proc_stat(zygote).expect("zygote alive").2;
    let client = d.client().await;
    let c = client.clone();
    let task = tokio::spawn(async move {
        c.spawn(&req(
            "import time\nopen('/tmp/started', 'w').close()\ntime.sleep(5)\nprint('finished')",
        ))
        .await
    });
    let sandboxes = d
        .wait_for_scratch_file("started", Duration::from_secs(10))
        .await;

    let t0 = Instant::now();
    // SAFETY: kill with a positive pid: our own zygote.
    assert_eq!(unsafe { libc::kill(zygote, libc::SIGKILL) }, 0);
    let res = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the request hung after its zygote died")
        .unwrap();
    let took = t0.elapsed();
    let e = match res {
        Err(ClientError::Server(e)) => e,
        other => panic!("expected an error reply, got {other:?}"),
    };
    println!("after {took:?}: {e:?}");
    assert_eq!(e.code, ErrorCode::ZygoteUnavailable, "{e:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The sandbox died with its zygote (parent-death signal), the zygote is gone.
    for (pid, start) in sandboxes {
        assert!(
            wait_until(Duration::from_secs(3), || !process_alive(pid, start)).await,
            "sandbox {pid} outlived its zygote"
        );
    }
    assert!(
        wait_until(Duration::from_secs(3), || !process_alive(
            zygote,
            zygote_start
        ))
        .await
    );

    // A later request succeeds once the supervisor has restarted it. In the
    // moment between the death and the restart a request may still be told
    // the zygote is unavailable; nothing else is acceptable.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut unavailable = 0;
    let ok = loop {
        match client
            .spawn(&req("import numpy; print(numpy.zeros(2).tolist())"))
            .await
        {
            Ok(r) => break r,
            Err(ClientError::Server(e))
                if e.code == ErrorCode::ZygoteUnavailable && Instant::now() < deadline =>
            {
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("after the restart: {e}"),
        }
    };
    println!(
        "restarted after {:?} ({unavailable} unavailable replies)",
        t0.elapsed()
    );
    assert_eq!(ok.stdout, b"[0.0, 0.0]\n");
    assert_ne!(d.zygote_pid().await, zygote);
    drop(client);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zygote_is_recycled_after_max_forks() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].max_forks = Some(3)).await;
    let first = d.zygote_pid().await;
    // The replacement starts in the background while the worn zygote keeps
    // serving, so requests never wait for a recycle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while d.zygote_pid().await == first {
        assert!(
            Instant::now() < deadline,
            "zygote never recycled after {i} forks with max_forks = 3"
        );
        let r = d.run(&format!("print({i})")).await;
        assert_eq!(r.stdout_lossy(), format!("{i}\n"));
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(i >= 2, "recycled after only {i} forks");
    let second = d.zygote_pid().await;
    assert_eq!(d.run("print('fresh')").await.stdout, b"fresh\n");
    // The retired zygote exits once drained.
    assert!(
        wait_until(Duration::from_secs(5), || proc_stat(first).is_none()).await,
        "retired zygote {first} still exists"
    );
    assert!(proc_stat(second).is_some());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_requests_waiting_for_a_slot() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.max_concurrent = 1;
        c.shutdown_grace_ms = 500;
    })
    .await;
    let client = d.client().await;
    let (c1, c2) = (client.clone(), client.clone());
    let running = tokio::spawn(async move {
        c1.spawn(&req(
            "import time\nopen('/tmp/started', 'w').close()\ntime.sleep(30)",
        ))
        .await
    });
    d.wait_for_scratch_file("started", Duration::from_secs(10))
        .await;
    let queued = tokio::spawn(async move { c2.spawn(&req("print('never')")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !queued.is_finished(),
        "the second request should wait for the slot"
    );
    let stopped = d.shutdown().await;
    let r = running
        .await
        .unwrap()
        .expect("running request gets a result");
    assert_eq!(r.killed_by, Some(KilledBy::Shutdown));
    match queued.await.unwrap() {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}"),
        other => panic!("queued request: expected shutting_down, got {other:?}"),
    }
    drop(client);
    stopped.assert_no_leaks().await;
}

/// Pids whose /proc/<pid>/cgroup mentions `needle`.
fn pids_in_cgroups_named(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_to_string(entry.path().join("cgroup")).is_ok_and(|c| c.contains(needle)) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_daemon_leaks_nothing_after_a_restart() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("forkd.sock");
    let parent = format!("forkd-it-k9-{}", std::process::id());
    let config = dir.path().join("forkd.toml");
    std::fs::write(
        &config,
        format!(
            "[cgroup]\nparent = \"{parent}\"\n\n[[zygote]]\nname = \"default\"\npython = \"{}\"\npreload = [\"numpy\"]\nwarm_pool = 4\n",
            python().display()
        ),
    )
    .unwrap();
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_forkd"))
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .args(["--log-level", "warn"])
            // Attributed to this test, not flagged by the leak checks of
            // tests running next to it.
            .env(MARKER_VAR, &parent)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start forkd")
    };
    let wait_socket = |child: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "forkd exited early");
            assert!(Instant::now() < deadline, "forkd did not open its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut first = start();
    wait_socket(&mut first);
    // A sandbox running, warm children parked.
    let client = forkd_ipc::AsyncClient::connect(&socket).await.unwrap();
    let mut r = req("import time\nprint('up', flush=True)\ntime.sleep(60)");
    r.timeout_ms = Some(120_000);
    let running = tokio::spawn(async move { client.spawn(&r).await });
    let cgroup_name = format!("/{parent}/d{}", first.id());
    assert!(
        wait_until(Duration::from_secs(10), || pids_in_cgroups_named(
            &cgroup_name
        )
        .len()
            >= 2)
        .await,
        "no sandboxes of the first daemon seen"
    );

    // kill -9: no shutdown code runs.
    first.kill().unwrap();
    first.wait().unwrap();
    // Zygote (its control socket closed) and sandboxes (parent-death signal) follow.
    assert!(
        wait_until(Duration::from_secs(10), || pids_in_cgroups_named(
            &cgroup_name
        )
        .is_empty())
        .await,
        "processes of the killed daemon survive: {:?}",
        pids_in_cgroups_named(&cgroup_name)
    );
    let reply = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("client hung")
        .unwrap();
    assert!(
        reply.is_err(),
        "the request of a killed daemon must fail, got {reply:?}"
    );
    assert!(
        socket.exists(),
        "kill -9 leaves the socket file (the restart must cope)"
    );

    // A new daemon on the same socket takes over and removes the leftovers.
    let mut second = start();
    wait_socket(&mut second);
    for mount in cgroup_mounts() {
        let leftover = mount.join(&parent).join(format!("d{}", first.id()));
        assert!(!leftover.exists(), "{} left behind", leftover.display());
    }
    let c = forkd_ipc::AsyncClient::connect(&socket).await.unwrap();
    let ok = c.spawn(&req("print('again')")).await.unwrap();
    assert_eq!(ok.stdout, b"again\n");
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(second.wait().unwrap().success());
    assert!(!socket.exists());
    for mount in cgroup_mounts() {
        let p = mount.join(&parent);
        if p.exists() {
            // Sub-cgroups are directories; the rest are control files.
            let left: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "{} still holds {left:?}", p.display());
            let _ = std::fs::remove_dir(&p);
        }
    }
}

/// SIGTERM drains: no new work (a request on an open connection and a new
/// session are refused `shutting_down`), a sandbox that finishes within the
/// grace ends on its own with its output; one that does not is killed when
/// the drain is forced (a second signal), long before the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_kills_and_a_second_signal_forces() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.shutdown_grace_ms = 60_000).await;
    let client = d.client().await;
    let (c1, c2) = (client.clone(), client.clone());
    let finishing = tokio::spawn(async move {
        c1.spawn(&req(
            "import time\nopen('/tmp/started', 'w').close()\ntime.sleep(1.5)\nprint('done')",
        ))
        .await
    });
    d.wait_for_scratch_file("started", Duration::from_secs(10))
        .await;
    let long = tokio::spawn(async move {
        let mut r = req("import time\nprint('long', flush=True)\ntime.sleep(60)");
        r.timeout_ms = Some(120_000);
        c2.spawn(&r).await
    });
    while d.daemon.running() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (force_tx, force_rx) = tokio::sync::oneshot::channel::<()>();
    let stopping = tokio::spawn(d.shutdown_with(async move {
        let _ = force_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    match client.spawn(&req("print('new')")).await {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}"),
        other => panic!("a new request while draining: {other:?}"),
    }
    match client
        .session_create(&forkd_ipc::SessionCreate::default())
        .await
    {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}"),
        other => panic!("a new session while draining: {other:?}"),
    }
    let done = finishing.await.unwrap().expect("drained, not killed");
    assert_eq!((done.exit_code, done.killed_by), (Some(0), None));
    assert_eq!(done.stdout, b"done\n");
    // The drain would wait 60 s for the long one; the second signal cuts it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !long.is_finished(),
        "the long sandbox ended before the force"
    );
    let forced = Instant::now();
    let _ = force_tx.send(());
    let long = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("the long sandbox's reply within 10 s of the force")
        .unwrap()
        .expect("a result, not an error");
    assert_eq!(long.killed_by, Some(KilledBy::Shutdown));
    assert_eq!(long.stdout, b"long\n");
    let stopped = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown ends within 10 s of the force")
        .unwrap();
    assert!(forced.elapsed() < Duration::from_secs(10));
    drop(client);
    stopped.assert_no_leaks().await;
}

/// A draining daemon has closed its socket: a new daemon may take the path
/// meanwhile, and the old one, finishing, leaves the new one's socket alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_during_a_drain_keeps_its_socket() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let old = TestDaemon::start(|c| c.shutdown_grace_ms = 30_000).await;
    let client = old.client().await;
    let c = client.clone();
    let running = tokio::spawn(async move {
        c.spawn(&req(
            "import time\nopen('/tmp/started', 'w').close()\ntime.sleep(1.5)",
        ))
        .await
    });
    old.wait_for_scratch_file("started", Duration::from_secs(10))
        .await;
    let socket = old.socket.clone();
    let draining = tokio::spawn(old.shutdown());
    // The old one stops accepting at once; the new one takes the path.
    let new = loop {
        match TestDaemon::try_start(Some(socket.clone()), |_| {}).await {
            Ok(d) => break d,
            Err((forkd::StartError::AlreadyServed(_), attempt)) => {
                attempt.assert_no_leaks().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err((e, _)) => panic!("{e:?}"),
        }
    };
    running.await.unwrap().expect("drained");
    // (The old daemon's tempdir holds the path: kept until the end.)
    let stopped = draining.await.unwrap();
    assert!(
        socket.exists(),
        "the old daemon removed the new one's socket"
    );
    assert_eq!(new.run("print('new')").await.stdout, b"new\n");
    drop(client);
    new.finish().await;
    stopped.assert_no_leaks().await;
}
