//! Running programs: output, result fields, request features, exit statuses,
//! concurrency.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const NUMPY_ZEROS: &str = "import numpy; print(numpy.zeros(5).tolist())";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numpy_snippet_runs_with_consistent_result_fields() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let r = d.run(NUMPY_ZEROS).await;
    println!("{r:#?}");
    assert_eq!(
        r.stdout_lossy(),
        "[0.0, 0.0, 0.0, 0.0, 0.0]\n",
        "stderr: {}",
        r.stderr_lossy()
    );
    assert_eq!(r.stderr, b"");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.signal, None);
    assert_eq!(r.killed_by, None);
    assert!(!r.stdout_truncated && !r.stderr_truncated);
    assert_eq!(r.zygote, "default");
    assert!(
        r.limits.cgroup_enforced,
        "limits not enforced: {:?}",
        r.limits
    );
    assert_eq!(r.limits.timeout_ms, 20_000);
    assert_eq!(
        r.limits.memory_bytes,
        512 * MIB,
        "daemon default memory limit"
    );
    assert!(r.usage.peak_memory_bytes > 0, "{:?}", r.usage);
    // A forked numpy child is small; the cgroup charges only its own pages.
    assert!(r.usage.peak_memory_bytes < 256 * MIB, "{:?}", r.usage);
    let t = &r.timings;
    assert!(t.fork_us > 0, "{t:?}");
    assert!(t.fork_us <= t.isolated_us, "{t:?}");
    assert!(t.isolated_us <= t.total_us, "{t:?}");
    assert!(t.isolated_us + t.run_us <= t.total_us, "{t:?}");
    assert!(t.total_us < 10_000_000, "{t:?}");
    // Sandbox ids are unique per daemon.
    let r2 = d.run("print(2)").await;
    assert_ne!(r.sandbox, r2.sandbox);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_argv_and_env() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;

    // stdin: arbitrary bytes, echoed back reversed.
    let mut r = req("import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d[::-1])");
    r.stdin = b"\x00\xff\xfe not utf-8 \xc3\x28\n".to_vec();
    let res = d.spawn(&r).await.unwrap();
    let mut want = r.stdin.clone();
    want.reverse();
    assert_eq!(res.stdout, want, "stderr: {}", res.stderr_lossy());

    // stdin larger than a pipe buffer (no deadlock between the daemon
    // writing stdin and reading stdout).
    let mut r = req(
        "import sys, hashlib\nd = sys.stdin.buffer.read()\nprint(len(d), hashlib.sha256(d).hexdigest())\nsys.stdout.write('y' * 300000)",
    );
    r.stdin = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let res = d.spawn(&r).await.unwrap();
    let out = res.stdout_lossy();
    let first = out.lines().next().unwrap_or("");
    assert!(
        first.starts_with("3000000 "),
        "{first:?} stderr: {}",
        res.stderr_lossy()
    );
    let sha = python_sha256(&d, &r.stdin).await;
    assert_eq!(first, format!("3000000 {sha}"));
    assert_eq!(out.len(), first.len() + 1 + 300_000);

    // argv
    let mut r = req("import sys, json; print(json.dumps(sys.argv))");
    r.argv = vec![
        "a".into(),
        "b c".into(),
        "--flag".into(),
        "ünï".into(),
        String::new(),
    ];
    let res = d.spawn(&r).await.unwrap();
    let argv: Vec<String> = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(argv, ["-c", "a", "b c", "--flag", "ünï", ""]);

    // env: the request's variables, laid over the daemon's small base; no
    // variable of the daemon's own process (or of the zygote's) leaks in.
    let mut r = req("import os, json; print(json.dumps(dict(os.environ)))");
    r.env.insert("FOO".into(), "bar baz".into());
    r.env.insert("HOME".into(), "/tmp/home".into());
    let res = d.spawn(&r).await.unwrap();
    let env: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&res.stdout).unwrap();
    println!("sandbox env: {env:?}");
    assert_eq!(env.get("FOO").map(String::as_str), Some("bar baz"));
    assert_eq!(env.get("HOME").map(String::as_str), Some("/tmp/home"));
    // The zygote's venv `bin` first, as activating the venv would.
    let bin = python().parent().unwrap().display().to_string();
    assert_eq!(
        env.get("PATH").map(String::as_str),
        Some(format!("{bin}:/usr/local/bin:/usr/bin:/bin").as_str())
    );
    assert!(
        !env.contains_key(MARKER_VAR),
        "the zygote's environment leaked: {env:?}"
    );
    let base: BTreeSet<&str> = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "FOO",
    ]
    .into();
    let extra: Vec<&String> = env.keys().filter(|k| !base.contains(k.as_str())).collect();
    assert!(
        extra.is_empty(),
        "unexpected variables in the sandbox: {extra:?}"
    );
    // Variables of the test (= daemon) process, e.g. CARGO_* and RUST_*,
    // must not appear.
    let ours: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| !base.contains(k.as_str()))
        .collect();
    assert!(!ours.is_empty());
    for k in &ours {
        assert!(!env.contains_key(k), "daemon variable {k} leaked");
    }
    d.finish().await;
}

/// sha256 of `data`, computed by a sandbox (keeps the test free of a hash crate).
async fn python_sha256(d: &TestDaemon, data: &[u8]) -> String {
    let mut r = req(
        "import sys, hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest(), end='')",
    );
    r.stdin = data.to_vec();
    d.spawn(&r).await.unwrap().stdout_lossy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_files_modules_and_scripts() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let blob: Vec<u8> = (0..=255u8).collect();
    let files = vec![
        InlineFile {
            path: "mymod.py".into(),
            content: b"VALUE = 42\n".to_vec(),
            mode: None,
        },
        InlineFile {
            path: "pkg/__init__.py".into(),
            content: Vec::new(),
            mode: None,
        },
        InlineFile {
            path: "pkg/sub/deep.py".into(),
            content: b"def f():\n    return 'deep'\n".to_vec(),
            mode: Some(0o600),
        },
        InlineFile {
            path: "data/blob.bin".into(),
            content: blob.clone(),
            mode: Some(0o640),
        },
        InlineFile {
            path: "bin/tool.sh".into(),
            content: b"#!/bin/sh\necho tool\n".to_vec(),
            mode: Some(0o755),
        },
    ];
    let code = r#"
import os, json, mymod
from pkg.sub import deep
out = {
    "cwd": os.getcwd(),
    "value": mymod.VALUE,
    "deep": deep.f(),
    "blob": list(open("data/blob.bin", "rb").read()),
    "modes": {p: oct(os.stat(p).st_mode & 0o777) for p in ["mymod.py", "pkg/sub/deep.py", "data/blob.bin", "bin/tool.sh"]},
}
print(json.dumps(out))
"#;
    let mut r = req(code);
    r.files = files.clone();
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(res.exit_code, Some(0), "stderr: {}", res.stderr_lossy());
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(v["cwd"], "/home/user");
    assert_eq!(v["value"], 42);
    assert_eq!(v["deep"], "deep");
    let got: Vec<u8> = serde_json::from_value(v["blob"].clone()).unwrap();
    assert_eq!(got, blob);
    assert_eq!(v["modes"]["mymod.py"], "0o644", "default mode");
    assert_eq!(v["modes"]["pkg/sub/deep.py"], "0o600");
    assert_eq!(v["modes"]["data/blob.bin"], "0o640");
    assert_eq!(v["modes"]["bin/tool.sh"], "0o755");

    // A script given by a relative path to an inline file: argv[0] is the
    // path and the script's directory is on sys.path.
    let mut r = SpawnRequest {
        program: Program::Script("scripts/main.py".into()),
        timeout_ms: Some(20_000),
        argv: vec!["x".into()],
        ..SpawnRequest::default()
    };
    r.files = vec![
        InlineFile {
            path: "scripts/main.py".into(),
            content: b"import os, sys, helper\nprint(sys.argv, helper.NAME, __name__, __file__ == os.getcwd() + '/scripts/main.py')\n"
                .to_vec(),
            mode: None,
        },
        InlineFile {
            path: "scripts/helper.py".into(),
            content: b"NAME = 'helper'\n".to_vec(),
            mode: None,
        },
    ];
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(
        res.stdout_lossy(),
        "['scripts/main.py', 'x'] helper __main__ True\n",
        "stderr: {}",
        res.stderr_lossy()
    );

    // A script path that does not exist is the program's failure (exit 2
    // and python's message), not a setup error.
    let r = SpawnRequest {
        program: Program::Script("missing.py".into()),
        timeout_ms: Some(20_000),
        ..SpawnRequest::default()
    };
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(res.exit_code, Some(2));
    assert!(
        res.stderr_lossy()
            .ends_with("/missing.py': [Errno 2] No such file or directory\n"),
        "{}",
        res.stderr_lossy()
    );

    // Paths outside the scratch directory are refused before anything runs.
    for bad in ["../x", "/etc/passwd", "a/../../b"] {
        let mut r = req("print(1)");
        r.files = vec![InlineFile {
            path: bad.into(),
            content: b"x".to_vec(),
            mode: None,
        }];
        let e = server_error(d.spawn(&r).await.unwrap_err());
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}: {e:?}");
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_exceptions_and_signals() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;

    let r = d.run("import sys; sys.exit(7)").await;
    assert_eq!((r.exit_code, r.signal, r.killed_by), (Some(7), None, None));

    let r = d
        .run("import os; print('bye', flush=True); os._exit(3)")
        .await;
    assert_eq!((r.exit_code, r.signal, r.killed_by), (Some(3), None, None));
    assert_eq!(r.stdout, b"bye\n");

    let r = d.run("import sys; sys.exit('fatal message')").await;
    assert_eq!(r.exit_code, Some(1));
    assert_eq!(r.stderr_lossy(), "fatal message\n");

    let r = d.run("print('before')\n1/0").await;
    assert_eq!((r.exit_code, r.signal, r.killed_by), (Some(1), None, None));
    assert_eq!(r.stdout, b"before\n");
    let err = r.stderr_lossy();
    assert!(err.contains("Traceback (most recent call last)"), "{err}");
    assert!(err.contains("ZeroDivisionError"), "{err}");

    // A real crash: SIGSEGV from a NULL read is forced, so it ends the
    // program even though the program is its pid namespace's init.
    let r = d.run("import ctypes; ctypes.string_at(0)").await;
    assert_eq!(
        (r.exit_code, r.signal, r.killed_by),
        (None, Some(11), Some(KilledBy::Signal))
    );
    assert_eq!(r.shell_status(), 139);

    // os.abort(): killed by a signal, nothing else claims it. (Which signal:
    // see `abort_is_reported_as_sigabrt`.)
    let r = d.run("import os; os.abort()").await;
    assert_eq!(r.exit_code, None);
    assert!(r.signal.is_some());
    assert_eq!(r.killed_by, Some(KilledBy::Signal));

    // An atexit handler runs and its output is kept.
    let r = d
        .run("import atexit; atexit.register(lambda: print('atexit ran'))")
        .await;
    assert_eq!(r.stdout, b"atexit ran\n");
    assert_eq!(r.exit_code, Some(0));
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_sent_signals_are_reported() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    // The program is pid 1 of its namespace, where the kernel drops signals
    // it sends itself while their action is the default; forkd's reporter
    // turns them into the death the program meant (abort() would otherwise
    // end as SIGSEGV, SIGTERM would be ignored).
    let d = TestDaemon::start(|_| {}).await;
    let r = d.run("import os; os.abort()").await;
    assert_eq!(
        (r.exit_code, r.signal, r.killed_by),
        (None, Some(6), Some(KilledBy::Signal))
    );
    let r = d
        .run("import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(2); print('survived')")
        .await;
    assert_eq!(
        (r.exit_code, r.signal, r.killed_by),
        (None, Some(15), Some(KilledBy::Signal)),
        "stdout: {}",
        r.stdout_lossy()
    );
    assert!(r.stdout.is_empty(), "the program went on after SIGTERM");
    // A program exiting with 128+N on its own is not mistaken for a signal.
    let r = d.run("import sys; sys.exit(134)").await;
    assert_eq!(
        (r.exit_code, r.signal, r.killed_by),
        (Some(134), None, None)
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_pipelined_spawns_with_distinct_randomness() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let client = d.client().await;
    let code = "import numpy, random\nprint(numpy.zeros(5).tolist())\nprint(repr(random.random()))\nprint(repr(numpy.random.rand()))";
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let c = client.clone();
        let r = req(code);
        set.spawn(async move { c.spawn(&r).await });
    }
    let mut results = Vec::new();
    while let Some(joined) = set.join_next().await {
        results.push(joined.expect("task").expect("spawn"));
    }
    println!("100 spawns over one connection in {:?}", started.elapsed());
    let mut py = BTreeSet::new();
    let mut np = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for r in &results {
        let out = r.stdout_lossy();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(r.exit_code, Some(0), "stderr: {}", r.stderr_lossy());
        assert_eq!(lines.len(), 3, "{out:?}");
        assert_eq!(lines[0], "[0.0, 0.0, 0.0, 0.0, 0.0]");
        py.insert(lines[1].to_string());
        np.insert(lines[2].to_string());
        ids.insert(r.sandbox);
    }
    assert_eq!(ids.len(), 100, "sandbox ids must be unique");
    assert_eq!(
        py.len(),
        100,
        "random.random() repeated across children: {py:?}"
    );
    assert_eq!(
        np.len(),
        100,
        "numpy.random.rand() repeated across children: {np:?}"
    );
    drop(client);
    // Every used sandbox was cleaned up already (not only at shutdown); only
    // the warm pool's parked children keep cgroups.
    let used: BTreeSet<String> = ids.iter().map(|id| format!("sb{id}")).collect();
    assert!(
        wait_until(Duration::from_secs(5), || {
            instance_cgroup_dirs(&d.instance).iter().all(|dir| {
                std::fs::read_dir(dir)
                    .map(|e| {
                        e.flatten()
                            .all(|e| !used.contains(&*e.file_name().to_string_lossy()))
                    })
                    .unwrap_or(true)
            })
        })
        .await,
        "sandbox cgroups left after their requests completed"
    );
    assert_eq!(d.daemon.running(), 0);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_failures_and_the_concurrency_limit() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.max_concurrent = 2).await;

    // An inline file that cannot be written (its parent is a file): the
    // program never runs and the error says why.
    let mut r = req("print('ran')");
    r.files = vec![
        InlineFile {
            path: "a".into(),
            content: b"file".to_vec(),
            mode: None,
        },
        InlineFile {
            path: "a/b".into(),
            content: b"x".to_vec(),
            mode: None,
        },
    ];
    let e = server_error(d.spawn(&r).await.unwrap_err());
    assert_eq!(e.code, ErrorCode::SpawnFailed, "{e:?}");
    assert!(e.message.contains("inline file"), "{}", e.message);

    // max_concurrent = 2: six 300 ms sandboxes take three rounds, and never
    // more than two run at once.
    let client = d.client().await;
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..6 {
        let c = client.clone();
        set.spawn(async move {
            c.spawn(&req(&format!("import time; time.sleep(0.3); print({i})")))
                .await
        });
    }
    let mut peak = 0;
    while !set.is_empty() {
        peak = peak.max(d.daemon.running());
        if let Some(done) = tokio::time::timeout(Duration::from_millis(5), set.join_next())
            .await
            .ok()
            .flatten()
        {
            let r = done.unwrap().expect("spawn");
            assert_eq!(r.exit_code, Some(0), "{}", r.stderr_lossy());
        }
    }
    let took = started.elapsed();
    println!("6 x 300 ms with max_concurrent 2: {took:?}, peak {peak}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert_eq!(peak, 2);
    drop(client);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interpreter_paths_under_tmp_stay_importable() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    // A sys.path entry under /tmp (a venv or checkout there, as in CI) lies
    // beneath the per-child scratch tmpfs; the child must still import from it
    // lazily, read-only.
    let dir = tempfile::Builder::new()
        .prefix("forkd-it-path")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::write(dir.path().join("forkd_tmp_mod.py"), "X = 42\n").unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let d = TestDaemon::start(|c| {
        c.zygotes[0].env.insert("PYTHONPATH".into(), path.clone());
    })
    .await;
    let code = format!(
        "import sys, forkd_tmp_mod\nprint(forkd_tmp_mod.X)\ntry:\n    open({path:?} + '/w', 'w')\nexcept OSError as e:\n    print(e.errno)\nopen('/tmp/scratch.txt', 'w').write('ok')\nprint(open('/tmp/scratch.txt').read())"
    );
    let r = d.run(&code).await;
    assert_eq!(
        r.stdout_lossy(),
        "42\n30\nok\n",
        "stderr: {}",
        r.stderr_lossy()
    );
    assert!(!dir.path().join("w").exists());
    d.finish().await;
}
