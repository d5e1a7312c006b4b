#!/usr/bin/env python3
# Run as root: python3 docs/branch-experiment.py {plain|landlock-tmp|landlock-root}.
# Measured 2026-12-04, kernel 6.18: all three join; the write to the branch
# scratch succeeds for plain and landlock-root and fails (EACCES) for landlock-tmp.
# Branch-design experiment: can a capless, landlocked process whose euid owns a
# user namespace prepared by root join it and the namespaces it owns?
import ctypes, os, sys, struct, time
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
def chk(r, what):
    if r != 0:
        e = ctypes.get_errno(); raise OSError(e, f"{what}: {os.strerror(e)}")
X = 61234
r_go, w_go = os.pipe(); r_ready, w_ready = os.pipe()
h = os.fork()
if h == 0:
    os.setresgid(X, X, X); os.setresuid(X, X, X)
    chk(libc.unshare(CLONE_NEWUSER), "unshare user")
    os.write(w_ready, b"u"); os.read(r_go, 1)   # parent writes the maps
    chk(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare ns")
    chk(libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None), "make private")  # MS_REC|MS_PRIVATE
    chk(libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None), "mount tmpfs")
    open("/mnt/marker", "w").write("branch scratch")
    chk(libc.sethostname(b"branch", 6), "sethostname")
    os.write(w_ready, b"n"); time.sleep(30); os._exit(0)
os.read(r_ready, 1)
open(f"/proc/{h}/uid_map", "w").write(f"0 {X} 1")
open(f"/proc/{h}/setgroups", "w").write("deny")
open(f"/proc/{h}/gid_map", "w").write(f"0 {X} 1")
os.write(w_go, b"g"); os.read(r_ready, 1)
fds = {n: os.open(f"/proc/{h}/ns/{n}", os.O_RDONLY) for n in ("user", "mnt", "net", "ipc", "uts")}
mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
g = os.fork()
if g == 0:
    try:
        os.setresgid(X, X, X); os.setresuid(X, X, X)   # capless, euid X, init userns
        chk(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        if mode.startswith("landlock"):
            # ruleset: handle write_file|make_reg (bits 1, 8); rule on / only in "landlock-root"
            attr = struct.pack("QQQ", (1 << 1) | (1 << 8), 0, 0)
            buf = ctypes.create_string_buffer(attr)
            rs = libc.syscall(444, buf, 24, 0); assert rs >= 0, ctypes.get_errno()
            if mode == "landlock-root":
                root = os.open("/", os.O_PATH)
                pb = ctypes.create_string_buffer(struct.pack("=Qi", (1 << 1) | (1 << 8), root))
                chk(libc.syscall(445, rs, 1, pb, 0), "add rule")
            else:
                tmp = os.open("/tmp", os.O_PATH)
                pb = ctypes.create_string_buffer(struct.pack("=Qi", (1 << 1) | (1 << 8), tmp))
                chk(libc.syscall(445, rs, 1, pb, 0), "add rule")
            chk(libc.syscall(446, rs, 0), "restrict")
        for n, flag in (("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET), ("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS)):
            chk(libc.setns(fds[n], flag), f"setns {n}")
        print(mode, "joined; uid inside", os.getuid(), "hostname", os.uname().nodename,
              "marker", open("/mnt/marker").read(), flush=True)
        try:
            open("/mnt/written", "w").write("x"); print(mode, "write to the branch scratch: ok", flush=True)
        except OSError as e:
            print(mode, "write to the branch scratch:", e, flush=True)
    except OSError as e:
        print(mode, "FAILED", e, flush=True)
    os._exit(0)
os.waitpid(g, 0); os.kill(h, 9); os.waitpid(h, 0)
