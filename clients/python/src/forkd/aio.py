"""asyncio client: :class:`AsyncForkd`, many concurrent requests multiplexed
over one connection (pipelined with ids; responses routed by id, since the
daemon answers in completion order)."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from . import _protocol as P
from ._protocol import Execution, FilesArg
from ._session_wire import NON_FINAL_KINDS, SessionInfo, check_str, create_fields, expect_kind, str_map
from ._session_wire import request as v2_request
from .session import AsyncSession, SessionCreation
from .client import CONNECT_TIMEOUT
from .errors import (
    ConnectionLost,
    DaemonNotRunning,
    ForkdError,
    PermissionDenied,
    ProtocolError,
    SessionEnded,
    Timeout,
)

__all__ = ["AsyncForkd"]


class _AsyncConn:
    """One connection: a writer guarded by a lock and a reader task that
    resolves the future of each in-flight request by id."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self.reader = reader
        self.writer = writer
        self.next_id = 1
        # id -> (queue of responses and errors, protocol version of the request)
        self.pending: Dict[int, Tuple["asyncio.Queue[Any]", int]] = {}
        self.cancels: Set["asyncio.Future[None]"] = set()
        self.write_lock = asyncio.Lock()
        self.dead: Optional[ForkdError] = None
        self.task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def open(cls, path: str) -> "_AsyncConn":
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path), CONNECT_TIMEOUT
            )
        except PermissionError as e:
            raise PermissionDenied(
                "permission_denied",
                f"permission denied connecting to {path}: your uid is not allowed by the "
                f"daemon's socket permissions; ask the operator to add you to the socket's "
                f"group or to the daemon's allow-list ({e.strerror})",
            ) from None
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise DaemonNotRunning(path, e.strerror or str(e)) from None
        except asyncio.TimeoutError:
            raise DaemonNotRunning(path, "connect timed out") from None
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied("permission_denied", f"permission denied connecting to {path}") from None
            raise DaemonNotRunning(path, e.strerror or str(e)) from None
        return cls(path, reader, writer)

    def _fail_all(self, exc: ForkdError) -> None:
        if self.dead is None:
            self.dead = exc
        pending, self.pending = self.pending, {}
        for queue, _ in pending.values():
            queue.put_nowait(exc)

    async def _read_loop(self) -> None:
        # Reads between frames are unbounded in time (an idle connection is
        # fine); every request's own wait bounds how long its caller waits.
        try:
            while True:
                try:
                    header = await self.reader.readexactly(P.HEADER_BYTES)
                except asyncio.IncompleteReadError as e:
                    where = "between frames" if not e.partial else "inside a frame"
                    raise ConnectionLost(f"the forkd daemon closed the connection ({where})") from None
                n = P.frame_length(header)
                try:
                    body = await self.reader.readexactly(n)
                except asyncio.IncompleteReadError:
                    raise ConnectionLost("the forkd daemon closed the connection (inside a frame)") from None
                resp = P.decode_body(body, None)
                rid = resp["id"]
                if rid == 0:
                    # Cannot be matched: fail everything in flight with it.
                    if resp.get("kind") == "error":
                        self._fail_all(P.error_of(resp))
                        if resp.get("code") in ("frame_too_large", "permission_denied"):
                            raise ConnectionLost(
                                f"the forkd daemon closed the connection after {resp.get('code')}"
                            )
                        continue
                    raise ProtocolError("daemon sent a non-error response with id 0")
                entry = self.pending.get(rid)
                if entry is not None:
                    queue, v = entry
                    try:
                        P.check_version(resp, v)
                    except ProtocolError as e:
                        queue.put_nowait(e)
                        continue
                    queue.put_nowait(resp)
                # else: a late reply to a request that timed out or was
                # cancelled (or the `done` of a cancel): discarded.
        except ForkdError as e:
            self._fail_all(e)
        except (OSError, asyncio.CancelledError) as e:
            self._fail_all(ConnectionLost(f"connection to forkd on {self.path} failed: {e!r}"))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self.writer.close()

    async def call(
        self,
        build: Callable[[int], Dict[str, Any]],
        client_timeout: Optional[float],
        on_event: Optional[Callable[[Dict[str, Any]], Awaitable[None]]] = None,
    ) -> Dict[str, Any]:
        """Sends ``build(id)`` and returns its final response; streamed
        events before it are awaited through ``on_event``. When the caller
        is cancelled or times out before the final response, a version-2
        request is cancelled in the daemon (``cancel {target}``)."""
        if self.dead is not None:
            raise self.dead
        rid = self.next_id
        self.next_id += 1
        request = build(rid)
        frame = P.encode_frame(request)
        wait = P.reply_wait(request, client_timeout)
        queue: "asyncio.Queue[Any]" = asyncio.Queue()
        self.pending[rid] = (queue, request["v"])
        finished = False

        async def send_and_wait() -> Dict[str, Any]:
            nonlocal finished
            async with self.write_lock:
                if self.dead is not None:
                    raise self.dead
                self.writer.write(frame)
                try:
                    await self.writer.drain()
                except OSError as e:
                    err = ConnectionLost(f"connection to forkd on {self.path} failed: {e}")
                    self._fail_all(err)
                    raise err from None
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item["kind"] in NON_FINAL_KINDS:
                    if on_event is not None:
                        await on_event(item)
                    continue
                finished = True
                return item

        try:
            return await asyncio.wait_for(send_and_wait(), wait)
        except asyncio.TimeoutError:
            raise Timeout(f"no reply from forkd on {self.path} within {wait:g} s") from None
        finally:
            self.pending.pop(rid, None)
            if not finished and request["v"] >= P.SESSION_PROTOCOL_VERSION:
                self._cancel_soon(rid)

    def _cancel_soon(self, target: int) -> None:
        """Sends ``cancel {target}`` from a task of its own (the caller may
        be unwinding a cancellation); its ``done`` reply is discarded."""
        if self.dead is not None:
            return
        rid = self.next_id
        self.next_id += 1
        frame = P.encode_frame(v2_request(rid, "cancel", {"target": target}))

        async def send() -> None:
            async with self.write_lock:
                if self.dead is not None:
                    return
                self.writer.write(frame)
                try:
                    await self.writer.drain()
                except OSError as e:
                    self._fail_all(ConnectionLost(f"connection to forkd on {self.path} failed: {e}"))

        task = asyncio.ensure_future(send())
        self.cancels.add(task)
        task.add_done_callback(self.cancels.discard)

    async def close(self) -> None:
        self._fail_all(ConnectionLost("the client closed the connection"))
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass
        try:
            await self.writer.wait_closed()
        except Exception:
            pass


class AsyncForkd:
    """asyncio client of a forkd daemon: the surface of
    :class:`forkd.Forkd` as coroutines, over ONE connection that carries any
    number of concurrent requests.

    The connection is opened on first use (or by ``async with`` /
    :meth:`connect`). When it dies, every request in flight fails at once
    with :class:`~forkd.errors.ConnectionLost`; the next call opens a new
    one. A request that times out leaves the connection open; its late reply
    is discarded by id.

    Example::

        async with AsyncForkd() as fk:
            results = await fk.map([f"print({i})" for i in range(100)], timeout=5)
    """

    def __init__(self, socket: Optional[str] = None, timeout: Optional[float] = None) -> None:
        self.socket_path: str = socket if socket else P.default_socket_path()
        self.timeout: Optional[float] = timeout
        self._conn: Optional[_AsyncConn] = None
        self._connect_lock: Optional[asyncio.Lock] = None

    async def connect(self) -> "AsyncForkd":
        """Opens the connection now (raises DaemonNotRunning if nothing listens)."""
        await self._connection()
        return self

    async def _connection(self) -> _AsyncConn:
        conn = self._conn
        if conn is not None and conn.dead is None:
            return conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is None or self._conn.dead is not None:
                if self._conn is not None:
                    await self._conn.close()
                self._conn = await _AsyncConn.open(self.socket_path)
            return self._conn

    async def close(self) -> None:
        """Closes the connection; spawns still running on it are cancelled."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    async def __aenter__(self) -> "AsyncForkd":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncForkd(socket={self.socket_path!r}, timeout={self.timeout!r})"

    async def ping(self) -> str:
        """Checks the daemon answers; returns its version string."""
        conn = await self._connection()
        result = P.interpret("ping", await conn.call(P.build_ping, self.timeout))
        assert isinstance(result, str)
        return result

    async def run(
        self,
        code: str,
        *,
        argv: Sequence[str] = (),
        stdin: Union[bytes, str] = b"",
        env: Optional[Mapping[str, str]] = None,
        files: Optional[FilesArg] = None,
        timeout: Optional[float] = None,
        memory: Optional[Union[int, str]] = None,
        cpus: Optional[float] = None,
        pids: Optional[int] = None,
        output_limit: Optional[Union[int, str]] = None,
        zygote: Optional[str] = None,
        policy: Optional[str] = None,
        workspace: Optional[P.Workspace] = None,
        allow_net: Optional[Sequence[str]] = None,
    ) -> Execution:
        """Runs ``code`` in a fresh sandbox; arguments as :meth:`forkd.Forkd.run`."""
        kwargs = dict(
            code=code, argv=argv, stdin=stdin, env=env, files=files, timeout=timeout,
            memory=memory, cpus=cpus, pids=pids, output_limit=output_limit,
            zygote=zygote, policy=policy, workspace=workspace, allow_net=allow_net,
        )
        P.build_spawn(0, **kwargs)  # type: ignore[arg-type]  # validate first
        conn = await self._connection()
        resp = await conn.call(lambda i: P.build_spawn(i, **kwargs), self.timeout)  # type: ignore[arg-type]
        result = P.interpret("spawn", resp)
        assert isinstance(result, Execution)
        return result

    async def run_script(self, path: Union[str, "os.PathLike[str]"], *args: str, **kwargs: Any) -> Execution:
        """Runs the local file ``path`` as ``python NAME args...``; arguments
        as :meth:`forkd.Forkd.run_script`."""
        name, files = P.script_files(path, kwargs.pop("files", None))
        return await self._spawn(script=name, files=files, argv=tuple(args) + tuple(kwargs.pop("argv", ())), **kwargs)

    async def _spawn(self, **kwargs: Any) -> Execution:
        P.build_spawn(0, **kwargs)  # validate first
        conn = await self._connection()
        resp = await conn.call(lambda i: P.build_spawn(i, **kwargs), self.timeout)
        result = P.interpret("spawn", resp)
        assert isinstance(result, Execution)
        return result

    async def run_module(self, module: str, *args: str, **kwargs: Any) -> Execution:
        """Runs ``module`` as ``python -m module args...``; arguments as
        :meth:`forkd.Forkd.run_module`."""
        return await self._spawn(module=module, argv=tuple(args) + tuple(kwargs.pop("argv", ())), **kwargs)

    async def map(
        self,
        codes: Iterable[str],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> List[Any]:
        """Runs every snippet concurrently on this client's connection, at
        most ``concurrency`` at once; results in input order. The first
        failure is raised unless ``return_exceptions`` is true."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        sem = asyncio.Semaphore(concurrency)

        async def one(code: str) -> Execution:
            async with sem:
                return await self.run(code, **kwargs)

        return list(await asyncio.gather(*(one(c) for c in codes), return_exceptions=return_exceptions))

    # -- sessions (protocol version 2) -------------------------------------

    async def _v2(
        self,
        op: str,
        fields: Mapping[str, Any],
        on_event: Optional[Callable[[Dict[str, Any]], Awaitable[None]]] = None,
    ) -> Dict[str, Any]:
        """A version-2 request's final response; an error reply raises."""
        conn = await self._connection()
        resp = await conn.call(lambda i: v2_request(i, op, fields), self.timeout, on_event)
        if resp.get("kind") == "error":
            raise P.error_of(resp)
        return resp

    def session(
        self,
        *,
        zygote: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        limits: Optional[Mapping[str, Any]] = None,
        ttl: Optional[float] = None,
        idle_timeout: Optional[float] = None,
        labels: Optional[Mapping[str, str]] = None,
        policy: Optional[str] = None,
        workspace: Optional[P.Workspace] = None,
        allow_net: Optional[Sequence[str]] = None,
    ) -> SessionCreation:
        """Starts a session (arguments as :meth:`forkd.Forkd.session`).
        ``await`` the result for an :class:`~forkd.AsyncSession`, or use it
        in ``async with`` (the session is killed when the block is left)::

            async with AsyncForkd() as fk:
                async with fk.session(ttl=600) as s:
                    r = await s.run_code("1 + 1")
        """
        fields = create_fields(zygote, env, limits, ttl, idle_timeout, labels, policy, workspace, allow_net)

        async def create() -> AsyncSession:
            resp = await self._v2("session_create", fields)
            info = SessionInfo.from_wire(expect_kind(resp, "session", "session_create"))
            return AsyncSession(self, info.id)

        return SessionCreation(create)

    async def sessions(self, labels: Optional[Mapping[str, str]] = None) -> List[SessionInfo]:
        """The caller's live sessions, oldest first (filtered by ``labels``)."""
        lb = str_map("labels", labels)
        resp = expect_kind(await self._v2("session_list", {"labels": lb} if lb else {}), "sessions", "session_list")
        return [SessionInfo.from_wire(s) for s in resp.get("sessions") or []]

    async def attach(self, session_id: str) -> AsyncSession:
        """An :class:`~forkd.AsyncSession` for an existing session id.
        Raises SessionNotFound or SessionEnded when it cannot be used."""
        s = AsyncSession(self, check_str("session_id", session_id))
        info = await s.info()
        if info.state == "ended":
            raise SessionEnded("session_ended", f"session {info.id} has ended ({info.ended_by})")
        return s
