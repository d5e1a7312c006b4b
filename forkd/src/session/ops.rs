//! The session requests: create, then cells, commands, files and the
//! lifecycle operations on a live session.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_ipc::{
    CellError, CellResult, Command, CommandInput, CommandResult, DisplayData, ErrorCode,
    ErrorReply, FileData, FileEntry, FileRead, FileWrite, Response, ResponseBody, RunCode,
    SessionCreate, SessionEnd, SessionInfo, SessionState, SpawnRequest, Stream, MAX_FILE_CHUNK,
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
/// E2B users expect (`/home/user` is /tmp's directory bound a second time).
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

pub(super) fn invalid(message: impl Into<String>) -> ErrorReply {
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
    if req.workspace.as_ref().is_some_and(|w| w.export_delta) {
        return Err(invalid("workspace.export_delta is for spawn; a session exports its overlay's changes at any time with session_workspace_delta"));
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
        adopt: None,
    });
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
    let (child, warm) = obtain_child(state, &resolved.zygote, &plan).await?;
    // Open the allowlist before the executor (and so any user code) runs;
    // on failure the unused child is killed when dropped.
    let egress = match allow {
        Some(allow) => Some(state.network.attach(child.pidfd.as_fd(), allow).await?),
        None => None,
    };
    let session = start_session(
        sessions,
        child,
        job,
        NewSession {
            owner,
            peer,
            zygote: resolved.zygote,
            policy: resolved.policy,
            labels: req.labels,
            limits: resolved.limits,
            warm,
            idle_timeout: idle.map(Duration::from_millis),
            ttl: Duration::from_millis(ttl_ms),
            egress,
            allow_net: req.allow_net.clone(),
            workspace: workspace.map(Arc::new),
            parent: None,
            hidden: false,
        },
    )
    .await?;
    tracing::debug!(session = %session.id, owner, warm, "session created");
    Ok(session.info())
}

/// What a new session is, besides its child.
struct NewSession {
    owner: u32,
    peer: crate::audit::Peer,
    zygote: String,
    policy: String,
    labels: std::collections::BTreeMap<String, String>,
    limits: forkd_ipc::AppliedLimits,
    warm: bool,
    idle_timeout: Option<Duration>,
    ttl: Duration,
    egress: Option<forkd_net::Egress>,
    allow_net: Vec<String>,
    workspace: Option<Arc<crate::workspace::Ready>>,
    parent: Option<String>,
    /// A spare branch: registered only when handed out.
    hidden: bool,
}

/// Hands `job` to an isolated child, waits for its executor to start, and
/// registers it as a session with its own actor.
async fn start_session(
    sessions: &Arc<Sessions>,
    mut child: forkd_pool::ReadyChild,
    job: forkd_zygote::wire::Job,
    new: NewSession,
) -> Result<Arc<Session>, ErrorReply> {
    let frame = job.frame().map_err(|e| invalid(e.to_string()))?;
    let new_hidden = new.hidden;
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
    let pid = child.pid;
    let pidfd = child.pidfd.try_clone().map_err(|e| internal("pidfd", e))?;
    let exited = std::mem::replace(&mut child.exited, tokio::sync::oneshot::channel().1);
    let cgroup = std::mem::replace(&mut child.cgroup, forkd_pool::CgroupCleanup(None));
    let descendant_uids = child.descendant_uids.take();
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
        owner: new.owner,
        peer: new.peer,
        zygote: new.zygote,
        labels: Mutex::new(new.labels),
        limits: new.limits,
        warm: new.warm,
        pid,
        policy: new.policy,
        job,
        parent: new.parent,
        created: Mutex::new(now),
        idle_timeout: new.idle_timeout,
        pidfd: Mutex::new(Some(pidfd)),
        cgroup: Mutex::new(Some(cgroup)),
        freezer: Mutex::new(None),
        next_req: std::sync::atomic::AtomicU64::new(1),
        oom_kills_seen: std::sync::atomic::AtomicU64::new(0),
        egress: tokio::sync::Mutex::new(new.egress),
        allow_net: Mutex::new(new.allow_net),
        workspace: Mutex::new(new.workspace),
        checkpoints: Mutex::new(Vec::new()),
        checkpoints_pending: std::sync::atomic::AtomicUsize::new(0),
        spares: Mutex::new(Vec::new()),
        refilling: std::sync::atomic::AtomicBool::new(false),
        hidden: std::sync::atomic::AtomicBool::new(new.hidden),
        remnant: std::sync::atomic::AtomicBool::new(false),
        parent_ended: std::sync::atomic::AtomicBool::new(false),
        end_recorded: std::sync::atomic::AtomicBool::new(false),
        descendant_uids,
        to_actor,
        life: Mutex::new(Life {
            state: SessionState::Running,
            ended_by: None,
            killed_by: None,
            deadline: now + new.ttl,
            last_used: now,
            cells: 0,
            final_usage: None,
        }),
        changed: Notify::new(),
        ended: ended_tx,
    });
    let out_r = receiver(out_r)?;
    let err_r = receiver(err_r)?;
    if !new_hidden {
        sessions.insert(session.clone());
    }
    tokio::spawn(actor::run(
        sessions.clone(),
        session.clone(),
        actor::Channels {
            job_w,
            out_r,
            err_r,
            exited,
            from_handlers,
        },
    ));
    guard.disarm();
    Ok(session)
}

/// Most branches one request may make.
pub const MAX_BRANCHES: u32 = 64;
/// How long a branch's executor may wait for the copy of the interpreter.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(10);

/// `session_branch`: `req.count` new sessions, each with a copy of the
/// parent's interpreter and scratch, in namespaces and a cgroup of their
/// own (docs/branch.md). All or nothing: a branch that fails takes the
/// others of the request with it.
pub async fn branch(
    sessions: &Arc<Sessions>,
    parent: Arc<Session>,
    req: forkd_ipc::SessionBranch,
    peer: crate::audit::Peer,
) -> Result<Vec<SessionInfo>, ErrorReply> {
    if req.count == 0 || req.count > MAX_BRANCHES {
        return Err(invalid(format!(
            "count must be between 1 and {MAX_BRANCHES}, not {}",
            req.count
        )));
    }
    let started = Instant::now();
    parent.usable()?;
    if let (Some(of), true) = (&parent.parent, parent.has_workspace()) {
        return Err(error(
            ErrorCode::InvalidRequest,
            format!("session {} is a branch with a workspace (of {of}); it cannot be branched: branching a branch that has a workspace is not built (docs/branch.md, \"Workspaces\"); branch {of} instead, or checkpoint and restore this one", parent.id),
        ));
    }
    if let (Some(grandparent), None) = (&parent.parent, &parent.descendant_uids) {
        return Err(error(
            ErrorCode::InvalidRequest,
            format!("session {} is a branch of a branch (of {grandparent}); it cannot be branched: its copies would need user namespaces inside its own, whose uid map holds only its own uid, so they could not get host uids of their own (docs/branch.md, \"Branches of a branch\"); branch {grandparent} or the session it was branched from instead, or checkpoint and restore this one", parent.id),
        ));
    }
    let workspace = super::lock(&parent.workspace).clone();
    if let Some(ws) = &workspace {
        if !ws.plan_is_overlay() {
            return Err(error(
                ErrorCode::InvalidRequest,
                "a session with a direct workspace cannot be branched: its branches would share the host directory's files with it and each other; create the session with workspace mode overlay to branch it (each branch gets its own copy of the changes)",
            ));
        }
        if ws.plan.has_view() {
            return Err(error(
                ErrorCode::InvalidRequest,
                "a session whose workspace has `view` rules cannot be branched: `view` is enforced by landlock rules on this session's own mount, which a copy of its interpreter keeps and which cannot cover a branch's workspace; use `none` or `read` for those paths to branch it",
            ));
        }
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(error(
            ErrorCode::InvalidRequest,
            "branching needs a root daemon (each branch runs as its own uid in a user namespace the parent's uid owns); this daemon is rootless",
        ));
    }
    let parent_init = init_pid(&parent).map_err(|e| {
        error(
            ErrorCode::SessionEnded,
            format!("session {} is not running ({e})", parent.id),
        )
    })?;
    let parent_uid = crate::branch_copy::uid_of(parent_init).map_err(|e| {
        error(
            ErrorCode::SessionEnded,
            format!("session {} is not running ({e})", parent.id),
        )
    })?;
    let allow_net = parent.allow_net();
    let remaining = lock_life_deadline(&parent);
    for _ in 0..req.count {
        sessions.admit(parent.owner)?;
    }
    // The branches are made side by side: each is a fork, a namespace set-up
    // and a scratch copy that do not depend on the others.
    let mut made: Vec<(Arc<Session>, String, String)> = Vec::new();
    let mut first_error = None;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..req.count {
        let (sessions, parent, req, allow_net) = (
            sessions.clone(),
            parent.clone(),
            req.clone(),
            allow_net.clone(),
        );
        set.spawn(async move {
            let r = make_branch(
                &sessions, &parent, parent_uid, &req, &peer, &allow_net, remaining,
            )
            .await;
            (i, r)
        });
    }
    let mut slots: Vec<Option<(Arc<Session>, String, String)>> =
        (0..req.count).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, Ok(b))) => slots[i as usize] = Some(b),
            Ok((_, Err(e))) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(internal(
                    "branch task",
                    std::io::Error::other(e.to_string()),
                ));
            }
        }
    }
    made.extend(slots.into_iter().flatten());
    let shells_ready = started.elapsed();
    let result = async {
        if let Some(e) = first_error {
            return Err(e);
        }
        let targets = made
            .iter()
            .map(|(_, ns, dir)| forkd_zygote::wire::BranchTarget {
                ns: ns.clone(),
                dir: dir.clone(),
            })
            .collect();
        let r = parent.next_req();
        let msg = ToExecutor::Branch {
            req: r,
            targets,
            same_seed: req.same_seed,
            force: req.force,
        };
        let outcomes = match one(&parent, msg, r, &[]).await? {
            (FromExecutor::Branched { error: Some(e), .. }, _) => {
                return Err(error(ErrorCode::InvalidRequest, e))
            }
            (FromExecutor::Branched { outcomes, .. }, _) => outcomes,
            _ => return Err(unexpected("session_branch")),
        };
        if outcomes.len() != made.len() {
            return Err(unexpected("session_branch"));
        }
        for ((branch, _, _), outcome) in made.iter().zip(&outcomes) {
            if let Some(e) = &outcome.error {
                return Err(error(
                    ErrorCode::SpawnFailed,
                    format!(
                        "the copy of the interpreter did not reach branch {}: {e}",
                        branch.id
                    ),
                ));
            }
        }
        tracing::debug!(parent = %parent.id, copied = ?started.elapsed(), "branch copies forked");
        let mut adopting = tokio::task::JoinSet::new();
        for (branch, _, _) in &made {
            let (branch, parent) = (branch.clone(), parent.clone());
            adopting.spawn(async move { adopt(&branch, &parent).await });
        }
        while let Some(joined) = adopting.join_next().await {
            joined.map_err(|e| internal("adopt task", std::io::Error::other(e.to_string())))??;
        }
        Ok::<_, ErrorReply>(())
    }
    .await;
    if let Err(e) = result {
        for (branch, _, _) in &made {
            branch.kill(SessionEnd::Killed);
        }
        return Err(e);
    }
    for (branch, _, _) in &made {
        tracing::info!(session = %branch.id, parent = %parent.id, "session branched");
    }
    tracing::debug!(
        parent = %parent.id,
        count = req.count,
        shells_and_scratch = ?shells_ready,
        total = ?started.elapsed(),
        "branch request served"
    );
    // The next branch request of this session finds its shells made.
    let want = (req.count as usize).min(sessions.cfg.spare_branches);
    // A spare of a workspace session could not hold the delta of the
    // moment it is handed out (its overlay is mounted when it is made).
    if want > 0 && !parent.has_workspace() {
        tokio::spawn(refill_spares(sessions.clone(), parent.clone(), peer, want));
    }
    Ok(made.iter().map(|(b, _, _)| b.info()).collect())
}

/// The parent's remaining lifetime (a branch gets the same).
fn lock_life_deadline(parent: &Session) -> Duration {
    let info = parent.info();
    Duration::from_millis(info.ttl_left_ms.max(1))
}

/// A branch shell made ahead of its parent's next branch request (docs/
/// branch.md, "Spare branches"): its init and executor are up, waiting for a
/// copy; it is in no table, audited and counted only once handed out.
pub(crate) struct Spare {
    pub(super) session: Arc<Session>,
    dir: String,
}

/// One branch session whose executor waits for the copy: returns it, where
/// its namespaces are shown to the parent, and where its channels are. A
/// spare of the parent's is handed out when one is ready; otherwise the
/// shell is made now.
async fn make_branch(
    sessions: &Arc<Sessions>,
    parent: &Arc<Session>,
    parent_uid: u32,
    req: &forkd_ipc::SessionBranch,
    peer: &crate::audit::Peer,
    allow_net: &[String],
    ttl: Duration,
) -> Result<(Arc<Session>, String, String), ErrorReply> {
    let labels = req
        .labels
        .clone()
        .unwrap_or_else(|| super::lock(&parent.labels).clone());
    // The parent's workspace changes at this instant, in a layer of the
    // branch's own (made before its shell, which mounts it).
    let workspace = super::lock(&parent.workspace).clone();
    let workspace = match workspace {
        Some(ws) => Some(Arc::new(
            ws.with_copied_layer(parent.limits.scratch_bytes).await?,
        )),
        None => None,
    };
    let spare = if workspace.is_none() {
        take_spare(parent)
    } else {
        None
    };
    let (session, dir) = match spare {
        Some(spare) => {
            spare.session.hand_out(labels, ttl);
            sessions.insert(spare.session.clone());
            (spare.session, spare.dir)
        }
        None => {
            let spare = make_shell(
                sessions, parent, parent_uid, peer, labels, ttl, false, workspace,
            )
            .await?;
            (spare.session, spare.dir)
        }
    };
    let helper = session.pid;
    let ready = async {
        if !allow_net.is_empty() {
            let state = &sessions.state;
            if let Some(allow) = state.network.admit(allow_net, &parent.zygote)? {
                let pidfd = session.pidfd().ok_or_else(|| session.ended_error())?;
                let egress = state.network.attach(pidfd.as_fd(), allow).await?;
                session.set_egress(egress, allow_net.to_vec()).await;
            }
        }
        // The parent's scratch, copied while its interpreter is idle (a
        // background command may still write: its writes land in either).
        copy_scratch(
            init_pid(parent).map_err(|e| internal("parent init", e))?,
            helper,
        )
        .await
    };
    if let Err(e) = ready.await {
        session.kill(SessionEnd::Died);
        return Err(e);
    }
    let ns = forkd_zygote::branch::exposed_dir(helper);
    Ok((session, ns, dir))
}

/// A live spare of `parent`'s, if it has one (dead ones are dropped).
fn take_spare(parent: &Session) -> Option<Spare> {
    let mut spares = super::lock(&parent.spares);
    while let Some(spare) = spares.pop() {
        if spare.session.state() == forkd_ipc::SessionState::Running {
            return Some(spare);
        }
    }
    None
}

/// A branch shell of `parent`: namespaces, cgroup, uid, init and an
/// executor waiting for a copy of the parent's interpreter in `dir`.
#[allow(
    clippy::too_many_arguments,
    reason = "the shell's own settings, each used once"
)]
async fn make_shell(
    sessions: &Arc<Sessions>,
    parent: &Arc<Session>,
    parent_uid: u32,
    peer: &crate::audit::Peer,
    labels: std::collections::BTreeMap<String, String>,
    ttl: Duration,
    hidden: bool,
    workspace: Option<Arc<crate::workspace::Ready>>,
) -> Result<Spare, ErrorReply> {
    let state = &sessions.state;
    if let Some(block) = parent.descendant_uids.as_ref() {
        if block.in_use() >= block.count() {
            return Err(error(
                ErrorCode::LimitExceedsPolicy,
                format!(
                    "branch {} already has {} live branches and spare shells, the most a branch may have (its user namespace maps that many uids for them); kill some first",
                    parent.id,
                    block.count()
                ),
            ));
        }
    }
    let mut plan = plan_for(parent.policy.clone(), &parent.limits);
    plan.workspace = workspace.as_ref().map(|w| w.plan.clone());
    plan.branch = Some(forkd_zygote::spec::BranchOf {
        parent_pid: init_pid(parent).map_err(|e| internal("parent init", e))?,
        parent_uid,
        // Filled in with the uid it is given (forkd_pool::prepare_branch).
        block: None,
        inner_uid: None,
    });
    let zygote = state
        .pool
        .get(&parent.zygote)
        .await
        .map_err(crate::sandbox::pool_error)?;
    let child = forkd_pool::prepare_branch(
        &zygote,
        &state.cgroups,
        state.next_sandbox_id(),
        plan,
        parent.descendant_uids.as_ref(),
    )
    .await
    .map_err(crate::sandbox::prepare_error)?;
    let dir = format!("/tmp/.forkd-branch-{}", super::new_id());
    let mut job = parent.job.clone();
    if let Some(s) = job.session.as_mut() {
        s.adopt = Some(dir.clone());
    }
    let session = start_session(
        sessions,
        child,
        job,
        NewSession {
            owner: parent.owner,
            peer: *peer,
            zygote: parent.zygote.clone(),
            policy: parent.policy.clone(),
            labels,
            limits: parent.limits.clone(),
            warm: false,
            idle_timeout: parent.idle_timeout,
            ttl,
            egress: None,
            allow_net: Vec::new(),
            workspace,
            parent: Some(parent.id.clone()),
            hidden,
        },
    )
    .await?;
    Ok(Spare { session, dir })
}

/// Makes spares for `parent` until it has `want` (one refill at a time per
/// parent; off every request's path). A failure only means fewer spares.
async fn refill_spares(
    sessions: Arc<Sessions>,
    parent: Arc<Session>,
    peer: crate::audit::Peer,
    want: usize,
) {
    if parent
        .refilling
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let made = async {
        let parent_uid = crate::branch_copy::uid_of(init_pid(&parent).ok()?).ok()?;
        // (Two statements: spare_room locks every session's spares, this
        // one's included.)
        let have = super::lock(&parent.spares).len();
        let missing = want
            .saturating_sub(have)
            .min(sessions.spare_room(parent.owner));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..missing {
            let (sessions, parent) = (sessions.clone(), parent.clone());
            set.spawn(async move {
                let labels = super::lock(&parent.labels).clone();
                let ttl = lock_life_deadline(&parent);
                make_shell(
                    &sessions, &parent, parent_uid, &peer, labels, ttl, true, None,
                )
                .await
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(spare)) if parent.state() == forkd_ipc::SessionState::Running => {
                    super::lock(&parent.spares).push(spare)
                }
                Ok(Ok(spare)) => spare.session.kill(SessionEnd::Killed),
                Ok(Err(e)) => {
                    tracing::debug!(session = %parent.id, "a spare branch could not be made: {}", e.message)
                }
                Err(_) => {}
            }
        }
        tracing::debug!(
            session = %parent.id,
            spares = super::lock(&parent.spares).len(),
            want,
            "spare branches made"
        );
        Some(())
    };
    if made.await.is_none() {
        tracing::debug!(session = %parent.id, "no spare branches: the session is not running");
    }
    parent
        .refilling
        .store(false, std::sync::atomic::Ordering::Release);
}

/// Host pid of the session's init: its `pid` itself, or for a branch, the
/// init below its helper.
fn init_pid(session: &Session) -> std::io::Result<i32> {
    match session.parent {
        Some(_) => crate::branch_copy::init_pids(session.pid).map(|(init, _)| init),
        None => Ok(session.pid),
    }
}

/// Copies the parent's scratch (`/tmp` and `/dev/shm`) into the branch's.
async fn copy_scratch(parent_pid: i32, helper: i32) -> Result<(), ErrorReply> {
    let (init, _) =
        crate::branch_copy::init_pids(helper).map_err(|e| internal("branch init", e))?;
    tokio::task::spawn_blocking(move || crate::branch_copy::copy_scratch(parent_pid, init))
        .await
        .map_err(|e| internal("scratch copy", std::io::Error::other(e.to_string())))?
        .map_err(|e| {
            error(
                ErrorCode::SpawnFailed,
                format!("cannot copy the session's scratch into the branch: {e}"),
            )
        })
}

/// Waits for the branch's executor to adopt the copy, then moves the copy
/// into the branch's cgroup and checks it from outside: the branch's
/// namespaces, uid and cgroup, no capabilities.
async fn adopt(branch: &Arc<Session>, parent: &Session) -> Result<(), ErrorReply> {
    let r = branch.next_req();
    let pid = match tokio::time::timeout(
        ADOPT_TIMEOUT,
        one(branch, ToExecutor::Adopt { req: r }, r, &[]),
    )
    .await
    {
        Ok(Ok((FromExecutor::Adopted { pid, .. }, _))) => pid,
        Ok(Ok(_)) => return Err(unexpected("adopt")),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(error(
                ErrorCode::SpawnFailed,
                format!(
                    "the copy of the interpreter did not arrive in branch {} within {} s",
                    branch.id,
                    ADOPT_TIMEOUT.as_secs()
                ),
            ))
        }
    };
    tracing::debug!(session = %branch.id, "branch copy adopted");
    let helper = branch.pid;
    let procs = parent.cgroup_procs();
    let to = branch.cgroup_procs();
    tokio::task::spawn_blocking(move || crate::branch_copy::settle_copy(helper, pid, &procs, &to))
        .await
        .map_err(|e| internal("branch check", std::io::Error::other(e.to_string())))?
        .map_err(|e| {
            error(
                ErrorCode::SpawnFailed,
                format!("the copy of the interpreter failed its check: {e}"),
            )
        })
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
pub(super) fn failed(code: &str, message: String) -> ErrorReply {
    let code = match code {
        "not_found" => ErrorCode::NotFound,
        "file_error" => ErrorCode::FileError,
        "unknown_checkpoint" => ErrorCode::UnknownCheckpoint,
        _ => ErrorCode::InvalidRequest,
    };
    error(code, message)
}

pub(super) fn unexpected(what: &str) -> ErrorReply {
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
            result.killed_by = Some(forkd_ipc::KilledBy::Oom);
            result.memory_limit_bytes = Some(session.limits.memory_bytes);
            result.peak_memory_bytes =
                Some(session.usage_now().peak_memory_bytes).filter(|p| *p > 0);
        }
    }
    result.timed_out = timed_out;
    result.timeout_ms = timed_out.then_some(timeout_ms);
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
        stdin: c.stdin,
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
    result.timeout_ms = timed_out.then_some(timeout_ms);
    result.output_limit_bytes =
        (result.stdout_truncated || result.stderr_truncated).then_some(session.limits.output_bytes);
    Ok(result)
}

/// One request to the executor with one reply.
pub(super) async fn one(
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

/// Feeds a running command's stdin (and/or closes it).
pub async fn command_input(session: Arc<Session>, i: CommandInput) -> Result<(), ErrorReply> {
    if i.data.len() > MAX_FILE_CHUNK {
        return Err(invalid(format!(
            "a command_input request holds at most {MAX_FILE_CHUNK} bytes; send the rest in further requests"
        )));
    }
    let req = session.next_req();
    let msg = ToExecutor::CommandInput {
        req,
        pid: i.pid,
        eof: i.eof,
    };
    match one(&session, msg, req, &i.data).await? {
        (FromExecutor::Done { .. }, _) => Ok(()),
        _ => Err(unexpected("command_input")),
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

/// Kills the session and waits (bounded) until its processes are gone (a
/// session with live branches: until it ended as a session, see
/// [`super::lifetime`]).
pub async fn kill(sessions: &Arc<Sessions>, session: Arc<Session>) -> SessionInfo {
    let mut ended = session.ended.subscribe();
    if session.state() == SessionState::EndedWithCheckpoints {
        // Dormant: "ended" once what is left of it is gone.
        session.ended.send_replace(false);
    }
    sessions.end(&session, SessionEnd::Killed);
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
    if matches!(
        session.state(),
        SessionState::Ended | SessionState::EndedWithCheckpoints
    ) {
        return Err(session.ended_error());
    }
    session.set_ttl(Duration::from_millis(ttl_ms));
    Ok(session.info())
}

/// A session's overlay workspace changes so far, as a tar. Taken while the
/// session runs: a file being written meanwhile may be caught half-written
/// (pause the session first for a consistent delta).
pub async fn workspace_delta(session: &Session) -> Result<FileData, ErrorReply> {
    if session.state() == SessionState::Ended {
        return Err(session.ended_error());
    }
    let ready = super::lock(&session.workspace)
        .clone()
        .ok_or_else(|| invalid("this session has no workspace; create it with an overlay workspace to export its changes"))?;
    let data = ready.export().await.map_err(|e| {
        if ready.plan_is_overlay() {
            error(ErrorCode::FileError, format!("exporting the workspace delta: {e}"))
        } else {
            invalid("the session's workspace is direct: its writes are in the host directory already, there is no delta (use mode overlay)")
        }
    })?;
    Ok(FileData {
        size: data.len() as u64,
        data,
        offset: 0,
        eof: true,
    })
}

/// Replaces a session's network allowlist within the operator's bound.
/// Without one before, its egress starts now; an empty list stops it
/// (connections still open are cut).
pub async fn set_network(
    sessions: &Sessions,
    session: &Session,
    allow_net: Vec<String>,
) -> Result<SessionInfo, ErrorReply> {
    if matches!(
        session.state(),
        SessionState::Ended | SessionState::EndedWithCheckpoints
    ) {
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
            B::SessionKill(r) => {
                ResponseBody::Session(kill(&sessions, sessions.get(&r.session, uid)?).await)
            }
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
            B::SessionWorkspaceDelta(r) => {
                let s = sessions.get(&r.session, uid)?;
                ResponseBody::FileData(workspace_delta(&s).await?)
            }
            B::SessionSetNetwork(n) => {
                let s = sessions.get(&n.session, uid)?;
                ResponseBody::Session(set_network(&sessions, &s, n.allow_net).await?)
            }
            B::SessionBranch(b) => {
                let s = sessions.usable(&b.session, uid)?;
                ResponseBody::Sessions {
                    sessions: branch(&sessions, s, b, peer).await?,
                }
            }
            B::SessionCheckpoint(c) => {
                let s = sessions.usable(&c.session, uid)?;
                ResponseBody::Checkpoint(
                    super::checkpoint::take(&sessions, s, c.force, c.keep).await?,
                )
            }
            B::SessionRestore(r) => {
                let s = sessions.get(&r.session, uid)?;
                ResponseBody::Session(if s.state() == SessionState::EndedWithCheckpoints {
                    super::lifetime::revive(&sessions, s, &r.checkpoint).await?
                } else {
                    s.usable()?;
                    s.touch();
                    super::checkpoint::restore(&sessions, s, &r.checkpoint).await?
                })
            }
            B::SessionCheckpoints(r) => ResponseBody::Checkpoints {
                checkpoints: sessions.get(&r.session, uid)?.checkpoint_infos(),
            },
            B::SessionCheckpointDelete(r) => {
                // A dormant session's kept checkpoints can be deleted too.
                let s = sessions.get(&r.session, uid)?;
                if s.state() != SessionState::EndedWithCheckpoints {
                    s.usable()?;
                    s.touch();
                }
                super::checkpoint::delete(&sessions, s, &r.checkpoint).await?;
                ResponseBody::Done {}
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
            B::CommandInput(i) => {
                command_input(sessions.usable(&i.session, uid)?, i).await?;
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
