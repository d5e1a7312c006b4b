//! The escape classes an outside review got through (issue 19), each
//! attempted from inside a real sandbox, asserting the failure, with a
//! bystander sandbox that keeps working while the attempt runs.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// Python prelude: `op(f)` gives "ok:<value>" or "errno:<NAME>"; `sc(nr, ...)`
/// is a raw system call.
const PRELUDE: &str = r#"
import errno, json, os, socket, ctypes, fcntl, time, sys
R = {}
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def op(f):
    try:
        return "ok:" + str(f())
    except OSError as e:
        return "errno:" + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
    except Exception as e:
        return "exc:" + type(e).__name__
def sc(*args):
    r = libc.syscall(*[ctypes.c_long(a) for a in args])
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
"#;

fn probe(attempts: &str) -> SpawnRequest {
    req(&format!("{PRELUDE}\n{attempts}\nprint(json.dumps(R))\n"))
}

fn table(res: &SpawnResult) -> BTreeMap<String, String> {
    assert_eq!(
        res.exit_code,
        Some(0),
        "probe failed: {}",
        res.stderr_lossy()
    );
    serde_json::from_slice(&res.stdout).expect("probe output is JSON")
}

fn check(title: &str, got: &BTreeMap<String, String>, expected: &[(&str, &[&str])]) {
    let mut t = Table::new();
    for (name, want) in expected {
        let g = got.get(*name).map(String::as_str).unwrap_or("<missing>");
        t.check(name, g, want);
    }
    t.assert_all(title);
}

/// A numpy run in another sandbox while an attempt runs: must give the
/// right answer.
const BYSTANDER: &str = "import numpy as np; print(int(np.arange(1000).sum()))";

async fn bystander_ok(d: &TestDaemon) {
    let r = d.run(BYSTANDER).await;
    assert_eq!(
        (r.exit_code, r.stdout_lossy().trim()),
        (Some(0), "499500"),
        "bystander failed: {}",
        r.stderr_lossy()
    );
}

/// A directory outside /tmp that the test owns, world-readable, so a zygote
/// with it on PYTHONPATH binds it into every sandbox.
fn fixture_dir(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("escapes-outside-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn with_pythonpath(dir: &Path) -> impl FnOnce(&mut forkd::Config) + '_ {
    move |c| {
        c.zygotes[0]
            .env
            .insert("PYTHONPATH".into(), dir.display().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_runs_as_its_own_unprivileged_uid() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let fixture = fixture_dir("uid");
    let secret = fixture.join("root-only");
    std::fs::write(&secret, "host secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let private_dir = fixture.join("root-dir");
    std::fs::create_dir_all(&private_dir).unwrap();
    std::fs::set_permissions(&private_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let public = fixture.join("public");
    std::fs::write(&public, "public").unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();

    let d = TestDaemon::start(with_pythonpath(&fixture)).await;
    let code = format!(
        r#"
R["uid"] = op(lambda: os.getuid())
R["ids"] = op(lambda: (os.getresuid(), os.getresgid(), os.getgroups()))
R["scratch owners"] = op(lambda: sorted({{os.stat(p).st_uid for p in ("/tmp", "/dev/shm", ".")}}))
R["scratch mode"] = op(lambda: oct(os.stat("/tmp").st_mode & 0o7777))
R["read root-owned 0600 file"] = op(lambda: open({secret:?}).read())
R["read world-readable file"] = op(lambda: open({public:?}).read())
R["list a root-owned 0700 directory"] = op(lambda: os.listdir({private_dir:?}))
R["setuid(0)"] = op(lambda: os.setuid(0))
R["own /proc/self/status"] = op(lambda: "Uid" in open("/proc/self/status").read())
time.sleep(1.0)  # overlap with the other sandbox
"#
    );
    let req = probe(&code);
    let (a, b, _) = tokio::join!(d.spawn(&req), d.spawn(&req), bystander_ok(&d));
    let (a, b) = (table(&a.unwrap()), table(&b.unwrap()));
    let uid_of = |t: &BTreeMap<String, String>| -> u32 {
        t["uid"].strip_prefix("ok:").unwrap().parse().unwrap()
    };
    let (ua, ub) = (uid_of(&a), uid_of(&b));
    let range = forkd_pool::uids::DEFAULT_BASE
        ..forkd_pool::uids::DEFAULT_BASE + forkd_pool::uids::DEFAULT_COUNT;
    assert!(range.contains(&ua) && range.contains(&ub), "{ua} {ub}");
    assert_ne!(ua, ub, "two live sandboxes share a uid");
    let ids = format!("ok:(({ua}, {ua}, {ua}), ({ua}, {ua}, {ua}), [])");
    let owners = format!("ok:[{ua}]");
    check(
        "own uid",
        &a,
        &[
            ("ids", &[ids.as_str()]),
            ("scratch owners", &[owners.as_str()]),
            ("scratch mode", &["ok:0o700"]),
            ("read root-owned 0600 file", &["errno:EACCES"]),
            ("read world-readable file", &["ok:public"]),
            ("list a root-owned 0700 directory", &["errno:EACCES"]),
            ("setuid(0)", &["errno:EPERM"]),
            ("own /proc/self/status", &["ok:True"]),
        ],
    );
    d.finish().await;
    let _ = std::fs::remove_dir_all(&fixture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_kernel_budgets_do_not_reach_other_sandboxes() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    // A takes its whole unprivileged pipe-buffer budget (pipe-user-pages-soft,
    // counted per user), then holds it. (POSIX message queues, the other
    // per-user budget a sandbox could reach, are outside the allow-list.)
    let hog = probe(
        r#"
class Attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long), ("cur", ctypes.c_long), ("pad", ctypes.c_long * 4)]
libc.mq_open.restype = ctypes.c_int
def exhaust_pipes():
    pipes = []
    while True:
        r, w = os.pipe()
        pipes.append((r, w))
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError as e:
            return len(pipes), errno.errorcode[e.errno], pipes
def exhaust_mqueues():
    n = 0
    attr = Attr(0, 10, 8192, 0)
    while True:
        fd = libc.mq_open(b"/q%d" % n, os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(attr))
        if fd == -1:
            return n, errno.errorcode[ctypes.get_errno()]
        n += 1
n, err, held = exhaust_pipes()
R["pipes sized to 1 MiB before refusal"] = "n>=32" if n >= 32 else "n=%d" % n
R["pipe budget exhausted"] = "errno:" + err
m, err = exhaust_mqueues()
R["POSIX message queue (not allowed)"] = "n=%d errno:%s" % (m, err)
open("/tmp/hog-ready", "w").close()
time.sleep(3)
"#,
    );
    let victim = probe(
        r#"
r, w = os.pipe()
R["bystander pipe to 1 MiB"] = op(lambda: fcntl.fcntl(w, 1031, 1 << 20))
R["bystander pipe holds 1 MiB"] = op(lambda: (os.set_blocking(w, False), os.write(w, b"x" * (1 << 20)))[1])
"#,
    );
    let hog_run = d.spawn(&hog);
    let later = async {
        d.wait_for_scratch_file("hog-ready", Duration::from_secs(20))
            .await;
        let v = d.spawn(&victim).await.unwrap();
        bystander_ok(&d).await;
        v
    };
    let (h, v) = tokio::join!(hog_run, later);
    check(
        "the hog exhausted its own budgets",
        &table(&h.unwrap()),
        &[
            ("pipes sized to 1 MiB before refusal", &["n>=32"]),
            ("pipe budget exhausted", &["errno:EPERM"]),
            ("POSIX message queue (not allowed)", &["n=0 errno:ENOSYS"]),
        ],
    );
    check(
        "a bystander sandbox keeps its budgets",
        &table(&v),
        &[
            ("bystander pipe to 1 MiB", &["ok:1048576"]),
            ("bystander pipe holds 1 MiB", &["ok:1048576"]),
        ],
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_information_in_proc_is_masked() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let masked = [
        "keys",
        "key-users",
        "kallsyms",
        "cmdline",
        "locks",
        "sched_debug",
    ];
    // Root-only: closed by the sandbox's own uid, no mask needed.
    let root_only = ["kcore", "kmsg", "slabinfo", "timer_list", "vmallocinfo"];
    let mut code = String::new();
    for f in masked.iter().chain(&root_only) {
        code.push_str(&format!(
            "R[{f:?}] = op(lambda: len(open('/proc/{f}', 'rb').read()))\n"
        ));
    }
    code.push_str(
        r#"
R["write sysrq-trigger"] = op(lambda: open("/proc/sysrq-trigger", "w").write("h"))
R["cpuinfo (kept)"] = op(lambda: len(open("/proc/cpuinfo").read()) > 0)
R["meminfo (kept)"] = op(lambda: "MemTotal" in open("/proc/meminfo").read())
R["own status (kept)"] = op(lambda: "Pid:\t1" in open("/proc/self/status").read())
"#,
    );
    let req = probe(&code);
    let (res, _) = tokio::join!(d.spawn(&req), bystander_ok(&d));
    let got = table(&res.unwrap());
    let mut expected: Vec<(&str, &[&str])> = masked
        .iter()
        .map(|f| (*f, &["ok:0", "errno:ENOENT"][..]))
        .chain(
            root_only
                .iter()
                .map(|f| (*f, &["errno:EACCES", "errno:ENOENT"][..])),
        )
        .collect();
    // Masked with /dev/null, and landlock grants /proc read-only; ENOENT
    // where the kernel has no magic SysRq.
    expected.push((
        "write sysrq-trigger",
        &[
            "errno:EACCES",
            "errno:EROFS",
            "errno:EPERM",
            "errno:ENOENT",
            "ok:1",
        ],
    ));
    expected.push(("cpuinfo (kept)", &["ok:True"]));
    expected.push(("meminfo (kept)", &["ok:True"]));
    expected.push(("own status (kept)", &["ok:True"]));
    check("/proc host information", &got, &expected);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_families_and_calls_outside_the_allow_list_fail() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let fixture = fixture_dir("lease");
    let owned = fixture.join("shared-file");
    std::fs::write(&owned, "shared").unwrap();
    std::fs::set_permissions(&owned, std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = TestDaemon::start(with_pythonpath(&fixture)).await;
    let code = format!(
        r#"
import mmap
def sock(fam, typ, proto=0):
    s = socket.socket(fam, typ, proto); s.close(); return "made"
R["AF_VSOCK (hypervisor)"] = op(lambda: sock(40, socket.SOCK_STREAM))
R["AF_PACKET"] = op(lambda: sock(17, socket.SOCK_RAW))
R["AF_ALG"] = op(lambda: sock(38, socket.SOCK_SEQPACKET))
R["AF_BLUETOOTH"] = op(lambda: sock(31, socket.SOCK_STREAM))
R["netlink uevent"] = op(lambda: sock(16, socket.SOCK_DGRAM, 15))
R["netlink audit"] = op(lambda: sock(16, socket.SOCK_RAW, 9))
R["netlink sock_diag"] = op(lambda: sock(16, socket.SOCK_DGRAM, 4))
R["netlink route (allowed)"] = op(lambda: sock(16, socket.SOCK_DGRAM, 0))
R["AF_INET6 tcp (allowed)"] = op(lambda: sock(socket.AF_INET6, socket.SOCK_STREAM))
R["modify_ldt"] = op(lambda: sc(154, 0, 0, 0))
R["memfd_secret"] = op(lambda: sc(447, 0))
R["inotify_init1"] = op(lambda: sc(294, 0))
R["listmount (newest mount API)"] = op(lambda: sc(458, 0, 0, 0, 0))
R["open_tree_attr"] = op(lambda: sc(467, 0, 0, 0, 0, 0))
R["unassigned number 1000"] = op(lambda: sc(1000))
R["io_setup (host-wide aio budget)"] = op(lambda: sc(206, 1, ctypes.addressof(ctypes.c_ulong(0))))
R["clone3"] = op(lambda: sc(435, 0, 0))
def i386_getpid():
    # mov eax, 20 (getpid in the i386 table); int 0x80; ret  -> eax
    code = bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3])
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    r = ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
    return r
R["i386 int 0x80 getpid"] = op(i386_getpid)
f = open({owned:?})
R["lease on a shared bound file"] = op(lambda: fcntl.fcntl(f, 1024, fcntl.F_RDLCK))
d = os.open("/usr", os.O_RDONLY)
R["dnotify on /usr"] = op(lambda: fcntl.fcntl(d, 1026, 0x80000001))
R["ioctl FS_IOC_GETFLAGS"] = op(lambda: fcntl.ioctl(f, 0x80086601, b"\0" * 8))
R["flock in scratch (allowed)"] = op(lambda: fcntl.flock(open("/tmp/l", "w"), fcntl.LOCK_EX))
R["isatty on a pipe (allowed call)"] = op(lambda: os.isatty(1))
"#
    );
    let req = probe(&code);
    let (res, _) = tokio::join!(d.spawn(&req), bystander_ok(&d));
    check(
        "calls and families outside the allow-list",
        &table(&res.unwrap()),
        &[
            ("AF_VSOCK (hypervisor)", &["errno:EPERM"]),
            ("AF_PACKET", &["errno:EPERM"]),
            ("AF_ALG", &["errno:EPERM"]),
            ("AF_BLUETOOTH", &["errno:EPERM"]),
            ("netlink uevent", &["errno:EPERM"]),
            ("netlink audit", &["errno:EPERM"]),
            ("netlink sock_diag", &["errno:EPERM"]),
            ("netlink route (allowed)", &["ok:made"]),
            ("AF_INET6 tcp (allowed)", &["ok:made"]),
            ("modify_ldt", &["errno:EPERM"]),
            ("memfd_secret", &["errno:EPERM"]),
            ("inotify_init1", &["errno:EPERM"]),
            ("listmount (newest mount API)", &["errno:ENOSYS"]),
            ("open_tree_attr", &["errno:ENOSYS"]),
            ("unassigned number 1000", &["errno:ENOSYS"]),
            ("io_setup (host-wide aio budget)", &["errno:ENOSYS"]),
            ("clone3", &["errno:ENOSYS"]),
            ("i386 int 0x80 getpid", &["ok:-38"]),
            ("lease on a shared bound file", &["errno:EPERM"]),
            ("dnotify on /usr", &["errno:EPERM"]),
            ("ioctl FS_IOC_GETFLAGS", &["errno:ENOTTY"]),
            ("flock in scratch (allowed)", &["ok:None"]),
            ("isatty on a pipe (allowed call)", &["ok:False"]),
        ],
    );
    d.finish().await;
    let _ = std::fs::remove_dir_all(&fixture);
}

/// A socket or FIFO inside a bound interpreter tree (here a sys.path entry)
/// would let a sandbox reach a host process: the daemon refuses to start and
/// names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_trees_with_sockets_or_fifos_refuse_to_start() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    for kind in ["socket", "FIFO"] {
        let fixture = fixture_dir(&format!("special-{kind}"));
        let nested = fixture.join("pkg");
        std::fs::create_dir_all(&nested).unwrap();
        let path = nested.join("ctl");
        let _listener = if kind == "socket" {
            Some(std::os::unix::net::UnixListener::bind(&path).unwrap())
        } else {
            let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
            None
        };
        let (err, attempt) = match TestDaemon::try_start(None, with_pythonpath(&fixture)).await {
            Ok(_) => panic!("started with a {kind} in a bound tree"),
            Err(e) => e,
        };
        let msg = err.to_string();
        println!("{msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(msg.contains(kind), "{msg}");
        attempt.assert_no_leaks().await;
        let _ = std::fs::remove_dir_all(&fixture);
    }
}

/// The memory cgroup directory (v1) of process `pid`.
fn v1_memory_dir(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctl, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctl.split(',')
            .any(|c| c == "memory")
            .then(|| Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')))
    })
}

/// Kernel memory in TCP socket buffers counts against the sandbox: on v1 the
/// sandbox's `memory.kmem.tcp` limit (a quarter of its memory limit) stops
/// it queueing more (18 MiB queued here); without it this sandbox held
/// 224 MiB in loopback buffers outside its 64 MiB limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_buffers_are_charged_to_the_sandbox() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let v1 = d.daemon.cgroups.mode() == forkd_cgroup::Mode::V1;
    let mut hog = probe(
        r#"
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(128)
held, total, chunk = [], 0, b"x" * 65536
for i in range(60):
    c = socket.create_connection(srv.getsockname()); a, _ = srv.accept()
    c.setblocking(False)
    held.append((c, a))
    while True:
        try:
            total += c.send(chunk)
        except BlockingIOError:
            break
R["queued MiB"] = str(total >> 20)
open("/tmp/tcp-ready", "w").close()
time.sleep(2)
"#,
    );
    hog.limits.memory_bytes = Some(64 * MIB);
    if !v1 {
        // v2 charges socket buffers to memory.current: the sandbox stays
        // under its limit, or is OOM-killed trying.
        let (h, _) = tokio::join!(d.spawn(&hog), bystander_ok(&d));
        let h = h.unwrap();
        println!(
            "v2: exit {:?} killed_by {:?} stdout {} stderr {}",
            h.exit_code,
            h.killed_by,
            h.stdout_lossy(),
            h.stderr_lossy()
        );
        if h.killed_by != Some(KilledBy::Oom) {
            let got = table(&h);
            let queued: u64 = got["queued MiB"].parse().unwrap();
            assert!(
                queued < 64,
                "queued {queued} MiB of TCP buffers past a 64 MiB limit"
            );
        }
        d.finish().await;
        return;
    }
    let hog_run = d.spawn(&hog);
    let observe = async {
        let found = d
            .wait_for_scratch_file("tcp-ready", Duration::from_secs(30))
            .await;
        let read = |dir: &Path, f: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let seen = found.iter().find_map(|(pid, _)| {
            let dir = v1_memory_dir(*pid)?;
            Some((
                read(&dir, "memory.kmem.tcp.limit_in_bytes"),
                read(&dir, "memory.kmem.tcp.max_usage_in_bytes"),
                read(&dir, "memory.kmem.tcp.failcnt"),
            ))
        });
        bystander_ok(&d).await;
        seen
    };
    let (h, seen) = tokio::join!(hog_run, observe);
    let got = table(&h.unwrap());
    let queued: u64 = got["queued MiB"].parse().unwrap();
    println!("queued {queued} MiB; v1 tcp (limit, max usage, failcnt): {seen:?}");
    assert!(
        queued < 64,
        "queued {queued} MiB of TCP buffers past a 64 MiB limit"
    );
    let (limit, max_usage, failcnt) = seen.expect("the sandbox's memory cgroup");
    assert_eq!(limit, Some(forkd_cgroup::kmem::v1_tcp_limit(64 * MIB)));
    // The kernel lets in-flight buffers pass the limit (forced charges
    // under pressure), then stops the senders; failcnt is not kept for
    // this counter on recent kernels.
    let (limit, max_usage) = (limit.unwrap(), max_usage.unwrap());
    assert!(
        max_usage >= limit / 2 && max_usage < 2 * limit,
        "TCP buffer peak {max_usage} against limit {limit}"
    );
    let _ = failcnt;
    d.finish().await;
}

/// The repository's default policy, compiled in: the cgroup v2 guest runs
/// this test binary without the source tree.
const DEFAULT_POLICY: &str = include_str!("../../policy/default.toml");

/// Reads the first `size` bytes of `path` with O_DIRECT (the page cache
/// cannot serve it) in 1 MiB page-aligned chunks; records the bytes and
/// seconds taken.
const DIRECT_READ: &str = r#"
import mmap
def direct_read(path, size):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    t, n = time.monotonic(), 0
    while n < size:
        got = os.readv(fd, [buf])
        if got <= 0:
            break
        n += got
    os.close(fd)
    return "%d %.3f" % (n, time.monotonic() - t)
"#;

fn direct_read_secs(res: &SpawnResult, bytes: u64) -> f64 {
    let got = table(res);
    let line = got["read"].strip_prefix("ok:").unwrap_or_else(|| {
        panic!("O_DIRECT read failed: {}", got["read"]);
    });
    let (n, secs) = line.split_once(' ').unwrap();
    assert_eq!(n.parse::<u64>().unwrap(), bytes, "bytes read");
    secs.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_io_of_a_sandbox_is_throttled_on_its_own_budget() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    // Two 16 MiB files in a bound tree (on the disk, not tmpfs): a 4 MiB/s
    // read limit makes each O_DIRECT read take ~4 s. Unthrottled the disk
    // gives them in well under a second.
    const SIZE: u64 = 16 * MIB;
    const LIMIT: u64 = 4 * MIB;
    let fixture = fixture_dir("blkio");
    let (devs, _) = forkd_cgroup::io::backing_devices(std::slice::from_ref(&fixture));
    let ram = Path::new("/dev/ram0");
    let sources: [PathBuf; 2] = if !devs.is_empty() {
        let mut data = vec![0u8; SIZE as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        ["a.bin", "b.bin"].map(|name| {
            let p = fixture.join(name);
            std::fs::write(&p, &data).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            p
        })
    } else if ram.exists() {
        // The cgroup v2 guest's root is in RAM (no disk behind the tree):
        // its init loads brd, and the sandboxes read that block device,
        // bound read-only by a policy that names it.
        std::fs::set_permissions(ram, std::fs::Permissions::from_mode(0o644)).unwrap();
        [ram.to_path_buf(), ram.to_path_buf()]
    } else {
        eprintln!(
            "skipped: no block device behind {} and no /dev/ram0 to read instead",
            fixture.display()
        );
        return;
    };
    let policy = fixture.join("ram0-policy.toml");
    if sources[0] == ram {
        let text = DEFAULT_POLICY.replace(
            r#"devices_ro = ["random", "urandom"]"#,
            r#"devices_ro = ["random", "urandom", "ram0"]"#,
        );
        assert!(
            text.contains("\"ram0\""),
            "the default policy's devices_ro line changed"
        );
        std::fs::write(&policy, text).unwrap();
    }
    let pythonpath = with_pythonpath(&fixture);
    let d = TestDaemon::start(|c| {
        pythonpath(c);
        c.limits.io.read_bps = Some(LIMIT);
        if sources[0] == ram {
            c.policies.insert("default".into(), policy.clone());
            c.limits.io.paths.push(ram.to_path_buf());
        }
    })
    .await;
    let io = d.daemon.cgroups.io_throttle().expect("an I/O throttle");
    assert!(!io.devices.is_empty(), "the source's disk is throttled");

    let read = |src: &Path| {
        let mut r = probe(&format!(
            "{DIRECT_READ}\nR[\"read\"] = op(lambda: direct_read({:?}, {SIZE}))",
            src.display().to_string()
        ));
        r.timeout_ms = Some(60_000);
        r
    };
    let (a, b) = (read(&sources[0]), read(&sources[1]));
    // The attacker and a bystander read at the same time, and a numpy
    // bystander runs meanwhile.
    let (ra, rb, ()) = tokio::join!(d.spawn(&a), d.spawn(&b), bystander_ok(&d));
    let (ta, tb) = (
        direct_read_secs(&ra.unwrap(), SIZE),
        direct_read_secs(&rb.unwrap(), SIZE),
    );
    // The host itself is not throttled: same file, same O_DIRECT reads.
    let host = {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&sources[0])
            .unwrap();
        let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
        // SAFETY: a non-zero-sized layout; freed below with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` points to 1 MiB of initialised (zeroed) memory that
        // nothing else uses until it is freed below.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 1 << 20) };
        let t = std::time::Instant::now();
        let mut n = 0u64;
        while n < SIZE {
            let got = f.read(buf).unwrap();
            if got == 0 {
                break;
            }
            n += got as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        // SAFETY: allocated above with this layout, no reference outlives it.
        unsafe { std::alloc::dealloc(ptr, layout) };
        assert_eq!(n, SIZE);
        secs
    };
    println!("O_DIRECT 16 MiB at a 4 MiB/s limit: sandbox A {ta:.2} s, sandbox B {tb:.2} s; host {host:.3} s");
    let floor = (SIZE / LIMIT) as f64 * 0.6;
    assert!(
        ta >= floor && tb >= floor,
        "reads of {} MiB took {ta:.2} s and {tb:.2} s: not throttled to 4 MiB/s",
        SIZE >> 20
    );
    // Each sandbox has its own budget: sharing one would take ~8 s each.
    assert!(
        ta < 6.5 && tb < 6.5,
        "concurrent sandboxes slowed each other: {ta:.2} s and {tb:.2} s"
    );
    assert!(
        host < floor,
        "the host read took {host:.2} s: the host must not be throttled"
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_on_shared_bound_files_do_not_reach_other_tenants() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    // A file in an interpreter path (bound in every sandbox) and one of the
    // policy's system trees. The host holds an exclusive lock on the first
    // all along.
    let fixture = fixture_dir("flock");
    let shared = fixture.join("shared.txt");
    std::fs::write(&shared, "shared").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let host_file = std::fs::File::open(&shared).unwrap();
    // SAFETY: flock(2) on a descriptor this test owns; no memory is passed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&host_file), libc::LOCK_EX) };
    assert_eq!(rc, 0, "the host's own lock");
    // The default policy's: every sandbox covers the bound trees with its
    // own overlays and /etc with one over copies (branches too).
    assert!(
        DEFAULT_POLICY.contains("\nprivate_locks = true"),
        "the default policy no longer turns private_locks on"
    );
    let pythonpath = with_pythonpath(&fixture);
    let d = TestDaemon::start(pythonpath).await;

    // A bound interpreter file, a /usr file, and two /etc entries (a file
    // and one inside a directory entry).
    let in_etc_dir = [
        "/etc/ssl/openssl.cnf",
        "/etc/python3.11/sitecustomize.py",
        "/etc/fonts/fonts.conf",
    ]
    .into_iter()
    .find(|f| Path::new(f).is_file())
    .expect("a file in one of the policy's /etc directory entries");
    let etc_files = ["/etc/ld.so.cache", in_etc_dir];
    assert!(Path::new(etc_files[0]).is_file(), "no /etc/ld.so.cache");
    let files = format!(
        "FILES = [{:?}, \"/usr/bin/env\", \"{}\", \"{}\"]",
        shared.display().to_string(),
        etc_files[0],
        etc_files[1]
    );
    let mut holder = probe(&format!(
        r#"{files}
held = [open(f, "rb") for f in FILES]
R["holder ex"] = op(lambda: [fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB) for h in held[1:]] and "held")
# Inside one sandbox a lock still excludes: a second open of the same file.
R["own second fd"] = op(lambda: fcntl.flock(open(FILES[1], "rb"), fcntl.LOCK_SH | fcntl.LOCK_NB))
open("/tmp/locked", "w").close()
# Hold them until the test has seen the other tenant's attempts.
deadline = time.monotonic() + 120
while not os.path.exists("/tmp/release") and time.monotonic() < deadline:
    time.sleep(0.05)
R["released"] = str(os.path.exists("/tmp/release"))
"#
    ));
    holder.timeout_ms = Some(150_000);
    let (h, r) = {
        let mut hold = std::pin::pin!(d.spawn(&holder));
        // A holder that ends before taking its locks says why.
        let found = tokio::select! {
            h = &mut hold => panic!("the holder ended before taking its locks: {h:?}"),
            found = d.wait_for_scratch_file("locked", Duration::from_secs(90)) => found,
        };
        let other = async {
            let r = d
            .spawn(&probe(&format!(
                r#"{files}
for name, f in zip(("bound file locked by the host", "/usr file locked by another sandbox", "/etc file locked by another sandbox", "/etc directory entry's file locked by another sandbox"), FILES):
    R[name] = op(lambda: fcntl.flock(open(f, "rb"), fcntl.LOCK_SH | fcntl.LOCK_NB))
    R[name + ", exclusive"] = op(lambda: fcntl.flock(open(f, "rb"), fcntl.LOCK_EX | fcntl.LOCK_NB))
# Locks on the sandbox's own scratch files keep working between its processes.
fd = open("/tmp/mine", "w")
fcntl.flock(fd, fcntl.LOCK_EX)
R["scratch lock from a child"] = op(lambda: os.waitstatus_to_exitcode(os.system("python3 -c 'import fcntl; fcntl.flock(open(\"/tmp/mine\"), fcntl.LOCK_EX | fcntl.LOCK_NB)' 2>/dev/null")))
"#
            )))
            .await
            .unwrap();
            bystander_ok(&d).await;
            r
        };
        let r = table(&other.await);
        // The host's own locks on the files the holder locked inside.
        for f in ["/usr/bin/env", etc_files[0], etc_files[1]] {
            let file = std::fs::File::open(f).unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            // SAFETY: flock(2) on a descriptor this test owns.
            let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
            assert_eq!(
                rc,
                0,
                "the host could not lock {f} while a sandbox held it: {}",
                std::io::Error::last_os_error()
            );
        }
        for (pid, _) in &found {
            let _ = std::fs::write(format!("/proc/{pid}/root/tmp/release"), "");
        }
        let h = table(&hold.await.unwrap());
        (h, r)
    };
    check(
        "holder",
        &h,
        &[
            ("holder ex", &["ok:held"]),
            ("own second fd", &["errno:EAGAIN"]),
            ("released", &["True"]),
        ],
    );
    check(
        "other tenant",
        &r,
        &[
            ("bound file locked by the host", &["ok:None"]),
            ("bound file locked by the host, exclusive", &["ok:None"]),
            ("/usr file locked by another sandbox", &["ok:None"]),
            (
                "/usr file locked by another sandbox, exclusive",
                &["ok:None"],
            ),
            ("/etc file locked by another sandbox", &["ok:None"]),
            (
                "/etc file locked by another sandbox, exclusive",
                &["ok:None"],
            ),
            (
                "/etc directory entry's file locked by another sandbox",
                &["ok:None"],
            ),
            (
                "/etc directory entry's file locked by another sandbox, exclusive",
                &["ok:None"],
            ),
            ("scratch lock from a child", &["ok:1"]),
        ],
    );
    drop(host_file);
    d.finish().await;
}

/// Policy `cgroup_view` (on in the shipped policy): a sandbox sees its own
/// cgroup at the host's cgroup mount points, so cgroup-aware code reads its
/// memory limit, and nothing more: no other cgroup is in the view, no v1
/// `release_agent`, and nothing in it can be written, created or remounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cgroup_view_is_the_sandboxs_own_cgroup_read_only() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let code = r#"
v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
mem = "/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory"
limit = mem + ("/memory.max" if v2 else "/memory.limit_in_bytes")
R["limit"] = op(lambda: open(limit).read().strip())
R["usage readable"] = op(lambda: int(open(mem + ("/memory.current" if v2 else "/memory.usage_in_bytes")).read()) > 0)
R["own cgroup is the root"] = op(lambda: all(l.split(":", 2)[2] == "/" for l in open("/proc/self/cgroup").read().splitlines()))
R["no other cgroup listed"] = op(lambda: [n for n in os.listdir(mem) if os.path.isdir(os.path.join(mem, n))])
R["release_agent"] = op(lambda: open(mem + "/release_agent").read())
R["write limit"] = op(lambda: open(limit, "w").write("max\n"))
R["write cgroup.procs"] = op(lambda: open(mem + "/cgroup.procs", "w").write("1\n"))
R["mkdir child cgroup"] = op(lambda: os.mkdir(mem + "/escape"))
def mount(src, target, fstype, flags, data):
    if libc.mount(src, target, fstype, ctypes.c_ulong(flags), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return 0
MS_REMOUNT, MS_BIND = 0x20, 0x1000
R["remount rw"] = op(lambda: mount(None, mem.encode(), None, MS_REMOUNT | MS_BIND, None))
fs = b"cgroup2" if v2 else b"cgroup"
R["mount the hierarchy again"] = op(lambda: mount(fs, b"/tmp", fs, 0, None if v2 else b"memory"))
R["limit after"] = op(lambda: open(limit).read().strip())
"#;
    let mut r = probe(code);
    r.limits.memory_bytes = Some(300 * MIB);
    let (res, _) = tokio::join!(d.spawn(&r), bystander_ok(&d));
    let got = table(&res.unwrap());
    let limit = format!("ok:{}", 300 * MIB);
    let limit: &[&str] = &[limit.as_str()];
    let denied: &[&str] = &["errno:EROFS", "errno:EACCES", "errno:EPERM"];
    let expected: Vec<(&str, &[&str])> = vec![
        ("limit", limit),
        ("usage readable", &["ok:True"]),
        ("own cgroup is the root", &["ok:True"]),
        ("no other cgroup listed", &["ok:[]"]),
        ("release_agent", &["errno:ENOENT"]),
        ("write limit", denied),
        ("write cgroup.procs", denied),
        ("mkdir child cgroup", denied),
        ("remount rw", &["errno:EPERM", "errno:ENOSYS"]),
        (
            "mount the hierarchy again",
            &["errno:EPERM", "errno:ENOSYS"],
        ),
        ("limit after", limit),
    ];
    check("the cgroup view", &got, &expected);
    d.finish().await;
}
