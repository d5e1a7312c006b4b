//! Rootless mode for real: the `forkd` binary runs as an unprivileged user the
//! test creates, its zygote enters a user namespace of its own, and sandboxes
//! still get their namespaces, landlock and seccomp. Without a delegated
//! cgroup the daemon warns once at start-up and every result reports the
//! limits as not enforced (warm-pool and on-demand children alike); with a
//! delegated cgroup v2 subtree that has the memory, cpu and pids controllers
//! (a pure cgroup v2 host, such as the guest of tests/vm/cgroup-v2-vm.sh),
//! they are enforced.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use forkd_ipc::{Client, KilledBy, Limits, Program, SpawnRequest};

const USER: &str = "forkd-it";
const MIB: u64 = 1024 * 1024;

/// Both tests run daemons as the same user and count its processes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// True, after printing why, when not root (this test creates a user and
/// runs forkd as it): the caller returns at once.
fn skip_unless_root(needs: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    skipped(&format!("needs root ({needs})"));
    true
}

/// Prints `skipped: <why>` past the test harness's capture (which hides
/// `eprintln!` of passing tests), so a skip never looks like a pass.
fn skipped(why: &str) {
    // One write: stderr is unbuffered and the harness prints meanwhile.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("skipped: {why}\n").as_bytes(),
    );
}

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
    if skip_unless_root("creates a user and runs forkd as it") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (uid, gid) = user_ids();
    assert!(
        processes_of(uid).is_empty(),
        "processes of {USER} exist before the test"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("forkd.sock");

    let mut daemon = forkd_command(&socket)
        .uid(uid)
        .gid(gid)
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
    // All its sandboxes share the daemon's uid (it has no subordinate
    // range): said once too, with the line to add.
    let shared_uid: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rootless: every sandbox runs as uid"))
        .collect();
    assert_eq!(
        shared_uid.len(),
        1,
        "expected one warning about the shared uid:\n{log}"
    );
    assert!(
        shared_uid[0].contains(&format!("`{USER}:100000:65536`"))
            && shared_uid[0].contains("/etc/subuid and /etc/subgid"),
        "the warning names the line to add: {}",
        shared_uid[0]
    );
    // `forkd doctor` as the user warns the same way, the line as its fix.
    let report = doctor_as(uid, gid);
    assert!(
        report.contains(&format!(
            "WARN  sandbox ids            rootless: every sandbox runs as uid {uid}"
        )) && report.contains(&format!(
            "fix: /etc/subuid has no line for {USER}: add one such as `{USER}:100000:65536`"
        )),
        "{report}"
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

// ---------------------------------------------------------------------------
// Rootless with a subordinate id range (newuidmap/newgidmap)
// ---------------------------------------------------------------------------

/// Subordinate ids the test gives its user (below the root daemon's lease
/// range and apart from common useradd ranges).
const SUB_START: u32 = 3_000_000;
const SUB_COUNT: u32 = 65_536;

/// The user's `/etc/subuid` and `/etc/subgid` lines, added for the test; the
/// files' contents are restored when dropped.
struct SubordinateLines {
    saved: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl SubordinateLines {
    fn add() -> SubordinateLines {
        let mut saved = Vec::new();
        for file in ["/etc/subuid", "/etc/subgid"] {
            let path = PathBuf::from(file);
            let old = std::fs::read(&path).ok();
            let mut text = old.clone().unwrap_or_default();
            if !text.is_empty() && !text.ends_with(b"\n") {
                text.push(b'\n');
            }
            text.extend_from_slice(format!("{USER}:{SUB_START}:{SUB_COUNT}\n").as_bytes());
            saved.push((path.clone(), old));
            std::fs::write(&path, text).unwrap();
        }
        SubordinateLines { saved }
    }
}

impl Drop for SubordinateLines {
    fn drop(&mut self) {
        for (path, old) in &self.saved {
            let _ = match old {
                Some(text) => std::fs::write(path, text),
                None => std::fs::remove_file(path),
            };
        }
    }
}

/// Processes whose real uid is the user's or in its subordinate range.
fn processes_of_user_and_range(uid: u32) -> Vec<u32> {
    let mut pids = processes_of(uid);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let real = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if real.is_some_and(|r| (SUB_START..SUB_START + SUB_COUNT).contains(&r)) {
            pids.push(pid);
        }
    }
    pids
}

/// A private file of the daemon's user, where every sandbox sees it (the
/// interpreter's read-only `/usr`); removed when dropped.
struct PrivateFile(PathBuf);

impl Drop for PrivateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn unprivileged_daemon_with_a_subordinate_range_runs_each_sandbox_as_its_own_uid() {
    if skip_unless_root("creates a user, edits /etc/subuid and runs forkd as it") {
        return;
    }
    let helpers = ["/usr/bin/newuidmap", "/usr/bin/newgidmap"];
    let setuid_root = |h: &str| {
        std::fs::metadata(h).is_ok_and(|m| {
            std::os::unix::fs::MetadataExt::uid(&m) == 0 && m.permissions().mode() & 0o4000 != 0
        })
    };
    if !helpers.iter().all(|h| setuid_root(h)) {
        skipped("newuidmap/newgidmap are not installed setuid root (Debian package uidmap)");
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (uid, gid) = user_ids();
    assert!(
        processes_of_user_and_range(uid).is_empty(),
        "processes of {USER} exist before the test"
    );
    let _lines = SubordinateLines::add();
    let private = PrivateFile(PathBuf::from(format!(
        "/usr/local/share/forkd-it-private-{}",
        std::process::id()
    )));
    std::fs::write(&private.0, "secret").unwrap();
    std::os::unix::fs::chown(&private.0, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&private.0, std::fs::Permissions::from_mode(0o600)).unwrap();

    // `forkd doctor` as the user sees the range.
    let report = doctor_as(uid, gid);
    assert!(
        report.contains(&format!(
            "PASS  sandbox ids            rootless: each sandbox runs as its own uid of the subordinate range {SUB_START}..{}",
            SUB_START + SUB_COUNT
        )),
        "{report}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("forkd.sock");
    let mut daemon = forkd_command(&socket)
        .uid(uid)
        .gid(gid)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start forkd as the unprivileged user");
    wait_for_socket(&socket, &mut daemon);

    let spawn = |code: String| {
        let mut client = Client::connect(&socket).unwrap();
        client
            .spawn(&SpawnRequest {
                program: Program::Code(code),
                timeout_ms: Some(60_000),
                ..SpawnRequest::default()
            })
            .unwrap()
    };
    // A: caps its processes at 24 (RLIMIT_NPROC counts the processes of its
    // uid), forks until the kernel refuses, and holds them while B runs.
    let hog = r#"
import os, resource, time
resource.setrlimit(resource.RLIMIT_NPROC, (24, 24))
n, err = 0, None
while n < 200:
    try:
        pid = os.fork()
    except OSError as e:
        err = e.errno
        break
    if pid == 0:
        time.sleep(15)
        os._exit(0)
    n += 1
print(os.getuid(), os.getgid(), n, err)
time.sleep(8)
"#;
    // B: the same cap, a few processes of its own, and the daemon user's
    // private file.
    let bystander = format!(
        r#"
import os, resource
resource.setrlimit(resource.RLIMIT_NPROC, (24, 24))
kids = []
try:
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        kids.append(pid)
    forks = "forked"
except OSError as e:
    forks = f"fork errno {{e.errno}}"
for pid in kids:
    os.waitpid(pid, 0)
try:
    open("{private}").read()
    private = "READ"
except OSError as e:
    private = e.errno
print(os.getuid(), os.getgid(), forks, private)
print(open("/proc/self/uid_map").read().split())
print(open("/proc/self/gid_map").read().split())
"#,
        private = private.0.display()
    );
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn(hog.into()));
        // A has forked its 23 well before this (B waits on a fresh child).
        std::thread::sleep(Duration::from_secs(3));
        let b = spawn(bystander);
        (a.join().unwrap(), b)
    });
    let (a_out, b_out) = (a.stdout_lossy(), b.stdout_lossy());
    assert_eq!(a.exit_code, Some(0), "A: {a_out} {}", a.stderr_lossy());
    assert_eq!(b.exit_code, Some(0), "B: {b_out} {}", b.stderr_lossy());
    let a_words: Vec<&str> = a_out.split_whitespace().collect();
    let b_lines: Vec<&str> = b_out.lines().collect();
    let b_words: Vec<&str> = b_lines[0].split_whitespace().collect();
    let (a_uid, b_uid): (u32, u32) = (a_words[0].parse().unwrap(), b_words[0].parse().unwrap());
    assert!(
        a_uid != b_uid && (1..=SUB_COUNT).contains(&a_uid) && (1..=SUB_COUNT).contains(&b_uid),
        "two sandboxes, two ids of the subordinate range: {a_uid} {b_uid}"
    );
    assert_eq!(
        (a_words[1], b_words[1]),
        (a_words[0], b_words[0]),
        "gid = uid"
    );
    assert_eq!(
        (a_words[2], a_words[3]),
        ("23", "11"),
        "A reached its process cap (EAGAIN): {a_out}"
    );
    assert_eq!(
        b_words[2], "forked",
        "B's processes are its own uid's, not A's: {b_out}"
    );
    assert_eq!(
        b_words[3], "13",
        "the daemon user's 0600 file is not the sandbox's: {b_out}"
    );
    assert_eq!(
        b_lines[1],
        format!("['0', '{uid}', '1', '1', '{SUB_START}', '{SUB_COUNT}']"),
        "the zygote maps the daemon's uid and the range"
    );
    assert_eq!(
        b_lines[2],
        format!("['0', '{gid}', '1', '1', '{SUB_START}', '{SUB_COUNT}']")
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status =
        wait_timeout(&mut daemon, Duration::from_secs(20)).expect("daemon exits after SIGTERM");
    assert!(status.success(), "daemon exit status {status}");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut log).unwrap();
    assert!(
        !log.contains("rootless: every sandbox runs as uid"),
        "no shared-uid warning with a subordinate range:\n{log}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_of_user_and_range(uid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        processes_of_user_and_range(uid).is_empty(),
        "processes of {USER} or its range left: {:?}",
        processes_of_user_and_range(uid)
    );

    // The lines are there but the helpers cannot work (no_new_privs stops a
    // setuid program): the daemon does not start, says why and what to do,
    // and leaves nothing running.
    let mut command = forkd_command(&socket);
    command.uid(uid).gid(gid).stderr(Stdio::piped());
    // SAFETY: prctl takes integers only; nothing is allocated after fork.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its mapping: {err}");
    assert!(
        err.contains("mapping the subordinate id range failed")
            && err.contains("write to uid_map failed")
            && err.contains("NoNewPrivileges"),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_of_user_and_range(uid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        processes_of_user_and_range(uid).is_empty(),
        "processes left after the failed start: {:?}",
        processes_of_user_and_range(uid)
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

/// `forkd doctor`'s report (stdout) as the user.
fn doctor_as(uid: u32, gid: u32) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(["doctor", "--python", "/usr/bin/python3"])
        .env("FORKD_ZYGOTE_LIB", zygote_library())
        .current_dir("/")
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The daemon as both rootless tests run it: Debian's interpreter (readable
/// by any user, unlike a venv under /root), a cheap preload, on `socket`.
fn forkd_command(socket: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_forkd"));
    command
        .args([
            "--python",
            "/usr/bin/python3",
            "--preload",
            "json",
            "--log-level",
            "warn",
        ])
        .arg("--socket")
        .arg(socket)
        .env("FORKD_ZYGOTE_LIB", zygote_library())
        .current_dir("/")
        .stdout(Stdio::null());
    command
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

// ---------------------------------------------------------------------------
// Rootless with a delegated cgroup v2 subtree
// ---------------------------------------------------------------------------

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The cgroup2 mount to delegate from: `/sys/fs/cgroup` when it is cgroup2,
/// else the first cgroup2 mount (`/sys/fs/cgroup/unified` on a v1-hybrid host).
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts: Vec<PathBuf> = forkd_cgroup::hierarchy_mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.v2)
        .map(|m| m.mount_point)
        .collect();
    mounts
        .iter()
        .find(|m| m.as_path() == Path::new("/sys/fs/cgroup"))
        .or(mounts.first())
        .cloned()
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn write(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
}

/// A subtree delegated to the test user the way cgroup v2 documents it
/// (cgroup-v2.rst, "Delegation"): the directory and its `cgroup.procs`,
/// `cgroup.subtree_control` and `cgroup.threads` are chowned to the user, and
/// the controllers are enabled from the mount root down to it. The daemon
/// lives in the leaf `daemon/`; the subtree itself holds no process, so the
/// daemon may create sandbox cgroups beside it (no internal processes) and
/// its children may move into them (the common ancestor's `cgroup.procs` is
/// the user's). Dropping it kills what is left and removes the tree.
struct Delegation {
    root: PathBuf,
    leaf: PathBuf,
    controllers: bool,
}

impl Delegation {
    fn new(mount: &Path, uid: u32, gid: u32) -> Delegation {
        let available = words(&mount.join("cgroup.controllers"));
        let controllers = CONTROLLERS.iter().all(|c| available.iter().any(|a| a == c));
        if controllers {
            for c in CONTROLLERS {
                write(&mount.join("cgroup.subtree_control"), &format!("+{c}"));
            }
        }
        let root = mount.join(format!("forkd-it-delegated-{}", std::process::id()));
        std::fs::create_dir(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        let d = Delegation {
            leaf: root.join("daemon"),
            root,
            controllers,
        };
        if controllers {
            for c in CONTROLLERS {
                write(&d.root.join("cgroup.subtree_control"), &format!("+{c}"));
            }
        }
        std::fs::create_dir(&d.leaf).unwrap();
        for f in [
            "",
            "cgroup.procs",
            "cgroup.subtree_control",
            "cgroup.threads",
        ] {
            let path = d.root.join(f);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
        d
    }

    /// Every cgroup directory below the subtree root (excluding the leaf).
    fn sandbox_cgroups(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out.retain(|p| *p != self.leaf);
        out
    }
}

impl Drop for Delegation {
    fn drop(&mut self) {
        let mut dirs = self.sandbox_cgroups();
        dirs.push(self.leaf.clone());
        // Deepest first.
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in dirs.iter().chain(std::iter::once(&self.root)) {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(2);
            while std::fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn unprivileged_daemon_in_a_delegated_cgroup_v2_subtree() {
    if skip_unless_root("creates a user and runs forkd as it") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let expect_v2 = std::env::var_os("FORKD_TEST_EXPECT_CGROUP_V2").is_some();
    let Some(mount) = cgroup2_mount() else {
        assert!(
            !expect_v2,
            "FORKD_TEST_EXPECT_CGROUP_V2 is set but no cgroup2 is mounted"
        );
        skipped("no cgroup2 mount to delegate from");
        return;
    };
    let (uid, gid) = user_ids();
    assert!(
        processes_of(uid).is_empty(),
        "processes of {USER} exist before the test"
    );
    let delegation = Delegation::new(&mount, uid, gid);
    assert!(
        delegation.controllers || !expect_v2,
        "FORKD_TEST_EXPECT_CGROUP_V2 is set but {} lacks one of {CONTROLLERS:?}",
        mount.join("cgroup.controllers").display()
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket_dir = dir.path().join("run");
    std::fs::create_dir(&socket_dir).unwrap();
    std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid)).unwrap();
    let socket = socket_dir.join("forkd.sock");
    let config = dir.path().join("forkd.toml");
    std::fs::write(
        &config,
        format!(
            "[cgroup]\nv2_root = \"{}\"\n\n[[zygote]]\nname = \"default\"\nwarm_pool = 2\n",
            delegation.root.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Root moves the daemon into the delegated leaf, then drops to the user:
    // an unprivileged process could not leave the test's cgroup on its own.
    let leaf_procs = std::fs::OpenOptions::new()
        .write(true)
        .open(delegation.leaf.join("cgroup.procs"))
        .unwrap();
    let leaf_fd = std::os::fd::AsRawFd::as_raw_fd(&leaf_procs);
    let mut command = forkd_command(&socket);
    command
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::inherit());
    // SAFETY: between fork and exec the closure only makes raw system calls
    // (write, setgroups, setgid, setuid) on values prepared before the fork;
    // it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let check = |r: libc::c_long| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::write(leaf_fd, b"0".as_ptr().cast(), 1) as libc::c_long)?;
            check(libc::setgroups(0, std::ptr::null()) as libc::c_long)?;
            check(libc::setgid(gid) as libc::c_long)?;
            check(libc::setuid(uid) as libc::c_long)?;
            Ok(())
        });
    }
    let mut daemon = command
        .spawn()
        .expect("start forkd as the unprivileged user");
    drop(leaf_procs);
    wait_for_socket(&socket, &mut daemon);
    assert_eq!(
        words(&delegation.leaf.join("cgroup.procs"))
            .first()
            .map(String::as_str),
        Some(daemon.id().to_string().as_str()),
        "the daemon runs in the delegated leaf"
    );

    let mut client = Client::connect(&socket).unwrap();
    let spawn = |client: &mut Client, code: &str, limits: Limits| {
        client
            .spawn(&SpawnRequest {
                program: Program::Code(code.into()),
                timeout_ms: Some(60_000),
                limits,
                ..SpawnRequest::default()
            })
            .unwrap()
    };
    let hello = spawn(&mut client, "print('hello')", Limits::default());
    assert_eq!(
        (hello.exit_code, hello.stdout_lossy().as_str()),
        (Some(0), "hello\n"),
        "stderr: {}",
        hello.stderr_lossy()
    );
    if delegation.controllers {
        assert!(
            hello.limits.cgroup_enforced,
            "limits must be enforced in a delegated subtree with {CONTROLLERS:?}"
        );
        // Sandbox cgroups live in the delegated subtree, owned by the user.
        let base = delegation
            .root
            .join("forkd")
            .join(format!("d{}", daemon.id()));
        assert!(base.is_dir(), "{} missing", base.display());
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&base).unwrap()),
            uid
        );

        let bomb = spawn(
            &mut client,
            "chunks = []\nfor i in range(512):\n    chunks.append(b'\\x01' * (1 << 20))\nprint('survived')",
            Limits {
                memory_bytes: Some(64 * MIB),
                ..Limits::default()
            },
        );
        assert_eq!(
            bomb.killed_by,
            Some(KilledBy::Oom),
            "stdout: {} stderr: {}",
            bomb.stdout_lossy(),
            bomb.stderr_lossy()
        );
        assert_eq!((bomb.exit_code, bomb.signal), (None, Some(9)));
        assert!(bomb.usage.peak_memory_bytes <= 64 * MIB, "{:?}", bomb.usage);

        let forks = spawn(
            &mut client,
            "import os, sys, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept BlockingIOError as e:\n    print(n, e.errno)\n    sys.exit(3)",
            Limits {
                pids: Some(8),
                ..Limits::default()
            },
        );
        assert_eq!(
            (forks.stdout_lossy().as_str(), forks.exit_code),
            ("7 11\n", Some(3)),
            "stderr: {}",
            forks.stderr_lossy()
        );
        assert_eq!(forks.killed_by, Some(KilledBy::Pids));
        println!("delegated cgroup v2: limits enforced (OOM kill and pids limit reported)");
    } else {
        assert!(
            !hello.limits.cgroup_enforced,
            "{} lacks controllers: limits must be reported as not enforced",
            mount.display()
        );
        println!(
            "{} has none of {CONTROLLERS:?} to delegate (cgroup v1 host): checked that limits are reported as not enforced; tests/vm/cgroup-v2-vm.sh checks enforcement",
            mount.display()
        );
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status =
        wait_timeout(&mut daemon, Duration::from_secs(20)).expect("daemon exits after SIGTERM");
    assert!(status.success(), "daemon exit status {status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_of(uid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        processes_of(uid).is_empty(),
        "processes of {USER} left: {:?}",
        processes_of(uid)
    );
    // The daemon removed its own cgroups: only its (empty) parent may stay.
    let left: Vec<PathBuf> = delegation
        .sandbox_cgroups()
        .into_iter()
        .filter(|p| *p != delegation.root.join("forkd"))
        .collect();
    assert!(
        left.is_empty(),
        "cgroups left in the delegated subtree: {left:?}"
    );
}
