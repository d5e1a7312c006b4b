//! The policy key `landlock` (rust-landlock's compatibility level) and the
//! landlock status every spawn result reports, against a real daemon.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use common::*;
use forkd_ipc::LandlockStatus;

/// Landlock ABI whose rights and scopes forkd requests (`isolate::LANDLOCK_ABI`).
const REQUESTED_ABI: i32 = 6;

/// A terminal ioctl (TCGETS) on `/dev/null` inside the sandbox: seccomp lets
/// the terminal class through and the device answers ENOTTY, so only
/// landlock (which grants no device ioctls) makes it EACCES.
const DEVICE_IOCTL: &str = r#"
import fcntl, termios
try:
    with open("/dev/null", "rb") as f:
        fcntl.ioctl(f, termios.TCGETS, bytes(64))
    print("answered")
except PermissionError:
    print("EACCES")
except OSError as e:
    print(e.strerror)
"#;

/// A policy file equal to the default one but with `landlock = "required"`.
fn required_policy(dir: &std::path::Path) -> std::path::PathBuf {
    let text = forkd_zygote::DEFAULT_POLICY_TOML
        .replace("landlock = \"best_effort\"", "landlock = \"required\"");
    assert!(
        text.contains("landlock = \"required\""),
        "default.toml lost its landlock key"
    );
    let path = dir.join("required.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn default_policy_reports_what_the_kernel_enforces() {
    if skip_unless_root("starts a daemon with namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let r = d.run(DEVICE_IOCTL).await;
    let abi = forkd_zygote::sys::landlock_abi();
    let expected = match abi {
        0 => LandlockStatus::NotEnforced,
        a if a < REQUESTED_ABI => LandlockStatus::PartiallyEnforced,
        _ => LandlockStatus::FullyEnforced,
    };
    assert_eq!(r.landlock, Some(expected), "kernel landlock ABI {abi}");
    if expected != LandlockStatus::NotEnforced {
        assert_eq!(
            r.stdout_lossy().trim(),
            "EACCES",
            "stderr: {}",
            r.stderr_lossy()
        );
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn required_landlock_is_enforced_or_refuses_to_start() {
    if skip_unless_root("starts a daemon with namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = required_policy(dir.path());
    let tweak = |c: &mut forkd::Config| {
        c.policies.insert("strict".into(), policy.clone());
    };
    let abi = forkd_zygote::sys::landlock_abi();
    if abi < REQUESTED_ABI {
        // The kernel cannot enforce the whole ruleset: the zygote must not start.
        let Err((e, stopped)) = TestDaemon::try_start(None, tweak).await else {
            panic!("landlock = \"required\" started on a kernel with landlock ABI {abi}");
        };
        let msg = e.to_string();
        assert!(msg.contains("landlock = \"required\""), "{msg}");
        stopped.assert_no_leaks().await;
        return;
    }
    let d = TestDaemon::start(tweak).await;
    let mut r = req(DEVICE_IOCTL);
    r.policy = Some("strict".into());
    let res = d.spawn(&r).await.expect("spawn with the strict policy");
    assert_eq!(res.landlock, Some(LandlockStatus::FullyEnforced));
    assert_eq!(
        res.stdout_lossy().trim(),
        "EACCES",
        "stderr: {}",
        res.stderr_lossy()
    );
    // A bystander on the default policy keeps working beside it.
    let other = d.run("print(6 * 7)").await;
    assert_eq!(other.stdout_lossy().trim(), "42");
    d.finish().await;
}
