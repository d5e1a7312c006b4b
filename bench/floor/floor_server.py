"""forkd-bench's independent floor: a minimal fork server.

Run by forkd-bench as `python -c <this file> LIBRARY PRELOAD...` with a
SOCK_SEQPACKET socket on fd 3. It shares no code with forkd: the isolation is
libforkd_bench_floor.so (bench/floor/src), loaded with ctypes.

  bench -> server   b"F" + u32 n (little-endian): fork n children
                    EOF: kill the children still waiting, reap, clean up, exit
  server -> bench   b"R" + info text (key=value lines): ready
                    b"E" + message: start-up failed (then exit)
                    b"C" + u64 id + u32 pid, with 4 fds [job, stdout, stderr,
                    status] (the bench's ends of the child's pipes)

Each child is pid 1 of a new pid namespace, isolates itself at once, then
blocks reading its job from fd 0: a u32 big-endian length and the code. It
runs the code, closes stdout and stderr, and writes b"X" + exit code to the
status pipe (b"E" + message if its setup failed). The server reaps children
on SIGCHLD and removes their cgroups.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import builtins
import ctypes
import gc
import importlib
import select
import signal
import socket
import struct
import sys
import types

ERR_CAP = 4096


def interpreter_paths():
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in sys.path if p and os.path.isabs(p))
    return sorted(p for p in paths if p)


def read_exact(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def child_failed(message):
    try:
        os.write(3, b"E" + message.encode(errors="replace")[:65536])
    finally:
        os._exit(126)


class Server:
    def __init__(self, sock, lib):
        self.sock = sock
        self.lib = lib
        self.err = ctypes.create_string_buffer(ERR_CAP)
        self.next_id = 1
        self.children = {}  # pid -> id
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        self.wake_w = wake_w

    def serve(self):
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self.reap()
                else:
                    msg = self.sock.recv(64)
                    if not msg:
                        self.shutdown()
                    if msg[:1] == b"F":
                        for _ in range(struct.unpack("<I", msg[1:5])[0]):
                            self.fork()

    def fork(self):
        cid = self.next_id
        self.next_id += 1
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        errno = self.lib.floor_pidns_new()
        if errno:
            raise OSError(errno, "floor: new pid namespace")
        pid = os.fork()
        if pid == 0:
            self.child(cid, (job_r, out_w, err_w, st_w))
        errno = self.lib.floor_pidns_restore()
        if errno:
            raise OSError(errno, "floor: back to the server's pid namespace")
        self.children[pid] = cid
        for fd in (job_r, out_w, err_w, st_w):
            os.close(fd)
        ours = (job_w, out_r, err_r, st_r)
        socket.send_fds(self.sock, [b"C" + struct.pack("<QI", cid, pid)], list(ours))
        for fd in ours:
            os.close(fd)

    def reap(self):
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            cid = self.children.pop(pid, None)
            if cid is not None and self.lib.floor_cgroup_remove(cid, self.err, ERR_CAP) != 0:
                print("floor server: " + self.err.value.decode(errors="replace"), file=sys.stderr)

    def shutdown(self):
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.children:
            pid, _ = os.waitpid(-1, 0)
            cid = self.children.pop(pid, None)
            if cid is not None:
                self.lib.floor_cgroup_remove(cid, self.err, ERR_CAP)
        self.lib.floor_teardown()
        os._exit(0)

    # -- in the child -------------------------------------------------------

    def child(self, cid, fds):
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for src, dst in zip(fds, (0, 1, 2, 3)):
                os.dup2(src, dst)
            if self.lib.floor_child_isolate(cid, self.err, ERR_CAP) != 0:
                child_failed("isolation failed: " + self.err.value.decode(errors="replace"))
        except BaseException as e:
            child_failed(f"setup failed: {e!r}")
        header = read_exact(0, 4)
        if header is None:
            os._exit(0)  # dropped unused
        source = read_exact(0, int.from_bytes(header, "big"))
        if source is None:
            child_failed("the job ended early")
        # What forkd does for every child too: numpy's global RandomState
        # was seeded once, in the server; the environment is the job's.
        np_random = sys.modules.get("numpy.random")
        if np_random is not None:
            np_random.seed()
        os.environ.clear()
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main
        sys.argv = ["-c"]
        code = 0
        try:
            exec(compile(source, "<string>", "exec"), main.__dict__)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                code = code or 120
        try:
            os.close(1)
            os.close(2)
            os.write(3, b"X" + bytes([code & 0xFF]))
        except OSError:
            pass
        os._exit(code & 0xFF)


def main():
    sock = socket.socket(fileno=3)
    library, preload = sys.argv[1], sys.argv[2:]
    try:
        lib = ctypes.CDLL(library)
    except OSError as e:
        sock.send(b"E" + f"cannot load {library}: {e}".encode())
        os._exit(1)
    lib.floor_init.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    lib.floor_info.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.floor_info.restype = ctypes.c_int64
    lib.floor_child_isolate.argtypes = [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
    lib.floor_cgroup_remove.argtypes = [ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
    err = ctypes.create_string_buffer(ERR_CAP)
    paths = "\n".join(interpreter_paths()).encode()
    # Before any import that could start a thread: this forks a helper.
    if lib.floor_init(paths, len(paths), err, ERR_CAP) != 0:
        sock.send(b"E" + err.value)
        os._exit(1)
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException as e:
        sock.send(b"E" + f"preload {name}: {e!r}".encode())
        lib.floor_teardown()
        os._exit(1)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        sock.send(b"E" + f"{threads} threads after the preload imports; forking needs one".encode())
        lib.floor_teardown()
        os._exit(1)
    gc.freeze()
    info = ctypes.create_string_buffer(1 << 16)
    n = lib.floor_info(info, len(info))
    sock.send(b"R" + info.raw[:max(n, 0)])
    Server(sock, lib).serve()


main()
