//! One sandbox, from request to result.
//!
//! The daemon prepares everything the child needs (cgroup, pipes, the job in
//! the job pipe) — or takes a child the warm pool prepared — then watches: stdout/stderr are read into
//! bounded buffers, the status pipe tells when isolation finished (or why it
//! failed), and the zygote reports the exit. A timeout, an output flood or a
//! shutdown kills the sandbox's init through its pidfd, which takes its whole
//! pid namespace down with it. The reply goes out before the cgroup is removed.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use forkd_ipc::{
    AppliedLimits, ErrorCode, ErrorReply, KilledBy, Program, SpawnRequest, SpawnResult, Timings,
    Usage,
};
use forkd_pool::{ChildPlan, Exited, PoolError, PrepareError, ZygoteError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::config::{resolve, Resolved};
use crate::daemon::Daemon;
use forkd_pool::kill_pidfd;

/// How long a killed sandbox may take to be reported before the request fails.
const KILL_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the init's exit the output pipes may stay open.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ErrorReply {
    error(ErrorCode::Internal, format!("{what}: {e}"))
}

fn pool_error(e: PoolError) -> ErrorReply {
    match e {
        PoolError::Unknown(name) => error(
            ErrorCode::UnknownZygote,
            format!("no zygote named `{name}`"),
        ),
        PoolError::ShuttingDown(_) => error(ErrorCode::ShuttingDown, e.to_string()),
        PoolError::Unavailable(z) => zygote_error(z),
    }
}

fn zygote_error(e: ZygoteError) -> ErrorReply {
    let code = match e {
        ZygoteError::Spawn { .. } => ErrorCode::SpawnFailed,
        _ => ErrorCode::ZygoteUnavailable,
    };
    error(code, e.to_string())
}

/// The environment every program starts with; the request's `env` is laid over it.
fn base_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", "/tmp"),
        ("TMPDIR", "/tmp"),
        ("LANG", "C.UTF-8"),
        ("OPENBLAS_NUM_THREADS", "1"),
        ("OMP_NUM_THREADS", "1"),
        ("MKL_NUM_THREADS", "1"),
    ]
}

/// The isolation plan of a child with `limits` (cgroup limits only where
/// they are enforced).
pub(crate) fn plan_for(policy: String, limits: &AppliedLimits) -> ChildPlan {
    ChildPlan {
        policy,
        scratch_bytes: limits.scratch_bytes,
        open_files: limits.open_files,
        file_size_bytes: limits.file_size_bytes,
        cgroup: if limits.cgroup_enforced {
            forkd_cgroup::Limits {
                memory_bytes: Some(limits.memory_bytes),
                cpus: Some(limits.cpus),
                pids: Some(limits.pids),
            }
        } else {
            forkd_cgroup::Limits::default()
        },
        isolate: true,
    }
}

/// Whether a pooled child made with `pool` can serve a request needing
/// `wanted`: everything applied inside the child must match; cgroup limits are
/// set from outside before the hand-off.
fn same_isolation(pool: &ChildPlan, wanted: &ChildPlan) -> bool {
    pool.policy == wanted.policy
        && pool.scratch_bytes == wanted.scratch_bytes
        && pool.open_files == wanted.open_files
        && pool.file_size_bytes == wanted.file_size_bytes
}

fn prepare_error(e: PrepareError) -> ErrorReply {
    match e {
        PrepareError::Zygote(z) => zygote_error(z),
        // The program did not run; the message names the cgroup file and
        // what to do (e.g. a read-only cgroup filesystem).
        e @ PrepareError::Cgroup(_) => error(ErrorCode::SpawnFailed, e.to_string()),
        other => internal("preparing the sandbox failed", other),
    }
}

/// The job as the child reads it from fd 0: a 4-byte big-endian length, then
/// the JSON (the program's stdin follows on the same pipe).
pub fn job_frame(req: &SpawnRequest) -> Vec<u8> {
    let json = serde_json::to_vec(&job_payload(req)).unwrap_or_default();
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    frame
}

fn job_payload(req: &SpawnRequest) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut env = serde_json::Map::new();
    for (k, v) in base_env() {
        env.insert(k.into(), v.into());
    }
    for (k, v) in &req.env {
        env.insert(k.clone(), v.clone().into());
    }
    let program = match &req.program {
        Program::Code(code) => serde_json::json!({ "code": code }),
        Program::Script(path) => serde_json::json!({ "script": path }),
    };
    let files: Vec<_> = req
        .files
        .iter()
        .map(|f| serde_json::json!({ "path": f.path, "content": b64.encode(&f.content), "mode": f.mode }))
        .collect();
    serde_json::json!({ "program": program, "argv": req.argv, "env": env, "files": files })
}

/// Bounded capture of stdout and stderr, sharing one byte budget.
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

async fn collect_output(
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    limit: u64,
    exceeded: Arc<Notify>,
    flag: Arc<AtomicBool>,
) -> Output {
    let mut out = Output {
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
    };
    let mut streams = [Some(stdout), Some(stderr)];
    let mut buf = vec![0u8; 64 * 1024];
    let mut buf2 = vec![0u8; 64 * 1024];
    let mut used: u64 = 0;
    while streams.iter().any(Option::is_some) {
        // Read whichever pipe has data; a closed one becomes None.
        let (which, n) = {
            let [a, b] = &mut streams;
            tokio::select! {
                r = async { a.as_mut().unwrap().read(&mut buf).await }, if a.is_some() => (0, r),
                r = async { b.as_mut().unwrap().read(&mut buf2).await }, if b.is_some() => (1, r),
            }
        };
        let n = match n {
            Ok(0) | Err(_) => {
                streams[which] = None;
                continue;
            }
            Ok(n) => n,
        };
        let data = if which == 0 { &buf[..n] } else { &buf2[..n] };
        let room = limit.saturating_sub(used) as usize;
        let keep = n.min(room);
        let (dst, truncated) = if which == 0 {
            (&mut out.stdout, &mut out.stdout_truncated)
        } else {
            (&mut out.stderr, &mut out.stderr_truncated)
        };
        dst.extend_from_slice(&data[..keep]);
        used += keep as u64;
        if keep < n {
            *truncated = true;
            flag.store(true, Ordering::Release);
            exceeded.notify_one();
            // Stop reading: the sandbox is being killed, and a flood must not
            // cost the daemon more than the limit.
            break;
        }
    }
    out
}

/// What the child reported on its status pipe so far (see `forkd_zygote.py`):
/// one-byte tags `E<message>` (setup failed), `S` (the program starts),
/// `K<signal>` (the program, pid 1 of its namespace, died of a signal it
/// sent itself) and `X<code>` (the program finished; stdout/stderr closed).
#[derive(Debug, Default)]
struct StatusLog {
    data: Vec<u8>,
    started: Option<Instant>,
}

/// Reads the status pipe to EOF into `log`, firing `finished` with the exit
/// code as soon as an `X` report arrives.
async fn read_status(
    mut status: pipe::Receiver,
    log: Arc<std::sync::Mutex<StatusLog>>,
    finished: tokio::sync::oneshot::Sender<u8>,
) {
    const CAP: usize = 64 * 1024;
    let mut finished = Some(finished);
    let mut buf = [0u8; 4096];
    loop {
        let n = match status.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Ok(mut log) = log.lock() else { return };
        log.started.get_or_insert_with(Instant::now);
        let room = CAP.saturating_sub(log.data.len());
        log.data.extend_from_slice(&buf[..n.min(room)]);
        if let (Some(code), Some(tx)) = (finished_code(&log.data), finished.take_if(|_| true)) {
            let _ = tx.send(code);
        }
        if room == 0 {
            return;
        }
    }
}

/// The exit code of an `X` report following `S`, if one arrived.
fn finished_code(data: &[u8]) -> Option<u8> {
    if data.first() != Some(&b'S') {
        return None;
    }
    let mut i = 1;
    while i + 1 < data.len() {
        match data[i] {
            b'X' => return Some(data[i + 1]),
            b'K' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// The status pipe's reports, interpreted.
#[derive(Debug, PartialEq)]
enum Status {
    /// The pipe closed before the program started.
    DiedInSetup,
    SetupFailed(String),
    /// The program started; `Some(signal)` if it reported dying of one.
    Started(Option<i32>),
}

fn parse_status(data: &[u8]) -> Status {
    match data.first() {
        None => Status::DiedInSetup,
        Some(b'E') => Status::SetupFailed(String::from_utf8_lossy(&data[1..]).into_owned()),
        Some(b'S') => {
            let mut signal = None;
            let mut i = 1;
            while i + 1 < data.len() {
                match data[i] {
                    b'K' => {
                        signal = Some(i32::from(data[i + 1]));
                        i += 2;
                    }
                    b'X' => i += 2,
                    _ => i += 1,
                }
            }
            Status::Started(signal)
        }
        Some(_) => Status::SetupFailed(format!(
            "unexpected status report {:?}",
            String::from_utf8_lossy(&data[..data.len().min(80)])
        )),
    }
}

impl Daemon {
    /// Runs one sandbox. Every failure is an [`ErrorReply`] that says what to do.
    /// `client_gone` turns true when the requesting connection closes: the
    /// sandbox is then killed, since its result could not be delivered.
    pub async fn run_sandbox(
        self: &Arc<Self>,
        req: SpawnRequest,
        mut client_gone: tokio::sync::watch::Receiver<bool>,
    ) -> Result<SpawnResult, ErrorReply> {
        let t0 = Instant::now();
        let Resolved {
            zygote: zygote_name,
            policy,
            limits,
        } = resolve(
            &self.config,
            &req,
            &self.policies,
            self.cgroups.limits_enforced(),
        )?;
        // `None` (no allowlist) costs nothing further: no network, as always.
        let allow = self.network.admit(&req.allow_net)?;
        let mut shutdown = self.shutdown_signal();
        if *shutdown.borrow() {
            return Err(error(
                ErrorCode::ShuttingDown,
                "forkd is shutting down; retry on another daemon",
            ));
        }
        let _slot = tokio::select! {
            permit = self.slots.acquire() => permit.map_err(|_| error(ErrorCode::ShuttingDown, "forkd is shutting down"))?,
            _ = crate::daemon::stopping(&mut shutdown) => return Err(error(ErrorCode::ShuttingDown, "forkd is shutting down")),
        };
        let plan = plan_for(policy, &limits);

        // A warm child if one fits (its cgroup limits can still change);
        // otherwise fork one now.
        let warm_child = self
            .warm
            .get(&zygote_name)
            .filter(|pool| same_isolation(pool.plan(), &plan))
            .and_then(|pool| pool.take());
        let warm = warm_child.is_some();
        let mut child = match warm_child {
            Some(child) => {
                if child.plan.cgroup != plan.cgroup {
                    if let Some(cg) = child.cgroup.get() {
                        cg.set_limits(&plan.cgroup).map_err(|e| {
                            error(
                                ErrorCode::SpawnFailed,
                                format!("cannot set the sandbox's limits: {e}"),
                            )
                        })?;
                    }
                }
                child
            }
            None => {
                // A zygote handed out just before it was recycled may drain
                // and exit before our fork order reaches it: that is ours
                // to retry on its replacement, not the client's.
                let mut retried = false;
                loop {
                    let zygote = self.pool.get(&zygote_name).await.map_err(pool_error)?;
                    let id = self.next_sandbox_id();
                    match forkd_pool::prepare(
                        &zygote,
                        &self.cgroups,
                        self.netns.as_ref().as_ref(),
                        id,
                        plan.clone(),
                    )
                    .await
                    {
                        Ok(child) => break child,
                        Err(_) if !retried && zygote.is_draining() => {
                            retried = true;
                        }
                        Err(e) => return Err(prepare_error(e)),
                    }
                }
            }
        };
        let id = child.sandbox;
        // From here the request owns the child: its timeout starts now.
        let t_forked = if warm { t0 } else { Instant::now() };
        let t_handoff = Instant::now();
        let (Some(job_w), Some(stdout_r), Some(stderr_r), Some(status_r)) = (
            child.job.take(),
            child.stdout.take(),
            child.stderr.take(),
            child.status.take(),
        ) else {
            return Err(error(
                ErrorCode::Internal,
                "a prepared child lacks its pipes",
            ));
        };
        let stdout_rx = receiver(stdout_r)?;
        let stderr_rx = receiver(stderr_r)?;
        let status_rx = receiver(status_r)?;
        let job_tx = sender(job_w)?;
        let cleanup = std::mem::replace(&mut child.cgroup, forkd_pool::CgroupCleanup(None));
        let pidfd = child.pidfd.try_clone().map_err(|e| internal("pidfd", e))?;
        let exited = std::mem::replace(&mut child.exited, tokio::sync::oneshot::channel().1);
        drop(child);
        // Open the allowlist before the job (and so the program) goes in.
        let egress = match allow {
            Some(allow) => match self.network.attach(pidfd.as_fd(), allow).await {
                Ok(e) => Some(e),
                Err(e) => {
                    kill_pidfd(pidfd.as_fd());
                    return Err(e);
                }
            },
            None => None,
        };

        let job = job_frame(&req);
        let stdin = req.stdin;
        let stdin_task = tokio::spawn(async move {
            let mut tx = job_tx;
            // The job, then the program's stdin; EPIPE when the program never
            // reads its stdin is fine.
            if tx.write_all(&job).await.is_ok() {
                let _ = tx.write_all(&stdin).await;
            }
        });
        let exceeded = Arc::new(Notify::new());
        let exceeded_flag = Arc::new(AtomicBool::new(false));
        let output_task = tokio::spawn(collect_output(
            stdout_rx,
            stderr_rx,
            limits.output_bytes,
            exceeded.clone(),
            exceeded_flag.clone(),
        ));
        let status_log = Arc::new(std::sync::Mutex::new(StatusLog::default()));
        let (finished_tx, mut finished_rx) = tokio::sync::oneshot::channel();
        let status_task = tokio::spawn(read_status(status_rx, status_log.clone(), finished_tx));
        // Set when the program reported its exit code itself: the reply then
        // goes out without waiting for the kernel to tear the process down.
        let mut reported_exit: Option<u8> = None;
        let mut watch_finish = true;
        // The client went away: kill, clean up, reply to nobody.
        let mut abandoned = false;

        let deadline =
            tokio::time::Instant::from_std(t_handoff + Duration::from_millis(limits.timeout_ms));
        let mut exited_rx = exited;
        let mut killed_by: Option<KilledBy> = None;
        let exit: Result<Exited, ErrorReply> = loop {
            tokio::select! {
                r = &mut exited_rx => {
                    break match r {
                        Ok(Ok(e)) => Ok(e),
                        Ok(Err(z)) => Err(zygote_error(z)),
                        Err(_) => Err(error(ErrorCode::ZygoteUnavailable, "zygote vanished before reporting the sandbox's exit; retry")),
                    };
                }
                code = &mut finished_rx, if killed_by.is_none() && watch_finish => {
                    match code {
                        Ok(code) => {
                            reported_exit = Some(code);
                            break Ok(Exited {
                                status: i32::from(code) << 8,
                                utime_us: 0,
                                stime_us: 0,
                                maxrss_kb: 0,
                            });
                        }
                        // The status pipe closed without a report: wait for the zygote.
                        Err(_) => watch_finish = false,
                    }
                }
                _ = tokio::time::sleep_until(deadline), if killed_by.is_none() => {
                    killed_by = Some(KilledBy::Timeout);
                    kill_pidfd(pidfd.as_fd());
                }
                _ = exceeded.notified(), if killed_by.is_none() => {
                    killed_by = Some(KilledBy::OutputLimit);
                    kill_pidfd(pidfd.as_fd());
                }
                _ = crate::daemon::stopping(&mut shutdown), if killed_by.is_none() => {
                    killed_by = Some(KilledBy::Shutdown);
                    kill_pidfd(pidfd.as_fd());
                }
                _ = crate::daemon::stopping(&mut client_gone), if !abandoned => {
                    abandoned = true;
                    kill_pidfd(pidfd.as_fd());
                }
                _ = tokio::time::sleep(KILL_REPORT_TIMEOUT), if killed_by.is_some() => {
                    break Err(error(ErrorCode::Internal, "the sandbox did not exit within 10 s of SIGKILL"));
                }
            }
        };
        let t_exit = Instant::now();
        stdin_task.abort();
        if abandoned {
            kill_pidfd(pidfd.as_fd());
            output_task.abort();
            status_task.abort();
            return Err(error(
                ErrorCode::Internal,
                "the client disconnected; the sandbox was killed",
            ));
        }
        let exit = match exit {
            Ok(e) => e,
            Err(e) => {
                // The zygote died or lost track: make sure nothing survives.
                kill_pidfd(pidfd.as_fd());
                output_task.abort();
                status_task.abort();
                return Err(e);
            }
        };
        if reported_exit.is_none() {
            // The process is gone, so its status pipe is at EOF (or about to be).
            let _ = tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, status_task).await;
        }
        let (status, t_started) = match status_log.lock() {
            Ok(log) => (parse_status(&log.data), log.started),
            Err(_) => return Err(error(ErrorCode::Internal, "status log poisoned")),
        };
        if let Status::SetupFailed(msg) = &status {
            output_task.abort();
            return Err(error(
                ErrorCode::SpawnFailed,
                format!("the sandbox could not be set up: {msg}"),
            ));
        }
        let output = match tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, output_task).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(internal("output task", e)),
            Err(_) => return Err(error(
                ErrorCode::Internal,
                "the sandbox's output pipes stayed open after it exited; this is a forkd bug, please report it",
            )),
        };
        if exceeded_flag.load(Ordering::Acquire) && killed_by.is_none() {
            // The flood ended the program before the kill order was taken.
            killed_by = Some(KilledBy::OutputLimit);
        }

        let stats = cleanup
            .get()
            .and_then(|cg| {
                cg.stats()
                    .map_err(|e| tracing::warn!(sandbox = id, "cgroup stats: {e}"))
                    .ok()
            })
            .unwrap_or_default();
        let (mut exit_code, mut signal) = decode_wait_status(exit.status);
        match status {
            // Trusted only when the exit matches what the reporter does.
            Status::Started(Some(sig)) if exit_code == Some(128 + sig) => {
                exit_code = None;
                signal = Some(sig);
            }
            Status::DiedInSetup if killed_by.is_none() && stats.oom_kills == 0 => {
                return Err(error(
                    ErrorCode::SpawnFailed,
                    format!(
                        "the sandbox died while being set up (exit code {exit_code:?}, signal {signal:?}); the daemon's log may say more"
                    ),
                ));
            }
            _ => {}
        }
        if killed_by.is_none() {
            killed_by = if stats.oom_kills > 0 {
                Some(KilledBy::Oom)
            } else if stats.pids_limit_hits > 0 && exit_code != Some(0) {
                Some(KilledBy::Pids)
            } else if signal.is_some() {
                Some(KilledBy::Signal)
            } else {
                None
            };
        }
        let isolated = t_started.unwrap_or(t_exit).min(t_exit).max(t_forked);
        let result = SpawnResult {
            sandbox: id,
            zygote: zygote_name,
            exit_code,
            signal,
            killed_by,
            stdout: output.stdout,
            stderr: output.stderr,
            stdout_truncated: output.stdout_truncated,
            stderr_truncated: output.stderr_truncated,
            timings: Timings {
                total_us: micros(t0.elapsed()),
                fork_us: micros(t_forked - t0),
                isolated_us: micros(isolated - t0),
                run_us: micros(t_exit.saturating_duration_since(isolated)),
            },
            usage: Usage {
                cpu_user_us: stats.cpu_user_us.unwrap_or(exit.utime_us),
                cpu_system_us: stats.cpu_system_us.unwrap_or(exit.stime_us),
                peak_memory_bytes: stats.memory_peak_bytes.unwrap_or(exit.maxrss_kb * 1024),
            },
            limits,
            warm,
            network: egress.map(|e| Box::new(e.finish())),
        };
        if reported_exit.is_some() {
            // The program is done; its init is exiting. Make sure whatever it
            // left running (or a program that only claimed to finish) goes too.
            kill_pidfd(pidfd.as_fd());
        }
        drop(cleanup); // removal happens on a blocking thread, after the reply is built
        Ok(result)
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

fn decode_wait_status(status: i32) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

fn receiver(fd: OwnedFd) -> Result<pipe::Receiver, ErrorReply> {
    pipe::Receiver::from_owned_fd(fd).map_err(|e| internal("register pipe", e))
}

fn sender(fd: OwnedFd) -> Result<pipe::Sender, ErrorReply> {
    pipe::Sender::from_owned_fd(fd).map_err(|e| internal("register pipe", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_decoding() {
        assert_eq!(decode_wait_status(0), (Some(0), None));
        assert_eq!(decode_wait_status(3 << 8), (Some(3), None));
        assert_eq!(decode_wait_status(libc::SIGKILL), (None, Some(9)));
    }

    #[test]
    fn status_reports_are_parsed() {
        assert_eq!(parse_status(b""), Status::DiedInSetup);
        assert_eq!(parse_status(b"Eboom"), Status::SetupFailed("boom".into()));
        assert_eq!(parse_status(b"S"), Status::Started(None));
        assert_eq!(parse_status(b"SK\x06"), Status::Started(Some(6)));
        assert!(matches!(parse_status(b"x"), Status::SetupFailed(_)));
        assert_eq!(parse_status(b"SX\x07"), Status::Started(None));
        assert_eq!(finished_code(b"SX\x07"), Some(7));
        assert_eq!(
            finished_code(b"SK\x58X\x00"),
            Some(0),
            "a K's byte is not a tag"
        );
        assert_eq!(finished_code(b"S"), None);
        assert_eq!(
            finished_code(b"SX"),
            None,
            "the code byte has not arrived yet"
        );
        assert_eq!(
            finished_code(b"EX\x01"),
            None,
            "no report before the program started"
        );
    }

    #[test]
    fn request_env_overrides_the_base() {
        let mut req = SpawnRequest::default();
        req.env.insert("HOME".into(), "/tmp/home".into());
        req.env.insert("X".into(), "1".into());
        let job = job_payload(&req);
        assert_eq!(job["env"]["HOME"], "/tmp/home");
        assert_eq!(job["env"]["X"], "1");
        assert_eq!(job["env"]["LANG"], "C.UTF-8");
    }
}
