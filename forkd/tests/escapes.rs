//! Escape attempts from inside a sandbox. Each probe runs in the sandbox and
//! reports exactly what it got (an errno name, an exception, or `ok:<value>`);
//! the test compares that with the one outcome isolation must produce and
//! prints a table (`cargo test --test escapes -- --nocapture`).

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use common::*;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the escape probes use x86_64 system call numbers");

/// Python helpers shared by the probes. Every outcome is a string:
/// `ok:<repr>`, an errno name (`EPERM`), or `exc:<Type>: <message>`.
const PRELUDE: &str = r#"
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def _arg(a):
    return ctypes.c_long(a) if isinstance(a, int) else a

def sc(nr, *args):
    """A raw system call: its errno name, or ok:<return value>."""
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    if r == 0 and os.getpid() != PID:
        os._exit(0)  # a clone that should have failed: the child leaves at once
    if r == -1:
        e = ctypes.get_errno()
        return errno.errorcode.get(e, str(e))
    return "ok:%d" % r

def op(f):
    try:
        return "ok:" + repr(f())[:300]
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "exc:" + type(e).__name__
    except BaseException as e:
        return "exc:%s: %s" % (type(e).__name__, str(e)[:200])

PID = os.getpid()
R = {}
"#;

const EPILOGUE: &str = "\nprint(json.dumps(R))\n";

/// Runs the probe body in a sandbox and returns name → outcome.
async fn probe(d: &TestDaemon, body: &str, argv: Vec<String>) -> BTreeMap<String, String> {
    let mut r = req(&format!("{PRELUDE}{body}{EPILOGUE}"));
    r.argv = argv;
    let res = d.spawn(&r).await.expect("probe spawn");
    assert_eq!(
        (res.exit_code, res.killed_by),
        (Some(0), None),
        "probe failed; stdout: {} stderr: {}",
        res.stdout_lossy(),
        res.stderr_lossy()
    );
    serde_json::from_slice(&res.stdout)
        .unwrap_or_else(|e| panic!("probe output {:?}: {e}", res.stdout_lossy()))
}

fn got<'a>(results: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    results.get(name).map(String::as_str).unwrap_or("<missing>")
}

/// A secret file in the host's /root, removed on drop.
struct Secret(std::path::PathBuf);

impl Drop for Secret {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_writes_and_reads_outside_scratch_fail() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let secret = Secret(format!("/root/forkd-it-secret-{}", std::process::id()).into());
    std::fs::File::create(&secret.0)
        .and_then(|mut f| f.write_all(b"host secret"))
        .expect("create the secret in /root");
    assert!(
        std::path::Path::new("/etc/shadow").exists(),
        "the host needs /etc/shadow for this check to mean anything"
    );

    let body = r#"
secret = sys.argv[1]
def write(p):
    with open(p, "w") as f:
        f.write("x")
    return os.path.getsize(p)
tag = sys.argv[2]
R["write /usr/x"] = op(lambda: write("/usr/" + tag))
R["write /etc/x"] = op(lambda: write("/etc/" + tag))
R["write /x"] = op(lambda: write("/" + tag))
R["write python prefix"] = op(lambda: write(os.path.join(sys.prefix, tag)))
R["mkdir /newdir"] = op(lambda: os.mkdir("/" + tag + "-dir"))
R["write /tmp/x (scratch)"] = op(lambda: write("/tmp/" + tag))
R["write /dev/shm/ok"] = op(lambda: write("/dev/shm/ok"))
R["write /dev/null"] = op(lambda: write("/dev/null"))
R["read /root secret"] = op(lambda: open(secret).read())
R["list /root"] = op(lambda: sorted(os.listdir("/root")))
R["read /etc/shadow"] = op(lambda: open("/etc/shadow").read())
R["read /etc/passwd"] = op(lambda: len(open("/etc/passwd").read()) > 0)
R["list /"] = op(lambda: sorted(os.listdir("/")))
R["list /sys"] = op(lambda: sorted(os.listdir("/sys")))
R["list /sys/fs"] = op(lambda: os.listdir("/sys/fs"))
R["open /dev/sda"] = op(lambda: open("/dev/sda", "rb"))
R["open /dev/mem"] = op(lambda: open("/dev/mem", "rb"))
R["list /home"] = op(lambda: os.listdir("/home"))
R["read /proc/1/root/root"] = op(lambda: os.listdir("/proc/1/root/root"))
R["open_by_handle_at"] = sc(304, -100, 0, 0)
R["chroot /tmp"] = sc(161, b"/tmp")
R["pivot_root"] = sc(155, b"/tmp", b"/tmp")
"#;
    let tag = format!("forkd-it-{}", std::process::id());
    let res = probe(&d, body, vec![secret.0.display().to_string(), tag.clone()]).await;
    let mut t = Table::new();
    for p in [
        "write /usr/x",
        "write /etc/x",
        "write /x",
        "write python prefix",
        "mkdir /newdir",
    ] {
        t.check(p, got(&res, p), &["EROFS", "EACCES"]);
    }
    t.check(
        "write /tmp/x (scratch)",
        got(&res, "write /tmp/x (scratch)"),
        &["ok:1"],
    );
    t.check(
        "write /dev/shm/ok",
        got(&res, "write /dev/shm/ok"),
        &["ok:1"],
    );
    t.check("write /dev/null", got(&res, "write /dev/null"), &["ok:0"]);
    t.check(
        "read /root secret",
        got(&res, "read /root secret"),
        &["ENOENT", "EACCES"],
    );
    // /root exists in the sandbox only when the interpreter lives below it
    // (e.g. pyenv): then it holds just that path, and landlock refuses to
    // list it anyway.
    let list_root = got(&res, "list /root");
    let interp = std::fs::canonicalize(python()).unwrap();
    let allowed: Vec<String> = interp
        .strip_prefix("/root")
        .ok()
        .and_then(|rest| rest.components().next())
        .map(|c| format!("ok:['{}']", c.as_os_str().to_string_lossy()))
        .into_iter()
        .collect();
    t.verdict(
        "list /root",
        list_root,
        &format!("ENOENT | EACCES | {allowed:?}"),
        ["ENOENT", "EACCES"].contains(&list_root) || allowed.iter().any(|a| a == list_root),
    );
    t.check(
        "read /etc/shadow",
        got(&res, "read /etc/shadow"),
        &["ENOENT", "EACCES"],
    );
    t.check(
        "read /etc/passwd",
        got(&res, "read /etc/passwd"),
        &["ok:True"],
    );
    // Listing the root works (as users expect of `ls /`) and shows only the
    // minimal root (no var, boot, srv, ...; root only when the interpreter
    // lives below it).
    let list = got(&res, "list /");
    let absent: &[&str] = if allowed.is_empty() {
        &["'root'", "'var'", "'boot'", "'srv'", "'run'", "'mnt'"]
    } else {
        &["'var'", "'boot'", "'srv'", "'run'", "'mnt'"]
    };
    let minimal = list.starts_with("ok:") && absent.iter().all(|n| !list.contains(n));
    t.verdict("list /", list, "only the minimal root", minimal);
    // /sys holds only devices/system/cpu/online, the sandbox's own CPU list,
    // and fs/cgroup, the mount points of its own cgroup's view.
    t.check(
        "list /sys",
        got(&res, "list /sys"),
        &["ok:['devices', 'fs']"],
    );
    t.check(
        "list /sys/fs",
        got(&res, "list /sys/fs"),
        &["ok:['cgroup']"],
    );
    t.check("open /dev/sda", got(&res, "open /dev/sda"), &["ENOENT"]);
    t.check("open /dev/mem", got(&res, "open /dev/mem"), &["ENOENT"]);
    // The sandbox's own /home: only the /home/user symlink to its scratch,
    // never the host's.
    t.check("list /home", got(&res, "list /home"), &["ok:['user']"]);
    // pid 1's root is the sandbox's own: the same view as `list /root`.
    let proc_root = got(&res, "read /proc/1/root/root");
    t.verdict(
        "read /proc/1/root/root",
        proc_root,
        &format!("ENOENT | EACCES | {allowed:?}"),
        ["ENOENT", "EACCES"].contains(&proc_root) || allowed.iter().any(|a| a == proc_root),
    );
    t.check(
        "open_by_handle_at",
        got(&res, "open_by_handle_at"),
        &["EPERM"],
    );
    t.check("chroot /tmp", got(&res, "chroot /tmp"), &["EPERM"]);
    t.check("pivot_root", got(&res, "pivot_root"), &["EPERM"]);
    t.assert_all("filesystem escapes");
    // Nothing reached the host (the sandbox's /tmp is its own tmpfs, so
    // not even the scratch file appears in the host's /tmp).
    let venv = python()
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
    let mut appeared = Vec::new();
    for p in [
        format!("/usr/{tag}"),
        format!("/etc/{tag}"),
        format!("/{tag}"),
        format!("/{tag}-dir"),
        format!("/tmp/{tag}"),
        venv.join(&tag).display().to_string(),
    ] {
        let p = std::path::PathBuf::from(p);
        if p.exists() {
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
            appeared.push(p);
        }
    }
    assert!(
        appeared.is_empty(),
        "sandbox writes reached the host: {appeared:?}"
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_is_a_private_loopback() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    // Positive control: the listener works from the host.
    drop(
        std::net::TcpStream::connect(("127.0.0.1", port))
            .expect("host can connect to its own listener"),
    );
    let (accepted, _) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    };
    drop(accepted);

    let body = r#"
port = int(sys.argv[1])
def connect(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
        return "connected"
    finally:
        s.close()
R["connect host 127.0.0.1:port"] = op(lambda: connect(("127.0.0.1", port)))
# No route out is checked on the routing tables, never by sending to an
# address beyond this machine (if isolation broke, that would be real traffic).
R["ipv4 routes"] = op(lambda: [l.split()[0] for l in open("/proc/net/route").read().splitlines()[1:]])
R["ipv6 routes"] = op(lambda: sorted({l.split()[-1] for l in open("/proc/net/ipv6_route").read().splitlines()}))
R["interfaces"] = op(lambda: sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]))
R["if_nameindex"] = op(lambda: sorted(n for _, n in socket.if_nameindex()))
def own_listener():
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    c = socket.create_connection(("127.0.0.1", port), timeout=3)
    a, _ = s.accept()
    a.sendall(b"pong")
    data = c.recv(4)
    for x in (a, c, s):
        x.close()
    return data
R["own listener on the same port"] = op(own_listener)
R["unix abstract socket"] = op(lambda: socket.socket(socket.AF_UNIX).connect("\0/org/freedesktop/systemd1/notify"))
"#;
    let res = probe(&d, body, vec![port.to_string()]).await;
    let mut t = Table::new();
    t.check(
        "connect host 127.0.0.1:port",
        got(&res, "connect host 127.0.0.1:port"),
        &["ECONNREFUSED"],
    );
    // Only loopback routes (ipv6 lists lo's own) and no default route.
    t.check("ipv4 routes", got(&res, "ipv4 routes"), &["ok:[]"]);
    t.check(
        "ipv6 routes",
        got(&res, "ipv6 routes"),
        &["ok:[]", "ok:['lo']"],
    );
    t.check("interfaces", got(&res, "interfaces"), &["ok:['lo']"]);
    t.check("if_nameindex", got(&res, "if_nameindex"), &["ok:['lo']"]);
    t.check(
        "own listener on the same port",
        got(&res, "own listener on the same port"),
        &["ok:b'pong'"],
    );
    t.check(
        "unix abstract socket",
        got(&res, "unix abstract socket"),
        &["ECONNREFUSED"],
    );
    t.assert_all("network escapes");
    // The host listener saw nothing from the sandbox.
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the host listener got a connection: {other:?}"),
    }
    drop(listener);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangerous_syscalls_are_denied_and_fork_and_threads_work() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let body = r#"
import threading, concurrent.futures
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
SIGCHLD = 17
def libc_mount():
    ctypes.set_errno(0)
    if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return "mounted"
R["mount (libc)"] = op(libc_mount)
R["umount2 /proc"] = sc(166, b"/proc", 2)
R["unshare(CLONE_NEWUSER)"] = sc(272, CLONE_NEWUSER)
R["unshare(CLONE_NEWNS)"] = sc(272, CLONE_NEWNS)
R["clone(CLONE_NEWUSER)"] = sc(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
R["clone(CLONE_NEWNET)"] = sc(56, CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0)
R["clone3"] = sc(435, 0, 0)
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
R["setns(net)"] = sc(308, fd, 0)
R["ptrace(PTRACE_ATTACH, 1)"] = sc(101, 16, 1, 0, 0)
R["ptrace(PTRACE_TRACEME)"] = sc(101, 0, 0, 0, 0)
R["process_vm_readv"] = sc(310, 1, 0, 0, 0, 0, 0)
R["bpf"] = sc(321, 0, 0, 0)
R["perf_event_open"] = sc(298, 0, 0, -1, -1, 0)
R["keyctl"] = sc(250, 0, 0, 0, 0, 0)
R["add_key"] = sc(248, b"user", b"k", b"v", 1, 0)
R["io_uring_setup"] = sc(425, 1, 0)
R["userfaultfd"] = sc(323, 0)
R["init_module"] = sc(175, 0, 0, b"")
R["kexec_load"] = sc(246, 0, 0, 0, 0)
R["reboot"] = sc(169, 0xfee1dead, 672274793, 0x12345678, 0)  # an invalid command: harmless even if allowed
R["sethostname"] = sc(170, b"evil", 4)
R["personality"] = sc(135, 0xffffffff)
R["x32 getpid"] = sc(0x40000000 | 39)
def fork_ok():
    pid = os.fork()
    if pid == 0:
        os._exit(5)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)
R["os.fork"] = op(fork_ok)
def thread_ok():
    box = []
    t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
    t.start(); t.join()
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        squares = list(ex.map(lambda x: x * x, range(8)))
    return (len(box), box[0] != threading.get_native_id(), sum(squares))
R["threads"] = op(thread_ok)
R["subprocess"] = op(lambda: __import__("subprocess").run(["/bin/echo", "hi"], capture_output=True).stdout)
"#;
    let res = probe(&d, body, vec![]).await;
    let mut t = Table::new();
    for (name, want) in [
        ("mount (libc)", "EPERM"),
        ("umount2 /proc", "EPERM"),
        ("unshare(CLONE_NEWUSER)", "EPERM"),
        ("unshare(CLONE_NEWNS)", "EPERM"),
        ("clone(CLONE_NEWUSER)", "EPERM"),
        ("clone(CLONE_NEWNET)", "EPERM"),
        ("clone3", "ENOSYS"),
        ("setns(net)", "EPERM"),
        ("ptrace(PTRACE_ATTACH, 1)", "EPERM"),
        ("ptrace(PTRACE_TRACEME)", "EPERM"),
        ("process_vm_readv", "EPERM"),
        ("bpf", "EPERM"),
        ("perf_event_open", "EPERM"),
        ("keyctl", "EPERM"),
        ("add_key", "EPERM"),
        ("io_uring_setup", "EPERM"),
        ("userfaultfd", "EPERM"),
        ("init_module", "EPERM"),
        ("kexec_load", "EPERM"),
        ("reboot", "EPERM"),
        ("sethostname", "EPERM"),
        ("personality", "EPERM"),
        ("x32 getpid", "ENOSYS"),
        ("os.fork", "ok:5"),
        ("threads", "ok:(1, True, 140)"),
        ("subprocess", "ok:b'hi\\n'"),
    ] {
        t.check(name, got(&res, name), &[want]);
    }
    t.assert_all("system call escapes");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_capabilities_and_pid_view() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let host_pid = std::process::id();
    let body = r#"
host_pid = int(sys.argv[1])
status = {l.split(":")[0]: l.split(":", 1)[1].strip() for l in open("/proc/self/status") if ":" in l}
for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp"):
    R[k] = status.get(k, "<missing>")
R["hostname"] = socket.gethostname()
R["uname nodename"] = os.uname().nodename
R["getpid"] = str(os.getpid())
R["pids in /proc"] = op(lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
R["host pid visible"] = op(lambda: os.path.exists("/proc/%d" % host_pid))
R["kill(host pid, 0)"] = op(lambda: os.kill(host_pid, 0))
R["kill(-1, 0) finds nobody"] = op(lambda: os.kill(-1, 0))
R["setuid(1000) then back to 0"] = op(lambda: (os.setuid(1000), os.setuid(0)))
R["chown /tmp/f"] = op(lambda: (open("/tmp/f", "w").close(), os.chown("/tmp/f", 1000, 1000)))
R["mknod"] = op(lambda: os.mknod("/tmp/dev", 0o600 | 0o060000, os.makedev(8, 0)))
R["raw socket"] = op(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))
R["cgroup view"] = op(lambda: open("/proc/self/cgroup").read().strip().splitlines()[0])
"#;
    let res = probe(&d, body, vec![host_pid.to_string()]).await;
    let mut t = Table::new();
    for k in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
        t.check(k, got(&res, k), &["0000000000000000"]);
    }
    t.check("NoNewPrivs", got(&res, "NoNewPrivs"), &["1"]);
    t.check("Seccomp", got(&res, "Seccomp"), &["2"]);
    t.check("hostname", got(&res, "hostname"), &["sandbox"]);
    t.check("uname nodename", got(&res, "uname nodename"), &["sandbox"]);
    t.check("getpid", got(&res, "getpid"), &["1"]);
    t.check("pids in /proc", got(&res, "pids in /proc"), &["ok:[1]"]);
    t.check(
        "host pid visible",
        got(&res, "host pid visible"),
        &["ok:False"],
    );
    t.check(
        "kill(host pid, 0)",
        got(&res, "kill(host pid, 0)"),
        &["ESRCH"],
    );
    // kill(-1, 0) probes every process the caller could signal: in its own
    // pid namespace there is none (on the host, as uid 0, it would succeed).
    t.check(
        "kill(-1, 0) finds nobody",
        got(&res, "kill(-1, 0) finds nobody"),
        &["ESRCH"],
    );
    t.check(
        "setuid(1000) then back to 0",
        got(&res, "setuid(1000) then back to 0"),
        &["EPERM"],
    );
    t.check("chown /tmp/f", got(&res, "chown /tmp/f"), &["EPERM"]);
    t.check("mknod", got(&res, "mknod"), &["EPERM"]);
    t.check("raw socket", got(&res, "raw socket"), &["EPERM"]);
    // cgroup namespace: the sandbox sees itself at the root of its hierarchy.
    let cg = got(&res, "cgroup view");
    t.verdict(
        "cgroup view",
        cg,
        "no host path (…:/)",
        cg.starts_with("ok:") && cg.ends_with(":/'") && !cg.contains(CGROUP_PARENT),
    );
    t.assert_all("identity and process escapes");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sandbox_scratch_is_invisible() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    // Sandbox A writes a secret into its scratch and stays alive.
    let mut a = req(
        "import time\nopen('/tmp/secret', 'w').write('A-secret')\nopen('/tmp/secret-ready', 'w').close()\nprint('A wrote', flush=True)\ntime.sleep(30)",
    );
    // Long enough for B's filesystem walk on a loaded machine.
    a.timeout_ms = Some(15_000);
    let client = d.client().await;
    let a_task = tokio::spawn(async move { client.spawn(&a).await });
    let pids = d
        .wait_for_scratch_file("secret-ready", Duration::from_secs(10))
        .await;
    let (a_pid, a_start) = pids[0];
    // The secret really exists (seen from the host), so B's failure to see
    // it means something.
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{a_pid}/root/tmp/secret")).unwrap(),
        "A-secret"
    );

    let body = r#"
a_pid = int(sys.argv[1])
R["/tmp/secret"] = op(lambda: open("/tmp/secret").read())
R["/proc/<A host pid>/root/tmp/secret"] = op(lambda: open("/proc/%d/root/tmp/secret" % a_pid).read())
found = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            found.append((p, open("/proc/%s/root/tmp/secret" % p).read()))
        except OSError:
            pass
R["/proc/*/root/tmp/secret"] = "ok:" + repr(found)
R["/tmp listing"] = op(lambda: sorted(os.listdir("/tmp")))
R["/dev/shm listing"] = op(lambda: sorted(os.listdir("/dev/shm")))
def walk():
    hits = []
    for top in ("/tmp", "/dev", "/usr", "/etc"):
        for root, dirs, files in os.walk(top):
            hits += [os.path.join(root, f) for f in files if f == "secret"]
    return hits
R["walk for 'secret'"] = op(walk)
"#;
    let res = probe(&d, body, vec![a_pid.to_string()]).await;
    // A (and its secret) existed for the whole of B's search.
    assert!(
        process_alive(a_pid, a_start),
        "sandbox A ended before B finished looking"
    );
    let mut t = Table::new();
    t.check("/tmp/secret", got(&res, "/tmp/secret"), &["ENOENT"]);
    t.check(
        "/proc/<A host pid>/root/tmp/secret",
        got(&res, "/proc/<A host pid>/root/tmp/secret"),
        &["ENOENT", "EACCES"],
    );
    t.check(
        "/proc/*/root/tmp/secret",
        got(&res, "/proc/*/root/tmp/secret"),
        &["ok:[]"],
    );
    // Empty, except where the zygote's own interpreter lives under /tmp (a
    // checkout there, as in CI): its top directory is bound back read-only.
    let interpreter_top = python()
        .strip_prefix("/tmp")
        .ok()
        .and_then(|rest| rest.components().next())
        .map(|c| format!("ok:[{:?}]", c.as_os_str().to_string_lossy()).replace('"', "'"));
    let tmp_expected = interpreter_top.unwrap_or_else(|| "ok:[]".to_string());
    t.check(
        "/tmp listing",
        got(&res, "/tmp listing"),
        &[tmp_expected.as_str()],
    );
    t.check(
        "/dev/shm listing",
        got(&res, "/dev/shm listing"),
        &["ok:[]"],
    );
    t.check(
        "walk for 'secret'",
        got(&res, "walk for 'secret'"),
        &["ok:[]"],
    );
    t.assert_all("cross-sandbox escapes");

    let a = a_task.await.unwrap().expect("sandbox A");
    assert_eq!(a.stdout, b"A wrote\n");
    assert_eq!(a.killed_by, Some(KilledBy::Timeout));
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_cannot_be_raised() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let body = r#"
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
R["RLIMIT_NOFILE"] = "ok:%d/%d" % (soft, hard)
R["raise RLIMIT_NOFILE"] = op(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1)))
R["prlimit NOFILE"] = op(lambda: resource.prlimit(0, resource.RLIMIT_NOFILE, (hard * 2, hard * 2)))
fs = resource.getrlimit(resource.RLIMIT_FSIZE)
R["RLIMIT_FSIZE"] = "ok:%d/%d" % fs
R["raise RLIMIT_FSIZE"] = op(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fs[1] + 1, fs[1] + 1)))
R["RLIMIT_CORE"] = "ok:%d/%d" % resource.getrlimit(resource.RLIMIT_CORE)
R["raise RLIMIT_CORE"] = op(lambda: resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20)))
R["lower then raise"] = op(lambda: (resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)), resource.setrlimit(resource.RLIMIT_NOFILE, (65, 65))))
big = os.open("/tmp/big", os.O_WRONLY | os.O_CREAT)
R["write past RLIMIT_FSIZE"] = op(lambda: os.write(big, b"x" * (fs[0] + 1)))
R["write at RLIMIT_FSIZE"] = op(lambda: os.write(big, b"x"))
R["RLIMIT_RTPRIO"] = "ok:%d/%d" % resource.getrlimit(resource.RLIMIT_RTPRIO)
R["raise RLIMIT_RTPRIO"] = op(lambda: resource.setrlimit(resource.RLIMIT_RTPRIO, (99, 99)))
R["SCHED_FIFO"] = op(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10)))
R["SCHED_BATCH"] = op(lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)))
"#;
    let mut r = req(&format!("{PRELUDE}{body}{EPILOGUE}"));
    r.limits.open_files = Some(128);
    r.limits.file_size_bytes = Some(65536);
    let out = d.spawn(&r).await.unwrap();
    assert_eq!(out.exit_code, Some(0), "{}", out.stderr_lossy());
    let res: BTreeMap<String, String> = serde_json::from_slice(&out.stdout).unwrap();
    let mut t = Table::new();
    let not_allowed = "exc:ValueError: not allowed to raise maximum limit";
    t.check("RLIMIT_NOFILE", got(&res, "RLIMIT_NOFILE"), &["ok:128/128"]);
    t.check(
        "raise RLIMIT_NOFILE",
        got(&res, "raise RLIMIT_NOFILE"),
        &[not_allowed, "EPERM"],
    );
    t.check(
        "prlimit NOFILE",
        got(&res, "prlimit NOFILE"),
        &[not_allowed, "EPERM"],
    );
    t.check(
        "RLIMIT_FSIZE",
        got(&res, "RLIMIT_FSIZE"),
        &["ok:65536/65536"],
    );
    t.check(
        "raise RLIMIT_FSIZE",
        got(&res, "raise RLIMIT_FSIZE"),
        &[not_allowed, "EPERM"],
    );
    t.check("RLIMIT_CORE", got(&res, "RLIMIT_CORE"), &["ok:0/0"]);
    t.check(
        "raise RLIMIT_CORE",
        got(&res, "raise RLIMIT_CORE"),
        &[not_allowed, "EPERM"],
    );
    t.check(
        "lower then raise",
        got(&res, "lower then raise"),
        &[not_allowed, "EPERM"],
    );
    // A write crossing the limit is cut short at it; the next one fails
    // with EFBIG (Python ignores SIGXFSZ).
    t.check(
        "write past RLIMIT_FSIZE",
        got(&res, "write past RLIMIT_FSIZE"),
        &["ok:65536"],
    );
    t.check(
        "write at RLIMIT_FSIZE",
        got(&res, "write at RLIMIT_FSIZE"),
        &["EFBIG"],
    );
    // Scheduling policies an ordinary user may take are allowed; real-time
    // ones are not, whatever RLIMIT_RTPRIO the daemon was started with.
    t.check("RLIMIT_RTPRIO", got(&res, "RLIMIT_RTPRIO"), &["ok:0/0"]);
    t.check(
        "raise RLIMIT_RTPRIO",
        got(&res, "raise RLIMIT_RTPRIO"),
        &[not_allowed, "EPERM"],
    );
    t.check("SCHED_FIFO", got(&res, "SCHED_FIFO"), &["EPERM"]);
    t.check("SCHED_BATCH", got(&res, "SCHED_BATCH"), &["ok:None"]);
    t.assert_all("rlimit escapes");

    // Asking the daemon for more than its configured maximum is refused,
    // never clamped.
    let max = &d.settings().config.limits.max;
    let mut cases: Vec<(&str, SpawnRequest)> = Vec::new();
    let mut r = req("print(1)");
    r.limits.memory_bytes = Some(max.memory_bytes + 1);
    cases.push(("memory_bytes", r));
    let mut r = req("print(1)");
    r.limits.pids = Some(max.pids + 1);
    cases.push(("pids", r));
    let mut r = req("print(1)");
    r.limits.cpus = Some(max.cpus * 2.0);
    cases.push(("cpus", r));
    let mut r = req("print(1)");
    r.limits.open_files = Some(max.open_files + 1);
    cases.push(("open_files", r));
    let mut r = req("print(1)");
    r.timeout_ms = Some(max.timeout_ms + 1);
    cases.push(("timeout_ms", r));
    for (name, r) in cases {
        let e = server_error(d.spawn(&r).await.unwrap_err());
        assert_eq!(e.code, ErrorCode::LimitExceedsPolicy, "{name}: {e:?}");
        assert!(e.message.contains(name), "{name}: {}", e.message);
    }
    // At the maximum is fine.
    let mut r = req("print('at max')");
    r.limits.pids = Some(max.pids);
    assert_eq!(d.spawn(&r).await.unwrap().stdout, b"at max\n");
    d.finish().await;
}
