//! One task per session: owns the executor's channels and the session's
//! timers, and cleans up when the session's processes are gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use forkd_ipc::{KilledBy, SessionEnd, SessionState};
use forkd_pool::{Exited, ZygoteError};
use forkd_zygote::wire::ExecDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};

use super::{lock, ActorMsg, ExecReply, Session, Sessions};
use crate::state::stopping;

/// How much of the executor's own stderr is logged per session (it writes
/// there only when something in forkd itself went wrong).
const STDERR_LOG_BYTES: usize = 64 * 1024;

pub(super) struct Channels {
    /// The job pipe, carrying requests after the job.
    pub job_w: pipe::Sender,
    /// The executor's fd 1: its replies.
    pub out_r: pipe::Receiver,
    /// The executor's fd 2: its diagnostics.
    pub err_r: pipe::Receiver,
    pub exited: oneshot::Receiver<Result<Exited, ZygoteError>>,
    pub from_handlers: mpsc::UnboundedReceiver<ActorMsg>,
}

/// When the session's TTL or idle timeout next needs a look.
fn next_check(session: &Session) -> Instant {
    let life = lock(&session.life);
    if life.state == SessionState::Ended {
        // A remnant (or a session about to go): no timer applies.
        return Instant::now() + std::time::Duration::from_secs(3600);
    }
    // (Dormant: `deadline` is when its kept checkpoints expire.)
    let mut at = life.deadline;
    if let (Some(idle), SessionState::Running) = (session.idle_timeout, life.state) {
        at = at.min(life.last_used + idle);
    }
    at
}

/// Ends the session if its TTL or idle timeout has passed.
fn enforce_timers(sessions: &Arc<Sessions>, session: &Arc<Session>) {
    let now = Instant::now();
    let why = {
        let life = lock(&session.life);
        if now >= life.deadline {
            Some(SessionEnd::Ttl)
        } else {
            match (session.idle_timeout, life.state) {
                (Some(idle), SessionState::Running) if now >= life.last_used + idle => {
                    Some(SessionEnd::Idle)
                }
                _ => None,
            }
        }
    };
    if let Some(why) = why {
        tracing::info!(session = %session.id, ?why, "session expired");
        sessions.end(session, why);
    }
}

pub(super) async fn run(sessions: Arc<Sessions>, session: Arc<Session>, ch: Channels) {
    let Channels {
        mut job_w,
        mut out_r,
        err_r,
        mut exited,
        mut from_handlers,
    } = ch;
    // Requests are written by their own task, so a request the executor is
    // slow to read never stops this one from reading its replies.
    let (frames, mut frames_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = frames_rx.recv().await {
            if job_w.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let stderr = tokio::spawn(log_stderr(session.id.clone(), err_r));
    let mut pending: HashMap<u64, mpsc::UnboundedSender<ExecReply>> = HashMap::new();
    let mut decoder = ExecDecoder::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut shutdown = sessions.state.shutdown_signal();
    let mut out_open = true;
    let mut shutting_down = false;
    loop {
        let check_at = tokio::time::Instant::from_std(next_check(&session));
        tokio::select! {
            _ = &mut exited => break,
            m = from_handlers.recv() => {
                match m {
                    Some(ActorMsg::Request { req, frame, replies }) => {
                        if let Some(r) = replies {
                            pending.insert(req, r);
                        }
                        let _ = frames.send(frame);
                    }
                    Some(ActorMsg::Forget) => pending.clear(),
                    None => {}
                }
            }
            n = out_r.read(&mut buf), if out_open => match n {
                Ok(0) | Err(_) => {
                    // The executor closed its reply channel: it is exiting.
                    out_open = false;
                    session.kill(SessionEnd::Died);
                }
                Ok(n) => match decoder.feed(&buf[..n]) {
                    Ok(replies) => {
                        for (msg, payload) in replies {
                            let req = msg.req();
                            let last = msg.is_final();
                            if let Some(tx) = pending.get(&req) {
                                let _ = tx.send((msg, payload));
                            }
                            if last {
                                pending.remove(&req);
                            }
                        }
                    }
                    Err(e) => {
                        // Only forkd's own executor writes here (user code
                        // holds no descriptor of it): a forkd bug.
                        tracing::error!(session = %session.id, "session executor broke its framing: {e}; killing the session");
                        out_open = false;
                        session.kill(SessionEnd::Died);
                    }
                },
            },
            _ = tokio::time::sleep_until(check_at) => enforce_timers(&sessions, &session),
            _ = session.changed.notified() => {}
            _ = stopping(&mut shutdown), if !shutting_down => {
                shutting_down = true;
                if session.is_remnant() {
                    session.reap();
                } else {
                    session.kill(SessionEnd::Shutdown);
                }
            }
        }
    }
    let network = session.egress.lock().await.take().map(|egress| {
        let report = egress.finish();
        sessions.metrics.record_network(&report);
        report
    });
    retire(&sessions, &session, network);
    // An overlay's upper layer goes once no export holds it.
    lock(&session.workspace).take();
    // Requests still waiting see their channel close: "session ended".
    drop(pending);
    writer.abort();
    stderr.abort();
}

/// Records why the session ended and what it used, releases its cgroup,
/// freezer and pidfd, and moves it to the remembered ones.
fn retire(sessions: &Sessions, session: &Session, network: Option<forkd_ipc::NetworkReport>) {
    let cgroup = lock(&session.cgroup).take();
    let stats = cgroup
        .as_ref()
        .and_then(|c| c.get())
        .and_then(|cg| cg.counters().ok())
        .unwrap_or_default();
    let usage = session.usage_from(cgroup.as_ref().and_then(|c| c.get()));
    let ended_by = {
        let mut life = lock(&session.life);
        life.state = SessionState::Ended;
        let ended_by = *life.ended_by.get_or_insert(SessionEnd::Died);
        if stats.oom_kills > 0 {
            life.killed_by = Some(KilledBy::Oom);
        }
        life.final_usage = Some(usage);
        tracing::info!(session = %session.id, ?ended_by, killed_by = ?life.killed_by, cells = life.cells, "session ended");
        ended_by
    };
    // Thawed before removal: a frozen cgroup cannot empty.
    if let Some(f) = lock(&session.freezer).take() {
        let _ = f.thaw();
    }
    lock(&session.pidfd).take();
    drop(cgroup); // removed by the reaper, off this task
    sessions.retire(session, ended_by, network);
    session.ended.send_replace(true);
}

/// Logs what the executor writes to its stderr (bounded), then discards.
async fn log_stderr(id: String, mut err: pipe::Receiver) {
    let mut buf = vec![0u8; 4096];
    let mut logged = 0usize;
    loop {
        match err.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if logged < STDERR_LOG_BYTES {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    tracing::warn!(session = %id, "session executor: {}", text.trim_end());
                    logged += n;
                }
            }
        }
    }
}
