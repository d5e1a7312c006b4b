//! Sessions against a real daemon and kernel: state between cells, rich
//! results, streaming, interrupts, cancels, files, commands, pause, TTL and
//! idle expiry, ownership, and cleanup.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use forkd_ipc::{
    AsyncClient, Command, ErrorCode, Event, RunCode, SessionCreate, SessionEnd, SessionState,
    Stream,
};

fn cell(session: &str, code: &str) -> RunCode {
    RunCode {
        session: session.into(),
        code: code.into(),
        timeout_ms: Some(30_000),
    }
}

async fn create(c: &AsyncClient) -> String {
    c.session_create(&SessionCreate::default())
        .await
        .expect("session_create")
        .session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_persists_between_cells_and_results_are_rich() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;

    let r = c.run_code(&cell(&s, "x = 41")).await.unwrap();
    assert_eq!(r.execution_count, 1);
    assert!(r.text.is_none() && r.error.is_none(), "{r:?}");
    let r = c.run_code(&cell(&s, "print('side'); x + 1")).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("42"), "{r:?}");
    assert_eq!(r.stdout, b"side\n");
    assert_eq!(r.execution_count, 2);
    let main: Vec<_> = r.results.iter().filter(|d| d.main).collect();
    assert_eq!(main.len(), 1);
    assert_eq!(main[0].data["text/plain"], "42");

    // numpy (preloaded) and an object with a rich representation.
    let r = c
        .run_code(&cell(
            &s,
            "import numpy as np\nclass H:\n    def _repr_html_(self): return '<b>hi</b>'\n    def __repr__(self): return 'H()'\nH()",
        ))
        .await
        .unwrap();
    let data = &r.results[0].data;
    assert_eq!(data["text/html"], "<b>hi</b>");
    assert_eq!(data["text/plain"], "H()");
    let r = c.run_code(&cell(&s, "np.arange(4).sum()")).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("np.int64(6)"));

    // An exception: structured, with only the user's frames.
    let r = c
        .run_code(&cell(&s, "def f():\n    return 1 / 0\nf()"))
        .await
        .unwrap();
    let e = r.error.expect("an error");
    assert_eq!(e.name, "ZeroDivisionError");
    assert_eq!(e.value, "division by zero");
    assert!(e.traceback.contains("return 1 / 0"), "{}", e.traceback);
    assert!(!e.traceback.contains("forkd"), "{}", e.traceback);
    assert!(!e.traceback.contains("run_cell"), "{}", e.traceback);
    let r = c.run_code(&cell(&s, "x")).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("41"), "state survives an error");

    // A syntax error reads as Python's.
    let r = c.run_code(&cell(&s, "1 +")).await.unwrap();
    assert_eq!(r.error.unwrap().name, "SyntaxError");

    // display() sends a value at once, and it is in the results too.
    let r = c.run_code(&cell(&s, "display(1, 'a')")).await.unwrap();
    let shown: Vec<_> = r
        .results
        .iter()
        .map(|d| d.data["text/plain"].clone())
        .collect();
    assert_eq!(shown, vec!["1", "'a'"]);

    let info = c.session_info(&s).await.unwrap();
    assert_eq!(info.state, SessionState::Running);
    assert_eq!(info.cells, 8);
    assert!(info.usage.memory_bytes > 0, "{info:?}");
    assert!(info.usage.pids >= 2, "executor and interpreter: {info:?}");
    let info = c.session_kill(&s).await.unwrap();
    assert_eq!(info.state, SessionState::Ended);
    assert_eq!(info.ended_by, Some(SessionEnd::Killed));
    let e = server_error(c.run_code(&cell(&s, "1")).await.unwrap_err());
    assert_eq!(e.code, ErrorCode::SessionEnded, "{e:?}");
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_while_the_cell_runs() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    let code = "import time, sys\nprint('first')\ntime.sleep(1.5)\nprint('err', file=sys.stderr)\nprint('last')";
    let mut stream = c.run_code_stream(&cell(&s, code)).await.unwrap();
    let t0 = Instant::now();
    let first = stream.next_event().await.unwrap().expect("an event");
    assert_eq!(
        first,
        Event::Output {
            stream: Stream::Stdout,
            data: b"first\n".to_vec()
        }
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "the first line arrived only after {:?}, with the cell still sleeping",
        t0.elapsed()
    );
    let mut rest = Vec::new();
    while let Some(e) = stream.next_event().await.unwrap() {
        rest.push(e);
    }
    assert!(rest.contains(&Event::Output {
        stream: Stream::Stderr,
        data: b"err\n".to_vec()
    }));
    let r = stream.cell().await.unwrap();
    assert_eq!(r.stdout, b"first\nlast\n");
    assert_eq!(r.stderr, b"err\n");
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_timeout_and_cancel_keep_the_session() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    c.run_code(&cell(&s, "kept = 'yes'")).await.unwrap();

    // interrupt: KeyboardInterrupt in the cell, state kept.
    let mut stream = c
        .run_code_stream(&cell(
            &s,
            "import time\nprint('go', flush=True)\nwhile True: time.sleep(0.01)",
        ))
        .await
        .unwrap();
    stream.next_event().await.unwrap();
    c.interrupt(&s).await.unwrap();
    let r = stream.cell().await.unwrap();
    assert_eq!(r.error.as_ref().unwrap().name, "KeyboardInterrupt", "{r:?}");
    assert!(
        !r.timed_out,
        "stopped by the interrupt, not the cell's timeout: {r:?}"
    );
    let tb = &r.error.as_ref().unwrap().traceback;
    // Where the interrupt lands depends on timing (the print's return, or
    // the sleep); either way the frames are the cell's.
    assert!(
        tb.contains("<cell-") && tb.contains("KeyboardInterrupt"),
        "{tb}"
    );
    assert!(
        !tb.contains("/dev/fd") && !tb.contains("_on_sigint"),
        "{tb}"
    );
    assert_eq!(
        c.run_code(&cell(&s, "kept")).await.unwrap().text.as_deref(),
        Some("'yes'")
    );

    // A cell timeout interrupts the cell only.
    let mut rc = cell(&s, "while True: pass");
    rc.timeout_ms = Some(300);
    let r = c.run_code(&rc).await.unwrap();
    assert!(r.timed_out);
    assert_eq!(r.error.unwrap().name, "KeyboardInterrupt");
    assert_eq!(
        c.run_code(&cell(&s, "kept")).await.unwrap().text.as_deref(),
        Some("'yes'")
    );

    // A cell that ignores SIGINT: the interpreter is replaced, state lost.
    let mut rc = cell(
        &s,
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
    );
    rc.timeout_ms = Some(300);
    let r = c.run_code(&rc).await.unwrap();
    assert!(r.timed_out);
    assert_eq!(r.error.as_ref().unwrap().name, "KernelDied", "{r:?}");
    let r = c.run_code(&cell(&s, "kept")).await.unwrap();
    assert_eq!(r.error.unwrap().name, "NameError", "a fresh interpreter");
    assert_eq!(
        c.run_code(&cell(&s, "1 + 1"))
            .await
            .unwrap()
            .text
            .as_deref(),
        Some("2")
    );

    // Dropping a stream cancels its cell; a request beside it on the same
    // connection is unaffected.
    c.run_code(&cell(&s, "kept = 'again'")).await.unwrap();
    let stream = c
        .run_code_stream(&cell(&s, "import time\nwhile True: time.sleep(0.01)"))
        .await
        .unwrap();
    let other = create(&c).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
    let beside = c.run_code(&cell(&other, "6 * 7")).await.unwrap();
    assert_eq!(beside.text.as_deref(), Some("42"));
    let r = c.run_code(&cell(&s, "kept")).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("'again'"), "{r:?}");
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_move_both_ways_and_errors_are_clear() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.limits.default.scratch_bytes = 512 << 20;
        c.limits.default.file_size_bytes = 1 << 30;
        c.limits.default.memory_bytes = 1 << 30;
    })
    .await;
    let c = d.client().await;
    let s = create(&c).await;
    let big: Vec<u8> = (0..(100usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
    c.write_file(&s, "data/big.bin", &big, None)
        .await
        .expect_err("the parent directory does not exist yet");
    c.make_dir(&s, "data").await.unwrap();
    let t0 = Instant::now();
    c.write_file(&s, "data/big.bin", &big, None).await.unwrap();
    let wrote = t0.elapsed();
    let r = c
        .run_code(&cell(&s, "import os; os.path.getsize('data/big.bin')"))
        .await
        .unwrap();
    assert_eq!(r.text.as_deref(), Some(&*format!("{}", big.len())));
    let t0 = Instant::now();
    let back = c.read_file(&s, "data/big.bin").await.unwrap();
    let read = t0.elapsed();
    assert!(back == big, "100 MiB round trip differs");
    eprintln!("100 MiB: write {wrote:?}, read {read:?}");

    let listing = c.list_files(&s, "data").await.unwrap();
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].name, "big.bin");
    assert_eq!(listing[0].kind, "file");
    assert_eq!(listing[0].size, big.len() as u64);
    let st = c.stat_file(&s, "/tmp/data").await.unwrap();
    assert_eq!(st.kind, "dir");

    let e = server_error(c.read_file(&s, "nope.txt").await.unwrap_err());
    assert_eq!(e.code, ErrorCode::NotFound, "{e:?}");
    // What the sandbox cannot see or write, the file calls cannot either.
    let e = server_error(c.write_file(&s, "/etc/evil", b"x", None).await.unwrap_err());
    assert_eq!(e.code, ErrorCode::FileError, "{e:?}");
    let e = server_error(c.read_file(&s, "/etc/shadow").await.unwrap_err());
    assert!(
        matches!(e.code, ErrorCode::FileError | ErrorCode::NotFound),
        "{e:?}"
    );
    // A symlink out of the scratch resolves inside the sandbox's view.
    c.run_code(&cell(
        &s,
        "import os; os.symlink('/proc/1/environ', 'link')",
    ))
    .await
    .unwrap();
    let e = server_error(c.read_file(&s, "link").await.unwrap_err());
    assert!(
        matches!(e.code, ErrorCode::FileError | ErrorCode::NotFound),
        "{e:?}"
    );
    // Over the scratch quota.
    let e = server_error(
        c.write_file(&s, "huge.bin", &vec![0u8; 8 << 20], None)
            .await
            .and(
                c.write_file(&s, "huge2.bin", &vec![1u8; 600 << 20], None)
                    .await,
            )
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::FileError, "{e:?}");
    assert!(e.message.contains("scratch"), "{}", e.message);
    c.remove_file(&s, "data").await.unwrap();
    let e = server_error(c.stat_file(&s, "data").await.unwrap_err());
    assert_eq!(e.code, ErrorCode::NotFound);
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_in_the_sandbox_with_exit_codes() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    let cmd = |line: &str| Command {
        session: s.clone(),
        cmd: line.into(),
        timeout_ms: Some(20_000),
        ..Command::default()
    };
    let r = c
        .command(&cmd("echo out; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.stdout, b"out\n");
    assert_eq!(r.stderr, b"err\n");
    let r = c.command(&cmd("echo $$; pwd; echo $FOO")).await.unwrap();
    let out = String::from_utf8(r.stdout).unwrap();
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines[1], "/home/user", "E2B's working directory");
    let mut with_env = cmd("echo $FOO; pwd");
    with_env.env = BTreeMap::from([("FOO".into(), "bar".into())]);
    with_env.cwd = Some("/".into());
    let r = c.command(&with_env).await.unwrap();
    assert_eq!(r.stdout, b"bar\n/\n");
    // The interpreter and the commands share the scratch.
    c.run_code(&cell(&s, "open('note.txt', 'w').write('from python')"))
        .await
        .unwrap();
    let r = c.command(&cmd("cat note.txt")).await.unwrap();
    assert_eq!(r.stdout, b"from python");
    // /home/user is the scratch (/tmp) under E2B's name, and HOME.
    let r = c
        .command(&cmd("echo $HOME; touch /home/user/h && ls /tmp/h"))
        .await
        .unwrap();
    assert_eq!(
        r.stdout,
        b"/home/user\n/tmp/h\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // python is there.
    let r = c.command(&cmd("python3 -c 'print(6*7)'")).await.unwrap();
    assert_eq!(
        r.stdout,
        b"42\n",
        "{:?}",
        String::from_utf8_lossy(&r.stderr)
    );
    // Timeout kills the command's whole group.
    let mut slow = cmd("sleep 30 & sleep 30");
    slow.timeout_ms = Some(300);
    let r = c.command(&slow).await.unwrap();
    assert!(r.timed_out);
    assert_eq!(r.signal, Some(9));
    assert_eq!(
        r.kill_message().as_deref(),
        Some("killed: timed out after 0.3 s (the timeout)")
    );
    // A background command, killed by pid.
    let mut stream = c
        .command_stream(&cmd("echo started; sleep 30"))
        .await
        .unwrap();
    let pid = match stream.next_event().await.unwrap() {
        Some(Event::CommandStarted { pid }) => pid,
        other => panic!("{other:?}"),
    };
    // Killed once it has said something (else the kill may come first).
    assert_eq!(
        stream.next_event().await.unwrap(),
        Some(Event::Output {
            stream: Stream::Stdout,
            data: b"started\n".to_vec()
        })
    );
    c.command_kill(&s, pid).await.unwrap();
    let r = stream.command().await.unwrap();
    assert_eq!(r.signal, Some(9));
    assert_eq!(r.stdout, b"started\n");
    let r = c.command(&cmd("exec /nonexistent")).await.unwrap();
    assert_eq!(r.exit_code, Some(127));
    drop(c);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_idle_pause_and_metrics() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let a2 = audit.clone();
    let d = TestDaemon::start(move |c| {
        c.metrics_listen = Some("127.0.0.1:0".into());
        c.audit_log = Some(a2);
    })
    .await;
    let c = d.client().await;
    let short = c
        .session_create(&SessionCreate {
            ttl_ms: Some(500),
            labels: BTreeMap::from([("job".into(), "a".into())]),
            ..SessionCreate::default()
        })
        .await
        .unwrap();
    let idle = c
        .session_create(&SessionCreate {
            idle_timeout_ms: Some(400),
            ..SessionCreate::default()
        })
        .await
        .unwrap();
    let kept = c
        .session_create(&SessionCreate {
            labels: BTreeMap::from([("job".into(), "b".into())]),
            ..SessionCreate::default()
        })
        .await
        .unwrap();
    let listed = c
        .session_list(BTreeMap::from([("job".into(), "b".into())]))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session, kept.session);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let info = c.session_info(&short.session).await.unwrap();
    assert_eq!(info.ended_by, Some(SessionEnd::Ttl), "{info:?}");
    let info = c.session_info(&idle.session).await.unwrap();
    assert_eq!(info.ended_by, Some(SessionEnd::Idle), "{info:?}");
    assert_eq!(c.session_list(BTreeMap::new()).await.unwrap().len(), 1);
    let gone = server_error(c.session_info("no-such-session").await.unwrap_err());
    assert_eq!(gone.code, ErrorCode::UnknownSession);

    let text = common::scrape::scrape(d.metrics_addr().unwrap()).await;
    let metric = |name: &str, labels: &[(&str, &str)]| common::scrape::sample(&text, name, labels);
    assert_eq!(
        metric("forkd_sessions_ended_total", &[("ended_by", "ttl")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric("forkd_sessions_ended_total", &[("ended_by", "idle")]),
        Some(1.0)
    );
    assert_eq!(metric("forkd_sessions_created_total", &[]), Some(3.0));
    let requests = |op: &str, outcome: &str| {
        metric(
            "forkd_session_requests_total",
            &[("op", op), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("session_create", "ok"), Some(3.0), "{text}");
    assert_eq!(requests("session_list", "ok"), Some(2.0));
    assert_eq!(requests("session_info", "ok"), Some(2.0));
    assert_eq!(requests("session_info", "unknown_session"), Some(1.0));
    assert_eq!(metric("forkd_sessions_live", &[]), Some(1.0));
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || lines().iter().any(|l| l
            ["event"]
            == "session_ended"
            && l["outcome"] == "ttl"
            && l["session"] == short.session.as_str()))
        .await,
        "{:?}",
        lines()
    );
    assert_eq!(
        lines()
            .iter()
            .filter(|l| l["event"] == "session_created")
            .count(),
        3
    );

    // set_ttl
    let info = c.session_set_ttl(&kept.session, 60_000).await.unwrap();
    assert!(info.ttl_left_ms > 50_000 && info.ttl_left_ms <= 60_000);

    drop(c);
    d.finish().await;
}

/// A session belongs to its creator: another uid sees none of it and cannot
/// run, read or kill in it (root can).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_cannot_see_or_touch_a_session() {
    if skip_unless_root("starts a daemon and runs a client as another uid") {
        return;
    }
    let d = TestDaemon::start(|c| c.allowed_uids = Some(vec![0, 65534])).await;
    let c = d.client().await;
    let mine = create(&c).await;
    c.run_code(&cell(&mine, "secret = 'root only'"))
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.socket.parent().unwrap(), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.socket, PermissionsExt::from_mode(0o666)).unwrap();
    let as_nobody = |args: Vec<String>| {
        let socket = d.socket.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::process::CommandExt;
            std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
                .arg("session")
                .arg("--socket")
                .arg(&socket)
                .args(args)
                .uid(65534)
                .gid(65534)
                .current_dir("/")
                .output()
                .unwrap()
        })
    };
    let ls = as_nobody(vec!["ls".into()]).await.unwrap();
    assert!(ls.status.success(), "{ls:?}");
    assert!(
        !String::from_utf8_lossy(&ls.stdout).contains(&mine),
        "{ls:?}"
    );
    for args in [
        vec![
            "exec".to_string(),
            mine.clone(),
            "-c".into(),
            "secret".into(),
        ],
        vec!["info".into(), mine.clone()],
        vec![
            "get".into(),
            mine.clone(),
            "/etc/hostname".into(),
            "-".into(),
        ],
        vec!["kill".into(), mine.clone()],
    ] {
        let out = as_nobody(args.clone()).await.unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("unknown_session"), "{args:?}: {err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("root only"));
    }
    // Its own session works, and is invisible to root's list filter by
    // label but visible to root.
    let theirs = as_nobody(vec!["create".into(), "--label".into(), "who=nobody".into()])
        .await
        .unwrap();
    assert!(theirs.status.success(), "{theirs:?}");
    let theirs = String::from_utf8_lossy(&theirs.stdout).trim().to_string();
    let all = c.session_list(BTreeMap::new()).await.unwrap();
    assert!(
        all.iter().any(|s| s.session == theirs),
        "root sees every session"
    );
    assert_eq!(
        c.session_info(&mine).await.unwrap().state,
        SessionState::Running,
        "the bystander session is untouched"
    );
    c.session_kill(&theirs).await.unwrap();
    drop(c);
    d.finish().await;
}

/// A cell stopped by a limit says so in one line, in the words of a
/// one-shot kill (`kill_message`), through the client and `forkd-run
/// session exec`; the session goes on (a fresh interpreter after an OOM
/// kill), and a bystander session keeps its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_stopped_by_a_limit_say_why_in_one_line() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.limits.default.memory_bytes = 256 << 20).await;
    let c = d.client().await;
    let bystander = create(&c).await;
    c.run_code(&cell(&bystander, "state = 7")).await.unwrap();
    let s = create(&c).await;
    let enforced = c.session_info(&s).await.unwrap().limits.cgroup_enforced;

    let r = c
        .run_code(&RunCode {
            timeout_ms: Some(1000),
            ..cell(&s, "import time\ntime.sleep(30)")
        })
        .await
        .unwrap();
    assert_eq!(r.error.as_ref().unwrap().name, "KeyboardInterrupt", "{r:?}");
    assert_eq!(
        (r.timed_out, r.timeout_ms, r.killed_by),
        (true, Some(1000), None)
    );
    assert_eq!(
        r.kill_message().as_deref(),
        Some("interrupted: timed out after 1 s (the timeout)")
    );
    // A cell that ends on its own says nothing.
    let r = c.run_code(&cell(&s, "1 + 1")).await.unwrap();
    assert_eq!((r.kill_message(), r.timeout_ms), (None, None), "{r:?}");

    // Touching more than the limit: the OOM killer ends the interpreter.
    const HOG: &str = "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))";
    let oom_line = |m: &str| {
        // `killed: out of memory (limit 256 MiB, peak 255.9 MiB)`; the
        // peak only where the cgroup reports one.
        let rest = m.strip_prefix("killed: out of memory (limit 256 MiB")?;
        let rest = rest.strip_suffix(')')?;
        (rest.is_empty() || rest.strip_prefix(", peak ")?.ends_with("MiB")).then_some(())
    };
    if enforced {
        let r = c.run_code(&cell(&s, HOG)).await.unwrap();
        assert_eq!(r.error.as_ref().unwrap().name, "KernelDied", "{r:?}");
        assert_eq!(r.killed_by, Some(forkd_ipc::KilledBy::Oom), "{r:?}");
        assert_eq!(r.memory_limit_bytes, Some(256 << 20));
        let m = r.kill_message().unwrap();
        println!("an OOM-killed cell: {m}");
        assert!(oom_line(&m).is_some(), "{m}");
        // The session goes on in a fresh interpreter, and says nothing more.
        let r = c.run_code(&cell(&s, "'after'")).await.unwrap();
        assert_eq!(r.text.as_deref(), Some("'after'"), "{r:?}");
        assert_eq!(r.kill_message(), None);
    }

    // forkd-run session exec: the same line, and what to raise.
    let exec = |args: Vec<String>| {
        let socket = d.socket.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
                .arg("session")
                .arg("--socket")
                .arg(&socket)
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
    };
    let out = exec(vec![
        "exec".into(),
        s.clone(),
        "--timeout".into(),
        "1".into(),
        "-c".into(),
        "import time\ntime.sleep(30)".into(),
    ])
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("Traceback (most recent call last):\n"),
        "{err}"
    );
    assert!(
        err.ends_with("KeyboardInterrupt\nforkd-run: cell interrupted: timed out after 1 s (the timeout); raise --timeout\n"),
        "{err}"
    );
    // forkd-run session sh: a command's kill in the same words.
    let out = exec(vec![
        "sh".into(),
        s.clone(),
        "--timeout".into(),
        "0.5".into(),
        "sleep".into(),
        "30".into(),
    ])
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 9), "{err}");
    assert_eq!(
        err,
        "forkd-run: command killed: timed out after 0.5 s (the timeout); raise --timeout\n"
    );
    if enforced {
        let out = exec(vec!["exec".into(), s.clone(), "-c".into(), HOG.into()])
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let mut lines = err.lines();
        assert!(
            lines.next().unwrap().starts_with("KernelDied: the interpreter was killed by the out-of-memory killer: the session may use 256 MiB"),
            "{err}"
        );
        let last = lines.next().unwrap();
        let m = last
            .strip_prefix("forkd-run: cell ")
            .and_then(|m| m.strip_suffix("; create the session with a larger --memory"))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(oom_line(m).is_some(), "{err}");
        assert_eq!(lines.next(), None, "{err}");
    } else {
        skipped("the OOM half: no enforced memory limit (no usable cgroup)");
    }
    let r = c.run_code(&cell(&bystander, "state")).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("7"), "bystander: {r:?}");
    drop(c);
    d.finish().await;
}

/// What user code can do to its own session: none of it reaches the
/// daemon, the executor's channels, or a bystander session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cells_cannot_forge_or_break_the_executor() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.limits.default.output_bytes = 1 << 20;
        c.limits.default.memory_bytes = 256 << 20;
    })
    .await;
    let c = d.client().await;
    let bystander = create(&c).await;
    c.run_code(&cell(&bystander, "state = 7")).await.unwrap();
    let s = create(&c).await;

    // Forge a reply on the executor's channel to the daemon: its fds are
    // not the interpreter's, and /proc/1 is closed to it.
    let r = c
        .run_code(&cell(
            &s,
            "import os, struct, json\nout = []\nfor fd in range(3, 64):\n    try:\n        os.fstat(fd); out.append(fd)\n    except OSError: pass\nfor path in ['/proc/1/fd/1', '/proc/1/fd/0', '/proc/1/mem']:\n    try:\n        open(path, 'wb'); out.append(path)\n    except OSError as e: out.append(type(e).__name__)\nout",
        ))
        .await
        .unwrap();
    let text = r.text.clone().unwrap_or_default();
    assert!(
        !text.contains("/proc/1"),
        "the executor's fds were opened: {text}"
    );
    // Write a well-formed forged frame wherever the cell can: stdout, the
    // cell channel's fds 3 and 4.
    let forged = r#"import json, os
h = json.dumps({"op": "cell_done", "req": 999, "execution_count": 1, "text": "forged", "results": [], "error": None, "stdout_truncated": False, "stderr_truncated": False}).encode()
frame = len(h).to_bytes(4, 'big') + (0).to_bytes(4, 'big') + h
os.write(1, frame)
try:
    os.write(4, len(h).to_bytes(4, 'big') + h)
except OSError:
    pass
'real'"#;
    let r = c.run_code(&cell(&s, forged)).await.unwrap();
    assert_ne!(r.text.as_deref(), Some("forged"), "{r:?}");
    // Its own channel was broken: the interpreter was replaced, the session lives.
    let r = c.run_code(&cell(&s, "'after'")).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("'after'"), "{r:?}");

    // Signals to the executor (pid 1) do nothing.
    let r = c
        .run_code(&cell(&s, "import os, signal\nfor sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL, signal.SIGSTOP):\n    os.kill(1, sig)\n'alive'"))
        .await
        .unwrap();
    assert_eq!(r.text.as_deref(), Some("'alive'"), "{r:?}");

    // An output flood is cut at the limit and interrupts the cell only.
    let r = c
        .run_code(&cell(&s, "while True: print('x' * 1000)"))
        .await
        .unwrap();
    assert!(r.stdout_truncated, "{:?}", r.error);
    assert!(r.stdout.len() <= 1 << 20);
    // And a command's: it is killed, and says why.
    let r = c
        .command(&Command {
            session: s.clone(),
            cmd: "yes".into(),
            cwd: None,
            env: BTreeMap::new(),
            timeout_ms: Some(20_000),
            stdin: false,
        })
        .await
        .unwrap();
    assert!(r.stdout_truncated && !r.timed_out, "{r:?}");
    assert!(r.stdout.len() <= 1 << 20);
    assert_eq!(
        r.kill_message().as_deref(),
        Some("killed: output over the limit (1 MiB of stdout+stderr)")
    );
    // Memory beyond the limit: the interpreter is OOM-killed and replaced.
    let r = c
        .run_code(&cell(
            &s,
            "b = bytearray(512 << 20); b[::4096] = b'x' * len(b[::4096])",
        ))
        .await
        .unwrap();
    let e = r.error.expect("an error");
    assert!(
        e.name == "MemoryError" || (e.name == "KernelDied" && e.value.contains("out-of-memory")),
        "{e:?}"
    );
    // The interpreter exits: replaced.
    let r = c
        .run_code(&cell(&s, "import os; os._exit(3)"))
        .await
        .unwrap();
    assert_eq!(r.error.unwrap().name, "KernelDied");
    // A fork bomb hits the pids limit, not the daemon.
    let r = c
        .run_code(&cell(&s, "import os\nfor _ in range(10000):\n    try:\n        os.fork() or os._exit(0)\n    except OSError:\n        break\n'done'"))
        .await
        .unwrap();
    assert!(r.error.is_none() || r.error.unwrap().name == "KernelDied");
    assert_eq!(
        c.run_code(&cell(&s, "1 + 1"))
            .await
            .unwrap()
            .text
            .as_deref(),
        Some("2")
    );
    // The bystander never noticed.
    let r = c.run_code(&cell(&bystander, "state")).await.unwrap();
    assert_eq!(r.text.as_deref(), Some("7"));
    drop(c);
    d.finish().await;
}

/// Sessions end with the daemon: a waiting cell gets an error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_sessions_and_answers_waiting_cells() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    let waiting = {
        let c = c.clone();
        let s = s.clone();
        tokio::spawn(async move { c.run_code(&cell(&s, "import time; time.sleep(60)")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = tokio::spawn(d.shutdown());
    let r = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting cell was answered")
        .unwrap();
    let e = server_error(r.unwrap_err());
    assert_eq!(e.code, ErrorCode::SessionEnded, "{e:?}");
    assert!(e.message.contains("shut down"), "{}", e.message);
    drop(c);
    stopped.await.unwrap().assert_no_leaks().await;
}

/// Many sessions created and killed leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_kill_cycles_leave_nothing_behind() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = 4).await;
    let c = d.client().await;
    let cycles = std::env::var("FORKD_SESSION_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for i in 0..cycles {
        let s = create(&c).await;
        if i % 10 == 0 {
            c.run_code(&cell(&s, "1")).await.unwrap();
            c.session_pause(&s).await.unwrap();
        }
        let info = c.session_kill(&s).await.unwrap();
        assert_eq!(info.state, SessionState::Ended);
    }
    assert!(c.session_list(BTreeMap::new()).await.unwrap().is_empty());
    drop(c);
    d.finish().await;
}

/// `forkd-run repl` with cells on stdin behaves like `python -i`: each
/// trailing expression's value is printed, a block ends at a blank line or
/// the next unindented line, an error goes to stderr and the next cell runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forkd_run_repl_reads_cells_from_stdin() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let socket = d.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .arg("repl")
            .arg("--socket")
            .arg(&socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"x = 20\ndef f(n):\n    return n * 2\n\nf(x) + 2\nfor i in range(2):\n    print(i)\n1 / 0\nd = {'a': (1,\n  2)}\nd['a']\n")
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, "42\n0\n1\n(1, 2)\n", "stderr: {stderr}");
    assert!(stderr.contains("ZeroDivisionError"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "a cell raised");
    // The repl's own session is gone.
    let c = d.client().await;
    assert!(c.session_list(BTreeMap::new()).await.unwrap().is_empty());
    drop(c);
    d.finish().await;
}

/// Pause freezes every process of the session (cgroup v1 freezer or v2
/// cgroup.freeze: the v2 guest runs this too); resume carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_cpu_and_resume_continues() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let kept = c.session_create(&SessionCreate::default()).await.unwrap();
    // pause: no CPU while paused; resume carries on.
    c.run_code(&cell(&kept.session, "import threading, time\ncount = [0]\ndef spin():\n    while True:\n        count[0] += 1\n        time.sleep(0.001)\nthreading.Thread(target=spin, daemon=True).start()"))
        .await
        .unwrap();
    let paused = c.session_pause(&kept.session).await.unwrap();
    assert_eq!(paused.state, SessionState::Paused);
    let cpu0 = c.session_info(&kept.session).await.unwrap().usage;
    let e = server_error(c.run_code(&cell(&kept.session, "1")).await.unwrap_err());
    assert_eq!(e.code, ErrorCode::SessionPaused);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu1 = c.session_info(&kept.session).await.unwrap().usage;
    assert_eq!(
        cpu0.cpu_user_us + cpu0.cpu_system_us,
        cpu1.cpu_user_us + cpu1.cpu_system_us,
        "a paused session used CPU"
    );
    c.session_resume(&kept.session).await.unwrap();
    let r = c
        .run_code(&cell(
            &kept.session,
            "n = count[0]; time.sleep(0.2); count[0] > n",
        ))
        .await
        .unwrap();
    assert_eq!(r.text.as_deref(), Some("True"), "{r:?}");

    c.session_kill(&kept.session).await.unwrap();
    drop(c);
    d.finish().await;
}

/// The blocking client's session calls: events reach the callback before
/// the final result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blocking_client_streams_and_moves_files() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let socket = d.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = forkd_ipc::Client::connect(&socket).unwrap();
        let s = c.session_create(&SessionCreate::default()).unwrap().session;
        let mut events = Vec::new();
        let r = c
            .run_code(&cell(&s, "print('a')\nx = 6\nx * 7"), |e| events.push(e))
            .unwrap();
        assert_eq!(r.text.as_deref(), Some("42"));
        assert_eq!(
            events,
            vec![Event::Output {
                stream: Stream::Stdout,
                data: b"a\n".to_vec()
            }]
        );
        let mut started = false;
        let r = c
            .command(
                &Command {
                    session: s.clone(),
                    cmd: "exit 5".into(),
                    timeout_ms: Some(20_000),
                    ..Command::default()
                },
                |e| started |= matches!(e, Event::CommandStarted { .. }),
            )
            .unwrap();
        assert!(started);
        assert_eq!(r.exit_code, Some(5));
        c.write_file(&s, "f.txt", b"blocking", None).unwrap();
        assert_eq!(c.read_file(&s, "f.txt").unwrap(), b"blocking");
        c.session_kill(&s).unwrap();
    })
    .await
    .unwrap();
    d.finish().await;
}

/// `stdin: true` gives a command a pipe fed by `command_input`: input
/// arrives in order across chunks (one larger than a pipe's 64 KiB buffer,
/// queued by the executor while the command is not reading, without
/// stalling the session), EOF ends it; input to a command without stdin,
/// after EOF, after its end or to an unknown pid is refused clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_stdin_takes_input_in_chunks_until_eof() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    let cmd = |line: &str, stdin: bool| Command {
        session: s.clone(),
        cmd: line.into(),
        timeout_ms: Some(60_000),
        stdin,
        ..Command::default()
    };
    async fn started(stream: &mut forkd_ipc::RequestStream) -> u32 {
        match stream.next_event().await.unwrap() {
            Some(Event::CommandStarted { pid }) => pid,
            other => panic!("{other:?}"),
        }
    }

    // `cat` reads only once another command has made `go`: 200 KiB wait in
    // the executor's queue meanwhile, and the session must still run that
    // command (an executor blocked on the full pipe never would).
    let mut stream = c
        .command_stream(&cmd(
            "while [ ! -e go ]; do sleep 0.05; done; cat; echo end >&2",
            true,
        ))
        .await
        .unwrap();
    let pid = started(&mut stream).await;
    let big: Vec<u8> = (0..200 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    c.command_input(&s, pid, b"one ", false).await.unwrap();
    c.command_input(&s, pid, &big, false).await.unwrap();
    c.command_input(&s, pid, b" two\n", false).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        c.command(&cmd("echo alive; touch go", false)),
    )
    .await
    .expect("the session ran nothing while a command's input waited")
    .unwrap();
    assert_eq!(r.stdout, b"alive\n");
    c.command_input(&s, pid, b"three", true).await.unwrap();
    let e = c.command_input(&s, pid, b"more", false).await.unwrap_err();
    assert!(format!("{e}").contains("closed already"), "{e}");
    let r = stream.command().await.unwrap();
    assert_eq!(
        r.exit_code,
        Some(0),
        "{:?}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.stderr, b"end\n");
    let mut want = b"one ".to_vec();
    want.extend_from_slice(&big);
    want.extend_from_slice(b" two\nthree");
    assert_eq!(r.stdout.len(), want.len());
    assert!(r.stdout == want, "stdout differs from the input");

    // The command ended: its pid takes no more input.
    let e = c.command_input(&s, pid, b"late", false).await.unwrap_err();
    match &e {
        forkd_ipc::ClientError::Server(r) => {
            assert_eq!(r.code, ErrorCode::NotFound, "{e}");
            assert!(r.message.contains(&format!("pid {pid}")), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let e = c.command_input(&s, 999_999, b"x", true).await.unwrap_err();
    assert!(
        matches!(&e, forkd_ipc::ClientError::Server(r) if r.code == ErrorCode::NotFound),
        "{e}"
    );
    // Without stdin: the command reads /dev/null, and input is refused.
    let mut stream = c
        .command_stream(&cmd("cat; sleep 30", false))
        .await
        .unwrap();
    let pid = started(&mut stream).await;
    let e = c.command_input(&s, pid, b"x", false).await.unwrap_err();
    match &e {
        forkd_ipc::ClientError::Server(r) => {
            assert_eq!(r.code, ErrorCode::InvalidRequest, "{e}");
            assert!(r.message.contains("stdin: true"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    c.command_kill(&s, pid).await.unwrap();
    assert_eq!(stream.command().await.unwrap().signal, Some(9));
    // A command that exits without reading: queued input is dropped, the
    // pipe closes with it, and the session goes on.
    let mut stream = c.command_stream(&cmd("exit 4", true)).await.unwrap();
    let pid = started(&mut stream).await;
    let _ = c.command_input(&s, pid, &big, false).await;
    assert_eq!(stream.command().await.unwrap().exit_code, Some(4));

    // The blocking client, from a second connection.
    let mut stream = c.command_stream(&cmd("wc -c", true)).await.unwrap();
    let pid = started(&mut stream).await;
    let socket = d.socket.clone();
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let mut b = forkd_ipc::Client::connect(&socket).unwrap();
        b.command_input(&s2, pid, &[7u8; 70_000], true).unwrap();
    })
    .await
    .unwrap();
    let r = stream.command().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "70000");
    drop(c);
    d.finish().await;
}

/// One connection may have only `max_requests_per_connection` session
/// requests in flight: the next is answered `busy` at once (not queued, so an
/// interrupt or cancel still gets through), and the bound frees as replies go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_has_a_bounded_number_of_requests_in_flight() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.sessions.max_requests_per_connection = 2).await;
    let c = d.client().await;
    let (a, b) = (create(&c).await, create(&c).await);
    let slow = |s: &str| cell(s, "import time; time.sleep(1.5); 'slept'");
    let (ra, rb) = (slow(&a), slow(&b));
    let first = c.run_code(&ra);
    let second = c.run_code(&rb);
    let third = async {
        // Sent while both cells hold the connection's two slots.
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.session_info(&a).await
    };
    let (first, second, third) = tokio::join!(first, second, third);
    assert_eq!(first.unwrap().text.as_deref(), Some("'slept'"));
    assert_eq!(second.unwrap().text.as_deref(), Some("'slept'"));
    let busy = server_error(third.unwrap_err());
    assert_eq!(busy.code, ErrorCode::Busy, "{busy:?}");
    assert!(
        busy.message.contains("max_requests_per_connection"),
        "{busy:?}"
    );
    // The slots are free again.
    assert_eq!(c.session_info(&a).await.unwrap().session, a);
    drop(c);
    d.finish().await;
}

/// A matplotlib figure left open by a cell, or returned as its value, comes
/// back as a PNG result without the user calling savefig (Jupyter's
/// behaviour). Needs matplotlib in the test interpreter (scripts/venv.sh
/// installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matplotlib_figures_come_back_as_png() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let has_mpl = std::process::Command::new(python())
        .args(["-c", "import matplotlib"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_mpl {
        eprintln!(
            "skipped: matplotlib is not installed in {} (scripts/venv.sh installs it)",
            python().display()
        );
        return;
    }
    const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
    let png = |d: &forkd_ipc::DisplayData| -> Option<Vec<u8>> {
        use base64::Engine as _;
        let b64 = d.data.get("image/png")?;
        base64::engine::general_purpose::STANDARD.decode(b64).ok()
    };
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    let left_open = c
        .run_code(&cell(
            &s,
            "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('left open')\nNone",
        ))
        .await
        .unwrap();
    assert!(left_open.error.is_none(), "{left_open:?}");
    let pngs: Vec<Vec<u8>> = left_open.results.iter().filter_map(png).collect();
    assert_eq!(pngs.len(), 1, "{:?}", left_open.results);
    assert!(pngs[0].starts_with(PNG_MAGIC));
    // Shown figures are closed: the next cell does not repeat them.
    let next = c
        .run_code(&cell(&s, "len(plt.get_fignums())"))
        .await
        .unwrap();
    assert_eq!(next.text.as_deref(), Some("0"));
    assert!(next.results.iter().all(|d| png(d).is_none()));
    // A figure as the cell's value is its main result.
    let value = c
        .run_code(&cell(
            &s,
            "fig, ax = plt.subplots()\nax.bar([1, 2], [3, 4])\nfig",
        ))
        .await
        .unwrap();
    let main: Vec<_> = value.results.iter().filter(|d| d.main).collect();
    assert_eq!(main.len(), 1, "{:?}", value.results);
    assert!(png(main[0]).is_some_and(|p| p.starts_with(PNG_MAGIC)));
    // ...and is not shown a second time as a figure left open.
    assert_eq!(value.results.len(), 1, "{:?}", value.results);
    drop(c);
    d.finish().await;
}
