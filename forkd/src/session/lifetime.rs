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
//!
//! A session that ends with checkpoints taken with `keep` goes *dormant*
//! instead (state `ended_with_checkpoints`): the same end, but its executor
//! keeps those checkpoints (their frozen copies and scratch copies), it
//! stays listed and counted, and `session_restore` brings it back, running,
//! under the same id. It goes when its last kept checkpoint is deleted, when
//! it is killed, or `[sessions] kept_checkpoint_ttl_secs` after it ended.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use forkd_ipc::{ErrorReply, SessionEnd, SessionInfo, SessionState};
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
    /// Ends `session` for `why`: dormant when it keeps checkpoints taken
    /// with `keep`; otherwise outright when no branch of it lives, or as a
    /// session, leaving the remnant its branches need.
    pub(crate) fn end(self: &Arc<Self>, session: &Arc<Session>, why: SessionEnd) {
        if let Some((why, keep)) = self.begin_dormant(session, why) {
            tokio::spawn(finish_end(self.clone(), session.clone(), why, keep));
            return;
        }
        match self.begin_remnant(session, why) {
            Some(why) => {
                tokio::spawn(finish_end(self.clone(), session.clone(), why, Vec::new()));
            }
            None => session.kill(why),
        }
    }

    /// Marks a running or paused `session` with kept checkpoints ended
    /// (dormant) until `kept_checkpoint_ttl_secs` from now; returns the
    /// reason and the checkpoints it keeps.
    fn begin_dormant(
        &self,
        session: &Arc<Session>,
        why: SessionEnd,
    ) -> Option<(SessionEnd, Vec<String>)> {
        if session.hidden.load(Ordering::Relaxed) {
            return None;
        }
        let keep = session.kept_checkpoints();
        if keep.is_empty() {
            return None;
        }
        {
            let mut life = lock(&session.life);
            if !matches!(life.state, SessionState::Running | SessionState::Paused) {
                return None;
            }
            life.state = SessionState::EndedWithCheckpoints;
            life.ended_by = Some(why);
            life.deadline =
                std::time::Instant::now() + Duration::from_secs(self.cfg.kept_checkpoint_ttl_secs);
        }
        session.changed.notify_one();
        tracing::info!(session = %session.id, ?why, kept = keep.len(), "session ended with kept checkpoints");
        Some((why, keep))
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
        // Live branches, and ended ones kept for their own branches.
        let branches: Vec<Arc<Session>> = table
            .live
            .values()
            .chain(table.remnants.values())
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
            .chain(table.remnants.values())
            .any(|s| s.parent.as_deref() == Some(parent))
        {
            tracing::debug!(session = %parent, "the last branch ended: reaping the remnant");
            remnant.reap();
        }
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

/// The asynchronous half of ending a session as a session (dormant, with
/// the checkpoints `keep`, or a remnant for its live branches): its executor
/// ends its processes; then the record (once per end), and a remnant waits
/// for its branches (or goes at once if they ended meanwhile).
async fn finish_end(
    sessions: Arc<Sessions>,
    session: Arc<Session>,
    why: SessionEnd,
    keep: Vec<String>,
) {
    if let Some(f) = lock(&session.freezer).as_ref() {
        let _ = f.thaw();
    }
    // Its spares could only ever have become its branches.
    for spare in std::mem::take(&mut *lock(&session.spares)) {
        spare.session.kill(SessionEnd::Killed);
    }
    lock(&session.checkpoints).retain(|r| r.kept && !keep.is_empty());
    let dormant = !keep.is_empty();
    // A dormant session keeps its egress for its return (nothing of it
    // runs meanwhile).
    let network = if dormant {
        None
    } else {
        session.egress.lock().await.take().map(|egress| {
            let report = egress.finish();
            sessions.metrics.record_network(&report);
            report
        })
    };
    let req = session.next_req();
    let retired = tokio::time::timeout(
        RETIRE_WAIT,
        super::ops::one(&session, ToExecutor::Retire { req, keep }, req, &[]),
    )
    .await;
    // Requests that waited on the session now learn it ended.
    let _ = session.to_actor.send(ActorMsg::Forget);
    if !session.end_recorded.swap(true, Ordering::Relaxed) {
        sessions.counts.ended[end_index(why)].fetch_add(1, Ordering::Relaxed);
        sessions.audit(
            "session_ended",
            &session,
            END_LABELS[end_index(why)],
            network,
        );
    }
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
    session.ended.send_replace(true);
    if !dormant {
        sessions.reap_if_orphaned(&session.id);
    }
}

/// `session_restore` of a dormant session: it runs again (under the same
/// id, with `[sessions] default_ttl_ms`), then takes checkpoint `id`'s
/// state as any restore does (if that fails, it runs a fresh interpreter).
pub(crate) async fn revive(
    sessions: &Arc<Sessions>,
    session: Arc<Session>,
    id: &str,
) -> Result<SessionInfo, ErrorReply> {
    if !session.has_checkpoint(id) {
        return Err(session.unknown_checkpoint(id));
    }
    {
        let mut life = lock(&session.life);
        if life.state != SessionState::EndedWithCheckpoints {
            drop(life);
            session.usable()?;
            return Err(session.ended_error());
        }
        let now = std::time::Instant::now();
        life.state = SessionState::Running;
        life.ended_by = None;
        life.killed_by = None;
        life.deadline = now + Duration::from_millis(sessions.cfg.default_ttl_ms);
        life.last_used = now;
    }
    session.end_recorded.store(false, Ordering::Relaxed);
    session.ended.send_replace(false);
    session.changed.notify_one();
    sessions.audit("session_revived", &session, "ok", None);
    tracing::info!(session = %session.id, checkpoint = id, "ended session restored");
    super::checkpoint::restore(sessions, session, id).await
}
