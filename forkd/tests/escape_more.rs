//! More escape attempts from inside a sandbox, each asserting the errno (or
//! outcome) it got: processes, privilege, network, resources, cross-sandbox
//! and the daemon's own socket. (The first set is in `escapes.rs`.)

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// Runs `attempts` (Python defining `R[name] = ...` through `op`) in a
/// sandbox and returns name → outcome ("ok:<value>" or "errno:<NAME>").
async fn attempt(
    d: &TestDaemon,
    attempts: &str,
    limits: impl FnOnce(&mut forkd_ipc::SpawnRequest),
) -> BTreeMap<String, String> {
    let code = format!(
        r#"
import errno, json, os, socket, ctypes, resource, signal, sys
R = {{}}
libc = ctypes.CDLL(None, use_errno=True)
def op(f):
    try:
        return "ok:" + str(f())
    except OSError as e:
        return "errno:" + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
    except Exception as e:
        return "exc:" + type(e).__name__
def sc(*args):
    r = libc.syscall(*args)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
{attempts}
print(json.dumps(R))
"#
    );
    let mut r = req(&code);
    limits(&mut r);
    let res = d.spawn(&r).await.expect("spawn");
    assert_eq!(
        res.exit_code,
        Some(0),
        "probe failed: {}",
        res.stderr_lossy()
    );
    serde_json::from_slice(&res.stdout).expect("probe output is JSON")
}

fn check(table: &BTreeMap<String, String>, expected: &[(&str, &[&str])]) {
    let mut failed = Vec::new();
    println!("{:<34} {:<38} got", "attempt", "expected");
    for (name, want) in expected {
        let got = table.get(*name).map(String::as_str).unwrap_or("<missing>");
        let ok = want.contains(&got);
        println!(
            "{name:<34} {:<38} {got}{}",
            want.join(" | "),
            if ok { "" } else { "   <-- FAIL" }
        );
        if !ok {
            failed.push(*name);
        }
    }
    assert!(
        failed.is_empty(),
        "escape attempts that did not fail as expected: {failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_privileges_network_and_the_daemon_socket() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let daemon_pid = std::process::id();
    let zygote_pid = d.zygote_pid().await;
    let socket = d.socket.display().to_string();
    let attempts = format!(
        r#"
R["kill the daemon (host pid)"] = op(lambda: os.kill({daemon_pid}, signal.SIGKILL))
R["kill the zygote (host pid)"] = op(lambda: os.kill({zygote_pid}, signal.SIGKILL))
R["kill every process (-1)"] = op(lambda: os.kill(-1, signal.SIGKILL) or "sent")
R["ptrace attach pid 1"] = op(lambda: sc(101, 16, 1, 0, 0))
R["process_vm_readv"] = op(lambda: sc(310, 1, 0, 0, 0, 0, 0))
R["read /proc/1/environ of host"] = op(lambda: open("/proc/{daemon_pid}/environ", "rb").read())
R["setuid(1000) then back"] = op(lambda: (os.setuid(1000), os.setuid(0)))
R["setns into host netns"] = op(lambda: sc(308, os.open("/proc/1/ns/net", os.O_RDONLY), 0))
R["unshare user namespace"] = op(lambda: sc(272, 0x10000000))
R["clone with CLONE_NEWUSER"] = op(lambda: sc(56, 0x10000000 | 17, 0, 0, 0, 0))
R["perf_event_open"] = op(lambda: sc(298, 0, 0, -1, -1, 0))
R["userfaultfd"] = op(lambda: sc(323, 0))
R["init_module"] = op(lambda: sc(175, 0, 0, 0))
R["finit_module"] = op(lambda: sc(313, 0, 0, 0))
R["kexec_load"] = op(lambda: sc(246, 0, 0, 0, 0))
R["reboot"] = op(lambda: sc(169, 0xfee1dead, 672274793, 0x1234567, 0))
R["add_key"] = op(lambda: sc(248, b"user", b"k", b"v", 1, -4))
R["request_key"] = op(lambda: sc(249, b"user", b"k", 0, -4))
R["io_uring_setup"] = op(lambda: sc(425, 1, ctypes.byref(ctypes.create_string_buffer(120))))
R["mknod a device"] = op(lambda: os.mknod("/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0)))
import subprocess
R["capabilities after execve as uid 0"] = op(lambda: subprocess.check_output(["/bin/grep", "-E", "CapEff|CapPrm", "/proc/self/status"]).decode().split()[1::2])
R["settimeofday"] = op(lambda: sc(164, 0, 0))
R["sethostname"] = op(lambda: sc(170, b"evil", 4))
R["raw socket"] = op(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
R["packet socket"] = op(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
R["connect the forkd socket"] = op(lambda: socket.socket(socket.AF_UNIX).connect({socket:?}))
R["connect /run/forkd/forkd.sock"] = op(lambda: socket.socket(socket.AF_UNIX).connect("/run/forkd/forkd.sock"))
R["connect docker.sock"] = op(lambda: socket.socket(socket.AF_UNIX).connect("/var/run/docker.sock"))
R["mount proc elsewhere"] = op(lambda: sc(165, b"proc", b"/tmp", b"proc", 0, None))
R["remount / read-write"] = op(lambda: sc(165, None, b"/", None, 32, None))
R["chmod setuid in scratch"] = op(lambda: (open("/tmp/s", "w").close(), os.chmod("/tmp/s", 0o4755), oct(os.stat("/tmp/s").st_mode))[2])
"#
    );
    let t = attempt(&d, &attempts, |_| {}).await;
    check(
        &t,
        &[
            ("kill the daemon (host pid)", &["errno:ESRCH"]),
            ("kill the zygote (host pid)", &["errno:ESRCH"]),
            // Only the sandbox itself is there to receive it (and pid 1 ignores it).
            ("kill every process (-1)", &["ok:sent", "errno:ESRCH"]),
            ("ptrace attach pid 1", &["errno:EPERM"]),
            ("process_vm_readv", &["errno:EPERM"]),
            ("read /proc/1/environ of host", &["errno:ENOENT"]),
            ("setuid(1000) then back", &["errno:EPERM"]),
            ("setns into host netns", &["errno:EPERM"]),
            ("unshare user namespace", &["errno:EPERM"]),
            ("clone with CLONE_NEWUSER", &["errno:EPERM"]),
            ("perf_event_open", &["errno:EPERM"]),
            ("userfaultfd", &["errno:EPERM"]),
            ("init_module", &["errno:EPERM"]),
            ("finit_module", &["errno:EPERM"]),
            ("kexec_load", &["errno:EPERM"]),
            ("reboot", &["errno:EPERM"]),
            ("add_key", &["errno:EPERM"]),
            ("request_key", &["errno:EPERM"]),
            ("io_uring_setup", &["errno:EPERM"]),
            ("mknod a device", &["errno:EPERM"]),
            // uid 0 normally gains every capability at execve; here the
            // bounding set is empty and NOROOT is locked.
            (
                "capabilities after execve as uid 0",
                &["ok:['0000000000000000', '0000000000000000']"],
            ),
            ("settimeofday", &["errno:EPERM"]),
            ("sethostname", &["errno:EPERM"]),
            ("raw socket", &["errno:EPERM"]),
            ("packet socket", &["errno:EPERM"]),
            (
                "connect the forkd socket",
                &["errno:ENOENT", "errno:EACCES"],
            ),
            ("connect /run/forkd/forkd.sock", &["errno:ENOENT"]),
            ("connect docker.sock", &["errno:ENOENT"]),
            ("mount proc elsewhere", &["errno:EPERM"]),
            ("remount / read-write", &["errno:EPERM"]),
            // nosuid on the scratch mount: the bit may be set but never honoured.
            ("chmod setuid in scratch", &["ok:0o104755", "errno:EPERM"]),
        ],
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhaustion_is_contained() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let attempts = r#"
def fill():
    chunk = b"x" * (1 << 20)
    n = 0
    while True:
        # Files below RLIMIT_FSIZE: the tmpfs size is what must stop this.
        with open("/tmp/fill%d" % n, "wb") as f:
            for _ in range(4):
                f.write(chunk)
                f.flush()
        n += 1
R["fill the scratch tmpfs"] = op(fill)
for name in os.listdir("/tmp"):
    if name.startswith("fill"):
        os.unlink("/tmp/" + name)
def fds():
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    finally:
        for fd in held:
            os.close(fd)
R["exhaust file descriptors"] = op(fds)
def big_file():
    with open("/tmp/big", "wb") as f:
        f.write(b"y" * (9 << 20))
R["write past RLIMIT_FSIZE"] = op(big_file)
R["raise RLIMIT_NOFILE hard"] = op(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20)))
R["huge argv to exec"] = op(lambda: os.execv("/bin/true", ["true"] + ["a" * 131072] * 200))
"#;
    let t = attempt(&d, attempts, |r| {
        r.limits.scratch_bytes = Some(8 << 20);
        r.limits.file_size_bytes = Some(8 << 20);
        r.limits.open_files = Some(64);
    })
    .await;
    check(
        &t,
        &[
            ("fill the scratch tmpfs", &["errno:ENOSPC"]),
            ("exhaust file descriptors", &["errno:EMFILE"]),
            ("write past RLIMIT_FSIZE", &["errno:EFBIG"]),
            (
                "raise RLIMIT_NOFILE hard",
                &["exc:ValueError", "errno:EPERM"],
            ),
            ("huge argv to exec", &["errno:E2BIG"]),
        ],
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_cannot_reach_each_other() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let client = d.client().await;
    // A: an abstract unix socket, a SysV shared-memory segment, a file in
    // /dev/shm and a loopback TCP listener; it reports their names and waits.
    let a_code = r#"
import os, socket, ctypes, time, sys
libc = ctypes.CDLL(None, use_errno=True)
u = socket.socket(socket.AF_UNIX); u.bind("\0forkd-it-abstract"); u.listen()
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen(); port = t.getsockname()[1]
key = 0x0f0dd
shm = libc.shmget(key, 4096, 0o1666)
open("/dev/shm/forkd-it-shared", "w").write("secret")
print(port, shm, flush=True)
time.sleep(4)
"#;
    let mut a_req = req(a_code);
    a_req.timeout_ms = Some(10_000);
    let a_client = client.clone();
    let a = tokio::spawn(async move { a_client.spawn(&a_req).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let attempts = r#"
R["connect A's abstract socket"] = op(lambda: socket.socket(socket.AF_UNIX).connect("\0forkd-it-abstract"))
def attach():
    r = libc.shmget(0x0f0dd, 4096, 0o666)
    if r == -1:
        raise OSError(ctypes.get_errno(), "shmget")
    return r
R["open A's SysV shm"] = op(attach)
R["read A's /dev/shm file"] = op(lambda: open("/dev/shm/forkd-it-shared").read())
R["list /dev/shm"] = op(lambda: sorted(os.listdir("/dev/shm")))
"#;
    let t = attempt(&d, attempts, |_| {}).await;
    check(
        &t,
        &[
            (
                "connect A's abstract socket",
                &["errno:ECONNREFUSED", "errno:EPERM"],
            ),
            ("open A's SysV shm", &["errno:ENOENT"]),
            ("read A's /dev/shm file", &["errno:ENOENT"]),
            ("list /dev/shm", &["ok:[]"]),
        ],
    );
    let a = a.await.unwrap().unwrap();
    assert_eq!(a.exit_code, Some(0), "A failed: {}", a.stderr_lossy());
    let port: u16 = a
        .stdout_lossy()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(port > 0);
    drop(client);
    d.finish().await;
}
