//! The end of a session whose branches live on (docs/branch.md, "Lifetime").
//!
//! A branch's pid namespace lies below its parent's (a copy of the parent's
//! interpreter can only enter a pid namespace below its own active one), so
//! the parent's init must outlive its branches: if it died, the kernel would
//! kill every process below it. When such a parent ends (kill, TTL, idle
//! timeout) it ends *as a session*: it leaves the lists, gets its
//! `session_ended` record, and its executor ends the interpreter, the
//! commands, the checkpoints and every process of the session's uid, and
//! empties the scratch. What stays, the *remnant*, is that executor alone,
//! idle, reaping, in the session's cgroup (its limits hold); it counts
//! against `[sessions] max` and `max_per_uid` until the last branch has
//! ended, and then it is killed and cleaned up like any ended session
//! (cgroup, uid, mounts), with a `session_reaped` record.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use forkd_ipc::SessionEnd;
use forkd_zygote::wire::{FromExecutor, ToExecutor};

use super::{end_index, lock, ActorMsg, Session, Sessions, END_LABELS};

/// How long the executor may take to end the session's processes.
const RETIRE_WAIT: Duration = Duration::from_secs(10);

impl Session {
    /// Kills what is left of the session (a remnant too): its init, and so
    /// every process of its pid namespace.
    pub(super) fn reap(&self) {
        if let Some(f) = lock(&self.freezer).as_ref() {
            let _ = f.thaw();
        }
        if let Some(fd) = lock(&self.pidfd).as_ref() {
            forkd_pool::kill_pidfd(std::os::fd::AsFd::as_fd(fd));
        }
    }

    /// Whether it ended as a session while its init stays for its branches.
    pub(super) fn is_remnant(&self) -> bool {
        self.remnant.load(Ordering::Relaxed)
    }
}

impl Sessions {
    /// Ends `session` for `why`: outright when no branch of it lives,
    /// otherwise as a session, leaving the remnant its branches need.
    pub(crate) fn end(self: &Arc<Self>, session: &Arc<Session>, why: SessionEnd) {
        match self.begin_remnant(session, why) {
            Some(why) => {
                tokio::spawn(finish_remnant(self.clone(), session.clone(), why));
            }
            None => session.kill(why),
        }
    }

    /// Marks `session` ended and moves it to the remnants when a branch of
    /// it lives; returns the reason that stands. Decided under the table's
    /// lock, as a branch's retirement checks for an orphaned remnant: of a
    /// branch ending meanwhile, either this sees it gone or it sees the
    /// remnant.
    fn begin_remnant(&self, session: &Arc<Session>, why: SessionEnd) -> Option<SessionEnd> {
        let mut table = lock(&self.table);
        if session.hidden.load(Ordering::Relaxed) || !table.live.contains_key(&session.id) {
            return None;
        }
        let branches: Vec<Arc<Session>> = table
            .live
            .values()
            .filter(|s| s.parent.as_deref() == Some(session.id.as_str()))
            .cloned()
            .collect();
        if branches.is_empty() {
            return None;
        }
        let why = {
            let mut life = lock(&session.life);
            if life.state == forkd_ipc::SessionState::Ended {
                return None;
            }
            life.state = forkd_ipc::SessionState::Ended;
            *life.ended_by.get_or_insert(why)
        };
        session.remnant.store(true, Ordering::Relaxed);
        for b in &branches {
            b.parent_ended.store(true, Ordering::Relaxed);
        }
        if let Some(s) = table.live.remove(&session.id) {
            table.remnants.insert(s.id.clone(), s.clone());
            table.ended.push_back(s);
            while table.ended.len() > self.cfg.remember_ended {
                table.ended.pop_front();
            }
        }
        drop(table);
        session.changed.notify_one();
        tracing::info!(session = %session.id, ?why, branches = branches.len(), "session ended; its init stays for its branches");
        Some(why)
    }

    /// Reaps the remnant `parent` once no branch of it lives.
    pub(super) fn reap_if_orphaned(&self, parent: &str) {
        let table = lock(&self.table);
        let Some(remnant) = table.remnants.get(parent) else {
            return;
        };
        if !table
            .live
            .values()
            .any(|s| s.parent.as_deref() == Some(parent))
        {
            tracing::debug!(session = %parent, "the last branch ended: reaping the remnant");
            remnant.reap();
        }
    }

    /// A remnant's processes are gone: forgets it (its cgroup and uid go
    /// with the actor's cleanup).
    pub(super) fn forget_remnant(&self, session: &Session) {
        lock(&self.table).remnants.remove(&session.id);
        self.audit("session_reaped", session, "ok", None);
    }

    /// Remnants now (counted against the session limits).
    pub(super) fn remnants_of(table: &super::Table, uid: Option<u32>) -> usize {
        table
            .remnants
            .values()
            .filter(|s| uid.is_none_or(|u| s.owner == u))
            .count()
    }

    /// Kills every remnant (daemon shutdown).
    pub(super) fn reap_remnants(&self) {
        for s in lock(&self.table).remnants.values() {
            s.reap();
        }
    }
}

/// The asynchronous half of ending a session with live branches: its
/// executor ends its processes; then the record, and the remnant waits for
/// its branches (or goes at once if they ended meanwhile).
async fn finish_remnant(sessions: Arc<Sessions>, session: Arc<Session>, why: SessionEnd) {
    if let Some(f) = lock(&session.freezer).as_ref() {
        let _ = f.thaw();
    }
    // Its spares could only ever have become its branches.
    for spare in std::mem::take(&mut *lock(&session.spares)) {
        spare.session.kill(SessionEnd::Killed);
    }
    lock(&session.checkpoints).clear();
    let network = session.egress.lock().await.take().map(|egress| {
        let report = egress.finish();
        sessions.metrics.record_network(&report);
        report
    });
    let req = session.next_req();
    let retired = tokio::time::timeout(
        RETIRE_WAIT,
        super::ops::one(&session, ToExecutor::Retire { req }, req, &[]),
    )
    .await;
    // Requests that waited on the session now learn it ended.
    let _ = session.to_actor.send(ActorMsg::Forget);
    sessions.counts.ended[end_index(why)].fetch_add(1, Ordering::Relaxed);
    sessions.audit(
        "session_ended",
        &session,
        END_LABELS[end_index(why)],
        network,
    );
    match retired {
        Ok(Ok((FromExecutor::Done { .. }, _))) => {}
        other => {
            let why = match other {
                Ok(Err(e)) => e.message,
                Err(_) => format!("no answer within {} s", RETIRE_WAIT.as_secs()),
                Ok(Ok(_)) => "an unexpected answer".into(),
            };
            tracing::warn!(session = %session.id, "the executor did not end the session's processes ({why}); killing it with its branches");
            session.reap();
        }
    }
    let _ = session.ended.send(true);
    sessions.reap_if_orphaned(&session.id);
}
