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

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::{InitConfig, InitInfo};

/// Version of the daemon–zygote–child wire. Bump on any incompatible change
/// to a type in this module (and to `WIRE_VERSION` in `forkd_zygote.py`).
pub const WIRE_VERSION: u32 = 2;

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
