"""Wire protocol version 2 (sessions, see ``ipc/PROTOCOL.md``): argument
validation, request fields and result types. No I/O happens here."""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ._protocol import SESSION_PROTOCOL_VERSION, B64Payload, Workspace, _unb64, format_bytes, parse_size
from .errors import InvalidArgument, ProtocolError

__all__ = [
    "MAX_FILE_CHUNK",
    "NON_FINAL_KINDS",
    "SessionInfo",
    "CheckpointInfo",
    "DisplayResult",
    "CellError",
    "CellResult",
    "CommandResult",
    "FileEntry",
]

MAX_FILE_CHUNK = 8 << 20
"""Largest data chunk of one ``file_write`` or ``file_read`` request (8 MiB)."""

NON_FINAL_KINDS = frozenset(("output", "display", "command_started"))
"""Response kinds streamed before a request's final response."""

Data = Union[bytes, bytearray, memoryview, str]
Callback = Optional[Callable[[Any], Any]]


def request(rid: int, op: str, fields: Mapping[str, Any]) -> Dict[str, Any]:
    """A version-2 request object."""
    req: Dict[str, Any] = {"v": SESSION_PROTOCOL_VERSION, "id": rid, "op": op}
    req.update(fields)
    return req


# -- argument validation --------------------------------------------------------


def check_str(param: str, value: Any, *, empty: bool = False) -> str:
    """``value`` if it is a string (non-empty unless ``empty``)."""
    if not isinstance(value, str):
        raise InvalidArgument(param, f"must be a string, got {type(value).__name__}")
    if not empty and not value:
        raise InvalidArgument(param, "must not be empty")
    if "\0" in value:
        raise InvalidArgument(param, "must not contain NUL characters")
    return value


def opt_str(param: str, value: Any) -> Optional[str]:
    return None if value is None else check_str(param, value)


def seconds_ms(param: str, value: Any) -> Optional[int]:
    """Milliseconds (at least 1) from a positive number of seconds, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(param, f"must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(param, f"must be a positive number of seconds, got {value!r}")
    return max(1, int(round(value * 1000)))


def str_map(param: str, value: Any) -> Dict[str, str]:
    """A ``{str: str}`` copy of a mapping (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(param, f"must be a mapping of strings to strings, got {type(value).__name__}")
    out: Dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(param, f"must map strings to strings; {k!r}: {v!r} is not")
        out[k] = v
    return out


def check_callback(param: str, value: Any) -> Callback:
    if value is not None and not callable(value):
        raise InvalidArgument(param, f"must be callable or None, got {type(value).__name__}")
    return value


def as_bytes(param: str, data: Any) -> memoryview:
    """A byte view of bytes-like ``data`` or of a string (UTF-8)."""
    if isinstance(data, str):
        return memoryview(data.encode("utf-8"))
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    raise InvalidArgument(param, f"must be bytes or str, got {type(data).__name__}")


_SIZE_LIMITS = {
    "memory": "memory_bytes",
    "output_limit": "output_bytes",
    "scratch": "scratch_bytes",
    "file_size": "file_size_bytes",
}
_INT_LIMITS = {"pids": "pids", "open_files": "open_files"}


def limits_wire(value: Any) -> Dict[str, Any]:
    """Wire ``limits`` from a mapping of ``memory``, ``cpus``, ``pids``,
    ``output_limit``, ``scratch``, ``open_files``, ``file_size`` (sizes in
    bytes or strings like ``"512M"``; the wire names such as
    ``memory_bytes`` are accepted too)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument("limits", f"must be a mapping, got {type(value).__name__}")
    wire_sizes = set(_SIZE_LIMITS.values())
    out: Dict[str, Any] = {}
    for k, v in value.items():
        name = f"limits[{k!r}]"
        if k in _SIZE_LIMITS or k in wire_sizes:
            try:
                out[_SIZE_LIMITS.get(k, k)] = parse_size(v)
            except ValueError as e:
                raise InvalidArgument(name, str(e)) from None
        elif k in _INT_LIMITS:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgument(name, f"must be a positive integer, got {v!r}")
            out[_INT_LIMITS[k]] = v
        elif k == "cpus":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or not math.isfinite(v):
                raise InvalidArgument(name, f"must be a positive number of cores, got {v!r}")
            out["cpus"] = float(v)
        else:
            known = sorted(list(_SIZE_LIMITS) + list(_INT_LIMITS) + ["cpus"])
            raise InvalidArgument(name, f"is not a limit; use one of {', '.join(known)}")
    return out


def create_fields(
    zygote: Any = None,
    env: Any = None,
    limits: Any = None,
    ttl: Any = None,
    idle_timeout: Any = None,
    labels: Any = None,
    policy: Any = None,
    workspace: Any = None,
    allow_net: Any = None,
) -> Dict[str, Any]:
    """Validated ``session_create`` fields."""
    f: Dict[str, Any] = {}
    if zygote is not None:
        f["zygote"] = check_str("zygote", zygote)
    e = str_map("env", env)
    if e:
        f["env"] = e
    f["limits"] = limits_wire(limits)
    if policy is not None:
        f["policy"] = check_str("policy", policy)
    t = seconds_ms("ttl", ttl)
    if t is not None:
        f["ttl_ms"] = t
    i = seconds_ms("idle_timeout", idle_timeout)
    if i is not None:
        f["idle_timeout_ms"] = i
    lb = str_map("labels", labels)
    if lb:
        f["labels"] = lb
    if workspace is not None:
        if not isinstance(workspace, Workspace):
            raise InvalidArgument("workspace", f"must be a forkd.Workspace, got {type(workspace).__name__}")
        if workspace.export_delta:
            raise InvalidArgument(
                "workspace", "export_delta is for run(); a session exports its overlay's changes with Session.workspace_delta()"
            )
        try:
            f["workspace"] = workspace.to_wire()
        except (TypeError, ValueError) as e:
            raise InvalidArgument("workspace", str(e)) from None
    if allow_net is not None:
        if isinstance(allow_net, str) or not all(isinstance(a, str) for a in allow_net):
            raise InvalidArgument("allow_net", "must be a sequence of strings like 'host:443'")
        if allow_net:
            f["allow_net"] = list(allow_net)
    return f


def set_network_fields(session: str, allow_net: Any) -> Dict[str, Any]:
    """``session_set_network`` fields, checked."""
    if isinstance(allow_net, (str, bytes)) or not all(isinstance(a, str) for a in allow_net):
        raise InvalidArgument("allow_net", "must be a sequence of strings like 'host:443' (empty: no network)")
    return {"session": session, "allow_net": list(allow_net)}


def branch_fields(session: str, count: Any, same_seed: Any, force: Any, labels: Any) -> Dict[str, Any]:
    """``session_branch`` fields, checked."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgument("count", "must be a positive integer")
    f: Dict[str, Any] = {"session": session, "count": count, "same_seed": bool(same_seed), "force": bool(force)}
    if labels is not None:
        f["labels"] = str_map("labels", labels)
    return f


def iter_write_chunks(session: str, path: str, data: memoryview, mode: Optional[int]):
    """``file_write`` fields for each chunk: the first creates or truncates,
    the rest append (an empty file is one empty chunk)."""
    n = len(data)
    off = 0
    while True:
        chunk = data[off : off + MAX_FILE_CHUNK]
        f: Dict[str, Any] = {"session": session, "path": path, "data": B64Payload(chunk)}
        if off:
            f["append"] = True
        if mode is not None and not off:
            f["mode"] = mode
        yield f
        off += len(chunk)
        if off >= n:
            return


def iter_input_chunks(session: str, pid: Any, data: memoryview, eof: bool):
    """``command_input`` fields for ``data`` in chunks of at most 8 MiB,
    ``eof`` on the last (no data: one request)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise InvalidArgument("pid", f"must be a positive integer, got {pid!r}")
    n = len(data)
    off = 0
    while True:
        chunk = data[off : off + MAX_FILE_CHUNK]
        off += len(chunk)
        f: Dict[str, Any] = {"session": session, "pid": pid}
        if len(chunk):
            f["data"] = B64Payload(chunk)
        if eof and off >= n:
            f["eof"] = True
        yield f
        if off >= n:
            return


def check_mode(mode: Any) -> Optional[int]:
    if mode is None:
        return None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidArgument("mode", f"must be permission bits (0 to 0o7777), got {mode!r}")
    return mode


# -- results --------------------------------------------------------------------


def expect_kind(resp: Mapping[str, Any], kind: str, op: str) -> Mapping[str, Any]:
    if resp.get("kind") != kind:
        raise ProtocolError(f"daemon answered a {op} with a reply of kind {resp.get('kind')!r}")
    return resp


def _u(obj: Mapping[str, Any], key: str) -> int:
    v = obj.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _opt_u(obj: Mapping[str, Any], key: str) -> Optional[int]:
    v = obj.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None



@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a session (``Session.checkpoints()``)."""

    id: str
    """Its id (``checkpoint`` on the wire): pass it to ``Session.restore``."""
    session: str
    age_ms: int = 0
    scratch_bytes: int = 0
    """Bytes of the scratch copy it keeps (``/tmp``, ``/dev/shm``)."""
    restores: int = 0
    """Times it was restored."""
    kept: bool = False
    """Taken with ``keep=True``: it outlives the session's end."""

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "CheckpointInfo":
        cid = obj.get("checkpoint")
        if not isinstance(cid, str):
            raise ProtocolError("checkpoint reply without a string `checkpoint` id")
        return cls(
            id=cid,
            session=str(obj.get("session", "")),
            age_ms=_u(obj, "age_ms"),
            scratch_bytes=_u(obj, "scratch_bytes"),
            restores=_u(obj, "restores"),
            kept=bool(obj.get("kept", False)),
        )


@dataclass(frozen=True)
class SessionInfo:
    """A session's state, as ``session_create``, ``session_info`` and the
    other session calls answer it."""

    id: str
    """The session id (``session`` on the wire)."""
    zygote: str
    state: str
    """``"running"``, ``"paused"``, ``"ended"``, or ``"ended_with_checkpoints"``
    (ended keeping checkpoints taken with ``keep=True``: ``restore`` runs it again)."""
    ended_by: Optional[str] = None
    """``"killed"``, ``"ttl"``, ``"idle"``, ``"died"``, ``"shutdown"`` once ended."""
    killed_by: Optional[str] = None
    """What the kernel ended it for, when known (e.g. ``"oom"``)."""
    labels: Dict[str, str] = field(default_factory=dict)
    age_ms: int = 0
    ttl_left_ms: int = 0
    idle_timeout_ms: Optional[int] = None
    cells: int = 0
    """Cells run so far."""
    usage: Dict[str, int] = field(default_factory=dict)
    """``memory_bytes``, ``peak_memory_bytes``, ``cpu_user_us``, ``cpu_system_us``, ``pids``."""
    limits: Dict[str, Any] = field(default_factory=dict)
    warm: bool = False
    allow_net: List[str] = field(default_factory=list)
    """The network allowlist in force (empty: no network)."""
    parent: Optional[str] = None
    """The session this one was branched from."""
    checkpoints: List["CheckpointInfo"] = field(default_factory=list)
    """Its checkpoints, oldest first."""
    spare_branches: int = 0
    """Branch shells made ready for its next ``branch()`` call."""
    parent_ended: bool = False
    """(A branch.) Its parent ended while it lives on (``parent`` still names it)."""

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "SessionInfo":
        """Parses a ``session`` response (or a ``session_list`` entry) (unknown fields ignored)."""
        sid = obj.get("session")
        if not isinstance(sid, str):
            raise ProtocolError("session reply without a string `session` id")
        idle = obj.get("idle_timeout_ms")
        return cls(
            id=sid,
            zygote=str(obj.get("zygote", "")),
            state=str(obj.get("state", "")),
            ended_by=obj.get("ended_by"),
            killed_by=obj.get("killed_by"),
            labels=dict(obj.get("labels") or {}),
            age_ms=_u(obj, "age_ms"),
            ttl_left_ms=_u(obj, "ttl_left_ms"),
            idle_timeout_ms=idle if isinstance(idle, int) else None,
            cells=_u(obj, "cells"),
            usage=dict(obj.get("usage") or {}),
            limits=dict(obj.get("limits") or {}),
            warm=bool(obj.get("warm", False)),
            allow_net=[str(a) for a in (obj.get("allow_net") or [])],
            parent=obj.get("parent") if isinstance(obj.get("parent"), str) else None,
            checkpoints=[CheckpointInfo.from_wire(c) for c in (obj.get("checkpoints") or [])],
            spare_branches=_u(obj, "spare_branches"),
            parent_ended=bool(obj.get("parent_ended", False)),
        )


class DisplayResult(Dict[str, str]):
    """One rich result: a dict MIME type -> data (text for text types,
    base64 for images such as ``image/png``), as Jupyter's display data.
    ``is_main_result`` is true for the value of the cell's trailing
    expression (false for ``display()`` calls and figures)."""

    is_main_result: bool

    def __init__(self, data: Mapping[str, str], is_main_result: bool = False) -> None:
        super().__init__(data)
        self.is_main_result = is_main_result

    @property
    def text(self) -> Optional[str]:
        """The ``text/plain`` representation, if any."""
        return self.get("text/plain")

    def __repr__(self) -> str:
        return f"DisplayResult({dict.__repr__(self)}, is_main_result={self.is_main_result})"

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "DisplayResult":
        """Parses a ``display`` event or a result entry (unknown fields ignored)."""
        data = obj.get("data")
        if not isinstance(data, dict):
            raise ProtocolError("display data without a `data` object")
        return cls({str(k): str(v) for k, v in data.items()}, bool(obj.get("main", False)))


@dataclass(frozen=True)
class CellError:
    """The exception that ended a cell."""

    name: str
    """Exception class name, e.g. ``"ZeroDivisionError"`` (``"KernelDied"``
    when the interpreter had to be replaced)."""
    value: str
    """``str()`` of the exception."""
    traceback: str
    """The formatted traceback (the user's frames only)."""


@dataclass(frozen=True)
class CellResult:
    """The outcome of one ``run_code`` cell (like E2B's ``Execution``).
    An exception in the cell is ``error``, not a raised exception."""

    execution_count: int
    text: Optional[str]
    """The trailing expression's ``text/plain`` (None when the cell did not
    end in an expression or it was None)."""
    results: List[DisplayResult]
    """Rich results in order: ``display()`` calls, figures, the main result."""
    stdout_bytes: bytes
    stderr_bytes: bytes
    error: Optional[CellError] = None
    timed_out: bool = False
    """The cell hit its timeout and was interrupted."""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_us: int = 0
    killed_by: Optional[str] = None
    """``"oom"`` when the out-of-memory killer killed the interpreter during
    the cell (``error`` is then ``KernelDied``)."""
    timeout_ms: Optional[int] = None
    """With ``timed_out``: the cell's timeout, milliseconds."""
    memory_limit_bytes: Optional[int] = None
    """With ``killed_by``: the session's memory limit, bytes."""
    peak_memory_bytes: Optional[int] = None
    """With ``killed_by``: the session's peak memory use, bytes, when known."""

    @property
    def kill_message(self) -> Optional[str]:
        """Why a limit stopped the cell, in ``Execution.kill_message``'s words:
        ``"killed: out of memory (limit 512 MiB, peak 511.8 MiB)"`` (the
        interpreter was replaced), ``"interrupted: timed out after 30 s (the
        timeout)"`` (``KeyboardInterrupt``; the session keeps its state) or
        ``"killed: timed out after ..."`` (it did not stop within the
        interrupt grace: the interpreter was replaced); ``None`` when no limit
        stopped it. ipc/src/explain.rs has the same words."""
        if self.killed_by == "oom":
            msg = f"killed: out of memory (limit {format_bytes(self.memory_limit_bytes or 0)}"
            if self.peak_memory_bytes:
                msg += f", peak {format_bytes(self.peak_memory_bytes)}"
            return msg + ")"
        if self.timed_out:
            secs = (self.timeout_ms or 0) / 1000
            # As Rust prints an f64: 30, 1.5.
            shown = str(int(secs)) if secs.is_integer() else repr(secs)
            how = "killed" if self.error is not None and self.error.name == "KernelDied" else "interrupted"
            return f"{how}: timed out after {shown} s (the timeout)"
        return None

    @property
    def stdout(self) -> str:
        """Everything the cell printed to stdout (UTF-8, invalid bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        """Everything the cell wrote to stderr (UTF-8, invalid bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def main_result(self) -> Optional[DisplayResult]:
        """The trailing expression's rich result, if any."""
        for r in self.results:
            if r.is_main_result:
                return r
        return None

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "CellResult":
        """Parses a ``cell`` response (unknown fields ignored)."""
        err = obj.get("error")
        text = obj.get("text")
        return cls(
            execution_count=_u(obj, "execution_count"),
            text=text if isinstance(text, str) else None,
            results=[DisplayResult.from_wire(d) for d in obj.get("results") or []],
            stdout_bytes=_unb64(obj.get("stdout", ""), "stdout"),
            stderr_bytes=_unb64(obj.get("stderr", ""), "stderr"),
            error=(
                CellError(str(err.get("name", "")), str(err.get("value", "")), str(err.get("traceback", "")))
                if isinstance(err, dict)
                else None
            ),
            timed_out=bool(obj.get("timed_out", False)),
            stdout_truncated=bool(obj.get("stdout_truncated", False)),
            stderr_truncated=bool(obj.get("stderr_truncated", False)),
            duration_us=_u(obj, "duration_us"),
            killed_by=obj["killed_by"] if isinstance(obj.get("killed_by"), str) else None,
            timeout_ms=_opt_u(obj, "timeout_ms"),
            memory_limit_bytes=_opt_u(obj, "memory_limit_bytes"),
            peak_memory_bytes=_opt_u(obj, "peak_memory_bytes"),
        )


@dataclass(frozen=True)
class CommandResult:
    """The outcome of a shell command in a session. A non-zero exit is
    ``exit_code``, not an exception."""

    exit_code: Optional[int]
    """Exit code, when the shell exited (None when a signal ended it)."""
    signal: Optional[int]
    stdout_bytes: bytes
    stderr_bytes: bytes
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timeout_ms: Optional[int] = None
    """With ``timed_out``: the command's timeout, milliseconds."""
    output_limit_bytes: Optional[int] = None
    """With a ``*_truncated`` flag: the session's output budget (stdout and
    stderr together), bytes."""

    @property
    def kill_message(self) -> Optional[str]:
        """Why a limit stopped the command, in ``Execution.kill_message``'s
        words: ``"killed: timed out after 30 s (the timeout)"`` or ``"killed:
        output over the limit (1 MiB of stdout+stderr)"``; ``"output cut at
        the limit (...)"`` when the output was cut but the command exited
        before the kill reached it (``exit_code`` is its own); ``None`` when
        no limit touched it (``exit_code`` or ``signal`` says how it ended).
        ipc/src/explain.rs has the same words."""
        if self.timed_out:
            secs = (self.timeout_ms or 0) / 1000
            # As Rust prints an f64: 30, 1.5.
            shown = str(int(secs)) if secs.is_integer() else repr(secs)
            return f"killed: timed out after {shown} s (the timeout)"
        if self.stdout_truncated or self.stderr_truncated:
            what = "killed: output over the limit" if self.exit_code is None else "output cut at the limit"
            if self.output_limit_bytes is None:
                return what
            return f"{what} ({format_bytes(self.output_limit_bytes)} of stdout+stderr)"
        return None

    @property
    def stdout(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        """stderr decoded as UTF-8 (invalid bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        """Exited with 0 in time."""
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "CommandResult":
        """Parses a ``command`` response (unknown fields ignored)."""
        ec, sig = obj.get("exit_code"), obj.get("signal")
        return cls(
            exit_code=ec if isinstance(ec, int) else None,
            signal=sig if isinstance(sig, int) else None,
            stdout_bytes=_unb64(obj.get("stdout", ""), "stdout"),
            stderr_bytes=_unb64(obj.get("stderr", ""), "stderr"),
            timed_out=bool(obj.get("timed_out", False)),
            stdout_truncated=bool(obj.get("stdout_truncated", False)),
            stderr_truncated=bool(obj.get("stderr_truncated", False)),
            timeout_ms=_opt_u(obj, "timeout_ms"),
            output_limit_bytes=_opt_u(obj, "output_limit_bytes"),
        )


@dataclass(frozen=True)
class FileEntry:
    """A directory entry or a ``stat`` answer."""

    name: str
    path: str
    """Full path inside the sandbox."""
    type: str
    """``"file"``, ``"dir"``, ``"symlink"`` or ``"other"``."""
    size: int
    mode: int = 0
    modified_ms: int = 0

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> "FileEntry":
        """Parses a ``file_stat`` response or a ``files`` entry (unknown fields ignored)."""
        return cls(
            name=str(obj.get("name", "")),
            path=str(obj.get("path", "")),
            type=str(obj.get("type", "")),
            size=_u(obj, "size"),
            mode=_u(obj, "mode"),
            modified_ms=_u(obj, "modified_ms"),
        )


class StreamCollector:
    """Turns a streaming request's events into user callbacks: text chunks
    decoded incrementally (a UTF-8 character split across chunks is kept
    whole), display values as :class:`DisplayResult`."""

    def __init__(self, on_stdout: Callback, on_stderr: Callback, on_result: Callback = None) -> None:
        self.on = {"stdout": on_stdout, "stderr": on_stderr}
        self.dec = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self.on_result = on_result
        self.displayed = 0
        self.pid: Optional[int] = None
        self.out: Dict[str, List[bytes]] = {"stdout": [], "stderr": []}

    def feed(self, ev: Mapping[str, Any]) -> List[Tuple[Callable[[Any], Any], Any]]:
        """The calls an event asks for, in order."""
        kind = ev.get("kind")
        if kind == "output":
            stream = ev.get("stream")
            if stream not in self.on:
                raise ProtocolError(f"output event of unknown stream {stream!r}")
            data = _unb64(ev.get("data", ""), "data")
            self.out[stream].append(data)
            fn = self.on[stream]
            if fn is not None:
                text = self.dec[stream].decode(data)
                if text:
                    return [(fn, text)]
        elif kind == "display":
            self.displayed += 1
            if self.on_result is not None:
                return [(self.on_result, DisplayResult.from_wire(ev))]
        elif kind == "command_started":
            pid = ev.get("pid")
            if not isinstance(pid, int):
                raise ProtocolError("command_started without an integer pid")
            self.pid = pid
        return []

    def finish_cell(self, final: Mapping[str, Any]) -> Tuple[CellResult, List[Tuple[Callable[[Any], Any], Any]]]:
        """The cell's result and the calls still due: the rest of any split
        character, and ``on_result`` for results that were not streamed (the
        main result)."""
        r = CellResult.from_wire(expect_kind(final, "cell", "run_code"))
        calls = self._flush()
        if self.on_result is not None:
            calls += [(self.on_result, d) for d in r.results[self.displayed :]]
        return r, calls

    def finish_command(self, final: Mapping[str, Any]) -> Tuple[CommandResult, List[Tuple[Callable[[Any], Any], Any]]]:
        return CommandResult.from_wire(expect_kind(final, "command", "command")), self._flush()

    def _flush(self) -> List[Tuple[Callable[[Any], Any], Any]]:
        calls = []
        for stream in ("stdout", "stderr"):
            fn = self.on[stream]
            rest = self.dec[stream].decode(b"", final=True)
            if fn is not None and rest:
                calls.append((fn, rest))
        return calls


def run_code_fields(session: str, code: Any, timeout: Any) -> Dict[str, Any]:
    f: Dict[str, Any] = {"session": session, "code": check_str("code", code, empty=True)}
    t = seconds_ms("timeout", timeout)
    if t is not None:
        f["timeout_ms"] = t
    return f


def command_fields(session: str, cmd: Any, cwd: Any, envs: Any, timeout: Any, stdin: Any = False) -> Dict[str, Any]:
    f: Dict[str, Any] = {"session": session, "cmd": check_str("cmd", cmd)}
    if not isinstance(stdin, bool):
        raise InvalidArgument("stdin", f"must be a bool, got {type(stdin).__name__}")
    if stdin:
        f["stdin"] = True
    if cwd is not None:
        f["cwd"] = check_str("cwd", cwd)
    e = str_map("envs", envs)
    if e:
        f["env"] = e
    t = seconds_ms("timeout", timeout)
    if t is not None:
        f["timeout_ms"] = t
    return f
