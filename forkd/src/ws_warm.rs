//! Warm children per workspace: after a workspace request, children are
//! kept ready with that workspace already mounted (and, in overlay mode,
//! each with its own fresh upper layer), so the next identical request is
//! served like a warm-pool spawn instead of forking and mounting on demand.
//!
//! A key is everything the child was made with: the zygote, its isolation
//! plan (policy, limits) and the workspace's mount plan as planned for the
//! request (host directory, rules, mode, mount point, owner) and the
//! requester's uid/gid. Every check of the request path still runs at
//! request time for the requesting peer ([`crate::workspace::plan_request`]:
//! allowed names and roots, the peer's own access, the plan re-validated by
//! stat-ing the directories it listed); a warm child is handed over only
//! when the freshly validated plan equals the one it was built with, so a
//! tree that changed (a plan that went stale) or another requester never
//! gets it. Keys are bounded (`max_keys`, least recently used dropped) as
//! are children per key (`per_key`); a key unused for `idle` is dropped with
//! its children. Dropped children are killed and their cgroups reaped
//! ([`forkd_pool::ReadyChild`]); an upper layer goes with its descriptor.
//! The operator configuration cannot change while the daemon runs (a
//! restart drops every warm child).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_ipc::{ErrorCode, ErrorReply};
use forkd_pool::{ChildPlan, Makers, ReadyChild};

use crate::state::State;
use crate::workspace::Ready;

/// How many workspace children are kept, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub per_key: usize,
    pub max_keys: usize,
    pub idle: Duration,
}

impl From<crate::config::WorkspaceWarmSection> for Policy {
    fn from(s: crate::config::WorkspaceWarmSection) -> Policy {
        Policy {
            per_key: s.per_key,
            max_keys: s.max_keys,
            idle: Duration::from_millis(s.idle_ms),
        }
    }
}

/// Counters (logged at shutdown; also read by tests through the result's
/// `warm` flag).
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub refills: AtomicU64,
    pub discarded: AtomicU64,
    pub refill_failures: AtomicU64,
}

struct Entry {
    /// Identifies the entry to its refill task (keys can be dropped and
    /// made again meanwhile).
    id: u64,
    zygote: String,
    /// The child plan, its workspace without an upper layer.
    plan: ChildPlan,
    requester: Option<(u32, u32)>,
    /// The workspace the children are made from (no upper layer yet).
    template: Ready,
    ready: VecDeque<(ReadyChild, Ready)>,
    last_used: Instant,
    refilling: bool,
}

/// The warm workspace children of one daemon.
pub struct WsWarm {
    policy: Policy,
    makers: Makers,
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    sweeping: AtomicBool,
    stopped: AtomicBool,
    /// Refill tasks running (shutdown waits for them: one may be making a
    /// child, with its cgroup, right then).
    refills_running: AtomicUsize,
    pub stats: Stats,
}

/// While requests run, a refill waits (at most this long) unless its key has
/// no child left: on two cores its fork and mounts compete with them.
const REFILL_QUIET_WAIT: Duration = Duration::from_millis(100);
/// A key whose children cannot be made is dropped (a refill failed this
/// many times in a row, e.g. the tree became unplannable).
const MAX_REFILL_FAILURES: u32 = 3;

impl WsWarm {
    pub fn new(policy: Policy, makers: Makers) -> WsWarm {
        WsWarm {
            policy,
            makers,
            entries: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            sweeping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            refills_running: AtomicUsize::new(0),
            stats: Stats::default(),
        }
    }

    /// Warm children parked right now (all keys).
    pub fn ready(&self) -> usize {
        self.entries
            .lock()
            .map(|e| e.iter().map(|e| e.ready.len()).sum())
            .unwrap_or(0)
    }

    /// Stops refilling, waits (bounded) for the refills under way, and kills
    /// every parked child.
    pub async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        let waited = Instant::now();
        while self.refills_running.load(Ordering::Acquire) > 0
            && waited.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let dropped: Vec<Entry> = self
            .entries
            .lock()
            .map(|mut e| e.drain(..).collect())
            .unwrap_or_default();
        drop(dropped);
    }
}

/// The child for a request with `workspace`: a warm one made for the same
/// key if one is parked (the workspace is then the one it was made with,
/// its own upper layer included), otherwise none (the caller forks one on
/// demand) and the workspace gets its upper layer now. Either way `plan`
/// carries the workspace, and the key is (re)filled for the next request.
pub(crate) async fn take(
    state: &State,
    zygote: &str,
    plan: &mut ChildPlan,
    workspace: Option<Ready>,
) -> Result<(Option<ReadyChild>, Option<Ready>), ErrorReply> {
    let Some(workspace) = workspace else {
        plan.workspace = None;
        return Ok((None, None));
    };
    let warm = &state.ws_warm;
    if warm.policy.per_key == 0 || !workspace.warmable() || state.is_draining() {
        let workspace = workspace.with_upper().await?;
        plan.workspace = Some(workspace.plan.clone());
        return Ok((None, Some(workspace)));
    }
    plan.workspace = Some(workspace.plan.clone());
    let (taken, evicted, refill) = {
        let mut entries = warm
            .entries
            .lock()
            .map_err(|_| internal("warm workspace children: poisoned lock"))?;
        let mut evicted = None;
        let at = match entries.iter().position(|e| {
            e.zygote == zygote && e.requester == workspace.requester && e.plan == *plan
        }) {
            Some(at) => at,
            None => {
                if entries.len() >= warm.policy.max_keys.max(1) {
                    let lru = (0..entries.len())
                        .min_by_key(|&i| entries[i].last_used)
                        .unwrap_or(0);
                    evicted = Some(entries.swap_remove(lru));
                }
                entries.push(Entry {
                    id: warm.next_id.fetch_add(1, Ordering::Relaxed),
                    zygote: zygote.to_string(),
                    plan: plan.clone(),
                    requester: workspace.requester,
                    template: workspace.blank(),
                    ready: VecDeque::new(),
                    last_used: Instant::now(),
                    refilling: false,
                });
                entries.len() - 1
            }
        };
        let entry = &mut entries[at];
        entry.last_used = Instant::now();
        let mut taken = None;
        let mut stale = Vec::new();
        while let Some((mut child, ws)) = entry.ready.pop_front() {
            if child.is_usable() {
                taken = Some((child, ws));
                break;
            }
            stale.push((child, ws));
        }
        warm.stats
            .discarded
            .fetch_add(stale.len() as u64, Ordering::Relaxed);
        let refill = (!entry.refilling).then(|| {
            entry.refilling = true;
            entry.id
        });
        (taken, (evicted, stale), refill)
    };
    drop(evicted); // killed outside the lock; cgroups reaped in the background
    if let Some(id) = refill {
        spawn_refill(&state.ws_warm, id);
    }
    if !warm.sweeping.swap(true, Ordering::AcqRel) {
        tokio::spawn(sweep(state.ws_warm.clone()));
    }
    match taken {
        Some((child, ws)) => {
            warm.stats.hits.fetch_add(1, Ordering::Relaxed);
            plan.workspace = Some(ws.plan.clone());
            Ok((Some(child), Some(ws)))
        }
        None => {
            warm.stats.misses.fetch_add(1, Ordering::Relaxed);
            let workspace = workspace.with_upper().await?;
            plan.workspace = Some(workspace.plan.clone());
            Ok((None, Some(workspace)))
        }
    }
}

fn internal(message: &str) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::Internal,
        message: message.to_string(),
    }
}

/// Starts [`refill_key`], counted in `refills_running` until it ends.
fn spawn_refill(warm: &Arc<WsWarm>, id: u64) {
    struct Running(Arc<WsWarm>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.refills_running.fetch_sub(1, Ordering::AcqRel);
        }
    }
    warm.refills_running.fetch_add(1, Ordering::AcqRel);
    let running = Running(warm.clone());
    tokio::spawn(async move {
        let warm = running.0.clone();
        refill_key(warm, id).await;
        drop(running);
    });
}

/// Makes children for entry `id` until it holds `per_key`, then ends.
async fn refill_key(warm: Arc<WsWarm>, id: u64) {
    let mut failures = 0u32;
    loop {
        if warm.stopped.load(Ordering::Acquire) {
            return;
        }
        // Let the requests in flight (the one that triggered this included)
        // finish first, unless this key has nothing left to serve.
        let waited = Instant::now();
        while warm.makers.load.in_flight() > 0 && waited.elapsed() < REFILL_QUIET_WAIT {
            let empty = warm
                .entries
                .lock()
                .map(|e| e.iter().any(|e| e.id == id && e.ready.is_empty()))
                .unwrap_or(true);
            if empty {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let job = {
            let Ok(mut entries) = warm.entries.lock() else {
                return;
            };
            let Some(entry) = entries.iter_mut().find(|e| e.id == id) else {
                return; // dropped meanwhile
            };
            if entry.ready.len() >= warm.policy.per_key {
                entry.refilling = false;
                return;
            }
            (
                entry.zygote.clone(),
                entry.plan.clone(),
                entry.template.blank(),
            )
        };
        let (zygote_name, mut plan, template) = job;
        let made = make_child(&warm, &zygote_name, &mut plan, template).await;
        let mut dropped = None;
        {
            let Ok(mut entries) = warm.entries.lock() else {
                return;
            };
            let at = entries.iter().position(|e| e.id == id);
            match (made, at) {
                (Ok(pair), Some(at)) if !warm.stopped.load(Ordering::Acquire) => {
                    warm.stats.refills.fetch_add(1, Ordering::Relaxed);
                    entries[at].ready.push_back(pair);
                    failures = 0;
                }
                (Ok(pair), _) => {
                    dropped = Some(pair); // the key went away meanwhile
                }
                (Err(e), at) => {
                    warm.stats.refill_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(zygote = %zygote_name, "warm workspace child not made: {e}");
                    failures += 1;
                    if let Some(at) = at {
                        if failures >= MAX_REFILL_FAILURES {
                            let gone = entries.swap_remove(at);
                            drop(entries);
                            drop(gone);
                            return;
                        }
                    }
                }
            }
        }
        drop(dropped);
        if failures > 0 {
            tokio::time::sleep(Duration::from_millis(50) * failures).await;
        }
    }
}

/// One parked child with its own copy of the workspace (its own upper
/// layer in overlay mode).
async fn make_child(
    warm: &WsWarm,
    zygote_name: &str,
    plan: &mut ChildPlan,
    template: Ready,
) -> Result<(ReadyChild, Ready), String> {
    let ws = tokio::task::spawn_blocking(move || {
        let mut ws = template;
        ws.fill_upper().map(|()| ws)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.message)?;
    plan.workspace = Some(ws.plan.clone());
    let zygote = warm
        .makers
        .supervisor
        .get(zygote_name)
        .await
        .map_err(|e| e.to_string())?;
    let sandbox = warm.makers.ids.fetch_add(1, Ordering::Relaxed);
    let child = forkd_pool::prepare_parked(
        &zygote,
        &warm.makers.cgroups,
        warm.makers.netns.as_ref().as_ref(),
        sandbox,
        plan.clone(),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((child, ws))
}

/// Drops keys idle longer than the policy allows and children that died or
/// whose zygote was recycled; ends when no key is left.
async fn sweep(warm: Arc<WsWarm>) {
    let every = (warm.policy.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        let mut dropped: Vec<(ReadyChild, Ready)> = Vec::new();
        let mut gone: Vec<Entry> = Vec::new();
        let done = {
            let Ok(mut entries) = warm.entries.lock() else {
                return;
            };
            let mut i = 0;
            while i < entries.len() {
                if entries[i].last_used.elapsed() >= warm.policy.idle {
                    gone.push(entries.swap_remove(i));
                    continue;
                }
                let entry = &mut entries[i];
                let before = entry.ready.len();
                let mut kept = VecDeque::with_capacity(before);
                for (mut child, ws) in entry.ready.drain(..) {
                    if child.is_usable() {
                        kept.push_back((child, ws));
                    } else {
                        dropped.push((child, ws));
                    }
                }
                entry.ready = kept;
                // A zygote recycle or a death left the key short: refill it.
                if entry.ready.len() < before && !entry.refilling {
                    entry.refilling = true;
                    spawn_refill(&warm, entry.id);
                }
                i += 1;
            }
            let done = entries.is_empty() || warm.stopped.load(Ordering::Acquire);
            if done {
                warm.sweeping.store(false, Ordering::Release);
            }
            done
        };
        warm.stats
            .discarded
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        drop(dropped);
        drop(gone);
        if done {
            return;
        }
    }
}
