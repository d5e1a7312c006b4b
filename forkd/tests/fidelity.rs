//! Code inside a sandbox behaves as `python script.py`: each case runs the
//! same program in a real sandbox and with plain `python` outside (same
//! interpreter, same environment), and compares stdout, stderr and how the
//! process ended. Where isolation forbids equality (start-up-only variables)
//! the exact refusal is checked.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use forkd_ipc::{ErrorCode, InlineFile, Program, SpawnRequest, SpawnResult};

/// How a run ended and what it printed, with each side's working directory
/// replaced by `<CWD>` (the only intended difference).
#[derive(Debug, Clone, PartialEq)]
struct Run {
    stdout: String,
    stderr: String,
    status: String,
}

/// The interpreter's prefix first (a checkout may live under /tmp, the
/// sandbox's working directory, and its venv path must not read as
/// `<CWD>/...`), then the working directory.
fn normalize(s: &[u8], cwd: &str) -> String {
    let venv = python()
        .parent()
        .and_then(|bin| bin.parent())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    String::from_utf8_lossy(s)
        .replace(&venv, "<VENV>")
        .replace(cwd, "<CWD>")
}

/// `python ARGS` in `dir` with exactly `env` (as a request's env replaces the zygote's).
fn outside(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut command = Command::new(python());
    // Plain python as started from a terminal: default signal dispositions
    // even when this test runs under nohup or with signals ignored.
    // SAFETY: between fork and exec only async-signal-safe calls (signal(2)).
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            Ok(())
        });
    }
    let mut child = command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    let status = match (out.status.code(), out.status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => unreachable!(),
    };
    let cwd = dir.to_str().unwrap();
    Run {
        stdout: normalize(&out.stdout, cwd),
        stderr: normalize(&out.stderr, cwd),
        status,
    }
}

fn from_result(r: &SpawnResult, cwd: &str) -> Run {
    let status = match (r.exit_code, r.signal) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("neither ({:?})", r.killed_by),
    };
    Run {
        stdout: normalize(&r.stdout, cwd),
        stderr: normalize(&r.stderr, cwd),
        status,
    }
}

fn request(program: Program, argv: &[&str], env: &[(&str, &str)]) -> SpawnRequest {
    SpawnRequest {
        program,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        timeout_ms: Some(20_000),
        ..SpawnRequest::default()
    }
}

/// The sandbox's working directory (the default scratch).
async fn sandbox_cwd(d: &TestDaemon) -> String {
    let r = d.run("import os; print(os.getcwd())").await;
    assert_eq!(r.exit_code, Some(0), "{}", r.stderr_lossy());
    r.stdout_lossy().trim().to_string()
}

/// Runs `code` as `python -c CODE ARGV` inside and outside and records the comparison.
async fn compare_code(
    t: &mut Table,
    d: &TestDaemon,
    cwd: &str,
    name: &str,
    code: &str,
    argv: &[&str],
    env: &[(&str, &str)],
) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let mut args = vec!["-c", code];
    args.extend_from_slice(argv);
    let want = outside(&dir, &args, env, b"");
    let r = d
        .spawn(&request(Program::Code(code.into()), argv, env))
        .await
        .unwrap();
    let got = from_result(&r, cwd);
    t.verdict(name, &format!("{got:?}"), &format!("{want:?}"), got == want);
}

// ---------------------------------------------------------------------------
// 1. Signals
// ---------------------------------------------------------------------------

const SIGNAL_PROBE: &str = "import signal\nfor s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):\n    print(s.name, signal.getsignal(s))\nprint('blocked', sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n";

/// A `forkd` started by a wrapper that ignores SIGINT, SIGHUP, SIGQUIT and
/// SIGUSR1 before exec (as `nohup` or a `cmd &` shell do): its sandboxes still
/// see python's defaults, and an unhandled KeyboardInterrupt ends them by SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_pythons_defaults_even_under_a_daemon_that_ignores_them() {
    if skip_unless_root("starts forkd, which creates namespaces and cgroups") {
        return;
    }
    let _session = external_session();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("forkd.sock");
    let parent = format!("forkd-it-fidelity-{}", std::process::id());
    let config = dir.path().join("forkd.toml");
    std::fs::write(
        &config,
        format!(
            "[cgroup]\nparent = \"{parent}\"\n\n[[zygote]]\nname = \"default\"\npython = \"{}\"\npreload = [\"json\"]\nwarm_pool = 1\n",
            python().display()
        ),
    )
    .unwrap();
    // `trap '' SIG` sets SIG_IGN, which exec keeps: the daemon and its
    // zygotes start with these ignored.
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg("trap '' INT HUP QUIT USR1; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_forkd"))
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "forkd exited early");
        assert!(Instant::now() < deadline, "forkd did not open its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The premise: the daemon runs with these ignored (it installs its own
    // SIGINT handler once its zygotes run, which inherited SIGINT ignored
    // too), and the zygote, started by it, resets them itself.
    let ignored = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    for sig in [libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1] {
        assert!(
            ignored & (1u64 << (sig - 1)) != 0,
            "signal {sig}: daemon SigIgn {ignored:x}"
        );
    }

    let mut t = Table::new();
    let client = forkd_ipc::AsyncClient::connect(&socket).await.unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 3] = [
        ("dispositions", SIGNAL_PROBE),
        (
            "SIGINT raises KeyboardInterrupt, which ends by SIGINT",
            "import signal\nprint('before', flush=True)\nsignal.raise_signal(signal.SIGINT)\nprint('survived')\n",
        ),
        (
            "SIGTERM ends by SIGTERM",
            "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nimport time; time.sleep(5)\nprint('survived')\n",
        ),
    ];
    for (name, code) in cases {
        let want = outside(out_dir.path(), &["-c", code], &[], b"");
        let r = client.spawn(&req(code)).await.unwrap();
        let got = from_result(&r, "<none>");
        t.verdict(name, &format!("{got:?}"), &format!("{want:?}"), got == want);
    }

    // forkd-run mirrors it as a shell does: 128 + SIGINT.
    let run = Command::new(env!("CARGO_BIN_EXE_forkd-run"))
        .arg("--socket")
        .arg(&socket)
        .args(["-c", "raise KeyboardInterrupt"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    t.check(
        "forkd-run exit status after KeyboardInterrupt",
        &run.status.code().unwrap().to_string(),
        &["130"],
    );
    t.check(
        "its stderr",
        &String::from_utf8_lossy(&run.stderr),
        &["Traceback (most recent call last):\n  File \"<string>\", line 1, in <module>\nKeyboardInterrupt\nforkd-run: sandbox killed by signal\n"],
    );
    drop(client);

    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "forkd exit: {status:?}");
    for mount in cgroup_mounts() {
        let d = mount.join(&parent);
        let _ = std::fs::remove_dir(&d);
        assert!(
            !d.exists(),
            "the test's cgroup parent {} stayed",
            d.display()
        );
    }
    t.assert_all("signals inside (forkd started with SIGINT, SIGHUP, SIGQUIT, SIGUSR1 ignored) vs plain python");
}

// ---------------------------------------------------------------------------
// 2. Uncaught exceptions, hooks, exit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncaught_exceptions_hooks_and_exit_match_python() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();
    let cases: &[(&str, &str)] = &[
        ("plain", "print('hi')"),
        ("nested frames", "def f():\n    1/0\ndef g():\n    f()\ng()\n"),
        ("syntax error", "x = (\n"),
        ("indentation error", "if True:\npass\n"),
        ("chained", "try:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('v') from e\n"),
        (
            "user excepthook",
            "import sys\ndef hook(t, v, tb):\n    print('hook', t.__name__, v, tb.tb_frame.f_code.co_name, tb.tb_next.tb_frame.f_code.co_name)\nsys.excepthook = hook\ndef f(): raise RuntimeError('boom')\nf()\n",
        ),
        (
            "excepthook that raises",
            "import sys\ndef hook(t, v, tb): raise TypeError('in hook')\nsys.excepthook = hook\nraise RuntimeError('boom')\n",
        ),
        (
            "sys.last_* set",
            "import sys, atexit\natexit.register(lambda: print(sys.last_type.__name__, sys.last_value, sys.last_traceback.tb_frame.f_code.co_name))\nraise OSError(5, 'x')\n",
        ),
        (
            "unraisablehook",
            "import sys\nsys.unraisablehook = lambda u: print('unraisable', type(u.exc_value).__name__, u.exc_value)\nclass A:\n    def __del__(self): raise ValueError('in del')\na = A()\ndel a\nprint('after')\n",
        ),
        (
            "non-daemon threads joined before atexit",
            "import atexit, threading, time\natexit.register(lambda: print('atexit'))\ndef w():\n    time.sleep(0.3)\n    print('thread done', flush=True)\nthreading.Thread(target=w).start()\nprint('main done')\n",
        ),
        (
            "threads joined after an uncaught exception",
            "import atexit, threading, time\natexit.register(lambda: print('atexit'))\nthreading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()\nraise SystemExit(4)\n",
        ),
        (
            "__main__'s objects finalized at exit",
            "import sys, atexit\natexit.register(lambda: print('atexit'))\nf = open(sys.stdout.fileno(), 'w', closefd=False)\nf.write('unflushed file\\n')\nclass A:\n    def __del__(self): print('del A', flush=True)\na = A()\nb = [A()]\nb.append(b)\n",
        ),
        (
            "finalized after an uncaught exception",
            "class A:\n    def __del__(self): print('del A')\na = A()\ndef f(): raise ValueError('x')\nf()\n",
        ),
        (
            "a cycle that reached the oldest generation is finalized",
            "import gc\nclass A:\n    def __del__(self): print('del A')\nb = [A()]\nb.append(b)\nkeep = [[] for _ in range(200000)]\nprint(gc.get_stats()[2]['collections'] > 0 or gc.get_stats()[1]['collections'] > 0)\n",
        ),
        ("sys.exit(message)", "import sys\nsys.exit('bye')\n"),
        ("sys.exit(3)", "import sys\nsys.exit(3)\n"),
        ("exit code above 255", "import sys\nsys.exit(257)\n"),
        (
            "KeyboardInterrupt",
            "import atexit\natexit.register(lambda: print('atexit'))\ndef f(): raise KeyboardInterrupt\nf()\n",
        ),
    ];
    for (name, code) in cases {
        compare_code(&mut t, &d, &cwd, name, code, &[], &[]).await;
    }
    d.finish().await;
    t.assert_all("uncaught exceptions and exit: sandbox vs plain python");
}

// ---------------------------------------------------------------------------
// 3. Scripts, -c, -m
// ---------------------------------------------------------------------------

const MAIN_PROBE: &str = "import sys, os\nprint(sys.argv)\nprint({k: type(v).__name__ for k, v in globals().items()})\nprint(globals().get('__file__'), repr(sys.path[0]), os.path.realpath(sys.path[0]) == os.getcwd() if sys.path[0] else None)\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_code_and_modules_run_as_python_runs_them() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();

    compare_code(
        &mut t,
        &d,
        &cwd,
        "-c: argv and __main__",
        MAIN_PROBE,
        &["a", "-b"],
        &[],
    )
    .await;

    // A script in a subdirectory, with a traceback through its path, and one
    // in Latin-1 with a coding cookie.
    let latin1: Vec<u8> = [
        b"# -*- coding: latin-1 -*-\n".as_slice(),
        b"s = '\xe9t\xe9'\nprint(s, len(s), ascii(s))\n",
    ]
    .concat();
    let script = format!("{MAIN_PROBE}def f():\n    raise ValueError('in script')\nf()\n");
    let script = script.into_bytes();
    type Files = Vec<(&'static str, Vec<u8>)>;
    let scripts: [(&str, &str, Files); 4] = [
        (
            "script: argv, __file__, sys.path[0], traceback",
            "sub/prog.py",
            vec![("sub/prog.py", script.clone())],
        ),
        (
            "script: a path through . and ..",
            "./sub/../prog.py",
            vec![("prog.py", script), ("sub/keep", vec![])],
        ),
        (
            "script: Latin-1 source with a coding cookie",
            "latin.py",
            vec![("latin.py", latin1)],
        ),
        ("script: missing", "missing.py", vec![]),
    ];
    for (name, path, files) in scripts {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let mut r = request(Program::Script(path.into()), &["x", "y"], &[]);
        for (file, content) in files {
            std::fs::create_dir_all(dir.join(file).parent().unwrap()).unwrap();
            std::fs::write(dir.join(file), &content).unwrap();
            r.files.push(InlineFile {
                path: file.into(),
                content,
                mode: None,
            });
        }
        let want = outside(&dir, &[path, "x", "y"], &[], b"");
        let got = from_result(&d.spawn(&r).await.unwrap(), &cwd);
        t.verdict(name, &format!("{got:?}"), &format!("{want:?}"), got == want);
    }

    // Modules: a stdlib one with stdin and arguments, a missing one, and one
    // of the working directory that raises (runpy's frames show, as with -m).
    let mymod =
        b"import sys\nprint(sys.argv[1:], __name__, __file__)\nraise ValueError('in module')\n"
            .to_vec();
    let modules: [(&str, &str, &[&str], &[u8]); 3] = [
        (
            "-m json.tool --sort-keys",
            "json.tool",
            &["--sort-keys"],
            b"{\"b\": 1, \"a\": [1, 2]}",
        ),
        ("-m a missing module", "no_such_module_here", &[], b""),
        ("-m a local module that raises", "mymod", &["q"], b""),
    ];
    for (name, module, argv, stdin) in modules {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        std::fs::write(dir.join("mymod.py"), &mymod).unwrap();
        let mut args = vec!["-m", module];
        args.extend_from_slice(argv);
        let want = outside(&dir, &args, &[], stdin);
        let mut r = request(Program::Module(module.into()), argv, &[]);
        r.stdin = stdin.to_vec();
        r.files = vec![InlineFile {
            path: "mymod.py".into(),
            content: mymod.clone(),
            mode: None,
        }];
        let got = from_result(&d.spawn(&r).await.unwrap(), &cwd);
        t.verdict(name, &format!("{got:?}"), &format!("{want:?}"), got == want);
    }

    // forkd-run: `-c CODE a b`, `-m`, and a local script sent as a file.
    let cli = |args: &[&str], dir: &Path, stdin: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        Run {
            stdout: normalize(&out.stdout, &cwd),
            stderr: normalize(&out.stderr, &cwd),
            status: format!("exit {}", out.status.code().unwrap()),
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let got = cli(&["-c", "import sys; print(sys.argv)", "a", "b"], &dir, b"");
    t.check(
        "forkd-run -c CODE a b",
        &got.stdout,
        &["['-c', 'a', 'b']\n"],
    );
    let got = cli(
        &["-m", "json.tool", "--sort-keys"],
        &dir,
        b"{\"b\": 1, \"a\": 2}",
    );
    let want = outside(
        &dir,
        &["-m", "json.tool", "--sort-keys"],
        &[],
        b"{\"b\": 1, \"a\": 2}",
    );
    t.verdict(
        "forkd-run -m json.tool --sort-keys",
        &format!("{got:?}"),
        &format!("{want:?}"),
        got == want,
    );
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(
        dir.join("sub/s.py"),
        b"# coding: latin-1\nimport sys, os\nprint(sys.argv, os.path.relpath(__file__), '\xe9')\n",
    )
    .unwrap();
    let got = cli(&["sub/s.py", "x"], &dir, b"");
    let mut want = outside(&dir, &["sub/s.py", "x"], &[], b"");
    want.stdout = want.stdout.replace(dir.to_str().unwrap(), "<CWD>");
    t.verdict(
        "forkd-run sub/s.py x",
        &format!("{got:?}"),
        &format!("{want:?}"),
        got == want,
    );

    // An empty module name is refused before anything runs.
    let e = server_error(
        d.spawn(&request(Program::Module(String::new()), &[], &[]))
            .await
            .unwrap_err(),
    );
    t.check(
        "empty module name",
        &format!("{:?}: {}", e.code, e.message),
        &["InvalidRequest: module name \"\" must be non-empty without NUL bytes (as for `python -m json.tool`)"],
    );
    d.finish().await;
    t.assert_all("scripts, -c and -m: sandbox vs plain python");
}

// ---------------------------------------------------------------------------
// 4. Environment read at start-up
// ---------------------------------------------------------------------------

const ENV_PROBE: &str = "import os, sys, time\nc = os.getcwd()\nprint([('<cwd>' + p[len(c):]) if (p == c or p.startswith(c + '/')) and not p.startswith(sys.prefix) else p for p in sys.path])\nprint(time.tzname, time.localtime(0).tm_hour)\nprint(type(sys.stdout.buffer).__name__, sys.stdout.write_through, sys.stdout.line_buffering, type(sys.stderr.buffer).__name__, sys.stderr.write_through, sys.stderr.line_buffering)\nprint(sys.dont_write_bytecode, sys.flags.hash_randomization, hash('forkd') if not sys.flags.hash_randomization else None)\nprint('out', end='')\nprint('err', end='', file=sys.stderr)\nos.write(1, b'|raw')\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_environment_is_applied_as_python_would_or_refused() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|c| {
        let mut seeded = c.zygotes[0].clone();
        seeded.name = "seeded".into();
        seeded.preload = vec![];
        seeded.env.insert("PYTHONHASHSEED".into(), "7".into());
        c.zygotes.push(seeded);
    })
    .await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();
    let envs: &[(&str, &[(&str, &str)])] = &[
        ("no start-up variables", &[]),
        (
            "PYTHONPATH with empty, relative and absolute entries",
            &[("PYTHONPATH", ":rel:/abs/dir::rel")],
        ),
        ("TZ", &[("TZ", "Asia/Tokyo")]),
        ("TZ as a POSIX rule", &[("TZ", "XYZ-5")]),
        ("PYTHONUNBUFFERED", &[("PYTHONUNBUFFERED", "1")]),
        (
            "PYTHONDONTWRITEBYTECODE",
            &[("PYTHONDONTWRITEBYTECODE", "1")],
        ),
        ("PYTHONHASHSEED=random", &[("PYTHONHASHSEED", "random")]),
        ("empty PYTHONOPTIMIZE is unset", &[("PYTHONOPTIMIZE", "")]),
    ];
    for (name, env) in envs {
        compare_code(&mut t, &d, &cwd, name, ENV_PROBE, &[], env).await;
    }

    // A zygote started with PYTHONHASHSEED=7 honours a request asking for 7.
    let dir = tempfile::tempdir().unwrap();
    let want = outside(
        dir.path(),
        &["-c", ENV_PROBE],
        &[("PYTHONHASHSEED", "7")],
        b"",
    );
    let mut r = request(
        Program::Code(ENV_PROBE.into()),
        &[],
        &[("PYTHONHASHSEED", "7")],
    );
    r.zygote = Some("seeded".into());
    let got = from_result(&d.spawn(&r).await.unwrap(), &cwd);
    t.verdict(
        "PYTHONHASHSEED=7 on a zygote started with it",
        &format!("{got:?}"),
        &format!("{want:?}"),
        got == want,
    );

    // What a forked interpreter cannot take on is refused, saying where to set it.
    let refusals: [(&str, &str, &str); 3] = [
        ("PYTHONHASHSEED", "5", "(unset)"),
        ("PYTHONOPTIMIZE", "2", "(unset)"),
        ("PYTHONIOENCODING", "latin-1", "(unset)"),
    ];
    for (var, value, zygote_value) in refusals {
        let e = server_error(
            d.spawn(&request(
                Program::Code("print(1)".into()),
                &[],
                &[(var, value)],
            ))
            .await
            .unwrap_err(),
        );
        let want = format!(
            "SpawnFailed: the sandbox could not be set up: {var}={value} cannot take effect in a sandbox: Python reads it only at interpreter start-up, and sandboxes are forked from a running zygote started with {var}={zygote_value}; set it in the zygote's env in the daemon configuration ([[zygote]] env = {{ {var} = \"{value}\" }}) and send the request to that zygote"
        );
        t.check(
            &format!("{var}={value} refused"),
            &format!("{:?}: {}", e.code, e.message),
            &[&want],
        );
        assert_eq!(e.code, ErrorCode::SpawnFailed);
    }
    let mut r = request(
        Program::Code("print(1)".into()),
        &[],
        &[("PYTHONHASHSEED", "8")],
    );
    r.zygote = Some("seeded".into());
    let e = server_error(d.spawn(&r).await.unwrap_err());
    t.check(
        "PYTHONHASHSEED=8 on a zygote started with 7",
        &e.message,
        &["the sandbox could not be set up: PYTHONHASHSEED=8 cannot take effect in a sandbox: Python reads it only at interpreter start-up, and sandboxes are forked from a running zygote started with PYTHONHASHSEED=7; set it in the zygote's env in the daemon configuration ([[zygote]] env = { PYTHONHASHSEED = \"8\" }) and send the request to that zygote"],
    );
    d.finish().await;
    t.assert_all("start-up environment: sandbox vs plain python");
}

const STDIO_PROBE: &str = "import os, stat, sys\nfor s in (sys.stdin, sys.stdout, sys.stderr):\n    try:\n        pos = s.tell()\n    except OSError as e:\n        pos = repr(e)\n    print(s.name, s.mode, s.encoding, s.errors, s.newlines, s.line_buffering, s.write_through, s.seekable(), s.buffer.seekable(), getattr(s.buffer, 'raw', s.buffer).seekable(), s.isatty(), type(s.buffer).__name__, type(getattr(s.buffer, 'raw', s.buffer)).__name__, pos, stat.S_ISFIFO(os.fstat(s.fileno()).st_mode))\nprint([os.isatty(fd) for fd in range(3)])\nsys.stdout.reconfigure(line_buffering=True)\nprint('line-buffered now', sys.stdout.line_buffering)\nos.write(1, b'raw\\n')\nprint('block')\nos.write(1, b'raw again\\n')\nprint(repr(sys.stdin.read()))\nsys.stderr.write('e\\u20ac\\udcff\\n')\n";

/// sys.stdin/stdout/stderr are what python makes on pipes: not seekable,
/// not terminals, the same encoding, errors and buffering, and
/// reconfigure() works (the zygote started on pipes, never /dev/null).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_streams_are_pythons_on_pipes() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();
    let envs: &[(&str, &[(&str, &str)])] = &[
        ("no locale", &[]),
        ("LANG=C.UTF-8", &[("LANG", "C.UTF-8")]),
        ("LC_ALL=C", &[("LC_ALL", "C")]),
        (
            "LC_ALL=POSIX, LANG=C.UTF-8",
            &[("LC_ALL", "POSIX"), ("LANG", "C.UTF-8")],
        ),
        ("PYTHONUNBUFFERED", &[("PYTHONUNBUFFERED", "1")]),
    ];
    let stdin = "h\u{e9}llo\nworld".as_bytes();
    for (name, env) in envs {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let want = outside(&dir, &["-c", STDIO_PROBE], env, stdin);
        let mut r = request(Program::Code(STDIO_PROBE.into()), &[], env);
        r.stdin = stdin.to_vec();
        let got = from_result(&d.spawn(&r).await.unwrap(), &cwd);
        t.verdict(name, &format!("{got:?}"), &format!("{want:?}"), got == want);
    }
    d.finish().await;
    t.assert_all("stdio streams: sandbox vs plain python");
}

/// Runs `argv` with stdin, stdout and stderr on a new pty (as from a
/// terminal) and returns what the terminal showed, with the pty's `\r\n`
/// read as `\n`, and the exit code. The environment is empty but for
/// `PATH` (a caller's `PYTHONUNBUFFERED` would change python's buffering).
fn on_a_terminal(argv: &[&str]) -> (String, i32) {
    const PTY_RUN: &str = "import os, pty, sys\npid, fd = pty.fork()\nif pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\nout = b''\nwhile True:\n    try:\n        d = os.read(fd, 65536)\n    except OSError:\n        break\n    if not d:\n        break\n    out += d\n_, status = os.waitpid(pid, 0)\nsys.stdout.buffer.write(out)\nsys.exit(os.waitstatus_to_exitcode(status))\n";
    let out = Command::new(python())
        .args(["-c", PTY_RUN])
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n"),
        out.status.code().unwrap_or(-1),
    )
}

/// Python on a terminal line-buffers stdout, so a line printed before a
/// crash (`os._exit`) or a kill that cannot be stopped gracefully is shown;
/// on a pipe it is lost. `forkd-run` on a terminal tells the daemon so and
/// the program line-buffers the same way (its streams stay pipes:
/// `isatty()` is false); on a pipe nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_line_buffered_when_forkd_run_is_on_a_terminal() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let socket = d.socket.display().to_string();
    let run = env!("CARGO_BIN_EXE_forkd-run");
    let py = python().display().to_string();
    let mut t = Table::new();
    let crash = "import os, sys\nprint(sys.stdout.line_buffering, sys.stderr.line_buffering, sys.stdout.isatty())\nprint('before the crash')\nsys.stderr.write('stderr line\\n')\nos._exit(3)\n";
    let (outside, code) = on_a_terminal(&[&py, "-c", crash]);
    t.check(
        "python on a terminal",
        &format!("{outside}exit {code}"),
        &["True True True\nbefore the crash\nstderr line\nexit 3"],
    );
    let (inside, code) = on_a_terminal(&[run, "--socket", &socket, "-c", crash]);
    t.check(
        "forkd-run on a terminal (isatty stays False)",
        &format!("{inside}exit {code}"),
        &["True True False\nbefore the crash\nstderr line\nexit 3"],
    );
    // On pipes: python's block buffering, inside as outside.
    let piped = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        format!(
            "{:?} {:?} exit {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code().unwrap_or(-1)
        )
    };
    let want = piped(&[&py, "-c", crash]);
    t.check(
        "python on pipes loses the unflushed stdout",
        &want,
        &["\"\" \"stderr line\\n\" exit 3"],
    );
    let got = piped(&[run, "--socket", &socket, "-c", crash]);
    t.verdict("forkd-run on pipes", &got, &want, got == want);

    // A program that ignores the timeout's SIGTERM is killed: what it
    // printed before its sleep reaches the terminal all the same.
    let stuck = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('started')\ntime.sleep(60)\n";
    let (inside, code) = on_a_terminal(&[run, "--socket", &socket, "--timeout", "1", "-c", stuck]);
    t.check(
        "killed after its timeout, on a terminal",
        &format!("{inside}exit {code}"),
        &["started\nforkd-run: sandbox killed: timed out after 1 s (the timeout); raise --timeout\nexit 137"],
    );
    let got = piped(&[run, "--socket", &socket, "--timeout", "1", "-c", stuck]);
    t.check(
        "the same on pipes",
        &got,
        &["\"\" \"forkd-run: sandbox killed: timed out after 1 s (the timeout); raise --timeout\\n\" exit 137"],
    );
    d.finish().await;
    t.assert_all("line buffering on a terminal: forkd-run vs plain python");
}

const PTY_PROBE: &str = "import os, pty, subprocess, sys, termios, tty\nm, s = os.openpty()\nprint(os.isatty(m), os.isatty(s), os.ttyname(s).startswith('/dev/pts/'), os.stat(os.ttyname(s)).st_uid == os.getuid())\nos.write(s, b'hello\\n')\nprint(os.read(m, 100))\nbefore = termios.tcgetattr(s)\ntty.setraw(s)\nprint(termios.tcgetattr(s) != before)\nos.close(m); os.close(s)\nm, s = pty.openpty()\np = subprocess.Popen([sys.executable, '-c', 'import os, sys; print(os.isatty(0), os.isatty(1), sys.stdout.isatty(), sys.stdout.line_buffering, os.ttyname(1) == os.ttyname(0))'], stdin=s, stdout=s, stderr=s)\nos.close(s)\nout = b''\nwhile True:\n    try:\n        d = os.read(m, 1024)\n    except OSError:\n        break\n    if not d:\n        break\n    out += d\nprint(p.wait(), out)\nsys.stdout.flush()\npty.spawn([sys.executable, '-c', 'import sys; print(\"in pty.spawn\", sys.stdin.isatty())'])\nprint(subprocess.run(['script', '-qec', 'echo via script', '/dev/null'], capture_output=True, stdin=subprocess.DEVNULL).stdout)\n";

/// ptys work inside as outside: os.openpty, termios, a subprocess on a
/// pty, pty.spawn and `script`. The sandbox's /dev/pts is its own: a host
/// pty is not in it, and TIOCSTI (typing into a terminal) is refused even on
/// the sandbox's own controlling terminal. A sandbox running alongside keeps
/// working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptys_work_inside_and_reach_no_host_pty() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();
    compare_code(
        &mut t,
        &d,
        &cwd,
        "ptys",
        PTY_PROBE,
        &[],
        &[("PATH", "/usr/bin:/bin")],
    )
    .await;

    // A host pty, open while the sandbox looks for it.
    let mut host_master = 0;
    let mut host_slave = 0;
    // SAFETY: openpty with valid out-pointers and no name/termios/winsize.
    let r = unsafe {
        libc::openpty(
            &mut host_master,
            &mut host_slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty on the host");
    let host_name = std::fs::read_link(format!("/proc/self/fd/{host_slave}")).unwrap();
    let host_name = host_name.to_str().unwrap().to_string();
    let bystander = {
        let c = d.client().await;
        tokio::spawn(async move {
            c.spawn(&req(
                "import time\nfor i in range(20):\n    time.sleep(0.05)\nprint('bystander ok')",
            ))
            .await
        })
    };
    let escape = format!(
        "import errno, fcntl, os, termios\nprint(sorted(os.listdir('/dev/pts')))\ntry:\n    os.open({host_name:?}, os.O_RDWR)\n    print('host pty opened')\nexcept OSError as e:\n    print('host pty:', errno.errorcode[e.errno])\nm, s = os.openpty()\nprint(sorted(os.listdir('/dev/pts')))\nos.setsid()\nfcntl.ioctl(s, termios.TIOCSCTTY, 0)\ntry:\n    fcntl.ioctl(s, termios.TIOCSTI, b'x')\n    print('TIOCSTI allowed')\nexcept OSError as e:\n    print('TIOCSTI:', errno.errorcode[e.errno])\n"
    );
    let r = d.run(&escape).await;
    t.check(
        "the sandbox's /dev/pts, a host pty, TIOCSTI",
        &format!("{}{}", r.stdout_lossy(), r.stderr_lossy()),
        &["['ptmx']\nhost pty: ENOENT\n['0', 'ptmx']\nTIOCSTI: EPERM\n"],
    );
    let b = bystander.await.unwrap().unwrap();
    t.check("bystander", &b.stdout_lossy(), &["bystander ok\n"]);
    // SAFETY: closing the descriptors openpty gave us.
    unsafe {
        libc::close(host_master);
        libc::close(host_slave);
    }
    d.finish().await;
    t.assert_all("ptys: sandbox vs plain python, and no host pty");
}

const CPU_PROBE: &str = "import multiprocessing, os\nprint(os.cpu_count(), multiprocessing.cpu_count(), len(open('/sys/devices/system/cpu/online').read().strip().split(',')) > 0)\n";

/// `os.cpu_count()` (and multiprocessing's) inside is the sandbox's cpu
/// limit rounded up, at most the host's: plain python's count where the
/// limit covers the host, fewer where it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_count_follows_the_cpu_limit() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();
    let dir = tempfile::tempdir().unwrap();
    let outside_run = outside(dir.path(), &["-c", CPU_PROBE], &[], b"");
    let host: u32 = outside_run
        .stdout
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut limits = vec![(f64::from(host), host), (f64::from(host) + 7.0, host)];
    if host > 1 {
        limits.push((1.0, 1));
        limits.push((0.5, 1));
        limits.push((f64::from(host) - 0.5, host));
        limits.push((1.01, 2));
    }
    for (cpus, want) in limits {
        let mut r = request(Program::Code(CPU_PROBE.into()), &[], &[]);
        r.limits.cpus = Some(cpus);
        let got = from_result(&d.spawn(&r).await.unwrap(), &cwd);
        // Plain python on a host with `want` CPUs prints this.
        let expected = Run {
            stdout: format!("{want} {want} True\n"),
            ..outside_run.clone()
        };
        t.verdict(
            &format!("cpus = {cpus} on {host} host CPUs"),
            &format!("{got:?}"),
            &format!("{expected:?}"),
            got == expected,
        );
    }
    d.finish().await;
    t.assert_all("os.cpu_count() under a cpu limit");
}

const AFFINITY_PROBE: &str = "import os\nprint(len(os.sched_getaffinity(0)), os.cpu_count())\n";

/// Policy `cpu_affinity` (opt-in): a sandbox whose cpu limit is below the
/// host's CPUs is pinned to that many, so `os.sched_getaffinity` follows the
/// limit as `os.cpu_count()` does; a limit covering the host pins nothing.
/// The shipped policy leaves it off: the affinity is then the host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sched_getaffinity_follows_the_cpu_limit_when_the_policy_pins() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    const DEFAULT_POLICY: &str = include_str!("../../policy/default.toml");
    let text = DEFAULT_POLICY.replacen("\ncpu_affinity = false", "\ncpu_affinity = true", 1);
    assert!(
        text.contains("\ncpu_affinity = true"),
        "the default policy's cpu_affinity line changed"
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("pinned.toml");
    std::fs::write(&policy, text).unwrap();
    let host = std::thread::available_parallelism().unwrap().get() as u32;
    let pinned = TestDaemon::start(|c| {
        c.policies.insert("default".into(), policy.clone());
    })
    .await;
    let mut t = Table::new();
    let mut limits = vec![(f64::from(host), host), (f64::from(host) + 3.0, host)];
    if host > 1 {
        limits.push((1.0, 1));
        limits.push((0.5, 1));
        limits.push((f64::from(host) - 0.5, host));
    }
    for (cpus, want) in &limits {
        let mut r = request(Program::Code(AFFINITY_PROBE.into()), &[], &[]);
        r.limits.cpus = Some(*cpus);
        let got = pinned.spawn(&r).await.unwrap();
        t.check(
            &format!("pinned: cpus = {cpus} on {host} host CPUs"),
            &format!("{}{}", got.stdout_lossy(), got.stderr_lossy()),
            &[&format!("{want} {want}\n")],
        );
    }
    pinned.finish().await;
    if host > 1 {
        let d = TestDaemon::start(|_| {}).await;
        let mut r = request(Program::Code(AFFINITY_PROBE.into()), &[], &[]);
        r.limits.cpus = Some(1.0);
        let got = d.spawn(&r).await.unwrap();
        t.check(
            "shipped policy: cpus = 1, affinity stays the host's",
            &format!("{}{}", got.stdout_lossy(), got.stderr_lossy()),
            &[&format!("{host} 1\n")],
        );
        d.finish().await;
    }
    t.assert_all("os.sched_getaffinity under a cpu limit");
}

const BLAS_PROBE: &str = "import ctypes, numpy as np\npath = next(l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l and '.so' in l)\nlib = ctypes.CDLL(path)\nget = next(getattr(lib, n) for n in ('scipy_openblas_get_num_threads64_', 'scipy_openblas_get_num_threads', 'openblas_get_num_threads64_', 'openblas_get_num_threads') if hasattr(lib, n))\na = np.ones((300, 300))\nprint(get(), float((a @ a).sum()))\n";

/// A request's BLAS thread variables give the thread count plain `python`
/// started with them gets (the zygote loaded OpenBLAS at one thread), in
/// one-shot sandboxes and in sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blas_thread_variables_take_effect_as_at_start_up() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();
    let envs: &[(&str, &[(&str, &str)])] = &[
        (
            "one thread (the default)",
            &[("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1")],
        ),
        (
            "OPENBLAS_NUM_THREADS=2",
            &[("OPENBLAS_NUM_THREADS", "2"), ("OMP_NUM_THREADS", "1")],
        ),
        (
            "more than the CPUs",
            &[("OPENBLAS_NUM_THREADS", "64"), ("OMP_NUM_THREADS", "1")],
        ),
        (
            "0 falls through to OMP_NUM_THREADS",
            &[("OPENBLAS_NUM_THREADS", "0"), ("OMP_NUM_THREADS", "2")],
        ),
        (
            "empty: every CPU",
            &[("OPENBLAS_NUM_THREADS", ""), ("OMP_NUM_THREADS", "")],
        ),
    ];
    for (name, env) in envs {
        compare_code(&mut t, &d, &cwd, name, BLAS_PROBE, &[], env).await;
    }
    // No thread variable: as many threads as the cpu limit allows (rounded
    // up, at most the host's), as plain python on a machine of that size.
    let dir = tempfile::tempdir().unwrap();
    let host_run = outside(dir.path(), &["-c", BLAS_PROBE], &[], b"");
    let host: u32 = host_run
        .stdout
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for cpus in [1.0, 1.5, f64::from(host)] {
        let mut r = request(Program::Code(BLAS_PROBE.into()), &[], &[]);
        r.limits.cpus = Some(cpus);
        let got = from_result(&d.spawn(&r).await.unwrap(), &cwd);
        let threads = (cpus.ceil() as u32).min(host);
        let mut want = host_run.clone();
        want.stdout = want
            .stdout
            .replacen(&host.to_string(), &threads.to_string(), 1);
        t.verdict(
            &format!("no variable, cpus = {cpus} on {host} host CPUs"),
            &format!("{got:?}"),
            &format!("{want:?}"),
            got == want,
        );
    }
    let want = outside(
        dir.path(),
        &["-c", BLAS_PROBE],
        &[("OPENBLAS_NUM_THREADS", "2"), ("OMP_NUM_THREADS", "1")],
        b"",
    );
    let c = d.client().await;
    let s = c
        .session_create(&forkd_ipc::SessionCreate {
            env: [("OPENBLAS_NUM_THREADS".to_string(), "2".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = c
        .run_code(&forkd_ipc::RunCode {
            session: s.session.clone(),
            code: BLAS_PROBE.into(),
            timeout_ms: None,
        })
        .await
        .unwrap();
    let got = String::from_utf8_lossy(&r.stdout);
    t.verdict(
        "OPENBLAS_NUM_THREADS=2 in a session",
        &got,
        &want.stdout,
        got == want.stdout,
    );
    drop(c);
    d.finish().await;
    t.assert_all("BLAS thread variables: sandbox vs plain python");
}

// ---------------------------------------------------------------------------
// 5. Messages
// ---------------------------------------------------------------------------

/// An interpreter that is not Python is named as such (whether it exits
/// before or after the daemon's first message), and `forkd-run --embedded`
/// reports the failure to start as forkd's own (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interpreter_that_is_not_python_is_named_as_such() {
    if skip_unless_root("starts daemons") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-python");
    std::fs::write(&script, "#!/bin/sh\necho 'I am a shell script'\nexit 0\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (python, status) in [
        ("/bin/true".to_string(), "exit code 0"),
        ("/bin/false".to_string(), "exit code 1"),
        (script.display().to_string(), "exit code 0"),
    ] {
        let want = format!(
            "zygote `default` failed to start: `{python}` exited ({status}) without running forkd's zygote script: it does not look like a Python 3 interpreter (anything it printed is logged as `zygote stderr`); set `python` (--python) to one, e.g. a venv's bin/python"
        );
        let p = python.clone();
        let (err, attempt) =
            match TestDaemon::try_start(None, |c| c.zygotes[0].python = p.into()).await {
                Ok(_) => panic!("a daemon started with {python} as its interpreter"),
                Err(e) => e,
            };
        assert_eq!(err.to_string(), want);
        attempt.assert_no_leaks().await;

        let _session = external_session();
        let run = Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .args(["--embedded", "--python", &python, "-c", "print(1)"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(3), "{run:?}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        // forkd-run says it once; the zygote's own output is logged as it
        // arrives, which may be after that line.
        let said: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("forkd-run:"))
            .collect();
        assert_eq!(
            said,
            [format!("forkd-run: cannot start the embedded daemon: {want}").as_str()],
            "{stderr}"
        );
    }
}

const ACCOUNT_PROBE: &str = "import os, pwd, grp, pathlib\ne = pwd.getpwuid(os.getuid())\nprint(e.pw_uid == os.getuid() != 0, e.pw_name, e.pw_dir, grp.getgrgid(os.getgid()).gr_name)\nprint(os.path.expanduser('~' + e.pw_name), pwd.getpwnam('root').pw_uid)\ndel os.environ['HOME']\nprint(os.path.expanduser('~'), pathlib.Path.home())\ntry:\n    open('/etc/passwd', 'a')\nexcept OSError as x:\n    print(type(x).__name__)\n";

/// Code that looks its user up (`pwd.getpwuid(os.getuid())`, `~` without
/// HOME, `pathlib.Path.home()`) finds an ordinary user, as under plain
/// python run by a user with an account: each sandbox's own uid has an entry
/// (named `user`, home /home/user) beside the host's, which it cannot change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_user_has_an_account() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    for _ in 0..2 {
        let r = d.run(ACCOUNT_PROBE).await;
        assert_eq!(r.exit_code, Some(0), "{}", r.stderr_lossy());
        assert_eq!(
            r.stdout_lossy(),
            "True user /home/user user\n/home/user 0\n/home/user /home/user\nPermissionError\n"
        );
    }
    d.finish().await;
}

const FS_VIEW_PROBE: &str = "import os, socket, stat, sys\nfor d in ('/', '/etc', '/dev'):\n    print(d, stat.S_ISDIR(os.stat(d).st_mode), len(os.listdir(d)) > 0)\netc = os.listdir('/etc')\nprint('secrets', sorted(n for n in ('shadow', 'gshadow', 'sudoers', 'ssh', 'machine-id') if n in etc), os.path.exists('/etc/shadow'))\ncwd = os.getcwd()\ntrees = [sys.prefix, sys.base_prefix, sys.executable] + sys.path\nmine = [n for n in os.listdir(cwd) if not any(t.startswith(os.path.join('/tmp', n) + '/') for t in trees)]\nprint('cwd', cwd, os.environ['HOME'] == cwd, os.path.samefile(cwd, '/tmp'), mine == [], os.access(cwd, os.W_OK | os.X_OK))\nwith open('probe.txt', 'w') as f:\n    f.write('x')\nos.mkdir('sub')\nos.remove('probe.txt')\nos.rmdir('sub')\nprint('venv bin first', os.environ['PATH'].split(':')[0] == os.path.dirname(sys.executable))\nname = socket.gethostname()\nprint('hostname', name, socket.gethostbyname(name))\nprint('in /etc/hosts', any(name in l.split()[1:] for l in open('/etc/hosts') if not l.startswith('#')))\ntry:\n    open('/etc/hosts', 'a')\nexcept OSError as e:\n    print('/etc/hosts', type(e).__name__)\n";

const INTERPRETERS_PROBE: &str = "import subprocess\nfor cmd in (['python', '-c', 'import sys; print(sys.executable, sys.prefix)'], ['python3', '-c', 'import sys; print(sys.prefix)'], ['pip', '--version']):\n    p = subprocess.run(cmd, capture_output=True, text=True)\n    print(cmd[0], p.returncode, p.stdout.strip(), p.stderr.strip())\n";

const TAR_PROBE: &str = "import os, stat, tarfile\nos.mkdir('src')\nos.chmod('src', 0o750)\nfor n, m in (('exe', 0o755), ('secret', 0o600), ('ro', 0o444)):\n    p = os.path.join('src', n)\n    with open(p, 'w') as f:\n        f.write(n)\n    os.chmod(p, m)\nwith tarfile.open('t.tar', 'w') as t:\n    t.add('src')\nos.mkdir('out')\nwith tarfile.open('t.tar') as t:\n    t.extractall('out')\nfor root, dirs, files in sorted(os.walk('out')):\n    for n in sorted(dirs + files):\n        p = os.path.join(root, n)\n        print(p, oct(stat.S_IMODE(os.stat(p).st_mode)))\nprint(os.access('out/src/exe', os.X_OK), open('out/src/secret').read())\n";

/// The filesystem an ordinary user's program looks at: `/`, `/etc` and
/// `/dev` are listable directories without the host's secrets; the working
/// directory is `/home/user` (HOME; the scratch, as /tmp), empty (but for
/// the mount points of the interpreter's own trees bound under /tmp, a venv
/// there as in CI) and writable; the zygote's venv `bin` leads PATH and
/// its `python`, `python3` and `pip` run as they do outside; the sandbox's
/// hostname resolves through /etc/hosts; `tarfile` keeps modes as outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filesystem_view_is_an_ordinary_users() {
    if skip_unless_root("starts a daemon") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let cwd = sandbox_cwd(&d).await;
    let mut t = Table::new();
    // Twice: a warm-pool child and one forked after it.
    for _ in 0..2 {
        let r = d.run(FS_VIEW_PROBE).await;
        t.check(
            "ls /, /etc, /dev; cwd; PATH; hostname",
            &format!("{}{}", r.stdout_lossy(), r.stderr_lossy()),
            &["/ True True\n/etc True True\n/dev True True\nsecrets [] False\ncwd /home/user True True True True\nvenv bin first True\nhostname sandbox 127.0.1.1\nin /etc/hosts True\n/etc/hosts OSError\n"],
        );
    }
    // The sandbox's default PATH, given to plain python too.
    let bin = python().parent().unwrap().display().to_string();
    let path = format!("{bin}:/usr/local/bin:/usr/bin:/bin");
    let env = [("PATH", path.as_str()), ("LANG", "C.UTF-8")];
    compare_code(
        &mut t,
        &d,
        &cwd,
        "python, python3, pip on PATH",
        INTERPRETERS_PROBE,
        &[],
        &env,
    )
    .await;
    compare_code(&mut t, &d, &cwd, "tarfile keeps modes", TAR_PROBE, &[], &[]).await;
    d.finish().await;
    t.assert_all("the filesystem view: sandbox vs plain python");
}
