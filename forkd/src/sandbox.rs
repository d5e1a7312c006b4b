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
use forkd_zygote::wire::{StatusDecoder, StatusReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;

use crate::admission::Resolved;
use crate::state::{stopping, State};
use forkd_pool::{kill_pidfd, signal_pidfd};

/// How long a killed sandbox may take to be reported before the request fails.
const KILL_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the init's exit the output pipes may stay open.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> ErrorReply {
    error(ErrorCode::Internal, format!("{what}: {e}"))
}

pub(crate) fn pool_error(e: PoolError) -> ErrorReply {
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
        ("HOME", "/home/user"),
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
        branch: None,
        workspace: None,
    }
}

/// Whether a pooled child made with `pool` can serve a request needing
/// `wanted`: everything applied inside the child must match; cgroup limits are
/// set from outside before the hand-off.
fn same_isolation(pool: &ChildPlan, wanted: &ChildPlan) -> bool {
    // A workspace is mounted while the child is isolated: never pooled.
    wanted.workspace.is_none()
        && pool.policy == wanted.policy
        && pool.scratch_bytes == wanted.scratch_bytes
        && pool.open_files == wanted.open_files
        && pool.file_size_bytes == wanted.file_size_bytes
        // The CPU count it shows (/sys/devices/system/cpu/online) is written
        // at isolation.
        && pool.cpu_count() == wanted.cpu_count()
}

pub(crate) fn prepare_error(e: PrepareError) -> ErrorReply {
    match e {
        PrepareError::Zygote(z) => zygote_error(z),
        // The program did not run; the message names the cgroup file and
        // what to do (e.g. a read-only cgroup filesystem).
        e @ PrepareError::Cgroup(_) => error(ErrorCode::SpawnFailed, e.to_string()),
        other => internal("preparing the sandbox failed", other),
    }
}

/// The job frame the child reads from fd 0 (see [`forkd_zygote::wire::Job`]).
pub fn job_frame(req: &SpawnRequest) -> Result<Vec<u8>, forkd_zygote::wire::JobError> {
    job_for(req).frame()
}

/// The request as the child's job: the base environment with the request's
/// laid over it, inline files base64-encoded.
pub fn job_for(req: &SpawnRequest) -> forkd_zygote::wire::Job {
    use forkd_zygote::wire::{Job, JobFile, JobProgram};
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut env: std::collections::BTreeMap<String, String> = base_env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Job {
        program: match &req.program {
            Program::Code(code) => JobProgram::Code(code.clone()),
            Program::Script(path) => JobProgram::Script(path.clone()),
            Program::Module(name) => JobProgram::Module(name.clone()),
        },
        argv: req.argv.clone(),
        env,
        files: req
            .files
            .iter()
            .map(|f| JobFile {
                path: f.path.clone(),
                content: b64.encode(&f.content),
                mode: f.mode,
            })
            .collect(),
        session: None,
        line_buffered: req
            .terminal
            .iter()
            .map(|s| match s {
                forkd_ipc::Stream::Stdout => "stdout".to_string(),
                forkd_ipc::Stream::Stderr => "stderr".to_string(),
            })
            .collect(),
    }
}

/// BLAS thread pools sized as they would size themselves on a machine with
/// the CPUs of the sandbox's cpu limit (rounded up, at most the host's): the
/// base environment's one thread becomes that many where the request sets
/// none of these variables. One thread (the default limit) costs nothing;
/// more costs the zygote's setter call in the child.
fn blas_threads_for_limit(
    job: &mut forkd_zygote::wire::Job,
    req: &SpawnRequest,
    limits: &AppliedLimits,
) {
    const VARS: [&str; 3] = ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"];
    if !limits.cgroup_enforced || VARS.iter().any(|v| req.env.contains_key(*v)) {
        return;
    }
    let host = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a validated positive CPU count, clamped to the host's"
    )]
    let n = (limits.cpus.ceil().max(1.0) as usize).min(host);
    if n > 1 {
        for v in VARS {
            job.env.insert(v.to_string(), n.to_string());
        }
    }
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
                r = read_some(a, &mut buf), if a.is_some() => (0, r),
                r = read_some(b, &mut buf2), if b.is_some() => (1, r),
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
        let room = usize::try_from(limit.saturating_sub(used)).unwrap_or(usize::MAX);
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

/// Reads from `stream` if it is still open (a closed one reads as EOF).
async fn read_some(stream: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
        None => Ok(0),
    }
}

/// What the child reported on its status pipe so far (decoded by
/// [`StatusDecoder`]), and when its first report arrived.
#[derive(Debug, Default)]
struct StatusLog {
    decoder: StatusDecoder,
    started: Option<Instant>,
}

/// Reads the status pipe to EOF into `log`, firing `finished` with the exit
/// code as soon as the child's `Finished` report is complete.
async fn read_status(
    mut status: pipe::Receiver,
    log: Arc<std::sync::Mutex<StatusLog>>,
    finished: tokio::sync::oneshot::Sender<u8>,
) {
    let mut finished = Some(finished);
    let mut buf = [0u8; 4096];
    loop {
        let n = match status.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if let Ok(mut log) = log.lock() {
                    log.decoder.end();
                }
                return;
            }
            Ok(n) => n,
        };
        let Ok(mut log) = log.lock() else { return };
        log.started.get_or_insert_with(Instant::now);
        for report in log.decoder.feed(&buf[..n]) {
            if let StatusReport::Finished(code) = report {
                // Taken only now: the `S` before it arrives in an earlier read.
                if let Some(tx) = finished.take() {
                    let _ = tx.send(code);
                }
            }
        }
        if let Some(e) = log.decoder.error() {
            // Only this sandbox's own result can be affected; its exit is
            // then judged from the kernel's wait status alone.
            tracing::debug!("sandbox status stream: {e}");
        }
    }
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

fn status_of(decoder: &StatusDecoder) -> Status {
    if let Some(message) = decoder.setup_failure() {
        return Status::SetupFailed(message);
    }
    if decoder.started() {
        return Status::Started(decoder.self_signal().map(i32::from));
    }
    match decoder.error() {
        Some(e) => Status::SetupFailed(format!("unexpected status report: {e}")),
        None => Status::DiedInSetup,
    }
}

/// Runs one admitted sandbox. Every failure is an [`ErrorReply`] that says
/// what to do. `client_gone` turns true when the requesting connection
/// closes: the sandbox is then killed, since its result could not be delivered.
///
/// The steps: encode the job (nothing is taken before the request is known
/// to fit) → a concurrency slot → a child (warm, or forked now) → hand-off
/// (job and stdin in, output and status out) → watch until it exits, is
/// killed or reports → the result.
pub async fn run_sandbox(
    state: &State,
    admitted: Resolved,
    req: SpawnRequest,
    client_gone: tokio::sync::watch::Receiver<bool>,
) -> Result<SpawnResult, ErrorReply> {
    run_sandbox_with(state, admitted, req, client_gone, None).await
}

/// [`run_sandbox`] with a workspace prepared for it
/// ([`crate::workspace::prepare`]): its plan goes to the child, and an
/// overlay's delta is exported into the result when asked for.
pub async fn run_sandbox_with(
    state: &State,
    admitted: Resolved,
    req: SpawnRequest,
    mut client_gone: tokio::sync::watch::Receiver<bool>,
    workspace: Option<crate::workspace::Ready>,
) -> Result<SpawnResult, ErrorReply> {
    let t0 = Instant::now();
    let Resolved {
        zygote: zygote_name,
        policy,
        limits,
        timeout_grace,
    } = admitted;
    let mut job = job_for(&req);
    blas_threads_for_limit(&mut job, &req, &limits);
    let job = job
        .frame()
        .map_err(|e| error(ErrorCode::InvalidRequest, e.to_string()))?;
    // `None` (no allowlist) costs nothing further: no network, as always.
    let allow = state.network.admit(&req.allow_net, &zygote_name)?;
    let mut shutdown = state.shutdown_signal();
    let _slot = acquire_slot(state).await?;
    let _in_flight = state.load.enter();
    let mut plan = plan_for(policy, &limits);
    let export_delta = req.workspace.as_ref().is_some_and(|w| w.export_delta);
    // A workspace's child may be one made warm for it (crate::ws_warm).
    let (ws_child, workspace) =
        crate::ws_warm::take(state, &zygote_name, &mut plan, workspace).await?;
    let (child, warm) = match ws_child {
        Some(child) => (child, true),
        None => obtain_child(state, &zygote_name, &plan).await?,
    };
    // Open the allowlist before the job (and so the program) goes in; on
    // failure the unused child is killed when dropped.
    let egress = match allow {
        Some(allow) => Some(state.network.attach(child.pidfd.as_fd(), allow).await?),
        None => None,
    };
    let id = child.sandbox;
    let landlock = landlock_status(&child);
    // From here the request owns the child: its timeout starts now.
    let t_forked = if warm { t0 } else { Instant::now() };
    let t_handoff = Instant::now();
    let mut live = hand_off(child, job, req.stdin, limits.output_bytes)?;
    let deadline =
        tokio::time::Instant::from_std(t_handoff + Duration::from_millis(limits.timeout_ms));
    let watched = watch(
        &mut live,
        (deadline, timeout_grace),
        &mut shutdown,
        &mut client_gone,
    )
    .await;
    let t_exit = Instant::now();
    let ended = collect(live, watched).await?;
    let mut result = report(ended, id, zygote_name, limits, warm, (t0, t_forked, t_exit))?;
    result.landlock = landlock;
    if let (Some(ws), true) = (&workspace, export_delta) {
        match ws.export().await {
            Ok(tar) => result.workspace_delta = Some(tar),
            Err(e) => {
                result.workspace_error = Some(format!("cannot export the workspace delta: {e}"))
            }
        }
    }
    result.network = egress.map(|e| Box::new(e.finish()));
    Ok(result)
}

/// A concurrency slot, unless the daemon is shutting down (a draining
/// daemon takes no new work, queued requests included).
async fn acquire_slot(state: &State) -> Result<tokio::sync::SemaphorePermit<'_>, ErrorReply> {
    let mut draining = state.draining_signal();
    if *draining.borrow() {
        return Err(shutting_down());
    }
    tokio::select! {
        permit = state.slots.acquire() => permit.map_err(|_| shutting_down()),
        _ = stopping(&mut draining) => Err(shutting_down()),
    }
}

/// The refusal of new work once shutdown has begun.
pub(crate) fn shutting_down() -> ErrorReply {
    error(
        ErrorCode::ShuttingDown,
        "forkd is shutting down; retry on another daemon",
    )
}

/// A warm child if one fits (its cgroup limits can still change), otherwise
/// one forked now; `true` when it came from the warm pool.
pub(crate) async fn obtain_child(
    state: &State,
    zygote_name: &str,
    plan: &ChildPlan,
) -> Result<(forkd_pool::ReadyChild, bool), ErrorReply> {
    let warm_child = state
        .warm
        .get(zygote_name)
        .filter(|pool| same_isolation(pool.plan(), plan))
        .and_then(|pool| pool.take());
    if let Some(child) = warm_child {
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
        return Ok((child, true));
    }
    // A zygote handed out just before it was recycled may drain and exit
    // before our fork order reaches it: that is ours to retry on its
    // replacement, not the client's.
    let mut retried = false;
    loop {
        let zygote = state.pool.get(zygote_name).await.map_err(pool_error)?;
        let id = state.next_sandbox_id();
        match forkd_pool::prepare(
            &zygote,
            &state.cgroups,
            state.netns.as_ref().as_ref(),
            id,
            plan.clone(),
        )
        .await
        {
            Ok(child) => return Ok((child, false)),
            Err(_) if !retried && zygote.is_draining() => retried = true,
            Err(e) => return Err(prepare_error(e)),
        }
    }
}

/// A child after the hand-off: its tasks and the handles to stop it.
struct Live {
    pidfd: OwnedFd,
    exited: tokio::sync::oneshot::Receiver<Result<Exited, ZygoteError>>,
    cleanup: forkd_pool::CgroupCleanup,
    stdin_task: Option<tokio::task::JoinHandle<()>>,
    output_task: tokio::task::JoinHandle<Output>,
    exceeded: Arc<Notify>,
    exceeded_flag: Arc<AtomicBool>,
    status_task: tokio::task::JoinHandle<()>,
    status_log: Arc<std::sync::Mutex<StatusLog>>,
    finished: tokio::sync::oneshot::Receiver<u8>,
}

impl Live {
    /// Kills the sandbox's init (its pid namespace goes with it) and stops
    /// reading from it.
    fn abandon(&self) {
        kill_pidfd(self.pidfd.as_fd());
        self.output_task.abort();
        self.status_task.abort();
    }
}

/// Gives the child its job and stdin, and starts reading its output and status.
fn hand_off(
    mut child: forkd_pool::ReadyChild,
    job: Vec<u8>,
    stdin: Vec<u8>,
    output_bytes: u64,
) -> Result<Live, ErrorReply> {
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
    let cleanup = std::mem::replace(&mut child.cgroup, forkd_pool::CgroupCleanup(None));
    let pidfd = child.pidfd.try_clone().map_err(|e| internal("pidfd", e))?;
    let exited = std::mem::replace(&mut child.exited, tokio::sync::oneshot::channel().1);
    drop(child);

    let stdin_task = send_job(job_w, job, stdin)?;
    let exceeded = Arc::new(Notify::new());
    let exceeded_flag = Arc::new(AtomicBool::new(false));
    let output_task = tokio::spawn(collect_output(
        stdout_rx,
        stderr_rx,
        output_bytes,
        exceeded.clone(),
        exceeded_flag.clone(),
    ));
    let status_log = Arc::new(std::sync::Mutex::new(StatusLog::default()));
    let (finished_tx, finished) = tokio::sync::oneshot::channel();
    let status_task = tokio::spawn(read_status(status_rx, status_log.clone(), finished_tx));
    Ok(Live {
        pidfd,
        exited,
        cleanup,
        stdin_task,
        output_task,
        exceeded,
        exceeded_flag,
        status_task,
        status_log,
        finished,
    })
}

/// Writes the job, then the program's stdin, into the job pipe. What fits
/// into the pipe now (the usual small job with little stdin) is written
/// here with plain non-blocking writes, without registering the pipe or
/// starting a task; only a remainder goes through one. EPIPE (the program
/// never reads its stdin, or is gone) ends the writing quietly.
fn send_job(
    fd: OwnedFd,
    job: Vec<u8>,
    stdin: Vec<u8>,
) -> Result<Option<tokio::task::JoinHandle<()>>, ErrorReply> {
    forkd_pool::set_nonblocking(&fd).map_err(|e| internal("job pipe", e))?;
    let mut written = 0;
    for part in [&job[..], &stdin[..]] {
        let mut at = 0;
        while at < part.len() {
            match nix::unistd::write(&fd, &part[at..]) {
                Ok(n) => at += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => return Ok(None),
            }
        }
        written += at;
        if at < part.len() {
            break;
        }
    }
    if written == job.len() + stdin.len() {
        return Ok(None); // dropping `fd` closes the pipe: the program sees EOF
    }
    let mut tx = sender(fd)?;
    Ok(Some(tokio::spawn(async move {
        if written < job.len() && tx.write_all(&job[written..]).await.is_err() {
            return;
        }
        let _ = tx
            .write_all(&stdin[written.saturating_sub(job.len())..])
            .await;
    })))
}

/// How watching a live sandbox ended.
struct Watched {
    exit: Result<Exited, ErrorReply>,
    killed_by: Option<KilledBy>,
    /// Set when the program reported its exit code itself: the reply then
    /// goes out without waiting for the kernel to tear the process down.
    reported_exit: Option<u8>,
    /// The client went away: kill, clean up, reply to nobody.
    abandoned: bool,
}

/// Waits for the sandbox's exit (or its own exit report), killing it on
/// timeout, output flood, shutdown or a vanished client. A timeout first
/// sends SIGTERM (the program ends gracefully, flushing its output) and
/// SIGKILLs only when `grace` has passed (at once when it is zero).
async fn watch(
    live: &mut Live,
    (deadline, grace): (tokio::time::Instant, Duration),
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    client_gone: &mut tokio::sync::watch::Receiver<bool>,
) -> Watched {
    let mut reported_exit: Option<u8> = None;
    let mut watch_finish = true;
    let mut abandoned = false;
    let mut killed_by: Option<KilledBy> = None;
    // Set while a timeout's SIGTERM grace runs: when to SIGKILL.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let exit: Result<Exited, ErrorReply> = loop {
        tokio::select! {
            r = &mut live.exited => {
                break match r {
                    Ok(Ok(e)) => Ok(e),
                    Ok(Err(z)) => Err(zygote_error(z)),
                    Err(_) => Err(error(ErrorCode::ZygoteUnavailable, "zygote vanished before reporting the sandbox's exit; retry")),
                };
            }
            code = &mut live.finished, if killed_by.is_none() && watch_finish => {
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
                if grace.is_zero() {
                    kill_pidfd(live.pidfd.as_fd());
                } else {
                    signal_pidfd(live.pidfd.as_fd(), libc::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + grace);
                }
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(deadline)), if kill_at.is_some() => {
                kill_at = None;
                kill_pidfd(live.pidfd.as_fd());
            }
            _ = live.exceeded.notified(), if killed_by.is_none() => {
                killed_by = Some(KilledBy::OutputLimit);
                kill_pidfd(live.pidfd.as_fd());
            }
            _ = stopping(shutdown), if killed_by.is_none() => {
                killed_by = Some(KilledBy::Shutdown);
                kill_pidfd(live.pidfd.as_fd());
            }
            _ = stopping(client_gone), if !abandoned => {
                abandoned = true;
                kill_at = None;
                kill_pidfd(live.pidfd.as_fd());
            }
            _ = tokio::time::sleep(KILL_REPORT_TIMEOUT), if killed_by.is_some() && kill_at.is_none() => {
                break Err(error(ErrorCode::Internal, "the sandbox did not exit within 10 s of SIGKILL"));
            }
        }
    };
    Watched {
        exit,
        killed_by,
        reported_exit,
        abandoned,
    }
}

/// A sandbox that ended, with everything read from it.
struct Ended {
    exit: Exited,
    killed_by: Option<KilledBy>,
    status: Status,
    t_started: Option<Instant>,
    output: Output,
    pidfd: OwnedFd,
    reported_exit: Option<u8>,
    cleanup: forkd_pool::CgroupCleanup,
}

/// Stops the hand-off's tasks and gathers the status and output.
async fn collect(live: Live, watched: Watched) -> Result<Ended, ErrorReply> {
    if let Some(task) = &live.stdin_task {
        task.abort();
    }
    let Watched {
        exit,
        mut killed_by,
        reported_exit,
        abandoned,
    } = watched;
    if abandoned {
        live.abandon();
        // Nobody receives this reply; the metrics count it as a cancel,
        // not as an internal error.
        return Err(error(
            ErrorCode::Cancelled,
            "the client disconnected; the sandbox was killed",
        ));
    }
    let exit = match exit {
        Ok(e) => e,
        Err(e) => {
            // The zygote died or lost track: make sure nothing survives.
            live.abandon();
            return Err(e);
        }
    };
    let Live {
        pidfd,
        cleanup,
        output_task,
        exceeded_flag,
        status_task,
        status_log,
        ..
    } = live;
    if reported_exit.is_none() {
        // The process is gone, so its status pipe is at EOF (or about to be).
        let _ = tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, status_task).await;
    }
    let (status, t_started) = match status_log.lock() {
        Ok(log) => (status_of(&log.decoder), log.started),
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
    Ok(Ended {
        exit,
        killed_by,
        status,
        t_started,
        output,
        pidfd,
        reported_exit,
        cleanup,
    })
}

/// The result of an ended sandbox: exit status (believing the child's own
/// reports only where the kernel's wait status agrees), why it was killed,
/// timings and resource use.
fn report(
    ended: Ended,
    id: u64,
    zygote_name: String,
    limits: AppliedLimits,
    warm: bool,
    (t0, t_forked, t_exit): (Instant, Instant, Instant),
) -> Result<SpawnResult, ErrorReply> {
    let Ended {
        exit,
        mut killed_by,
        status,
        t_started,
        output,
        pidfd,
        reported_exit,
        cleanup,
    } = ended;
    let stats = cleanup
        .get()
        .and_then(|cg| {
            cg.counters()
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
        // The zygote's measurement, not the run's: set by run_sandbox.
        landlock: None,
        workspace_delta: None,
        workspace_error: None,
        network: None,
    };
    if reported_exit.is_some() {
        // The program is done; its init is exiting. Make sure whatever it
        // left running (or a program that only claimed to finish) goes too.
        kill_pidfd(pidfd.as_fd());
    }
    drop(cleanup); // removal happens on a blocking thread, after the reply is built
    Ok(result)
}

/// The landlock status the child's zygote measured for its policy at start-up.
pub(crate) fn landlock_status(child: &forkd_pool::ReadyChild) -> Option<forkd_ipc::LandlockStatus> {
    use forkd_ipc::LandlockStatus as Wire;
    use forkd_zygote::spec::LandlockStatus as Measured;
    let status = child
        .zygote
        .info()
        .native
        .landlock
        .get(&child.plan.policy)?;
    Some(match status {
        Measured::FullyEnforced => Wire::FullyEnforced,
        Measured::PartiallyEnforced => Wire::PartiallyEnforced,
        Measured::NotEnforced => Wire::NotEnforced,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn decode_wait_status(status: i32) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

pub(crate) fn receiver(fd: OwnedFd) -> Result<pipe::Receiver, ErrorReply> {
    pipe::Receiver::from_owned_fd(fd).map_err(|e| internal("register pipe", e))
}

pub(crate) fn sender(fd: OwnedFd) -> Result<pipe::Sender, ErrorReply> {
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

    fn status(stream: &[u8]) -> Status {
        let mut d = StatusDecoder::new();
        d.feed(stream);
        d.end();
        status_of(&d)
    }

    #[test]
    fn status_reports_are_interpreted() {
        assert_eq!(status(b""), Status::DiedInSetup);
        assert_eq!(status(b"Eboom"), Status::SetupFailed("boom".into()));
        assert_eq!(status(b"S"), Status::Started(None));
        assert_eq!(status(b"SK\x06"), Status::Started(Some(6)));
        assert!(matches!(status(b"x"), Status::SetupFailed(_)));
        assert_eq!(status(b"SX\x07"), Status::Started(None));
        assert_eq!(status(b"SK\x58X\x00"), Status::Started(Some(0x58)));
    }

    /// The early reply must fire when `X` arrives in a later read than `S`
    /// (the usual case: `S` is written when the program starts, `X` when it
    /// ends), while the child still holds the pipe open.
    #[tokio::test]
    async fn finished_fires_when_the_exit_report_arrives_in_a_later_read() {
        let (r, mut w) = nix::unistd::pipe()
            .map(|(r, w)| (r, std::fs::File::from(w)))
            .expect("pipe");
        let log = Arc::new(std::sync::Mutex::new(StatusLog::default()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(read_status(receiver(r).expect("register"), log.clone(), tx));
        use std::io::Write;
        w.write_all(b"S").expect("write S");
        // Let the reader consume `S` on its own before `X` is written.
        while log.lock().expect("log").decoder.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.write_all(b"X\x05").expect("write X");
        let code = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("the exit report was not forwarded while the pipe stayed open")
            .expect("the sender was dropped before the exit report arrived");
        assert_eq!(code, 5);
        drop(w);
        reader.await.expect("reader");
    }

    /// A small job goes in without a task; a large stdin beyond the pipe's
    /// buffer goes through one; either way the reader gets every byte, in
    /// order, then EOF.
    #[tokio::test]
    async fn the_job_and_stdin_arrive_whole_whatever_their_size() {
        for (stdin_len, needs_task) in [(10usize, false), (3 << 20, true)] {
            let (r, w) = nix::unistd::pipe().expect("pipe");
            let job = b"JOBFRAME".to_vec();
            let stdin: Vec<u8> = (0..stdin_len)
                .map(|i| u8::try_from(i % 251).expect("< 251"))
                .collect();
            let reader = std::thread::spawn(move || {
                let mut all = Vec::new();
                std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut all).expect("read");
                all
            });
            let task = send_job(w, job.clone(), stdin.clone()).expect("send");
            assert_eq!(task.is_some(), needs_task, "stdin of {stdin_len} bytes");
            if let Some(t) = task {
                t.await.expect("writer");
            }
            let got = reader.join().expect("reader");
            assert_eq!(got.len(), job.len() + stdin.len());
            assert!(got.starts_with(&job) && got[job.len()..] == stdin[..]);
        }
    }

    #[test]
    fn request_env_overrides_the_base() {
        let mut req = SpawnRequest::default();
        req.env.insert("HOME".into(), "/tmp/home".into());
        req.env.insert("X".into(), "1".into());
        let job = job_for(&req);
        assert_eq!(job.env["HOME"], "/tmp/home");
        assert_eq!(job.env["X"], "1");
        assert_eq!(job.env["LANG"], "C.UTF-8");
    }
}
