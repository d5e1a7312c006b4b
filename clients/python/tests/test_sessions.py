"""Sessions (protocol version 2) through the Python client against a REAL
forkd daemon (started as in test_client.py): state across cells, streaming
callbacks, rich results, interrupts, cancellation isolation on one
connection, files, commands, pause, TTL and context managers.

Run with::

    .venv/bin/python -m unittest discover -s clients/python/tests -v
"""

from __future__ import annotations

import asyncio
import os
import sys
import socket
import struct
import tempfile
import statistics
import threading
import time
import unittest
from typing import Any, List, Tuple

from test_client import DaemonTest, FakeServer, read_one_frame  # noqa: F401  (also puts src/ on sys.path)

import forkd  # noqa: E402
from forkd import AsyncForkd, Forkd  # noqa: E402
from forkd.errors import (  # noqa: E402
    Cancelled,
    FileError,
    FileNotFound,
    ForkdError,
    ProtocolError,
    CheckpointNotFound,
    InvalidArgument,
    InvalidRequest,
    SessionEnded,
    SessionNotFound,
    SessionPaused,
)

#: Every call's reply wait (the tests never hang on a wedged daemon).
CALL_BOUND = 120.0
LOOP = "import time\nprint('go', flush=True)\nwhile True: time.sleep(0.01)"


class SyncSessionTest(DaemonTest):
    def session(self, fk: Forkd, **kw: Any) -> forkd.Session:
        s = fk.session(**kw)

        def cleanup() -> None:
            try:
                s.kill()
            except (SessionEnded, SessionNotFound):
                pass

        self.addCleanup(cleanup)
        return s

    def test_state_rich_results_and_errors(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        r = s.run_code("x = 41")
        self.assertEqual(r.execution_count, 1)
        self.assertIsNone(r.text)
        self.assertIsNone(r.error)
        r = s.run_code("print('side'); x + 1")
        self.assertEqual(r.text, "42")
        self.assertEqual(r.stdout, "side\n")
        self.assertEqual(r.stderr, "")
        self.assertEqual(r.execution_count, 2)
        self.assertEqual([dict(d) for d in r.results if d.is_main_result], [{"text/plain": "42"}])
        self.assertEqual(r.main_result, {"text/plain": "42"})

        r = s.run_code(
            "import numpy as np\nclass H:\n    def _repr_html_(self): return '<b>hi</b>'\n"
            "    def __repr__(self): return 'H()'\nH()"
        )
        self.assertEqual(r.results[0]["text/html"], "<b>hi</b>")
        self.assertEqual(r.results[0]["text/plain"], "H()")
        self.assertEqual(r.text, "H()")
        self.assertEqual(s.run_code("int(np.arange(4).sum())").text, "6")

        r = s.run_code("def f():\n    return 1 / 0\nf()")
        self.assertIsNotNone(r.error)
        assert r.error is not None
        self.assertEqual(r.error.name, "ZeroDivisionError")
        self.assertEqual(r.error.value, "division by zero")
        self.assertIn("return 1 / 0", r.error.traceback)
        self.assertIsNone(r.text)
        self.assertEqual(s.run_code("x").text, "41", "state survives an error")
        r = s.run_code("1 +")
        assert r.error is not None
        self.assertEqual(r.error.name, "SyntaxError")

        r = s.run_code("display(1, 'a')\nprint('é')")
        self.assertEqual([d["text/plain"] for d in r.results], ["1", "'a'"])
        self.assertFalse(any(d.is_main_result for d in r.results))
        self.assertEqual(r.stdout, "é\n")

        info = s.info()
        self.assertEqual(info.id, s.id)
        self.assertEqual(info.state, "running")
        self.assertEqual(info.cells, 8)
        self.assertGreater(info.usage["memory_bytes"], 0)

    def test_streaming_callbacks_come_in_order_while_the_cell_runs(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        events: List[Tuple[str, Any, float]] = []
        # Within a stream the order is the cell's; across stdout, stderr and
        # display() the daemon reads separate channels, so the cell leaves
        # 0.3 s between writes to different ones.
        code = (
            "import sys, time\nprint('first', flush=True)\nprint('second', flush=True)\ntime.sleep(1.0)\n"
            "print('err', file=sys.stderr, flush=True)\ntime.sleep(0.3)\ndisplay(7)\ntime.sleep(0.3)\n"
            "print('last', flush=True)\n'tail'"
        )
        r = s.run_code(
            code,
            on_stdout=lambda t: events.append(("out", t, time.monotonic())),
            on_stderr=lambda t: events.append(("err", t, time.monotonic())),
            on_result=lambda d: events.append(("res", (d["text/plain"], d.is_main_result), time.monotonic())),
        )
        done = time.monotonic()
        outs = "".join(v for k, v, _ in events if k == "out")
        self.assertEqual(outs, "first\nsecond\nlast\n")
        merged: List[Tuple[str, Any]] = []
        for k, v, _ in events:  # a stream's consecutive chunks as one
            if merged and merged[-1][0] == k == "out":
                merged[-1] = (k, merged[-1][1] + v)
            else:
                merged.append((k, v))
        self.assertEqual(
            merged,
            [
                ("out", "first\nsecond\n"),
                ("err", "err\n"),
                ("res", ("7", False)),
                ("out", "last\n"),
                ("res", ("'tail'", True)),
            ],
        )
        self.assertGreater(done - events[0][2], 0.5, "the first line came only when the cell ended")
        self.assertEqual(r.stdout, "first\nsecond\nlast\n")
        self.assertEqual(r.stderr, "err\n")
        self.assertEqual(r.text, "'tail'")

        # A character split across two chunks reaches the callback whole.
        got: List[str] = []
        r = s.run_code(
            "import sys\nb = 'ü€'.encode()\nsys.stdout.buffer.write(b[:1]); sys.stdout.flush()\n"
            "import time; time.sleep(0.2)\nsys.stdout.buffer.write(b[1:]); sys.stdout.flush()",
            on_stdout=got.append,
        )
        self.assertEqual("".join(got), "ü€")

    def test_interrupt_from_another_thread_then_continue(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        s.run_code("kept = 'yes'")
        started = threading.Event()
        out: List[Any] = []
        t = threading.Thread(target=lambda: out.append(s.run_code(LOOP, on_stdout=lambda _t: started.set())))
        t.start()
        self.assertTrue(started.wait(30), "the cell never started")
        s.interrupt()  # the cell holds the client's connection: this uses another
        t.join(30)
        self.assertFalse(t.is_alive())
        self.assertEqual(out[0].error.name, "KeyboardInterrupt")
        self.assertEqual(s.run_code("kept").text, "'yes'")

        r = s.run_code("while True: pass", timeout=0.3)
        self.assertTrue(r.timed_out)
        self.assertEqual(r.error.name, "KeyboardInterrupt")
        # Said as a one-shot kill is (the daemon's cell fields).
        self.assertEqual(r.kill_message, "interrupted: timed out after 0.3 s (the timeout)")
        self.assertEqual(s.run_code("kept").text, "'yes'")
        self.assertIsNone(s.run_code("kept").kill_message)

    def test_a_callback_that_raises_cancels_the_cell(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        s.run_code("kept = 1")

        def boom(_t: str) -> None:
            raise RuntimeError("stop")

        with self.assertRaises(RuntimeError):
            s.run_code(LOOP, on_stdout=boom)
        # The dropped connection cancelled the cell: the session answers.
        self.assertEqual(s.run_code("kept + 1", timeout=20).text, "2")

    def test_files_100_mib_round_trip_and_errors(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk, limits={"scratch": "400M", "file_size": "200M", "memory": "1G"})
        big = os.urandom(100 << 20)
        with self.assertRaises(FileNotFound):
            s.files.write("data/big.bin", b"x")  # no parent directory yet
        s.files.make_dir("data")
        t0 = time.monotonic()
        s.files.write("data/big.bin", big)
        wrote = time.monotonic() - t0
        self.assertEqual(s.run_code("import os; os.path.getsize('data/big.bin')").text, str(len(big)))
        t0 = time.monotonic()
        back = s.files.read("data/big.bin")
        read = time.monotonic() - t0
        self.assertTrue(back == big, "100 MiB round trip differs")
        mib = len(big) / (1 << 20)
        print(
            f"\n[sessions] 100 MiB file: write {wrote:.2f} s ({mib / wrote:.0f} MiB/s), "
            f"read {read:.2f} s ({mib / read:.0f} MiB/s)",
            flush=True,
        )
        del back, big

        listing = s.files.list("data")
        self.assertEqual([(e.name, e.type, e.size) for e in listing], [("big.bin", "file", 100 << 20)])
        self.assertEqual(listing[0].path, "/home/user/data/big.bin")  # the working directory
        self.assertEqual(s.files.stat("/tmp/data").type, "dir")
        s.files.write("note.txt", "héllo")
        self.assertEqual(s.files.read("note.txt", format="text"), "héllo")
        self.assertEqual(s.files.read("note.txt"), "héllo".encode())
        s.files.write("empty", b"")
        self.assertEqual(s.files.read("empty"), b"")
        s.files.write("exact", b"z" * (8 << 20))  # exactly one chunk
        self.assertEqual(s.files.stat("exact").size, 8 << 20)
        self.assertEqual(s.files.read("exact"), b"z" * (8 << 20))
        s.files.write("odd", b"q" * ((16 << 20) + 5))  # reads pipeline past a chunk boundary
        self.assertEqual(s.files.read("odd"), b"q" * ((16 << 20) + 5))
        self.assertEqual(s.run_code("open('note.txt').read()").text, "'héllo'")

        with self.assertRaises(FileNotFound) as cm:
            s.files.read("nope.txt")
        self.assertIn("nope.txt", cm.exception.message)
        with self.assertRaises(FileError):
            s.files.write("/etc/evil", b"x")
        with self.assertRaises((FileError, FileNotFound)):
            s.files.read("/etc/shadow")
        self.assertFalse(s.files.exists("nope.txt"))
        s.files.remove("data")
        with self.assertRaises(FileNotFound):
            s.files.stat("data")

    def test_commands_exit_codes_streaming_and_background_kill(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        r = s.commands.run("echo out; echo err >&2; exit 3", timeout=20)
        self.assertEqual((r.exit_code, r.stdout, r.stderr), (3, "out\n", "err\n"))
        self.assertFalse(r.ok)
        r = s.commands.run("echo $FOO; pwd", cwd="/", envs={"FOO": "bar"})
        self.assertEqual((r.exit_code, r.stdout), (0, "bar\n/\n"))
        s.run_code("open('note.txt', 'w').write('from python')")
        out: List[str] = []
        err: List[str] = []
        r = s.commands.run("cat note.txt; echo; echo e >&2", on_stdout=out.append, on_stderr=err.append)
        self.assertEqual((r.stdout, r.stderr), ("from python\n", "e\n"))
        self.assertEqual(("".join(out), "".join(err)), (r.stdout, r.stderr))
        r = s.commands.run("sleep 30", timeout=0.3)
        self.assertTrue(r.timed_out)
        self.assertEqual(r.kill_message, "killed: timed out after 0.3 s (the timeout)")
        self.assertEqual(r.signal, 9)

        h = s.commands.run("echo started; sleep 30", background=True)
        assert isinstance(h, forkd.CommandHandle)
        self.assertGreater(h.pid, 0)
        t0 = time.monotonic()
        h.kill()
        r = h.wait()
        self.assertLess(time.monotonic() - t0, 20)
        self.assertEqual(r.signal, 9)
        # A background command that ends by itself, its output streamed.
        seen: List[str] = []
        h = s.commands.run("echo hi; sleep 0.2; exit 5", background=True, on_stdout=seen.append)
        assert isinstance(h, forkd.CommandHandle)
        r = h.wait()
        self.assertEqual((r.exit_code, r.stdout, "".join(seen)), (5, "hi\n", "hi\n"))
        self.assertEqual(s.commands.run("exec /nonexistent").exit_code, 127)

    def test_command_stdin_send_and_close(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        h = s.commands.run("cat", background=True, stdin=True)
        assert isinstance(h, forkd.CommandHandle)
        big = bytes(range(256)) * 400  # 100 KiB: more than a pipe holds
        h.send_stdin("text, ")
        s.commands.send_stdin(h.pid, big)
        h.send_stdin(b"bytes")
        h.close_stdin()
        r = h.wait()
        self.assertEqual(r.exit_code, 0)
        want = b"text, " + big + b"bytes"
        self.assertEqual(r.stdout, want.decode("utf-8", errors="replace"))
        with self.assertRaises(FileNotFound):
            s.commands.send_stdin(h.pid, "after the end")
        with self.assertRaises(InvalidArgument):
            s.commands.run("cat", stdin="yes")  # type: ignore[arg-type]
        # Without stdin=True the command reads /dev/null and input is refused.
        h = s.commands.run("cat; sleep 30", background=True)
        assert isinstance(h, forkd.CommandHandle)
        with self.assertRaisesRegex(forkd.errors.InvalidRequest, "stdin: true"):
            h.send_stdin("x")
        h.kill()
        self.assertEqual(h.wait().signal, 9)

    def test_pause_resume_ttl_and_listing(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk, labels={"job": "pause"})
        short = self.session(fk, ttl=0.5, labels={"job": "short"})
        s.run_code("n = 1")
        self.assertEqual([i.id for i in fk.sessions(labels={"job": "pause"})], [s.id])
        info = s.pause()
        self.assertEqual(info.state, "paused")
        with self.assertRaises(SessionPaused):
            s.run_code("n")
        self.assertEqual(s.info().state, "paused")
        self.assertEqual(s.resume().state, "running")
        self.assertEqual(s.run_code("n + 1").text, "2")
        info = s.set_ttl(60)
        self.assertTrue(50_000 < info.ttl_left_ms <= 60_000, info)

        time.sleep(1.2)
        info = short.info()
        self.assertEqual((info.state, info.ended_by), ("ended", "ttl"))
        with self.assertRaises(SessionEnded) as cm:
            short.run_code("1")
        self.assertTrue(cm.exception.message)
        self.assertNotIn(short.id, [i.id for i in fk.sessions()])

    def test_set_network_within_the_bound(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        self.assertEqual(s.info().allow_net, [])
        # An allowlist no cell uses: nothing is sent anywhere.
        self.assertEqual(s.set_network(["198.18.0.1:80"]).allow_net, ["198.18.0.1:80"])
        with self.assertRaises(forkd.LimitExceedsPolicy) as cm:
            s.set_network(["169.254.169.254:80"])
        self.assertIn("169.254.0.0/16", cm.exception.message)
        self.assertEqual(s.info().allow_net, ["198.18.0.1:80"])  # unchanged
        with self.assertRaises(InvalidArgument) as ia:
            s.set_network("198.18.0.1:80")  # type: ignore[arg-type]
        self.assertIn("allow_net", str(ia.exception))
        self.assertEqual(s.set_network([]).allow_net, [])
        self.assertEqual(s.run_code("1 + 1").text, "2")

        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as afk:
                a = await afk.attach(s.id)
                info = await a.set_network(["198.18.0.2:443"])
                self.assertEqual(info.allow_net, ["198.18.0.2:443"])

        asyncio.run(main())

    def test_context_manager_kills_and_attach(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        with fk.session() as s:
            sid = s.id
            other = Forkd(self.sock_path, timeout=CALL_BOUND)
            self.addCleanup(other.close)
            again = other.attach(sid)
            again.run_code("v = 3")
            self.assertEqual(s.run_code("v * 2").text, "6")
        info = s.info()
        self.assertEqual((info.state, info.ended_by), ("ended", "killed"))
        with self.assertRaises(SessionEnded):
            fk.attach(sid)
        with self.assertRaises(SessionNotFound) as cm:
            fk.attach("no-such-session")
        self.assertEqual(cm.exception.code, "unknown_session")
        self.assertIsInstance(cm.exception, ForkdError)
        # Version-1 spawns still work on the same client.
        self.assertEqual(fk.run("print(6 * 7)", timeout=20).text, "42\n")

    def test_arguments_are_validated_before_sending(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = forkd.Session(fk, "not-sent")
        cases = [
            ("timeout", lambda: s.run_code("1", timeout=-1)),
            ("timeout", lambda: s.run_code("1", timeout="5")),
            ("code", lambda: s.run_code(b"1")),  # type: ignore[arg-type]
            ("on_stdout", lambda: s.run_code("1", on_stdout=3)),  # type: ignore[arg-type]
            ("ttl", lambda: fk.session(ttl=0)),
            ("idle_timeout", lambda: fk.session(idle_timeout=-2)),
            ("env", lambda: fk.session(env={"A": 1})),  # type: ignore[dict-item]
            ("limits['nope']", lambda: fk.session(limits={"nope": 1})),
            ("limits['memory']", lambda: fk.session(limits={"memory": "lots"})),
            ("data", lambda: s.files.write("f", 123)),  # type: ignore[arg-type]
            ("path", lambda: s.files.read("")),
            ("format", lambda: s.files.read("f", format="xml")),
            ("mode", lambda: s.files.write("f", b"", mode=0o10000)),
            ("cmd", lambda: s.commands.run(["ls"])),  # type: ignore[arg-type]
            ("envs", lambda: s.commands.run("ls", envs=["A=1"])),  # type: ignore[arg-type]
            ("timeout", lambda: s.commands.run("ls", timeout=float("nan"))),
            ("seconds", lambda: s.set_ttl(-1)),
            ("labels", lambda: fk.sessions(labels="a=b")),  # type: ignore[arg-type]
        ]
        for param, call in cases:
            with self.subTest(param=param):
                with self.assertRaises(InvalidArgument) as cm:
                    call()
                self.assertEqual(cm.exception.param, param)
                self.assertIsInstance(cm.exception, ForkdError)
                self.assertIn(param, str(cm.exception))

    def test_cell_round_trip_figure(self) -> None:
        """Prints the median round trip of `x + 1` over 200 cells (a
        figure for the report, not a speed assertion)."""
        fk = self.client(timeout=CALL_BOUND)
        s = self.session(fk)
        s.run_code("x = 1")
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            r = s.run_code("x + 1")
            times.append(time.perf_counter() - t0)
            self.assertEqual(r.text, "2")
        print(
            f"\n[sessions] x + 1 round trip over 200 cells: median {statistics.median(times) * 1e6:.0f} us, "
            f"p90 {sorted(times)[179] * 1e6:.0f} us",
            flush=True,
        )


class BranchTest(DaemonTest):
    """Live branches (docs/branch.md) through both clients."""

    def test_branch_copies_state_and_diverges_sync_and_async(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("branching needs a root daemon")
        fk = self.client(timeout=CALL_BOUND)
        s = fk.session(ttl=120)
        self.addCleanup(s.kill)
        s.run_code("import numpy as np, random\nx = 41\na = np.ones(10)\nrandom.seed(5); np.random.seed(5)")
        s.files.write("note.txt", "parent")
        kids = s.branch(2)
        self.assertEqual(len(kids), 2)
        for k in kids:
            self.addCleanup(k.kill)
            self.assertEqual(k.info().parent, s.id)
            self.assertEqual(k.run_code("x + 1").text, "42")
            self.assertEqual(k.files.read("note.txt", format="text"), "parent")
        kids[0].run_code("x = 0")
        self.assertEqual(s.run_code("x").text, "41")
        self.assertEqual(kids[1].run_code("x").text, "41")
        # Seeds: fresh by default, the parent's with same_seed.
        fresh = [k.run_code("random.random()").text for k in kids]
        self.assertNotEqual(fresh[0], fresh[1])
        same = s.branch(2, same_seed=True)
        for k in same:
            self.addCleanup(k.kill)
        self.assertEqual(
            {k.run_code("(random.random(), float(np.random.random()))").text for k in same},
            {s.run_code("(random.random(), float(np.random.random()))").text},
        )
        with self.assertRaises(InvalidArgument):
            s.branch(0)

        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as afk:
                a = await afk.attach(s.id)
                (b,) = await a.branch()
                try:
                    self.assertEqual((await b.run_code("x")).text, "41")
                finally:
                    await b.kill()

        asyncio.run(main())


class CheckpointTest(DaemonTest):
    """Checkpoint and restore (docs/branch.md) through both clients."""

    def test_restore_puts_back_state_and_files_sync_and_async(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = fk.session(ttl=120)
        self.addCleanup(s.kill)
        s.run_code("import numpy as np\nx = 41\na = np.ones(10)")
        s.files.write("note.txt", "kept")
        ck = s.checkpoint()
        self.assertEqual([c.id for c in s.checkpoints()], [ck])
        self.assertEqual(s.info().checkpoints[0].id, ck)
        s.run_code("x = 0\na[:] = 5")
        s.files.write("note.txt", "changed")
        s.files.write("later.txt", "later")
        info = s.restore(ck)
        self.assertEqual(info.id, s.id)
        self.assertEqual(s.run_code("x + 1, float(a.sum())").text, "(42, 10.0)")
        self.assertEqual(s.files.read("note.txt", format="text"), "kept")
        self.assertFalse(s.files.exists("later.txt"))
        self.assertEqual(s.checkpoints()[0].restores, 1)
        s.delete_checkpoint(ck)
        with self.assertRaises(CheckpointNotFound):
            s.restore(ck)
        with self.assertRaises(InvalidArgument):
            s.restore("")

        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as afk:
                a = await afk.attach(s.id)
                await a.run_code("y = 'before'")
                c = await a.checkpoint()
                await a.run_code("y = 'after'")
                await a.restore(c)
                self.assertEqual((await a.run_code("y")).text, "'before'")
                self.assertEqual([k.id for k in await a.checkpoints()], [c])
                await a.delete_checkpoint(c)
                self.assertEqual(await a.checkpoints(), [])

        asyncio.run(main())

    def test_kept_checkpoint_outlives_the_session_sync_and_async(self) -> None:
        fk = self.client(timeout=CALL_BOUND)
        s = fk.session(ttl=120)
        self.addCleanup(s.kill)
        s.run_code("x = 41")
        s.files.write("note.txt", "kept")
        kept = s.checkpoint(keep=True)
        dropped = s.checkpoint()
        self.assertEqual([(c.id, c.kept) for c in s.checkpoints()], [(kept, True), (dropped, False)])
        info = s.kill()
        self.assertEqual(info.state, "ended_with_checkpoints")
        self.assertIn(s.id, [i.id for i in fk.sessions()])
        with self.assertRaises(SessionEnded):
            s.run_code("1")
        self.assertEqual([c.id for c in s.checkpoints()], [kept])
        with self.assertRaises(CheckpointNotFound):
            s.restore(dropped)
        self.assertEqual(s.restore(kept).state, "running")
        self.assertEqual(s.run_code("x + 1").text, "42")
        self.assertEqual(s.files.read("note.txt", format="text"), "kept")

        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as afk:
                a = await afk.attach(s.id)
                await a.run_code("y = 'kept'")
                c = await a.checkpoint(keep=True)
                await a.kill()
                self.assertEqual((await a.info()).state, "ended_with_checkpoints")
                await a.restore(c)
                self.assertEqual((await a.run_code("y")).text, "'kept'")
                await a.kill()
                await a.delete_checkpoint(c)
                # The last kept checkpoint: what is left of the session goes.
                await a.delete_checkpoint(kept)
                self.assertEqual((await a.checkpoints()), [])

        asyncio.run(main())
        with self.assertRaises(SessionEnded):
            s.run_code("1")


class AsyncSessionTest(DaemonTest):
    def test_cancel_one_cell_leaves_a_concurrent_cell_on_the_connection_alone(self) -> None:
        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as fk:
                a = await fk.session()
                b = await fk.session()
                conn = fk._conn
                try:
                    await a.run_code("kept = 'a'")
                    started = asyncio.Event()
                    loop_task = asyncio.ensure_future(a.run_code(LOOP, on_stdout=lambda _t: started.set()))
                    beside = asyncio.ensure_future(
                        b.run_code("import time\nprint('b', flush=True)\ntime.sleep(1.0)\n6 * 7")
                    )
                    await asyncio.wait_for(started.wait(), 30)
                    loop_task.cancel()
                    with self.assertRaises(asyncio.CancelledError):
                        await loop_task
                    self.assertFalse(beside.done(), "the cell beside should still be sleeping")
                    r = await asyncio.wait_for(beside, 30)
                    self.assertEqual((r.text, r.stdout), ("42", "b\n"))
                    # The cancelled cell was interrupted: `a` answers and kept its state.
                    r = await asyncio.wait_for(a.run_code("kept"), 30)
                    self.assertEqual(r.text, "'a'")
                    self.assertIs(fk._conn, conn, "the connection survived")
                    # A timed-out wait cancels in the daemon as well.
                    slow = AsyncForkd(self.sock_path, timeout=0.5)
                    try:
                        sa = await slow.attach(a.id)
                        with self.assertRaises(forkd.Timeout):
                            await sa.run_code("while True: pass")
                        r = await asyncio.wait_for(b.run_code("1 + 1"), 30)
                        self.assertEqual(r.text, "2")
                    finally:
                        await slow.close()
                    r = await asyncio.wait_for(a.run_code("kept"), 30)
                    self.assertEqual(r.text, "'a'")
                finally:
                    await a.kill()
                    await b.kill()

        asyncio.run(main())

    def test_a_cancel_request_ends_its_target_with_cancelled(self) -> None:
        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as fk:
                async with fk.session() as s:
                    conn = await fk._connection()
                    started = asyncio.Event()
                    rid = conn.next_id  # the id the cell's request takes
                    cell = asyncio.ensure_future(s.run_code(LOOP, on_stdout=lambda _t: started.set()))
                    await asyncio.wait_for(started.wait(), 30)
                    conn._cancel_soon(rid)  # what cancelling another task would send
                    with self.assertRaises(Cancelled) as cm:
                        await asyncio.wait_for(cell, 30)
                    self.assertEqual(cm.exception.code, "cancelled")
                    self.assertTrue(cm.exception.message)
                    self.assertEqual((await s.run_code("3 * 3")).text, "9")

        asyncio.run(main())

    def test_async_context_manager_files_commands_and_callbacks(self) -> None:
        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as fk:
                async with fk.session(ttl=120) as s:
                    sid = s.id
                    seen: List[str] = []

                    async def on_out(t: str) -> None:
                        seen.append(t)

                    r = await s.run_code("print('hi')\n3", on_stdout=on_out)
                    self.assertEqual((r.text, seen), ("3", ["hi\n"]))
                    await s.files.write("a.txt", "A" * (9 << 20))  # two chunks
                    self.assertEqual(await s.files.read("a.txt", format="text"), "A" * (9 << 20))
                    blob = os.urandom(1 << 20) * 20 + b"tail"  # reads pipeline over 3 chunks
                    await s.files.write("b.bin", blob)
                    self.assertTrue(await s.files.read("b.bin") == blob)
                    with self.assertRaises(FileNotFound):
                        await s.files.read("missing.bin")
                    # The interpreter's own directory shows up in the scratch when
                    # it lives under /tmp (a venv there is bound back in): ignore it.
                    shadow = sys.prefix.split("/")[2] if sys.prefix.startswith("/tmp/") else None
                    names = [e.name for e in await s.files.list(".") if e.name != shadow]
                    self.assertEqual(names, ["a.txt", "b.bin"])
                    r = await s.commands.run("wc -c < a.txt")
                    self.assertEqual(r.stdout.strip(), str(9 << 20))
                    h = await s.commands.run("echo s; sleep 30", background=True)
                    await h.kill()
                    r = await asyncio.wait_for(h.wait(), 20)
                    self.assertEqual(r.signal, 9)
                    h = await s.commands.run("echo s; exit 4", background=True)
                    r = await asyncio.wait_for(h.wait(), 20)
                    self.assertEqual((r.exit_code, r.stdout), (4, "s\n"))
                    h = await s.commands.run("wc -l", background=True, stdin=True)
                    await h.send_stdin("a\nb\n")
                    await s.commands.send_stdin(h.pid, b"c\n")
                    await h.close_stdin()
                    r = await asyncio.wait_for(h.wait(), 20)
                    self.assertEqual((r.exit_code, r.stdout.strip()), (0, "3"))
                    self.assertEqual([i.id for i in await fk.sessions()], [sid])
                with self.assertRaises(SessionEnded):
                    await fk.attach(sid)
                s2 = await fk.session()
                await s2.pause()
                with self.assertRaises(SessionPaused):
                    await s2.run_code("1")
                await s2.resume()
                self.assertEqual((await s2.run_code("2 * 2")).text, "4")
                await s2.kill()

        asyncio.run(main())


class SessionWorkspaceTest(DaemonTest):
    """A session with a workspace below {tmp}/ws: its rules hold for cells
    and for the file calls alike, for the session's whole life."""

    config_text = 'workspace_roots = ["{tmp}/ws"]\n'

    def test_workspace_rules_hold_for_cells_and_file_calls(self) -> None:
        root = os.path.join(self.tmp.name, "ws", "repo")
        os.makedirs(os.path.join(root, "out"))
        os.makedirs(os.path.join(root, "secrets"))
        with open(os.path.join(root, "secrets", "key"), "w") as f:
            f.write("KEY")
        ws = forkd.Workspace(path=root, rules=["secrets=none", "out=write"])
        fk = self.client(timeout=CALL_BOUND)
        with self.assertRaises(InvalidArgument) as cm:
            fk.session(workspace=forkd.Workspace(path=root, overlay=True, export_delta=True))
        self.assertEqual(cm.exception.param, "workspace")
        with fk.session(workspace=ws) as s:
            r = s.run_code("open('/workspace/out/x', 'w').write('from the cell')")
            self.assertIsNone(r.error, r.error)
            r = s.run_code("open('/workspace/out/x').read()")
            self.assertEqual(r.text, "'from the cell'")
            r = s.run_code("open('/workspace/secrets/key').read()")
            self.assertIsNotNone(r.error, "a cell read a path its rules hide")
            with self.assertRaises((FileError, FileNotFound)):
                s.files.read("/workspace/secrets/key")
            s.files.write("/workspace/out/y", b"from the client")
            with self.assertRaises((FileError, FileNotFound)):
                s.files.write("/workspace/z", b"outside the writable rule")
        with open(os.path.join(root, "out", "x")) as f:
            self.assertEqual(f.read(), "from the cell")
        # An overlay's changes, exported while the session lives.
        import io
        import tarfile

        with fk.session(workspace=forkd.Workspace(path=root, rules=["out=write"], overlay=True)) as s:
            s.run_code("open('/workspace/out/o', 'w').write('overlay')")
            tar = tarfile.open(fileobj=io.BytesIO(s.workspace_delta()))
            member = tar.extractfile("out/o")
            assert member is not None
            self.assertEqual(member.read(), b"overlay")
        self.assertFalse(os.path.exists(os.path.join(root, "out", "o")))

        async def main() -> None:
            async with AsyncForkd(self.sock_path, timeout=CALL_BOUND) as afk:
                async with afk.session(workspace=forkd.Workspace(path=root, overlay=True)) as a:
                    self.assertIsInstance(await a.workspace_delta(), bytes)

        asyncio.run(main())
        with open(os.path.join(root, "out", "y"), "rb") as f:
            self.assertEqual(f.read(), b"from the client")
        self.assertFalse(os.path.exists(os.path.join(root, "z")))

    def test_branches_of_an_overlay_session_get_their_own_changes(self) -> None:
        root = os.path.join(self.tmp.name, "ws", "branched")
        os.makedirs(os.path.join(root, "out"))
        fk = self.client(timeout=CALL_BOUND)
        with fk.session(workspace=forkd.Workspace(path=root, rules=["out=write"], overlay=True)) as s:
            s.run_code("open('/workspace/out/f', 'w').write('S')")
            [b] = s.branch()
            try:
                self.assertEqual(b.run_code("open('/workspace/out/f').read()").text, "'S'")
                b.run_code("open('/workspace/out/f', 'w').write('B')")
                self.assertEqual(s.run_code("open('/workspace/out/f').read()").text, "'S'")
                self.assertEqual(b.run_code("open('/workspace/out/f').read()").text, "'B'")
            finally:
                b.kill()
        self.assertFalse(os.path.exists(os.path.join(root, "out", "f")))
        # Direct mode: refused, naming the mode to use.
        with fk.session(workspace=forkd.Workspace(path=root, rules=["out=write"])) as s:
            with self.assertRaises(InvalidRequest) as cm:
                s.branch()
            self.assertIn("mode overlay", str(cm.exception))


class VersionTest(unittest.TestCase):
    """Replies of the wrong version, from a real socket server that answers
    with fixed frames."""

    def serve(self, body: bytes) -> str:
        tmp = tempfile.TemporaryDirectory(prefix="forkd-pyversion-")
        self.addCleanup(tmp.cleanup)

        def answer(conn: socket.socket) -> None:
            read_one_frame(conn)
            conn.sendall(struct.pack(">I", len(body)) + body)

        server = FakeServer(tmp.name, answer)
        self.addCleanup(server.close)
        return server.path

    def test_a_version_1_error_answers_a_version_2_request(self) -> None:
        # The daemon sends errors it cannot attribute to a request's version as v 1.
        path = self.serve(b'{"v":1,"id":1,"kind":"error","code":"unknown_session","message":"no session x"}')
        fk = Forkd(path, timeout=10)
        self.addCleanup(fk.close)
        with self.assertRaises(SessionNotFound) as cm:
            fk.attach("x")
        self.assertEqual(cm.exception.message, "no session x")

        async def main() -> None:
            async with AsyncForkd(path, timeout=10) as afk:
                with self.assertRaises(SessionNotFound):
                    await afk.attach("x")

        asyncio.run(main())

    def test_a_version_1_session_reply_is_a_protocol_error(self) -> None:
        path = self.serve(b'{"v":1,"id":1,"kind":"session","session":"x","zygote":"z","state":"running"}')
        fk = Forkd(path, timeout=10)
        self.addCleanup(fk.close)
        with self.assertRaises(ProtocolError):
            fk.attach("x")


if __name__ == "__main__":
    unittest.main()
