//! Checkpoint and restore of a session against a real daemon and kernel
//! (docs/branch.md, "Checkpoint and restore"): what comes back (memory,
//! modules, seeds, scratch, open files), what goes (processes started since),
//! restoring twice, several checkpoints, loss, quotas, metrics and audit.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use common::cells::{create, text};
use common::*;
use forkd_ipc::{ClientError, ErrorCode};

fn code_of(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Server(e) => (e.code, e.message),
        other => panic!("not a server error: {other}"),
    }
}

/// The session's processes as its own code sees them (executor, interpreter,
/// the frozen copies of its checkpoints, anything it started).
const PROCESSES: &str = "len([p for p in os.listdir('/proc') if p.isdigit()])";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_puts_back_memory_modules_seeds_scratch_and_open_files() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    text(
        &c,
        &s,
        "import os, sys, random, subprocess\nimport numpy as np\nnp.random.random()\nx = 41\na = np.arange(1_000_000)\n\
         open('/tmp/f.txt', 'w').write('before')\nos.mkdir('/tmp/d'); open('/tmp/d/g', 'w').write('g')\n\
         os.chmod('/tmp/d/g', 0o000)\nos.symlink('f.txt', '/tmp/l'); os.link('/tmp/f.txt', '/tmp/hard')\n\
         os.mkdir('/tmp/shut'); open('/tmp/shut/in', 'w').write('in'); os.chmod('/tmp/shut', 0o000)\n\
         open('/dev/shm/m', 'wb').write(b'\\0' * 3_000_000)\nfh = open('/tmp/f.txt'); fh.read(3)\nNone",
    )
    .await;
    assert_eq!(text(&c, &s, "'wave' in sys.modules").await, "False");
    let base = text(&c, &s, PROCESSES).await;
    let ck = c.session_checkpoint(&s, false).await.unwrap();
    assert_eq!(ck.session, s);
    assert!(ck.scratch_bytes >= 3_000_006, "{ck:?}");
    let info = c.session_info(&s).await.unwrap();
    assert_eq!(info.checkpoints.len(), 1);
    assert_eq!(info.checkpoints[0].checkpoint, ck.checkpoint);
    // What the checkpointed state draws next, from both generators.
    let draws = "(random.random(), float(np.random.random()))";
    let first = text(&c, &s, draws).await;
    // Change everything, and start a process that must not survive.
    text(
        &c,
        &s,
        "x = 0\ndel a\nimport wave\nopen('/tmp/f.txt', 'w').write('after')\nimport shutil\n\
         os.chmod('/tmp/d/g', 0o600); shutil.rmtree('/tmp/d')\nos.unlink('/dev/shm/m')\n\
         open('/tmp/new', 'w').write('new')\nsleeper = subprocess.Popen(['sleep', '1000'])\nNone",
    )
    .await;
    let sleeper = text(&c, &s, "sleeper.pid").await;
    for round in 0..2 {
        let info = c.session_restore(&s, &ck.checkpoint).await.unwrap();
        assert_eq!(info.session, s);
        assert_eq!(info.checkpoints[0].restores, round + 1);
        assert_eq!(text(&c, &s, "x + 1").await, "42");
        assert_eq!(text(&c, &s, "int(a.sum())").await, "499999500000");
        assert_eq!(text(&c, &s, "'wave' in sys.modules").await, "False");
        assert_eq!(text(&c, &s, draws).await, first, "round {round}");
        assert_eq!(text(&c, &s, "fh.read()").await, "'ore'");
        assert_eq!(
            text(&c, &s, "open('/tmp/f.txt').read(), os.readlink('/tmp/l'), os.stat('/tmp/hard').st_nlink, oct(os.stat('/tmp/d/g').st_mode & 0o777), os.path.getsize('/dev/shm/m'), os.path.exists('/tmp/new')").await,
            "('before', 'f.txt', 2, '0o0', 3000000, False)"
        );
        assert_eq!(
            text(&c, &s, "os.chmod('/tmp/shut', 0o700); r = open('/tmp/shut/in').read(); os.chmod('/tmp/shut', 0o000); r").await,
            "'in'"
        );
        let alive = format!("os.path.exists('/proc/{sleeper}')");
        assert_eq!(text(&c, &s, &alive).await, "False");
        // The interpreter, the executor and the frozen copy: nothing more.
        assert_eq!(
            text(&c, &s, PROCESSES).await,
            base.parse::<u32>().map(|n| n + 1).unwrap().to_string()
        );
        text(
            &c,
            &s,
            "x = 7\nopen('/tmp/f.txt', 'w').write('again')\nNone",
        )
        .await;
    }
    // A second checkpoint; each restores its own state.
    let ck2 = c.session_checkpoint(&s, false).await.unwrap();
    c.session_restore(&s, &ck.checkpoint).await.unwrap();
    assert_eq!(text(&c, &s, "x").await, "41");
    c.session_restore(&s, &ck2.checkpoint).await.unwrap();
    assert_eq!(
        text(&c, &s, "x, open('/tmp/f.txt').read()").await,
        "(7, 'again')"
    );
    let listed = c.session_checkpoints(&s).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|k| k.checkpoint.as_str())
            .collect::<Vec<_>>(),
        [ck.checkpoint.as_str(), ck2.checkpoint.as_str()]
    );
    // Deleted: gone from the list and from the session's processes.
    c.session_checkpoint_delete(&s, &ck.checkpoint)
        .await
        .unwrap();
    let (code, message) = code_of(c.session_restore(&s, &ck.checkpoint).await.unwrap_err());
    assert_eq!(code, ErrorCode::UnknownCheckpoint, "{message}");
    assert_eq!(c.session_checkpoints(&s).await.unwrap().len(), 1);
    assert_eq!(
        text(
            &c,
            &s,
            "import time; time.sleep(0.2)\nlen([p for p in os.listdir('/proc') if p.isdigit()])"
        )
        .await,
        base.parse::<u32>().map(|n| n + 1).unwrap().to_string()
    );
    drop(c);
    d.finish().await;
}

/// A checkpoint's copy lives in the session: code there can kill it. The
/// restore then says so, the record goes, and the session carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_killed_from_inside_is_reported_lost() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let (s, bystander) = (create(&c).await, create(&c).await);
    text(&c, &bystander, "y = 'kept'").await;
    let bystanders_ck = c.session_checkpoint(&bystander, false).await.unwrap();
    text(&c, &s, "x = 1\nopen('/tmp/f', 'w').write('f')\nNone").await;
    let ck = c.session_checkpoint(&s, false).await.unwrap();
    // The scratch copies are the executor's (pid 1): its descriptors are
    // closed to the session's code.
    assert_eq!(
        text(&c, &s, "import os\ntry:\n    os.listdir('/proc/1/fd')\nexcept OSError as e:\n    r = type(e).__name__\nr").await,
        "'PermissionError'"
    );
    // Every process this code may signal (kill(-1) spares the caller).
    text(&c, &s, "import os, signal\nos.kill(-1, signal.SIGKILL)").await;
    let (code, message) = code_of(c.session_restore(&s, &ck.checkpoint).await.unwrap_err());
    assert_eq!(code, ErrorCode::UnknownCheckpoint);
    assert!(message.contains("lost"), "{message}");
    assert!(c.session_checkpoints(&s).await.unwrap().is_empty());
    assert_eq!(text(&c, &s, "1 + 1").await, "2");
    // Nothing of another session was touched.
    text(&c, &bystander, "y = 'changed'").await;
    c.session_restore(&bystander, &bystanders_ck.checkpoint)
        .await
        .unwrap();
    assert_eq!(text(&c, &bystander, "y").await, "'kept'");

    // The same through forkd-run: take, list, restore, delete.
    let run = |args: Vec<String>| {
        let socket = d.socket.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
                .args(["session", &args[0], "--socket"])
                .arg(&socket)
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        })
    };
    let arg = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    text(&c, &s, "x = 'cli'").await;
    let ck = run(arg(&["checkpoint", &s])).await.unwrap();
    let ck = ck.trim();
    assert!(ck.starts_with("ck-"), "{ck}");
    text(&c, &s, "x = 'changed'").await;
    run(arg(&["restore", &s, ck])).await.unwrap();
    assert_eq!(text(&c, &s, "x").await, "'cli'");
    let listed = run(arg(&["checkpoint", &s, "--list"])).await.unwrap();
    assert!(
        listed.starts_with(ck) && listed.contains("1 restores"),
        "{listed}"
    );
    run(arg(&["checkpoint", &s, "--delete", ck])).await.unwrap();
    assert_eq!(run(arg(&["checkpoint", &s, "--list"])).await.unwrap(), "");
    // --keep: listed as kept, and the killed session comes back from it.
    let kept = run(arg(&["checkpoint", &s, "--keep"])).await.unwrap();
    let kept = kept.trim();
    let listed = run(arg(&["checkpoint", &s, "--list"])).await.unwrap();
    assert!(listed.trim_end().ends_with("kept"), "{listed}");
    c.session_kill(&s).await.unwrap();
    run(arg(&["restore", &s, kept])).await.unwrap();
    assert_eq!(text(&c, &s, "x").await, "'cli'");
    drop(c);
    d.finish().await;
}

/// Quotas per session and per uid, threads, a paused session, metrics and
/// audit, and many cycles that leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refusals_records_and_cycles() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let a2 = audit.clone();
    let d = TestDaemon::start(move |c| {
        c.metrics_listen = Some("127.0.0.1:0".into());
        c.audit_log = Some(a2);
        c.sessions.max_checkpoints_per_session = 2;
        c.sessions.max_checkpoints_per_uid = 3;
    })
    .await;
    let c = d.client().await;
    let (s, t) = (create(&c).await, create(&c).await);
    let one = c.session_checkpoint(&s, false).await.unwrap();
    c.session_checkpoint(&s, false).await.unwrap();
    let (code, message) = code_of(c.session_checkpoint(&s, false).await.unwrap_err());
    assert_eq!(code, ErrorCode::LimitExceedsPolicy);
    assert!(message.contains("max_checkpoints_per_session"), "{message}");
    c.session_checkpoint(&t, false).await.unwrap();
    let (_, message) = code_of(c.session_checkpoint(&t, false).await.unwrap_err());
    assert!(message.contains("max_checkpoints_per_uid"), "{message}");
    c.session_checkpoint_delete(&s, &one.checkpoint)
        .await
        .unwrap();
    c.session_checkpoint(&t, false).await.unwrap();
    // A thread of the user's own: refused unless forced.
    c.session_kill(&t).await.unwrap();
    text(&c, &s, "import threading\nev = threading.Event()\nth = threading.Thread(target=ev.wait, name='worker'); th.start()\nNone").await;
    let listed = c.session_checkpoints(&s).await.unwrap();
    c.session_checkpoint_delete(&s, &listed[0].checkpoint)
        .await
        .unwrap();
    let (_, message) = code_of(c.session_checkpoint(&s, false).await.unwrap_err());
    assert!(
        message.contains("worker") && message.contains("force"),
        "{message}"
    );
    let forced = c.session_checkpoint(&s, true).await.unwrap();
    text(&c, &s, "ev.set(); th.join()\nNone").await;
    c.session_restore(&s, &forced.checkpoint).await.unwrap();
    assert_eq!(text(&c, &s, "th.is_alive()").await, "False");
    // Paused: refused until resumed.
    c.session_pause(&s).await.unwrap();
    let (code, _) = code_of(c.session_restore(&s, &forced.checkpoint).await.unwrap_err());
    assert_eq!(code, ErrorCode::SessionPaused);
    c.session_resume(&s).await.unwrap();
    for i in 0..30 {
        let ck = c.session_checkpoint(&s, false).await.unwrap();
        text(&c, &s, &format!("x = {i}")).await;
        c.session_restore(&s, &ck.checkpoint).await.unwrap();
        c.session_checkpoint_delete(&s, &ck.checkpoint)
            .await
            .unwrap();
    }
    assert_eq!(text(&c, &s, "'ok'").await, "'ok'");
    let metrics = common::scrape::scrape(d.metrics_addr().unwrap()).await;
    let count = |op: &str| {
        common::scrape::sample(
            &metrics,
            "forkd_session_requests_total",
            &[("op", op), ("outcome", "ok")],
        )
    };
    assert_eq!(count("session_checkpoint"), Some(35.0), "{metrics}");
    assert_eq!(count("session_restore"), Some(31.0), "{metrics}");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events = |event: &str| {
        records
            .iter()
            .filter(|r| r["event"] == event && r["session"] == s.as_str())
            .count()
    };
    assert_eq!(events("session_checkpointed"), 33);
    assert_eq!(events("session_restored"), 31);
    assert_eq!(events("session_checkpoint_deleted"), 32);
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "session_restored"
                && r["checkpoint"] == forced.checkpoint.as_str())
    );
    drop(c);
    d.finish().await;
}

fn keep(session: &str) -> forkd_ipc::SessionCheckpoint {
    forkd_ipc::SessionCheckpoint {
        session: session.into(),
        force: false,
        keep: true,
    }
}

/// The host pid of `session`'s init (pid 1 inside), found through a file
/// its code makes in its scratch.
async fn init_of(d: &TestDaemon, c: &forkd_ipc::AsyncClient, session: &str) -> (i32, u64) {
    let name = format!("init-of-{session}");
    text(
        c,
        session,
        &format!("open('/tmp/{name}', 'w').write('1')\nNone"),
    )
    .await;
    let found = d
        .wait_for_scratch_file(&name, std::time::Duration::from_secs(10))
        .await;
    text(
        c,
        session,
        &format!("import os\nos.remove('/tmp/{name}')\nNone"),
    )
    .await;
    *found
        .iter()
        .find(|(pid, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|v| v.split_whitespace().last().map(str::to_owned))
                })
                .as_deref()
                == Some("1")
        })
        .expect("the session's init")
}

/// A checkpoint taken with `keep` outlives its session's end: the killed
/// session is `ended_with_checkpoints`, listed and counted, refuses cells
/// with the way back, keeps only its kept checkpoints (an unkept one is
/// `unknown_checkpoint`), and `session_restore` brings it back under the same
/// id with the checkpoint's memory and scratch. Ended again, deleting its
/// last kept checkpoint takes what is left of it (init, cgroup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_checkpoint_outlives_its_session_and_restores_it() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let a2 = audit.clone();
    let d = TestDaemon::start(move |c| {
        c.sessions.max_per_uid = 2;
        c.sessions.max_checkpoints_per_uid = 2;
        c.audit_log = Some(a2);
    })
    .await;
    let c = d.client().await;
    let s = create(&c).await;
    text(
        &c,
        &s,
        "import numpy as np\nx = 41\na = np.arange(10)\nopen('/tmp/f', 'w').write('kept')\nNone",
    )
    .await;
    let kept = c.session_checkpoint_with(keep(&s)).await.unwrap();
    assert!(kept.kept, "{kept:?}");
    text(&c, &s, "x = 7\nopen('/tmp/f', 'w').write('unkept')\nNone").await;
    let unkept = c.session_checkpoint(&s, false).await.unwrap();
    assert!(!unkept.kept);
    let init = init_of(&d, &c, &s).await;

    let ended = c.session_kill(&s).await.unwrap();
    assert_eq!(
        ended.state,
        forkd_ipc::SessionState::EndedWithCheckpoints,
        "{ended:?}"
    );
    assert_eq!(ended.ended_by, Some(forkd_ipc::SessionEnd::Killed));
    let listed = c.session_list(Default::default()).await.unwrap();
    assert!(listed.iter().any(|i| i.session == s), "{listed:?}");
    let (code, message) = code_of(c.run_code(&common::cells::cell(&s, "1")).await.unwrap_err());
    assert_eq!(code, ErrorCode::SessionEnded);
    assert!(message.contains("session_restore"), "{message}");
    let left: Vec<String> = c
        .session_checkpoints(&s)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.checkpoint)
        .collect();
    assert_eq!(left, vec![kept.checkpoint.clone()]);
    let (code, _) = code_of(c.session_restore(&s, &unkept.checkpoint).await.unwrap_err());
    assert_eq!(code, ErrorCode::UnknownCheckpoint);
    // Its time is kept_checkpoint_ttl_secs', not a TTL to extend.
    let (code, _) = code_of(c.session_set_ttl(&s, 60_000).await.unwrap_err());
    assert_eq!(code, ErrorCode::SessionEnded);
    // Its interpreter is gone; its init holds the frozen copy.
    assert!(process_alive(init.0, init.1));
    // Counted: against the sessions (1 + this one = max_per_uid 2) and the
    // checkpoints (1 kept + 1 = max_checkpoints_per_uid 2).
    let t = create(&c).await;
    let (code, message) = code_of(
        c.session_create(&forkd_ipc::SessionCreate::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::LimitExceedsPolicy, "{message}");
    c.session_checkpoint(&t, false).await.unwrap();
    let (_, message) = code_of(c.session_checkpoint(&t, false).await.unwrap_err());
    assert!(message.contains("max_checkpoints_per_uid"), "{message}");
    c.session_kill(&t).await.unwrap();

    // Back, under the same id, in the kept state.
    let back = c.session_restore(&s, &kept.checkpoint).await.unwrap();
    assert_eq!(back.state, forkd_ipc::SessionState::Running, "{back:?}");
    assert!(back.ttl_left_ms > 0);
    assert_eq!(
        text(&c, &s, "x, int(a.sum()), open('/tmp/f').read()").await,
        "(41, 45, 'kept')"
    );
    text(&c, &s, "x = 1").await;
    // Restored again while running (the checkpoint stays).
    c.session_restore(&s, &kept.checkpoint).await.unwrap();
    assert_eq!(text(&c, &s, "x").await, "41");

    // Ended again; deleting the last kept checkpoint takes the rest.
    let init = init_of(&d, &c, &s).await;
    let ended = c.session_kill(&s).await.unwrap();
    assert_eq!(ended.state, forkd_ipc::SessionState::EndedWithCheckpoints);
    c.session_checkpoint_delete(&s, &kept.checkpoint)
        .await
        .unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || !process_alive(
            init.0, init.1
        ))
        .await,
        "the ended session's init outlived its last kept checkpoint"
    );
    // Retired (out of the list) once the zygote has reaped the init.
    let mut listed = true;
    for _ in 0..200 {
        listed = c
            .session_list(Default::default())
            .await
            .unwrap()
            .iter()
            .any(|i| i.session == s);
        if !listed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(!listed, "the ended session is still listed");
    let gone = c.session_info(&s).await.unwrap();
    assert_eq!(gone.state, forkd_ipc::SessionState::Ended, "{gone:?}");
    let events: Vec<String> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["session"] == s.as_str())
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    for e in [
        "session_ended",
        "session_revived",
        "session_restored",
        "session_reaped",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} not in {events:?}");
    }
    drop(c);
    d.finish().await;
}

/// A dormant session goes `kept_checkpoint_ttl_secs` after it ended, with
/// its init; a session without kept checkpoints ends as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_checkpoints_expire() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.sessions.kept_checkpoint_ttl_secs = 1).await;
    let c = d.client().await;
    let s = create(&c).await;
    text(&c, &s, "x = 41").await;
    let kept = c.session_checkpoint_with(keep(&s)).await.unwrap();
    let init = init_of(&d, &c, &s).await;
    c.session_kill(&s).await.unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(15), || !process_alive(
            init.0, init.1
        ))
        .await,
        "the kept checkpoint did not expire"
    );
    // Retired once the zygote has reaped the init.
    let mut gone = c.session_info(&s).await.unwrap();
    for _ in 0..200 {
        if gone.state == forkd_ipc::SessionState::Ended {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        gone = c.session_info(&s).await.unwrap();
    }
    assert_eq!(gone.state, forkd_ipc::SessionState::Ended, "{gone:?}");
    let (code, _) = code_of(c.session_restore(&s, &kept.checkpoint).await.unwrap_err());
    assert_eq!(code, ErrorCode::SessionEnded);
    // Not kept: the end is final.
    let t = create(&c).await;
    let ck = c.session_checkpoint(&t, false).await.unwrap();
    let ended = c.session_kill(&t).await.unwrap();
    assert_eq!(ended.state, forkd_ipc::SessionState::Ended);
    let (code, _) = code_of(c.session_restore(&t, &ck.checkpoint).await.unwrap_err());
    assert_eq!(code, ErrorCode::SessionEnded);
    drop(c);
    d.finish().await;
}
