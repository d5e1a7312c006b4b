//! Rootless mode for real: the `forkd` binary runs as an unprivileged user the
//! test creates, its zygote enters a user namespace of its own, and sandboxes
//! still get their namespaces, landlock and seccomp. Without a delegated
//! cgroup the daemon warns once at start-up and every result reports the
//! limits as not enforced (warm-pool and on-demand children alike).
//!
//! Not covered here: a rootless daemon *with* a delegated cgroup v2 subtree
//! enforcing its limits. This host's cgroups are v1 (cgroup2 has no
//! controllers), so that case needs a guest kernel with cgroup v2; it is
//! tested in a VM, not by this file.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forkd_ipc::{Client, Program, SpawnRequest};

const USER: &str = "forkd-it";

fn user_ids() -> (u32, u32) {
    let lookup = || {
        let out = Command::new("id").args(["-u", USER]).output().ok()?;
        let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        let out = Command::new("id").args(["-g", USER]).output().ok()?;
        let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        Some((uid, gid))
    };
    if let Some(ids) = lookup() {
        return ids;
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            USER,
        ])
        .status()
        .expect("useradd runs (the tests run as root)");
    assert!(status.success(), "useradd {USER} failed");
    lookup().expect("user exists after useradd")
}

fn processes_of(uid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let real_uid = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if real_uid == Some(uid) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_for_socket(path: &Path, daemon: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!("rootless forkd exited early: {status}");
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("rootless forkd did not open {} within 30 s", path.display());
}

#[test]
fn unprivileged_daemon_isolates_with_a_user_namespace() {
    let (uid, gid) = user_ids();
    assert!(
        processes_of(uid).is_empty(),
        "processes of {USER} exist before the test"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("forkd.sock");

    // Debian's interpreter: readable by any user (unlike a venv under /root).
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args([
            "--python",
            "/usr/bin/python3",
            "--preload",
            "json",
            "--log-level",
            "warn",
        ])
        .arg("--socket")
        .arg(&socket)
        .env("FORKD_ZYGOTE_LIB", zygote_library())
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start forkd as the unprivileged user");
    wait_for_socket(&socket, &mut daemon);

    // Root may always connect (the default allow-list is the daemon's uid and root).
    let mut client = Client::connect(&socket).unwrap();
    let probe = r#"
import os, socket
status = open("/proc/self/status").read()
field = lambda name: status.split(name + ":")[1].split()[0]
print(os.getuid(), socket.gethostname(), field("CapEff"), field("CapBnd"), field("NoNewPrivs"), field("Seccomp"))
print(open("/proc/self/uid_map").read().split())
print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
for path in ("/usr/forkd-x", "/etc/forkd-x"):
    try:
        open(path, "w")
        print("WROTE", path)
    except OSError as e:
        print(path, e.errno)
try:
    os.listdir("/root")
    print("LISTED /root")
except OSError as e:
    print("/root", e.errno)
open("scratch.txt", "w").write("ok")
print(open("scratch.txt").read())
"#;
    let result = client
        .spawn(&SpawnRequest {
            program: Program::Code(probe.into()),
            timeout_ms: Some(10_000),
            ..SpawnRequest::default()
        })
        .unwrap();
    let out = result.stdout_lossy();
    assert_eq!(
        result.exit_code,
        Some(0),
        "stdout: {out}\nstderr: {}",
        result.stderr_lossy()
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "0 sandbox 0000000000000000 0000000000000000 1 2",
        "uid 0 in its own user namespace, no capabilities, no_new_privs, seccomp filter"
    );
    assert_eq!(
        lines[1],
        format!("['0', '{uid}', '1']"),
        "only the daemon's uid is mapped"
    );
    assert_eq!(
        lines[2], "[1]",
        "the sandbox sees only its own pid namespace"
    );
    assert!(
        lines[3].starts_with("/usr/forkd-x 30"),
        "write to /usr: {}",
        lines[3]
    ); // EROFS
    assert!(
        lines[4].starts_with("/etc/forkd-x 30"),
        "write to /etc: {}",
        lines[4]
    );
    assert!(
        lines[5] == "/root 2" || lines[5] == "/root 13",
        "/root: {}",
        lines[5]
    );
    assert_eq!(lines[6], "ok");
    assert!(
        !result.limits.cgroup_enforced,
        "rootless without delegation must say limits are not enforced"
    );
    // Every result says so, whatever path the child took: warm pool
    // (default limits) or forked on demand (other scratch size), with or
    // without explicit cgroup limits asked for.
    for (i, (scratch, memory)) in [(None, None), (Some(2 << 20), None), (None, Some(64 << 20))]
        .into_iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        let mut req = SpawnRequest {
            program: Program::Code(format!("print({i})")),
            timeout_ms: Some(10_000),
            ..SpawnRequest::default()
        };
        req.limits.scratch_bytes = scratch;
        req.limits.memory_bytes = memory;
        let r = client.spawn(&req).unwrap();
        assert_eq!(r.stdout_lossy(), format!("{i}\n"), "{}", r.stderr_lossy());
        assert!(
            !r.limits.cgroup_enforced,
            "result {i} claims enforced limits: {:?}",
            r.limits
        );
    }

    // SIGTERM: clean exit, socket removed, nothing of the user's left running.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status =
        wait_timeout(&mut daemon, Duration::from_secs(20)).expect("daemon exits after SIGTERM");
    assert!(status.success(), "daemon exit status {status}");
    assert!(!socket.exists(), "socket file left behind");
    // The missing cgroup was said once, at start-up, not per request.
    let mut log = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut log).unwrap();
    let warnings = log
        .lines()
        .filter(|l| l.contains("limits are NOT enforced"))
        .count();
    assert_eq!(
        warnings, 1,
        "expected one warning about unenforced limits:\n{log}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_of(uid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        processes_of(uid).is_empty(),
        "processes of {USER} left: {:?}",
        processes_of(uid)
    );
}

fn wait_timeout(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

/// The native zygote library next to the test's forkd binary.
fn zygote_library() -> std::path::PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_forkd"));
    let lib = exe.with_file_name(forkd_zygote::LIBRARY_FILE_NAME);
    assert!(
        lib.is_file(),
        "{} missing: build the workspace first",
        lib.display()
    );
    lib
}
