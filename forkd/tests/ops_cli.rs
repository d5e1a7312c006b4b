//! The `forkd` binary's operations features: JSON logs, metrics on a Unix
//! socket, `forkd doctor`. Their processes are not in-process test daemons,
//! so each test checks its own leftovers.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::scrape::{http, sample};
use common::*;

// ---------------------------------------------------------------------------
// The binary: JSON logs, metrics on a Unix socket
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_metrics_serve_on_a_unix_socket() {
    if skip_unless_root("starts forkd, which creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("forkd.sock");
    let metrics = dir.path().join("metrics.sock");
    let parent = format!("forkd-it-ops-{}", std::process::id());
    let config = dir.path().join("forkd.toml");
    std::fs::write(
        &config,
        format!(
            "[cgroup]\nparent = \"{parent}\"\n\n[[zygote]]\nname = \"default\"\npython = \"{}\"\npreload = [\"numpy\"]\nwarm_pool = 1\n",
            python().display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--metrics-listen")
        .arg(&metrics)
        .args(["--log-format", "json", "--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start forkd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "forkd exited early");
        assert!(Instant::now() < deadline, "forkd did not open its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = AsyncClient::connect(&socket).await.unwrap();
    let r = client.spawn(&req("print(7)")).await.unwrap();
    assert_eq!(r.stdout, b"7\n");
    let stream = tokio::net::UnixStream::connect(&metrics).await.unwrap();
    let (status, body) = http(stream, "GET", "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        sample(
            &body,
            "forkd_spawns_total",
            &[("zygote", "default"), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().permissions().mode() & 0o777,
        0o660
    );
    drop(client);

    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "forkd exit: {:?}", out.status);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    assert!(lines.len() >= 3, "too few log lines: {stderr}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        assert!(l["fields"]["message"].is_string(), "{l}");
    }
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    for m in ["forkd listening", "serving metrics", "forkd stopped"] {
        assert!(messages.contains(&m), "no {m:?} in {messages:?}");
    }
    assert!(
        !metrics.exists(),
        "the metrics socket is removed at shutdown"
    );
    assert!(!socket.exists());
    // Every hierarchy the daemon may have used (cpuacct too): the test's
    // parent must go with what is below it.
    for mount in cgroup_mounts() {
        let d = mount.join(&parent);
        let leftovers: Vec<_> = std::fs::read_dir(&d)
            .map(|r| r.flatten().filter(|e| e.path().is_dir()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "cgroups left in {}", d.display());
        let _ = std::fs::remove_dir(&d);
        assert!(
            !d.exists(),
            "the test's cgroup parent {} stayed",
            d.display()
        );
    }
}

// ---------------------------------------------------------------------------
// forkd doctor
// ---------------------------------------------------------------------------

/// Runs `forkd doctor --config <toml>`; (exit code, lines).
fn doctor(dir: &Path, toml: &str) -> (i32, String) {
    let config = dir.join("forkd.toml");
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .arg("doctor")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("run forkd doctor");
    let text = String::from_utf8(out.stdout).unwrap();
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Whether a report line is check `name`'s: the whole name in its column
/// (`TAG  name` padded to 22, then a space), so `sandbox` is not `sandbox ids`.
fn is_check(line: &str, name: &str) -> bool {
    let pad = " ".repeat(23usize.saturating_sub(name.len()).max(1));
    line.get(6..)
        .and_then(|rest| rest.strip_prefix(name))
        .is_some_and(|after| after.starts_with(&pad))
}

fn verdict<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| is_check(l, name))
        .map(|l| &l[..4])
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{report}"))
}

fn zygote_toml(python: &str, preload: &str) -> String {
    format!(
        "[cgroup]\nparent = \"{CGROUP_PARENT}\"\n\n[[zygote]]\nname = \"default\"\npython = \"{python}\"\npreload = [{preload}]\n"
    )
}

#[test]
fn doctor_passes_the_core_checks_on_this_machine() {
    if skip_unless_root("starts forkd, which creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let toml = zygote_toml(&python().display().to_string(), "\"numpy\"");
    let (code, report) = doctor(dir.path(), &toml);
    for name in [
        "kernel",
        "namespace user",
        "namespace pid",
        "namespace mount",
        "namespace net",
        "namespace ipc",
        "namespace uts",
        "namespace cgroup",
        "no_new_privs",
        "seccomp",
        "cgroups",
        "zygote library",
        "configuration",
        "python [default]",
        "preload [default] numpy",
        "sandbox",
    ] {
        assert_eq!(verdict(&report, name), "PASS", "{name}:\n{report}");
    }
    assert_eq!(code, 0, "{report}");
    assert!(!report.contains("FAIL"));
    // A host-wide tuning: reported as it is, with the way to change it.
    let favordynmods = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("cgroup") && l.contains("favordynmods"));
    let expedited = std::fs::read_to_string("/sys/kernel/rcu_expedited").map(|v| v.trim() == "1");
    match expedited {
        Ok(false) if !favordynmods => {
            assert_eq!(verdict(&report, "rcu_expedited"), "WARN", "{report}");
            assert!(
                report.contains("mount -o remount,favordynmods /sys/fs/cgroup")
                    && report.contains("echo 1 > /sys/kernel/rcu_expedited"),
                "{report}"
            );
        }
        _ => assert_eq!(verdict(&report, "rcu_expedited"), "PASS", "{report}"),
    }
    // Its private daemon and probe cgroups are gone.
    let pattern = "/doctor-";
    for mount in cgroup_mounts() {
        let d = mount.join(CGROUP_PARENT);
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                assert!(
                    !e.path().display().to_string().contains(pattern),
                    "left behind: {}",
                    e.path().display()
                );
            }
        }
    }
}

#[test]
fn doctor_fails_with_a_fix_for_a_missing_interpreter_or_preload() {
    if skip_unless_root("starts forkd, which creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = doctor(
        dir.path(),
        &zygote_toml("/nonexistent/bin/python", "\"numpy\""),
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(verdict(&report, "python [default]"), "FAIL");
    assert!(report.contains("/nonexistent/bin/python"));
    assert_eq!(
        verdict(&report, "sandbox"),
        "WARN",
        "not tried after a failure"
    );
    let fix_after = |name: &str| {
        let lines: Vec<&str> = report.lines().collect();
        let i = lines.iter().position(|l| is_check(l, name)).unwrap();
        lines[i + 1].trim_start().starts_with("fix: ")
    };
    assert!(fix_after("python [default]"), "{report}");

    let python = python().display().to_string();
    let (code, report) = doctor(
        dir.path(),
        &zygote_toml(&python, "\"numpy\", \"no_such_module_for_doctor\""),
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(verdict(&report, "preload [default] numpy"), "PASS");
    assert_eq!(
        verdict(&report, "preload [default] no_such_module_for_doctor"),
        "FAIL"
    );
    assert!(report.contains("ModuleNotFoundError"), "{report}");
    assert!(
        report.contains("-m pip install no_such_module_for_doctor"),
        "{report}"
    );
}

#[test]
fn check_config_validates_what_a_start_needs() {
    if skip_unless_root("starts forkd, which creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let check = |toml: &str| {
        let config = dir.path().join("forkd.toml");
        std::fs::write(&config, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
            .arg("--check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let python = python().display().to_string();
    let (code, text) = check(&format!(
        "metrics_listen = \"127.0.0.1:9464\"\naudit_log = \"/var/log/forkd/audit.jsonl\"\nlog_format = \"json\"\n{}",
        zygote_toml(&python, "\"numpy\"")
    ));
    assert_eq!((code, text.trim()), (Some(0), "configuration OK"));
    let (code, text) = check(&zygote_toml("/nonexistent/bin/python", ""));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("/nonexistent/bin/python"), "{text}");
    let (code, text) = check(&format!(
        "metrics_listen = \"0.0.0.0:9464\"\n{}",
        zygote_toml(&python, "")
    ));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("not a loopback address"), "{text}");
}

/// Options that only mean something for a private daemon are refused
/// without `--embedded` (usage error, exit 2), never silently ignored; no
/// daemon or root is needed to see it.
#[test]
fn embedded_only_options_require_embedded() {
    for args in [
        &["--python", "/usr/bin/python3"][..],
        &["--preload", "numpy"],
        &["--warm-pool", "4"],
        &["--config", "/dev/null"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .args(args)
            .args(["-c", "print(1)"])
            .env("FORKD_SOCKET", "/nonexistent/forkd.sock")
            .output()
            .expect("run forkd-run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--embedded"), "{args:?}: {stderr}");
    }
}

/// A timeout that is not a positive number of seconds gets forkd's message
/// (clap's own for `-1` advised `-- -1`, which hands it to the program), exit
/// 2; no daemon or root is needed to see it.
#[test]
fn a_timeout_that_is_not_positive_is_refused_with_the_rule() {
    for value in ["-1", "0", "-0.5", "nan"] {
        let out = Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .args(["--timeout", value, "-c", "print(1)"])
            .env("FORKD_SOCKET", "/nonexistent/forkd.sock")
            .output()
            .expect("run forkd-run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value}: {stderr}");
        assert_eq!(
            stderr.trim(),
            format!(
                "forkd-run: --timeout {} must be a positive number of seconds",
                value.parse::<f64>().unwrap()
            ),
            "{value}"
        );
    }
}
