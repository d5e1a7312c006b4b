"""Blocking client: :class:`Forkd`, one request at a time per connection."""

from __future__ import annotations

import collections
import errno
import os
import socket as _socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

from . import _protocol as P
from ._protocol import Execution, FilesArg
from ._session_wire import MAX_FILE_CHUNK, NON_FINAL_KINDS, SessionInfo, check_str, create_fields, expect_kind, str_map
from ._session_wire import request as v2_request
from .errors import (
    ConnectionLost,
    DaemonNotRunning,
    ForkdError,
    PermissionDenied,
    ProtocolError,
    RequestRefused,
    SessionEnded,
    Timeout,
)

__all__ = ["Forkd", "connect_unix"]

CONNECT_TIMEOUT = 10.0
"""Seconds allowed for ``connect(2)`` itself."""


def connect_unix(path: str, timeout: float = CONNECT_TIMEOUT) -> _socket.socket:
    """A connected blocking Unix stream socket, or :class:`DaemonNotRunning`
    / :class:`PermissionDenied` with a message saying what to do."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except PermissionError as e:
        sock.close()
        raise PermissionDenied(
            "permission_denied",
            f"permission denied connecting to {path}: your uid is not allowed by the "
            f"daemon's socket permissions; ask the operator to add you to the socket's "
            f"group or to the daemon's allow-list ({e.strerror})",
        ) from None
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
        sock.close()
        raise DaemonNotRunning(path, e.strerror or str(e)) from None
    except _socket.timeout:
        sock.close()
        raise DaemonNotRunning(path, "connect timed out") from None
    except OSError as e:
        sock.close()
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied("permission_denied", f"permission denied connecting to {path}") from None
        raise DaemonNotRunning(path, e.strerror or str(e)) from None
    return sock


class _Conn:
    """One blocking connection; reads and writes bounded by deadlines."""

    def __init__(self, path: str) -> None:
        self.sock = connect_unix(path)
        self.next_id = 1
        # Pipelined requests (file reads) whose final responses are due,
        # and those that arrived while another was awaited.
        self.awaiting: Set[int] = set()
        self.stash: Dict[int, Dict[str, Any]] = {}

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _set_deadline(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _socket.timeout()
        self.sock.settimeout(remaining)

    def _read_exact(self, n: int, deadline: float, *, at_boundary: bool) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._set_deadline(deadline)
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                where = "between frames" if at_boundary and not buf else "inside a frame"
                raise ConnectionLost(f"the forkd daemon closed the connection ({where})")
            buf += chunk
        return bytes(buf)

    def read_response(self, deadline: float, expect: Optional[int] = P.PROTOCOL_VERSION) -> Dict[str, Any]:
        header = self._read_exact(P.HEADER_BYTES, deadline, at_boundary=True)
        n = P.frame_length(header)
        return P.decode_body(self._read_exact(n, deadline, at_boundary=False), expect)

    def send(self, request: Dict[str, Any], deadline: float) -> None:
        frame = P.encode_frame(request)
        self._set_deadline(deadline)
        self.sock.sendall(frame)

    def next_for(self, request: Dict[str, Any], deadline: float) -> Dict[str, Any]:
        """The next response (event or final) to ``request``. Final
        responses to the ids in ``awaiting`` (pipelined requests) that come
        first are kept for their own ``next_for``."""
        rid = request["id"]
        resp = self.stash.pop(rid, None)
        while resp is None:
            got = self.read_response(deadline, None)
            if got["id"] == rid:
                resp = got
            elif got["id"] == 0 and got.get("kind") == "error":
                # Unmatchable error (malformed frame, permission denied):
                # it is about us, and the stream may be unusable.
                raise P.error_of(got)
            elif got["id"] in self.awaiting:
                self.stash[got["id"]] = got
            # else: a reply to some other id (a cancelled request's late
            # answer) is ignored, as the protocol allows.
        P.check_version(resp, request["v"])
        return resp

    def call(
        self,
        request: Dict[str, Any],
        wait: float,
        on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> Dict[str, Any]:
        """Sends ``request`` and returns its final response; streamed events
        before it go to ``on_event``."""
        deadline = time.monotonic() + wait
        self.send(request, deadline)
        while True:
            resp = self.next_for(request, deadline)
            if resp["kind"] in NON_FINAL_KINDS:
                if on_event is not None:
                    on_event(resp)
                continue
            return resp


class Forkd:
    """Blocking client of a forkd daemon.

    Args:
        socket: daemon socket path; default ``$FORKD_SOCKET``, else
            ``/run/forkd/forkd.sock`` for root, else
            ``$XDG_RUNTIME_DIR/forkd/forkd.sock``, else
            ``/tmp/forkd-<uid>/forkd.sock``.
        timeout: seconds to wait for any reply, replacing the default (the
            spawn's timeout + 30 s, 630 s without one; 30 s for a ping).

    The connection is opened at construction (raising
    :class:`~forkd.errors.DaemonNotRunning` when no daemon listens) and reused.
    Calls are serialized by a lock; use :meth:`map` or one client per thread
    for parallelism. After a timeout or I/O error the connection is dropped
    and the next call opens a new one.

    Example::

        with Forkd() as fk:
            r = fk.run("import numpy; print(numpy.zeros(3))", timeout=5)
            print(r.exit_code, r.text)
    """

    def __init__(self, socket: Optional[str] = None, timeout: Optional[float] = None) -> None:
        self.socket_path: str = socket if socket else P.default_socket_path()
        self.timeout: Optional[float] = timeout
        self._lock = threading.Lock()
        self._conn: Optional[_Conn] = _Conn(self.socket_path)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Closes the connection (spawns still running on it are cancelled)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Forkd":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Forkd(socket={self.socket_path!r}, timeout={self.timeout!r})"

    # -- requests ------------------------------------------------------------

    def _call(
        self,
        build: Callable[[int], Dict[str, Any]],
        on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
        side: bool = False,
    ) -> Dict[str, Any]:
        """Sends ``build(id)`` and returns its final response. With ``side``,
        a call made while another thread holds the connection (a cell
        running) goes over a connection of its own instead of waiting."""

        def exchange(conn: _Conn) -> Dict[str, Any]:
            request = build(conn.next_id)
            conn.next_id += 1
            wait = P.reply_wait(request, self.timeout)
            try:
                return conn.call(request, wait, on_event)
            except _socket.timeout:
                raise Timeout(f"no reply from forkd on {self.socket_path} within {wait:g} s") from None

        return self._use(exchange, side)

    def _use(self, fn: Callable[[_Conn], Any], side: bool) -> Any:
        """``fn(connection)`` on the client's connection (or, with ``side``
        while it is busy, on a connection of its own)."""
        if side and not self._lock.acquire(blocking=False):
            conn = _Conn(self.socket_path)
            try:
                return self._guard(conn, fn, shared=False)
            finally:
                conn.close()
        if not side:
            self._lock.acquire()
        try:
            if self._conn is None:
                self._conn = _Conn(self.socket_path)
            return self._guard(self._conn, fn, shared=True)
        finally:
            self._lock.release()

    def _guard(self, conn: _Conn, fn: Callable[[_Conn], Any], shared: bool) -> Any:
        # Anything but a complete exchange (a timeout, a broken stream, a
        # callback that raised, Ctrl-C) leaves unread frames behind: the
        # connection is dropped, which also makes the daemon cancel a
        # streaming request still running on it.
        usable = False
        try:
            result = fn(conn)
            usable = True
            return result
        except _socket.timeout:
            raise Timeout(f"no reply from forkd on {self.socket_path} in time") from None
        except (ProtocolError, ConnectionLost, Timeout):
            raise
        except OSError as e:
            raise ConnectionLost(f"connection to forkd on {self.socket_path} failed: {e}") from None
        except RequestRefused as e:
            usable = e.code not in ("frame_too_large", "permission_denied", "malformed_frame")
            raise
        finally:
            if not usable and shared:
                self._drop()

    def _read_file(self, fields: Mapping[str, Any], depth: int = 2) -> bytes:
        """A whole file through ``file_read`` requests of ``MAX_FILE_CHUNK``
        bytes, ``depth`` of them in flight at once (the daemon reads the
        next chunk while this thread decodes one). A chunk shorter than
        asked (the file changed) ends the pipelining; the rest is read one
        request at a time."""

        def go(conn: _Conn) -> bytes:
            def send(offset: int) -> Dict[str, Any]:
                r = v2_request(conn.next_id, "file_read", dict(fields, offset=offset, length=MAX_FILE_CHUNK))
                conn.next_id += 1
                conn.awaiting.add(r["id"])
                conn.send(r, time.monotonic() + P.reply_wait(r, self.timeout))
                return r

            def receive(r: Dict[str, Any]) -> Dict[str, Any]:
                try:
                    return conn.next_for(r, time.monotonic() + P.reply_wait(r, self.timeout))
                finally:
                    conn.awaiting.discard(r["id"])

            chunks: List[bytes] = []
            end = 0  # contiguous bytes so far
            resp = receive(send(0))
            inflight: Deque[Dict[str, Any]] = collections.deque()
            pipelined = True
            while True:
                if resp.get("kind") == "error":
                    for r in inflight:  # leave the connection clean
                        receive(r)
                    raise P.error_of(resp)
                expect_kind(resp, "file_data", "file_read")
                if resp.get("offset") == end:
                    data = P._unb64(resp.get("data", ""), "data")
                    chunks.append(data)
                    end += len(data)
                    if len(data) < MAX_FILE_CHUNK and not resp.get("eof"):
                        pipelined = False
                    if resp.get("eof") or not data:
                        for r in inflight:
                            receive(r)
                        return b"".join(chunks)
                size = resp.get("size")
                size = size if isinstance(size, int) else 0
                planned = (inflight[-1]["offset"] + MAX_FILE_CHUNK) if inflight else end
                while pipelined and len(inflight) < depth and planned < size:
                    inflight.append(send(planned))
                    planned += MAX_FILE_CHUNK
                if inflight:
                    resp = receive(inflight.popleft())
                else:
                    resp = receive(send(end))

        return self._use(go, side=True)

    def _v2(
        self,
        op: str,
        fields: Mapping[str, Any],
        on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> Dict[str, Any]:
        """A version-2 request's final response; an error reply raises."""
        resp = self._call(lambda i: v2_request(i, op, fields), on_event, side=True)
        if resp.get("kind") == "error":
            raise P.error_of(resp)
        return resp

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ping(self) -> str:
        """Checks the daemon answers; returns its version string."""
        resp = self._call(P.build_ping)
        result = P.interpret("ping", resp)
        assert isinstance(result, str)
        return result

    def run(
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
        """Runs Python source ``code`` in a fresh sandbox and returns its
        :class:`~forkd.Execution`.

        Args:
            code: Python source, run as ``__main__``.
            argv: ``sys.argv[1:]``.
            stdin: bytes (or text, UTF-8 encoded) fed to stdin, then EOF.
            env: the program's whole environment (replaces the zygote's).
            files: written into the working directory first: a mapping
                ``{path: content}`` or ``(path, content[, mode])`` tuples.
            timeout: wall-clock limit, seconds.
            memory: memory limit, bytes or a size string like ``"256M"``.
            cpus: CPU bandwidth in cores.
            pids: processes plus threads limit.
            output_limit: stdout plus stderr limit, bytes or size string.
            zygote: zygote name (daemon's default if None).
            policy: isolation policy name (daemon's default if None).
            workspace: a :class:`~forkd.Workspace` to mount (see docs/workspaces.md).
            allow_net: destinations the sandbox may reach, e.g.
                ``["pypi.example:443", "198.18.0.0/15:8000-8010"]``
                (``HOST[:PORT]``, ``*.DOMAIN[:PORT]``, ``CIDR[:PORT]``);
                none: no network. The result's ``network`` has the counters.

        Raises:
            RequestRefused (and subclasses such as LimitExceedsPolicy) when
            the daemon refuses the request; Timeout; ConnectionLost;
            ProtocolError; DaemonNotRunning when reconnecting fails.
        """
        kwargs = dict(
            code=code, argv=argv, stdin=stdin, env=env, files=files, timeout=timeout,
            memory=memory, cpus=cpus, pids=pids, output_limit=output_limit,
            zygote=zygote, policy=policy, workspace=workspace, allow_net=allow_net,
        )
        # Validate before touching the connection.
        P.build_spawn(0, **kwargs)  # type: ignore[arg-type]
        resp = self._call(lambda i: P.build_spawn(i, **kwargs))  # type: ignore[arg-type]
        result = P.interpret("spawn", resp)
        assert isinstance(result, Execution)
        return result

    def run_script(self, path: Union[str, "os.PathLike[str]"], *args: str, **kwargs: Any) -> Execution:
        """Sends the local file ``path`` into the sandbox's working directory
        (under its file name) and runs it as ``python NAME args...`` would
        (``__file__``, ``sys.argv[0]``, coding cookies); other keyword
        arguments are :meth:`run`'s."""
        name, files = P.script_files(path, kwargs.pop("files", None))
        return self._spawn(script=name, files=files, argv=tuple(args) + tuple(kwargs.pop("argv", ())), **kwargs)

    def _spawn(self, **kwargs: Any) -> Execution:
        P.build_spawn(0, **kwargs)  # validate before touching the connection
        resp = self._call(lambda i: P.build_spawn(i, **kwargs))
        result = P.interpret("spawn", resp)
        assert isinstance(result, Execution)
        return result

    def run_module(self, module: str, *args: str, **kwargs: Any) -> Execution:
        """Runs ``module`` as ``python -m module args...`` would (importable in
        the sandbox: the zygote's packages, or files sent with ``files``, as
        the working directory is ``sys.path[0]``); other keyword arguments
        are :meth:`run`'s."""
        return self._spawn(module=module, argv=tuple(args) + tuple(kwargs.pop("argv", ())), **kwargs)

    def map(
        self,
        codes: Iterable[str],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> List[Any]:
        """Runs every snippet of ``codes`` (with the same :meth:`run` keyword
        arguments) on up to ``concurrency`` threads, each with its own
        connection. Returns the executions in input order. The first failure
        is raised unless ``return_exceptions`` is true, in which case the
        exception takes the failed snippet's place in the list."""
        items = list(codes)
        if not items:
            return []
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        local = threading.local()
        clients: List[Forkd] = []
        clients_lock = threading.Lock()

        def one(code: str) -> Any:
            fk = getattr(local, "client", None)
            if fk is None:
                fk = Forkd(self.socket_path, self.timeout)
                local.client = fk
                with clients_lock:
                    clients.append(fk)
            try:
                return fk.run(code, **kwargs)
            except ForkdError as e:
                if return_exceptions:
                    return e
                raise

        try:
            with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
                return list(pool.map(one, items))
        finally:
            for fk in clients:
                fk.close()

    # -- sessions (protocol version 2) -------------------------------------

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
    ) -> "Session":
        """Starts a session: a sandbox that keeps its Python interpreter,
        files and processes between calls. Use it as a context manager
        (leaving the ``with`` block kills it) or call :meth:`Session.kill`.

        Args:
            zygote: zygote name (daemon's default if None).
            env: variables laid over the base environment.
            limits: the session's resource limits: ``memory``, ``cpus``,
                ``pids``, ``output_limit`` (per cell or command),
                ``scratch``, ``open_files``, ``file_size`` (sizes in bytes
                or strings like ``"512M"``).
            ttl: lifetime in seconds (daemon default 300 s); it is killed then.
            idle_timeout: killed after this many seconds without a request.
            labels: free-form ``{str: str}``, for :meth:`sessions` filters.
            policy: isolation policy name.
            workspace: a :class:`~forkd.Workspace` mounted for the session's
                life (an overlay's changes: :meth:`Session.workspace_delta`).
            allow_net: destinations the session may reach, as for :meth:`run`.

        Raises:
            InvalidArgument before sending; RequestRefused subclasses
            (LimitExceedsPolicy, UnknownZygote, SpawnFailed...) from the daemon.

        Example::

            with Forkd() as fk, fk.session(ttl=600) as s:
                s.run_code("x = 41")
                print(s.run_code("x + 1").text)   # 42
        """
        fields = create_fields(zygote, env, limits, ttl, idle_timeout, labels, policy, workspace, allow_net)
        info = SessionInfo.from_wire(expect_kind(self._v2("session_create", fields), "session", "session_create"))
        return Session(self, info.id)

    def sessions(self, labels: Optional[Mapping[str, str]] = None) -> List[SessionInfo]:
        """The caller's live sessions (root: everyone's), oldest first;
        with ``labels``, only those carrying all of them."""
        lb = str_map("labels", labels)
        resp = expect_kind(self._v2("session_list", {"labels": lb} if lb else {}), "sessions", "session_list")
        return [SessionInfo.from_wire(s) for s in resp.get("sessions") or []]

    def attach(self, session_id: str) -> "Session":
        """A :class:`Session` for an existing session id (e.g. created by
        another process of the same uid). Raises SessionNotFound or
        SessionEnded when it cannot be used."""
        s = Session(self, check_str("session_id", session_id))
        info = s.info()
        if info.state == "ended":
            raise SessionEnded("session_ended", f"session {info.id} has ended ({info.ended_by})")
        return s


from .session import Session  # noqa: E402  (session.py uses this module's _Conn)
