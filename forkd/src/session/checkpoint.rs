//! Checkpoint and restore of a session (docs/branch.md, "Checkpoint and
//! restore").
//!
//! A checkpoint lives inside the session's own sandbox: its executor keeps a
//! frozen fork of the interpreter (its child, waiting for a signal, holding
//! no descriptor) and a copy of the scratch in a memfd only the executor
//! holds. Restoring kills the session's processes, puts the scratch copy
//! back and wakes the frozen copy, which first forks the copy that stays
//! frozen for the next restore. Nothing crosses the sandbox: no namespace,
//! uid or cgroup changes, so the isolation is the session's own. The daemon
//! keeps the records (ids, quotas, audit) and routes the requests.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use forkd_ipc::{CheckpointInfo, ErrorCode, ErrorReply, SessionInfo};
use forkd_zygote::wire::{FromExecutor, ToExecutor};

use super::ops::{one, unexpected};
use super::{lock, millis, Session, Sessions};
use crate::sandbox::error;

/// The daemon's record of one checkpoint.
pub(crate) struct Record {
    id: String,
    created: Instant,
    scratch_bytes: u64,
    restores: u64,
    /// Taken with `keep`: outlives the session's end.
    pub(super) kept: bool,
    /// The overlay workspace's layer as it was (copied again per restore).
    workspace: Option<Arc<crate::workspace::Ready>>,
}

/// A checkpoint counted against the quotas while it is being taken.
pub(crate) struct Slot(Option<Arc<Session>>);

impl Slot {
    pub(super) fn take(session: Arc<Session>) -> Slot {
        session.checkpoints_pending.fetch_add(1, Ordering::Relaxed);
        Slot(Some(session))
    }

    /// The checkpoint exists: it is counted by its record from now on.
    fn commit(
        mut self,
        id: String,
        scratch_bytes: u64,
        kept: bool,
        workspace: Option<Arc<crate::workspace::Ready>>,
    ) -> CheckpointInfo {
        let session = self.0.take().expect("a slot is committed once");
        let record = Record {
            id,
            created: Instant::now(),
            scratch_bytes,
            restores: 0,
            kept,
            workspace,
        };
        let info = record.info(&session.id);
        lock(&session.checkpoints).push(record);
        session.checkpoints_pending.fetch_sub(1, Ordering::Relaxed);
        info
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            session.checkpoints_pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Record {
    fn info(&self, session: &str) -> CheckpointInfo {
        CheckpointInfo {
            checkpoint: self.id.clone(),
            session: session.to_owned(),
            age_ms: millis(self.created.elapsed()),
            scratch_bytes: self.scratch_bytes,
            restores: self.restores,
            kept: self.kept,
        }
    }
}

impl Session {
    /// Checkpoints kept and being taken.
    pub(super) fn checkpoint_count(&self) -> usize {
        lock(&self.checkpoints).len() + self.checkpoints_pending.load(Ordering::Relaxed)
    }

    /// Its checkpoints, oldest first.
    pub fn checkpoint_infos(&self) -> Vec<CheckpointInfo> {
        lock(&self.checkpoints)
            .iter()
            .map(|r| r.info(&self.id))
            .collect()
    }

    /// The ids of its checkpoints taken with `keep`.
    pub(super) fn kept_checkpoints(&self) -> Vec<String> {
        lock(&self.checkpoints)
            .iter()
            .filter(|r| r.kept)
            .map(|r| r.id.clone())
            .collect()
    }

    pub(super) fn has_checkpoint(&self, id: &str) -> bool {
        lock(&self.checkpoints).iter().any(|r| r.id == id)
    }

    fn forget_checkpoint(&self, id: &str) {
        lock(&self.checkpoints).retain(|r| r.id != id);
    }

    pub(super) fn unknown_checkpoint(&self, id: &str) -> ErrorReply {
        error(
            ErrorCode::UnknownCheckpoint,
            format!(
                "session {} has no checkpoint {id}; list them with session_checkpoints",
                self.id
            ),
        )
    }
}

/// `session_checkpoint`: a new checkpoint of `session`.
pub async fn take(
    sessions: &Arc<Sessions>,
    session: Arc<Session>,
    force: bool,
    keep: bool,
) -> Result<CheckpointInfo, ErrorReply> {
    let workspace = lock(&session.workspace).clone();
    if workspace.as_ref().is_some_and(|w| {
        !w.plan.branchable() || w.plan.mount_point != forkd_workspace::DEFAULT_MOUNT_POINT
    }) {
        return Err(error(
            ErrorCode::InvalidRequest,
            "a session with a direct workspace, `view` rules or a mount point other than /workspace cannot be checkpointed (host files cannot be put back; `view` rules and other mount points are not built yet); use an overlay workspace at /workspace without `view` rules",
        ));
    }
    let slot = sessions.reserve_checkpoint(&session)?;
    let id = format!("ck-{}", &super::new_id()[2..]);
    let req = session.next_req();
    let msg = ToExecutor::Checkpoint {
        req,
        id: id.clone(),
        force,
    };
    let scratch_bytes = match one(&session, msg, req, &[]).await? {
        (FromExecutor::Checkpointed { scratch_bytes, .. }, _) => scratch_bytes,
        _ => return Err(unexpected("session_checkpoint")),
    };
    // The workspace's layer right after the interpreter's copy was made.
    let layer = match &workspace {
        Some(w) => Some(Arc::new(
            w.with_copied_layer(session.limits.scratch_bytes).await?,
        )),
        None => None,
    };
    session.touch();
    let info = slot.commit(id.clone(), scratch_bytes, keep, layer);
    sessions.audit_record("session_checkpointed", &session, "ok", None, Some(id));
    Ok(info)
}

/// `session_restore`: `session` takes the state of its checkpoint `id`
/// (the checkpoint stays, to be restored again).
pub async fn restore(
    sessions: &Arc<Sessions>,
    session: Arc<Session>,
    id: &str,
) -> Result<SessionInfo, ErrorReply> {
    if !session.has_checkpoint(id) {
        return Err(session.unknown_checkpoint(id));
    }
    // The workspace first: its mount is replaced by one over a fresh copy
    // of the checkpoint's layer (the checkpoint keeps its own).
    let kept = lock(&session.checkpoints)
        .iter()
        .find(|r| r.id == id)
        .and_then(|r| r.workspace.clone());
    if let Some(kept) = kept {
        let mut fresh = kept.with_copied_layer(session.limits.scratch_bytes).await?;
        let pidfd = session.pidfd().ok_or_else(|| session.ended_error())?;
        // Idmapped for the session's own host uid, as its first mount was.
        if fresh.plan.owner.is_some() {
            let uid = crate::branch_copy::uid_of(session.pid).map_err(|e| {
                error(
                    ErrorCode::Internal,
                    format!("the session's uid for its workspace: {e}"),
                )
            })?;
            fresh.plan.idmap_to = (uid != 0).then_some(uid);
        }
        fresh.remount_in(pidfd).await?;
        *lock(&session.workspace) = Some(Arc::new(fresh));
    }
    let req = session.next_req();
    let msg = ToExecutor::Restore {
        req,
        id: id.to_owned(),
    };
    match one(&session, msg, req, &[]).await {
        Ok((FromExecutor::Done { .. }, _)) => {}
        Ok(_) => return Err(unexpected("session_restore")),
        Err(e) => {
            if e.code == ErrorCode::UnknownCheckpoint {
                // Lost (its frozen copy was killed from inside): the record
                // goes, and the executor frees the scratch copy.
                drop_in_executor(&session, id).await.ok();
                session.forget_checkpoint(id);
                sessions.audit_record(
                    "session_restored",
                    &session,
                    "checkpoint_lost",
                    None,
                    Some(id.to_owned()),
                );
            }
            return Err(e);
        }
    }
    session.touch();
    if let Some(r) = lock(&session.checkpoints).iter_mut().find(|r| r.id == id) {
        r.restores += 1;
    }
    sessions.audit_record(
        "session_restored",
        &session,
        "ok",
        None,
        Some(id.to_owned()),
    );
    Ok(session.info())
}

/// `session_checkpoint_delete`.
pub async fn delete(
    sessions: &Arc<Sessions>,
    session: Arc<Session>,
    id: &str,
) -> Result<(), ErrorReply> {
    if !session.has_checkpoint(id) {
        return Err(session.unknown_checkpoint(id));
    }
    match drop_in_executor(&session, id).await {
        // Unknown there too: it was lost; the record goes either way.
        Ok(()) => {}
        Err(e) if e.code == ErrorCode::UnknownCheckpoint => {}
        Err(e) => return Err(e),
    }
    session.forget_checkpoint(id);
    sessions.audit_record(
        "session_checkpoint_deleted",
        &session,
        "ok",
        None,
        Some(id.to_owned()),
    );
    if session.state() == forkd_ipc::SessionState::EndedWithCheckpoints
        && session.kept_checkpoints().is_empty()
    {
        // Nothing left to restore: what is left of the session goes.
        sessions.end(&session, forkd_ipc::SessionEnd::Killed);
    }
    Ok(())
}

async fn drop_in_executor(session: &Session, id: &str) -> Result<(), ErrorReply> {
    let req = session.next_req();
    let msg = ToExecutor::DropCheckpoint {
        req,
        id: id.to_owned(),
    };
    match one(session, msg, req, &[]).await? {
        (FromExecutor::Done { .. }, _) => Ok(()),
        _ => Err(unexpected("session_checkpoint_delete")),
    }
}
