"""Python client for forkd: run untrusted Python snippets in isolated
sandboxes forked from warm zygotes.

>>> from forkd import Forkd
>>> with Forkd() as fk:                                  # doctest: +SKIP
...     r = fk.run("import numpy; print(numpy.zeros(5).tolist())", timeout=5)
...     print(r.exit_code, r.text)

Standard library only. See :class:`Forkd` (blocking), :class:`AsyncForkd`
(asyncio, multiplexed) and :mod:`forkd.errors`.
"""

from ._protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    SESSION_PROTOCOL_VERSION,
    Execution,
    Timings,
    Usage,
    Workspace,
    default_socket_path,
    parse_size,
)
from ._session_wire import (
    MAX_FILE_CHUNK,
    CellError,
    CellResult,
    CheckpointInfo,
    CommandResult,
    DisplayResult,
    FileEntry,
    SessionInfo,
)
from .aio import AsyncForkd
from .client import Forkd
from .errors import (
    Cancelled,
    Busy,
    CheckpointNotFound,
    ConnectionLost,
    DaemonNotRunning,
    FileError,
    FileNotFound,
    ForkdError,
    InvalidArgument,
    InvalidRequest,
    LimitExceedsPolicy,
    LimitsNotEnforced,
    PermissionDenied,
    ProtocolError,
    RequestRefused,
    SessionEnded,
    SessionNotFound,
    SessionPaused,
    ShuttingDown,
    Timeout,
    ZygoteUnavailable,
)

from .session import (
    AsyncCommandHandle,
    AsyncSession,
    CommandHandle,
    Session,
)

__version__ = "0.1.0"

__all__ = [
    "Forkd",
    "LimitsNotEnforced",
    "AsyncForkd",
    "Execution",
    "Timings",
    "Usage",
    "Workspace",
    "default_socket_path",
    "parse_size",
    "PROTOCOL_VERSION",
    "MAX_FRAME_BYTES",
    "ForkdError",
    "DaemonNotRunning",
    "PermissionDenied",
    "RequestRefused",
    "LimitExceedsPolicy",
    "InvalidRequest",
    "ZygoteUnavailable",
    "ShuttingDown",
    "ProtocolError",
    "Timeout",
    "ConnectionLost",
    "Session",
    "AsyncSession",
    "CommandHandle",
    "AsyncCommandHandle",
    "SessionInfo",
    "CellResult",
    "CellError",
    "DisplayResult",
    "CommandResult",
    "FileEntry",
    "MAX_FILE_CHUNK",
    "SESSION_PROTOCOL_VERSION",
    "InvalidArgument",
    "SessionNotFound",
    "SessionEnded",
    "SessionPaused",
    "FileNotFound",
    "FileError",
    "Cancelled",
    "Busy",
    "CheckpointNotFound",
    "CheckpointInfo",
    "__version__",
]
