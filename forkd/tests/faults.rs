//! Faults: the zygote killed during a burst, an unwritable cgroup filesystem
//! (at start and while serving), a full scratch tmpfs. Each ends with the
//! leak checks (processes, cgroups, socket).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A request either completes or gets one of these codes when its zygote dies
/// under it; anything else (an internal error, a hang) is a bug.
const ZYGOTE_DEATH_CODES: [ErrorCode; 2] = [ErrorCode::ZygoteUnavailable, ErrorCode::SpawnFailed];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zygote_killed_during_a_burst_of_fifty() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    const BURST: usize = 50;
    let d = TestDaemon::start(|_| {}).await;
    let zygote = d.zygote_pid().await;
    let client = d.client().await;
    let mut tasks = Vec::new();
    for i in 0..BURST {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let code = format!(
                "import time\nopen('/tmp/started', 'w').close()\ntime.sleep(1.5)\nprint({i})"
            );
            (i, c.spawn(&req(&code)).await)
        }));
    }
    // Kill it once part of the burst is running: some requests are then in
    // their sandboxes, others being forked or still waiting.
    d.wait_for_scratch_file("started", Duration::from_secs(20))
        .await;
    // SAFETY: kill with a positive pid: our own zygote.
    assert_eq!(unsafe { libc::kill(zygote, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();

    // Every request gets its reply (a bound far above the sandboxes' own
    // 1.5 s, so a hang fails the test instead of blocking it forever).
    let mut ok = 0;
    let mut failed = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (i, res) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a request of the burst hung after its zygote was killed")
            .unwrap();
        match res {
            Ok(r) => {
                assert_eq!(r.stdout_lossy(), format!("{i}\n"), "request {i}: {r:?}");
                ok += 1;
            }
            Err(ClientError::Server(e)) if ZYGOTE_DEATH_CODES.contains(&e.code) => {
                *failed.entry(e.code.to_string()).or_default() += 1;
            }
            Err(e) => panic!("request {i}: unexpected failure {e:?}"),
        }
    }
    println!(
        "burst of {BURST}: {ok} completed, failed {failed:?}; all replied {:?} after the kill",
        killed_at.elapsed()
    );
    assert!(
        failed.values().sum::<usize>() >= 1,
        "at least the running sandbox must have failed with its zygote"
    );

    // The supervisor restarts the zygote; a following request succeeds
    // (until then it may only be told the zygote is unavailable).
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match client.spawn(&req("print('after')")).await {
            Ok(r) => break r,
            Err(ClientError::Server(e))
                if e.code == ErrorCode::ZygoteUnavailable && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("after the restart: {e:?}"),
        }
    };
    assert_eq!(after.stdout, b"after\n");
    assert_ne!(d.zygote_pid().await, zygote, "the zygote was not restarted");
    drop(client);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_scratch_is_reported_and_the_next_sandbox_gets_a_fresh_one() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let fill = r#"
import errno, os
written = 0
try:
    with open("/tmp/fill", "wb") as f:
        while True:
            f.write(b"x" * 65536)
            f.flush()
            written += 65536
except OSError as e:
    print("errno", errno.errorcode[e.errno])
# The sandbox goes on after ENOSPC: it can still read and report.
print("written", written, "kib", os.path.getsize("/tmp/fill") // 1024)
"#;
    let mut r = req(fill);
    r.limits.scratch_bytes = Some(MIB);
    let full = d.spawn(&r).await.expect("the filled sandbox is reported");
    let out = full.stdout_lossy();
    println!("filled sandbox: {out:?} exit {:?}", full.exit_code);
    assert_eq!(full.exit_code, Some(0), "stderr: {}", full.stderr_lossy());
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("errno ENOSPC"));
    let kib: u64 = lines
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("size line");
    assert!(kib <= 1024, "wrote {kib} KiB into a 1 MiB scratch");

    // The next sandboxes (same size: forked on demand; default size: from
    // the warm pool) start with an empty scratch that has all its space.
    let check = r#"
import os
st = os.statvfs("/tmp")
# A checkout under /tmp (a CI clone) has its interpreter's top directory
# bound back read-only: not the scratch's content.
top = os.environ.get("TOP")
print(sorted(n for n in os.listdir("/tmp") if n != top), st.f_bavail * st.f_frsize // 1024)
open("/tmp/again", "wb").write(b"y" * 262144)
print(os.path.getsize("/tmp/again"))
"#;
    let top = python()
        .strip_prefix("/tmp")
        .ok()
        .and_then(|rest| rest.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut same = req(check);
    same.env.insert("TOP".into(), top.clone());
    same.limits.scratch_bytes = Some(MIB);
    let next = d.spawn(&same).await.unwrap();
    assert_eq!(
        next.stdout_lossy(),
        "[] 1024\n262144\n",
        "stderr: {}",
        next.stderr_lossy()
    );
    let mut default_size = req(check);
    default_size.env.insert("TOP".into(), top);
    let warm = d.spawn(&default_size).await.unwrap();
    assert_eq!(warm.exit_code, Some(0), "stderr: {}", warm.stderr_lossy());
    assert!(
        warm.stdout_lossy().starts_with("[] "),
        "{}",
        warm.stdout_lossy()
    );
    d.finish().await;
}

// ---------------------------------------------------------------------------
// Unwritable cgroup filesystem: a `forkd` process in a private mount
// namespace whose cgroup mounts are made read-only there (the host's stay
// writable).
// ---------------------------------------------------------------------------

/// A `forkd` child in its own mount namespace.
struct NsDaemon {
    child: Child,
    socket: PathBuf,
    instance: String,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
    _session: ExternalSession,
}

fn c_path(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a mount path")
}

/// Starts `forkd` in a new mount namespace (propagation private, so nothing
/// done there reaches the host); with `read_only_cgroups` every cgroup mount
/// is remounted read-only inside it before the daemon runs.
fn start_in_mount_ns(read_only_cgroups: bool) -> NsDaemon {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let instance = format!(
        "t{}-ro{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let session = external_session();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("forkd.toml");
    std::fs::write(
        &config,
        format!(
            "netns_stock = 0\nzygote_library = {:?}\n\n[cgroup]\nparent = \"{CGROUP_PARENT}\"\ninstance = \"{instance}\"\n\n[[zygote]]\nname = \"default\"\npython = {:?}\npreload = [\"json\"]\nwarm_pool = 0\nenv = {{ {MARKER_VAR} = \"{instance}\" }}\n",
            zygote_library().display().to_string(),
            python().display().to_string()
        ),
    )
    .unwrap();
    let socket = dir.path().join("forkd.sock");
    let stderr = dir.path().join("stderr");
    let remount: Vec<std::ffi::CString> = if read_only_cgroups {
        cgroup_mounts().iter().map(|p| c_path(p)).collect()
    } else {
        Vec::new()
    };
    let root = c_path(Path::new("/"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .args(["--log-level", "warn"])
        // The leak checks attribute the daemon itself by this marker too.
        .env(MARKER_VAR, &instance)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    // SAFETY: between fork and exec the closure only makes system calls on
    // memory prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for target in &remount {
                if libc::mount(
                    std::ptr::null(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start forkd in a mount namespace");
    NsDaemon {
        child,
        socket,
        instance,
        stderr,
        _dir: dir,
        _session: session,
    }
}

impl NsDaemon {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Remounts every cgroup mount of the daemon's namespace (`ro` or `rw`)
    /// with nsenter(1), from outside: the daemon keeps running.
    fn remount_cgroups(&self, mode: &str) {
        for m in cgroup_mounts() {
            let status = Command::new("nsenter")
                .args(["-t", &self.child.id().to_string(), "-m", "--"])
                .args(["mount", "-o", &format!("remount,bind,{mode}")])
                .arg(&m)
                .status()
                .expect("nsenter (util-linux) runs");
            assert!(
                status.success(),
                "remount {mode} of {} in the daemon's namespace",
                m.display()
            );
        }
    }

    /// Nothing of this daemon is left: processes, cgroups, socket.
    async fn assert_nothing_left(&self) {
        let gone = wait_until(Duration::from_secs(5), || {
            processes_of(&self.instance).is_empty()
        })
        .await;
        assert!(
            gone,
            "processes left: {:?}",
            processes_of(&self.instance)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            instance_cgroup_dirs(&self.instance),
            Vec::<PathBuf>::new(),
            "cgroups left"
        );
        assert!(!self.socket.exists(), "socket file left");
    }
}

/// The native zygote library next to the test's forkd binary.
fn zygote_library() -> PathBuf {
    let lib =
        Path::new(env!("CARGO_BIN_EXE_forkd")).with_file_name(forkd_zygote::LIBRARY_FILE_NAME);
    assert!(
        lib.is_file(),
        "{} missing: build the workspace first (cargo build --workspace)",
        lib.display()
    );
    lib
}

fn host_cgroups_writable() {
    // The remounts happened in private namespaces only: the host's cgroup
    // mounts must still be read-write.
    for line in mountinfo().lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if line.contains(" - cgroup") {
            assert!(
                fields[5].split(',').any(|o| o == "rw"),
                "a host cgroup mount became read-only: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_cgroups_at_start_refuse_to_run_without_limits() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let mut d = start_in_mount_ns(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "forkd kept running on a read-only cgroup filesystem"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = d.stderr();
    println!("exit {status}: {err}");
    assert!(!status.success());
    // The message names the directory, the cause and the ways out.
    assert!(err.contains("/sys/fs/cgroup/"), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(err.contains("mode disabled"), "{err}");
    d.assert_nothing_left().await;
    host_cgroups_writable();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroups_turning_read_only_fail_requests_with_a_typed_error_then_recover() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let mut d = start_in_mount_ns(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "forkd exited: {}",
            d.stderr()
        );
        assert!(Instant::now() < deadline, "forkd did not open its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = AsyncClient::connect(&d.socket).await.unwrap();
    assert_eq!(
        client.spawn(&req("print('before')")).await.unwrap().stdout,
        b"before\n"
    );

    d.remount_cgroups("ro");
    let e = server_error(client.spawn(&req("print('never')")).await.unwrap_err());
    println!("{e:?}");
    assert_eq!(e.code, ErrorCode::SpawnFailed, "{e:?}");
    assert!(
        e.message.contains("/sys/fs/cgroup/") && e.message.contains(&d.instance),
        "the message names the cgroup: {}",
        e.message
    );
    assert!(
        e.message.contains("read-only") && e.message.contains("mode disabled"),
        "the message says what to do: {}",
        e.message
    );
    // The daemon serves on: once the filesystem is writable again, requests run.
    d.remount_cgroups("rw");
    assert_eq!(
        client.spawn(&req("print('after')")).await.unwrap().stdout,
        b"after\n"
    );
    drop(client);

    // SAFETY: kill with a positive pid: our own child.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "forkd did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", d.stderr());
    d.assert_nothing_left().await;
    host_cgroups_writable();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_zygote_library_fails_start_without_leaving_cgroups() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let (err, attempt) = match TestDaemon::try_start(None, |c| {
        c.zygote_library = Some("/nonexistent/libforkd_zygote.so".into());
    })
    .await
    {
        Ok(_) => panic!("started without its zygote library"),
        Err(e) => e,
    };
    assert!(matches!(err, forkd::StartError::Library { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/libforkd_zygote.so"),
        "{err}"
    );
    attempt.assert_no_leaks().await;
}
