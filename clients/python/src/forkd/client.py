"""Blocking client: :class:`Forkd`, one request at a time per connection."""

from __future__ import annotations

import errno
import os
import socket as _socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from . import _protocol as P
from ._protocol import Execution, FilesArg
from .errors import (
    ConnectionLost,
    DaemonNotRunning,
    ForkdError,
    PermissionDenied,
    ProtocolError,
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

    def read_response(self, deadline: float) -> Dict[str, Any]:
        header = self._read_exact(P.HEADER_BYTES, deadline, at_boundary=True)
        n = P.frame_length(header)
        return P.decode_body(self._read_exact(n, deadline, at_boundary=False))

    def call(self, request: Dict[str, Any], wait: float) -> Dict[str, Any]:
        """Sends ``request`` and returns its response object."""
        frame = P.encode_frame(request)
        deadline = time.monotonic() + wait
        self._set_deadline(deadline)
        self.sock.sendall(frame)
        while True:
            resp = self.read_response(deadline)
            if resp["id"] == request["id"]:
                return resp
            if resp["id"] == 0 and resp.get("kind") == "error":
                # Unmatchable error (malformed frame, permission denied):
                # it is about us, and the stream may be unusable.
                raise P.error_of(resp)
            # A reply to some other id cannot happen on a one-at-a-time
            # connection; ignore it as the protocol allows.


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

    def _call(self, build: Any) -> Dict[str, Any]:
        with self._lock:
            if self._conn is None:
                self._conn = _Conn(self.socket_path)
            conn = self._conn
            request = build(conn.next_id)
            conn.next_id += 1
            wait = P.reply_wait(request, self.timeout)
            try:
                return conn.call(request, wait)
            except _socket.timeout:
                self._drop()
                raise Timeout(
                    f"no reply from forkd on {self.socket_path} within {wait:g} s"
                ) from None
            except ProtocolError:
                self._drop()
                raise
            except ConnectionLost:
                self._drop()
                raise
            except OSError as e:
                self._drop()
                raise ConnectionLost(f"connection to forkd on {self.socket_path} failed: {e}") from None
            except ForkdError as e:
                if getattr(e, "code", None) in ("frame_too_large", "permission_denied", "malformed_frame"):
                    self._drop()
                raise

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
