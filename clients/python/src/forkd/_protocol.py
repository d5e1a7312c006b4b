"""Wire protocol version 1 (see ``ipc/PROTOCOL.md``): framing, request
building and response parsing. No I/O happens here."""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import LimitsNotEnforced, ProtocolError, RequestRefused, error_from_reply

__all__ = [
    "PROTOCOL_VERSION",
    "SESSION_PROTOCOL_VERSION",
    "MAX_FRAME_BYTES",
    "REPLY_GRACE",
    "DEFAULT_SPAWN_WAIT",
    "PING_WAIT",
    "Timings",
    "Usage",
    "Execution",
    "format_bytes",
    "default_socket_path",
    "parse_size",
    "encode_frame",
    "frame_length",
    "decode_body",
    "build_spawn",
    "build_ping",
    "reply_wait",
    "interpret",
]

PROTOCOL_VERSION = 1
"""Protocol version of one-shot requests (``spawn``, ``ping``)."""

SESSION_PROTOCOL_VERSION = 2
"""Protocol version of session requests (``session_create``, ``run_code``, ...)."""

SPOKEN_VERSIONS = (PROTOCOL_VERSION, SESSION_PROTOCOL_VERSION)

MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Largest frame body either side may send (16 MiB)."""

REPLY_GRACE = 30.0
"""Seconds waited beyond a spawn's own timeout (queueing, fork, teardown)."""

DEFAULT_SPAWN_WAIT = 600.0
"""Seconds assumed for a spawn without a timeout (before the grace)."""

PING_WAIT = REPLY_GRACE
"""Seconds a ping waits for its pong."""

_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True)
class Timings:
    """Microseconds measured by the daemon."""

    total_us: int = 0
    """Request decoded -> result encoded."""
    fork_us: int = 0
    """Request decoded -> child forked (0 for a warm child)."""
    isolated_us: int = 0
    """Request decoded -> program starts."""
    run_us: int = 0
    """Program start -> its init process exited."""


@dataclass(frozen=True)
class Usage:
    """Resources consumed, from the sandbox's cgroup (meaningless when
    ``limits["cgroup_enforced"]`` is false)."""

    cpu_user_us: int = 0
    cpu_system_us: int = 0
    peak_memory_bytes: int = 0


_WORKSPACE_MODES = ("none", "view", "read", "write")


@dataclass(frozen=True)
class Workspace:
    """A host directory mounted into the sandbox with per-path modes.

    Give ``path`` (an absolute host directory beneath the daemon's
    ``workspace_roots``) or ``name`` (a workspace the daemon's operator
    configured). ``rules`` are ordered ``"GLOB=MODE"`` strings (modes
    ``none``, ``view``, ``read``, ``write``; most specific match wins, ties go
    to the later rule); ``default`` is the mode of unmatched paths.
    ``overlay=True`` keeps the host directory unchanged (copy-on-write);
    with ``export_delta=True`` the changes come back as a tar in
    :attr:`Execution.workspace_delta`.

    >>> Workspace(path="/srv/repo", rules=["secrets/**=none", "out/**=write"])  # doctest: +SKIP
    """

    path: Optional[str] = None
    name: Optional[str] = None
    rules: Sequence[str] = ()
    default: Optional[str] = None
    overlay: bool = False
    mount_point: Optional[str] = None
    export_delta: bool = False

    def to_wire(self) -> Dict[str, Any]:
        if (self.path is None) == (self.name is None):
            raise ValueError("Workspace needs exactly one of path and name")
        if isinstance(self.rules, str):
            raise TypeError("rules must be a sequence of 'GLOB=MODE' strings, not a string")
        for r in self.rules:
            glob, sep, mode = str(r).rpartition("=")
            if not sep or not glob or mode not in _WORKSPACE_MODES:
                raise ValueError(f"rule {r!r} is not GLOB=MODE with MODE one of {', '.join(_WORKSPACE_MODES)}")
        if self.default is not None and self.default not in _WORKSPACE_MODES:
            raise ValueError(f"default {self.default!r} is not one of {', '.join(_WORKSPACE_MODES)}")
        if self.export_delta and not self.overlay:
            raise ValueError("export_delta needs overlay=True (a direct workspace writes into the host)")
        w: Dict[str, Any] = {"mode": "overlay" if self.overlay else "direct"}
        if self.path is not None:
            w["path"] = os.fspath(self.path)
        if self.name is not None:
            w["name"] = self.name
        if self.rules:
            w["rules"] = [str(r) for r in self.rules]
        if self.default is not None:
            w["default_mode"] = self.default
        if self.mount_point is not None:
            w["mount_point"] = self.mount_point
        if self.export_delta:
            w["export_delta"] = True
        return w


@dataclass(frozen=True)
class Execution:
    """Outcome of one sandbox run (a ``result`` reply).

    A crash, timeout or OOM kill is an ``Execution`` with ``killed_by`` set
    (``"timeout"``, ``"oom"``, ``"pids"``, ``"output_limit"``, ``"signal"``,
    ``"shutdown"``), not an exception.
    """

    exit_code: Optional[int]
    signal: Optional[int]
    killed_by: Optional[str]
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timings: Timings = field(default_factory=Timings)
    usage: Usage = field(default_factory=Usage)
    limits: Dict[str, Any] = field(default_factory=dict)
    warm: bool = False
    landlock: Optional[str] = None
    """``"fully_enforced"``, ``"partially_enforced"``, ``"not_enforced"``; ``None`` if not reported."""
    sandbox: int = 0
    zygote: str = ""
    #: The overlay workspace's changes as a tar (``export_delta=True``).
    workspace_delta: Optional[bytes] = None
    #: Why the delta could not be exported, if it could not.
    workspace_error: Optional[str] = None
    #: Egress counters and connection log (``bytes_out``, ``bytes_in``,
    #: ``connections_allowed``, ``log``...) when the request had ``allow_net``.
    network: Optional[Dict[str, Any]] = None

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8, invalid bytes replaced by U+FFFD."""
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded as UTF-8, invalid bytes replaced by U+FFFD."""
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        """True when the program exited with 0 and no limit was involved."""
        return self.exit_code == 0 and self.killed_by is None

    @property
    def limits_enforced(self) -> bool:
        """False when the daemon could not enforce the memory, cpu and pids
        limits (no usable cgroup, e.g. rootless without a delegated subtree)."""
        return bool(self.limits.get("cgroup_enforced", True))

    @property
    def kill_message(self) -> Optional[str]:
        """Why the sandbox was killed, as forkd-run prints it, e.g.
        ``"killed: out of memory (limit 512 MiB, peak 511.8 MiB)"``; ``None``
        when the program ended on its own (stderr may be empty after a kill)."""
        k, lim = self.killed_by, self.limits
        if k is None:
            return None
        if k == "oom":
            msg = f"killed: out of memory (limit {format_bytes(int(lim.get('memory_bytes', 0)))}"
            if self.usage.peak_memory_bytes:
                msg += f", peak {format_bytes(self.usage.peak_memory_bytes)}"
            return msg + ")"
        if k == "timeout":
            secs = int(lim.get("timeout_ms", 0)) / 1000
            # As Rust prints an f64: 30, 1.5.
            shown = str(int(secs)) if secs.is_integer() else repr(secs)
            return f"killed: timed out after {shown} s (the timeout)"
        if k == "pids":
            return (
                f"killed: process/thread limit reached (pids {lim.get('pids')}); "
                "a fork or thread start failed"
            )
        if k == "output_limit":
            return (
                f"killed: output over the limit "
                f"({format_bytes(int(lim.get('output_bytes', 0)))} of stdout+stderr)"
            )
        if k == "signal":
            return f"killed by signal {self.signal}" if self.signal is not None else "killed by a signal"
        if k == "shutdown":
            return "killed: the daemon shut down while it ran"
        return f"killed: {k}"

    @property
    def shell_status(self) -> int:
        """Exit status as a shell reports it: exit code, else 128 + signal,
        else 255."""
        if self.exit_code is not None:
            return self.exit_code
        if self.signal is not None:
            return 128 + self.signal
        return 255


def format_bytes(n: int) -> str:
    """A byte count as people read it: ``512 MiB``, ``1 GiB``, ``498.3 MiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    unit = 0
    while unit + 1 < len(units) and n >= 1 << (10 * (unit + 1)):
        unit += 1
    scale = 1 << (10 * unit)
    if n % scale == 0:
        return f"{n // scale} {units[unit]}"
    return f"{n / scale:.1f} {units[unit]}"


_warned_unenforced = False


def _warn_unenforced_once(r: "Execution") -> None:
    """One warning per process when the daemon ran without limits."""
    global _warned_unenforced
    if r.limits_enforced or _warned_unenforced:
        return
    _warned_unenforced = True
    warnings.warn(
        "forkd: the daemon could not enforce memory/cpu/pids limits (no usable cgroup, "
        "e.g. rootless without a delegated subtree); sandboxes run without them. "
        "Run `forkd doctor` on the daemon's host to see why.",
        LimitsNotEnforced,
        stacklevel=4,
    )


def default_socket_path() -> str:
    """The daemon socket path: ``$FORKD_SOCKET`` if set and non-empty; else
    ``/run/forkd/forkd.sock`` for root; else
    ``$XDG_RUNTIME_DIR/forkd/forkd.sock``; else ``/tmp/forkd-<uid>/forkd.sock``."""
    env = os.environ.get("FORKD_SOCKET")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/forkd/forkd.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "forkd", "forkd.sock")
    return f"/tmp/forkd-{os.getuid()}/forkd.sock"


_SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Union[int, str]) -> int:
    """Bytes from an int or a string like ``"512M"``, ``"2G"``, ``"64k"``
    (binary multiples, as ``forkd-run`` reads them). Raises ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size {value} must be positive")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size like 512M or 2G")
    s = value.strip()
    mult = 1
    if s and s[-1].lower() in _SIZE_SUFFIX:
        mult = _SIZE_SUFFIX[s[-1].lower()]
        s = s[:-1]
    try:
        n = float(s)
    except ValueError:
        raise ValueError(f"{value!r} is not a size like 512M or 2G") from None
    if not (n > 0) or n == float("inf"):
        raise ValueError(f"size {value!r} must be positive")
    return int(n * mult)


class B64Payload:
    """Bytes to send as a request's top-level ``data`` field (base64):
    :func:`encode_frame` writes them straight into the frame instead of
    running a multi-megabyte string through ``json.dumps``."""

    __slots__ = ("view",)

    def __init__(self, view: Union[bytes, memoryview]) -> None:
        self.view = view


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """One frame: 4-byte big-endian length, then the compact JSON body.
    Raises ``ValueError`` when the body is over ``MAX_FRAME_BYTES`` (send
    less stdin or smaller files)."""
    payload = obj.get("data")
    if isinstance(payload, B64Payload):
        # Base64 needs no JSON escaping: splice it in after the other fields.
        head = json.dumps(
            {k: v for k, v in obj.items() if k != "data"}, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        b = binascii.b2a_base64(payload.view, newline=False)
        body = b"".join((head[:-1], b',"data":"' if len(head) > 2 else b'"data":"', b, b'"}'))
    else:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(
            f"request frame is {len(body)} bytes, above the protocol's limit of "
            f"{MAX_FRAME_BYTES}: send less stdin or smaller files"
        )
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length from a 4-byte header; ``ProtocolError`` if invalid."""
    (n,) = _HEADER.unpack(header)
    if n == 0 or n > MAX_FRAME_BYTES:
        raise ProtocolError(f"daemon sent a frame with invalid length {n}")
    return n


def decode_body(body: bytes, expect: Optional[int] = PROTOCOL_VERSION) -> Dict[str, Any]:
    """A response object from a frame body; checks it is a JSON object with
    an integer ``id`` and a string ``kind``, of protocol version ``expect``
    (errors may also be version 1: the daemon sends errors it cannot
    attribute to a request as version 1). ``expect=None`` accepts every
    version this client speaks (1 and 2); see :func:`check_version`."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"daemon sent a frame that is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("daemon sent a frame that is not a JSON object")
    if not isinstance(obj.get("id"), int) or not isinstance(obj.get("kind"), str):
        raise ProtocolError("daemon sent a response without an integer id and a kind")
    if expect is None:
        if obj.get("v") not in SPOKEN_VERSIONS:
            raise ProtocolError(
                f"daemon speaks protocol version {obj.get('v')!r}, this client speaks "
                f"{' and '.join(map(str, SPOKEN_VERSIONS))}: use a matching client"
            )
    else:
        check_version(obj, expect)
    return obj


def check_version(obj: Mapping[str, Any], expect: int) -> None:
    """``ProtocolError`` unless the response ``obj`` is of version ``expect``
    (or an error of version 1)."""
    v = obj.get("v")
    if v == expect or (v == PROTOCOL_VERSION and obj.get("kind") == "error"):
        return
    raise ProtocolError(
        f"daemon speaks protocol version {v!r}, this client speaks "
        f"{expect}: use a matching client"
    )


def _b64(data: Union[bytes, bytearray, memoryview, str]) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(s: Any, name: str) -> bytes:
    if not isinstance(s, str):
        raise ProtocolError(f"result field {name} is not a base64 string")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"result field {name} is not valid base64") from None


FilesArg = Union[
    Mapping[str, Union[bytes, str]],
    Iterable[Union[Tuple[str, Union[bytes, str]], Tuple[str, Union[bytes, str], int]]],
]


def _files(files: Optional[FilesArg]) -> list:
    if not files:
        return []
    items: Iterable[Any] = files.items() if isinstance(files, Mapping) else files
    out = []
    for item in items:
        if len(item) == 2:
            path, content = item
            mode = None
        elif len(item) == 3:
            path, content, mode = item
        else:
            raise ValueError("files entries are (path, content) or (path, content, mode)")
        entry: Dict[str, Any] = {"path": str(path), "content": _b64(content)}
        if mode is not None:
            entry["mode"] = int(mode)
        out.append(entry)
    return out


def script_files(path: Any, files: Optional[FilesArg]) -> Tuple[str, List[Any]]:
    """The local script ``path`` as a file of the sandbox's working directory
    (under its file name, sent as bytes so a coding cookie works) added to
    ``files``; returns the name to run and the files."""
    with open(path, "rb") as f:
        data = f.read()
    name = os.path.basename(os.fspath(path))
    items = list(files.items()) if isinstance(files, Mapping) else list(files or ())
    return name, items + [(name, data)]


def build_spawn(
    request_id: int,
    *,
    code: Optional[str] = None,
    script: Optional[str] = None,
    module: Optional[str] = None,
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
    workspace: Optional[Workspace] = None,
    allow_net: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """A ``spawn`` request object. ``timeout`` is seconds; ``memory`` and
    ``output_limit`` are bytes or size strings like ``"256M"``."""
    if sum(x is not None for x in (code, script, module)) != 1:
        raise ValueError("exactly one of code, script and module must be given")
    if isinstance(argv, str):
        raise TypeError("argv must be a sequence of strings, not a string")
    req: Dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "op": "spawn",
        "program": (
            {"code": code} if code is not None
            else {"script": script} if script is not None
            else {"module": module}
        ),
    }
    if zygote is not None:
        req["zygote"] = zygote
    if argv:
        req["argv"] = [str(a) for a in argv]
    if stdin:
        req["stdin"] = _b64(stdin)
    if env:
        req["env"] = {str(k): str(v) for k, v in env.items()}
    f = _files(files)
    if f:
        req["files"] = f
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        req["timeout_ms"] = max(1, int(round(timeout * 1000)))
    limits: Dict[str, Any] = {}
    if memory is not None:
        limits["memory_bytes"] = parse_size(memory)
    if cpus is not None:
        limits["cpus"] = float(cpus)
    if pids is not None:
        limits["pids"] = int(pids)
    if output_limit is not None:
        limits["output_bytes"] = parse_size(output_limit)
    req["limits"] = limits
    if policy is not None:
        req["policy"] = policy
    if workspace is not None:
        if not isinstance(workspace, Workspace):
            raise TypeError("workspace must be a forkd.Workspace")
        req["workspace"] = workspace.to_wire()
    if allow_net:
        if isinstance(allow_net, str):
            raise TypeError("allow_net must be a sequence of specs, not a string")
        req["allow_net"] = [str(s) for s in allow_net]
    return req


def build_ping(request_id: int) -> Dict[str, Any]:
    """A ``ping`` request object."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": "ping"}


def reply_wait(request: Mapping[str, Any], client_timeout: Optional[float]) -> float:
    """Seconds to wait for the reply to ``request``: the client-level timeout
    if set, else the spawn's timeout + 30 s (600 s + 30 s when unset), or
    30 s for a ping."""
    if client_timeout is not None:
        return client_timeout
    if request.get("op") == "ping":
        return PING_WAIT
    t = request.get("timeout_ms")
    return (t / 1000.0 if t is not None else DEFAULT_SPAWN_WAIT) + REPLY_GRACE


def _int(obj: Mapping[str, Any], key: str, default: int = 0) -> int:
    v = obj.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, int):
        return default
    return v


def _opt_int(obj: Mapping[str, Any], key: str) -> Optional[int]:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"result field {key} is not an integer or null")
    return v


def _opt_str(obj: Mapping[str, Any], key: str) -> Optional[str]:
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise ProtocolError(f"result field {key} is not a string or null")
    return v


def parse_result(obj: Mapping[str, Any]) -> Execution:
    """An :class:`Execution` from a ``result`` response (unknown fields ignored).
    Warns once per process (:class:`forkd.LimitsNotEnforced`) when the
    daemon reports that it could not enforce the limits."""
    r = _parse_result(obj)
    _warn_unenforced_once(r)
    return r


def _parse_result(obj: Mapping[str, Any]) -> Execution:
    t = obj.get("timings") or {}
    u = obj.get("usage") or {}
    killed = obj.get("killed_by")
    if killed is not None and not isinstance(killed, str):
        raise ProtocolError("result field killed_by is not a string or null")
    return Execution(
        exit_code=_opt_int(obj, "exit_code"),
        signal=_opt_int(obj, "signal"),
        killed_by=killed,
        stdout=_unb64(obj.get("stdout", ""), "stdout"),
        stderr=_unb64(obj.get("stderr", ""), "stderr"),
        stdout_truncated=bool(obj.get("stdout_truncated", False)),
        stderr_truncated=bool(obj.get("stderr_truncated", False)),
        timings=Timings(
            total_us=_int(t, "total_us"),
            fork_us=_int(t, "fork_us"),
            isolated_us=_int(t, "isolated_us"),
            run_us=_int(t, "run_us"),
        ),
        usage=Usage(
            cpu_user_us=_int(u, "cpu_user_us"),
            cpu_system_us=_int(u, "cpu_system_us"),
            peak_memory_bytes=_int(u, "peak_memory_bytes"),
        ),
        limits=dict(obj.get("limits") or {}),
        warm=bool(obj.get("warm", False)),
        landlock=_opt_str(obj, "landlock"),
        sandbox=_int(obj, "sandbox"),
        zygote=str(obj.get("zygote", "")),
        workspace_delta=(
            _unb64(obj["workspace_delta"], "workspace_delta")
            if obj.get("workspace_delta") is not None
            else None
        ),
        workspace_error=(
            str(obj["workspace_error"]) if obj.get("workspace_error") is not None else None
        ),
        network=dict(obj["network"]) if isinstance(obj.get("network"), dict) else None,
    )


def error_of(obj: Mapping[str, Any]) -> RequestRefused:
    """The exception for an ``error`` response."""
    return error_from_reply(str(obj.get("code", "unknown")), str(obj.get("message", "")))


def interpret(op: str, obj: Mapping[str, Any]) -> Union[Execution, str]:
    """The value of a response to a request of ``op``: an :class:`Execution`
    for a spawn, the daemon version for a ping. Raises the matching
    :class:`RequestRefused` for an error reply, ``ProtocolError`` for a reply
    of the wrong kind."""
    kind = obj.get("kind")
    if kind == "error":
        raise error_of(obj)
    if op == "spawn" and kind == "result":
        return parse_result(obj)
    if op == "ping" and kind == "pong":
        return str(obj.get("daemon_version", ""))
    raise ProtocolError(f"daemon answered a {op} with a reply of kind {kind!r}")
