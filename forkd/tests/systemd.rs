//! systemd socket activation and readiness notification, driven the way
//! systemd does it: the test binds the socket, starts the `forkd` binary with
//! it as fd 3, `LISTEN_PID`/`LISTEN_FDS` and `NOTIFY_SOCKET` set, and checks
//! that the daemon serves it, keeps it out of its zygotes and sandboxes,
//! reports READY=1 and STOPPING=1, and leaves the file for the next
//! activation.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Starts `forkd --config <config>` with `fd` as its fd 3 and `LISTEN_FDS`
/// set to `count`; `LISTEN_PID` is the daemon's own pid (the shell execs it).
fn start_activated(fd: RawFd, count: &str, config: &Path) -> Child {
    start_activated_notifying(fd, count, config, None)
}

fn start_activated_notifying(
    fd: RawFd,
    count: &str,
    config: &Path,
    notify_socket: Option<&str>,
) -> Child {
    let mut cmd = Command::new("/bin/sh");
    if let Some(n) = notify_socket {
        cmd.env("NOTIFY_SOCKET", n);
    }
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS="$0" exec "$@""#)
        .arg(count)
        .arg(env!("CARGO_BIN_EXE_forkd"))
        .arg("--config")
        .arg(config)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("start forkd")
}

fn write_config(dir: &Path, instance: &str) -> std::path::PathBuf {
    let config = dir.join("forkd.toml");
    std::fs::write(
        &config,
        format!(
            "[cgroup]\nparent = \"{CGROUP_PARENT}\"\ninstance = \"{instance}\"\n\n\
             [[zygote]]\nname = \"default\"\npython = \"{}\"\npreload = [\"numpy\"]\nwarm_pool = 2\n\
             env = {{ {MARKER_VAR} = \"{instance}\" }}\n",
            python().display()
        ),
    )
    .unwrap();
    config
}

fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("no notification from forkd");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
    }
    s
}

/// Pids holding a descriptor that links to `target` (e.g. `socket:[123]`).
fn holders(pids: impl IntoIterator<Item = i32>, target: &str) -> Vec<i32> {
    pids.into_iter()
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == target))
        })
        .collect()
}

/// Whether `pid`'s descriptor `fd` has O_CLOEXEC (`flags:` in fdinfo, octal).
fn close_on_exec(pid: i32, fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .expect("fdinfo has flags");
    flags & libc::O_CLOEXEC as u32 != 0
}

fn terminate(mut daemon: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            assert!(
                status.success(),
                "forkd exited with {status}: {}",
                stderr_of(&mut daemon)
            );
            return;
        }
        assert!(Instant::now() < deadline, "forkd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_the_passed_socket_keeps_it_from_sandboxes_and_leaves_it_for_the_next_activation() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("forkd.sock");
    let instance = format!("act{}", std::process::id());
    let config = write_config(dir.path(), &instance);
    // What systemd does for forkd.socket: bind and listen before the daemon runs.
    let listener = UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
        .unwrap()
        .ino();
    let target = format!("socket:[{inode}]");

    // systemd's notification socket: a path in round 0, abstract in round 1.
    let notify_path = dir.path().join("notify");
    let abstract_name = format!("forkd-it-notify-{}", std::process::id());
    let notify_targets = [
        (
            UnixDatagram::bind(&notify_path).unwrap(),
            notify_path.display().to_string(),
        ),
        (
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap())
                .unwrap(),
            format!("@{abstract_name}"),
        ),
    ];

    for (round, (notifications, target_name)) in notify_targets.iter().enumerate() {
        notifications
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let daemon = start_activated_notifying(
            listener.as_raw_fd(),
            "1",
            &config,
            Some(target_name.as_str()),
        );
        assert_eq!(next_notification(notifications), "READY=1");
        // Ready means served: no retry needed for this ping.
        assert!(forkd_ipc::Client::connect(&socket).unwrap().ping().is_ok());
        let mut client = forkd_ipc::Client::connect(&socket).unwrap();
        let result = client
            .spawn(&req("import numpy; print(numpy.zeros(5).tolist())"))
            .unwrap();
        assert_eq!(
            result.stdout_lossy(),
            "[0.0, 0.0, 0.0, 0.0, 0.0]\n",
            "round {round}"
        );
        assert_eq!(result.exit_code, Some(0));
        drop(client);

        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o660,
            "the daemon gives the passed socket its usual mode"
        );
        // The daemon holds the socket (so the check below can fail) and
        // nothing it started does: zygotes and warm children would otherwise
        // be able to accept other clients' connections.
        let pid = daemon.id() as i32;
        assert_eq!(holders([pid], &target), vec![pid]);
        let started: Vec<i32> = descendants(pid).iter().map(|p| p.pid).collect();
        assert!(
            !started.is_empty(),
            "the daemon's zygote and warm children were not found"
        );
        assert_eq!(holders(started, &target), Vec::<i32>::new());
        // The zygotes happen to receive their own socket on fd 3, which hides
        // an inheritable listener; anything else the daemon starts would not.
        assert!(
            close_on_exec(pid, 3),
            "the passed socket must be close-on-exec in the daemon"
        );

        terminate(daemon);
        assert_eq!(next_notification(notifications), "STOPPING=1");
        assert!(
            socket.exists(),
            "round {round}: the socket file belongs to systemd and must survive the daemon"
        );
        assert!(processes_of(&instance).is_empty(), "processes left behind");
        assert!(
            instance_cgroup_dirs(&instance).is_empty(),
            "cgroups left behind"
        );
    }
}

#[test]
fn more_than_one_passed_socket_is_refused_with_a_fix() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("forkd.sock")).unwrap();
    let config = write_config(dir.path(), &format!("act2x{}", std::process::id()));
    let mut daemon = start_activated(listener.as_raw_fd(), "2", &config);
    let status = daemon.wait().unwrap();
    let err = stderr_of(&mut daemon);
    assert!(!status.success());
    assert!(err.contains("exactly one"), "{err}");
}

#[test]
fn a_passed_descriptor_that_is_not_a_listening_unix_socket_is_refused() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &format!("actfile{}", std::process::id()));
    let file = std::fs::File::open(&config).unwrap();
    let mut daemon = start_activated(file.as_raw_fd(), "1", &config);
    let status = daemon.wait().unwrap();
    let err = stderr_of(&mut daemon);
    assert!(!status.success());
    assert!(err.contains("not a socket"), "{err}");

    // A connected (not listening) socket, as Accept=yes would pass.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut daemon = start_activated(a.as_raw_fd(), "1", &config);
    let status = daemon.wait().unwrap();
    let err = stderr_of(&mut daemon);
    assert!(!status.success());
    assert!(err.contains("Accept=no"), "{err}");
}
