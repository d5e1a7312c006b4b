//! Sessions: sandboxes that stay alive between requests.
//!
//! A session is forked and isolated exactly like a one-shot sandbox (and may
//! come from the warm pool); its job tells the child to become an executor
//! (`forkd_zygote.py`, `run_session`) that runs cells in an interpreter it
//! forks, moves files and runs commands. One task per session
//! ([`actor`]) owns the child's channels: it writes [`ToExecutor`] frames,
//! routes [`FromExecutor`] replies to the waiting requests by id, enforces
//! the TTL and idle timeout, and cleans up when the child dies. Request
//! handlers ([`ops`]) talk to it through [`Session::request`].
//!
//! A session belongs to the uid that created it (`SO_PEERCRED`); other
//! uids get `unknown_session`, as for an id that never existed (root sees
//! every session).

mod actor;
pub mod checkpoint;
mod lifetime;
pub mod ops;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use forkd_ipc::{
    AppliedLimits, ErrorCode, ErrorReply, KilledBy, SessionEnd, SessionInfo, SessionState,
    SessionUsage,
};
use forkd_zygote::wire::{FromExecutor, ToExecutor};
use tokio::sync::{mpsc, watch, Notify};

use crate::admission::Admission;
use crate::config::SessionsSection;
use crate::sandbox::error;
use crate::state::State;

/// A reply from the executor with its payload.
pub type ExecReply = (FromExecutor, Vec<u8>);

/// What the request handlers tell a session's actor.
enum ActorMsg {
    /// Send `frame` and route the replies for `req` to `replies`.
    Request {
        req: u64,
        frame: Vec<u8>,
        replies: Option<mpsc::UnboundedSender<ExecReply>>,
    },
    /// The session ended as a session (its remnant stays): drop the
    /// requests still waiting, so they learn it ended.
    Forget,
}

/// What changes over a session's life.
struct Life {
    state: SessionState,
    ended_by: Option<SessionEnd>,
    killed_by: Option<KilledBy>,
    deadline: Instant,
    last_used: Instant,
    cells: u64,
    /// Usage read when the session ended (its cgroup is gone after that).
    final_usage: Option<SessionUsage>,
}

/// One live (or just ended) session.
pub struct Session {
    pub id: String,
    pub owner: u32,
    /// The creating peer (for the audit log).
    pub peer: crate::audit::Peer,
    pub zygote: String,
    /// Set again when a spare branch is handed out.
    labels: Mutex<BTreeMap<String, String>>,
    pub limits: AppliedLimits,
    pub warm: bool,
    /// Host pid of its init (the executor): a branch's user namespace
    /// joins its pid namespace.
    pub(crate) pid: i32,
    /// The isolation policy it runs under.
    pub(crate) policy: String,
    /// The job it was started with (a branch's executor gets the same).
    pub(crate) job: forkd_zygote::wire::Job,
    /// The session it was branched from.
    pub parent: Option<String>,
    /// When it was created (a spare branch: handed out).
    created: Mutex<Instant>,
    idle_timeout: Option<Duration>,
    pidfd: Mutex<Option<OwnedFd>>,
    cgroup: Mutex<Option<forkd_pool::CgroupCleanup>>,
    freezer: Mutex<Option<forkd_cgroup::Freezer>>,
    next_req: AtomicU64,
    /// The cgroup's OOM-kill count when last looked at (after a death).
    oom_kills_seen: AtomicU64,
    /// Its egress (proxy, resolver), when it has an allowlist; a tokio lock:
    /// changing the list awaits the egress thread.
    egress: tokio::sync::Mutex<Option<forkd_net::Egress>>,
    /// Its allowlist as asked (for `info`).
    allow_net: Mutex<Vec<String>>,
    /// Its workspace (an overlay's upper layer lives as long as this);
    /// taken when the session ends.
    workspace: Mutex<Option<Arc<crate::workspace::Ready>>>,
    /// Its checkpoints, oldest first (the frozen copies live in its executor).
    checkpoints: Mutex<Vec<checkpoint::Record>>,
    /// Checkpoints being taken (counted against the quotas already).
    checkpoints_pending: AtomicUsize,
    /// Branch shells made ahead of this session's next branch request
    /// (docs/branch.md, "Spare branches").
    spares: Mutex<Vec<ops::Spare>>,
    /// A spare is being made for it.
    refilling: std::sync::atomic::AtomicBool,
    /// A spare branch not handed out yet: in no table, never audited.
    hidden: std::sync::atomic::AtomicBool,
    /// Ended as a session while its branches live: its init stays as their
    /// pid namespace's reaper ([`lifetime`]).
    remnant: std::sync::atomic::AtomicBool,
    /// (A branch.) Its parent ended as a session.
    parent_ended: std::sync::atomic::AtomicBool,
    /// (A first-level branch.) The host uids its own branches get.
    pub(crate) descendant_uids: Option<forkd_pool::uids::UidRange>,
    /// Its `session_ended` record is written (it ended as a session and
    /// stays, dormant or a remnant): its final end writes `session_reaped`.
    end_recorded: std::sync::atomic::AtomicBool,
    to_actor: mpsc::UnboundedSender<ActorMsg>,
    life: Mutex<Life>,
    /// Wakes the actor when the deadline or state changed.
    changed: Notify,
    /// Turns true once the session's processes are gone and it is retired.
    ended: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Session {
    /// A new id for a request to the executor.
    pub fn next_req(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `msg` (with `payload`) to the executor; its replies arrive on
    /// the returned channel, which closes when the session ends.
    pub fn request(
        &self,
        msg: &ToExecutor,
        req: u64,
        payload: &[u8],
    ) -> Result<mpsc::UnboundedReceiver<ExecReply>, ErrorReply> {
        let frame = forkd_zygote::wire::exec_frame(msg, payload)
            .map_err(|e| error(ErrorCode::InvalidRequest, e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.to_actor
            .send(ActorMsg::Request {
                req,
                frame,
                replies: Some(tx),
            })
            .map_err(|_| self.ended_error())?;
        Ok(rx)
    }

    /// Sends `msg`, which has no reply (an interrupt, a kill order); lost
    /// quietly if the session has ended.
    pub fn send(&self, msg: &ToExecutor) {
        if let Ok(frame) = forkd_zygote::wire::exec_frame(msg, &[]) {
            let _ = self.to_actor.send(ActorMsg::Request {
                req: 0,
                frame,
                replies: None,
            });
        }
    }

    /// A descriptor of the session's pid 1 (`None` once it is retired).
    pub fn pidfd(&self) -> Option<OwnedFd> {
        lock(&self.pidfd)
            .as_ref()
            .and_then(|fd| fd.try_clone().ok())
    }

    /// A spare branch handed out: from now on a session like any other.
    pub(crate) fn hand_out(&self, labels: BTreeMap<String, String>, ttl: Duration) {
        *lock(&self.labels) = labels;
        let now = Instant::now();
        *lock(&self.created) = now;
        {
            let mut life = lock(&self.life);
            life.deadline = now + ttl;
            life.last_used = now;
        }
        self.hidden.store(false, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Attaches egress made after the session started (a branch's).
    pub(crate) async fn set_egress(&self, egress: forkd_net::Egress, allow_net: Vec<String>) {
        *self.egress.lock().await = Some(egress);
        *lock(&self.allow_net) = allow_net;
    }

    /// Marks a request: the idle timer starts again.
    pub fn touch(&self) {
        lock(&self.life).last_used = Instant::now();
    }

    pub fn count_cell(&self) {
        lock(&self.life).cells += 1;
    }

    pub fn state(&self) -> SessionState {
        lock(&self.life).state
    }

    /// Running and not paused, or the error that says why not.
    pub fn usable(&self) -> Result<(), ErrorReply> {
        match self.state() {
            SessionState::Running => Ok(()),
            SessionState::Paused => Err(error(
                ErrorCode::SessionPaused,
                format!(
                    "session {} is paused; resume it (session_resume) first",
                    self.id
                ),
            )),
            SessionState::Ended | SessionState::EndedWithCheckpoints => Err(self.ended_error()),
        }
    }

    /// The error for a request to this session once it ended.
    pub fn ended_error(&self) -> ErrorReply {
        let life = lock(&self.life);
        let why = match (life.ended_by, life.killed_by) {
            (_, Some(KilledBy::Oom)) => {
                "it ran out of memory (raise limits.memory_bytes)".to_string()
            }
            (Some(SessionEnd::Killed), _) => "it was killed".to_string(),
            (Some(SessionEnd::Ttl), _) => {
                "its TTL expired (set a longer ttl_ms, or session_set_ttl)".to_string()
            }
            (Some(SessionEnd::Idle), _) => {
                "it was idle longer than its idle_timeout_ms".to_string()
            }
            (Some(SessionEnd::Shutdown), _) => "the daemon shut down".to_string(),
            (Some(SessionEnd::Died), _) | (None, _) => {
                "its processes died (the daemon's log may say more)".to_string()
            }
        };
        if life.state == SessionState::EndedWithCheckpoints {
            return error(
                ErrorCode::SessionEnded,
                format!("session {} has ended: {why}; it keeps checkpoints: session_restore one of them to run it again (session_checkpoints lists them)", self.id),
            );
        }
        error(
            ErrorCode::SessionEnded,
            format!("session {} has ended: {why}; create a new one", self.id),
        )
    }

    /// Ends the session for `why` (the first reason given stands).
    pub fn kill(&self, why: SessionEnd) {
        {
            let mut life = lock(&self.life);
            if life.state == SessionState::Ended {
                return;
            }
            life.ended_by.get_or_insert(why);
        }
        // A frozen process only dies once thawed.
        if let Some(f) = lock(&self.freezer).as_ref() {
            let _ = f.thaw();
        }
        if let Some(fd) = lock(&self.pidfd).as_ref() {
            forkd_pool::kill_pidfd(fd.as_fd());
        }
    }

    /// Sets the remaining lifetime.
    pub fn set_ttl(&self, ttl: Duration) {
        lock(&self.life).deadline = Instant::now() + ttl;
        self.changed.notify_one();
    }

    /// Freezes (`true`) or thaws the session's processes.
    pub fn pause(&self, paused: bool) -> Result<(), ErrorReply> {
        let mut life = lock(&self.life);
        match (life.state, paused) {
            (SessionState::Ended | SessionState::EndedWithCheckpoints, _) => {
                drop(life);
                return Err(self.ended_error());
            }
            (SessionState::Paused, true) | (SessionState::Running, false) => return Ok(()),
            _ => {}
        }
        let mut freezer = lock(&self.freezer);
        if freezer.is_none() {
            let made = lock(&self.cgroup)
                .as_ref()
                .and_then(|c| c.get().map(|cg| cg.freezer()))
                .transpose()
                .map_err(|e| error(ErrorCode::Internal, format!("cannot freeze: {e}")))?;
            match made {
                Some(f) => *freezer = Some(f),
                None => {
                    return Err(error(
                        ErrorCode::InvalidRequest,
                        "this daemon has no cgroup to freeze sessions with (rootless without a delegated cgroup); pause is unavailable",
                    ))
                }
            }
        }
        let f = freezer
            .as_ref()
            .ok_or_else(|| error(ErrorCode::Internal, "freezer"))?;
        let r = if paused { f.freeze() } else { f.thaw() };
        r.map_err(|e| {
            error(
                ErrorCode::Internal,
                format!(
                    "cannot {} session {}: {e}",
                    if paused { "pause" } else { "resume" },
                    self.id
                ),
            )
        })?;
        life.state = if paused {
            SessionState::Paused
        } else {
            SessionState::Running
        };
        // The idle clock does not run while paused.
        life.last_used = Instant::now();
        drop(life);
        self.changed.notify_one();
        Ok(())
    }

    /// OOM kills in the session's cgroup so far.
    /// Whether the out-of-memory killer struck in the session's cgroup
    /// since the last look. Read from the cgroup only when asked (after a
    /// death), never per cell: the files cost ~100 us of path walks.
    pub fn oom_since_last_look(&self) -> bool {
        let now = self.oom_kills();
        now > self.oom_kills_seen.swap(now, Ordering::Relaxed)
    }

    fn oom_kills(&self) -> u64 {
        lock(&self.cgroup)
            .as_ref()
            .and_then(|c| c.get())
            .and_then(|cg| cg.counters().ok())
            .map_or(0, |s| s.oom_kills)
    }

    fn usage_now(&self) -> SessionUsage {
        let cg = lock(&self.cgroup);
        self.usage_from(cg.as_ref().and_then(|c| c.get()))
    }

    /// Usage read from the session's cgroup (zero without one).
    fn usage_from(&self, cg: Option<&forkd_cgroup::SandboxCgroup>) -> SessionUsage {
        let Some(cg) = cg else {
            return SessionUsage::default();
        };
        let stats = cg.counters().unwrap_or_default();
        let (memory, pids) = cg.usage_now();
        SessionUsage {
            memory_bytes: memory.unwrap_or(0),
            peak_memory_bytes: stats.memory_peak_bytes.unwrap_or(0),
            cpu_user_us: stats.cpu_user_us.unwrap_or(0),
            cpu_system_us: stats.cpu_system_us.unwrap_or(0),
            pids: pids.unwrap_or(0),
        }
    }

    /// The session as `session_info` shows it.
    pub fn info(&self) -> SessionInfo {
        let (state, ended_by, killed_by, deadline, cells, final_usage) = {
            let l = lock(&self.life);
            (
                l.state,
                l.ended_by,
                l.killed_by,
                l.deadline,
                l.cells,
                l.final_usage.clone(),
            )
        };
        let usage = match final_usage {
            Some(u) => u,
            None => self.usage_now(),
        };
        SessionInfo {
            session: self.id.clone(),
            zygote: self.zygote.clone(),
            state,
            ended_by,
            killed_by,
            labels: lock(&self.labels).clone(),
            age_ms: millis(lock(&self.created).elapsed()),
            ttl_left_ms: if matches!(
                state,
                SessionState::Ended | SessionState::EndedWithCheckpoints
            ) {
                0
            } else {
                millis(deadline.saturating_duration_since(Instant::now()))
            },
            idle_timeout_ms: self.idle_timeout.map(millis),
            allow_net: lock(&self.allow_net).clone(),
            cells,
            usage,
            limits: self.limits.clone(),
            warm: self.warm,
            parent: self.parent.clone(),
            checkpoints: self.checkpoint_infos(),
            spare_branches: u32::try_from(lock(&self.spares).len()).unwrap_or(u32::MAX),
            parent_ended: self.parent_ended.load(Ordering::Relaxed),
        }
    }

    /// Its egress allowlist as asked.
    pub(crate) fn allow_net(&self) -> Vec<String> {
        lock(&self.allow_net).clone()
    }

    /// Whether it has a workspace.
    pub(crate) fn has_workspace(&self) -> bool {
        lock(&self.workspace).is_some()
    }

    /// The `cgroup.procs` files of its cgroup.
    pub(crate) fn cgroup_procs(&self) -> Vec<std::path::PathBuf> {
        lock(&self.cgroup)
            .as_ref()
            .and_then(|c| c.get().map(|cg| cg.procs_files().to_vec()))
            .unwrap_or_default()
    }
}

/// Every session of the daemon, by id.
pub struct Sessions {
    pub(crate) state: Arc<State>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) cfg: SessionsSection,
    table: Mutex<Table>,
    counts: Counts,
    audit: Option<Arc<crate::audit::AuditLog>>,
    /// For the egress counters of sessions (spawns record theirs with their
    /// result).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Counters for the metrics endpoint.
#[derive(Default)]
struct Counts {
    created: AtomicU64,
    cells: AtomicU64,
    /// By [`SessionEnd`], in [`END_LABELS`] order.
    ended: [AtomicU64; 5],
    /// Session requests answered, by (operation, outcome): `ok` or the
    /// error code. A few dozen keys at most; one short lock per request.
    requests: Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
}

const END_LABELS: [&str; 5] = ["killed", "ttl", "idle", "died", "shutdown"];

fn end_index(e: SessionEnd) -> usize {
    match e {
        SessionEnd::Killed => 0,
        SessionEnd::Ttl => 1,
        SessionEnd::Idle => 2,
        SessionEnd::Died => 3,
        SessionEnd::Shutdown => 4,
    }
}

#[derive(Default)]
struct Table {
    live: HashMap<String, Arc<Session>>,
    /// Recently ended sessions, oldest first (for `session_info`).
    ended: VecDeque<Arc<Session>>,
    /// Ended sessions whose init stays until their branches end.
    remnants: HashMap<String, Arc<Session>>,
}

impl Sessions {
    pub fn new(
        state: Arc<State>,
        admission: Arc<Admission>,
        cfg: SessionsSection,
        audit: Option<Arc<crate::audit::AuditLog>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Sessions {
        Sessions {
            state,
            admission,
            cfg,
            table: Mutex::new(Table::default()),
            counts: Counts::default(),
            audit,
            metrics,
        }
    }

    /// How many more spare branches `uid` may get: spares count against the
    /// session limits (`[sessions] max`, `max_per_uid`) as sessions do, so
    /// that keeping them ready can never hold more than the limits allow.
    pub(crate) fn spare_room(&self, uid: u32) -> usize {
        let table = lock(&self.table);
        let held = |s: &Arc<Session>| 1 + lock(&s.spares).len();
        let all: usize =
            table.live.values().map(held).sum::<usize>() + Self::remnants_of(&table, None);
        let own: usize = table
            .live
            .values()
            .filter(|s| s.owner == uid)
            .map(held)
            .sum::<usize>()
            + Self::remnants_of(&table, Some(uid));
        self.cfg
            .max
            .saturating_sub(all)
            .min(self.cfg.max_per_uid.saturating_sub(own))
    }

    /// Room for one more checkpoint of `session` within the quotas
    /// (`[sessions] max_checkpoints_per_session`, `max_checkpoints_per_uid`),
    /// held until the returned slot is committed or dropped. Checked and
    /// taken under the table's lock, so that concurrent requests cannot
    /// overshoot.
    pub(crate) fn reserve_checkpoint(
        &self,
        session: &Arc<Session>,
    ) -> Result<checkpoint::Slot, ErrorReply> {
        let table = lock(&self.table);
        let per_session = self.cfg.max_checkpoints_per_session;
        if session.checkpoint_count() >= per_session {
            return Err(error(
                ErrorCode::LimitExceedsPolicy,
                format!(
                    "session {} already keeps {per_session} checkpoints, the maximum ([sessions] max_checkpoints_per_session); delete some first",
                    session.id
                ),
            ));
        }
        let own: usize = table
            .live
            .values()
            .filter(|s| s.owner == session.owner)
            .map(|s| s.checkpoint_count())
            .sum();
        if own >= self.cfg.max_checkpoints_per_uid {
            return Err(error(
                ErrorCode::LimitExceedsPolicy,
                format!(
                    "uid {} already keeps {own} checkpoints, the maximum ([sessions] max_checkpoints_per_uid); delete some first",
                    session.owner
                ),
            ));
        }
        Ok(checkpoint::Slot::take(session.clone()))
    }

    /// Writes an audit record of `session` (off the request's path).
    fn audit(
        &self,
        event: &'static str,
        session: &Session,
        outcome: &'static str,
        network: Option<forkd_ipc::NetworkReport>,
    ) {
        self.audit_record(event, session, outcome, network, None)
    }

    fn audit_record(
        &self,
        event: &'static str,
        session: &Session,
        outcome: &'static str,
        network: Option<forkd_ipc::NetworkReport>,
        checkpoint: Option<String>,
    ) {
        if let Some(audit) = &self.audit {
            let mut record = Box::new(crate::audit::Record::session(
                event,
                session.peer,
                &session.info(),
                outcome,
            ));
            record.network = network.map(Box::new);
            record.checkpoint = checkpoint;
            if let Err(record) = audit.try_record(record) {
                let audit = audit.clone();
                tokio::spawn(async move { audit.record(record).await });
            }
        }
    }

    /// The session figures for a metrics scrape.
    pub fn snapshot(&self) -> crate::metrics::SessionSnapshot {
        crate::metrics::SessionSnapshot {
            live: self.live() as u64,
            created: self.counts.created.load(Ordering::Relaxed),
            cells: self.counts.cells.load(Ordering::Relaxed),
            ended: END_LABELS
                .iter()
                .zip(&self.counts.ended)
                .map(|(l, n)| (*l, n.load(Ordering::Relaxed)))
                .collect(),
            requests: lock(&self.counts.requests)
                .iter()
                .map(|(&(op, outcome), &n)| (op, outcome, n))
                .collect(),
        }
    }

    /// Counts one answered session request.
    pub(crate) fn count_request(&self, op: &'static str, outcome: &'static str) {
        *lock(&self.counts.requests)
            .entry((op, outcome))
            .or_default() += 1;
    }

    pub(crate) fn count_cell(&self) {
        self.counts.cells.fetch_add(1, Ordering::Relaxed);
    }

    /// The session `id` as `uid` may see it, live or recently ended.
    pub fn get(&self, id: &str, uid: u32) -> Result<Arc<Session>, ErrorReply> {
        let table = lock(&self.table);
        let found = table
            .live
            .get(id)
            .cloned()
            .or_else(|| table.ended.iter().find(|s| s.id == id).cloned());
        match found {
            Some(s) if uid == 0 || s.owner == uid => Ok(s),
            _ => Err(error(
                ErrorCode::UnknownSession,
                format!("no session {id:?} is visible to uid {uid}; list yours with session_list"),
            )),
        }
    }

    /// A live session `id` of `uid`'s that takes requests now.
    pub fn usable(&self, id: &str, uid: u32) -> Result<Arc<Session>, ErrorReply> {
        let s = self.get(id, uid)?;
        s.usable()?;
        s.touch();
        Ok(s)
    }

    /// The live sessions `uid` may see carrying every label in `labels`.
    pub fn list(&self, uid: u32, labels: &BTreeMap<String, String>) -> Vec<SessionInfo> {
        let mut sessions: Vec<Arc<Session>> = lock(&self.table)
            .live
            .values()
            .filter(|s| uid == 0 || s.owner == uid)
            .filter(|s| {
                let own = lock(&s.labels);
                labels.iter().all(|(k, v)| own.get(k) == Some(v))
            })
            .cloned()
            .collect();
        sessions.sort_by_key(|s| *lock(&s.created));
        sessions.iter().map(|s| s.info()).collect()
    }

    /// Sessions alive now.
    pub fn live(&self) -> usize {
        lock(&self.table).live.len()
    }

    /// Room for one more session of `uid`'s, or the error that says why not.
    fn admit(&self, uid: u32) -> Result<(), ErrorReply> {
        if self.state.is_draining() {
            return Err(crate::sandbox::shutting_down());
        }
        let table = lock(&self.table);
        // A remnant (an ended parent kept for its branches) still holds a
        // process and a cgroup: it counts until reaped.
        if table.live.len() + Self::remnants_of(&table, None) >= self.cfg.max {
            return Err(error(
                ErrorCode::LimitExceedsPolicy,
                format!(
                    "this daemon already runs its maximum of {} sessions ([sessions] max); kill some first",
                    self.cfg.max
                ),
            ));
        }
        let own = table.live.values().filter(|s| s.owner == uid).count()
            + Self::remnants_of(&table, Some(uid));
        if own >= self.cfg.max_per_uid {
            return Err(error(
                ErrorCode::LimitExceedsPolicy,
                format!(
                    "uid {uid} already holds {own} sessions, the maximum ([sessions] max_per_uid); kill some first"
                ),
            ));
        }
        Ok(())
    }

    fn insert(&self, session: Arc<Session>) {
        self.counts.created.fetch_add(1, Ordering::Relaxed);
        self.audit("session_created", &session, "ok", None);
        lock(&self.table).live.insert(session.id.clone(), session);
    }

    /// Moves an ended session to the remembered ones.
    fn retire(
        &self,
        session: &Session,
        why: SessionEnd,
        network: Option<forkd_ipc::NetworkReport>,
    ) {
        // Its spares die with it (they live in its pid namespace).
        lock(&session.spares).clear();
        if session.hidden.load(Ordering::Relaxed) {
            return; // a spare never handed out: nobody knew of it
        }
        if session.end_recorded.load(Ordering::Relaxed) {
            // Ended as a session before (dormant, or a remnant): now gone.
            self.audit("session_reaped", session, "ok", network);
        } else {
            self.counts.ended[end_index(why)].fetch_add(1, Ordering::Relaxed);
            self.audit(
                "session_ended",
                session,
                END_LABELS[end_index(why)],
                network,
            );
        }
        let id = session.id.as_str();
        let mut table = lock(&self.table);
        table.remnants.remove(id);
        if let Some(s) = table.live.remove(id) {
            table.ended.push_back(s);
            while table.ended.len() > self.cfg.remember_ended {
                table.ended.pop_front();
            }
        }
        drop(table);
        if let Some(parent) = &session.parent {
            self.reap_if_orphaned(parent);
        }
    }

    /// Kills every live session (daemon shutdown), remnants too.
    pub fn kill_all(&self, why: SessionEnd) {
        let live: Vec<Arc<Session>> = lock(&self.table).live.values().cloned().collect();
        for s in live {
            s.kill(why);
        }
        self.reap_remnants();
    }
}

/// A fresh, unguessable session id.
fn new_id() -> String {
    let mut bytes = [0u8; 12];
    if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).is_err() {
        // getrandom(2) cannot fail for a 12-byte request once the pool is
        // initialised; fall back to the clock rather than refuse.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes.copy_from_slice(&t.to_le_bytes()[..12]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("s-{hex}")
}
