"""Does a workspace mount tree built once pay off? (docs/workspaces.md, "Cost")

Run as root: ``python3 workspace/bench/tree_clone_probe.py [BINDS]``. In a
scratch directory it builds a detached tree (a clone of a directory with
BINDS binds mounted *inside the detached tree*) held by this process; a
forked child then clones it recursively through ``/proc/<pid>/fd/<n>``
(``open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)``) while still in the mount
namespace the tree was made from, enters a fresh mount namespace and
attaches it (``move_mount``), and, for comparison, builds the same tree
there mount by mount (what a workspace child does today). Nothing is left
mounted anywhere: the child's namespace dies with it, the detached tree
with this process.
"""

import ctypes
import os
import sys
import tempfile
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
CLONE = 1 | 0o2000000  # OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
AT_RECURSIVE, AT_EMPTY_PATH, AT_FDCWD = 0x8000, 0x1000, -100
F_EMPTY = 0x4  # MOVE_MOUNT_F_EMPTY_PATH


def sc(*args: object) -> int:
    r = libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def open_tree(dfd: int, path: str, flags: int) -> int:
    return sc(SYS_OPEN_TREE, dfd, path.encode(), flags)


def move_mount(fd: int, dfd: int, path: str) -> None:
    sc(SYS_MOVE_MOUNT, fd, b"", dfd, path.encode(), F_EMPTY)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    top = tempfile.mkdtemp(prefix="forkd-tree-probe-")
    host = os.path.join(top, "host")
    for i in range(n):
        os.makedirs(f"{host}/d{i}")
    t = time.perf_counter()
    tree = open_tree(AT_FDCWD, host, CLONE)
    for i in range(n):
        b = open_tree(AT_FDCWD, f"{host}/d{i}", CLONE)
        move_mount(b, tree, f"d{i}")
        os.close(b)
    print(f"built once: {n} binds inside a detached tree, {(time.perf_counter() - t) * 1e3:.3f} ms")
    r, w = os.pipe()
    pid = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(r)
        out = []
        try:
            t = time.perf_counter()
            clone = open_tree(AT_FDCWD, f"/proc/{pid}/fd/{tree}", CLONE | AT_RECURSIVE)
            spent = time.perf_counter() - t
            if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
                raise OSError(ctypes.get_errno(), "unshare")
            # MS_REC | MS_PRIVATE on /: nothing propagates back to the host.
            if libc.mount(b"none", b"/", None, ctypes.c_ulong(0x4000 | 0x40000), None) != 0:
                raise OSError(ctypes.get_errno(), "make / private")
            for d in ("a", "b"):
                os.makedirs(os.path.join(top, d))
            t = time.perf_counter()
            move_mount(clone, AT_FDCWD, os.path.join(top, "a"))
            spent += time.perf_counter() - t
            mounts = sum(1 for line in open("/proc/self/mountinfo") if f"{top}/a" in line)
            out.append(f"per child, clone + attach: {spent * 1e3:.3f} ms ({mounts} mounts)")
            t = time.perf_counter()
            base = open_tree(AT_FDCWD, host, CLONE)
            move_mount(base, AT_FDCWD, os.path.join(top, "b"))
            for i in range(n):
                b = open_tree(AT_FDCWD, f"{host}/d{i}", CLONE)
                move_mount(b, AT_FDCWD, f"{top}/b/d{i}")
                os.close(b)
            out.append(f"per child, built mount by mount: {(time.perf_counter() - t) * 1e3:.3f} ms")
        except OSError as e:
            out.append(f"child: {e}")
        os.write(w, "\n".join(out).encode())
        os._exit(0)
    os.close(w)
    print(os.read(r, 65536).decode())
    os.waitpid(child, 0)
    os.close(tree)
    for i in range(n):
        os.rmdir(f"{host}/d{i}")
    for d in ("host", "a", "b"):
        if os.path.isdir(os.path.join(top, d)):
            os.rmdir(os.path.join(top, d))
    os.rmdir(top)


if __name__ == "__main__":
    main()
