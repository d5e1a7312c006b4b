//! The exact shape of what `forkd` and `forkd-run` say when something goes
//! wrong at start-up or a sandbox is killed (issue 20's "Messages and DX"):
//! each message names the thing and says what to do. The binaries run as a
//! user would run them.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `forkd-run ARGS` with no daemon socket from the environment; (exit code, stderr).
fn forkd_run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_forkd-run"))
        .args(args)
        .env_remove("FORKD_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run forkd-run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("forkd-run {args:?} -> {:?}\n{stderr}", out.status.code());
    (out.status.code().unwrap_or(-1), stderr)
}

/// A config for an embedded daemon under the tests' cgroup parent.
fn config(dir: &Path, extra: &str) -> String {
    let path = dir.join("forkd.toml");
    std::fs::write(
        &path,
        format!("[cgroup]\nparent = \"{CGROUP_PARENT}\"\n{extra}"),
    )
    .unwrap();
    path.display().to_string()
}

/// A private daemon that cannot start is forkd's own failure (exit 3, not
/// the program's 1), and the reason says what to do: an interpreter that is
/// not Python, one that does not exist, a preload module that is not
/// installed (named in full, with the pip command and no importlib frames).
#[test]
fn embedded_start_failures_exit_3_and_say_what_to_do() {
    if skip_unless_root("starts private daemons, which create namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let py = python().display().to_string();

    let (code, err) = forkd_run(&[
        "--embedded",
        "--config",
        &cfg,
        "--python",
        "/bin/true",
        "-c",
        "print(1)",
    ]);
    assert_eq!(code, 3, "{err}");
    // Said once, by forkd-run (not also as the pool's log line).
    assert_eq!(
        err,
        "forkd-run: cannot start the embedded daemon: zygote `default` failed to start: `/bin/true` exited (exit code 0) without running forkd's zygote script: it does not look like a Python 3 interpreter (anything it printed is logged as `zygote stderr`); set `python` (--python) to one, e.g. a venv's bin/python\n"
    );

    let (code, err) = forkd_run(&[
        "--embedded",
        "--config",
        &cfg,
        "--python",
        "/nonexistent/bin/python",
        "-c",
        "print(1)",
    ]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.lines().count(), 1, "said once: {err}");
    assert!(err.contains("/nonexistent/bin/python"), "{err}");
    assert!(
        err.contains("set `python` to an existing interpreter"),
        "{err}"
    );

    let (code, err) = forkd_run(&[
        "--embedded",
        "--config",
        &cfg,
        "--python",
        &py,
        "--preload",
        "json,forkd_no_such_pkg.sub",
        "-c",
        "print(1)",
    ]);
    assert_eq!(code, 3, "{err}");
    let want =
        format!("preload module 'forkd_no_such_pkg.sub' failed to import in {py} (Python 3.");
    assert!(err.contains(&want), "{err}");
    assert!(
        err.contains(&format!(
            "ModuleNotFoundError: No module named 'forkd_no_such_pkg'; install it into that interpreter (e.g. {py} -m pip install forkd_no_such_pkg) or remove 'forkd_no_such_pkg.sub' from the zygote's preload"
        )),
        "{err}"
    );
    assert!(!err.contains("<frozen importlib"), "{err}");
    assert_eq!(
        err.matches("failed to import").count(),
        1,
        "said once: {err}"
    );
    assert!(
        err.starts_with(
            "forkd-run: cannot start the embedded daemon: zygote `default` failed to start: "
        ),
        "{err}"
    );
}

/// A metrics or HTTP port that another process holds fails the start at
/// once, naming the address and what to do; the daemon leaves no socket.
#[test]
fn port_conflicts_fail_the_start_naming_the_address() {
    if skip_unless_root("starts forkd, which creates namespaces and cgroups") {
        return;
    }
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let socket = dir.path().join("forkd.sock");
    let addr = format!("127.0.0.1:{port}");
    for (flag, want) in [
        (
            "--metrics-listen",
            format!("forkd: cannot listen for metrics on http://{addr}/metrics: Address already in use (os error 98); another process listens there: stop it or choose another address (--metrics-listen, or metrics_listen in the config)"),
        ),
        (
            "--http",
            format!("forkd: --http: cannot listen on {addr} (another process listens there: stop it or choose another address): Address already in use (os error 98)"),
        ),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
            .args(["--config", &cfg, "--log-level", "error", "--preload", ""])
            .arg("--python")
            .arg(python())
            .arg("--socket")
            .arg(&socket)
            .args([flag, &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forkd");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("forkd {flag} {addr} kept running with the port taken");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        println!("{flag}: {status:?}\n{err}");
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.lines().any(|l| l == want), "want {want:?} in:\n{err}");
        assert!(!socket.exists(), "{flag}: socket left behind");
    }
    drop(held);
}

/// An OOM kill is said in words with the limit and the peak, and the flag
/// to raise, even though the killed program wrote nothing to stderr.
#[test]
fn an_oom_kill_says_the_limit_and_the_peak() {
    if skip_unless_root("starts a private daemon, which creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let py = python().display().to_string();
    let (code, err) = forkd_run(&[
        "--embedded",
        "--config",
        &cfg,
        "--python",
        &py,
        "--preload",
        "",
        "--memory",
        "64M",
        "-c",
        "chunks = [b'x' * (1 << 20) for _ in range(512)]",
    ]);
    assert_eq!(code, 137, "{err}");
    let last = err.lines().last().unwrap_or_default();
    let shape = regex_lite(last);
    assert!(shape, "last line {last:?} in:\n{err}");
    // Nothing from the program itself: the line above is all the user gets.
    assert!(!err.contains("MemoryError"), "{err}");
}

/// `forkd-run: sandbox killed: out of memory (limit 64 MiB, peak N[.N] MiB|KiB); raise --memory`.
fn regex_lite(line: &str) -> bool {
    let Some(rest) =
        line.strip_prefix("forkd-run: sandbox killed: out of memory (limit 64 MiB, peak ")
    else {
        return false;
    };
    let Some(rest) = rest
        .strip_suffix(" MiB); raise --memory")
        .or_else(|| rest.strip_suffix(" KiB); raise --memory"))
    else {
        return false;
    };
    !rest.is_empty()
        && rest.chars().all(|c| c.is_ascii_digit() || c == '.')
        && rest.parse::<f64>().is_ok_and(|v| v > 0.0)
}

/// A daemon without cgroups (as rootless without a delegated subtree): the
/// result says so and forkd-run warns once per command, also for `-n`.
#[test]
fn unenforced_limits_are_said_once() {
    if skip_unless_root("starts a private daemon, which creates namespaces") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "mode = \"disabled\"\n");
    let py = python().display().to_string();
    let warning = "forkd-run: warning: memory/cpu/pids limits were not enforced (the daemon has no usable cgroup, e.g. rootless without a delegated subtree; `forkd doctor` says why)";
    for n in ["1", "3"] {
        let (code, err) = forkd_run(&[
            "--embedded",
            "--config",
            &cfg,
            "--python",
            &py,
            "--preload",
            "",
            "-n",
            n,
            "-c",
            "print(1)",
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            err.lines().filter(|l| *l == warning).count(),
            1,
            "-n {n}: {err}"
        );
    }
    // With cgroups (the default here) there is no warning.
    let cfg = config(dir.path(), "");
    let (code, err) = forkd_run(&[
        "--embedded",
        "--config",
        &cfg,
        "--python",
        &py,
        "--preload",
        "",
        "-c",
        "print(1)",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("not enforced"), "{err}");
}

/// Limits that cannot mean anything are refused by forkd-run itself (usage
/// error, exit 2) with the rule, before any daemon is asked: `--cpus -1`
/// got clap's advice to write `-- -1` (which makes it the program's
/// argument), `--cpus nan` ran with the default, `--concurrency 0` ran with 1.
#[test]
fn meaningless_limits_are_refused_with_the_rule() {
    for (args, want) in [
        (
            &["--cpus", "-1"][..],
            "forkd-run: --cpus -1 must be a positive number of cores, e.g. 0.5 or 2",
        ),
        (
            &["--cpus", "0"],
            "forkd-run: --cpus 0 must be a positive number of cores, e.g. 0.5 or 2",
        ),
        (
            &["--cpus", "nan"],
            "forkd-run: --cpus NaN must be a positive number of cores, e.g. 0.5 or 2",
        ),
        (
            &["--pids", "0"],
            "forkd-run: --pids 0: a sandbox needs at least 1 process",
        ),
        (
            &["-n", "2", "--concurrency", "0"],
            "forkd-run: --concurrency must be at least 1",
        ),
    ] {
        let mut all = args.to_vec();
        all.extend(["-c", "print(1)"]);
        let out = Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .args(&all)
            .env("FORKD_SOCKET", "/nonexistent/forkd.sock")
            .stdin(Stdio::null())
            .output()
            .expect("run forkd-run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim(), want, "{args:?}");
    }
}

/// A limits key given a value instead of a table names what is expected,
/// not serde's internal type name (`expected struct RawLimits`).
#[test]
fn a_limits_value_that_is_not_a_table_says_what_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("forkd.toml");
    std::fs::write(&cfg, "limits = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("--check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run forkd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "invalid type: integer `5`, expected a table: [limits.default] or [limits.max]"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("RawLimits"), "{stderr}");
}

/// `--log-level nonsense` used to be taken as a filter for a module named
/// `nonsense`, which hid every log line; it is refused, listing the levels.
#[test]
fn a_log_level_that_is_not_one_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["--log-level", "nonsense", "--check-config"])
        .output()
        .expect("run forkd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'nonsense' for '--log-level <LOG_LEVEL>': `nonsense` is not a level: use one of off, error, warn, info, debug, trace or a filter like `info,forkd_pool=debug`"),
        "{stderr}"
    );
    for ok in ["warn", "info,forkd_pool=debug"] {
        let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
            .args(["--log-level", ok, "--help"])
            .output()
            .expect("run forkd");
        assert_eq!(out.status.code(), Some(0), "{ok}");
    }
}

/// A mistyped socket path says which directory is missing (and nothing is
/// created); a stale socket file says nobody listens.
#[test]
fn a_mistyped_socket_path_names_the_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("fokrd/forkd.sock");
    let (code, err) = forkd_run(&["--socket", typo.to_str().unwrap(), "-c", "print(1)"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.starts_with(&format!(
            "forkd-run: no forkd daemon is listening on {}: start one with `forkd` (or run `forkd-run --embedded`), or point FORKD_SOCKET at the right socket (its directory {} does not exist: check the path for a typo)\n",
            typo.display(),
            typo.parent().unwrap().display()
        )),
        "{err}"
    );
    assert!(!typo.parent().unwrap().exists(), "a directory was created");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (code, err) = forkd_run(&["--socket", stale.to_str().unwrap(), "-c", "print(1)"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no forkd daemon is listening on"), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
}
