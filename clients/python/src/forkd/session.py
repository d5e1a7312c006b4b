"""Sessions (protocol version 2): :class:`Session` for the blocking
:class:`~forkd.Forkd` and :class:`AsyncSession` for :class:`~forkd.AsyncForkd`.

A session is a sandbox that stays alive between calls: its interpreter
keeps variables between :meth:`Session.run_code` cells, its scratch keeps
files, and shell commands run beside it. Leaving its ``with`` block kills it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import socket as _socket
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _protocol as P
from ._session_wire import (
    MAX_FILE_CHUNK,
    NON_FINAL_KINDS,
    CellResult,
    CheckpointInfo,
    CommandResult,
    FileEntry,
    SessionInfo,
    StreamCollector,
    _unb64,
    as_bytes,
    check_callback,
    check_mode,
    check_str,
    command_fields,
    expect_kind,
    iter_input_chunks,
    iter_write_chunks,
    run_code_fields,
    seconds_ms,
    set_network_fields,
    branch_fields,
)
from ._session_wire import request as v2_request
from .errors import (
    ConnectionLost,
    InvalidArgument,
    ProtocolError,
    SessionEnded,
    SessionNotFound,
    Timeout,
)

if TYPE_CHECKING:
    from .aio import AsyncForkd
    from .client import Forkd

__all__ = [
    "Session",
    "AsyncSession",
    "Files",
    "AsyncFiles",
    "Commands",
    "AsyncCommands",
    "CommandHandle",
    "AsyncCommandHandle",
]

Calls = List[Tuple[Callable[[Any], Any], Any]]

#: ``file_read`` requests an async read keeps in flight.
_READ_DEPTH = 2


def _read_format(format: Any) -> bool:
    if format not in ("bytes", "text"):
        raise InvalidArgument("format", f"must be 'bytes' or 'text', got {format!r}")
    return format == "text"


def _file_data(resp: Mapping[str, Any]) -> Tuple[bytes, bool]:
    expect_kind(resp, "file_data", "file_read")
    return _unb64(resp.get("data", ""), "data"), bool(resp.get("eof", False))


def _path(path: Any) -> str:
    return check_str("path", path)


# -- blocking -------------------------------------------------------------------


class Session:
    """A live session of a :class:`~forkd.Forkd` client (see
    :meth:`Forkd.session <forkd.Forkd.session>`). Calls may come from any
    thread: while one thread runs a cell, another's :meth:`interrupt`,
    :meth:`info` or file call goes over a connection of its own."""

    def __init__(self, client: "Forkd", session_id: str) -> None:
        self._client = client
        self.id: str = session_id
        """The session id (give it to :meth:`Forkd.attach` elsewhere)."""
        self.files = Files(self)
        """File operations inside the sandbox (:class:`Files`)."""
        self.commands = Commands(self)
        """Shell commands inside the sandbox (:class:`Commands`)."""

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.kill()
        except (SessionNotFound, SessionEnded):
            pass

    def _ref(self) -> Dict[str, Any]:
        return {"session": self.id}

    def _info(self, op: str, fields: Optional[Mapping[str, Any]] = None) -> SessionInfo:
        resp = self._client._v2(op, fields if fields is not None else self._ref())
        return SessionInfo.from_wire(expect_kind(resp, "session", op))

    def run_code(
        self,
        code: str,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        on_result: Optional[Callable[[Any], Any]] = None,
        timeout: Optional[float] = None,
    ) -> CellResult:
        """Runs ``code`` as one cell in the session's ``__main__`` (variables
        persist between cells) and returns its :class:`~forkd.CellResult`:
        ``.text`` (the trailing expression's value), ``.results`` (rich
        results), ``.stdout``, ``.stderr``, ``.error``, ``.execution_count``.

        Args:
            code: Python source.
            on_stdout, on_stderr: called with each chunk of text as the cell
                writes it (before this call returns).
            on_result: called with each :class:`~forkd.DisplayResult`
                (``display()`` calls as they happen, then the main result).
            timeout: seconds; the cell is interrupted then (``KeyboardInterrupt``,
                ``timed_out`` true) and the session survives.

        An exception in the cell is ``.error``, not raised. Raises
        SessionEnded, SessionPaused, SessionNotFound, Timeout, InvalidArgument.
        Interrupting this call (Ctrl-C, a callback raising) drops the
        connection, which interrupts the cell.
        """
        fields = run_code_fields(self.id, code, timeout)
        col = StreamCollector(
            check_callback("on_stdout", on_stdout),
            check_callback("on_stderr", on_stderr),
            check_callback("on_result", on_result),
        )

        def on_event(ev: Dict[str, Any]) -> None:
            for fn, arg in col.feed(ev):
                fn(arg)

        final = self._client._v2("run_code", fields, on_event)
        result, calls = col.finish_cell(final)
        for fn, arg in calls:
            fn(arg)
        return result

    def interrupt(self) -> None:
        """Interrupts the running cell (``KeyboardInterrupt`` in it); the
        session and its state survive. A no-op when no cell runs."""
        self._client._v2("interrupt", self._ref())

    def pause(self) -> SessionInfo:
        """Freezes the session (its processes get no CPU); only
        :meth:`resume`, :meth:`info`, :meth:`set_ttl` and :meth:`kill` are
        served until resumed (others raise SessionPaused)."""
        return self._info("session_pause")

    def resume(self) -> SessionInfo:
        """Thaws a paused session."""
        return self._info("session_resume")

    def set_ttl(self, seconds: float) -> SessionInfo:
        """Sets the session's remaining lifetime to ``seconds`` from now."""
        ms = seconds_ms("seconds", seconds)
        return self._info("session_set_ttl", {"session": self.id, "ttl_ms": ms})

    def workspace_delta(self) -> bytes:
        """The overlay workspace's changes so far, as a tar: new and changed
        files, deletions as overlay whiteouts (``.wh.NAME``), the format of a
        one-shot run's ``workspace_delta``. Taken while the session runs: a
        file being written meanwhile may be caught half-written (pause the
        session first for a consistent delta)."""
        resp = self._client._v2("session_workspace_delta", self._ref())
        expect_kind(resp, "file_data", "session_workspace_delta")
        return _unb64(resp.get("data", ""), "data")

    def set_network(self, allow_net: Sequence[str]) -> SessionInfo:
        """Replaces the session's network allowlist (the ``allow_net`` syntax
        of :meth:`Forkd.session`, within the daemon's bound) for new
        connections; open ones stay. An empty list closes the network."""
        return self._info("session_set_network", set_network_fields(self.id, allow_net))

    def info(self) -> SessionInfo:
        """The session's state, usage, limits and remaining TTL."""
        return self._info("session_info")

    def branch(
        self,
        k: int = 1,
        same_seed: bool = False,
        force: bool = False,
        labels: Optional[Mapping[str, str]] = None,
    ) -> List["Session"]:
        """``k`` copies of this live session, each a new :class:`Session`: its
        interpreter (variables, imports, arrays) and scratch as they are now,
        in namespaces and a cgroup of its own; this session carries on
        unchanged. A running cell is waited for. Each copy is reseeded
        (``random``, numpy's global generator) unless ``same_seed``; a session
        running threads of its own is refused unless ``force`` (a copy has
        only the thread that forked). See docs/branch.md."""
        resp = self._client._v2("session_branch", branch_fields(self.id, k, same_seed, force, labels))
        sessions = expect_kind(resp, "sessions", "session_branch").get("sessions") or []
        return [Session(self._client, SessionInfo.from_wire(s).id) for s in sessions]

    def checkpoint(self, force: bool = False, keep: bool = False) -> str:
        """Keeps a frozen copy of this session as it is now (its interpreter,
        copy-on-write, and its scratch) and returns its id, for
        :meth:`restore`. A running cell is waited for; a session running
        threads of its own is refused unless ``force``. Each checkpoint counts
        against the daemon's quotas and the session's memory limit, and dies
        with the session unless ``keep``: a kept one outlives the session's
        end (kill, TTL) for the daemon's ``kept_checkpoint_ttl_secs``; the
        ended session (state ``"ended_with_checkpoints"``) then runs again
        with :meth:`restore`. See docs/branch.md."""
        fields = {"session": self.id, "force": bool(force)}
        if keep:
            fields["keep"] = True
        resp = self._client._v2("session_checkpoint", fields)
        return CheckpointInfo.from_wire(expect_kind(resp, "checkpoint", "session_checkpoint")).id

    def restore(self, checkpoint: str) -> SessionInfo:
        """Puts this session back in the state of ``checkpoint`` (same session
        id): its interpreter and scratch become the checkpoint's; processes
        started since (commands, subprocesses) are killed. The checkpoint
        stays, to be restored again. Raises CheckpointNotFound for an unknown
        or lost checkpoint."""
        check_str("checkpoint", checkpoint)
        return self._info("session_restore", {"session": self.id, "checkpoint": checkpoint})

    def checkpoints(self) -> List[CheckpointInfo]:
        """This session's checkpoints, oldest first."""
        resp = self._client._v2("session_checkpoints", self._ref())
        items = expect_kind(resp, "checkpoints", "session_checkpoints").get("checkpoints") or []
        return [CheckpointInfo.from_wire(c) for c in items]

    def delete_checkpoint(self, checkpoint: str) -> None:
        """Drops ``checkpoint``; its memory and scratch copy are freed."""
        check_str("checkpoint", checkpoint)
        self._client._v2("session_checkpoint_delete", {"session": self.id, "checkpoint": checkpoint})

    def kill(self) -> SessionInfo:
        """Kills the session (its processes and files are gone); returns its
        final state. Raises SessionEnded if it had already ended."""
        return self._info("session_kill")


class Files:
    """File operations inside a :class:`Session`'s sandbox. Relative paths
    are below the session's working directory (``/tmp``); the calls see and
    may write exactly what the sandbox's own code may."""

    def __init__(self, session: Session) -> None:
        self._s = session

    def _call(self, op: str, path: Any) -> Dict[str, Any]:
        return self._s._client._v2(op, {"session": self._s.id, "path": _path(path)})

    def write(self, path: str, data: Union[bytes, bytearray, memoryview, str], mode: Optional[int] = None) -> None:
        """Writes ``data`` (bytes, or text as UTF-8) to ``path``, creating or
        truncating it, in chunks of 8 MiB. The parent directory must exist
        (see :meth:`make_dir`). ``mode``: permission bits of a new file."""
        p = _path(path)
        view = as_bytes("data", data)
        m = check_mode(mode)
        for fields in iter_write_chunks(self._s.id, p, view, m):
            self._s._client._v2("file_write", fields)

    def read(self, path: str, format: str = "bytes") -> Union[bytes, str]:
        """The contents of ``path``: bytes, or text (UTF-8) with
        ``format="text"``. Raises FileNotFound, FileError."""
        text = _read_format(format)
        out = self._s._client._read_file({"session": self._s.id, "path": _path(path)})
        return out.decode("utf-8", errors="replace") if text else out

    def list(self, path: str = ".") -> List[FileEntry]:
        """The entries of directory ``path``, sorted by name (``.name``,
        ``.type``, ``.size``, ``.path``)."""
        resp = expect_kind(self._call("file_list", path), "files", "file_list")
        return [FileEntry.from_wire(e) for e in resp.get("entries") or []]

    def remove(self, path: str) -> None:
        """Removes a file, or a directory with everything in it."""
        self._call("file_remove", path)

    def make_dir(self, path: str) -> None:
        """Creates directory ``path`` and its missing parents (no error if it exists)."""
        self._call("file_make_dir", path)

    def stat(self, path: str) -> FileEntry:
        """The :class:`~forkd.FileEntry` of ``path``; FileNotFound if absent."""
        resp = expect_kind(self._call("file_stat", path), "file_stat", "file_stat")
        return FileEntry.from_wire(resp)

    def exists(self, path: str) -> bool:
        """True when ``path`` exists in the sandbox."""
        from .errors import FileNotFound

        try:
            self.stat(path)
            return True
        except FileNotFound:
            return False


class Commands:
    """Shell commands (``/bin/sh -c``) inside a :class:`Session`'s sandbox,
    sharing its scratch with the interpreter."""

    def __init__(self, session: Session) -> None:
        self._s = session

    def run(
        self,
        cmd: str,
        cwd: Optional[str] = None,
        envs: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        background: bool = False,
        stdin: bool = False,
    ) -> Union[CommandResult, "CommandHandle"]:
        """Runs ``cmd`` and returns its :class:`~forkd.CommandResult`
        (``.exit_code``, ``.stdout``, ``.stderr``; a non-zero exit is not
        an exception). With ``background=True`` returns a
        :class:`CommandHandle` (``.pid``, ``.wait()``, ``.kill()``) as soon
        as the command started.

        Args:
            cmd: shell command line.
            cwd: working directory (default: the session's, ``/tmp``).
            envs: variables laid over the session's environment.
            timeout: seconds; the command's process group is killed then.
            on_stdout, on_stderr: called with text chunks as they come.
            stdin: give the command a stdin pipe, fed by :meth:`send_stdin`
                and closed by :meth:`close_stdin` (default: ``/dev/null``);
                meant with ``background=True``.
        """
        fields = command_fields(self._s.id, cmd, cwd, envs, timeout, stdin)
        if not isinstance(background, bool):
            raise InvalidArgument("background", f"must be a bool, got {type(background).__name__}")
        col = StreamCollector(check_callback("on_stdout", on_stdout), check_callback("on_stderr", on_stderr))
        if background:
            return CommandHandle(self._s, fields, col)

        def on_event(ev: Dict[str, Any]) -> None:
            for fn, arg in col.feed(ev):
                fn(arg)

        final = self._s._client._v2("command", fields, on_event)
        result, calls = col.finish_command(final)
        for fn, arg in calls:
            fn(arg)
        return result

    def kill(self, pid: int) -> None:
        """SIGKILL to the process group of the command with ``pid``."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidArgument("pid", f"must be a positive integer, got {pid!r}")
        self._s._client._v2("command_kill", {"session": self._s.id, "pid": pid})

    def send_stdin(self, pid: int, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Sends ``data`` (bytes, or text as UTF-8) to the stdin of the
        command with ``pid``, started with ``stdin=True``. Returns once the
        sandbox holds the bytes (the command may read them later).
        Raises :class:`~forkd.FileNotFound` (code ``not_found``) for an
        ended or unknown pid, :class:`~forkd.InvalidRequest` for a command
        without stdin or whose stdin is closed."""
        view = as_bytes("data", data)
        for fields in iter_input_chunks(self._s.id, pid, view, False):
            self._s._client._v2("command_input", fields)

    def close_stdin(self, pid: int) -> None:
        """Closes the stdin of the command with ``pid`` (it reads EOF)."""
        for fields in iter_input_chunks(self._s.id, pid, memoryview(b""), True):
            self._s._client._v2("command_input", fields)


class CommandHandle:
    """A command running in the background (``commands.run(...,
    background=True)``). It streams over a connection of its own; closing
    the handle (or :meth:`wait` returning) closes it, and closing it while
    the command runs kills the command."""

    def __init__(self, session: Session, fields: Dict[str, Any], col: StreamCollector) -> None:
        from .client import _Conn

        self._s = session
        self._col = col
        client = session._client
        self._conn: Optional[Any] = _Conn(client.socket_path)
        self._request = v2_request(1, "command", fields)
        self._wait = P.reply_wait(self._request, client.timeout)
        self._deadline = time.monotonic() + self._wait
        self._result: Optional[CommandResult] = None
        try:
            self._conn.send(self._request, self._deadline)
            while col.pid is None:
                ev = self._next()
                if ev["kind"] not in NON_FINAL_KINDS:
                    self._finish(ev)
                    raise ProtocolError("the command ended before it reported its pid")
                self._feed(ev)
        except BaseException:
            self.close()
            raise
        self.pid: int = col.pid
        """The command's pid inside the sandbox."""

    def _next(self) -> Dict[str, Any]:
        assert self._conn is not None
        try:
            return self._conn.next_for(self._request, self._deadline)
        except _socket.timeout:
            raise Timeout(f"no reply from forkd within {self._wait:g} s") from None
        except OSError as e:
            raise ConnectionLost(f"connection to forkd failed: {e}") from None

    def _feed(self, ev: Dict[str, Any]) -> None:
        for fn, arg in self._col.feed(ev):
            fn(arg)

    def _finish(self, final: Dict[str, Any]) -> CommandResult:
        if final.get("kind") == "error":
            raise P.error_of(final)
        result, calls = self._col.finish_command(final)
        for fn, arg in calls:
            fn(arg)
        self._result = result
        return result

    def wait(self) -> CommandResult:
        """Waits for the command to end; its :class:`~forkd.CommandResult`."""
        if self._result is not None:
            return self._result
        if self._conn is None:
            raise ConnectionLost("the handle was closed before the command ended")
        try:
            while True:
                ev = self._next()
                if ev["kind"] in NON_FINAL_KINDS:
                    self._feed(ev)
                    continue
                return self._finish(ev)
        finally:
            self.close()

    def kill(self) -> None:
        """SIGKILL to the command's process group (:meth:`wait` then
        returns its result, with ``signal`` 9)."""
        if self._result is None:
            self._s.commands.kill(self.pid)

    def send_stdin(self, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Sends ``data`` to the command's stdin (``stdin=True``)."""
        self._s.commands.send_stdin(self.pid, data)

    def close_stdin(self) -> None:
        """Closes the command's stdin: it reads EOF."""
        self._s.commands.close_stdin(self.pid)

    def close(self) -> None:
        """Closes the handle's connection (killing the command if it runs)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "CommandHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# -- asyncio --------------------------------------------------------------------


async def _invoke(calls: Calls) -> None:
    for fn, arg in calls:
        r = fn(arg)
        if inspect.isawaitable(r):
            await r


class AsyncSession:
    """A live session of an :class:`~forkd.AsyncForkd` client (see
    :meth:`AsyncForkd.session <forkd.AsyncForkd.session>`): the surface of
    :class:`Session` as coroutines, over the client's one connection.
    Cancelling a task that awaits :meth:`run_code` or a command cancels that
    request in the daemon (the cell is interrupted, the command killed)
    and touches no other request on the connection. Callbacks may be plain
    functions or coroutine functions."""

    def __init__(self, client: "AsyncForkd", session_id: str) -> None:
        self._client = client
        self.id: str = session_id
        """The session id."""
        self.files = AsyncFiles(self)
        """File operations inside the sandbox (:class:`AsyncFiles`)."""
        self.commands = AsyncCommands(self)
        """Shell commands inside the sandbox (:class:`AsyncCommands`)."""

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.kill()
        except (SessionNotFound, SessionEnded):
            pass

    async def _info(self, op: str, fields: Optional[Mapping[str, Any]] = None) -> SessionInfo:
        resp = await self._client._v2(op, fields if fields is not None else {"session": self.id})
        return SessionInfo.from_wire(expect_kind(resp, "session", op))

    async def run_code(
        self,
        code: str,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        on_result: Optional[Callable[[Any], Any]] = None,
        timeout: Optional[float] = None,
    ) -> CellResult:
        """Runs one cell; as :meth:`Session.run_code`. Cancelling the
        awaiting task sends ``cancel`` for this cell only."""
        fields = run_code_fields(self.id, code, timeout)
        col = StreamCollector(
            check_callback("on_stdout", on_stdout),
            check_callback("on_stderr", on_stderr),
            check_callback("on_result", on_result),
        )

        async def on_event(ev: Dict[str, Any]) -> None:
            await _invoke(col.feed(ev))

        final = await self._client._v2("run_code", fields, on_event)
        result, calls = col.finish_cell(final)
        await _invoke(calls)
        return result

    async def interrupt(self) -> None:
        """Interrupts the running cell; the session survives."""
        await self._client._v2("interrupt", {"session": self.id})

    async def pause(self) -> SessionInfo:
        """Freezes the session; see :meth:`Session.pause`."""
        return await self._info("session_pause")

    async def resume(self) -> SessionInfo:
        """Thaws a paused session."""
        return await self._info("session_resume")

    async def set_ttl(self, seconds: float) -> SessionInfo:
        """Sets the remaining lifetime to ``seconds`` from now."""
        ms = seconds_ms("seconds", seconds)
        return await self._info("session_set_ttl", {"session": self.id, "ttl_ms": ms})

    async def workspace_delta(self) -> bytes:
        """The overlay workspace's changes so far; as :meth:`Session.workspace_delta`."""
        resp = await self._client._v2("session_workspace_delta", {"session": self.id})
        expect_kind(resp, "file_data", "session_workspace_delta")
        return _unb64(resp.get("data", ""), "data")

    async def set_network(self, allow_net: Sequence[str]) -> SessionInfo:
        """Replaces the network allowlist; as :meth:`Session.set_network`."""
        return await self._info("session_set_network", set_network_fields(self.id, allow_net))

    async def info(self) -> SessionInfo:
        """The session's state, usage, limits and remaining TTL."""
        return await self._info("session_info")

    async def branch(
        self,
        k: int = 1,
        same_seed: bool = False,
        force: bool = False,
        labels: Optional[Mapping[str, str]] = None,
    ) -> List["AsyncSession"]:
        """``k`` copies of this live session; as :meth:`Session.branch`."""
        resp = await self._client._v2("session_branch", branch_fields(self.id, k, same_seed, force, labels))
        sessions = expect_kind(resp, "sessions", "session_branch").get("sessions") or []
        return [AsyncSession(self._client, SessionInfo.from_wire(s).id) for s in sessions]

    async def checkpoint(self, force: bool = False, keep: bool = False) -> str:
        """Keeps a frozen copy of this session; as :meth:`Session.checkpoint`."""
        fields = {"session": self.id, "force": bool(force)}
        if keep:
            fields["keep"] = True
        resp = await self._client._v2("session_checkpoint", fields)
        return CheckpointInfo.from_wire(expect_kind(resp, "checkpoint", "session_checkpoint")).id

    async def restore(self, checkpoint: str) -> SessionInfo:
        """Puts this session back in a checkpoint's state; as :meth:`Session.restore`."""
        check_str("checkpoint", checkpoint)
        return await self._info("session_restore", {"session": self.id, "checkpoint": checkpoint})

    async def checkpoints(self) -> List[CheckpointInfo]:
        """This session's checkpoints, oldest first."""
        resp = await self._client._v2("session_checkpoints", {"session": self.id})
        items = expect_kind(resp, "checkpoints", "session_checkpoints").get("checkpoints") or []
        return [CheckpointInfo.from_wire(c) for c in items]

    async def delete_checkpoint(self, checkpoint: str) -> None:
        """Drops ``checkpoint``; as :meth:`Session.delete_checkpoint`."""
        check_str("checkpoint", checkpoint)
        await self._client._v2("session_checkpoint_delete", {"session": self.id, "checkpoint": checkpoint})

    async def kill(self) -> SessionInfo:
        """Kills the session; returns its final state."""
        return await self._info("session_kill")


class AsyncFiles:
    """File operations inside an :class:`AsyncSession`; as :class:`Files`."""

    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def _call(self, op: str, path: Any) -> Dict[str, Any]:
        return await self._s._client._v2(op, {"session": self._s.id, "path": _path(path)})

    async def write(self, path: str, data: Union[bytes, bytearray, memoryview, str], mode: Optional[int] = None) -> None:
        """Writes ``data`` to ``path`` in 8 MiB chunks; as :meth:`Files.write`."""
        p = _path(path)
        view = as_bytes("data", data)
        m = check_mode(mode)
        for fields in iter_write_chunks(self._s.id, p, view, m):
            await self._s._client._v2("file_write", fields)

    async def read(self, path: str, format: str = "bytes") -> Union[bytes, str]:
        """The contents of ``path``; as :meth:`Files.read` (two chunk
        requests in flight at once)."""
        text = _read_format(format)
        base = {"session": self._s.id, "path": _path(path)}
        client = self._s._client

        async def one(offset: int) -> Dict[str, Any]:
            return await client._v2("file_read", dict(base, offset=offset, length=MAX_FILE_CHUNK))

        chunks: List[bytes] = []
        end = 0
        inflight: "collections.deque[Tuple[int, asyncio.Future[Dict[str, Any]]]]" = collections.deque()
        pipelined = True
        try:
            resp = await one(0)
            while True:
                expect_kind(resp, "file_data", "file_read")
                if resp.get("offset") == end:
                    data, eof = _file_data(resp)
                    chunks.append(data)
                    end += len(data)
                    if len(data) < MAX_FILE_CHUNK and not eof:
                        pipelined = False  # the file changed: one at a time
                    if eof or not data:
                        break
                size = resp.get("size")
                size = size if isinstance(size, int) else 0
                planned = inflight[-1][0] + MAX_FILE_CHUNK if inflight else end
                while pipelined and len(inflight) < _READ_DEPTH and planned < size:
                    inflight.append((planned, asyncio.ensure_future(one(planned))))
                    planned += MAX_FILE_CHUNK
                resp = await inflight.popleft()[1] if inflight else await one(end)
        finally:
            for _, task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*(t for _, t in inflight), return_exceptions=True)
        out = b"".join(chunks)
        return out.decode("utf-8", errors="replace") if text else out

    async def list(self, path: str = ".") -> List[FileEntry]:
        """The entries of directory ``path``, sorted by name."""
        resp = expect_kind(await self._call("file_list", path), "files", "file_list")
        return [FileEntry.from_wire(e) for e in resp.get("entries") or []]

    async def remove(self, path: str) -> None:
        """Removes a file, or a directory with everything in it."""
        await self._call("file_remove", path)

    async def make_dir(self, path: str) -> None:
        """Creates directory ``path`` and its missing parents."""
        await self._call("file_make_dir", path)

    async def stat(self, path: str) -> FileEntry:
        """The :class:`~forkd.FileEntry` of ``path``."""
        return FileEntry.from_wire(expect_kind(await self._call("file_stat", path), "file_stat", "file_stat"))

    async def exists(self, path: str) -> bool:
        """True when ``path`` exists in the sandbox."""
        from .errors import FileNotFound

        try:
            await self.stat(path)
            return True
        except FileNotFound:
            return False


class AsyncCommands:
    """Shell commands inside an :class:`AsyncSession`; as :class:`Commands`."""

    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def run(
        self,
        cmd: str,
        cwd: Optional[str] = None,
        envs: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
        background: bool = False,
        stdin: bool = False,
    ) -> Union[CommandResult, "AsyncCommandHandle"]:
        """Runs ``cmd``; as :meth:`Commands.run`. With ``background=True``
        returns an :class:`AsyncCommandHandle` once the command started."""
        fields = command_fields(self._s.id, cmd, cwd, envs, timeout, stdin)
        if not isinstance(background, bool):
            raise InvalidArgument("background", f"must be a bool, got {type(background).__name__}")
        col = StreamCollector(check_callback("on_stdout", on_stdout), check_callback("on_stderr", on_stderr))
        loop = asyncio.get_running_loop()
        started: "asyncio.Future[int]" = loop.create_future()

        async def on_event(ev: Dict[str, Any]) -> None:
            calls = col.feed(ev)
            if col.pid is not None and not started.done():
                started.set_result(col.pid)
            await _invoke(calls)

        async def whole() -> CommandResult:
            final = await self._s._client._v2("command", fields, on_event)
            result, calls = col.finish_command(final)
            await _invoke(calls)
            return result

        if not background:
            return await whole()
        task = asyncio.ensure_future(whole())
        # A handle nobody waits on must not log "exception never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not started.done():
            exc = task.exception()
            if exc is not None:
                raise exc
            raise ProtocolError("the command ended before it reported its pid")
        return AsyncCommandHandle(self._s, started.result(), task)

    async def kill(self, pid: int) -> None:
        """SIGKILL to the process group of the command with ``pid``."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidArgument("pid", f"must be a positive integer, got {pid!r}")
        await self._s._client._v2("command_kill", {"session": self._s.id, "pid": pid})

    async def send_stdin(self, pid: int, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Sends ``data`` to the stdin of command ``pid``; as :meth:`Commands.send_stdin`."""
        view = as_bytes("data", data)
        for fields in iter_input_chunks(self._s.id, pid, view, False):
            await self._s._client._v2("command_input", fields)

    async def close_stdin(self, pid: int) -> None:
        """Closes the stdin of command ``pid`` (it reads EOF)."""
        for fields in iter_input_chunks(self._s.id, pid, memoryview(b""), True):
            await self._s._client._v2("command_input", fields)


class AsyncCommandHandle:
    """A command running in the background on the client's connection."""

    def __init__(self, session: AsyncSession, pid: int, task: "asyncio.Future[CommandResult]") -> None:
        self._s = session
        self.pid: int = pid
        """The command's pid inside the sandbox."""
        self._task = task

    async def wait(self) -> CommandResult:
        """Waits for the command to end; cancelling the waiting task kills it."""
        return await self._task

    async def kill(self) -> None:
        """SIGKILL to the command's process group."""
        if not self._task.done():
            await self._s.commands.kill(self.pid)

    async def send_stdin(self, data: Union[bytes, bytearray, memoryview, str]) -> None:
        """Sends ``data`` to the command's stdin (``stdin=True``)."""
        await self._s.commands.send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        """Closes the command's stdin: it reads EOF."""
        await self._s.commands.close_stdin(self.pid)

    def cancel(self) -> None:
        """Stops following the command and kills it (``cancel`` request)."""
        self._task.cancel()


class SessionCreation:
    """What :meth:`AsyncForkd.session <forkd.AsyncForkd.session>` returns:
    ``await`` it for an :class:`AsyncSession`, or use it in ``async with``
    (the session is killed when the block is left)."""

    def __init__(self, create: Callable[[], Any]) -> None:
        self._create = create
        self._session: Optional[AsyncSession] = None

    def __await__(self):  # type: ignore[no-untyped-def]
        return self._create().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._create()
        return self._session

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.__aexit__(*exc)

