"""Tests of the forkd Python client against a REAL forkd daemon.

The daemon binary is ``<repo>/target/debug/forkd`` (build it with
``cargo build --workspace``); it runs zygotes of ``$FORKD_TEST_PYTHON`` or
``<repo>/.venv/bin/python`` with numpy preloaded. Run with::

    .venv/bin/python -m unittest discover -s clients/python/tests -v
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Callable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_ROOT = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(CLIENT_ROOT))
sys.path.insert(0, os.path.join(CLIENT_ROOT, "src"))

import forkd  # noqa: E402
from forkd import AsyncForkd, Execution, Forkd  # noqa: E402
from forkd.errors import (  # noqa: E402
    ConnectionLost,
    DaemonNotRunning,
    ForkdError,
    InvalidRequest,
    LimitExceedsPolicy,
    ProtocolError,
    RequestRefused,
    Timeout,
)

DAEMON = os.path.join(REPO, "target", "debug", "forkd")
PYTHON = os.environ.get("FORKD_TEST_PYTHON") or os.path.join(REPO, ".venv", "bin", "python")
NUMPY_SNIPPET = "import numpy; print(numpy.zeros(5).tolist())"


class FakeServer:
    """A real Unix socket server that answers every connection with
    ``behaviour(conn)`` (e.g. close at once, send garbage, say nothing)."""

    def __init__(self, directory: str, behaviour: Callable[[socket.socket], None]) -> None:
        self.path = os.path.join(directory, f"fake-{id(self)}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.behaviour = behaviour
        self.conns: List[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.behaviour(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
        os.unlink(self.path)


def close_now(conn: socket.socket) -> None:
    conn.close()


def read_one_frame(conn: socket.socket) -> None:
    conn.settimeout(5)
    (n,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
    conn.recv(n, socket.MSG_WAITALL)


class DaemonTest(unittest.TestCase):
    """Starts one daemon for the whole class; stops it in tearDownClass."""

    tmp: tempfile.TemporaryDirectory
    proc: Optional[subprocess.Popen] = None
    sock_path: str = ""
    #: Daemon configuration (TOML; ``{tmp}`` is the class's temporary directory).
    config_text: Optional[str] = None

    @classmethod
    def setUpClass(cls) -> None:
        if not os.access(DAEMON, os.X_OK):
            raise RuntimeError(
                f"forkd daemon binary {DAEMON} is missing: build it first with "
                f"`cargo build --workspace` in {REPO}"
            )
        if not os.access(PYTHON, os.X_OK):
            raise RuntimeError(
                f"sandbox interpreter {PYTHON} is missing: run scripts/venv.sh or set FORKD_TEST_PYTHON"
            )
        cls.tmp = tempfile.TemporaryDirectory(prefix="forkd-pyclient-")
        cls.sock_path = os.path.join(cls.tmp.name, "forkd.sock")
        cls.log_path = os.path.join(cls.tmp.name, "daemon.log")
        env = dict(os.environ)
        env.pop("FORKD_SOCKET", None)
        cls.log = open(cls.log_path, "wb")
        extra: List[str] = []
        if cls.config_text is not None:
            config_path = os.path.join(cls.tmp.name, "forkd.toml")
            with open(config_path, "w") as f:
                f.write(cls.config_text.replace("{tmp}", cls.tmp.name))
            extra = ["--config", config_path]
        cls.proc = subprocess.Popen(
            [DAEMON, "--python", PYTHON, "--preload", "numpy", "--socket", cls.sock_path, *extra],
            stdout=cls.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 60
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if cls.proc.poll() is not None:
                cls._stop()
                raise RuntimeError(f"forkd exited with {cls.proc.returncode} at start-up; log:\n{cls._log_text()}")
            if os.path.exists(cls.sock_path):
                try:
                    with Forkd(cls.sock_path, timeout=5) as fk:
                        fk.ping()
                    return
                except ForkdError as e:
                    last = e
            time.sleep(0.05)
        cls._stop()
        raise RuntimeError(f"forkd did not answer on {cls.sock_path} within 60 s ({last}); log:\n{cls._log_text()}")

    @classmethod
    def _log_text(cls) -> str:
        try:
            with open(cls.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        except OSError:
            return "(no log)"

    @classmethod
    def _stop(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.send_signal(signal.SIGTERM)
            try:
                cls.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
                cls.proc.wait(timeout=10)
        cls.log.close()

    @classmethod
    def tearDownClass(cls) -> None:
        cls._stop()
        cls.tmp.cleanup()

    def client(self, **kw) -> Forkd:
        fk = Forkd(self.sock_path, **kw)
        self.addCleanup(fk.close)
        return fk


class UnenforcedLimitsTest(DaemonTest):
    """A daemon without cgroups (as rootless without delegation): results say
    so and the client warns once per process, not once per run."""

    config_text = '[cgroup]\nmode = "disabled"\n'

    def test_warns_once_per_process(self) -> None:
        import warnings

        forkd._protocol._warned_unenforced = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fk = self.client()
            runs = [fk.run("print(1)", memory="64M", timeout=30) for _ in range(3)]
        self.assertEqual([r.stdout for r in runs], [b"1\n"] * 3)
        self.assertEqual([r.limits_enforced for r in runs], [False] * 3)
        mine = [w for w in caught if issubclass(w.category, forkd.LimitsNotEnforced)]
        self.assertEqual(len(mine), 1, [str(w.message) for w in caught])
        self.assertIn("could not enforce memory/cpu/pids limits", str(mine[0].message))
        self.assertIn("forkd doctor", str(mine[0].message))


class SyncClientTest(DaemonTest):
    def test_ping_returns_daemon_version(self) -> None:
        v = self.client().ping()
        self.assertRegex(v, r"^\d+\.\d+\.\d+")

    def test_numpy_snippet(self) -> None:
        r = self.client().run(NUMPY_SNIPPET, timeout=30)
        self.assertIsInstance(r, Execution)
        self.assertEqual(r.stdout, b"[0.0, 0.0, 0.0, 0.0, 0.0]\n", r.stderr)
        self.assertEqual(r.text, "[0.0, 0.0, 0.0, 0.0, 0.0]\n")
        self.assertEqual((r.exit_code, r.signal, r.killed_by), (0, None, None))
        self.assertTrue(r.ok)
        self.assertEqual(r.shell_status, 0)
        self.assertEqual(r.stderr, b"")
        self.assertEqual(r.limits["timeout_ms"], 30000)
        self.assertGreater(r.sandbox, 0)
        self.assertNotEqual(r.zygote, "")
        self.assertIn(r.landlock, ("fully_enforced", "partially_enforced", "not_enforced"))
        self.assertGreater(r.timings.total_us, 0)
        self.assertGreaterEqual(r.timings.total_us, r.timings.run_us)

    def test_stdin_argv_env_files_round_trip(self) -> None:
        stdin = b"\x00\xff\xfe not utf-8 \xc3\x28\n"
        code = (
            "import os, sys, stat\n"
            "data = sys.stdin.buffer.read()\n"
            "sys.stdout.buffer.write(data[::-1])\n"
            "print()\n"
            "print(sys.argv[1:])\n"
            "print(os.environ.get('GREETING'), os.environ.get('EMPTY'))\n"
            "print(open('data/in.bin', 'rb').read().hex(), oct(stat.S_IMODE(os.stat('data/in.bin').st_mode)))\n"
            "print(open('notes.txt').read(), oct(stat.S_IMODE(os.stat('notes.txt').st_mode)))\n"
            "sys.stderr.buffer.write(b'\\xc3\\x28')\n"
        )
        r = self.client().run(
            code,
            argv=["--fast", "two words", "ü"],
            stdin=stdin,
            env={"GREETING": "hello", "EMPTY": ""},
            files=[("data/in.bin", b"\x00\xff\xfe", 0o600), ("notes.txt", "naïve")],
            timeout=30,
        )
        self.assertEqual(r.exit_code, 0, r.stderr)
        expected = (
            stdin[::-1]
            + b"\n['--fast', 'two words', '\xc3\xbc']\n"
            + b"hello \n"
            + b"00fffe 0o600\n"
            + "naïve 0o644\n".encode()
        )
        self.assertEqual(r.stdout, expected)
        self.assertEqual(r.stderr, b"\xc3\x28")
        self.assertTrue(r.text.startswith("\n(\ufffd 8-ftu ton \ufffd\ufffd\x00"), r.text)

    def test_files_as_mapping(self) -> None:
        r = self.client().run("print(open('a.txt').read() + open('b.bin','rb').read().decode())",
                              files={"a.txt": "A", "b.bin": b"B"}, timeout=30)
        self.assertEqual(r.stdout, b"AB\n")

    def test_run_module_as_python_m(self) -> None:
        data = b'{"b": 1, "a": 2}'
        r = self.client().run_module("json.tool", "--sort-keys", stdin=data, timeout=30)
        outside = subprocess.run(
            [PYTHON, "-m", "json.tool", "--sort-keys"], input=data, capture_output=True, env={}
        )
        self.assertEqual((r.stdout, r.stderr, r.exit_code), (outside.stdout, outside.stderr, 0))
        r = self.client().run_module(
            "mymod", "a", files={"mymod.py": "import sys; print(sys.argv[1:], __name__)"}, timeout=30
        )
        self.assertEqual(r.stdout, b"['a'] __main__\n", r.stderr)
        with self.assertRaises(ValueError):
            self.client().run_module("json.tool", code="print(1)")

    def test_exit_code(self) -> None:
        r = self.client().run("import sys; print('bye'); sys.exit(7)", timeout=30)
        self.assertEqual((r.exit_code, r.signal, r.killed_by), (7, None, None))
        self.assertEqual(r.stdout, b"bye\n")
        self.assertFalse(r.ok)
        self.assertEqual(r.shell_status, 7)

    def test_raised_exception(self) -> None:
        r = self.client().run("def f():\n    raise ValueError('boom 42')\nf()\n", timeout=30)
        self.assertEqual((r.exit_code, r.killed_by), (1, None))
        self.assertIn(b"Traceback (most recent call last)", r.stderr)
        self.assertTrue(r.stderr.endswith(b"ValueError: boom 42\n"), r.stderr)
        self.assertEqual(r.stdout, b"")

    def test_timeout_kills(self) -> None:
        t0 = time.monotonic()
        r = self.client().run("import time\nprint('start', flush=True)\ntime.sleep(60)", timeout=1.0)
        elapsed = time.monotonic() - t0
        self.assertEqual(r.killed_by, "timeout")
        # SIGTERM first: the sleeping program stops gracefully, by SIGTERM.
        self.assertEqual((r.exit_code, r.signal), (None, 15))
        self.assertEqual(r.shell_status, 143)
        self.assertEqual(r.stdout, b"start\n")
        self.assertEqual(r.limits["timeout_ms"], 1000)
        self.assertLess(elapsed, 20)

    def test_memory_bomb_oom(self) -> None:
        code = "chunks = []\nfor i in range(512):\n    chunks.append(b'\\x01' * (1 << 20))\nprint('survived')"
        r = self.client().run(code, memory="64M", timeout=60)
        self.assertEqual(r.killed_by, "oom", r.stderr)
        self.assertEqual((r.exit_code, r.signal), (None, 9))
        self.assertEqual(r.stdout, b"")
        self.assertEqual(r.limits["memory_bytes"], 64 * 1024 * 1024)
        if r.limits["cgroup_enforced"]:
            self.assertLessEqual(r.usage.peak_memory_bytes, 64 * 1024 * 1024)
            # Said in words with the limit and the peak, whatever stderr holds.
            self.assertRegex(r.kill_message, r"^killed: out of memory \(limit 64 MiB, peak \d+(\.\d)? (KiB|MiB)\)$")
            self.assertTrue(r.limits_enforced)

    def test_enforced_limits_do_not_warn(self) -> None:
        import warnings

        forkd._protocol._warned_unenforced = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = self.client().run("print(1)", timeout=30)
        if r.limits["cgroup_enforced"]:
            self.assertEqual([w for w in caught if issubclass(w.category, forkd.LimitsNotEnforced)], [])
            self.assertIsNone(r.kill_message)

    def test_limit_above_policy_refused(self) -> None:
        fk = self.client()
        with self.assertRaises(LimitExceedsPolicy) as cm:
            fk.run("print(1)", memory="100G")
        self.assertIsInstance(cm.exception, RequestRefused)
        self.assertEqual(cm.exception.code, "limit_exceeds_policy")
        self.assertIn("memory_bytes", cm.exception.message)
        # The connection stays usable after an error reply.
        self.assertEqual(fk.run("print(2)", timeout=30).stdout, b"2\n")

    def test_allow_net(self) -> None:
        fk = self.client()
        # Metadata addresses stay closed: refused at admission, naming the rule.
        with self.assertRaises(LimitExceedsPolicy) as cm:
            fk.run("print(1)", allow_net=["169.254.169.254:80"], timeout=30)
        self.assertIn("169.254.0.0/16", cm.exception.message)
        with self.assertRaises(InvalidRequest):
            fk.run("print(1)", allow_net=["pkg.example:99999"], timeout=30)
        with self.assertRaises(TypeError):
            fk.run("print(1)", allow_net="pkg.example:443", timeout=30)  # type: ignore[arg-type]
        # An allowlist the program does not use: a report with zero counters
        # (no traffic is sent anywhere).
        r = fk.run("print(1)", allow_net=["198.18.0.1:80"], timeout=30)
        self.assertEqual(r.stdout, b"1\n")
        assert r.network is not None
        self.assertEqual(r.network["connections_allowed"], 0)
        self.assertEqual(r.network["bytes_out"], 0)
        self.assertIsNone(fk.run("print(1)", timeout=30).network)

    def test_invalid_request(self) -> None:
        with self.assertRaises(InvalidRequest) as cm:
            self.client().run("print(1)", files={"../escape": b"x"}, timeout=30)
        self.assertEqual(cm.exception.code, "invalid_request")

    def test_output_limit(self) -> None:
        r = self.client().run("import sys\nsys.stdout.write('x' * 100000)", output_limit=1000, timeout=30)
        self.assertEqual(r.killed_by, "output_limit")
        self.assertTrue(r.stdout_truncated)
        self.assertEqual(r.stdout, b"x" * 1000)

    def test_run_script(self) -> None:
        with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
            f.write(b"# coding: latin-1\nimport os, sys\nprint('args', sys.argv, __file__ == os.path.join(os.getcwd(), sys.argv[0]), '\xe9')\n")
        self.addCleanup(os.unlink, f.name)
        r = self.client().run_script(f.name, "a", "b c", timeout=30, files={"x": "y"})
        name = os.path.basename(f.name)
        self.assertEqual(r.stdout, f"args {[name, 'a', 'b c']!r} True \xe9\n".encode(), r.stderr)

    def test_map_30_in_input_order(self) -> None:
        codes = [f"import time; time.sleep({(30 - i) % 5} * 0.03); print({i} * {i})" for i in range(30)]
        rs = self.client().map(codes, concurrency=8, timeout=30)
        self.assertEqual(len(rs), 30)
        self.assertEqual([r.stdout for r in rs], [f"{i * i}\n".encode() for i in range(30)])
        self.assertEqual(len({r.sandbox for r in rs}), 30)

    def test_map_return_exceptions(self) -> None:
        rs = self.client().map(["print(1)", "print(2)"], memory="100G", return_exceptions=True)
        self.assertEqual([type(r) for r in rs], [LimitExceedsPolicy, LimitExceedsPolicy])

    def test_connection_reused(self) -> None:
        fk = self.client()
        conn = fk._conn
        for i in range(3):
            self.assertEqual(fk.run(f"print({i})", timeout=30).stdout, f"{i}\n".encode())
        self.assertIs(fk._conn, conn)


class AsyncClientTest(DaemonTest):
    def test_async_50_concurrent_on_one_connection(self) -> None:
        async def main() -> None:
            async with AsyncForkd(self.sock_path) as fk:
                conn = fk._conn
                codes = [f"import numpy; print(int(numpy.arange({i}).sum()))" for i in range(50)]
                rs = await asyncio.gather(*(fk.run(c, timeout=60) for c in codes))
                self.assertEqual([r.stdout for r in rs], [f"{sum(range(i))}\n".encode() for i in range(50)])
                self.assertTrue(all(r.ok for r in rs))
                self.assertEqual(len({r.sandbox for r in rs}), 50)
                # All on the one connection, ids 1..50.
                self.assertIs(fk._conn, conn)
                self.assertEqual(conn.next_id, 51)
                # map: gather + semaphore, input order.
                ms = await fk.map([f"print({i})" for i in range(20)], concurrency=5, timeout=30)
                self.assertEqual([m.stdout for m in ms], [f"{i}\n".encode() for i in range(20)])
                self.assertIs(fk._conn, conn)

        asyncio.run(main())

    def test_async_completion_order(self) -> None:
        async def main() -> None:
            async with AsyncForkd(self.sock_path) as fk:
                slow = asyncio.ensure_future(fk.run("import time; time.sleep(1.5); print('slow')", timeout=30))
                await asyncio.sleep(0.2)
                t0 = time.monotonic()
                version = await fk.ping()
                self.assertLess(time.monotonic() - t0, 1.0)
                self.assertFalse(slow.done())
                with Forkd(self.sock_path) as sync_fk:
                    self.assertEqual(version, sync_fk.ping())
                self.assertEqual((await slow).stdout, b"slow\n")

        asyncio.run(main())

    def test_async_errors_and_run_script(self) -> None:
        async def main() -> None:
            fk = AsyncForkd(self.sock_path)
            try:
                with self.assertRaises(LimitExceedsPolicy):
                    await fk.run("print(1)", memory="100G")
                r = await fk.run("import sys; sys.exit(3)", timeout=30)
                self.assertEqual(r.exit_code, 3)
                r = await fk.run_module("platform", "--terse", timeout=30)
                self.assertEqual(r.stdout, subprocess.run([PYTHON, "-m", "platform", "--terse"],
                                                          capture_output=True, env={}).stdout)
                r = await fk.run("import time; time.sleep(30)", timeout=0.5)
                self.assertEqual(r.killed_by, "timeout")
            finally:
                await fk.close()

        asyncio.run(main())


class WorkspaceTest(DaemonTest):
    """``workspace=`` through a real daemon allowing ad-hoc paths below {tmp}/ws."""

    config_text = 'workspace_roots = ["{tmp}/ws"]\n'

    def setUp(self) -> None:
        self.root = os.path.join(self.tmp.name, "ws", f"p{time.monotonic_ns()}")
        os.makedirs(os.path.join(self.root, "out"))
        os.makedirs(os.path.join(self.root, "secrets"))
        with open(os.path.join(self.root, "secrets", "key"), "w") as f:
            f.write("KEY")
        with open(os.path.join(self.root, "out", "old"), "w") as f:
            f.write("old")

    def test_overlay_with_delta(self) -> None:
        ws = forkd.Workspace(
            path=self.root, rules=["secrets=none", "out=write"], overlay=True, export_delta=True
        )
        code = (
            "import os\n"
            "print(sorted(os.listdir('/workspace')))\n"
            "open('/workspace/out/new', 'w').write('n')\n"
            "os.remove('/workspace/out/old')\n"
        )
        with Forkd(self.sock_path, timeout=30) as fk:
            r = fk.run(code, workspace=ws, timeout=20)
        self.assertEqual(r.exit_code, 0, r.stderr_text)
        self.assertEqual(r.text, "['out']\n")
        self.assertIsNone(r.workspace_error)
        import io
        import tarfile

        names = tarfile.open(fileobj=io.BytesIO(r.workspace_delta)).getnames()
        self.assertIn("out/new", names)
        self.assertIn("out/.wh.old", names)
        self.assertTrue(os.path.exists(os.path.join(self.root, "out", "old")), "the host did not change")

    def test_async_direct_and_refusal(self) -> None:
        async def go() -> None:
            async with AsyncForkd(self.sock_path, timeout=30) as fk:
                r = await fk.run(
                    "open('/workspace/out/x', 'w').write('x')",
                    workspace=forkd.Workspace(path=self.root, rules=["out=write"]),
                )
                self.assertEqual(r.exit_code, 0, r.stderr_text)
                with self.assertRaises(RequestRefused) as cm:
                    await fk.run("1", workspace=forkd.Workspace(path="/etc"))
                self.assertIn("workspace_roots", str(cm.exception))

        asyncio.run(go())
        with open(os.path.join(self.root, "out", "x")) as f:
            self.assertEqual(f.read(), "x")

    def test_bad_workspace_arguments(self) -> None:
        with Forkd(self.sock_path) as fk:
            with self.assertRaises(ValueError):
                fk.run("1", workspace=forkd.Workspace(path="/x", rules=["a=maybe"]))
            with self.assertRaises(ValueError):
                fk.run("1", workspace=forkd.Workspace(path="/x", export_delta=True))
            with self.assertRaises(ValueError):
                fk.run("1", workspace=forkd.Workspace())


class KillMessageTest(unittest.TestCase):
    """``Execution.kill_message`` says the same words as forkd-run and Rust's
    ``SpawnResult::kill_message`` (ipc/src/explain.rs checks the same table)."""

    def test_kills_read_as_one_line(self) -> None:
        from forkd._protocol import _parse_result

        limits = {"timeout_ms": 1500, "memory_bytes": 536870912, "pids": 64, "output_bytes": 1048576}
        for killed_by, signal, peak, want in [
            ("oom", 9, 536608768, "killed: out of memory (limit 512 MiB, peak 511.8 MiB)"),
            ("oom", 9, 0, "killed: out of memory (limit 512 MiB)"),
            ("timeout", 9, 0, "killed: timed out after 1.5 s (the timeout)"),
            ("timeout", 9, 0, "killed: timed out after 30 s (the timeout)"),
            ("pids", None, 0, "killed: process/thread limit reached (pids 64); a fork or thread start failed"),
            ("output_limit", 9, 0, "killed: output over the limit (1 MiB of stdout+stderr)"),
            ("signal", 11, 0, "killed by signal 11"),
            ("shutdown", 9, 0, "killed: the daemon shut down while it ran"),
            (None, None, 0, None),
        ]:
            lim = dict(limits, timeout_ms=30000) if want and "30 s" in want else limits
            r = _parse_result(
                {"killed_by": killed_by, "signal": signal, "usage": {"peak_memory_bytes": peak}, "limits": lim}
            )
            self.assertEqual(r.kill_message, want, killed_by)

    def test_cells_stopped_by_a_limit_read_as_one_line(self) -> None:
        from forkd._session_wire import CellResult

        died = {"name": "KernelDied", "value": "", "traceback": ""}
        interrupted = {"name": "KeyboardInterrupt", "value": "", "traceback": ""}
        for fields, want in [
            (
                {"killed_by": "oom", "memory_limit_bytes": 268435456, "peak_memory_bytes": 268173312, "error": died},
                "killed: out of memory (limit 256 MiB, peak 255.8 MiB)",
            ),
            ({"killed_by": "oom", "memory_limit_bytes": 268435456, "error": died}, "killed: out of memory (limit 256 MiB)"),
            (
                {"timed_out": True, "timeout_ms": 1500, "error": interrupted},
                "interrupted: timed out after 1.5 s (the timeout)",
            ),
            ({"timed_out": True, "timeout_ms": 30000, "error": died}, "killed: timed out after 30 s (the timeout)"),
            ({"timed_out": True, "timeout_ms": 2000}, "interrupted: timed out after 2 s (the timeout)"),
            ({"error": died}, None),
            ({}, None),
        ]:
            wire = dict({"execution_count": 1, "stdout": "", "stderr": "", "duration_us": 5}, **fields)
            self.assertEqual(CellResult.from_wire(wire).kill_message, want, fields)

    def test_commands_stopped_by_a_limit_read_as_one_line(self) -> None:
        from forkd._session_wire import CommandResult

        for fields, want in [
            ({"timed_out": True, "timeout_ms": 1500}, "killed: timed out after 1.5 s (the timeout)"),
            (
                {"stdout_truncated": True, "output_limit_bytes": 1048576},
                "killed: output over the limit (1 MiB of stdout+stderr)",
            ),
            ({"stderr_truncated": True}, "killed: output over the limit"),
            (
                {"stdout_truncated": True, "output_limit_bytes": 1048576, "exit_code": 0, "signal": None},
                "output cut at the limit (1 MiB of stdout+stderr)",
            ),
            ({}, None),
            ({"exit_code": 3, "signal": None}, None),
        ]:
            wire = dict({"exit_code": None, "signal": 9, "stdout": "", "stderr": ""}, **fields)
            self.assertEqual(CommandResult.from_wire(wire).kill_message, want, fields)


class NoDaemonTest(unittest.TestCase):
    """Failure modes that need no daemon (or a fake one on a real socket)."""

    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="forkd-pyclient-")
        self.addCleanup(self.tmp.cleanup)

    def fake(self, behaviour: Callable[[socket.socket], None]) -> str:
        srv = FakeServer(self.tmp.name, behaviour)
        self.addCleanup(srv.close)
        return srv.path

    def test_daemon_not_running_names_socket(self) -> None:
        path = os.path.join(self.tmp.name, "nothing-here.sock")
        with self.assertRaises(DaemonNotRunning) as cm:
            Forkd(path)
        msg = str(cm.exception)
        self.assertIn(path, msg)
        self.assertIn("forkd-run --embedded", msg)
        self.assertIn("FORKD_SOCKET", msg)

        async def main() -> None:
            with self.assertRaises(DaemonNotRunning) as cm2:
                await AsyncForkd(path).ping()
            self.assertIn(path, str(cm2.exception))

        asyncio.run(main())

    def test_mistyped_socket_directory_is_named(self) -> None:
        path = os.path.join(self.tmp.name, "fokrd", "forkd.sock")
        want = (
            f"no forkd daemon is listening on {path}: start one with `forkd` (or run "
            f"`forkd-run --embedded`), or point FORKD_SOCKET at the right socket (its directory "
            f"{os.path.dirname(path)} does not exist: check the path for a typo)"
        )
        with self.assertRaises(DaemonNotRunning) as cm:
            Forkd(path)
        self.assertEqual(str(cm.exception), want)

        async def main() -> None:
            with self.assertRaises(DaemonNotRunning) as cm2:
                await AsyncForkd(path).ping()
            self.assertEqual(str(cm2.exception), want)

        asyncio.run(main())
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    def test_default_socket_path(self) -> None:
        old = os.environ.get("FORKD_SOCKET")
        try:
            os.environ["FORKD_SOCKET"] = "/x/y.sock"
            self.assertEqual(forkd.default_socket_path(), "/x/y.sock")
            os.environ["FORKD_SOCKET"] = ""
            if os.geteuid() == 0:
                self.assertEqual(forkd.default_socket_path(), "/run/forkd/forkd.sock")
        finally:
            if old is None:
                os.environ.pop("FORKD_SOCKET", None)
            else:
                os.environ["FORKD_SOCKET"] = old

    def test_parse_size(self) -> None:
        self.assertEqual(forkd.parse_size("256M"), 256 << 20)
        self.assertEqual(forkd.parse_size("1.5g"), 3 << 29)
        self.assertEqual(forkd.parse_size(4096), 4096)
        for bad in ("", "12Q", "-1M", 0, "0"):
            with self.assertRaises(ValueError):
                forkd.parse_size(bad)

    def test_closed_connection_is_connection_lost(self) -> None:
        path = self.fake(close_now)
        fk = Forkd(path, timeout=10)
        self.addCleanup(fk.close)
        with self.assertRaises(ConnectionLost):
            fk.ping()

        async def main() -> None:
            afk = AsyncForkd(path, timeout=10)
            try:
                with self.assertRaises(ConnectionLost):
                    await afk.ping()
            finally:
                await afk.close()

        asyncio.run(main())

    def test_garbage_reply_is_protocol_error(self) -> None:
        def garbage(conn: socket.socket) -> None:
            read_one_frame(conn)
            conn.sendall(struct.pack(">I", 5) + b"nope!")

        path = self.fake(garbage)
        fk = Forkd(path, timeout=10)
        self.addCleanup(fk.close)
        with self.assertRaises(ProtocolError):
            fk.ping()

        async def main() -> None:
            afk = AsyncForkd(path, timeout=10)
            try:
                with self.assertRaises(ProtocolError):
                    await afk.ping()
            finally:
                await afk.close()

        asyncio.run(main())

    def test_wrong_version_is_protocol_error(self) -> None:
        def v2(conn: socket.socket) -> None:
            read_one_frame(conn)
            body = b'{"v":2,"id":1,"kind":"pong","daemon_version":"9"}'
            conn.sendall(struct.pack(">I", len(body)) + body)

        fk = Forkd(self.fake(v2), timeout=10)
        self.addCleanup(fk.close)
        with self.assertRaises(ProtocolError) as cm:
            fk.ping()
        self.assertIn("version 2", str(cm.exception))

    def test_silent_daemon_times_out(self) -> None:
        path = self.fake(lambda conn: None)  # accepts, never answers
        fk = Forkd(path, timeout=0.5)
        self.addCleanup(fk.close)
        t0 = time.monotonic()
        with self.assertRaises(Timeout):
            fk.run("print(1)")
        self.assertLess(time.monotonic() - t0, 5)

        async def main() -> None:
            afk = AsyncForkd(path, timeout=0.5)
            try:
                with self.assertRaises(Timeout):
                    await afk.ping()
            finally:
                await afk.close()

        asyncio.run(main())

    def test_oversized_request_refused_locally(self) -> None:
        path = self.fake(lambda conn: None)
        fk = Forkd(path, timeout=5)
        self.addCleanup(fk.close)
        with self.assertRaises(ValueError):
            fk.run("print(1)", stdin=b"x" * (13 << 20))


if __name__ == "__main__":
    unittest.main()
