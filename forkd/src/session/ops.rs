//! The session requests: create, then cells, commands, files and the
//! lifecycle operations on a live session.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_ipc::{
    CellError, CellResult, Command, CommandResult, DisplayData, ErrorCode, ErrorReply, FileData,
    FileEntry, FileRead, FileWrite, Response, ResponseBody, RunCode, SessionCreate, SessionEnd,
    SessionInfo, SessionState, SpawnRequest, Stream, MAX_FILE_CHUNK,
};
use forkd_zygote::wire::{
    ExecDisplay, ExecEntry, ExecStream, FromExecutor, SessionJob, StatusDecoder, ToExecutor,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};

use super::{actor, ExecReply, Life, Session, Sessions};
use crate::sandbox::{error, internal, job_for, obtain_child, plan_for, receiver, sender};
use crate::state::stopping;

/// How long a new session's child may take to report that it started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `session_kill` waits for the session's processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The working directory of a session's interpreter and commands: its
/// scratch (writable, private, counted in `scratch_bytes`), by the name
/// E2B users expect (`/home/user` is a symlink to `/tmp` in every sandbox).
pub const SESSION_CWD: &str = "/home/user";

/// Where a streamed request's events go: the connection's reply queue,
/// under the request's id and version.
pub struct Replier {
    pub tx: mpsc::Sender<Response>,
    pub v: u32,
    pub id: u64,
}

impl Replier {
    async fn event(&self, body: ResponseBody) {
        let _ = self
            .tx
            .send(Response {
                v: self.v,
                id: self.id,
                body,
            })
            .await;
    }
}

fn invalid(message: impl Into<String>) -> ErrorReply {
    error(ErrorCode::InvalidRequest, message)
}

fn cancelled_error() -> ErrorReply {
    error(ErrorCode::Cancelled, "the request was cancelled")
}

/// Starts a session for `owner`.
pub async fn create(
    sessions: &Arc<Sessions>,
    req: SessionCreate,
    peer: crate::audit::Peer,
) -> Result<SessionInfo, ErrorReply> {
    let cfg = &sessions.cfg;
    let owner = peer.uid;
    let ttl_ms = req.ttl_ms.unwrap_or(cfg.default_ttl_ms);
    if ttl_ms == 0 {
        return Err(invalid("ttl_ms must be at least 1"));
    }
    if ttl_ms > cfg.max_ttl_ms {
        return Err(error(
            ErrorCode::LimitExceedsPolicy,
            format!(
                "ttl_ms = {ttl_ms} exceeds this daemon's maximum {}; ask for less or raise [sessions] max_ttl_ms",
                cfg.max_ttl_ms
            ),
        ));
    }
    let idle = req.idle_timeout_ms.or(cfg.default_idle_timeout_ms);
    if idle == Some(0) {
        return Err(invalid("idle_timeout_ms must be at least 1"));
    }
    sessions.admit(owner)?;
    let spawn_like = SpawnRequest {
        zygote: req.zygote.clone(),
        env: req.env.clone(),
        limits: req.limits.clone(),
        policy: req.policy.clone(),
        ..SpawnRequest::default()
    };
    let resolved = sessions.admission.resolve(&spawn_like)?;
    let mut job = job_for(&spawn_like);
    for (k, v) in [("HOME", SESSION_CWD), ("PWD", SESSION_CWD)] {
        if !req.env.contains_key(k) {
            job.env.insert(k.into(), v.into());
        }
    }
    job.session = Some(SessionJob {
        output_bytes: resolved.limits.output_bytes,
        cwd: SESSION_CWD.into(),
        interrupt_grace_ms: cfg.interrupt_grace_ms,
    });
    let frame = job.frame().map_err(|e| invalid(e.to_string()))?;
    let state = &sessions.state;
    // `None` (no allowlist) costs nothing: no network, as for spawn.
    let allow = state.network.admit(&req.allow_net, &resolved.zygote)?;
    let workspace = match &req.workspace {
        Some(w) => {
            let who = crate::workspace::Requester {
                uid: peer.uid,
                gid: peer.gid,
                pid: peer.pid,
            };
            Some(
                crate::workspace::prepare(
                    &sessions.admission.workspaces,
                    w,
                    Some(who),
                    resolved.limits.scratch_bytes,
                )
                .await?,
            )
        }
        None => None,
    };
    let mut plan = plan_for(resolved.policy.clone(), &resolved.limits);
    plan.workspace = workspace.as_ref().map(|w| w.plan.clone());
    let (mut child, warm) = obtain_child(state, &resolved.zygote, &plan).await?;
    // Open the allowlist before the executor (and so any user code) runs;
    // on failure the unused child is killed when dropped.
    let egress = match allow {
        Some(allow) => Some(state.network.attach(child.pidfd.as_fd(), allow).await?),
        None => None,
    };
    let (Some(job_w), Some(out_r), Some(err_r), Some(status_r)) = (
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
    let pidfd = child.pidfd.try_clone().map_err(|e| internal("pidfd", e))?;
    let exited = std::mem::replace(&mut child.exited, tokio::sync::oneshot::channel().1);
    let cgroup = std::mem::replace(&mut child.cgroup, forkd_pool::CgroupCleanup(None));
    // From here on the child is ours: anything that fails kills it.
    let guard = KillOnDrop(Some(
        child.pidfd.try_clone().map_err(|e| internal("pidfd", e))?,
    ));
    drop(child);

    forkd_pool::set_nonblocking(&job_w).map_err(|e| internal("job pipe", e))?;
    let mut job_w = sender(job_w)?;
    job_w.write_all(&frame).await.map_err(|e| {
        error(
            ErrorCode::SpawnFailed,
            format!("the session's child took no job: {e}"),
        )
    })?;
    wait_started(status_r).await?;

    let now = Instant::now();
    let (to_actor, from_handlers) = mpsc::unbounded_channel();
    let (ended_tx, _) = watch::channel(false);
    let session = Arc::new(Session {
        id: super::new_id(),
        owner,
        peer,
        zygote: resolved.zygote,
        labels: req.labels,
        limits: resolved.limits,
        warm,
        created: now,
        idle_timeout: idle.map(Duration::from_millis),
        pidfd: Mutex::new(Some(pidfd)),
        cgroup: Mutex::new(Some(cgroup)),
        freezer: Mutex::new(None),
        next_req: std::sync::atomic::AtomicU64::new(1),
        oom_kills_seen: std::sync::atomic::AtomicU64::new(0),
        egress: tokio::sync::Mutex::new(egress),
        allow_net: Mutex::new(req.allow_net.clone()),
        to_actor,
        life: Mutex::new(Life {
            state: SessionState::Running,
            ended_by: None,
            killed_by: None,
            deadline: now + Duration::from_millis(ttl_ms),
            last_used: now,
            cells: 0,
            final_usage: None,
        }),
        changed: Notify::new(),
        ended: ended_tx,
    });
    let out_r = receiver(out_r)?;
    let err_r = receiver(err_r)?;
    sessions.insert(session.clone());
    tokio::spawn(actor::run(
        sessions.clone(),
        session.clone(),
        actor::Channels {
            job_w,
            out_r,
            err_r,
            exited,
            from_handlers,
            keep: actor::KeepAlive { workspace },
        },
    ));
    guard.disarm();
    tracing::debug!(session = %session.id, owner, warm, "session created");
    Ok(session.info())
}

/// Kills a child that never became a session.
struct KillOnDrop(Option<OwnedFd>);

impl KillOnDrop {
    /// The child became a session: its actor owns it now.
    fn disarm(mut self) {
        self.0.take();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            forkd_pool::kill_pidfd(std::os::fd::AsFd::as_fd(&fd));
        }
    }
}

/// Waits for the child's "started" report (isolation done, executor up).
async fn wait_started(status: OwnedFd) -> Result<(), ErrorReply> {
    let mut status = receiver(status)?;
    let mut decoder = StatusDecoder::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match status.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    decoder.end();
                    return;
                }
                Ok(n) => {
                    decoder.feed(&buf[..n]);
                    if decoder.started() {
                        return;
                    }
                }
            }
        }
    };
    if tokio::time::timeout(START_TIMEOUT, read).await.is_err() {
        return Err(error(
            ErrorCode::SpawnFailed,
            "the session's child did not start within 30 s",
        ));
    }
    if decoder.started() {
        return Ok(());
    }
    Err(error(
        ErrorCode::SpawnFailed,
        match decoder.setup_failure() {
            Some(m) => format!("the session could not be set up: {m}"),
            None => {
                "the session's child died while being set up; the daemon's log may say more".into()
            }
        },
    ))
}

fn stream_of(s: ExecStream) -> Stream {
    match s {
        ExecStream::Stdout => Stream::Stdout,
        ExecStream::Stderr => Stream::Stderr,
    }
}

fn display_of(d: ExecDisplay) -> DisplayData {
    DisplayData {
        data: d.data,
        main: d.main,
    }
}

fn entry_of(e: ExecEntry) -> FileEntry {
    FileEntry {
        name: e.name,
        path: e.path,
        kind: e.kind,
        size: e.size,
        mode: e.mode,
        modified_ms: e.modified_ms,
    }
}

/// The error a `failed` reply from the executor stands for.
fn failed(code: &str, message: String) -> ErrorReply {
    let code = match code {
        "not_found" => ErrorCode::NotFound,
        "file_error" => ErrorCode::FileError,
        _ => ErrorCode::InvalidRequest,
    };
    error(code, message)
}

fn unexpected(what: &str) -> ErrorReply {
    error(
        ErrorCode::Internal,
        format!("the session's executor answered a {what} with something else; this is a forkd bug, please report it"),
    )
}

/// Runs a cell: its output and displays are streamed to `out` as they
/// come; the timeout and a cancel interrupt it.
pub async fn run_code(
    session: Arc<Session>,
    rc: RunCode,
    out: &Replier,
    mut cancel: watch::Receiver<bool>,
) -> Result<CellResult, ErrorReply> {
    let timeout_ms = rc.timeout_ms.unwrap_or(session.limits.timeout_ms);
    if timeout_ms == 0 {
        return Err(invalid("timeout_ms must be at least 1"));
    }
    let req = session.next_req();
    let mut rx = session.request(&ToExecutor::Cell { req, code: rc.code }, req, &[])?;
    session.count_cell();
    let started = Instant::now();
    let deadline = tokio::time::sleep(Duration::from_millis(timeout_ms));
    tokio::pin!(deadline);
    let mut result = CellResult::default();
    let (mut timed_out, mut cancelled) = (false, false);
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some((FromExecutor::Output { stream, .. }, data)) => {
                    match stream {
                        ExecStream::Stdout => result.stdout.extend_from_slice(&data),
                        ExecStream::Stderr => result.stderr.extend_from_slice(&data),
                    }
                    out.event(ResponseBody::Output { stream: stream_of(stream), data }).await;
                }
                Some((FromExecutor::Display { display, .. }, _)) => {
                    let d = display_of(display);
                    result.results.push(d.clone());
                    out.event(ResponseBody::Display(d)).await;
                }
                Some((FromExecutor::CellDone { execution_count, text, results, error, stdout_truncated, stderr_truncated, .. }, _)) => {
                    result.execution_count = execution_count;
                    result.text = text;
                    result.results.extend(results.into_iter().map(display_of));
                    result.error = error.map(|e| CellError { name: e.name, value: e.value, traceback: e.traceback });
                    result.stdout_truncated = stdout_truncated;
                    result.stderr_truncated = stderr_truncated;
                    break;
                }
                Some(_) => return Err(unexpected("cell")),
                None => return Err(session.ended_error()),
            },
            _ = &mut deadline, if !timed_out && !cancelled => {
                timed_out = true;
                session.send(&ToExecutor::Interrupt { req });
            }
            _ = stopping(&mut cancel), if !cancelled => {
                cancelled = true;
                session.send(&ToExecutor::Interrupt { req });
            }
        }
    }
    if cancelled {
        return Err(cancelled_error());
    }
    if let Some(e) = &mut result.error {
        if e.name == "KernelDied" && session.oom_since_last_look() {
            e.value = format!(
                "the interpreter was killed by the out-of-memory killer: the session may use {} MiB (limits.memory_bytes). Its state (variables, imports) is lost; a fresh interpreter runs the next cells",
                session.limits.memory_bytes >> 20
            );
        }
    }
    result.timed_out = timed_out;
    result.duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(result)
}

/// Runs a shell command in the session; output is streamed to `out`.
pub async fn command(
    session: Arc<Session>,
    c: Command,
    out: &Replier,
    mut cancel: watch::Receiver<bool>,
) -> Result<CommandResult, ErrorReply> {
    let timeout_ms = c.timeout_ms.unwrap_or(session.limits.timeout_ms);
    if timeout_ms == 0 {
        return Err(invalid("timeout_ms must be at least 1"));
    }
    let req = session.next_req();
    let msg = ToExecutor::Command {
        req,
        cmd: c.cmd,
        cwd: c.cwd,
        env: c.env,
    };
    let mut rx = session.request(&msg, req, &[])?;
    let deadline = tokio::time::sleep(Duration::from_millis(timeout_ms));
    tokio::pin!(deadline);
    let mut result = CommandResult::default();
    let mut pid = None;
    let (mut timed_out, mut cancelled) = (false, false);
    let kill = |pid: Option<u32>| {
        if let Some(pid) = pid {
            let req = session.next_req();
            session.send(&ToExecutor::KillCommand { req, pid });
        }
    };
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some((FromExecutor::CommandStarted { pid: p, .. }, _)) => {
                    pid = Some(p);
                    if timed_out || cancelled {
                        kill(pid);
                    }
                    out.event(ResponseBody::CommandStarted { pid: p }).await;
                }
                Some((FromExecutor::Output { stream, .. }, data)) => {
                    match stream {
                        ExecStream::Stdout => result.stdout.extend_from_slice(&data),
                        ExecStream::Stderr => result.stderr.extend_from_slice(&data),
                    }
                    out.event(ResponseBody::Output { stream: stream_of(stream), data }).await;
                }
                Some((FromExecutor::CommandDone { exit_code, signal, stdout_truncated, stderr_truncated, .. }, _)) => {
                    result.exit_code = exit_code;
                    result.signal = signal;
                    if signal == Some(libc::SIGKILL) {
                        // An OOM kill of a command is not the interpreter's.
                        session.oom_since_last_look();
                    }
                    result.stdout_truncated = stdout_truncated;
                    result.stderr_truncated = stderr_truncated;
                    break;
                }
                Some((FromExecutor::Failed { code, message, .. }, _)) => return Err(failed(&code, message)),
                Some(_) => return Err(unexpected("command")),
                None => return Err(session.ended_error()),
            },
            _ = &mut deadline, if !timed_out && !cancelled => {
                timed_out = true;
                kill(pid);
            }
            _ = stopping(&mut cancel), if !cancelled => {
                cancelled = true;
                kill(pid);
            }
        }
    }
    if cancelled {
        return Err(cancelled_error());
    }
    result.timed_out = timed_out;
    Ok(result)
}

/// One request to the executor with one reply.
async fn one(
    session: &Session,
    msg: ToExecutor,
    req: u64,
    payload: &[u8],
) -> Result<ExecReply, ErrorReply> {
    let mut rx = session.request(&msg, req, payload)?;
    match rx.recv().await {
        Some((FromExecutor::Failed { code, message, .. }, _)) => Err(failed(&code, message)),
        Some(reply) => Ok(reply),
        None => Err(session.ended_error()),
    }
}

/// Kills a running command's process group.
pub async fn command_kill(session: Arc<Session>, pid: u32) -> Result<(), ErrorReply> {
    let req = session.next_req();
    match one(&session, ToExecutor::KillCommand { req, pid }, req, &[]).await? {
        (FromExecutor::Done { .. }, _) => Ok(()),
        _ => Err(unexpected("command_kill")),
    }
}

fn check_path(path: &str) -> Result<(), ErrorReply> {
    if path.is_empty() {
        return Err(invalid("path must not be empty"));
    }
    if path.contains('\0') {
        return Err(invalid("path must not contain NUL bytes"));
    }
    Ok(())
}

/// Writes one chunk of a file.
pub async fn file_write(session: Arc<Session>, w: FileWrite) -> Result<(), ErrorReply> {
    check_path(&w.path)?;
    if w.data.len() > MAX_FILE_CHUNK {
        return Err(invalid(format!(
            "a file_write chunk holds at most {MAX_FILE_CHUNK} bytes; send the rest with append: true"
        )));
    }
    if w.mode.is_some_and(|m| m > 0o7777) {
        return Err(invalid("mode must be permission bits (at most 0o7777)"));
    }
    let req = session.next_req();
    let msg = ToExecutor::Write {
        req,
        path: w.path,
        append: w.append,
        mode: w.mode,
    };
    match one(&session, msg, req, &w.data).await? {
        (FromExecutor::Done { .. }, _) => Ok(()),
        _ => Err(unexpected("file_write")),
    }
}

/// Reads one chunk of a file.
pub async fn file_read(session: Arc<Session>, r: FileRead) -> Result<FileData, ErrorReply> {
    check_path(&r.path)?;
    let length = r
        .length
        .unwrap_or(MAX_FILE_CHUNK as u64)
        .min(MAX_FILE_CHUNK as u64);
    let req = session.next_req();
    let msg = ToExecutor::Read {
        req,
        path: r.path,
        offset: r.offset,
        length,
    };
    match one(&session, msg, req, &[]).await? {
        (
            FromExecutor::Data {
                offset, size, eof, ..
            },
            data,
        ) => Ok(FileData {
            data,
            offset,
            size,
            eof,
        }),
        _ => Err(unexpected("file_read")),
    }
}

/// The path operations: list, remove, make_dir, stat.
pub enum PathOp {
    List,
    Remove,
    MakeDir,
    Stat,
}

/// Carries out a path operation.
pub async fn path_op(
    session: Arc<Session>,
    op: PathOp,
    path: String,
) -> Result<ResponseBody, ErrorReply> {
    check_path(&path)?;
    let req = session.next_req();
    let msg = match op {
        PathOp::List => ToExecutor::List { req, path },
        PathOp::Remove => ToExecutor::Remove { req, path },
        PathOp::MakeDir => ToExecutor::MakeDir { req, path },
        PathOp::Stat => ToExecutor::Stat { req, path },
    };
    match one(&session, msg, req, &[]).await? {
        (FromExecutor::Entries { entries, .. }, _) => Ok(ResponseBody::Files {
            entries: entries.into_iter().map(entry_of).collect(),
        }),
        (FromExecutor::Stat { entry, .. }, _) => Ok(ResponseBody::FileStat(entry_of(entry))),
        (FromExecutor::Done { .. }, _) => Ok(ResponseBody::Done {}),
        _ => Err(unexpected("file operation")),
    }
}

/// Interrupts the running cell, if any.
pub fn interrupt(session: &Session) {
    // req 0: whichever cell runs now.
    session.send(&ToExecutor::Interrupt { req: 0 });
}

/// Kills the session and waits (bounded) until its processes are gone.
pub async fn kill(session: Arc<Session>) -> SessionInfo {
    session.kill(SessionEnd::Killed);
    let mut ended = session.ended.subscribe();
    let _ = tokio::time::timeout(KILL_WAIT, ended.wait_for(|e| *e)).await;
    session.info()
}

/// Sets a new TTL, bounded by the configured maximum.
pub fn set_ttl(
    sessions: &Sessions,
    session: &Session,
    ttl_ms: u64,
) -> Result<SessionInfo, ErrorReply> {
    if ttl_ms == 0 {
        return Err(invalid("ttl_ms must be at least 1"));
    }
    if ttl_ms > sessions.cfg.max_ttl_ms {
        return Err(error(
            ErrorCode::LimitExceedsPolicy,
            format!(
                "ttl_ms = {ttl_ms} exceeds this daemon's maximum {}",
                sessions.cfg.max_ttl_ms
            ),
        ));
    }
    if session.state() == SessionState::Ended {
        return Err(session.ended_error());
    }
    session.set_ttl(Duration::from_millis(ttl_ms));
    Ok(session.info())
}

/// Replaces a session's network allowlist within the operator's bound.
/// Without one before, its egress starts now; an empty list stops it
/// (connections still open are cut).
pub async fn set_network(
    sessions: &Sessions,
    session: &Session,
    allow_net: Vec<String>,
) -> Result<SessionInfo, ErrorReply> {
    if session.state() == SessionState::Ended {
        return Err(session.ended_error());
    }
    let network = &sessions.state.network;
    let allow = network.admit(&allow_net, &session.zygote)?;
    let pidfd = session.pidfd().ok_or_else(|| session.ended_error())?;
    let mut egress = session.egress.lock().await;
    let mut stopped = None;
    match (egress.as_ref(), allow) {
        (Some(running), Some(allow)) => network.update(running, pidfd.as_fd(), allow).await?,
        (None, Some(allow)) => *egress = Some(network.attach(pidfd.as_fd(), allow).await?),
        (Some(_), None) => stopped = egress.take().map(forkd_net::Egress::finish),
        (None, None) => {}
    }
    *super::lock(&session.allow_net) = allow_net;
    drop(egress);
    if let Some(report) = &stopped {
        sessions.metrics.record_network(report);
    }
    sessions.audit("session_network_changed", session, "ok", stopped);
    Ok(session.info())
}

/// The cancel switches of one connection's requests, by request id.
pub type Cancels = Arc<Mutex<std::collections::HashMap<u64, watch::Sender<bool>>>>;

pub fn lock_cancels(
    c: &Cancels,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, watch::Sender<bool>>> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cancel switch for request `id` of this connection.
pub fn register_cancel(cancels: &Cancels, id: u64) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    lock_cancels(cancels).insert(id, tx);
    rx
}

/// Serves one session request of `uid`'s and sends its final reply.
pub async fn serve(
    sessions: Arc<Sessions>,
    body: forkd_ipc::RequestBody,
    peer: crate::audit::Peer,
    out: Replier,
    cancel: watch::Receiver<bool>,
    cancels: Cancels,
) {
    use forkd_ipc::RequestBody as B;
    let id = out.id;
    let uid = peer.uid;
    let op = body.op();
    let outcome: Result<ResponseBody, ErrorReply> = async {
        Ok(match body {
            B::SessionCreate(c) => ResponseBody::Session(create(&sessions, c, peer).await?),
            B::SessionList(l) => ResponseBody::Sessions {
                sessions: sessions.list(uid, &l.labels),
            },
            B::SessionInfo(r) => ResponseBody::Session(sessions.get(&r.session, uid)?.info()),
            B::SessionKill(r) => ResponseBody::Session(kill(sessions.get(&r.session, uid)?).await),
            B::SessionPause(r) => {
                let s = sessions.get(&r.session, uid)?;
                s.pause(true)?;
                ResponseBody::Session(s.info())
            }
            B::SessionResume(r) => {
                let s = sessions.get(&r.session, uid)?;
                s.pause(false)?;
                s.touch();
                ResponseBody::Session(s.info())
            }
            B::SessionSetTtl(t) => {
                let s = sessions.get(&t.session, uid)?;
                ResponseBody::Session(set_ttl(&sessions, &s, t.ttl_ms)?)
            }
            B::SessionSetNetwork(n) => {
                let s = sessions.get(&n.session, uid)?;
                ResponseBody::Session(set_network(&sessions, &s, n.allow_net).await?)
            }
            B::RunCode(rc) => {
                let s = sessions.usable(&rc.session, uid)?;
                sessions.count_cell();
                ResponseBody::Cell(run_code(s, rc, &out, cancel).await?)
            }
            B::Interrupt(r) => {
                interrupt(&*sessions.usable(&r.session, uid)?);
                ResponseBody::Done {}
            }
            B::Command(c) => {
                let s = sessions.usable(&c.session, uid)?;
                ResponseBody::Command(command(s, c, &out, cancel).await?)
            }
            B::CommandKill(k) => {
                command_kill(sessions.usable(&k.session, uid)?, k.pid).await?;
                ResponseBody::Done {}
            }
            B::FileWrite(w) => {
                let s = sessions.usable(&w.session, uid)?;
                file_write(s, w).await?;
                ResponseBody::Done {}
            }
            B::FileRead(r) => {
                let s = sessions.usable(&r.session, uid)?;
                ResponseBody::FileData(file_read(s, r).await?)
            }
            B::FileList(p) => {
                path_op(sessions.usable(&p.session, uid)?, PathOp::List, p.path).await?
            }
            B::FileRemove(p) => {
                path_op(sessions.usable(&p.session, uid)?, PathOp::Remove, p.path).await?
            }
            B::FileMakeDir(p) => {
                path_op(sessions.usable(&p.session, uid)?, PathOp::MakeDir, p.path).await?
            }
            B::FileStat(p) => {
                path_op(sessions.usable(&p.session, uid)?, PathOp::Stat, p.path).await?
            }
            B::Spawn(_) | B::Ping | B::Cancel(_) => {
                return Err(error(ErrorCode::Internal, "not a session request"))
            }
        })
    }
    .await;
    lock_cancels(&cancels).remove(&id);
    let label = match &outcome {
        Ok(_) => "ok",
        Err(e) => crate::metrics::error_code_label(e.code),
    };
    sessions.count_request(op, label);
    if let Err(e) = &outcome {
        tracing::debug!(request = id, code = %e.code, "session request failed: {}", e.message);
    }
    let body = outcome.unwrap_or_else(ResponseBody::Error);
    out.event(body).await;
}
