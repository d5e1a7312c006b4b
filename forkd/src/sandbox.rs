//! One sandbox, from request to result.
//!
//! The daemon prepares everything the child needs (cgroup, pipes, the job in
//! a memfd), hands it to a zygote, then watches: stdout/stderr are read into
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
    ErrorCode, ErrorReply, KilledBy, Program, SpawnRequest, SpawnResult, Timings, Usage,
};
use forkd_pool::{Exited, PoolError, SpawnFds, ZygoteError};
use forkd_zygote::ChildSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::config::{resolve, Resolved};
use crate::daemon::Daemon;
use crate::sys;

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

/// Reads the child's status pipe to EOF (see `forkd_zygote.py`): tagged
/// one-byte reports `E<message>` (setup failed), `S` (the program starts) and
/// `K<signal>` (the program, pid 1 of its namespace, died of a signal it sent
/// itself). Returns the bytes and when the first one arrived.
async fn read_status(mut status: pipe::Receiver) -> (Vec<u8>, Option<Instant>) {
    const CAP: usize = 64 * 1024;
    let mut data = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 4096];
    while data.len() < CAP {
        match status.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                data.extend_from_slice(&buf[..n.min(CAP - data.len())]);
            }
        }
    }
    (data, first)
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
            let signal = data[1..]
                .windows(2)
                .rev()
                .find(|w| w[0] == b'K')
                .map(|w| i32::from(w[1]));
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
    pub async fn run_sandbox(
        self: &Arc<Self>,
        req: SpawnRequest,
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
        let zygote = self.pool.get(&zygote_name).await.map_err(pool_error)?;
        let id = self.next_sandbox_id();

        let cg_limits = if self.cgroups.limits_enforced() {
            forkd_cgroup::Limits {
                memory_bytes: Some(limits.memory_bytes),
                cpus: Some(limits.cpus),
                pids: Some(limits.pids),
            }
        } else {
            forkd_cgroup::Limits::default()
        };
        let cgroups = self.cgroups.clone();
        let cgroup =
            tokio::task::spawn_blocking(move || cgroups.create(&format!("sb{id}"), &cg_limits))
                .await
                .map_err(|e| internal("cgroup task", e))?
                .map_err(|e| internal("cannot create the sandbox's cgroup", e))?;
        let cleanup = CgroupCleanup(Some(cgroup));

        let (stdin_r, stdin_w) = sys::pipe().map_err(|e| internal("pipe", e))?;
        let (stdout_r, stdout_w) = sys::pipe().map_err(|e| internal("pipe", e))?;
        let (stderr_r, stderr_w) = sys::pipe().map_err(|e| internal("pipe", e))?;
        let (status_r, status_w) = sys::pipe().map_err(|e| internal("pipe", e))?;
        let payload = sys::memfd_with(
            b"forkd-job",
            &serde_json::to_vec(&job_payload(&req)).unwrap_or_default(),
        )
        .map_err(|e| internal("job memfd", e))?;
        let cgroup_ref = cleanup.0.as_ref().expect("cgroup present");
        let spec = ChildSpec {
            policy,
            cgroup_procs: cgroup_ref
                .procs_files()
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            scratch_bytes: limits.scratch_bytes,
            open_files: limits.open_files,
            file_size_bytes: limits.file_size_bytes,
        };
        let spec = serde_json::to_string(&spec).map_err(|e| internal("child spec", e))?;

        // Register our ends with tokio before the fork so a failure leaves
        // nothing half-made.
        let stdout_rx = receiver(stdout_r)?;
        let stderr_rx = receiver(stderr_r)?;
        let status_rx = receiver(status_r)?;
        let stdin_tx = sender(stdin_w)?;

        let forked = zygote
            .spawn(
                id,
                &spec,
                SpawnFds {
                    payload,
                    stdin: stdin_r,
                    stdout: stdout_w,
                    stderr: stderr_w,
                    status: status_w,
                    netns: self.netns.as_ref().and_then(|stock| stock.take()),
                },
            )
            .await
            .map_err(zygote_error)?;
        let t_forked = Instant::now();
        let pidfd = forked.pidfd;

        let stdin = req.stdin;
        let stdin_task = tokio::spawn(async move {
            let mut tx = stdin_tx;
            // EPIPE when the program never reads its stdin is fine.
            let _ = tx.write_all(&stdin).await;
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
        let status_task = tokio::spawn(read_status(status_rx));

        let deadline =
            tokio::time::Instant::from_std(t_forked + Duration::from_millis(limits.timeout_ms));
        let mut exited_rx = forked.exited;
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
                _ = tokio::time::sleep_until(deadline), if killed_by.is_none() => {
                    killed_by = Some(KilledBy::Timeout);
                    sys::kill_pidfd(pidfd.as_fd());
                }
                _ = exceeded.notified(), if killed_by.is_none() => {
                    killed_by = Some(KilledBy::OutputLimit);
                    sys::kill_pidfd(pidfd.as_fd());
                }
                _ = crate::daemon::stopping(&mut shutdown), if killed_by.is_none() => {
                    killed_by = Some(KilledBy::Shutdown);
                    sys::kill_pidfd(pidfd.as_fd());
                }
                _ = tokio::time::sleep(KILL_REPORT_TIMEOUT), if killed_by.is_some() => {
                    break Err(error(ErrorCode::Internal, "the sandbox did not exit within 10 s of SIGKILL"));
                }
            }
        };
        let t_exit = Instant::now();
        stdin_task.abort();
        let exit = match exit {
            Ok(e) => e,
            Err(e) => {
                // The zygote died or lost track: make sure nothing survives.
                sys::kill_pidfd(pidfd.as_fd());
                output_task.abort();
                status_task.abort();
                return Err(e);
            }
        };
        let (status_data, t_started) =
            match tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, status_task).await {
                Ok(Ok(status)) => status,
                Ok(Err(e)) => return Err(internal("status task", e)),
                Err(_) => (Vec::new(), None),
            };
        let status = parse_status(&status_data);
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
            .0
            .as_ref()
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
        };
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

/// Removes the sandbox's cgroup off the request path, whatever way the
/// request ends (including early returns and cancellation).
struct CgroupCleanup(Option<forkd_cgroup::SandboxCgroup>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            let remove = move || {
                if let Err(e) = cg.remove() {
                    tracing::warn!("removing a sandbox cgroup failed: {e}");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn_blocking(remove);
                }
                Err(_) => remove(),
            }
        }
    }
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
