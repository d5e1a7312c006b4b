//! Every message between the daemon, a zygote and a sandbox child, typed and
//! versioned in one place.
//!
//! Three channels, each with its own framing:
//!
//! | channel | direction | framing | types |
//! |---|---|---|---|
//! | control socket (SOCK_SEQPACKET, zygote fd 3) | daemon → zygote | one JSON object per datagram, fds by SCM_RIGHTS | [`ToZygote`] |
//! | control socket | zygote → daemon | same | [`FromZygote`] |
//! | job pipe (child fd 0) | daemon → child | 4-byte big-endian length + JSON, then the program's stdin | [`Job`] |
//! | status pipe (child fd 3) | child → daemon | one-byte tags, see [`StatusReport`] | [`StatusReport`], decoded by [`StatusDecoder`] |
//! | session requests (job pipe, after the job) | daemon → session executor | [`exec_frame`]: lengths, JSON, raw payload | [`ToExecutor`] |
//! | session replies (child fd 1) | session executor → daemon | same | [`FromExecutor`], decoded by [`ExecDecoder`] |
//!
//! The Python half (`python/forkd_zygote.py`) mirrors these shapes; its
//! `WIRE_VERSION` must equal [`WIRE_VERSION`] (checked at init: a zygote
//! speaking another version refuses to start, and a unit test compares the
//! two sources).
//!
//! Trust: the control socket is the zygote's, which runs no user code. The
//! job pipe is written only by the daemon. The status pipe is written by the
//! child, which also runs user code that can find and write fd 3, so every
//! report is a claim about that child alone: the decoder bounds what it keeps,
//! a malformed stream is a [`StatusError`], and the daemon believes a report
//! only where the kernel's wait status agrees (see `forkd::sandbox`).
//!
//! A session child's pid 1 is the executor: it runs no user code, makes
//! itself non-dumpable (so `/proc/1/fd` and `/proc/1/mem` are closed to the
//! sandbox's uid; ptrace and pidfd_getfd are refused by seccomp anyway) and
//! forks the interpreter that runs the cells with fresh pipes, so user code
//! holds no descriptor of the daemon's channels and cannot forge
//! [`FromExecutor`] messages. What the interpreter tells the executor about
//! its own cells (a channel private to `forkd_zygote.py`) is a claim about
//! that session alone.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::{InitConfig, InitInfo};

/// Version of the daemon–zygote–child wire. Bump on any incompatible change
/// to a type in this module (and to `WIRE_VERSION` in `forkd_zygote.py`).
pub const WIRE_VERSION: u32 = 6;

/// Largest control message either side sends (the zygote reads with this cap).
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// Largest status stream the daemon keeps (a setup error message is the only
/// long report; anything beyond is dropped, not buffered).
pub const MAX_STATUS_BYTES: usize = 64 * 1024;

/// Daemon → zygote.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToZygote {
    /// The first message: what to load, how to isolate, what to import.
    Init {
        wire: u32,
        lib: PathBuf,
        config: InitConfig,
        preload: Vec<String>,
        rootless: bool,
        /// Rootless with a subordinate id range to map (once, at start).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subids: Option<crate::userns::SubIds>,
    },
    /// Fork one child with `spec` (a [`crate::ChildSpec`] as JSON, passed
    /// unchanged to the native library). Carries the child's fds: job,
    /// stdout, stderr, status and optionally a network namespace. A
    /// `parked` child (for the warm pool) pre-touches the memory a job
    /// writes while it waits.
    Spawn {
        id: u64,
        spec: String,
        #[serde(default)]
        parked: bool,
        /// The spec makes a session branch: the zygote forks without a new
        /// pid namespace of its own (the child makes the branch's).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        branch: bool,
    },
    /// Finish running children, then exit.
    Drain,
}

impl ToZygote {
    /// The datagram's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain types cannot fail (no maps with non-string keys).
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What a zygote reports when it is ready to fork.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyInfo {
    pub pid: u32,
    pub python: String,
    pub executable: String,
    pub threads: u32,
    pub preloaded: Vec<String>,
    pub init_ms: f64,
    pub native: InitInfo,
}

/// The zygote's report of a reaped child (from `wait4`: trusted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exited {
    /// Raw wait status.
    pub status: i32,
    pub utime_us: u64,
    pub stime_us: u64,
    pub maxrss_kb: u64,
}

/// Zygote → daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromZygote {
    /// Start-up progress: now importing this preload module.
    Importing {
        module: String,
    },
    Ready(ReadyInfo),
    /// The zygote cannot go on; it exits after sending this.
    Fatal {
        error: String,
    },
    /// Carries the child's pidfd.
    Forked {
        id: u64,
        pid: i32,
    },
    Exited {
        id: u64,
        #[serde(flatten)]
        exited: Exited,
    },
    SpawnError {
        id: u64,
        error: String,
    },
}

impl FromZygote {
    pub fn decode(bytes: &[u8]) -> Result<FromZygote, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What the child runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobProgram {
    /// Source code, run as `python -c` would.
    Code(String),
    /// A path inside the sandbox, run as `python PATH` would.
    Script(String),
    /// A module name, run as `python -m MODULE` would.
    Module(String),
}

/// A file written into the sandbox's scratch before the program starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub path: String,
    /// Base64 (standard alphabet, padded).
    pub content: String,
    pub mode: Option<u32>,
}

/// Daemon → child, on the job pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub program: JobProgram,
    pub argv: Vec<String>,
    /// The program's whole environment (the child clears its own first).
    pub env: BTreeMap<String, String>,
    pub files: Vec<JobFile>,
    /// Set for a session: the child becomes its executor instead of running
    /// `program`, and reads [`ToExecutor`] frames from the job pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionJob>,
    /// `"stdout"`/`"stderr"`: streams the program line-buffers, as Python
    /// does on a terminal (the client's stream is one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub line_buffered: Vec<String>,
}

/// How a session child runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionJob {
    /// Output kept per cell or command (stdout plus stderr); beyond it the
    /// rest is dropped and the cell interrupted (the command killed).
    pub output_bytes: u64,
    /// Working directory of the interpreter and of commands.
    pub cwd: String,
    /// How long an interrupted cell may take to stop before the interpreter
    /// is killed and replaced (its state is then lost).
    pub interrupt_grace_ms: u64,
    /// A branch's executor: instead of starting an interpreter, it makes
    /// the channels a copy of the parent's interpreter opens in this
    /// directory (of its scratch) and adopts that copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<String>,
}

/// One branch a session's interpreter forks a copy into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchTarget {
    /// Where the branch's namespace files are shown in the parent session's
    /// mount namespace (`branch::exposed_dir`).
    pub ns: String,
    /// Where the branch's executor made the copy's channels.
    pub dir: String,
}

/// What became of one [`BranchTarget`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchOutcome {
    /// Why the copy did not reach the branch.
    pub error: Option<String>,
}

/// Largest JSON part of an executor frame.
pub const MAX_EXEC_HEADER: usize = 12 << 20;
/// Largest payload of an executor frame (one file chunk, one output chunk).
pub const MAX_EXEC_PAYLOAD: usize = 8 << 20;

/// Daemon → session executor. `req` is the daemon's id for the request;
/// every reply carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToExecutor {
    /// Run a cell (queued behind a running one).
    Cell {
        req: u64,
        code: String,
    },
    /// Interrupt cell `req` (SIGINT if running, dropped if queued).
    Interrupt {
        req: u64,
    },
    /// Run `/bin/sh -c cmd`.
    Command {
        req: u64,
        cmd: String,
        cwd: Option<String>,
        env: BTreeMap<String, String>,
        /// A stdin pipe (fed by `CommandInput`) instead of `/dev/null`.
        stdin: bool,
    },
    /// SIGKILL to the process group of the command with this pid.
    KillCommand {
        req: u64,
        pid: u32,
    },
    /// The payload goes to the stdin of the command with this pid (queued
    /// while its pipe is full); `eof` closes it after that.
    CommandInput {
        req: u64,
        pid: u32,
        eof: bool,
    },
    /// Write the payload to `path` (create or truncate, or append).
    Write {
        req: u64,
        path: String,
        append: bool,
        mode: Option<u32>,
    },
    /// Read up to `length` bytes at `offset`.
    Read {
        req: u64,
        path: String,
        offset: u64,
        length: u64,
    },
    List {
        req: u64,
        path: String,
    },
    Remove {
        req: u64,
        path: String,
    },
    MakeDir {
        req: u64,
        path: String,
    },
    Stat {
        req: u64,
        path: String,
    },
    /// Fork a copy of the interpreter into each target (queued behind a
    /// running cell, like one). `same_seed` keeps the PRNG states; `force`
    /// branches although the interpreter runs threads of its own.
    Branch {
        req: u64,
        targets: Vec<BranchTarget>,
        same_seed: bool,
        force: bool,
    },
    /// (A branch's executor.) Answer once the copied interpreter arrived.
    Adopt {
        req: u64,
    },
    /// Keep a frozen copy of the interpreter and the scratch as checkpoint
    /// `id` (queued behind a running cell, like one); answered
    /// [`FromExecutor::Checkpointed`].
    Checkpoint {
        req: u64,
        id: String,
        force: bool,
    },
    /// Replace the interpreter, the session's other processes and the
    /// scratch with checkpoint `id`'s (queued like a cell); answered `done`.
    Restore {
        req: u64,
        id: String,
    },
    /// Drop checkpoint `id`; answered `done`.
    DropCheckpoint {
        req: u64,
        id: String,
    },
    /// The session ended while branches of it live: end its interpreter,
    /// commands, checkpoints and processes of its uid, empty its scratch,
    /// and stay only as their pid namespace's init; answered `done`.
    Retire {
        req: u64,
        /// Checkpoints to keep (and their processes): the session ended
        /// with kept checkpoints and may be restored.
        #[serde(default)]
        keep: Vec<String>,
    },
}

/// One directory entry, as the executor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEntry {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub modified_ms: u64,
}

/// A cell's exception.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecError {
    pub name: String,
    pub value: String,
    pub traceback: String,
}

/// A rich value (MIME type → data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDisplay {
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub main: bool,
}

/// Session executor → daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromExecutor {
    /// Output of cell or command `req`; the payload is the bytes.
    Output {
        req: u64,
        stream: ExecStream,
    },
    /// A value cell `req` displayed.
    Display {
        req: u64,
        display: ExecDisplay,
    },
    /// Cell `req` ended.
    CellDone {
        req: u64,
        execution_count: u64,
        text: Option<String>,
        results: Vec<ExecDisplay>,
        error: Option<ExecError>,
        stdout_truncated: bool,
        stderr_truncated: bool,
    },
    /// Command `req` runs as `pid`.
    CommandStarted {
        req: u64,
        pid: u32,
    },
    /// Command `req` ended.
    CommandDone {
        req: u64,
        exit_code: Option<i32>,
        signal: Option<i32>,
        stdout_truncated: bool,
        stderr_truncated: bool,
    },
    /// File bytes (the payload) for read `req`.
    Data {
        req: u64,
        offset: u64,
        size: u64,
        eof: bool,
    },
    Entries {
        req: u64,
        entries: Vec<ExecEntry>,
    },
    Stat {
        req: u64,
        entry: ExecEntry,
    },
    /// Request `req` succeeded with nothing to return.
    Done {
        req: u64,
    },
    /// Branch request `req` ended: one outcome per target, in order (or
    /// `error` for all of them).
    Branched {
        req: u64,
        outcomes: Vec<BranchOutcome>,
        error: Option<String>,
    },
    /// The copied interpreter arrived; its pid in the branch.
    Adopted {
        req: u64,
        pid: i32,
    },
    /// Checkpoint request `req` is kept: its scratch copy holds
    /// `scratch_bytes`.
    Checkpointed {
        req: u64,
        scratch_bytes: u64,
    },
    /// Request `req` failed: `code` is `not_found`, `file_error`,
    /// `invalid` or (checkpoints) `unknown_checkpoint`.
    Failed {
        req: u64,
        code: String,
        message: String,
    },
}

impl FromExecutor {
    /// The request this message answers.
    pub fn req(&self) -> u64 {
        match self {
            FromExecutor::Output { req, .. }
            | FromExecutor::Display { req, .. }
            | FromExecutor::CellDone { req, .. }
            | FromExecutor::CommandStarted { req, .. }
            | FromExecutor::CommandDone { req, .. }
            | FromExecutor::Data { req, .. }
            | FromExecutor::Entries { req, .. }
            | FromExecutor::Stat { req, .. }
            | FromExecutor::Done { req }
            | FromExecutor::Branched { req, .. }
            | FromExecutor::Adopted { req, .. }
            | FromExecutor::Checkpointed { req, .. }
            | FromExecutor::Failed { req, .. } => *req,
        }
    }

    /// Whether this is the last message for its request.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            FromExecutor::Output { .. }
                | FromExecutor::Display { .. }
                | FromExecutor::CommandStarted { .. }
        )
    }
}

/// stdout or stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStream {
    Stdout,
    Stderr,
}

/// An executor frame: 4-byte big-endian JSON length, 4-byte big-endian
/// payload length, the JSON, the payload (file data and output travel raw,
/// not base64).
pub fn exec_frame(header: &impl Serialize, payload: &[u8]) -> Result<Vec<u8>, JobError> {
    let json = serde_json::to_vec(header)?;
    if json.len() > MAX_EXEC_HEADER || payload.len() > MAX_EXEC_PAYLOAD {
        return Err(JobError::TooLarge(json.len() + payload.len()));
    }
    let mut frame = Vec::with_capacity(8 + json.len() + payload.len());
    // Both fit u32: bounded just above.
    frame.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&json);
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// An executor stream that breaks the framing: the session is killed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecDecodeError {
    #[error("executor frame of {header} + {payload} bytes is over the limit")]
    TooLarge { header: usize, payload: usize },
    #[error("executor message is not valid: {0}")]
    Json(String),
}

/// Decodes [`FromExecutor`] frames incrementally (sans I/O): feed reads of
/// any size, take complete messages with their payloads.
#[derive(Debug, Default)]
pub struct ExecDecoder {
    buf: Vec<u8>,
}

impl ExecDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes; returns every message they complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(FromExecutor, Vec<u8>)>, ExecDecodeError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            if rest.len() < 8 {
                break;
            }
            let header = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let payload = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            if header > MAX_EXEC_HEADER || payload > MAX_EXEC_PAYLOAD {
                return Err(ExecDecodeError::TooLarge { header, payload });
            }
            if rest.len() < 8 + header + payload {
                break;
            }
            let msg: FromExecutor = serde_json::from_slice(&rest[8..8 + header])
                .map_err(|e| ExecDecodeError::Json(e.to_string()))?;
            out.push((msg, rest[8 + header..8 + header + payload].to_vec()));
            at += 8 + header + payload;
        }
        self.buf.drain(..at);
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the job is {0} bytes encoded; a job frame holds at most 4 GiB (send large data as stdin or files in several requests)")]
    TooLarge(usize),
    #[error("the job could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Job {
    /// The job frame: a 4-byte big-endian length, then the JSON. The
    /// program's stdin follows on the same pipe, unframed.
    pub fn frame(&self) -> Result<Vec<u8>, JobError> {
        let json = serde_json::to_vec(self)?;
        let len = u32::try_from(json.len()).map_err(|_| JobError::TooLarge(json.len()))?;
        let mut frame = Vec::with_capacity(4 + json.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&json);
        Ok(frame)
    }
}

/// One report on the status pipe. Tags are single bytes:
/// `E<message to EOF>`, `S`, `K<signal byte>`, `X<exit code byte>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusReport {
    /// Setup failed before the program started; the message runs to EOF.
    SetupFailed(String),
    /// Isolation is complete; the program starts now.
    Started,
    /// The program (pid 1 of its namespace) is dying of a signal it sent
    /// itself, which the kernel would otherwise ignore for an init.
    SelfSignal(u8),
    /// The program finished with this exit code; stdout and stderr are closed.
    Finished(u8),
}

pub const TAG_SETUP_FAILED: u8 = b'E';
pub const TAG_STARTED: u8 = b'S';
pub const TAG_SELF_SIGNAL: u8 = b'K';
pub const TAG_FINISHED: u8 = b'X';

impl StatusReport {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            StatusReport::SetupFailed(m) => {
                let mut v = vec![TAG_SETUP_FAILED];
                v.extend_from_slice(m.as_bytes());
                v
            }
            StatusReport::Started => vec![TAG_STARTED],
            StatusReport::SelfSignal(s) => vec![TAG_SELF_SIGNAL, *s],
            StatusReport::Finished(c) => vec![TAG_FINISHED, *c],
        }
    }
}

/// A status stream that breaks the grammar (user code can write fd 3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("status report {tag:#04x} is not a known tag")]
    UnknownTag { tag: u8 },
    #[error("status report before the program started: {tag:#04x}")]
    BeforeStart { tag: u8 },
    #[error("status reports after the program finished")]
    AfterFinish,
}

/// What the status pipe said, decoded incrementally: feed reads of any size
/// (a tag and its byte may arrive in different reads), then [`Self::end`] at EOF.
#[derive(Debug, Default)]
pub struct StatusDecoder {
    state: DecodeState,
    setup_failed: bool,
    setup_message: Vec<u8>,
    started: bool,
    self_signal: Option<u8>,
    finished: Option<u8>,
    error: Option<StatusError>,
    /// Bytes the decoder accepted (bounded by [`MAX_STATUS_BYTES`]).
    seen: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum DecodeState {
    #[default]
    First,
    /// Inside `E...`: everything to EOF is the message.
    SetupMessage,
    /// Between reports, after `S`.
    Tag,
    /// The tag's payload byte is next.
    Payload(u8),
    /// Nothing more is accepted (finished, or the stream broke the grammar).
    Closed,
}

impl StatusDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `bytes`; returns the reports completed by them, in order.
    /// After a grammar violation everything further is ignored and
    /// [`Self::error`] says what broke.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<StatusReport> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.seen >= MAX_STATUS_BYTES {
                break;
            }
            self.seen += 1;
            self.state = match self.state {
                DecodeState::First => match b {
                    TAG_SETUP_FAILED => {
                        self.setup_failed = true;
                        DecodeState::SetupMessage
                    }
                    TAG_STARTED => {
                        self.started = true;
                        out.push(StatusReport::Started);
                        DecodeState::Tag
                    }
                    tag => self.broken(StatusError::BeforeStart { tag }),
                },
                DecodeState::SetupMessage => {
                    self.setup_message.push(b);
                    DecodeState::SetupMessage
                }
                DecodeState::Tag => match b {
                    TAG_SELF_SIGNAL | TAG_FINISHED => DecodeState::Payload(b),
                    tag => self.broken(StatusError::UnknownTag { tag }),
                },
                DecodeState::Payload(TAG_SELF_SIGNAL) => {
                    self.self_signal = Some(b);
                    out.push(StatusReport::SelfSignal(b));
                    DecodeState::Tag
                }
                DecodeState::Payload(_) => {
                    self.finished = Some(b);
                    out.push(StatusReport::Finished(b));
                    DecodeState::Closed
                }
                DecodeState::Closed => {
                    if self.error.is_none() && self.finished.is_some() {
                        self.error = Some(StatusError::AfterFinish);
                    }
                    DecodeState::Closed
                }
            };
        }
        out
    }

    fn broken(&mut self, e: StatusError) -> DecodeState {
        self.error.get_or_insert(e);
        DecodeState::Closed
    }

    /// The stream ended (EOF): a pending setup error is complete now.
    pub fn end(&mut self) -> Option<StatusReport> {
        if self.state == DecodeState::SetupMessage {
            self.state = DecodeState::Closed;
            return Some(StatusReport::SetupFailed(self.setup_failure()?));
        }
        None
    }

    /// The setup error, once `E` was seen (complete only after [`Self::end`]).
    pub fn setup_failure(&self) -> Option<String> {
        self.setup_failed
            .then(|| String::from_utf8_lossy(&self.setup_message).into_owned())
    }

    pub fn started(&self) -> bool {
        self.started
    }

    pub fn self_signal(&self) -> Option<u8> {
        self.self_signal
    }

    pub fn finished(&self) -> Option<u8> {
        self.finished
    }

    pub fn error(&self) -> Option<&StatusError> {
        self.error.as_ref()
    }

    /// Whether nothing at all arrived (the child died before reporting).
    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(stream: &[u8], split: &[usize]) -> (StatusDecoder, Vec<StatusReport>) {
        let mut d = StatusDecoder::new();
        let mut reports = Vec::new();
        let mut at = 0;
        for &s in split.iter().chain(std::iter::once(&stream.len())) {
            reports.extend(d.feed(&stream[at..s]));
            at = s;
        }
        reports.extend(d.end());
        (d, reports)
    }

    #[test]
    fn every_split_of_a_stream_decodes_the_same() {
        let stream = b"SK\x58K\x06X\x07";
        let whole = decode_in_pieces(stream, &[]).1;
        assert_eq!(
            whole,
            vec![
                StatusReport::Started,
                StatusReport::SelfSignal(0x58),
                StatusReport::SelfSignal(6),
                StatusReport::Finished(7)
            ]
        );
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let (d, r) = decode_in_pieces(stream, &[a, b]);
                assert_eq!(r, whole, "split at {a},{b}");
                assert_eq!(d.finished(), Some(7));
                assert_eq!(d.self_signal(), Some(6));
                assert!(d.error().is_none());
            }
        }
    }

    #[test]
    fn the_exit_code_waits_for_its_byte() {
        let mut d = StatusDecoder::new();
        assert_eq!(d.feed(b"S"), vec![StatusReport::Started]);
        assert_eq!(d.feed(b"X"), vec![]);
        assert_eq!(d.finished(), None);
        assert_eq!(d.feed(b"\x00"), vec![StatusReport::Finished(0)]);
    }

    #[test]
    fn a_setup_error_runs_to_eof() {
        let (d, r) = decode_in_pieces(b"Eisolation failed: SX\x00", &[3, 10]);
        assert_eq!(
            r,
            vec![StatusReport::SetupFailed(
                "isolation failed: SX\u{0}".into()
            )]
        );
        assert!(!d.started());
        assert_eq!(d.finished(), None, "tags inside the message are text");
    }

    #[test]
    fn grammar_violations_are_errors_not_reports() {
        let (d, r) = decode_in_pieces(b"x", &[]);
        assert!(r.is_empty());
        assert_eq!(d.error(), Some(&StatusError::BeforeStart { tag: b'x' }));
        let (d, r) = decode_in_pieces(b"SZX\x00", &[]);
        assert_eq!(r, vec![StatusReport::Started]);
        assert_eq!(d.finished(), None, "nothing after a violation is believed");
        assert_eq!(d.error(), Some(&StatusError::UnknownTag { tag: b'Z' }));
        let (d, _) = decode_in_pieces(b"SX\x00X\x01", &[]);
        assert_eq!(d.finished(), Some(0), "the first exit report stands");
        assert_eq!(d.error(), Some(&StatusError::AfterFinish));
        let (d, r) = decode_in_pieces(b"", &[]);
        assert!(r.is_empty() && d.is_empty());
    }

    #[test]
    fn the_decoder_keeps_a_bounded_amount() {
        let mut d = StatusDecoder::new();
        let flood = vec![b'a'; MAX_STATUS_BYTES * 3];
        d.feed(b"E");
        d.feed(&flood);
        let msg = d.end();
        match msg {
            Some(StatusReport::SetupFailed(m)) => assert_eq!(m.len(), MAX_STATUS_BYTES - 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reports_round_trip() {
        for r in [
            StatusReport::Started,
            StatusReport::SelfSignal(9),
            StatusReport::Finished(255),
        ] {
            let mut d = StatusDecoder::new();
            if r != StatusReport::Started {
                d.feed(b"S");
            }
            assert_eq!(d.feed(&r.encode()), vec![r]);
        }
    }

    #[test]
    fn job_frames_carry_their_length() {
        let job = Job {
            program: JobProgram::Code("print(1)".into()),
            argv: vec!["a".into()],
            env: BTreeMap::from([("K".into(), "V".into())]),
            files: vec![],
            session: None,
            line_buffered: vec!["stdout".into()],
        };
        let frame = job.frame().expect("frame");
        let len = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(len, frame.len() - 4);
        let back: Job = serde_json::from_slice(&frame[4..]).expect("json");
        assert_eq!(back, job);
        let v: serde_json::Value = serde_json::from_slice(&frame[4..]).expect("json");
        // The module variant's shape, as forkd_zygote.py reads it.
        assert_eq!(
            serde_json::to_value(JobProgram::Module("json.tool".into())).expect("json"),
            serde_json::json!({"module": "json.tool"})
        );
        assert_eq!(
            v["program"]["code"], "print(1)",
            "the shape forkd_zygote.py reads"
        );
    }

    #[test]
    fn control_messages_have_the_shapes_the_python_side_speaks() {
        let spawn = ToZygote::Spawn {
            id: 7,
            spec: "{}".into(),
            parked: true,
            branch: false,
        };
        let v: serde_json::Value = serde_json::from_slice(&spawn.encode()).expect("json");
        assert_eq!(v["op"], "spawn");
        assert_eq!(v["id"], 7);
        assert_eq!(v["spec"], "{}");
        assert_eq!(v["parked"], true);
        assert_eq!(&ToZygote::Drain.encode(), br#"{"op":"drain"}"#);
        assert_eq!(
            FromZygote::decode(
                br#"{"op":"exited","id":3,"status":256,"utime_us":1,"stime_us":2,"maxrss_kb":3}"#
            )
            .expect("exited"),
            FromZygote::Exited {
                id: 3,
                exited: Exited {
                    status: 256,
                    utime_us: 1,
                    stime_us: 2,
                    maxrss_kb: 3
                }
            }
        );
        assert!(FromZygote::decode(br#"{"op":"forged"}"#).is_err());
    }

    #[test]
    fn executor_frames_decode_in_any_split() {
        let a = exec_frame(
            &FromExecutor::Output {
                req: 3,
                stream: ExecStream::Stdout,
            },
            b"hello\n",
        )
        .expect("frame");
        let b = exec_frame(&FromExecutor::Done { req: 4 }, b"").expect("frame");
        let stream = [a, b].concat();
        for split in 0..=stream.len() {
            let mut d = ExecDecoder::new();
            let mut got = d.feed(&stream[..split]).expect("first part");
            got.extend(d.feed(&stream[split..]).expect("second part"));
            assert_eq!(got.len(), 2, "split at {split}");
            assert_eq!(got[0].1, b"hello\n");
            assert_eq!(got[0].0.req(), 3);
            assert!(!got[0].0.is_final());
            assert_eq!(got[1].0, FromExecutor::Done { req: 4 });
        }
    }

    #[test]
    fn executor_frames_over_the_limits_are_errors() {
        let mut d = ExecDecoder::new();
        let mut frame = (u32::try_from(MAX_EXEC_HEADER).expect("fits") + 1)
            .to_be_bytes()
            .to_vec();
        frame.extend_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            d.feed(&frame),
            Err(ExecDecodeError::TooLarge { .. })
        ));
        let mut d = ExecDecoder::new();
        let frame = [&2u32.to_be_bytes()[..], &0u32.to_be_bytes()[..], b"{}"].concat();
        assert!(matches!(d.feed(&frame), Err(ExecDecodeError::Json(_))));
        assert!(exec_frame(
            &FromExecutor::Done { req: 1 },
            &vec![0; MAX_EXEC_PAYLOAD + 1]
        )
        .is_err());
    }

    /// The shapes the Python executor reads and writes.
    #[test]
    fn executor_messages_have_the_python_shapes() {
        let cell = serde_json::to_value(ToExecutor::Cell {
            req: 1,
            code: "1+1".into(),
        })
        .expect("json");
        assert_eq!(
            cell,
            serde_json::json!({"op": "cell", "req": 1, "code": "1+1"})
        );
        let done: FromExecutor = serde_json::from_value(serde_json::json!({
            "op": "cell_done", "req": 1, "execution_count": 1, "text": "2",
            "results": [{"data": {"text/plain": "2"}, "main": true}], "error": null,
            "stdout_truncated": false, "stderr_truncated": false
        }))
        .expect("cell_done");
        assert_eq!(done.req(), 1);
        assert!(done.is_final());
    }

    /// The Python half declares the same version (it refuses a daemon that
    /// speaks another, and this keeps the two sources from drifting).
    #[test]
    fn the_python_zygote_speaks_this_wire_version() {
        let line = crate::ZYGOTE_PY
            .lines()
            .find(|l| l.starts_with("WIRE_VERSION = "))
            .expect("forkd_zygote.py declares WIRE_VERSION");
        assert_eq!(line, format!("WIRE_VERSION = {WIRE_VERSION}"));
        for (name, tag) in [
            ("TAG_SETUP_FAILED", TAG_SETUP_FAILED),
            ("TAG_STARTED", TAG_STARTED),
            ("TAG_SELF_SIGNAL", TAG_SELF_SIGNAL),
            ("TAG_FINISHED", TAG_FINISHED),
        ] {
            let want = format!("{name} = b\"{}\"", tag as char);
            assert!(
                crate::ZYGOTE_PY.lines().any(|l| l == want),
                "forkd_zygote.py lacks `{want}`"
            );
        }
    }
}
