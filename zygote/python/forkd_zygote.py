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
import atexit
import base64
import builtins
import ctypes
import gc
import importlib
import importlib.machinery
import io
import json
import runpy
import select
import signal
import socket
import time
import traceback
import types

# Every module the child path uses is imported here, in the zygote: an import
# inside a sandbox costs milliseconds of path searching per child.

# The wire's shapes and version are defined in zygote/src/wire.rs; this file
# mirrors them (a Rust test checks these lines against it).
WIRE_VERSION = 2
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
        lib.forkd_enter_userns.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        if msg.get("rootless"):
            self.become_namespace_root(lib)
        config = msg["config"]
        config["interpreter_paths"] = interpreter_paths()
        raw = json.dumps(config).encode()
        # Before any preload import: forkd_init forks a helper and needs one thread.
        if lib.forkd_init(raw, len(raw), self.err, ERR_CAP) != 0:
            fatal(self.sock, "zygote init failed: " + self.err.value.decode(errors="replace"))
        self.lib = lib

        for name in msg.get("preload", []):
            send(self.sock, {"op": "importing", "module": name})
            try:
                importlib.import_module(name)
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

    def become_namespace_root(self, lib):
        """Rootless start: enter a user namespace of our own, then continue as
        pid 1 of a new pid namespace owned by it (so that pid namespaces made
        per sandbox can be left again with setns). The original process stays
        behind only to relay the inner zygote's exit to the daemon."""
        if lib.forkd_enter_userns(self.err, ERR_CAP) != 0:
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
        errno = self.lib.forkd_pidns_enter_new()
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
        errno = self.lib.forkd_pidns_restore()
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
        run_job(job, self.lib)


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
    """Gives the program the signal dispositions of a `python` started from a
    shell (SIGINT raises KeyboardInterrupt, SIGPIPE and SIGXFSZ ignored,
    everything else default, nothing blocked), whatever the daemon inherited
    (`nohup`, a `cmd &` shell, a service manager). Only differing entries are
    touched: in the usual case this costs no system call but one sigprocmask."""
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
    if threading is not None:
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
    gc.collect()


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
        reset_signal_dispositions()
        errno = lib.forkd_report_signals(STATUS_FD)
        if errno != 0:
            setup_failed(f"installing signal reporters failed: {os.strerror(errno)}")
        # Programs it execs must not inherit the report channel.
        os.set_inheritable(STATUS_FD, False)
        os.write(STATUS_FD, TAG_STARTED)
    except BaseException:
        setup_failed("sandbox setup failed:\n" + traceback.format_exc())

    code, uncaught = run_main(program, main)
    interrupted = isinstance(uncaught, KeyboardInterrupt)
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


def main():
    sock = socket.socket(fileno=CONTROL_FD)
    zygote = Zygote(sock)
    zygote.init()
    zygote.serve()


if __name__ == "__main__":
    main()
