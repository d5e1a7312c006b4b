//! Session messages (protocol version 2): stateful sandboxes that keep an
//! interpreter between cells, stream output, move files and run commands.
//!
//! A session is a sandbox like a one-shot spawn (same namespaces, cgroup,
//! landlock, seccomp, limits and scratch) that stays alive until it is
//! killed, expires (`ttl_ms`), idles out (`idle_timeout_ms`) or dies. Its
//! requests name it by [`SessionRef::session`]. Streaming requests
//! (`run_code`, `command`) answer with any number of non-final responses
//! (`output`, `display`, `command_started`) and then exactly one final one;
//! every other request has exactly one response. See `PROTOCOL.md` §7.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bytes::b64;
use crate::terms::{AppliedLimits, KilledBy, Limits, WorkspaceRequest};

/// `session_create`: start a session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCreate {
    /// Zygote by name; `None` means the daemon's default zygote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zygote: Option<String>,
    /// Environment of the interpreter and its commands (laid over the
    /// base environment, as for `spawn`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Resource limits of the whole session (its cgroup); `output_bytes`
    /// bounds each cell's and each command's output.
    #[serde(default)]
    pub limits: Limits,
    /// Isolation policy by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Lifetime in milliseconds from creation (the daemon's default and
    /// maximum apply); the session is killed at expiry (`killed_by: "ttl"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Killed after this long without a request (`killed_by: "idle"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Free-form labels, returned by `session_list` and `session_info` and
    /// usable as a `session_list` filter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Network destinations, as for `spawn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_net: Vec<String>,
    /// A workspace, as for `spawn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceRequest>,
}

/// A request that names one session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRef {
    /// The id `session_create` returned.
    pub session: String,
}

/// `session_list`: the caller's sessions (root: everyone's), optionally
/// only those carrying every given label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionList {
    /// Labels a listed session must all carry (equal values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `session_set_ttl`: a new lifetime, counted from now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTtl {
    /// The session.
    pub session: String,
    /// Milliseconds from now (at most the daemon's maximum TTL).
    pub ttl_ms: u64,
}

/// `session_set_network`: a new network allowlist (same syntax and bound
/// as `allow_net` at create), replacing the old one for new connections
/// and queries; open connections stay. An empty list closes the network to
/// new connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetNetwork {
    /// The session.
    pub session: String,
    /// Destinations, as `allow_net` of `session_create`.
    pub allow_net: Vec<String>,
}

/// `session_branch`: `count` new sessions, each a copy of the session's
/// interpreter (its variables, imports, arrays) and scratch at this instant,
/// in namespaces and a cgroup of its own (docs/branch.md). A running cell is
/// waited for. Answered with the new sessions (`sessions`), in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionBranch {
    /// The session to copy.
    pub session: String,
    /// How many branches (at least 1, at most the daemon's
    /// `[sessions] max_branches_per_request`).
    #[serde(default = "one")]
    pub count: u32,
    /// Keep the PRNG states (`random`, numpy's global generator) equal to
    /// the parent's; by default each branch is reseeded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub same_seed: bool,
    /// Branch although the interpreter runs threads the user started (a
    /// branch has only the thread that forked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Labels of the new sessions (default: the parent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

fn one() -> u32 {
    1
}

/// `session_checkpoint`: keep a frozen copy of the session's interpreter and
/// scratch at this instant, to `session_restore` later (docs/branch.md,
/// "Checkpoint and restore"). A running cell is waited for. Answered with
/// kind `checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCheckpoint {
    /// The session to checkpoint.
    pub session: String,
    /// Checkpoint although the interpreter runs threads the user started
    /// (the copy has only the thread that forked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Keep it beyond the session's end (kill, TTL, idle timeout), for
    /// `[sessions] kept_checkpoint_ttl_secs`: the ended session can then be
    /// brought back with `session_restore`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
}

/// `session_restore` and `session_checkpoint_delete`: one checkpoint of a
/// session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRef {
    /// The session the checkpoint was taken of.
    pub session: String,
    /// The checkpoint's id (from `session_checkpoint`).
    pub checkpoint: String,
}

/// One checkpoint (kind `checkpoint`, and in `checkpoints` lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Its id: name it in `session_restore`.
    pub checkpoint: String,
    /// The session it belongs to.
    pub session: String,
    /// Milliseconds since it was taken.
    pub age_ms: u64,
    /// Bytes of scratch (`/tmp`, `/dev/shm`) it holds.
    pub scratch_bytes: u64,
    /// Times it was restored.
    #[serde(default)]
    pub restores: u64,
    /// Taken with `keep`: it outlives the session's end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// `run_code`: one cell in the session's `__main__`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCode {
    /// The session.
    pub session: String,
    /// Python source. The value of a trailing expression becomes the cell's
    /// main result.
    pub code: String,
    /// Interrupts the cell (`KeyboardInterrupt`) after this many
    /// milliseconds; the session survives. Default: the daemon's spawn
    /// timeout default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `command`: `/bin/sh -c CMD` inside the session's sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// The session.
    pub session: String,
    /// Shell command line.
    pub cmd: String,
    /// Working directory inside the sandbox (default: the session's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Variables laid over the session's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The command's process group is killed after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Give the command a stdin pipe fed by `command_input` (default: stdin
    /// is `/dev/null`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
}

/// `command_input`: bytes for the stdin of a command started with
/// `stdin: true`, and/or its end (`eof`). Answered with `done` once the
/// executor has taken the bytes (written, or queued while the pipe is
/// full); at most [`MAX_FILE_CHUNK`] bytes a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandInput {
    /// The session.
    pub session: String,
    /// The pid `command_started` reported.
    pub pid: u32,
    /// The bytes (base64 on the wire).
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
    /// Close the command's stdin after these bytes (the command reads EOF).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eof: bool,
}

/// `command_kill`: SIGKILL to a running command's process group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandKill {
    /// The session.
    pub session: String,
    /// The pid `command_started` reported.
    pub pid: u32,
}

/// `cancel`: stop another request of this connection (a cell is
/// interrupted, a command killed); that request then ends with a
/// `cancelled` error. Answered with `done` (also when the target already
/// finished).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The id of the request to cancel.
    pub target: u64,
}

/// `file_write`: write one chunk. A file larger than a frame is written in
/// chunks: the first with `append: false` (creates or truncates), the rest
/// with `append: true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWrite {
    /// The session.
    pub session: String,
    /// Path inside the sandbox; relative paths are below the session's
    /// working directory.
    pub path: String,
    /// The bytes (base64 on the wire).
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Append instead of create-or-truncate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append: bool,
    /// Permission bits of a new file (default 0o644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `file_read`: read up to `length` bytes from `offset` (at most
/// [`MAX_FILE_CHUNK`] per request; read on while `eof` is false).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRead {
    /// The session.
    pub session: String,
    /// Path inside the sandbox.
    pub path: String,
    /// Where to start.
    #[serde(default)]
    pub offset: u64,
    /// How much at most (default and cap: [`MAX_FILE_CHUNK`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

/// `file_list`, `file_remove`, `file_make_dir`, `file_stat`: one path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePath {
    /// The session.
    pub session: String,
    /// Path inside the sandbox.
    pub path: String,
}

/// Largest data chunk of one `file_write` or `file_read` (base64 of it
/// fits a frame with room to spare).
pub const MAX_FILE_CHUNK: usize = 8 << 20;

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Alive and accepting requests.
    Running,
    /// Frozen (no CPU); only `session_resume`, `session_info`,
    /// `session_kill` and `session_set_ttl` are served.
    Paused,
    /// Ended; see `ended_by`.
    Ended,
    /// Ended (see `ended_by`) with checkpoints taken with `keep`: only
    /// `session_restore` (which brings it back, running), `session_info`,
    /// `session_checkpoints`, `session_checkpoint_delete` and `session_kill`
    /// are served; it goes when its last kept checkpoint is deleted or
    /// `[sessions] kept_checkpoint_ttl_secs` after it ended.
    EndedWithCheckpoints,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEnd {
    /// `session_kill`.
    Killed,
    /// Its TTL expired.
    Ttl,
    /// It had no request for `idle_timeout_ms`.
    Idle,
    /// Its processes died (e.g. out of memory, or its executor was killed).
    Died,
    /// The daemon shut down.
    Shutdown,
}

/// Resource use read from the session's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionUsage {
    /// Memory charged now, bytes.
    pub memory_bytes: u64,
    /// Peak memory, bytes.
    pub peak_memory_bytes: u64,
    /// User CPU, microseconds.
    pub cpu_user_us: u64,
    /// System CPU, microseconds.
    pub cpu_system_us: u64,
    /// Processes and threads now.
    pub pids: u64,
}

/// What `session_create`, `session_info` and friends answer (kind `session`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session's id (unguessable; name it in later requests). Called
    /// `session` on the wire, like the field that names it in requests.
    pub session: String,
    /// The zygote it was forked from.
    pub zygote: String,
    /// Running, paused or ended.
    pub state: SessionState,
    /// Why it ended (state `ended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<SessionEnd>,
    /// What the kernel ended it for, when known (e.g. `oom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub killed_by: Option<KilledBy>,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Milliseconds since creation.
    pub age_ms: u64,
    /// Milliseconds until the TTL kills it (0 once ended).
    pub ttl_left_ms: u64,
    /// Idle timeout, milliseconds (`None`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Cells run so far.
    pub cells: u64,
    /// Resource use now.
    pub usage: SessionUsage,
    /// The limits in force.
    pub limits: AppliedLimits,
    /// True when a warm-pool child became this session.
    #[serde(default)]
    pub warm: bool,
    /// Its network allowlist (empty: no network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_net: Vec<String>,
    /// The session this one was branched from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its checkpoints, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointInfo>,
    /// Branch shells made ready for its next `session_branch` (after a
    /// branch request; `[sessions] spare_branches`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spare_branches: u32,
    /// (A branch.) Its parent ended while it lives on; `parent` still names
    /// it (docs/branch.md, "Lifetime").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parent_ended: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

/// A rich value: MIME type → data (text for text types, base64 for
/// `image/png`), as Jupyter's display data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DisplayData {
    /// MIME type → representation.
    pub data: BTreeMap<String, String>,
    /// True for the value of the cell's trailing expression.
    #[serde(default)]
    pub main: bool,
}

/// An exception that ended a cell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellError {
    /// Exception class name, e.g. `ZeroDivisionError`.
    pub name: String,
    /// `str()` of the exception.
    pub value: String,
    /// The formatted traceback (the user's frames only).
    pub traceback: String,
}

/// The final answer to `run_code` (kind `cell`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// 1 for the session's first cell, and so on.
    pub execution_count: u64,
    /// The trailing expression's `text/plain`, if the cell ended in one
    /// whose value is not `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Rich results, in order (`display()` calls, figures, the main result).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<DisplayData>,
    /// Everything the cell wrote to stdout (also streamed as `output`).
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// Output beyond `output_bytes` was dropped (and the cell interrupted).
    #[serde(default)]
    pub stdout_truncated: bool,
    /// As `stdout_truncated`, for stderr.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// The exception that ended the cell, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CellError>,
    /// The cell hit its timeout and was interrupted.
    #[serde(default)]
    pub timed_out: bool,
    /// Wall time in the session, microseconds.
    pub duration_us: u64,
    /// `oom` when the out-of-memory killer killed the interpreter during
    /// the cell (its error is then `KernelDied`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub killed_by: Option<KilledBy>,
    /// With `timed_out`: the cell's timeout, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// With `killed_by`: the session's memory limit, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// With `killed_by`: the session's peak memory use, bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

/// The final answer to `command` (kind `command`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Exit code, when the shell exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Its stdout (also streamed).
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    /// Its stderr.
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// Output beyond `output_bytes` was dropped (and the command killed).
    #[serde(default)]
    pub stdout_truncated: bool,
    /// As `stdout_truncated`, for stderr.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// The command hit its timeout and was killed.
    #[serde(default)]
    pub timed_out: bool,
    /// With `timed_out`: the command's timeout (added within version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// With a `*_truncated` flag: the session's `output_bytes`, the budget
    /// of stdout and stderr together (added within version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_limit_bytes: Option<u64>,
}

/// A directory entry or a `file_stat` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Base name.
    pub name: String,
    /// Full path inside the sandbox.
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, milliseconds since the epoch.
    pub modified_ms: u64,
}

/// Answer to `file_read` (kind `file_data`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    /// The bytes read.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Where they start.
    pub offset: u64,
    /// The file's size when read.
    pub size: u64,
    /// Nothing follows `offset + data.len()`.
    pub eof: bool,
}
