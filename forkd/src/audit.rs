//! The audit log: one JSON line per spawn request (and per refused
//! connection), appended to a file the operator names.
//!
//! Records are built when a request completes and handed to a dedicated
//! writer thread through a bounded channel with a non-blocking send, so a
//! slow disk never delays a reply (when the channel is full the record is
//! sent after the reply, and the finished request's task waits, never the
//! client). The file is opened `O_APPEND` (mode 0640
//! when created) and reopened when it is renamed or removed (log rotation).
//! Write errors are logged and counted, never fatal.
//!
//! Without `audit_payloads` a record holds no user data: no code, script
//! path, argv, env, stdin, output or error message, only their sizes.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use forkd_ipc::{ErrorReply, Limits, Program, SpawnRequest, SpawnResult};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Records queued for the writer before finished requests wait for it.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot open audit log {path}: {source} (fix the directory's permissions or change audit_log)"
)]
pub struct AuditOpenError {
    path: PathBuf,
    source: std::io::Error,
}

/// The connecting process, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// What was asked for (limits as requested, before defaults).
#[derive(Debug, Clone, Serialize)]
pub struct Requested {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zygote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub limits: Limits,
    pub program: &'static str,
    pub code_bytes: usize,
    pub stdin_bytes: usize,
    pub files: usize,
    pub argv: usize,
    pub env: usize,
    /// The network allowlist asked for (destinations, not payload).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_net: Vec<String>,
}

/// The user data of a request and its result, recorded only with `audit_payloads`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Payloads {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    pub argv: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub stdin_b64: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `spawn` or `refused_connection`.
    pub event: &'static str,
    pub peer: Peer,
    /// Daemon-wide connection number (request ids are only unique per connection).
    pub connection: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<u64>,
    /// The zygote that served it (or the configured one the request resolved to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zygote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested: Option<Requested>,
    /// Limits the sandbox ran with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<forkd_ipc::AppliedLimits>,
    /// `ok`, `exit_nonzero`, `killed`, `error` (spawns); `refused`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub killed_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payloads: Option<Payloads>,
    /// Egress counters and connection log (requests with `allow_net`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Box<forkd_ipc::NetworkReport>>,
    /// The session (`session_created`, `session_ended`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Cells a session ran (`session_ended`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells: Option<u64>,
    /// A session's network allowlist in force (when it has one, and on
    /// `session_network_changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_net: Option<Vec<String>>,
    /// The session a branch was copied from (`session_branch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The checkpoint taken, restored or deleted (`session_checkpointed`,
    /// `session_restored`, `session_checkpoint_deleted`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

impl Record {
    /// A session's start or end: `event` is `session_created` or
    /// `session_ended`; `outcome` is `ok` or why it ended (`killed`, `ttl`,
    /// `idle`, `died`, `shutdown`).
    pub fn session(
        event: &'static str,
        peer: Peer,
        info: &forkd_ipc::SessionInfo,
        outcome: &'static str,
    ) -> Record {
        let mut r = Record::refused(peer, 0);
        r.event = event;
        r.error = None;
        r.outcome = outcome;
        r.zygote = Some(info.zygote.clone());
        r.limits = Some(info.limits.clone());
        r.warm = Some(info.warm);
        r.session = Some(info.session.clone());
        r.parent = info.parent.clone();
        if !info.allow_net.is_empty() || event == "session_network_changed" {
            r.allow_net = Some(info.allow_net.clone());
        }
        if event == "session_ended" {
            r.cells = Some(info.cells);
            r.duration_ms = Some(info.age_ms as f64);
            r.killed_by = info
                .killed_by
                .map(|k| crate::metrics::killed_by_label(Some(k)));
        }
        r
    }

    /// A refused connection.
    pub fn refused(peer: Peer, connection: u64) -> Record {
        Record {
            time: rfc3339_utc(SystemTime::now()),
            event: "refused_connection",
            peer,
            connection,
            request_id: None,
            sandbox: None,
            zygote: None,
            policy: None,
            requested: None,
            limits: None,
            outcome: "refused",
            exit_code: None,
            signal: None,
            killed_by: None,
            error: Some("permission_denied"),
            warm: None,
            stdout_bytes: None,
            stderr_bytes: None,
            duration_ms: None,
            payloads: None,
            network: None,
            session: None,
            cells: None,
            allow_net: None,
            parent: None,
            checkpoint: None,
        }
    }

    /// The part of a spawn record known from the request alone (taken
    /// before the request is consumed; payloads copied only if asked).
    pub fn request(
        peer: Peer,
        connection: u64,
        request_id: u64,
        req: &SpawnRequest,
        with_payloads: bool,
    ) -> Record {
        let (program, code_bytes) = match &req.program {
            Program::Code(c) => ("code", c.len()),
            Program::Script(_) => ("script", 0),
            Program::Module(_) => ("module", 0),
        };
        let requested = Requested {
            // Names as the client wrote them are free text: kept below only
            // when they turn out to be configured ones (or with payloads).
            zygote: req.zygote.clone(),
            policy: req.policy.clone(),
            timeout_ms: req.timeout_ms,
            limits: req.limits.clone(),
            program,
            code_bytes,
            stdin_bytes: req.stdin.len(),
            files: req.files.len(),
            argv: req.argv.len(),
            env: req.env.len(),
            allow_net: req.allow_net.clone(),
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let payloads = with_payloads.then(|| Payloads {
            code: match &req.program {
                Program::Code(c) => Some(c.clone()),
                _ => None,
            },
            script: match &req.program {
                Program::Script(s) => Some(s.clone()),
                _ => None,
            },
            module: match &req.program {
                Program::Module(m) => Some(m.clone()),
                _ => None,
            },
            argv: req.argv.clone(),
            env: req.env.clone(),
            stdin_b64: b64.encode(&req.stdin),
            ..Payloads::default()
        });
        Record {
            time: String::new(),
            event: "spawn",
            peer,
            connection,
            request_id: Some(request_id),
            sandbox: None,
            zygote: None,
            policy: None,
            requested: Some(requested),
            limits: None,
            outcome: "error",
            exit_code: None,
            signal: None,
            killed_by: None,
            error: None,
            warm: None,
            stdout_bytes: None,
            stderr_bytes: None,
            duration_ms: None,
            payloads,
            network: None,
            session: None,
            cells: None,
            allow_net: None,
            parent: None,
            checkpoint: None,
        }
    }

    /// Completes a [`Record::request`] with how it ended. `zygote` and
    /// `policy` are the configured names the request resolved to, if any.
    pub fn complete(
        mut self,
        zygote: Option<String>,
        policy: Option<String>,
        outcome: &Result<SpawnResult, ErrorReply>,
        elapsed: Duration,
    ) -> Record {
        self.time = rfc3339_utc(SystemTime::now());
        self.duration_ms = Some(elapsed.as_micros() as f64 / 1e3);
        let with_payloads = self.payloads.is_some();
        if let Some(r) = self.requested.as_mut() {
            if !with_payloads {
                if zygote.is_none() {
                    r.zygote = None;
                }
                if policy.is_none() {
                    r.policy = None;
                }
            }
        }
        self.zygote = zygote;
        self.policy = policy;
        let b64 = base64::engine::general_purpose::STANDARD;
        match outcome {
            Ok(r) => {
                self.sandbox = Some(r.sandbox);
                self.zygote = Some(r.zygote.clone());
                self.limits = Some(r.limits.clone());
                self.outcome = crate::metrics::outcome(r);
                self.exit_code = r.exit_code;
                self.signal = r.signal;
                self.killed_by = r
                    .killed_by
                    .map(|k| crate::metrics::killed_by_label(Some(k)));
                self.warm = Some(r.warm);
                self.network = r.network.clone();
                self.stdout_bytes = Some(r.stdout.len());
                self.stderr_bytes = Some(r.stderr.len());
                if let Some(p) = self.payloads.as_mut() {
                    p.stdout_b64 = Some(b64.encode(&r.stdout));
                    p.stderr_b64 = Some(b64.encode(&r.stderr));
                }
            }
            Err(e) => {
                self.outcome = "error";
                self.error = Some(crate::metrics::error_code_label(e.code));
                if let Some(p) = self.payloads.as_mut() {
                    p.error_message = Some(e.message.clone());
                }
            }
        }
        self
    }
}

/// The daemon's handle on the audit log.
pub struct AuditLog {
    tx: Mutex<Option<mpsc::Sender<Box<Record>>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub payloads: bool,
}

impl AuditLog {
    /// Opens (creating) `path` and starts the writer thread.
    pub fn open(
        path: &Path,
        payloads: bool,
        metrics: Arc<Metrics>,
    ) -> Result<AuditLog, AuditOpenError> {
        let file = open_append(path).map_err(|source| AuditOpenError {
            path: path.to_path_buf(),
            source,
        })?;
        if let Ok(meta) = file.metadata() {
            if meta.mode() & 0o004 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o777), "the audit log is world-readable; chmod o-r it");
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let path = path.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("forkd-audit".into())
            .spawn(move || write_loop(path, file, rx, metrics))
            .map_err(|source| AuditOpenError {
                path: PathBuf::from("(writer thread)"),
                source,
            })?;
        Ok(AuditLog {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            payloads,
        })
    }

    /// Queues a record; waits only if the writer is [`QUEUE`] records behind.
    pub async fn record(&self, record: Box<Record>) {
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        if let Some(tx) = tx {
            let _ = tx.send(record).await;
        }
    }

    /// Queues a record if there is room at once; gives it back otherwise
    /// (dropped silently once the log is closed).
    pub fn try_record(&self, record: Box<Record>) -> Result<(), Box<Record>> {
        let tx = self.tx.lock().ok().and_then(|t| t.clone());
        match tx.map(|tx| tx.try_send(record)) {
            Some(Err(mpsc::error::TrySendError::Full(record))) => Err(record),
            _ => Ok(()),
        }
    }

    /// Stops accepting records and waits for the writer to flush the rest.
    pub async fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)?;
        }
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn write_loop(
    path: PathBuf,
    mut file: std::fs::File,
    mut rx: mpsc::Receiver<Box<Record>>,
    metrics: Arc<Metrics>,
) {
    let mut failing = false;
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.clear();
        let mut push = |r: &Record| {
            if serde_json::to_writer(&mut batch, r).is_ok() {
                batch.push(b'\n');
            }
        };
        push(&first);
        while let Ok(more) = rx.try_recv() {
            push(&more);
        }
        // Rotated away (renamed or removed): start a new file at the path.
        let moved = match (std::fs::metadata(&path), file.metadata()) {
            (Ok(at_path), Ok(open)) => at_path.ino() != open.ino() || at_path.dev() != open.dev(),
            _ => true,
        };
        if moved {
            match open_append(&path) {
                Ok(f) => file = f,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot reopen the audit log: {e}")
                }
            }
        }
        // One write(2) per batch: with O_APPEND each batch lands whole at the end.
        match file.write_all(&batch) {
            Ok(()) => {
                if failing {
                    tracing::info!(path = %path.display(), "audit log writes work again");
                }
                failing = false;
            }
            Err(e) => {
                metrics.record_audit_error();
                if !failing {
                    tracing::error!(path = %path.display(), "audit log write failed (records are lost until it works again): {e}");
                }
                failing = true;
            }
        }
    }
}

/// `2026-11-30T19:32:56.123Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    #[allow(clippy::cast_possible_truncation, reason = "day 1-31 by construction")]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    #[allow(
        clippy::cast_possible_truncation,
        reason = "month 1-12 by construction"
    )]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = |s: u64, ms: u64| {
            rfc3339_utc(SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn records_carry_no_payload_unless_asked() {
        let req = SpawnRequest {
            program: Program::Code("print('secret-code')".into()),
            stdin: b"secret-stdin".to_vec(),
            argv: vec!["secret-arg".into()],
            env: [("SECRET_ENV".to_string(), "v".to_string())].into(),
            zygote: Some("secret-zygote-name".into()),
            ..SpawnRequest::default()
        };
        let err: Result<SpawnResult, ErrorReply> = Err(ErrorReply {
            code: forkd_ipc::ErrorCode::UnknownZygote,
            message: "no zygote named `secret-zygote-name`".into(),
        });
        let peer = Peer {
            uid: 1000,
            gid: 1000,
            pid: Some(42),
        };
        let plain =
            Record::request(peer, 1, 7, &req, false).complete(None, None, &err, Duration::ZERO);
        let line = serde_json::to_string(&plain).unwrap();
        assert!(!line.contains("secret"), "{line}");
        assert!(line.contains(r#""error":"unknown_zygote""#), "{line}");
        assert!(line.contains(r#""code_bytes":20"#), "{line}");
        let full =
            Record::request(peer, 1, 7, &req, true).complete(None, None, &err, Duration::ZERO);
        let line = serde_json::to_string(&full).unwrap();
        for s in [
            "secret-code",
            "secret-arg",
            "SECRET_ENV",
            "secret-zygote-name",
        ] {
            assert!(line.contains(s), "{s} missing: {line}");
        }
    }
}
