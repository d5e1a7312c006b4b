"""Exceptions raised by the forkd client.

Every failure of a client call is a :class:`ForkdError`. Error replies from
the daemon are :class:`RequestRefused` (or one of its subclasses, chosen by
the reply's ``code``); ``.code`` is the protocol's error code string, e.g.
``"limit_exceeds_policy"``. A crash, timeout or OOM kill of the *sandbox* is
not an exception: it is an :class:`forkd.Execution` with ``killed_by`` set.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Type

__all__ = [
    "ForkdError",
    "DaemonNotRunning",
    "PermissionDenied",
    "RequestRefused",
    "MalformedFrame",
    "FrameTooLarge",
    "UnsupportedVersion",
    "InvalidRequest",
    "LimitExceedsPolicy",
    "UnknownZygote",
    "UnknownPolicy",
    "ZygoteUnavailable",
    "SpawnFailed",
    "ShuttingDown",
    "InternalError",
    "ProtocolError",
    "Timeout",
    "ConnectionLost",
    "InvalidArgument",
    "SessionNotFound",
    "SessionEnded",
    "SessionPaused",
    "FileNotFound",
    "FileError",
    "Cancelled",
    "Busy",
    "CheckpointNotFound",
    "error_from_reply",
    "LimitsNotEnforced",
]


class LimitsNotEnforced(UserWarning):
    """Warned once per process: the daemon ran a sandbox without memory, cpu
    and pids limits because it has no usable cgroup (rootless without a
    delegated subtree, or ``cgroup.mode = "disabled"``)."""


class ForkdError(Exception):
    """Base class of every error raised by the forkd client."""


class DaemonNotRunning(ForkdError):
    """Nothing accepts connections at the socket path."""

    def __init__(self, socket_path: str, reason: str = "") -> None:
        self.socket_path = socket_path
        directory = os.path.dirname(os.fspath(socket_path))
        if reason and directory and not os.path.isdir(directory):
            # A mistyped path: say which part is missing, not just ENOENT.
            reason = f"its directory {directory} does not exist: check the path for a typo"
        msg = (
            f"no forkd daemon is listening on {socket_path}: start one with `forkd` "
            f"(or run `forkd-run --embedded`), or point FORKD_SOCKET at the right socket"
        )
        if reason:
            msg += f" ({reason})"
        super().__init__(msg)


class RequestRefused(ForkdError):
    """The daemon answered a request with an error reply.

    Attributes:
        code: the protocol's error code, e.g. ``"invalid_request"``.
        message: the daemon's human-readable message (says what to do).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class PermissionDenied(RequestRefused):
    """The caller may not use the daemon: ``connect(2)`` failed with
    EACCES/EPERM, or the daemon sent a ``permission_denied`` reply (its
    allow-list does not contain the caller's uid/gid)."""

    def __init__(self, code: str = "permission_denied", message: str = "") -> None:
        super().__init__(code, message)


class MalformedFrame(RequestRefused):
    """``malformed_frame``: the daemon could not parse a request (a client bug)."""


class FrameTooLarge(RequestRefused):
    """``frame_too_large``: a frame was over 16 MiB; the daemon closed the connection."""


class UnsupportedVersion(RequestRefused):
    """``unsupported_version``: the daemon speaks another protocol version."""


class InvalidRequest(RequestRefused):
    """``invalid_request``: a well-formed request with an invalid value."""


class LimitExceedsPolicy(RequestRefused):
    """``limit_exceeds_policy``: a timeout or limit is above the daemon's maximum."""


class UnknownZygote(RequestRefused):
    """``unknown_zygote``: no zygote with the requested name."""


class UnknownPolicy(RequestRefused):
    """``unknown_policy``: no isolation policy with the requested name."""


class ZygoteUnavailable(RequestRefused):
    """``zygote_unavailable``: the zygote is restarting or failed; retry later."""


class SpawnFailed(RequestRefused):
    """``spawn_failed``: the sandbox could not be forked or isolated."""


class ShuttingDown(RequestRefused):
    """``shutting_down``: the daemon takes no new requests."""


class InternalError(RequestRefused):
    """``internal``: the daemon failed for an internal reason."""


class SessionNotFound(RequestRefused):
    """``unknown_session``: no session with this id is visible to the caller
    (it never existed, was forgotten after ending, or belongs to another uid)."""


class SessionEnded(RequestRefused):
    """``session_ended``: the session was killed, expired or died; the
    message says why. Create a new session."""


class SessionPaused(RequestRefused):
    """``session_paused``: the session is paused; call ``resume()`` first."""


class FileNotFound(RequestRefused):
    """``not_found``: a file or directory does not exist in the sandbox."""


class FileError(RequestRefused):
    """``file_error``: a file operation failed inside the sandbox
    (permission, not a directory, scratch full, ...); the message names the cause."""


class Cancelled(RequestRefused):
    """``cancelled``: the request was cancelled (its cell interrupted, its
    command killed) by a ``cancel`` request."""


class Busy(RequestRefused):
    """``busy``: the connection has the most session requests in flight the
    daemon allows; wait for some to finish or use another connection."""


class CheckpointNotFound(RequestRefused):
    """``unknown_checkpoint``: the session has no checkpoint with this id, or
    it was lost (its frozen copy was killed from inside the session); the
    message says which. ``Session.checkpoints()`` lists the ones kept."""


class InvalidArgument(ForkdError, ValueError, TypeError):
    """An argument of a client call has the wrong type or value; raised
    before anything is sent. ``param`` names the argument. Also a
    ``ValueError`` and a ``TypeError``, so older ``except`` clauses still match."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(f"{param}: {message}")


class ProtocolError(ForkdError):
    """The daemon sent something this client cannot understand (bad frame,
    wrong protocol version, unexpected reply kind)."""


class Timeout(ForkdError):
    """No reply arrived in time (the request's timeout + 30 s grace, or the
    client-level timeout)."""


class ConnectionLost(ForkdError):
    """The connection to the daemon closed or failed while a reply was due."""


_BY_CODE: Dict[str, Type[RequestRefused]] = {
    "malformed_frame": MalformedFrame,
    "frame_too_large": FrameTooLarge,
    "unsupported_version": UnsupportedVersion,
    "invalid_request": InvalidRequest,
    "limit_exceeds_policy": LimitExceedsPolicy,
    "unknown_zygote": UnknownZygote,
    "unknown_policy": UnknownPolicy,
    "zygote_unavailable": ZygoteUnavailable,
    "spawn_failed": SpawnFailed,
    "shutting_down": ShuttingDown,
    "permission_denied": PermissionDenied,
    "internal": InternalError,
    "unknown_session": SessionNotFound,
    "session_ended": SessionEnded,
    "session_paused": SessionPaused,
    "not_found": FileNotFound,
    "file_error": FileError,
    "cancelled": Cancelled,
    "busy": Busy,
    "unknown_checkpoint": CheckpointNotFound,
}


def error_from_reply(code: str, message: str) -> RequestRefused:
    """The exception for an error reply: the subclass matching ``code``, or
    :class:`RequestRefused` itself for a code this client does not know."""
    cls: Optional[Type[RequestRefused]] = _BY_CODE.get(code)
    if cls is None:
        return RequestRefused(code, message)
    return cls(code, message)
