#!/usr/bin/env python3
# Run as root: python3 docs/branch-pidns-experiment.py (docs/branch.md).
# Measured 2026-12-04, kernel 6.18:
#   G': pid 2 in the branch ns, sees [1, 2], uid 0
#   G' ... re-parented to <S's pid 1>
#   after killing S's pid 1, alive of [G', E]: []
# Branch design, pid namespaces: can a capless copy inside S's pid namespace
# put its child into a branch pid namespace (a child of S's, owned by a user
# namespace it owns) whose pid 1 is a root-made helper; who re-parents the copy;
# and does killing S's pid 1 kill the branch?
import ctypes, os, sys, time, signal
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
def chk(r, what):
    if r != 0:
        e = ctypes.get_errno(); raise OSError(e, f"{what}: {os.strerror(e)}")
X = 61235
def status(pid, key):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith(key + ":"): return l.split(":", 1)[1].strip()
os.makedirs("/tmp/bx/proc", exist_ok=True); os.chmod("/tmp/bx/proc", 0o777)
r1, w1 = os.pipe()
# S: pid 1 of its own pid namespace (root, like the executor before it drops), and
# its interpreter I (uid X, no capabilities).
chk(libc.unshare(NEWPID), "unshare pid (S)")
s1 = os.fork()
if s1 == 0:
    i = os.fork()
    if i == 0:
        os.setresgid(X, X, X); os.setresuid(X, X, X)
        chk(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        os.write(w1, f"{os.getpid()}\n".encode())
        time.sleep(60); os._exit(0)
    while True:
        try: os.waitpid(-1, 0)   # S's pid 1 reaps whatever comes to it
        except ChildProcessError: time.sleep(0.05)
os.read(r1, 64)
# Global pid of I: the only process of S's namespace with uid X.
I = [int(p) for p in os.listdir("/proc") if p.isdigit() and status(int(p), "NSpid").split()[-1] == "2" and status(int(p), "PPid") == str(s1)][0]
print("S pid 1 =", s1, " interpreter I =", I)
# H: the root helper. Enters S's pid namespace for children, becomes uid X,
# makes U_B (maps written by us), then the branch namespaces; E = its first
# child, pid 1 of the branch pid namespace, mounts that namespace's /proc.
r2, w2 = os.pipe(); r3, w3 = os.pipe()
h = os.fork()
if h == 0:
    fd = os.open(f"/proc/{s1}/ns/pid", os.O_RDONLY)
    chk(libc.setns(fd, NEWPID), "H setns S's pid ns (for children)")
    os.setresgid(X, X, X); os.setresuid(X, X, X)
    chk(libc.unshare(NEWUSER), "H unshare user")
    libc.prctl(4, 1, 0, 0, 0)  # dumpable, so that the experiment's I may open /proc/H/ns
    os.write(w2, b"u"); os.read(r3, 1)
    chk(libc.unshare(NEWNS | NEWNET | NEWIPC | NEWUTS | NEWPID), "H unshare branch ns")
    chk(libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None), "private")
    e = os.fork()
    if e == 0:
        os.makedirs("/tmp/bx/proc", exist_ok=True)
        chk(libc.mount(b"proc", b"/tmp/bx/proc", b"proc", 0, None), "E mounts the branch /proc")
        libc.prctl(4, 1, 0, 0, 0)
        print("E: pid", os.getpid(), "in the branch namespace", flush=True)
        while True:
            try: os.waitpid(-1, 0)
            except ChildProcessError: time.sleep(0.05)
    time.sleep(60); os._exit(0)
os.read(r2, 1)
open(f"/proc/{h}/uid_map", "w").write(f"0 {X} 1")
open(f"/proc/{h}/setgroups", "w").write("deny")
open(f"/proc/{h}/gid_map", "w").write(f"0 {X} 1")
os.write(w3, b"g"); time.sleep(0.5)
E = [int(p) for p in os.listdir("/proc") if p.isdigit() and status(int(p), "PPid") == str(h)][0]
print("H =", h, " E =", E, " E NSpid:", status(E, "NSpid"))
# The copy: a stand-in for I's fork G (the same credentials, in S's pid
# namespace, no capabilities, no_new_privs) joins U_B and the branch
# namespaces through E, forks G' into the branch pid namespace, exits.
r4, w4 = os.pipe()
g = os.fork()
if g == 0:
    fd = os.open(f"/proc/{s1}/ns/pid", os.O_RDONLY); chk(libc.setns(fd, NEWPID), "enter S pid ns")
    ns = {n: os.open(f"/proc/{E}/ns/{n}", os.O_RDONLY) for n in ("user", "mnt", "net", "ipc", "uts", "pid")}
    gg = os.fork()   # now in S's pid namespace, like I's copy
    if gg == 0:
        os.setresgid(X, X, X); os.setresuid(X, X, X)
        chk(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        try:
            for n, f in (("user", NEWUSER), ("mnt", NEWNS), ("net", NEWNET), ("ipc", NEWIPC), ("uts", NEWUTS), ("pid", NEWPID)):
                chk(libc.setns(ns[n], f), f"copy setns {n}")
            g2 = os.fork()
            if g2 == 0:
                seen = sorted(int(p) for p in os.listdir("/tmp/bx/proc") if p.isdigit())
                os.write(w4, f"G': pid {os.getpid()} in the branch ns, sees {seen}, uid {os.getuid()}\n".encode())
                time.sleep(60); os._exit(0)
            os._exit(0)
        except OSError as e:
            os.write(w4, f"copy FAILED {e}\n".encode()); os._exit(1)
    os.waitpid(gg, 0); os._exit(0)
os.waitpid(g, 0)
print(os.read(r4, 300).decode().strip())
time.sleep(0.3)
G2 = [int(p) for p in os.listdir("/proc") if p.isdigit() and status(int(p), "NSpid").split()[-1] == "2" and len(status(int(p), "NSpid").split()) == 3]
for p in G2:
    print("G' global", p, "NSpid", status(p, "NSpid"), "re-parented to", status(p, "PPid"), "(S pid 1 is", s1, ")")
os.kill(s1, signal.SIGKILL); time.sleep(0.5)
alive = [p for p in G2 + [E] if os.path.exists(f"/proc/{p}") and status(p, "State")[0] != "Z"]
print("after killing S's pid 1, alive of [G', E]:", alive)
for p in [h, I] + alive:
    try: os.kill(p, signal.SIGKILL)
    except ProcessLookupError: pass
libc.umount2(b"/tmp/bx/proc", 2)
