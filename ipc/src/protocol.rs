//! Message types of protocol version [`PROTOCOL_VERSION`].
//!
//! Every frame carries one JSON object. Requests are [`Request`]; the daemon
//! answers each with one [`Response`] carrying the same `id`. Requests on one
//! connection may be pipelined: responses come back in completion order, so
//! clients match them by `id`. Byte strings (stdin, stdout, file contents) are
//! base64 (standard alphabet, padded) so the JSON stays valid UTF-8.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::bytes::{b64, b64_opt};
use crate::session::{
    Cancel, CellResult, CheckpointInfo, CheckpointRef, Command, CommandInput, CommandKill,
    CommandResult, DisplayData, FileData, FileEntry, FilePath, FileRead, FileWrite, RunCode,
    SessionBranch, SessionCheckpoint, SessionCreate, SessionInfo, SessionList, SessionRef,
    SetNetwork, SetTtl, Stream,
};
pub use crate::terms::{AppliedLimits, KilledBy, Limits, WorkspaceMode, WorkspaceRequest};

/// Version spoken by this crate. A request with another `v` gets
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest version a daemon still answers: version-1 requests (`spawn`,
/// `ping`) get version-1 replies.
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;

/// Hard upper bound on one frame's JSON payload, in bytes, for both directions.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// A client's frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version; must equal [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// The operation and its arguments (flattened: `"op"` and the
    /// operation's fields sit beside `v` and `id`).
    #[serde(flatten)]
    pub body: RequestBody,
}

/// What a request asks for; on the wire the variant is the `"op"` field,
/// next to `v` and `id`, with the variant's fields beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", from = "wire::RequestBodyWire")]
// A request is built once per call and moved a handful of times; boxing the
// spawn arguments would only make every consumer's `match` clumsier.
#[allow(clippy::large_enum_variant)]
pub enum RequestBody {
    /// Run one sandbox and answer with [`ResponseBody::Result`].
    Spawn(SpawnRequest),
    /// Liveness check; answered with [`ResponseBody::Pong`].
    Ping,
    /// Start a session (version 2); answered with [`ResponseBody::Session`].
    SessionCreate(SessionCreate),
    /// The caller's sessions; answered with [`ResponseBody::Sessions`].
    SessionList(SessionList),
    /// One session's state and usage.
    SessionInfo(SessionRef),
    /// End a session.
    SessionKill(SessionRef),
    /// Freeze a session's processes.
    SessionPause(SessionRef),
    /// Thaw a paused session.
    SessionResume(SessionRef),
    /// Set a session's remaining lifetime.
    SessionSetTtl(SetTtl),
    /// Replace a session's network allowlist.
    SessionSetNetwork(SetNetwork),
    /// Copy a live session into new ones; answered with
    /// [`ResponseBody::Sessions`].
    SessionBranch(SessionBranch),
    /// Keep a frozen copy of a session; answered with
    /// [`ResponseBody::Checkpoint`].
    SessionCheckpoint(SessionCheckpoint),
    /// Put a session back in the state of one of its checkpoints; answered
    /// with [`ResponseBody::Session`].
    SessionRestore(CheckpointRef),
    /// A session's checkpoints; answered with [`ResponseBody::Checkpoints`].
    SessionCheckpoints(SessionRef),
    /// Drop a checkpoint; answered with [`ResponseBody::Done`].
    SessionCheckpointDelete(CheckpointRef),
    /// An overlay workspace's changes so far, as a tar; answered with
    /// [`ResponseBody::FileData`].
    SessionWorkspaceDelta(SessionRef),
    /// Run a cell; streams [`ResponseBody::Output`] and
    /// [`ResponseBody::Display`], then answers [`ResponseBody::Cell`].
    RunCode(RunCode),
    /// SIGINT to the session's running cell (`KeyboardInterrupt`).
    Interrupt(SessionRef),
    /// Stop another request of this connection.
    Cancel(Cancel),
    /// Run a shell command; streams [`ResponseBody::CommandStarted`] and
    /// output, then answers [`ResponseBody::Command`].
    Command(Command),
    /// Kill a running command.
    CommandKill(CommandKill),
    /// Feed a running command's stdin; answered with [`ResponseBody::Done`].
    CommandInput(CommandInput),
    /// Write a file chunk; answered with [`ResponseBody::Done`].
    FileWrite(FileWrite),
    /// Read a file chunk; answered with [`ResponseBody::FileData`].
    FileRead(FileRead),
    /// List a directory; answered with [`ResponseBody::Files`].
    FileList(FilePath),
    /// Remove a file or a directory tree.
    FileRemove(FilePath),
    /// Make a directory (and its parents).
    FileMakeDir(FilePath),
    /// Stat a path; answered with [`ResponseBody::FileStat`].
    FileStat(FilePath),
}

impl RequestBody {
    /// The protocol version that introduced this operation.
    pub fn since_version(&self) -> u32 {
        match self {
            RequestBody::Spawn(_) | RequestBody::Ping => 1,
            _ => 2,
        }
    }

    /// The operation's name on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            RequestBody::Spawn(_) => "spawn",
            RequestBody::Ping => "ping",
            RequestBody::SessionCreate(_) => "session_create",
            RequestBody::SessionList(_) => "session_list",
            RequestBody::SessionInfo(_) => "session_info",
            RequestBody::SessionKill(_) => "session_kill",
            RequestBody::SessionPause(_) => "session_pause",
            RequestBody::SessionResume(_) => "session_resume",
            RequestBody::SessionSetTtl(_) => "session_set_ttl",
            RequestBody::SessionSetNetwork(_) => "session_set_network",
            RequestBody::SessionBranch(_) => "session_branch",
            RequestBody::SessionCheckpoint(_) => "session_checkpoint",
            RequestBody::SessionRestore(_) => "session_restore",
            RequestBody::SessionCheckpoints(_) => "session_checkpoints",
            RequestBody::SessionCheckpointDelete(_) => "session_checkpoint_delete",
            RequestBody::SessionWorkspaceDelta(_) => "session_workspace_delta",
            RequestBody::RunCode(_) => "run_code",
            RequestBody::Interrupt(_) => "interrupt",
            RequestBody::Cancel(_) => "cancel",
            RequestBody::Command(_) => "command",
            RequestBody::CommandKill(_) => "command_kill",
            RequestBody::CommandInput(_) => "command_input",
            RequestBody::FileWrite(_) => "file_write",
            RequestBody::FileRead(_) => "file_read",
            RequestBody::FileList(_) => "file_list",
            RequestBody::FileRemove(_) => "file_remove",
            RequestBody::FileMakeDir(_) => "file_make_dir",
            RequestBody::FileStat(_) => "file_stat",
        }
    }
}

/// Deserialization-only mirror of [`RequestBody`]. It exists because a unit
/// variant of an internally tagged enum silently accepts any extra fields;
/// routing `ping` through an empty `deny_unknown_fields` struct makes
/// `{"op":"ping","bogus":1}` a malformed frame, like unknown fields of
/// `spawn`. The wire shape and the public type are unchanged.
mod wire {
    use serde::Deserialize;

    use super::{RequestBody, SpawnRequest};
    use crate::session::{
        Cancel, CheckpointRef, Command, CommandInput, CommandKill, FilePath, FileRead, FileWrite,
        RunCode, SessionBranch, SessionCheckpoint, SessionCreate, SessionList, SessionRef,
        SetNetwork, SetTtl,
    };

    #[derive(Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    #[allow(clippy::large_enum_variant)] // Lives only during deserialization.
    pub(super) enum RequestBodyWire {
        Spawn(SpawnRequest),
        Ping(NoFields),
        SessionCreate(SessionCreate),
        SessionList(SessionList),
        SessionInfo(SessionRef),
        SessionKill(SessionRef),
        SessionPause(SessionRef),
        SessionResume(SessionRef),
        SessionSetTtl(SetTtl),
        SessionSetNetwork(SetNetwork),
        SessionBranch(SessionBranch),
        SessionCheckpoint(SessionCheckpoint),
        SessionRestore(CheckpointRef),
        SessionCheckpoints(SessionRef),
        SessionCheckpointDelete(CheckpointRef),
        SessionWorkspaceDelta(SessionRef),
        RunCode(RunCode),
        Interrupt(SessionRef),
        Cancel(Cancel),
        Command(Command),
        CommandKill(CommandKill),
        CommandInput(CommandInput),
        FileWrite(FileWrite),
        FileRead(FileRead),
        FileList(FilePath),
        FileRemove(FilePath),
        FileMakeDir(FilePath),
        FileStat(FilePath),
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct NoFields {}

    impl From<RequestBodyWire> for RequestBody {
        fn from(w: RequestBodyWire) -> Self {
            match w {
                RequestBodyWire::Spawn(s) => RequestBody::Spawn(s),
                RequestBodyWire::Ping(NoFields {}) => RequestBody::Ping,
                RequestBodyWire::SessionCreate(r) => RequestBody::SessionCreate(r),
                RequestBodyWire::SessionList(r) => RequestBody::SessionList(r),
                RequestBodyWire::SessionInfo(r) => RequestBody::SessionInfo(r),
                RequestBodyWire::SessionKill(r) => RequestBody::SessionKill(r),
                RequestBodyWire::SessionPause(r) => RequestBody::SessionPause(r),
                RequestBodyWire::SessionResume(r) => RequestBody::SessionResume(r),
                RequestBodyWire::SessionSetTtl(r) => RequestBody::SessionSetTtl(r),
                RequestBodyWire::SessionSetNetwork(r) => RequestBody::SessionSetNetwork(r),
                RequestBodyWire::SessionBranch(r) => RequestBody::SessionBranch(r),
                RequestBodyWire::SessionCheckpoint(r) => RequestBody::SessionCheckpoint(r),
                RequestBodyWire::SessionRestore(r) => RequestBody::SessionRestore(r),
                RequestBodyWire::SessionCheckpoints(r) => RequestBody::SessionCheckpoints(r),
                RequestBodyWire::SessionCheckpointDelete(r) => {
                    RequestBody::SessionCheckpointDelete(r)
                }
                RequestBodyWire::SessionWorkspaceDelta(r) => RequestBody::SessionWorkspaceDelta(r),
                RequestBodyWire::RunCode(r) => RequestBody::RunCode(r),
                RequestBodyWire::Interrupt(r) => RequestBody::Interrupt(r),
                RequestBodyWire::Cancel(r) => RequestBody::Cancel(r),
                RequestBodyWire::Command(r) => RequestBody::Command(r),
                RequestBodyWire::CommandKill(r) => RequestBody::CommandKill(r),
                RequestBodyWire::CommandInput(r) => RequestBody::CommandInput(r),
                RequestBodyWire::FileWrite(r) => RequestBody::FileWrite(r),
                RequestBodyWire::FileRead(r) => RequestBody::FileRead(r),
                RequestBodyWire::FileList(r) => RequestBody::FileList(r),
                RequestBodyWire::FileRemove(r) => RequestBody::FileRemove(r),
                RequestBodyWire::FileMakeDir(r) => RequestBody::FileMakeDir(r),
                RequestBodyWire::FileStat(r) => RequestBody::FileStat(r),
            }
        }
    }
}

/// What to run and under which limits. Unset limits take the daemon's defaults;
/// a limit above the daemon's configured maximum is refused
/// ([`ErrorCode::LimitExceedsPolicy`]), never silently clamped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// Zygote by name; `None` means the daemon's default zygote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zygote: Option<String>,
    /// What to run.
    pub program: Program,
    /// `sys.argv[1:]` of the program.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// Bytes fed to the program's stdin, then EOF.
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub stdin: Vec<u8>,
    /// Environment of the program (replaces, does not extend, the zygote's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Small files written into the scratch (working) directory before the
    /// program starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<InlineFile>,
    /// Wall-clock limit in milliseconds; the whole sandbox is killed at expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Resource limits; always serialized (possibly as `{}`), optional on input.
    #[serde(default)]
    pub limits: Limits,
    /// Isolation policy by name; `None` means the daemon's default policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Network destinations the sandbox may reach (`HOST[:PORT]`,
    /// `*.DOMAIN[:PORT]`, `CIDR[:PORT]`, ports as `N` or `LO-HI`); empty means
    /// no network at all, as without the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_net: Vec<String>,
    /// A host directory mounted into the sandbox with per-path modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceRequest>,
    /// The client's own streams that are terminals (`forkd-run` on a tty):
    /// the program line-buffers these as `python` does on a terminal. They
    /// stay pipes (`isatty()` is false). Empty: Python's pipe buffering.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub terminal: Vec<Stream>,
}

/// Python source, or a script path as seen inside the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Program {
    /// Python source run as `__main__` (`{"code": "print(1)"}`).
    Code(String),
    /// Path of a script inside the sandbox (`{"script": "/opt/job.py"}`).
    Script(String),
    /// A module run as `python -m` runs it (`{"module": "json.tool"}`).
    Module(String),
}

// `program` has no serde default (a spawn without a program is malformed);
// this Rust-side default only keeps `..SpawnRequest::default()` usable.
impl Default for Program {
    fn default() -> Self {
        Program::Code(String::new())
    }
}

/// A file created in the scratch directory before the program starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineFile {
    /// Relative path inside the scratch directory; no `..`, no absolute paths.
    pub path: String,
    /// File contents (base64 on the wire).
    #[serde(with = "b64")]
    pub content: Vec<u8>,
    /// Unix permission bits; default 0o644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// A daemon's frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version of the daemon; equals [`PROTOCOL_VERSION`].
    pub v: u32,
    /// The request's id; 0 when the request could not be parsed far enough.
    pub id: u64,
    /// The outcome (flattened: `"kind"` and its fields sit beside `v`, `id`).
    #[serde(flatten)]
    pub body: ResponseBody,
}

/// What a response carries; on the wire the variant is the `"kind"` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// One response per request, moved once or twice: boxing the result would only
// make every consumer's `match` clumsier (as for `RequestBody`).
#[allow(clippy::large_enum_variant)]
pub enum ResponseBody {
    /// The sandbox ran (whatever its exit status); answers `spawn`.
    Result(SpawnResult),
    /// The request was refused or could not be carried out.
    Error(ErrorReply),
    /// Answers `ping`.
    Pong {
        /// The daemon's version string (its crate version).
        daemon_version: String,
    },
    /// A session's state (answers the `session_*` requests but
    /// `session_list`).
    Session(SessionInfo),
    /// Answers `session_list`.
    Sessions {
        /// The sessions, oldest first.
        sessions: Vec<SessionInfo>,
    },
    /// Not final: a chunk of a cell's or command's output, as written.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes (base64 on the wire).
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Not final: a rich value a cell displayed (`display()`, a figure).
    Display(DisplayData),
    /// Not final: the command runs with this pid (for `command_kill`).
    CommandStarted {
        /// Its pid inside the sandbox.
        pid: u32,
    },
    /// Answers `run_code`.
    Cell(CellResult),
    /// Answers `command`.
    Command(CommandResult),
    /// Answers `file_read`.
    FileData(FileData),
    /// Answers `file_list`.
    Files {
        /// The directory's entries, sorted by name.
        entries: Vec<FileEntry>,
    },
    /// Answers `file_stat`.
    FileStat(FileEntry),
    /// Answers `session_checkpoint`.
    Checkpoint(CheckpointInfo),
    /// Answers `session_checkpoints`.
    Checkpoints {
        /// The session's checkpoints, oldest first.
        checkpoints: Vec<CheckpointInfo>,
    },
    /// Answers requests that return nothing (`interrupt`, `cancel`,
    /// `command_kill`, `file_write`, `file_remove`, `file_make_dir`).
    Done {},
}

impl ResponseBody {
    /// False for the streamed events that precede a request's final
    /// response (`output`, `display`, `command_started`).
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            ResponseBody::Output { .. }
                | ResponseBody::Display(_)
                | ResponseBody::CommandStarted { .. }
        )
    }
}

/// Outcome of one sandbox run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpawnResult {
    /// Sandbox id, unique per daemon run.
    pub sandbox: u64,
    /// Name of the zygote that forked the sandbox.
    pub zygote: String,
    /// Exit code when the program exited; `None` when a signal ended it.
    pub exit_code: Option<i32>,
    /// Signal that ended the program's init process, if any.
    pub signal: Option<i32>,
    /// Why the run ended abnormally, if it did; `None` when the program
    /// exited on its own with no limit involved (then `exit_code` is set).
    /// May be set together with `exit_code` (e.g. [`KilledBy::Pids`]).
    pub killed_by: Option<KilledBy>,
    /// Captured stdout (base64 on the wire; arbitrary bytes).
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    /// Captured stderr (base64 on the wire; arbitrary bytes).
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// True when stdout was cut at the output limit.
    pub stdout_truncated: bool,
    /// True when stderr was cut at the output limit.
    pub stderr_truncated: bool,
    /// Where the time went.
    pub timings: Timings,
    /// Resources the sandbox consumed.
    pub usage: Usage,
    /// The limits actually applied, after defaults.
    pub limits: AppliedLimits,
    /// True when a warm-pool child (forked and isolated before the request)
    /// ran the program; false when one was forked for it.
    #[serde(default)]
    pub warm: bool,
    /// What the kernel enforced of the sandbox's landlock ruleset; `None`
    /// from a daemon that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock: Option<LandlockStatus>,
    /// The overlay workspace's changes (a tar; deletions as `.wh.NAME`
    /// entries), when the request asked for `export_delta`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub workspace_delta: Option<Vec<u8>>,
    /// Why the delta could not be exported (the program's result stands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_error: Option<String>,
    /// What the sandbox did on the network; only when the request had an
    /// allowlist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Box<NetworkReport>>,
}

/// What the kernel enforces of a sandbox's landlock ruleset (the policy key
/// `landlock` decides whether less than all of it is acceptable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockStatus {
    /// Every requested filesystem right and scope.
    FullyEnforced,
    /// Part of them: the kernel has an older landlock ABI.
    PartiallyEnforced,
    /// None: the kernel has no landlock; the mount namespace alone confines
    /// the filesystem.
    NotEnforced,
}

/// Per-sandbox egress counters and log (requests with `allow_net`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkReport {
    /// Bytes the sandbox sent through allowed connections.
    pub bytes_out: u64,
    /// Bytes it received through them.
    pub bytes_in: u64,
    /// Connections proxied to their destination.
    pub connections_allowed: u64,
    /// Connections refused (not allowed, or the destination failed).
    pub connections_denied: u64,
    /// Queries the sandbox's resolver received.
    pub dns_queries: u64,
    /// Queries answered with no address (name not allowed, rebinding, upstream failure).
    pub dns_refused: u64,
    /// Connections and refused lookups, oldest first, at most the daemon's cap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<NetEvent>,
    /// True when events were left out of `log` past the cap.
    #[serde(default)]
    pub log_truncated: bool,
}

/// One connection attempt or refused DNS lookup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetEvent {
    /// `connect` or `dns`.
    pub kind: String,
    /// Address (connect) or queried name (dns).
    pub destination: String,
    /// Destination port (connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The allowlisted name the address was resolved for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Whether it went through.
    pub allowed: bool,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes sent to the destination (connect).
    #[serde(default)]
    pub bytes_out: u64,
    /// Bytes received from it (connect).
    #[serde(default)]
    pub bytes_in: u64,
}

impl SpawnResult {
    /// Exit status in shell convention: the exit code, or 128 + signal; 255
    /// if the daemon reported neither.
    pub fn shell_status(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(code), _) => code,
            // Saturating: the value comes off the wire and must not be able
            // to panic a debug-build client.
            (None, Some(sig)) => sig.saturating_add(128),
            (None, None) => 255,
        }
    }

    /// stdout as text, invalid UTF-8 replaced by U+FFFD.
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text, invalid UTF-8 replaced by U+FFFD.
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Microseconds measured by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Request decoded → result encoded.
    pub total_us: u64,
    /// Request decoded → the zygote reported the child forked (0 for a warm
    /// child, forked before the request).
    pub fork_us: u64,
    /// Request decoded → the program starts (child isolated, job set up).
    pub isolated_us: u64,
    /// Program start → the program's init process exited.
    pub run_us: u64,
}

/// Resources consumed by the sandbox, from its cgroup (zero when the cgroup
/// is not enforced, see [`AppliedLimits::cgroup_enforced`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// User CPU time, microseconds.
    pub cpu_user_us: u64,
    /// System CPU time, microseconds.
    pub cpu_system_us: u64,
    /// Peak memory charged to the sandbox's cgroup, bytes.
    pub peak_memory_bytes: u64,
}

/// Body of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable; says what to do about it.
    pub message: String,
}

/// Machine-readable reason of an [`ErrorReply`] (snake_case on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid JSON or not a known request shape.
    MalformedFrame,
    /// The frame's length prefix exceeded [`MAX_FRAME_BYTES`] (the connection
    /// is closed after this reply).
    FrameTooLarge,
    /// The request's `v` is not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// A well-formed request with an invalid value (bad file path, zero
    /// timeout, ...).
    InvalidRequest,
    /// A requested limit is above what the daemon's configuration allows.
    LimitExceedsPolicy,
    /// No zygote with the requested name.
    UnknownZygote,
    /// No isolation policy with the requested name.
    UnknownPolicy,
    /// The zygote is restarting or failed to start; retry later.
    ZygoteUnavailable,
    /// The zygote could not fork, the sandbox's cgroup could not be created,
    /// or the child could not isolate itself; the program did not run.
    SpawnFailed,
    /// The daemon is shutting down.
    ShuttingDown,
    /// The peer's uid/gid is not on the daemon's allow-list (the connection
    /// is closed after this reply).
    PermissionDenied,
    /// The daemon could not complete the request for an internal reason.
    Internal,
    /// No session with this id is visible to the caller (version 2).
    UnknownSession,
    /// The session has ended; the message says why (version 2).
    SessionEnded,
    /// The session is paused; resume it first (version 2).
    SessionPaused,
    /// A file or directory does not exist in the sandbox (version 2).
    NotFound,
    /// A file operation failed inside the sandbox (permission, not a
    /// directory, out of space, ...); the message names the cause (version 2).
    FileError,
    /// The request was cancelled (by `cancel`, version 2).
    Cancelled,
    /// The connection already has the most session requests in flight that
    /// the daemon allows (`[sessions] max_requests_per_connection`); wait for
    /// some to finish, or open another connection (version 2).
    Busy,
    /// The session has no checkpoint with this id, or the checkpoint was
    /// lost (its frozen copy was killed from inside the session); list the
    /// session's checkpoints (version 2).
    UnknownCheckpoint,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{self:?}"));
        f.write_str(&s)
    }
}
