"""forkd zygote: a single-threaded Python that has imported its preload
modules and forks one isolated child per sandbox.

The daemon starts it as `python /dev/fd/4 forkd-zygote NAME` (this file in a
sealed memfd) with a SOCK_SEQPACKET socket on fd 3 and talks JSON over it. The
messages are typed and versioned in zygote/src/wire.rs (WIRE_VERSION below
must match it); pool/src/zygote.rs is the other side:

  daemon -> zygote  {"op": "init", "wire": V, "lib": PATH, "config": {...}, "preload": [...]}
                    {"op": "spawn", "id": N, "spec": "<ChildSpec JSON>"}
                        + fds [job, stdout, stderr, status(, netns)]
                    {"op": "drain"}   finish running children, then exit
  zygote -> daemon  {"op": "importing", "module": M}
                    {"op": "ready", ...} | {"op": "fatal", "error": E}
                    {"op": "forked", "id": N, "pid": P} + fds [pidfd]
                    {"op": "exited", "id": N, "status": S, ...}
                    {"op": "spawn_error", "id": N, "error": E}

A child isolates itself at once, then blocks reading its job from fd 0: a
4-byte big-endian length, the job as JSON, then the program's stdin until
EOF. A warm-pool child waits there until a request arrives; an on-demand one
finds its job already written.

The native half (libforkd_zygote.so, loaded with ctypes) builds the sandbox
root and applies namespaces, cgroup, capabilities, landlock and seccomp in each
child; forking itself is os.fork() so CPython's after-fork hooks run (which
also reseeds `random`).
"""

import os
import sys

# What the interpreter read at start-up (PYTHON*, TZ): a sandbox's request
# env is compared with it to decide what still has to be applied or refused.
STARTUP_ENV = {k: v for k, v in os.environ.items() if k.startswith("PYTHON") or k == "TZ"}

# The daemon runs this file as `python /dev/fd/4 forkd-zygote NAME` from a
# sealed memfd. Python put the script's resolved directory ("/") first on
# sys.path, where it would be bound into every sandbox as an interpreter
# path: make that entry what `python -c` puts there ("", which children
# replace with their script's directory), and close the script's descriptor.
if sys.argv and sys.argv[0].startswith("/dev/fd/"):
    sys.path[0] = ""
    try:
        os.close(int(sys.argv[0][len("/dev/fd/"):]))
    except (ValueError, OSError):
        pass

# This script's own name as its frames carry it ("/dev/fd/4"): traceback
# code must never try to read source lines from it (in a child that path
# is whatever descriptor 4 has become, e.g. a pipe a read would block on).
_SCRIPT = sys.argv[0] if sys.argv else "<forkd>"

# BLAS/OpenMP pools must not start threads: a process with threads cannot be
# forked safely. Set before anything can import numpy.
for _var in (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
):
    os.environ[_var] = "1"

import _signal
import ast
import atexit
import base64
import builtins
import collections
import ctypes
import errno as errno_codes
import fcntl
import gc
import importlib
import importlib.machinery
import io
import json
import linecache
import runpy
import select
import shutil
import signal
import socket
import stat as stat_mode
import time
import traceback
import types

# Every module the child path uses is imported here, in the zygote: an import
# inside a sandbox costs milliseconds of path searching per child.

# No source lines for this script's frames (see _SCRIPT): an entry without
# an mtime is never checked against the file.
linecache.cache[_SCRIPT] = (1, None, ["\n"], _SCRIPT)

# The wire's shapes and version are defined in zygote/src/wire.rs; this file
# mirrors them (a Rust test checks these lines against it).
WIRE_VERSION = 6
CONTROL_FD = 3
# In a child: the status pipe, moved onto fd 3 (replacing the control socket,
# which the child must not keep). It carries one-byte tagged reports:
#   E<message>  setup failed        S  the program starts
#   K<signo>    the program died of a signal it sent itself (see forkd_report_signals)
#   X<code>     the program finished with this exit code (stdout/stderr closed)
STATUS_FD = 3
TAG_SETUP_FAILED = b"E"
TAG_STARTED = b"S"
TAG_SELF_SIGNAL = b"K"
TAG_FINISHED = b"X"
MAX_MESSAGE = 1 << 20
ERR_CAP = 4096


def send(sock, msg, fds=()):
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def fatal(sock, error):
    try:
        send(sock, {"op": "fatal", "error": error})
    finally:
        os._exit(1)


def interpreter_paths():
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(sys.executable))
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    paths.update(p for p in sys.path if p and os.path.isabs(p))
    return sorted(p for p in paths if p)


def thread_count():
    return len(os.listdir("/proc/self/task"))


class Zygote:
    def __init__(self, sock):
        self.sock = sock
        self.lib = None
        self.children = {}  # pidfd -> (id, pid)
        self.poller = select.poll()
        self.draining = False
        self.err = ctypes.create_string_buffer(ERR_CAP)

    # -- start-up ---------------------------------------------------------

    def init(self):
        started = time.monotonic()
        data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 0)
        if not data:
            os._exit(0)
        msg = json.loads(data)
        if msg.get("op") != "init":
            fatal(self.sock, f"expected init message, got {msg.get('op')!r}")
        if msg.get("wire") != WIRE_VERSION:
            fatal(
                self.sock,
                f"this zygote speaks wire version {WIRE_VERSION}, the daemon {msg.get('wire')!r}: "
                "the daemon and its zygote script come from different forkd builds; reinstall forkd",
            )
        try:
            lib = ctypes.CDLL(msg["lib"])
        except OSError as e:
            fatal(self.sock, f"cannot load forkd's native zygote library {msg['lib']}: {e}")
        lib.forkd_init.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        lib.forkd_child_isolate.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
        ]
        lib.forkd_info.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.forkd_info.restype = ctypes.c_int64
        lib.forkd_report_signals.argtypes = [ctypes.c_int]
        lib.forkd_terminating.argtypes = []
        lib.forkd_enter_userns.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.forkd_enter_userns_mapped.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t
        ]
        lib.forkd_branch_join.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.forkd_branch_seal.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        if msg.get("rootless"):
            self.become_namespace_root(lib, msg.get("subids"))
        config = msg["config"]
        config["interpreter_paths"] = interpreter_paths()
        raw = json.dumps(config).encode()
        # Before any preload import: forkd_init forks a helper and needs one thread.
        if lib.forkd_init(raw, len(raw), self.err, ERR_CAP) != 0:
            fatal(self.sock, "zygote init failed: " + self.err.value.decode(errors="replace"))
        self.lib = lib
        global _LIB
        _LIB = lib

        for name in msg.get("preload", []):
            send(self.sock, {"op": "importing", "module": name})
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                # Not installed: the fix, not importlib's frames.
                missing = e.name or name
                own = name == missing or name.startswith(missing + ".")
                fatal(
                    self.sock,
                    f"preload module {name!r} failed to import in {sys.executable} "
                    f"(Python {sys.version.split()[0]}): ModuleNotFoundError: {e}; install "
                    f"{'it' if own else repr(missing)} into that interpreter (e.g. "
                    f"{sys.executable} -m pip install {missing.split('.')[0]}) or remove "
                    f"{name!r} from the zygote's preload (--preload, or preload in the config)",
                )
            except BaseException:
                fatal(
                    self.sock,
                    f"preload module {name!r} failed to import in {sys.executable} "
                    f"(Python {sys.version.split()[0]}):\n{traceback.format_exc()}",
                )
        threads = thread_count()
        if threads != 1:
            fatal(
                self.sock,
                f"after importing {msg.get('preload')} the zygote runs {threads} threads; "
                "a preload module started a thread pool that the *_NUM_THREADS=1 variables "
                "did not stop, and forking would copy a broken process",
            )
        # Children get python's dispositions, whatever the daemon inherited
        # (done once here: forked children inherit them).
        reset_signal_dispositions()
        # Objects created so far are never collected in children: freezing them
        # keeps the collector from touching (and copying) the zygote's pages.
        gc.freeze()
        info = ctypes.create_string_buffer(1 << 16)
        n = lib.forkd_info(info, len(info))
        send(
            self.sock,
            {
                "op": "ready",
                "pid": os.getpid(),
                "python": sys.version.split()[0],
                "executable": sys.executable,
                "threads": threads,
                "preloaded": msg.get("preload", []),
                "init_ms": round((time.monotonic() - started) * 1000, 3),
                "native": json.loads(info.raw[:n]) if n > 0 else {},
            },
        )

    def become_namespace_root(self, lib, subids=None):
        """Rootless start: enter a user namespace of our own (mapping the
        daemon's subordinate ids too when it has some), then continue as
        pid 1 of a new pid namespace owned by it (so that pid namespaces made
        per sandbox can be left again with setns). The original process stays
        behind only to relay the inner zygote's exit to the daemon."""
        if subids:
            raw = json.dumps(subids).encode()
            failed = lib.forkd_enter_userns_mapped(raw, len(raw), self.err, ERR_CAP) != 0
        else:
            failed = lib.forkd_enter_userns(self.err, ERR_CAP) != 0
        if failed:
            fatal(self.sock, "rootless zygote: " + self.err.value.decode(errors="replace"))
        errno = lib.forkd_pidns_enter_new()
        if errno != 0:
            fatal(self.sock, f"rootless zygote: new pid namespace: {os.strerror(errno)}")
        pid = os.fork()
        if pid == 0:
            lib.forkd_die_with_parent()
            errno = lib.forkd_private_proc()
            if errno != 0:
                fatal(self.sock, f"rootless zygote: private /proc: {os.strerror(errno)}")
            return
        # Only the inner zygote may hold the control socket, so that its
        # death shows as EOF to the daemon.
        os.close(self.sock.detach())
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

    # -- serving ----------------------------------------------------------

    def serve(self):
        sock_fd = self.sock.fileno()
        self.poller.register(sock_fd, select.POLLIN)
        while True:
            for fd, _ in self.poller.poll():
                if fd == sock_fd:
                    self.on_message()
                else:
                    self.reap(fd)
            if self.draining and not self.children:
                os._exit(0)

    def on_message(self):
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 8)
        except InterruptedError:
            return
        if not data:
            # The daemon is gone: no one can report these sandboxes any more.
            self.kill_children()
            os._exit(0)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            return
        msg = json.loads(data)
        op = msg.get("op")
        if op == "spawn":
            self.spawn(msg, fds)
        elif op == "drain":
            self.draining = True
        else:
            for fd in fds:
                os.close(fd)

    def spawn(self, msg, fds):
        sid = msg["id"]
        if len(fds) not in (4, 5):
            for fd in fds:
                os.close(fd)
            send(self.sock, {"op": "spawn_error", "id": sid, "error": f"expected 4 or 5 fds, got {len(fds)}"})
            return
        spec = msg["spec"].encode()
        # A branch's child makes its pid namespace itself (below the parent
        # session's).
        branch = bool(msg.get("branch"))
        errno = 0 if branch else self.lib.forkd_pidns_enter_new()
        if errno != 0:
            for fd in fds:
                os.close(fd)
            send(self.sock, {"op": "spawn_error", "id": sid, "error": f"new pid namespace: {os.strerror(errno)}"})
            return
        try:
            pid = os.fork()
        except OSError as e:
            pid = -1
            error = f"fork: {e}"
        if pid == 0:
            self.child(spec, fds, bool(msg.get("parked")))  # never returns
        errno = 0 if branch else self.lib.forkd_pidns_restore()
        for fd in fds:
            os.close(fd)
        if errno != 0:
            # Every later fork would fail the same way: let the daemon restart us.
            fatal(self.sock, f"cannot return to the zygote's pid namespace: {os.strerror(errno)}")
        if pid < 0:
            send(self.sock, {"op": "spawn_error", "id": sid, "error": error})
            return
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (sid, pid)
        self.poller.register(pidfd, select.POLLIN)
        send(self.sock, {"op": "forked", "id": sid, "pid": pid}, [pidfd])

    def reap(self, pidfd):
        sid, pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        _, status, ru = os.wait4(pid, 0)
        os.close(pidfd)
        send(
            self.sock,
            {
                "op": "exited",
                "id": sid,
                "status": status,
                "utime_us": int(ru.ru_utime * 1e6),
                "stime_us": int(ru.ru_stime * 1e6),
                "maxrss_kb": ru.ru_maxrss,
            },
        )

    def kill_children(self):
        for pidfd in list(self.children):
            try:
                signal_pidfd(pidfd)
            except OSError:
                pass

    # -- in the child -----------------------------------------------------

    def child(self, spec, fds, parked):
        try:
            job_fd, stdout_fd, stderr_fd, status_fd = fds[:4]
            netns_fd = fds[4] if len(fds) == 5 else -1
            for src, dst in ((job_fd, 0), (stdout_fd, 1), (stderr_fd, 2), (status_fd, STATUS_FD)):
                os.dup2(src, dst)
            if self.lib.forkd_child_isolate(spec, len(spec), netns_fd, self.err, ERR_CAP) != 0:
                setup_failed("isolation failed: " + self.err.value.decode(errors="replace"))
        except BaseException:
            setup_failed("sandbox setup failed:\n" + traceback.format_exc())
        # Isolated: from here on only the job's own data is read.
        if parked:
            prefault()
        try:
            header = read_exact(0, 4)
            if header is None:
                os._exit(0)  # the daemon dropped this (warm-pool) child unused
            body = read_exact(0, int.from_bytes(header, "big"))
            if body is None:
                setup_failed("the job ended early")
            job = json.loads(body)
        except BaseException:
            setup_failed("reading the job failed:\n" + traceback.format_exc())
        if job.get("session") is not None:
            run_session(job)
        run_job(job, self.lib)


_LIB = None  # libforkd_zygote, once init loaded it


def signal_pidfd(pidfd):
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def read_exact(fd, n):
    """Exactly n bytes from fd (never more: what follows is the program's
    stdin), or None at EOF before them."""
    chunks, left = [], n
    while left:
        try:
            chunk = os.read(fd, min(left, 1 << 20))
        except InterruptedError:
            continue
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def setup_failed(message):
    try:
        os.write(STATUS_FD, TAG_SETUP_FAILED + message.encode(errors="replace")[:65536])
    finally:
        os._exit(126)


def write_inline_files(files):
    for f in files:
        path = f["path"]
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, f.get("mode") or 0o644)
        try:
            data = memoryview(base64.b64decode(f["content"]))
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)


def exit_code_of(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


# What a parked child runs while it waits (never output, never an import):
# the pages an ordinary job writes (allocator arenas, compiler, dicts, the
# JSON decoder) are copied from the zygote now instead of during a request.
PREFAULT_JOB = json.dumps({"program": {"code": "pass"}, "argv": [], "env": {"PATH": "/bin"}, "files": []})
PREFAULT_CODE = "x = [i * 2 for i in range(256)]\ny = {str(i): i for i in x}\nprint(len(y), sum(x), file=_sink)\n"
_reseeded = False


def prefault():
    """Touches, in a parked warm-pool child, what a job will write, and
    reseeds numpy's global generator now (each child is its own process, so
    its seed is its own either way)."""
    global _reseeded
    try:
        json.loads(PREFAULT_JOB)
        sink = io.StringIO()
        exec(compile(PREFAULT_CODE, "<prefault>", "exec"), {"__builtins__": builtins, "_sink": sink})
        np_random = sys.modules.get("numpy.random")
        if np_random is not None and not _reseeded:
            np_random.seed()
        _reseeded = True
    except BaseException:
        pass


# -- behaving as `python script.py` ------------------------------------------
# Pieces a program's runner needs (run_job here; a session executor too).

# Start-up variables the interpreter read once, when the zygote started, and
# that a forked child cannot take on: a request that sets one to a value other
# than the zygote's is refused (configure it in the zygote's env instead).
STARTUP_ONLY_ENV = (
    "PYTHONHASHSEED", "PYTHONOPTIMIZE", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE",
    "PYTHONUSERBASE", "PYTHONPLATLIBDIR", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONWARNINGS",
    "PYTHONDEVMODE", "PYTHONFAULTHANDLER", "PYTHONTRACEMALLOC", "PYTHONMALLOC",
    "PYTHONMALLOCSTATS", "PYTHONVERBOSE", "PYTHONDEBUG", "PYTHONINSPECT", "PYTHONCOERCECLOCALE",
    "PYTHONINTMAXSTRDIGITS", "PYTHONNODEBUGRANGES", "PYTHONPYCACHEPREFIX",
    "PYTHONWARNDEFAULTENCODING", "PYTHONPROFILEIMPORTTIME", "PYTHONEXECUTABLE", "PYTHONCASEOK",
    "PYTHONPERFSUPPORT",
)


_STARTUP_ONLY = frozenset(STARTUP_ONLY_ENV)


class StartupEnvError(Exception):
    """A request's environment asks for something only interpreter start-up can do."""


def _python_dispositions():
    # Plain ints, used with _signal: the signal module's wrappers build enum
    # members in Python for every call.
    out = []
    for sig in map(int, signal.valid_signals()):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig == signal.SIGINT:
            out.append((sig, signal.default_int_handler))
        elif sig in (signal.SIGPIPE, signal.SIGXFSZ):
            out.append((sig, int(signal.SIG_IGN)))
        else:
            out.append((sig, int(signal.SIG_DFL)))
    return tuple(out)


PYTHON_DISPOSITIONS = _python_dispositions()


def reset_signal_dispositions():
    """Sets the signal dispositions of a `python` started from a shell
    (SIGINT raises KeyboardInterrupt, SIGPIPE and SIGXFSZ ignored, everything
    else default, nothing blocked), whatever the daemon inherited (`nohup`, a
    `cmd &` shell, a service manager). The zygote calls it once, before it
    forks; a child that changed them (a session's executor) calls it again
    before user code. Only differing entries are touched."""
    getsignal = _signal.getsignal
    for sig, want in PYTHON_DISPOSITIONS:
        if getsignal(sig) != want:
            try:
                _signal.signal(sig, want)
            except (OSError, ValueError, RuntimeError):
                pass
    if _signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        _signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _unset(value):
    # Python treats an empty PYTHON* variable as unset.
    return value is None or value == ""


def _std_stream(fd, name, errors, unbuffered):
    # As CPython's create_stdio (no terminal: stdout is never line-buffered).
    raw = io.FileIO(fd, "w", closefd=False)
    raw.name = name
    buf = raw if unbuffered else io.BufferedWriter(raw)
    stream = io.TextIOWrapper(buf, encoding=sys.stdout.encoding, errors=errors, newline="\n",
                              line_buffering=not unbuffered and fd == 2, write_through=unbuffered)
    stream.mode = "w"
    return stream


def line_buffer(names):
    """The client's stream is a terminal: line-buffer ours as CPython's
    create_stdio does on one (not under -u/PYTHONUNBUFFERED, which writes
    through). The stream stays a pipe, so isatty() is still False."""
    for name in names:
        stream = sys.stdout if name == "stdout" else sys.stderr if name == "stderr" else None
        if stream is not None and not stream.write_through and not stream.line_buffering:
            stream.reconfigure(line_buffering=True)


def apply_startup_env(env):
    """Applies what `python` reads from the environment at start-up, as if
    `env` had been set before the interpreter started: PYTHONPATH (sys.path
    after sys.path[0]), TZ (time.tzset), PYTHONUNBUFFERED, PYTHONDONTWRITEBYTECODE.
    Raises StartupEnvError for a start-up-only variable whose value differs
    from the zygote's (it could not take effect)."""
    for name in sorted(_STARTUP_ONLY.intersection(env)):
        want, have = env[name], STARTUP_ENV.get(name)
        if name == "PYTHONHASHSEED":
            # "random" and unset both mean a random secret (the zygote's).
            want = None if want == "random" else want
            have = None if have == "random" else have
        if _unset(want) or want == have:
            continue
        raise StartupEnvError(
            f"{name}={want} cannot take effect in a sandbox: Python reads it only at interpreter "
            f"start-up, and sandboxes are forked from a running zygote started with "
            f"{name}={'(unset)' if _unset(have) else have}; set it in the zygote's env in the "
            f"daemon configuration ([[zygote]] env = {{ {name} = \"{want}\" }}) and send the request "
            f"to that zygote"
        )
    pythonpath = env.get("PYTHONPATH")
    if not _unset(pythonpath):
        # As getpath + site.removeduppaths: absolute, first occurrence wins.
        entries = [os.path.abspath(p) for p in pythonpath.split(os.pathsep)] + sys.path[1:]
        seen = set()
        sys.path[1:] = [p for p in entries if not (p in seen or seen.add(p))]
    if env.get("TZ") != STARTUP_ENV.get("TZ"):
        # The C library read TZ in the zygote; os.environ is already env.
        time.tzset()
    sys.dont_write_bytecode = not _unset(env.get("PYTHONDONTWRITEBYTECODE"))
    unbuffered = not _unset(env.get("PYTHONUNBUFFERED"))
    if unbuffered != (not _unset(STARTUP_ENV.get("PYTHONUNBUFFERED"))):
        # The zygote built its streams the other way (`python -u` has no
        # buffer under either text stream).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        sys.stdout = sys.__stdout__ = _std_stream(1, "<stdout>", sys.stdout.errors, unbuffered)
        sys.stderr = sys.__stderr__ = _std_stream(2, "<stderr>", "backslashreplace", unbuffered)
        try:
            # stdin stays buffered under -u; only its write_through follows.
            sys.stdin.reconfigure(write_through=unbuffered)
        except (AttributeError, ValueError, OSError):
            pass
    apply_thread_pools(thread_pool_settings(env))


# Thread pools of native libraries the zygote may have loaded at one thread
# (see the top of this file): a request's *_NUM_THREADS takes effect through
# the library's own setter, as threadpoolctl does. Each entry: a substring of
# the library's file name, the variables it reads at load, in its order of
# precedence, and its setter's possible names.
_THREAD_POOLS = (
    ("openblas", ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"),
     ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
      "openblas_set_num_threads64_", "openblas_set_num_threads")),
    ("mkl_rt", ("MKL_NUM_THREADS", "OMP_NUM_THREADS"), ("MKL_Set_Num_Threads",)),
    ("libgomp", ("OMP_NUM_THREADS",), ("omp_set_num_threads",)),
    ("libomp", ("OMP_NUM_THREADS",), ("omp_set_num_threads",)),
    ("libblis", ("BLIS_NUM_THREADS", "OMP_NUM_THREADS"), ("bli_thread_set_num_threads",)),
)
_THREAD_VARS = frozenset(v for _, names, _ in _THREAD_POOLS for v in names)


def _positive(value):
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def thread_pool_settings(env):
    """(setter, threads) for each loaded pool whose count `env` changes from
    the zygote's one thread; [] on the common path (every such variable 1 or
    unset). Raises StartupEnvError when a loaded pool has no setter."""
    if all(env.get(v) in (None, "1") for v in _THREAD_VARS):
        return []
    cpus = len(os.sched_getaffinity(0))
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and ".so" in line}
    settings = []
    for marker, names, setters in _THREAD_POOLS:
        for path in sorted(p for p in paths if marker in os.path.basename(p)):
            # As the library reads them at load: the first positive one, at
            # most the CPUs this process may run on; none: every CPU.
            n = next((m for m in (_positive(env.get(v)) for v in names) if m is not None), cpus)
            n = min(n, cpus)
            lib = ctypes.CDLL(path)
            setter = next((getattr(lib, s) for s in setters if hasattr(lib, s)), None)
            if setter is None:
                raise StartupEnvError(
                    f"{'/'.join(names)} cannot take effect in a sandbox: {os.path.basename(path)} was loaded by "
                    f"the zygote with one thread and has no setter forkd knows; set it in the zygote's env in the "
                    f"daemon configuration ([[zygote]] env = {{ {names[0]} = \"{n}\" }}) and send the request to that zygote"
                )
            settings.append((setter, n))
    return settings


def apply_thread_pools(settings):
    for setter, n in settings:
        setter(ctypes.c_int(n))


def prepare_main(program, argv):
    """A fresh `__main__` with what `python -c`, `python FILE` or `python -m`
    put in it, sys.argv and sys.path[0] set the same way. Returns the module."""
    script, module = program.get("script"), program.get("module")
    main = types.ModuleType("__main__")
    d = main.__dict__
    if script is not None:
        sys.argv = [script] + list(argv)
        # Absolute as python makes it, but not normalized (`/w/./a/../x.py`).
        path = os.path.join(os.getcwd(), script)
        sys.path[0] = os.path.dirname(os.path.realpath(script))
        d["__loader__"] = importlib.machinery.SourceFileLoader("__main__", path)
    else:
        sys.argv = ["-m" if module is not None else "-c"] + list(argv)
        sys.path[0] = os.getcwd() if module is not None else ""
        d["__loader__"] = importlib.machinery.BuiltinImporter
    d["__annotations__"] = {}
    d["__builtins__"] = builtins
    if script is not None:
        d["__file__"] = path
        d["__cached__"] = None
    sys.modules["__main__"] = main
    return main


def run_main(program, main):
    """Runs the program in `main` as python would; returns (exit code, the
    uncaught exception or None) after reporting that exception."""
    try:
        script, module = program.get("script"), program.get("module")
        if module is not None:
            # What `python -m` itself calls (its frames show in tracebacks there too).
            runpy._run_module_as_main(module, alter_argv=True)
        else:
            if script is not None:
                try:
                    with open(script, "rb") as f:
                        source = f.read()
                except OSError as e:
                    print(f"{sys.executable}: can't open file {main.__file__!r}: "
                          f"[Errno {e.errno}] {e.strerror}", file=sys.stderr)
                    return 2, None
                compiled = compile(source, main.__file__, "exec")
            else:
                compiled = compile(program.get("code", ""), "<string>", "exec")
            exec(compiled, main.__dict__)
    except SystemExit as e:
        return exit_code_of(e), None
    except BaseException as e:
        uncaught = e
    else:
        return 0, None
    if isinstance(uncaught, KeyboardInterrupt) and _LIB is not None and _LIB.forkd_terminating():
        # The daemon's timeout stopped it (SIGTERM, turned into this
        # interrupt so that finally and atexit ran): no traceback of ours.
        return 128 + signal.SIGTERM, uncaught
    # Outside the except block: an exception the hook raises must not
    # chain onto this one (the interpreter's hook call has no context).
    report_uncaught(uncaught)
    return 1, uncaught


def strip_runner_frames(exc):
    """Drops forkd's own frames from the head of exc's traceback, so the
    user's code starts it (a SyntaxError from compile() is left with none,
    and prints without a "Traceback" header, as python does)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code in _RUNNER_CODES:
        tb = tb.tb_next
    exc.__traceback__ = tb
    return tb


def format_user_traceback(exc):
    """The text python would print for exc uncaught (the default hook's)."""
    tb = strip_runner_frames(exc)
    return "".join(traceback.format_exception(type(exc), exc, tb))


def report_uncaught(exc):
    """Reports an uncaught exception as the interpreter does: sys.last_*
    set, then sys.excepthook (the user's, if they set one)."""
    tb = strip_runner_frames(exc)
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    if sys.version_info >= (3, 12):
        sys.last_exc = exc
    hook = getattr(sys, "excepthook", None)
    try:
        if hook is None:
            print("sys.excepthook is missing", file=sys.stderr)
            sys.__excepthook__(type(exc), exc, tb)
        else:
            hook(type(exc), exc, tb)
    except BaseException as hook_exc:
        try:
            print("Error in sys.excepthook:", file=sys.stderr)
            sys.__excepthook__(type(hook_exc), hook_exc, strip_runner_frames(hook_exc))
            print("\nOriginal exception was:", file=sys.stderr)
            sys.__excepthook__(type(exc), exc, tb)
        except BaseException:
            pass


def finalize_like_python():
    """What Py_FinalizeEx does first, in its order: join non-daemon threads
    (threading._shutdown), then run atexit functions (clear_main_module is
    the next step)."""
    threading = sys.modules.get("threading")
    # Only when there is something to do: the call writes to objects of the
    # zygote's (copy-on-write faults in every child).
    if threading is not None and (threading._shutdown_locks or threading._threading_atexits):
        try:
            threading._shutdown()
        except BaseException as e:
            report_uncaught(e)
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass


def clear_main_module():
    """As Py_FinalizeEx's module teardown, for `__main__` (the rest of the
    process is the zygote's and dies with it): after flushing stdout and
    stderr, the module's globals are cleared as _PyModule_ClearDict does
    (names with one leading underscore first, never __builtins__), then
    cycles are collected, so `__del__` methods run and files the program
    left open are flushed. Clearing before collecting releases each global
    by reference count, in order: a text file is then closed before the
    buffer under it (a collection could finalize them in either order and
    lose the text layer's pending data)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    main = sys.modules.pop("__main__", None)
    if main is not None:
        d = main.__dict__
        del main
        for first in (True, False):
            for key in list(d):
                if key == "__builtins__" or not isinstance(key, str):
                    continue
                if first != (key.startswith("_") and not key.startswith("__")):
                    continue
                try:
                    d[key] = None
                except BaseException:
                    pass
        del d
    # A full collection also empties the interpreter's free lists (zygote
    # pages: copy-on-write faults), so it is made only when the program ran
    # long enough for its objects to reach the oldest generation.
    if gc.get_stats()[1]["collections"] != _young_collections_at_start:
        gc.collect()
    else:
        gc.collect(1)


_young_collections_at_start = 0


def mark_program_start():
    """Called as the program starts: what the zygote left tracked is moved
    out of the collector's way (gc.freeze splices lists: no object is
    touched), and clear_main_module can tell whether the program's objects
    may have reached the oldest generation."""
    global _young_collections_at_start
    gc.freeze()
    _young_collections_at_start = gc.get_stats()[1]["collections"]


def run_job(job, lib):
    """Runs the user's program in this (isolated) process; never returns."""
    try:
        # `random` was reseeded by os.fork's after-fork hook; numpy's global
        # RandomState was seeded once at import and is shared by every child.
        np_random = sys.modules.get("numpy.random")
        if np_random is not None and not _reseeded:
            np_random.seed()
        env = job.get("env", {})
        os.environ.clear()
        os.environ.update(env)
        interpreter_bin_first(os.environ)
        try:
            write_inline_files(job.get("files", []))
        except OSError as e:
            setup_failed(f"writing inline file {e.filename!r} into the scratch directory failed: {e.strerror}")
        program = job["program"]
        main = prepare_main(program, job.get("argv", []))
        try:
            apply_startup_env(env)
        except StartupEnvError as e:
            setup_failed(str(e))
        line_buffer(job.get("line_buffered", ()))
        errno = lib.forkd_report_signals(STATUS_FD)
        if errno != 0:
            setup_failed(f"installing signal reporters failed: {os.strerror(errno)}")
        # Programs it execs must not inherit the report channel.
        os.set_inheritable(STATUS_FD, False)
        mark_program_start()
        os.write(STATUS_FD, TAG_STARTED)
    except BaseException:
        if lib.forkd_terminating():
            # The timeout's SIGTERM came just before the program started.
            os._exit(128 + signal.SIGTERM)
        setup_failed("sandbox setup failed:\n" + traceback.format_exc())

    code, uncaught = run_main(program, main)
    interrupted = isinstance(uncaught, KeyboardInterrupt)
    terminated = interrupted and code == 128 + signal.SIGTERM
    del uncaught, main
    finalize_like_python()
    try:
        clear_main_module()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            # As Py_FinalizeEx: a stream the program closed is left alone.
            if stream is not None and not stream.closed:
                stream.flush()
        except BaseException:
            if code == 0:
                code = 120
    if terminated:
        # As python killed by SIGTERM (the reporter for SIG_DFL tells the daemon).
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(code)
    if interrupted:
        # As python: end by SIGINT itself (the shell sees 130). This process
        # is pid 1 of its namespace, where a self-sent default signal is
        # dropped, so the reporter installed for SIG_DFL tells the daemon.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        lib.forkd_report_signals(STATUS_FD)
        os.kill(os.getpid(), signal.SIGINT)
        os._exit(128 + signal.SIGINT)
    # Report before the kernel tears this process down: with stdout/stderr
    # closed and the exit code sent, the daemon can answer while this
    # process's memory and namespaces are still being freed.
    try:
        os.close(1)
        os.close(2)
        os.write(STATUS_FD, TAG_FINISHED + bytes([code & 0xFF]))
    except OSError:
        pass
    # The result is out: freeing this process's memory and namespaces now
    # runs at the lowest priority, behind the next request. (Nice 19, not
    # SCHED_IDLE: under other load an idle-class teardown can starve for
    # seconds and hold its memory and cgroup that long.)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except OSError:
        pass
    os._exit(code)


_RUNNER_CODES = frozenset((run_job.__code__, run_main.__code__, report_uncaught.__code__))


# -- sessions ---------------------------------------------------------------
#
# A session child's pid 1 is the executor (Executor below): it never runs user
# code. It reads ToExecutor frames (zygote/src/wire.rs) from fd 0, after the
# job, and writes FromExecutor frames to fd 1; fd 2 takes its own diagnostics.
# It forks the interpreter ("kernel") that runs the cells, with fresh pipes
# only: the kernel holds no descriptor of the daemon's channels, and since
# the executor is non-dumpable the sandbox's uid cannot open /proc/1/fd or
# /proc/1/mem (ptrace and pidfd_getfd are refused by seccomp). File
# operations and commands are carried out by the executor itself, inside the
# same sandbox (same landlock, seccomp, mounts and uid), so a path reaches
# exactly what the sandbox's own code could reach.
#
# executor <-> kernel (private to this file): 4-byte big-endian length +
# JSON, on the kernel's fds 3 (cells in) and 4 (displays and results out).

EXEC_HEADER_MAX = 12 << 20
EXEC_PAYLOAD_MAX = 8 << 20
KERNEL_MESSAGE_MAX = 12 << 20
OUTPUT_CHUNK = 64 << 10
STDIN_QUEUE_MAX = 16 << 20  # bytes of a command's stdin the executor holds for it
# os.read(fd, n) allocates n bytes first: 1 MiB costs ~20 us (an mmap and
# munmap) where 64 KiB costs ~1 us, so reads start small and grow only while
# they come back full (a file transfer), shrinking again after.
SMALL_READ = 64 << 10
LARGE_READ = 1 << 20


def read_size(last_read, last_size):
    """The size of the next read of a stream, from the last one's result."""
    return LARGE_READ if last_read >= last_size else SMALL_READ
PR_SET_DUMPABLE = 4
_libc = None


def exec_frame(header, payload=b""):
    data = json.dumps(header).encode()
    return len(data).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + data + payload


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue


def set_dumpable(flag):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(PR_SET_DUMPABLE, 1 if flag else 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")


def interpreter_bin_first(env):
    """Puts the zygote interpreter's directory (a venv's bin: its python,
    pip and scripts) first on PATH, as activating the venv would."""
    bin_dir = os.path.dirname(sys.executable)
    parts = [p for p in env.get("PATH", "").split(":") if p and p != bin_dir]
    env["PATH"] = ":".join([bin_dir] + parts)


def run_session(job):
    """Becomes the session's executor; never returns."""
    try:
        np_random = sys.modules.get("numpy.random")
        if np_random is not None and not _reseeded:
            np_random.seed()
        os.environ.clear()
        os.environ.update(job.get("env", {}))
        interpreter_bin_first(os.environ)
        cfg = job["session"]
        # Checked here (a refusal fails the session's creation), applied in
        # the interpreter: the executor itself runs no BLAS.
        try:
            thread_pool_settings(os.environ)
        except StartupEnvError as e:
            setup_failed(str(e))
        os.makedirs(cfg["cwd"], exist_ok=True)
        os.chdir(cfg["cwd"])
        # pid 1 of the sandbox: nothing in it may interrupt the executor.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # (A branch's executor stays dumpable until the copy has joined: the
        # kernel lets the copy enter its namespaces only then.)
        if cfg.get("adopt") is None:
            set_dumpable(False)
        os.set_inheritable(STATUS_FD, False)
        # fd 1 carries frames: a stray print must not corrupt it.
        sys.stdout = sys.stderr
        executor = Executor(cfg)
        if executor.adopt_dir is not None:
            # A branch's channels exist before anyone hears it started: the
            # copy may arrive as soon as the daemon does.
            executor.await_copy(executor.adopt_dir)
        os.write(STATUS_FD, TAG_STARTED)
    except BaseException:
        setup_failed("session setup failed:\n" + traceback.format_exc())
    try:
        executor.serve()
    except BaseException:
        try:
            traceback.print_exc()
        finally:
            os._exit(70)
    os._exit(0)


def move_fds(targets):
    """dup2s (source, target) pairs without one clobbering another's source,
    then closes every other descriptor from len(targets) up."""
    high = [fcntl.fcntl(src, fcntl.F_DUPFD, len(targets)) for src, _ in targets]
    for fd, (_, target) in zip(high, targets):
        os.dup2(fd, target)
    os.closerange(len(targets), 1 << 20)


def file_error(req, e, path=None):
    name = e.filename if e.filename is not None else (path or "")
    if isinstance(e, FileNotFoundError):
        return {"op": "failed", "req": req, "code": "not_found", "message": f"{name}: no such file or directory"}
    if e.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT):
        what = "the session's scratch space is full (limits.scratch_bytes)"
    elif e.errno == errno_codes.EFBIG:
        what = "the file is larger than limits.file_size_bytes allows"
    else:
        what = e.strerror or str(e)
    return {"op": "failed", "req": req, "code": "file_error", "message": f"{name}: {what}"}


def entry_of(path, name=None):
    st = os.lstat(path)
    if stat_mode.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat_mode.S_ISREG(st.st_mode):
        kind = "file"
    elif stat_mode.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": name if name is not None else os.path.basename(path.rstrip("/")) or "/",
        "path": os.path.abspath(path),
        "type": kind,
        "size": st.st_size,
        "mode": stat_mode.S_IMODE(st.st_mode),
        "modified_ms": int(st.st_mtime * 1000),
    }


class Stream:
    """One output pipe of the kernel or of a command."""

    def __init__(self, fd, name):
        self.fd = fd
        self.name = name
        os.set_blocking(fd, False)


class Running:
    """A cell or command whose output is being forwarded."""

    def __init__(self, req):
        self.req = req
        self.used = 0
        self.truncated = {"stdout": False, "stderr": False}
        self.interrupted_at = None
        self.branch = False  # a branch request in the kernel, not a cell
        self.checkpoint = None  # the id, for a checkpoint request in the kernel


RESTORE_WAIT = 10.0  # seconds a woken checkpoint copy may take to say hello
SCRATCH_ROOTS = ("/tmp", "/dev/shm")
CHANNELS = ("out", "err", "cell", "res")


def restore_dir(pid):
    """Where the executor makes the channels of checkpoint copy `pid`."""
    return f"/tmp/.forkd-restore-{pid}"


def our_live_child(pid):
    """True when pid is a living child of this process (a dead one is reaped)."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def describe_status(status):
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _owner_may(path, st, bits):
    """Adds `bits` to the owner's mode of path when the owner (this uid)
    lacks them (a file the user made unreadable); returns the old mode to put
    back, or None."""
    mode = stat_mode.S_IMODE(st.st_mode)
    if mode & bits == bits or st.st_uid != os.geteuid():
        return None
    os.chmod(path, mode | bits, follow_symlinks=False)
    return mode


def copy_bytes(src, dst, count, offset):
    """Copies count bytes of src at offset to dst's position (in the kernel)."""
    while count > 0:
        n = os.sendfile(dst, src, offset, min(count, 1 << 30))
        if n == 0:
            raise OSError(errno_codes.EIO, "the file shrank while being copied")
        offset += n
        count -= n


class ScratchCopy:
    """A checkpoint's copy of the scratch (/tmp, /dev/shm): the entries in
    this executor's memory, the file contents in a memfd only it holds. Code
    in the session cannot reach it (the executor is not dumpable: its
    /proc/1/fd is closed to that code), and it is charged to the session's
    memory cgroup. Nothing on another filesystem (a bind mount under /tmp)
    is entered; the executor copies with exactly the rights the user's code
    has, so the copy can hold nothing that code could not read."""

    def __init__(self):
        self.fd = os.memfd_create("forkd-checkpoint", os.MFD_CLOEXEC)
        self.entries = []  # (root, rel, kind, mode, atime_ns, mtime_ns, offset, size, link)
        self.size = 0

    def close(self):
        os.close(self.fd)

    def take(self):
        for root in SCRATCH_ROOTS:
            self._walk(root, root, "", os.lstat(root).st_dev, {})

    def _walk(self, root, path, rel, dev, inodes):
        # A directory the user made unreadable or untraversable is opened
        # for the walk (as its owner could) and closed again after it.
        old = _owner_may(path, os.lstat(path), 0o500)
        try:
            self._walk_open(root, path, rel, dev, inodes)
        finally:
            if old is not None:
                os.chmod(path, old)

    def _walk_open(self, root, path, rel, dev, inodes):
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if not rel and name.startswith(".forkd-"):
                continue  # forkd's own hand-over directories
            full = f"{path}/{name}"
            r = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if st.st_dev != dev:
                continue  # a mount point (an interpreter bound under /tmp)
            times = (st.st_atime_ns, st.st_mtime_ns)
            mode = stat_mode.S_IMODE(st.st_mode)
            if stat_mode.S_ISDIR(st.st_mode):
                self.entries.append((root, r, "dir", mode, *times, 0, 0, None))
                self._walk(root, full, r, dev, inodes)
            elif stat_mode.S_ISREG(st.st_mode):
                if st.st_nlink > 1 and st.st_ino in inodes:
                    self.entries.append((root, r, "link", mode, *times, 0, 0, inodes[st.st_ino]))
                    continue
                inodes[st.st_ino] = (root, r)
                old = _owner_may(full, st, 0o400)
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                finally:
                    if old is not None:
                        os.chmod(full, old)
                try:
                    size = os.fstat(fd).st_size
                    copy_bytes(fd, self.fd, size, 0)
                finally:
                    os.close(fd)
                self.entries.append((root, r, "file", mode, *times, self.size, size, None))
                self.size += size
            elif stat_mode.S_ISLNK(st.st_mode):
                self.entries.append((root, r, "symlink", mode, *times, 0, 0, os.readlink(full)))
            elif stat_mode.S_ISFIFO(st.st_mode):
                self.entries.append((root, r, "fifo", mode, *times, 0, 0, None))
            # sockets (nothing listens on them after a restore) are left out

    def restore(self):
        """Empties the scratch, then puts the copy back."""
        for root in SCRATCH_ROOTS:
            _wipe(root, os.lstat(root).st_dev)
        dirs = []
        for root, rel, kind, mode, atime, mtime, offset, size, link in self.entries:
            full = f"{root}/{rel}"
            if kind == "dir":
                try:
                    os.mkdir(full, 0o700)
                except FileExistsError:
                    # Kept by the wipe: it holds a mount point (the sandbox's
                    # set-up made it, as root), so it stays as it is.
                    continue
                dirs.append((full, mode, atime, mtime))
            elif kind == "file":
                fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    copy_bytes(self.fd, fd, size, offset)
                    os.fchmod(fd, mode)
                    os.utime(fd, ns=(atime, mtime))
                finally:
                    os.close(fd)
            elif kind == "link":
                os.link(f"{link[0]}/{link[1]}", full)
            elif kind == "symlink":
                os.symlink(link, full)
                os.utime(full, ns=(atime, mtime), follow_symlinks=False)
            elif kind == "fifo":
                os.mkfifo(full, mode)
                os.utime(full, ns=(atime, mtime))
        for full, mode, atime, mtime in reversed(dirs):
            os.chmod(full, mode)
            os.utime(full, ns=(atime, mtime))


def _real_uid(pid):
    """The real uid of process pid (None when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _wipe(path, dev):
    """Removes what path holds on its own filesystem (mount points and the
    directories above them stay)."""
    st = os.lstat(path)
    _owner_may(path, st, 0o700)
    with os.scandir(path) as it:
        names = [e.name for e in it]
    for name in names:
        full = f"{path}/{name}"
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue
        if st.st_dev != dev:
            continue
        if stat_mode.S_ISDIR(st.st_mode):
            _wipe(full, dev)
            try:
                os.rmdir(full)
            except OSError as e:
                if e.errno not in (errno_codes.ENOTEMPTY, errno_codes.EBUSY):
                    raise
        else:
            os.unlink(full)


class Executor:
    def __init__(self, cfg):
        self.adopt_dir = cfg.get("adopt")
        self.adopt_req = None  # the daemon's adopt request, until the copy arrives
        self.cap = int(cfg["output_bytes"])
        self.grace = int(cfg["interrupt_grace_ms"]) / 1000
        self.cwd = cfg["cwd"]
        self.poller = select.poll()
        self.handlers = {}
        # Descriptors closed while a batch of poll events is handled: a later
        # event of the batch may name the same number, reused by a new pipe
        # (a replaced interpreter's), which must not be read on its behalf.
        self.closed = set()
        self.inbuf = bytearray()
        self.daemon_read = SMALL_READ
        self.kernel_read = SMALL_READ
        self.queue = collections.deque()
        self.cell = None  # Running for the cell in the kernel
        self.kernel = None  # dict: pid, cell_w, res_r, streams
        self.kernel_buf = bytearray()
        self.execution_count = 0
        self.commands = {}  # pid -> (Running, Popen, [Stream])
        # pid -> {"file": Popen.stdin (None once closed), "buf": bytes queued, "eof": closing}
        self.stdins = {}
        # id -> {"pid": the frozen copy (our child), "scratch": ScratchCopy, "restores": n}
        self.checkpoints = {}
        self.restoring = None  # {"req", "id", "pid", "dir", "deadline"} while a copy wakes
        self.dormant = False  # ended keeping checkpoints: no interpreter until a restore
        self.devnull = os.open("/dev/null", os.O_RDWR)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.watch(0, self.on_daemon)
        self.watch(wake_r, self.on_wake)

    def watch(self, fd, handler):
        self.handlers[fd] = handler
        self.poller.register(fd, select.POLLIN)

    def unwatch(self, fd):
        """Stops watching fd and closes it (only if it was watched: a
        descriptor number must never be closed twice)."""
        if self.handlers.pop(fd, None) is None:
            return
        self.closed.add(fd)
        self.poller.unregister(fd)
        try:
            os.close(fd)
        except OSError:
            pass

    def send(self, header, payload=b""):
        write_all(1, exec_frame(header, payload))

    # -- the loop ----------------------------------------------------------

    def serve(self):
        if self.adopt_dir is None:
            self.start_kernel()
        while True:
            timeout = None
            if self.escalation_pending():
                left = self.cell.interrupted_at + self.grace - time.monotonic()
                timeout = max(0, int(left * 1000) + 1)
            if self.restoring is not None:
                left = max(0, int((self.restoring["deadline"] - time.monotonic()) * 1000) + 1)
                timeout = left if timeout is None else min(timeout, left)
            try:
                events = self.poller.poll(timeout)
            except InterruptedError:
                events = []
            self.closed.clear()
            for fd, _ in events:
                handler = self.handlers.get(fd)
                if handler is not None and fd not in self.closed:
                    handler(fd)
            if self.escalation_pending() and time.monotonic() >= self.cell.interrupted_at + self.grace:
                # The cell ignored SIGINT: the interpreter goes, its state with it.
                self.kill_kernel()
            if self.restoring is not None and time.monotonic() >= self.restoring["deadline"]:
                self.restore_failed(f"its copy did not come back within {RESTORE_WAIT:g} s")

    def escalation_pending(self):
        """An interrupted cell is running in a kernel not yet killed."""
        return (
            self.cell is not None
            and self.cell.interrupted_at is not None
            and self.kernel is not None
            and not self.kernel.get("killed")
        )

    def on_daemon(self, fd):
        try:
            data = os.read(fd, self.daemon_read)
        except InterruptedError:
            return
        self.daemon_read = read_size(len(data), self.daemon_read)
        if not data:
            # The daemon closed the session: end everything.
            self.kill_kernel()
            for pid in list(self.commands):
                self.kill_group(pid)
            os._exit(0)
        self.inbuf += data
        while len(self.inbuf) >= 8:
            hlen = int.from_bytes(self.inbuf[0:4], "big")
            plen = int.from_bytes(self.inbuf[4:8], "big")
            if hlen > EXEC_HEADER_MAX or plen > EXEC_PAYLOAD_MAX:
                raise RuntimeError(f"daemon frame of {hlen}+{plen} bytes")
            if len(self.inbuf) < 8 + hlen + plen:
                return
            msg = json.loads(bytes(self.inbuf[8:8 + hlen]))
            payload = bytes(self.inbuf[8 + hlen:8 + hlen + plen])
            del self.inbuf[:8 + hlen + plen]
            self.dispatch(msg, payload)

    def dispatch(self, msg, payload):
        op = msg["op"]
        req = msg["req"]
        if op == "cell":
            self.queue.append((req, msg["code"]))
            self.next_cell()
        elif op == "interrupt":
            self.interrupt(req)
        elif op == "command":
            self.start_command(req, msg)
        elif op == "branch":
            self.queue.append((req, {"targets": msg["targets"], "same_seed": msg["same_seed"], "force": msg["force"]}))
            self.next_cell()
        elif op == "checkpoint":
            self.queue.append((req, {"checkpoint": msg["id"], "force": msg["force"]}))
            self.next_cell()
        elif op == "restore" and self.dormant:
            # The session ended keeping checkpoints and comes back: no
            # interpreter runs, so the restore is not queued behind one.
            self.dormant = False
            ck = self.checkpoints.get(msg["id"])
            if ck is None or ck["pid"] is None or not our_live_child(ck["pid"]):
                self.start_kernel()  # lost: it goes on with a fresh one
            self.begin_restore(req, msg["id"])
        elif op == "restore":
            self.queue.append((req, {"restore": msg["id"]}))
            self.next_cell()
        elif op == "drop_checkpoint":
            self.send(self.drop_checkpoint(req, msg["id"]))
        elif op == "retire":
            self.retire(req, msg.get("keep") or [])
        elif op == "adopt":
            self.adopt_req = req
            if self.kernel is not None and self.kernel["pid"] is not None:
                self.adopted()
        elif op == "command_input":
            self.send(self.command_input(req, msg["pid"], payload, msg["eof"]))
        elif op == "kill_command":
            pid = msg["pid"]
            if pid in self.commands:
                self.kill_group(pid)
                self.send({"op": "done", "req": req})
            else:
                self.send({"op": "failed", "req": req, "code": "not_found", "message": f"no running command with pid {pid}"})
        else:
            reply = self.file_op(op, req, msg, payload)
            if reply is not None:  # a read sends its own, with the data
                self.send(reply)

    def on_wake(self, fd):
        try:
            while os.read(fd, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.kernel is not None and pid == self.kernel["pid"]:
                self.kernel_died(status)
            elif pid in self.commands:
                self.command_done(pid, status)
            elif self.restoring is not None and pid == self.restoring["pid"]:
                self.restore_failed(f"its copy ended ({describe_status(status)})")
            else:
                for ck in self.checkpoints.values():
                    if ck["pid"] == pid:
                        ck["pid"] = None  # lost: killed from inside the session

    # -- output --------------------------------------------------------------

    def forward(self, stream, running):
        """Reads what the pipe holds; forwards it within the output budget.
        Returns False at EOF."""
        while True:
            try:
                data = os.read(stream.fd, OUTPUT_CHUNK)
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            if not data:
                return False
            if running is None:
                continue  # output between cells belongs to no request
            room = max(0, self.cap - running.used)
            if len(data) > room:
                data = data[:room]
                if not running.truncated[stream.name]:
                    running.truncated[stream.name] = True
                    self.over_budget(running)
            running.used += len(data)
            if data:
                self.send({"op": "output", "req": running.req, "stream": stream.name}, data)

    def over_budget(self, running):
        if running is self.cell:
            self.interrupt(running.req)
        else:
            for pid, (r, _, _) in self.commands.items():
                if r is running:
                    self.kill_group(pid)
                    break

    # -- the kernel ------------------------------------------------------------

    def await_copy(self, d):
        """Makes the channels a copied interpreter opens (FIFOs in directory
        d of the scratch) and waits for its hello on them: a branch's copy of
        its parent's interpreter, or a checkpoint's copy being restored. The
        FIFOs are open read-write here, so that none reports end-of-file
        before the copy has opened it; the copy's end is learned from a pidfd
        (a branch's copy: not our child) or a wait status."""
        os.mkdir(d, 0o700)
        fds = {}
        for name in CHANNELS:
            os.mkfifo(f"{d}/{name}", 0o600)
            fds[name] = os.open(f"{d}/{name}", os.O_RDWR | os.O_CLOEXEC)
        streams = {fds["out"]: Stream(fds["out"], "stdout"), fds["err"]: Stream(fds["err"], "stderr")}
        drain = select.poll()
        for fd in streams:
            drain.register(fd, select.POLLIN)
        self.kernel = {
            "pid": None, "cell_w": fds["cell"], "res_r": fds["res"], "streams": streams,
            "drain": drain, "pidfd": None,
        }
        self.kernel_buf = bytearray()
        os.set_blocking(fds["res"], False)
        for fd in streams:
            self.watch(fd, self.on_kernel_output)
        self.watch(fds["res"], self.on_kernel_result)

    def on_copy_hello(self, msg):
        """The copy arrived: it names its pid (in this branch's pid namespace)."""
        pid = msg.get("pid")
        if self.restoring is not None:
            self.restored(pid, msg.get("again"))
            return
        if not isinstance(pid, int) or pid <= 1 or pid == os.getpid() or self.kernel["pid"] is not None:
            raise ValueError("a bad hello")
        pidfd = os.pidfd_open(pid)
        # The copy is in: this init takes the landlock and seccomp
        # restrictions it had to leave off until the copy had joined.
        err = ctypes.create_string_buffer(ERR_CAP)
        if _LIB.forkd_branch_seal(err, ERR_CAP) != 0:
            raise RuntimeError("sealing the branch failed: " + err.value.decode(errors="replace"))
        set_dumpable(False)
        self.kernel["pid"] = pid
        self.kernel["pidfd"] = pidfd
        self.watch(pidfd, self.on_copy_exit)
        shutil.rmtree(self.adopt_dir, ignore_errors=True)
        if self.adopt_req is not None:
            self.adopted()
        self.next_cell()

    def adopted(self):
        self.send({"op": "adopted", "req": self.adopt_req, "pid": self.kernel["pid"]})
        self.adopt_req = None

    def on_copy_exit(self, fd):
        """The adopted interpreter (not our child: no wait status) ended."""
        if self.kernel is not None and self.kernel.get("pidfd") == fd:
            self.kernel_died(None)

    def start_kernel(self):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        cell_r, cell_w = os.pipe()
        res_r, res_w = os.pipe()
        # Read only when poll says so, but never able to block the executor.
        os.set_blocking(res_r, False)
        pid = os.fork()
        if pid == 0:
            try:
                move_fds([(self.devnull, 0), (out_w, 1), (err_w, 2), (cell_r, 3), (res_w, 4)])
                kernel_main(self.cwd)
            except BaseException:
                try:
                    traceback.print_exc()
                finally:
                    os._exit(70)
            os._exit(0)
        for fd in (out_w, err_w, cell_r, res_w):
            os.close(fd)
        streams = {out_r: Stream(out_r, "stdout"), err_r: Stream(err_r, "stderr")}
        drain = select.poll()
        for fd in streams:
            drain.register(fd, select.POLLIN)
        self.kernel = {"pid": pid, "cell_w": cell_w, "res_r": res_r, "streams": streams, "drain": drain, "pidfd": None}
        self.kernel_buf = bytearray()
        for fd in streams:
            self.watch(fd, self.on_kernel_output)
        self.watch(res_r, self.on_kernel_result)

    def on_kernel_output(self, fd):
        if self.kernel is None or fd not in self.kernel["streams"]:
            return
        if not self.forward(self.kernel["streams"][fd], self.cell):
            self.kernel["drain"].unregister(fd)
            self.unwatch(fd)
            self.kernel["streams"].pop(fd, None)

    def drain_kernel_output(self):
        if self.kernel is None or not self.kernel["streams"]:
            return
        # One poll instead of a read (and its EAGAIN) per pipe.
        ready = self.kernel["drain"].poll(0)
        for fd, _ in ready:
            stream = self.kernel["streams"].get(fd)
            if stream is not None and not self.forward(stream, self.cell):
                self.kernel["drain"].unregister(fd)
                self.unwatch(fd)
                del self.kernel["streams"][fd]

    def on_kernel_result(self, fd):
        try:
            data = os.read(fd, self.kernel_read)
        except (BlockingIOError, InterruptedError):
            return
        self.kernel_read = read_size(len(data), self.kernel_read)
        if self.kernel is not None and self.kernel.get("killed"):
            # Killed for a reason: nothing more it says counts (its cell
            # ends as KernelDied when it is reaped).
            self.kernel_buf.clear()
            if not data:
                self.unwatch(fd)
                self.kernel["res_r"] = None
            return
        if not data:
            self.unwatch(fd)
            if self.kernel is not None:
                self.kernel["res_r"] = None
            return
        self.kernel_buf += data
        while len(self.kernel_buf) >= 4:
            n = int.from_bytes(self.kernel_buf[:4], "big")
            if n > KERNEL_MESSAGE_MAX:
                self.kill_kernel(reason="sent an oversized message")
                return
            if len(self.kernel_buf) < 4 + n:
                return
            raw = bytes(self.kernel_buf[4:4 + n])
            del self.kernel_buf[:4 + n]
            if not self.on_kernel_message(raw):
                return

    def on_kernel_message(self, raw):
        """A message the interpreter sent about its cell: checked, because
        user code runs there and can write this pipe."""
        cell = self.cell
        try:
            msg = json.loads(raw)
            if self.kernel["pid"] is None:
                try:
                    self.on_copy_hello(msg)
                except (ValueError, KeyError, TypeError, AttributeError, OSError):
                    pass  # not the copy's hello: it still may come, or the daemon gives up
                return True
            if cell is None or msg.get("req") != cell.req:
                if isinstance(msg, dict) and msg.get("op") == "display":
                    return True  # display() between cells (a thread): nobody to show it to
                raise ValueError("a message for no running cell")
            if msg["op"] == "display":
                display = {"data": {str(k): str(v) for k, v in msg["data"].items()}, "main": False}
                self.send({"op": "display", "req": cell.req, "display": display})
                return True
            if msg["op"] == "branched" and cell.branch:
                outcomes = [
                    {"error": None if o.get("error") is None else str(o["error"])}
                    for o in msg.get("outcomes", [])
                ]
                error = msg.get("error")
                self.drain_kernel_output()
                self.cell = None
                self.send({"op": "branched", "req": cell.req, "outcomes": outcomes,
                           "error": None if error is None else str(error)})
                self.next_cell()
                return True
            if msg["op"] == "checkpointed" and cell.checkpoint is not None:
                self.drain_kernel_output()
                self.cell = None
                self.send(self.keep_checkpoint(cell.req, cell.checkpoint, msg))
                self.next_cell()
                return True
            if cell.branch or cell.checkpoint is not None:
                raise ValueError("a cell result for a branch or checkpoint request")
            if msg["op"] != "done":
                raise ValueError(f"unknown message {msg['op']!r}")
            results = [
                {"data": {str(k): str(v) for k, v in r["data"].items()}, "main": bool(r.get("main"))}
                for r in msg.get("results", [])
            ]
            error = msg.get("error")
            if error is not None:
                error = {k: str(error.get(k, "")) for k in ("name", "value", "traceback")}
            text = msg.get("text")
            self.cell_done(text if isinstance(text, str) else None, results, error)
            return True
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.kill_kernel(reason=f"broke its channel to the executor ({e})")
            return False

    def next_cell(self):
        # A killed interpreter gets nothing more: the next cell waits for
        # its replacement (kernel_died).
        if (self.cell is not None or not self.queue or self.kernel is None
                or self.kernel["pid"] is None or self.kernel.get("killed")):
            return
        req, code = self.queue.popleft()
        if isinstance(code, dict) and "restore" in code:
            self.begin_restore(req, code["restore"])
            return
        self.cell = Running(req)
        if isinstance(code, dict) and "checkpoint" in code:
            self.cell.checkpoint = code["checkpoint"]
            data = json.dumps({"req": req, "checkpoint": {"force": code["force"]}}).encode()
        elif isinstance(code, dict):
            self.cell.branch = True
            data = json.dumps({"req": req, "branch": code}).encode()
        else:
            self.execution_count += 1
            data = json.dumps({"req": req, "code": code, "count": self.execution_count}).encode()
        try:
            write_all(self.kernel["cell_w"], len(data).to_bytes(4, "big") + data)
        except OSError:
            self.kill_kernel(reason="stopped reading its cells")

    def cell_done(self, text, results, error):
        # Everything the cell printed is in the pipes by now (the kernel
        # flushed before reporting): forward it before the result.
        self.drain_kernel_output()
        cell, self.cell = self.cell, None
        self.send(
            {
                "op": "cell_done",
                "req": cell.req,
                "execution_count": self.execution_count,
                "text": text,
                "results": results,
                "error": error,
                "stdout_truncated": cell.truncated["stdout"],
                "stderr_truncated": cell.truncated["stderr"],
            }
        )
        self.next_cell()

    def interrupt(self, req):
        """Interrupts cell `req` (0: whichever cell runs now)."""
        if self.cell is not None and req in (0, self.cell.req):
            if self.cell.interrupted_at is None:
                self.cell.interrupted_at = time.monotonic()
                if self.kernel is not None:
                    try:
                        os.kill(self.kernel["pid"], signal.SIGINT)
                    except ProcessLookupError:
                        pass
            return
        for i, (queued, _) in enumerate(self.queue):
            if queued == req:
                del self.queue[i]
                self.send(
                    {
                        "op": "cell_done", "req": req, "execution_count": self.execution_count,
                        "text": None, "results": [],
                        "error": {"name": "KeyboardInterrupt", "value": "interrupted before it started", "traceback": ""},
                        "stdout_truncated": False, "stderr_truncated": False,
                    }
                )
                return

    def kill_kernel(self, reason=None):
        if self.kernel is None:
            return
        if reason is not None:
            self.kernel["reason"] = reason
        # Reaped (and, when restart, replaced) in kernel_died on SIGCHLD.
        self.kernel["killed"] = True
        try:
            os.kill(self.kernel["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kernel_died(self, status):
        kernel, self.kernel = self.kernel, None
        self.drain_streams_of(kernel)
        for fd in list(kernel["streams"]) + [kernel["res_r"]]:
            if fd is not None:
                self.unwatch(fd)
        os.close(kernel["cell_w"])
        if kernel["pidfd"] is not None:
            self.unwatch(kernel["pidfd"])
        if status is None:
            how = "ended"  # an adopted copy: not our child, no wait status
        elif os.WIFSIGNALED(status):
            how = f"was killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exited with status {os.WEXITSTATUS(status)}"
        reason = kernel.get("reason")
        if reason is not None:
            how = f"{reason}; it was killed"
        elif self.cell is not None and self.cell.interrupted_at is not None:
            how = f"did not stop within {self.grace:g} s of the interrupt; it was killed"
        self.start_kernel()
        if self.cell is not None and self.cell.checkpoint is not None:
            cell, self.cell = self.cell, None
            self.send({"op": "failed", "req": cell.req, "code": "invalid",
                       "message": f"the interpreter {how} while checkpointing; its state is lost"})
            self.next_cell()
        elif self.cell is not None and self.cell.branch:
            cell, self.cell = self.cell, None
            self.send({"op": "branched", "req": cell.req, "outcomes": [],
                       "error": f"the interpreter {how} while branching"})
            self.next_cell()
        elif self.cell is not None:
            self.cell_done(
                None,
                [],
                {
                    "name": "KernelDied",
                    "value": f"the interpreter {how}. Its state (variables, imports) is lost; "
                    "a fresh interpreter runs the next cells",
                    "traceback": "",
                },
            )
        else:
            self.next_cell()

    # -- checkpoints -----------------------------------------------------------

    def keep_checkpoint(self, req, cid, msg):
        """The kernel forked its frozen copy (our child, by a double fork):
        keep it with a copy of the scratch taken now, before the next cell."""
        error = msg.get("error")
        if error is not None:
            return {"op": "failed", "req": req, "code": "invalid", "message": str(error)}
        pid = msg.get("pid")
        if (not isinstance(pid, int) or pid <= 1 or pid in self.commands
                or any(ck["pid"] == pid for ck in self.checkpoints.values())
                or not our_live_child(pid)):
            return {"op": "failed", "req": req, "code": "invalid",
                    "message": "the interpreter's frozen copy did not arrive"}
        scratch = None
        try:
            scratch = ScratchCopy()
            scratch.take()
        except OSError as e:
            if scratch is not None:
                scratch.close()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return {"op": "failed", "req": req, "code": "file_error",
                    "message": f"cannot copy the scratch for the checkpoint: {e}"}
        self.checkpoints[cid] = {"pid": pid, "scratch": scratch, "restores": 0}
        return {"op": "checkpointed", "req": req, "scratch_bytes": scratch.size}

    def drop_checkpoint(self, req, cid):
        if self.restoring is not None and self.restoring["id"] == cid:
            return {"op": "failed", "req": req, "code": "invalid",
                    "message": f"checkpoint {cid} is being restored; delete it after the restore"}
        ck = self.checkpoints.pop(cid, None)
        if ck is None:
            return {"op": "failed", "req": req, "code": "unknown_checkpoint",
                    "message": f"the session has no checkpoint {cid}"}
        self.forget(ck)
        return {"op": "done", "req": req}

    def forget(self, ck):
        if ck["pid"] is not None:
            try:
                os.kill(ck["pid"], signal.SIGKILL)  # reaped in on_wake
            except ProcessLookupError:
                pass
        ck["scratch"].close()

    def begin_restore(self, req, cid):
        """The session's interpreter, commands and every other process it
        started end; its scratch becomes the checkpoint's; the checkpoint's
        frozen copy wakes (forking a new frozen copy first, so that the
        checkpoint can be restored again) and takes the channels."""
        ck = self.checkpoints.get(cid)
        if ck is None or ck["pid"] is None or not our_live_child(ck["pid"]):
            if ck is not None:
                ck["pid"] = None
            self.send({"op": "failed", "req": req, "code": "unknown_checkpoint",
                       "message": f"the session has no checkpoint {cid}" if ck is None else
                       f"checkpoint {cid} was lost: its frozen copy was killed from inside the session; "
                       "delete it and take a new one"})
            self.next_cell()
            return
        self.discard_kernel()
        for pid in list(self.commands):
            self.kill_group(pid)
        # Only its own uid's: its branches' processes (their uids, below its
        # pid namespace) are not its to kill.
        self.sweep_processes({c["pid"] for c in self.checkpoints.values()}, uid=os.getuid())
        try:
            ck["scratch"].restore()
            d = restore_dir(ck["pid"])
            self.await_copy(d)
        except OSError as e:
            self.start_kernel()
            self.send({"op": "failed", "req": req, "code": "file_error",
                       "message": f"cannot restore the scratch of checkpoint {cid}: {e}; "
                       "the session goes on with a fresh interpreter"})
            self.next_cell()
            return
        self.restoring = {"req": req, "id": cid, "pid": ck["pid"], "dir": d,
                          "deadline": time.monotonic() + RESTORE_WAIT}
        os.kill(ck["pid"], signal.SIGUSR1)

    def restored(self, pid, again):
        r, self.restoring = self.restoring, None
        if pid != r["pid"]:
            self.restoring = r
            raise ValueError("a hello from another process")
        ck = self.checkpoints[r["id"]]
        # The copy that stays frozen for the next restore (a double fork
        # made it our child); without it the checkpoint is spent.
        ok = (isinstance(again, int) and again > 1 and again not in self.commands
              and our_live_child(again))
        ck["pid"] = again if ok else None
        ck["restores"] += 1
        self.kernel["pid"] = pid  # our child: its end comes as a wait status
        shutil.rmtree(r["dir"], ignore_errors=True)
        self.send({"op": "done", "req": r["req"]})
        self.next_cell()

    def restore_failed(self, why):
        r, self.restoring = self.restoring, None
        ck = self.checkpoints.get(r["id"])
        if ck is not None:
            if ck["pid"] is not None:
                try:
                    os.kill(ck["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ck["pid"] = None
        self.discard_kernel()
        shutil.rmtree(r["dir"], ignore_errors=True)
        self.start_kernel()
        self.send({"op": "failed", "req": r["req"], "code": "unknown_checkpoint",
                   "message": f"checkpoint {r['id']} was lost while restoring: {why}. The session goes on "
                   "with the checkpoint's scratch and a fresh interpreter"})
        self.next_cell()

    def discard_kernel(self):
        """Kills the interpreter and waits for its end (no replacement)."""
        kernel, self.kernel = self.kernel, None
        if kernel is None:
            return
        pid = kernel["pid"]
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if kernel["pidfd"] is not None:  # an adopted copy: not our child
                select.select([kernel["pidfd"]], [], [], 5)
            else:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        for fd in list(kernel["streams"]) + [kernel["res_r"], kernel["pidfd"]]:
            if fd is not None:
                self.unwatch(fd)
        os.close(kernel["cell_w"])
        self.kernel_buf = bytearray()

    def retire(self, req, keep):
        """The session ended while branches of it live, or keeping the
        checkpoints `keep` (docs/branch.md, "Lifetime"): its interpreter,
        commands, other checkpoints and every other process of its uid end,
        its scratch is emptied; this executor stays, idle, as the init
        (reaper) of the pid namespace the branches live below, and keeps the
        kept checkpoints for a restore, until the daemon kills it. Processes
        of other uids (the branches' helpers) are left alone."""
        self.queue.clear()
        self.cell = None
        self.restoring = None
        self.discard_kernel()
        for pid in list(self.commands):
            self.kill_group(pid)
        for cid in [c for c in self.checkpoints if c not in keep]:
            self.forget(self.checkpoints.pop(cid))
        self.dormant = bool(self.checkpoints)
        self.sweep_processes({c["pid"] for c in self.checkpoints.values()}, uid=os.getuid())
        for root in SCRATCH_ROOTS:
            try:
                _wipe(root, os.lstat(root).st_dev)
            except OSError:
                pass  # what stays is charged to the remnant until it goes
        self.send({"op": "done", "req": req})

    def sweep_processes(self, keep, uid=None):
        """SIGKILL to every process of the session this executor may signal,
        but itself and `keep` (and, given `uid`, those of another uid), until
        none is left (a dying one may fork no more, a new one is found on the
        next pass)."""
        me = os.getpid()
        for _ in range(200):
            found = False
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                pid = int(name)
                if pid == me or pid in keep:
                    continue
                try:
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        state = f.read().rsplit(b")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                if state in (b"Z", b"X"):
                    continue  # reaped in on_wake
                if uid is not None and _real_uid(pid) != uid:
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                    found = True
                except (ProcessLookupError, PermissionError):
                    pass
            if not found:
                return
            time.sleep(0.0005)

    def drain_streams_of(self, kernel):
        for fd, stream in list(kernel["streams"].items()):
            self.forward(stream, self.cell)

    # -- commands ----------------------------------------------------------

    def start_command(self, req, msg):
        env = dict(os.environ)
        env.update(msg.get("env") or {})
        cwd = msg.get("cwd") or self.cwd
        # Imported here, in the executor, on its first command: subprocess
        # imports threading, whose after-fork hook costs every child forked
        # from a zygote that imported it ~0.3 MB (measured).
        import subprocess

        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", msg["cmd"]],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE if msg.get("stdin") else self.devnull,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            self.send(file_error(req, e))
            return
        running = Running(req)
        streams = [Stream(proc.stdout.fileno(), "stdout"), Stream(proc.stderr.fileno(), "stderr")]
        self.commands[proc.pid] = (running, proc, streams)
        if proc.stdin is not None:
            # Written only as the pipe has room: a command that does not read
            # its input must never block the executor.
            os.set_blocking(proc.stdin.fileno(), False)
            self.stdins[proc.pid] = {"file": proc.stdin, "buf": bytearray(), "eof": False}
        for st in streams:
            self.watch(st.fd, self.on_command_output)
        self.send({"op": "command_started", "req": req, "pid": proc.pid})

    def on_command_output(self, fd):
        for pid, (running, proc, streams) in self.commands.items():
            for st in streams:
                if st.fd == fd:
                    if not self.forward(st, running):
                        self.poller.unregister(fd)
                        del self.handlers[fd]
                        streams.remove(st)
                    return

    def command_input(self, req, pid, data, eof):
        """Takes input for a command's stdin: written now as far as the pipe
        has room, the rest queued and written as the command reads."""
        if pid not in self.commands:
            return {"op": "failed", "req": req, "code": "not_found", "message": f"no running command with pid {pid}"}
        st = self.stdins.get(pid)
        if st is None:
            why = f"command {pid} was started without stdin (start it with stdin: true)"
            return {"op": "failed", "req": req, "code": "invalid_request", "message": why}
        if st["eof"]:
            why = f"the stdin of command {pid} is closed already"
            return {"op": "failed", "req": req, "code": "invalid_request", "message": why}
        if data and len(st["buf"]) + len(data) > STDIN_QUEUE_MAX:
            why = (
                f"command {pid} is not reading its stdin: {len(st['buf'])} bytes wait for it already "
                f"(at most {STDIN_QUEUE_MAX} are queued); send the rest once it has read them"
            )
            return {"op": "failed", "req": req, "code": "invalid_request", "message": why}
        st["buf"] += data
        st["eof"] = bool(eof)
        self.pump_stdin(pid)
        return {"op": "done", "req": req}

    def pump_stdin(self, pid):
        st = self.stdins[pid]
        fd = st["file"].fileno()
        while st["buf"]:
            try:
                del st["buf"][:os.write(fd, st["buf"])]
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except BrokenPipeError:
                # Nobody reads it any more: what is queued is for no one.
                st["buf"].clear()
                st["eof"] = True
        waiting = fd in self.handlers
        if st["buf"] and not waiting:
            self.handlers[fd] = self.on_stdin_room
            self.poller.register(fd, select.POLLOUT)
        elif not st["buf"]:
            if waiting:
                del self.handlers[fd]
                self.poller.unregister(fd)
            if st["eof"]:
                self.close_stdin(pid)

    def on_stdin_room(self, fd):
        for pid, st in self.stdins.items():
            if st["file"] is not None and st["file"].fileno() == fd:
                self.pump_stdin(pid)
                return

    def close_stdin(self, pid):
        st = self.stdins[pid]
        if st["file"] is None:
            return
        fd = st["file"].fileno()
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)
        self.closed.add(fd)
        try:
            st["file"].close()
        except OSError:
            pass
        st["file"] = None
        st["buf"] = bytearray()
        st["eof"] = True

    def command_done(self, pid, status):
        running, proc, streams = self.commands.pop(pid)
        if pid in self.stdins:
            self.close_stdin(pid)
            del self.stdins[pid]
        for st in streams:
            self.forward(st, running)
            self.handlers.pop(st.fd, None)
            self.closed.add(st.fd)  # closed below, with the Popen's pipes
            try:
                self.poller.unregister(st.fd)
            except KeyError:
                pass
        proc.returncode = os.waitstatus_to_exitcode(status)
        for f in (proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        signaled = os.WIFSIGNALED(status)
        self.send(
            {
                "op": "command_done",
                "req": running.req,
                "exit_code": None if signaled else os.WEXITSTATUS(status),
                "signal": os.WTERMSIG(status) if signaled else None,
                "stdout_truncated": running.truncated["stdout"],
                "stderr_truncated": running.truncated["stderr"],
            }
        )

    def kill_group(self, pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- files -------------------------------------------------------------

    def file_op(self, op, req, msg, payload):
        path = msg.get("path", "")
        if not path:
            return {"op": "failed", "req": req, "code": "invalid", "message": "empty path"}
        try:
            if op == "write":
                flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
                flags |= os.O_APPEND if msg.get("append") else os.O_TRUNC
                mode = msg.get("mode")
                fd = os.open(path, flags, 0o644 if mode is None else mode)
                try:
                    write_all(fd, payload)
                finally:
                    os.close(fd)
                return {"op": "done", "req": req}
            if op == "read":
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    if stat_mode.S_ISDIR(st.st_mode):
                        return {"op": "failed", "req": req, "code": "file_error", "message": f"{path}: is a directory; list it instead"}
                    offset = int(msg.get("offset", 0))
                    data = os.pread(fd, min(int(msg["length"]), EXEC_PAYLOAD_MAX), offset)
                finally:
                    os.close(fd)
                eof = len(data) == 0 or offset + len(data) >= st.st_size
                self.send({"op": "data", "req": req, "offset": offset, "size": st.st_size, "eof": eof}, data)
                return None
            if op == "list":
                with os.scandir(path) as it:
                    entries = sorted(
                        (entry_of(e.path, e.name) for e in it), key=lambda e: e["name"]
                    )
                return {"op": "entries", "req": req, "entries": entries}
            if op == "remove":
                st = os.lstat(path)
                if stat_mode.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                return {"op": "done", "req": req}
            if op == "make_dir":
                os.makedirs(path, exist_ok=True)
                return {"op": "done", "req": req}
            if op == "stat":
                return {"op": "stat", "req": req, "entry": entry_of(path)}
        except OSError as e:
            return file_error(req, e, path)
        return {"op": "failed", "req": req, "code": "invalid", "message": f"unknown operation {op!r}"}


# -- the kernel: runs the cells ------------------------------------------------

def kernel_send(msg):
    data = json.dumps(msg).encode()
    write_all(4, len(data).to_bytes(4, "big") + data)


REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)
REPR_MAX = 8 << 20


def represent(value):
    """MIME type -> data for a value, as Jupyter shows it."""
    data = {"text/plain": repr(value)}
    for method, mime in REPR_METHODS:
        fn = getattr(value, method, None)
        if not callable(fn) or isinstance(value, type):
            continue
        try:
            out = fn()
        except Exception:
            continue
        if isinstance(out, tuple):
            out = out[0]
        if out is None:
            continue
        if isinstance(out, (bytes, bytearray)):
            out = base64.b64encode(out).decode()
        elif mime == "application/json":
            out = json.dumps(out)
        else:
            out = str(out)
        if len(out) <= REPR_MAX:
            data[mime] = out
    figure = figure_png(value)
    if figure is not None:
        data["image/png"] = figure
    return data


def figure_png(value):
    mpl_figure = sys.modules.get("matplotlib.figure")
    if mpl_figure is None or not isinstance(value, mpl_figure.Figure):
        return None
    buf = io.BytesIO()
    value.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def open_figures(shown=None):
    """Figures left open by a cell, as PNG displays (except `shown`, the
    cell's value, already its main result); closes them."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    out = []
    for num in plt.get_fignums():
        fig = plt.figure(num)
        if fig is shown:
            continue
        png = figure_png(fig)
        if png is not None:
            out.append({"data": {"text/plain": repr(fig), "image/png": png}, "main": False})
    plt.close("all")
    return out


def user_traceback(exc, filename):
    """The traceback of the cell's own frames: from the first of the cell's
    on, without forkd's (before it: the kernel; after it: the SIGINT
    handler that raised KeyboardInterrupt)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename or frames:
            frames.append(tb)
        tb = tb.tb_next
    while frames and frames[-1].tb_frame.f_code.co_filename == _SCRIPT:
        frames.pop()
    if not frames:
        return "".join(traceback.format_exception_only(type(exc), exc))
    summary = traceback.StackSummary.extract((t.tb_frame, t.tb_lineno) for t in frames)
    return "Traceback (most recent call last):\n" + "".join(summary.format()) + "".join(
        traceback.format_exception_only(type(exc), exc)
    )


class Display:
    """`display(obj)` inside a cell sends obj's representations at once."""

    def __init__(self):
        self.req = None

    def __call__(self, *objs):
        for obj in objs:
            kernel_send({"op": "display", "req": self.req, "data": represent(obj)})


def kernel_main(cwd):
    """The interpreter of a session: runs cells in one __main__ until its
    executor closes fd 3."""
    set_dumpable(True)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    sys.argv = [""]
    sys.path[0] = ""
    try:
        apply_thread_pools(thread_pool_settings(os.environ))
    except StartupEnvError:
        pass  # refused when the session was created
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    display = Display()
    builtins.display = display
    ns = main.__dict__
    # SIGINT raises KeyboardInterrupt only while a cell runs: a flag, not a
    # handler swapped around every cell (two syscalls per cell).
    signal.signal(signal.SIGINT, _on_sigint)
    while True:
        try:
            header = read_exact(3, 4)
            if header is None:
                os._exit(0)
            msg = json.loads(read_exact(3, int.from_bytes(header, "big")))
        except KeyboardInterrupt:
            continue
        req = msg["req"]
        if "branch" in msg:
            # Here, or (in a copy) in the branch, whose cells come next.
            kernel_branch(req, msg["branch"])
            continue
        if "checkpoint" in msg:
            # Here, or (in a restored copy) with the restored state.
            kernel_checkpoint(req, msg["checkpoint"])
            continue
        display.req = req
        filename = f"<cell-{msg['count']}>"
        code = msg["code"]
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        outcome = {"op": "done", "req": req, "text": None, "results": [], "error": None}
        try:
            _cell_running[0] = True
            try:
                run_cell(code, filename, ns, outcome)
            finally:
                _cell_running[0] = False
        except BaseException as e:
            if outcome["error"] is None:
                outcome["error"] = {"name": type(e).__name__, "value": str(e), "traceback": user_traceback(e, filename)}
        # A cell may have replaced the handler (or ignored SIGINT).
        if signal.getsignal(signal.SIGINT) is not _on_sigint:
            signal.signal(signal.SIGINT, _on_sigint)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        if "matplotlib.pyplot" in sys.modules:
            try:
                outcome["results"].extend(open_figures(ns.get("_")))
            except BaseException:
                pass
        kernel_send(outcome)


_cell_running = [False]


def kernel_branch(req, spec):
    """Forks a copy of this interpreter into each target branch. Returns
    True in a copy that arrived in its branch (its channels are the
    branch's now); False here, after reporting to the executor."""
    own = own_threads()
    if own and not spec.get("force"):
        kernel_send({"op": "branched", "req": req, "outcomes": [], "error":
                     f"the session runs threads of its own ({', '.join(own)}); a branch would not have them "
                     "(fork copies only the calling thread): end them first, or branch with force"})
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    seeds = prng_states() if spec.get("same_seed") else None
    # Every copy is forked first, then waited for: they join their branches
    # side by side.
    copies = []
    for target in spec["targets"]:
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for _, other in copies:
                os.close(other)
            os.close(err_r)
            try:
                copy_into_branch(target, seeds, err_w)
            except BaseException as e:
                try:
                    os.write(err_w, f"{type(e).__name__}: {e}".encode(errors="replace")[:4096])
                finally:
                    os._exit(1)
            return True
        os.close(err_w)
        copies.append((pid, err_r))
    outcomes = []
    for pid, err_r in copies:
        with open(err_r, "rb") as f:
            why = f.read()
        _, status = os.waitpid(pid, 0)
        error = None
        if status != 0 or why:
            error = why.decode(errors="replace") or f"the copy ended with wait status {status}"
        outcomes.append({"error": error})
    kernel_send({"op": "branched", "req": req, "outcomes": outcomes, "error": None})
    return False


def own_threads():
    """Names of the live non-daemon threads the user started."""
    import threading

    return [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]


def fork_detached():
    """Forks a copy that is not our child (a double fork: it is re-parented
    to the executor, the pid namespace's init). Returns 0 in the copy, its
    pid here (None when it could not be made)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            copy = os.fork()
        except BaseException:
            os._exit(1)
        if copy != 0:
            os.write(w, str(copy).encode())
            os._exit(0)
        os.close(w)
        return 0
    os.close(w)
    with open(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return int(data) if data.isdigit() else None


def kernel_checkpoint(req, spec):
    """Forks the frozen copy of this interpreter a checkpoint keeps. Returns
    in the copy too, once it is restored (its channels are the session's
    then, and its cells come next)."""
    own = own_threads()
    if own and not spec.get("force"):
        kernel_send({"op": "checkpointed", "req": req, "error":
                     f"the session runs threads of its own ({', '.join(own)}); a checkpoint would not have them "
                     "(fork copies only the calling thread): end them first, or checkpoint with force"})
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    seeds = prng_states()
    held = held_descriptors(())
    cwd = os.getcwd()
    pid = fork_detached()
    if pid == 0:
        try:
            frozen_copy(held, seeds, cwd)
        except BaseException:
            os._exit(1)
        return
    if pid is None:
        kernel_send({"op": "checkpointed", "req": req, "error": "the interpreter could not fork its copy"})
    else:
        kernel_send({"op": "checkpointed", "req": req, "pid": pid})


def frozen_copy(held, seeds, cwd):
    """A checkpoint's copy: holds no descriptor, waits (using no CPU) for
    SIGUSR1 with its channels ready, forks the copy that stays frozen for the
    next restore, then becomes the session's interpreter."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in range(3):
        os.dup2(devnull, fd)
    # Nothing the interpreter held stays open while frozen (no connection or
    # file kept alive by a checkpoint); files are reopened on restore.
    os.closerange(3, 1 << 20)
    while True:
        d = restore_dir(os.getpid())
        # A SIGUSR1 that comes between this look and the wait stays pending.
        if all(os.path.exists(f"{d}/{name}") for name in CHANNELS):
            again = fork_detached()
            if again != 0:
                break  # this one goes live; its copy (re-parented) stays frozen
            continue
        signal.sigwait({signal.SIGUSR1})
    while signal.sigtimedwait({signal.SIGUSR1}, 0) is not None:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    take_channels(restore_dir(os.getpid()))
    reopen_held(held, restoring=True)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/tmp")
    set_prng_states(seeds)
    signal.signal(signal.SIGINT, _on_sigint)
    kernel_send({"op": "hello", "pid": os.getpid(), "again": again})


def held_descriptors(skip):
    """The descriptors the user's code holds (above the kernel's 0-4): path,
    type, flags, offset, to reopen them in a copy."""
    held = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 4 or fd in skip:
            continue
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            pos = os.lseek(fd, 0, os.SEEK_CUR) if stat_mode.S_ISREG(st.st_mode) else 0
        except OSError:
            continue
        held[fd] = (path, stat_mode.S_IFMT(st.st_mode), flags, pos, os.get_inheritable(fd))
    return held


def reopen_held(held, restoring):
    """Reopens held descriptors at the same numbers: regular files of the
    scratch (a branch: on its copy of the scratch), or (a restore) regular
    files, directories and devices anywhere; others are closed."""
    for fd, (path, kind, flags, pos, inheritable) in held.items():
        if restoring:
            wanted = kind in (stat_mode.S_IFREG, stat_mode.S_IFDIR, stat_mode.S_IFCHR)
        else:
            wanted = kind == stat_mode.S_IFREG and path.startswith(("/tmp/", "/home/user/", "/dev/shm/"))
        try:
            if wanted:
                new = os.open(path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
                if kind == stat_mode.S_IFREG:
                    os.lseek(new, pos, os.SEEK_SET)
                if new != fd:
                    os.dup2(new, fd, inheritable=inheritable)
                    os.close(new)
            else:
                os.close(fd)
        except OSError:
            try:
                os.close(fd)
            except OSError:
                pass


def take_channels(d):
    """Moves stdio and the cell channels onto the FIFOs the executor made in d."""
    fifos = [os.open(f"{d}/{name}", flags) for name, flags in (
        ("out", os.O_WRONLY), ("err", os.O_WRONLY), ("cell", os.O_RDONLY), ("res", os.O_WRONLY))]
    devnull = os.open("/dev/null", os.O_RDONLY)
    for src, dst in zip([devnull] + fifos, range(5)):
        os.dup2(src, dst)
    for fd in [devnull] + fifos:
        if fd > 4:
            os.close(fd)


def set_prng_states(seeds):
    if "random" in seeds:
        sys.modules["random"].setstate(seeds["random"])
    if "numpy" in seeds:
        sys.modules["numpy.random"].set_state(seeds["numpy"])


def prng_states():
    """States to restore in a copy that keeps its parent's seeds."""
    states = {}
    rnd = sys.modules.get("random")
    if rnd is not None:
        states["random"] = rnd.getstate()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        states["numpy"] = np_random.get_state()
    return states


def copy_into_branch(target, seeds, err_w):
    """In a fork of the interpreter: moves into the branch, then swaps this
    session's channels, files and seeds for the branch's."""
    cwd = os.getcwd()
    # Descriptors the user's code holds: files of the parent's scratch are
    # reopened at the same path in the branch's copy of it; anything else
    # (pipes, sockets, other files) belongs to the parent and is closed.
    held = held_descriptors({err_w})
    err = ctypes.create_string_buffer(ERR_CAP)
    if _LIB.forkd_branch_join(target["ns"].encode(), err, ERR_CAP) != 0:
        raise OSError(err.value.decode(errors="replace"))
    # In the branch now: its mount namespace, uid, no capabilities.
    take_channels(target["dir"])
    reopen_held(held, restoring=False)
    os.close(err_w)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/tmp")
    if seeds is None:
        # os.fork reseeded `random` in the first copy; numpy's global
        # generator is reseeded here (a Generator the user made is not).
        np_random = sys.modules.get("numpy.random")
        if np_random is not None:
            np_random.seed()
    else:
        set_prng_states(seeds)
    kernel_send({"op": "hello", "pid": os.getpid()})


def _on_sigint(signum, frame):
    if _cell_running[0]:
        raise KeyboardInterrupt


def run_cell(code, filename, ns, outcome):
    try:
        try:
            # The common agent cell, one expression: one compile.
            compiled = compile(code, filename, "eval")
        except SyntaxError:
            compiled = None
        if compiled is not None:
            value = eval(compiled, ns)
        else:
            last = None
            tree = ast.parse(code, filename, "exec")
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), ns)
            value = None if last is None else eval(compile(last, filename, "eval"), ns)
        if value is not None:
            ns["_"] = value
            data = represent(value)
            outcome["results"].append({"data": data, "main": True})
            outcome["text"] = data["text/plain"]
    except BaseException as e:
        outcome["error"] = {"name": type(e).__name__, "value": str(e), "traceback": user_traceback(e, filename)}


def main():
    sock = socket.socket(fileno=CONTROL_FD)
    zygote = Zygote(sock)
    zygote.init()
    zygote.serve()


if __name__ == "__main__":
    main()
