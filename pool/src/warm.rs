//! The warm pool: children forked and fully isolated before any request.
//!
//! Per zygote, a refill task keeps `target` [`ReadyChild`]ren parked, each in
//! its own cgroup (with the default limits), namespaces, landlock and seccomp,
//! blocked reading its job. A request takes one (O(1), never waiting behind a
//! refill) and the task makes a replacement in the background. When the pool
//! is empty, or the request needs a different isolation plan, the caller
//! prepares a child on demand; both paths run the same code in the child, so
//! a program cannot tell them apart. Children are never reused.
//!
//! The pool's size adapts between `min` and `max`: a miss (a request found
//! it empty) doubles the target, and a window of `shrink_after` in which
//! requests never drew the pool below `low` children (and nothing missed)
//! lowers the target by half of that unused headroom. With `min == max` the
//! size is fixed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkd_cgroup::Manager;
use tokio::sync::Notify;

use crate::child::{prepare_parked, ChildPlan, ReadyChild};
use crate::netns::NetnsStock;
use crate::Supervisor;

/// Counters of one pool.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub refills: AtomicU64,
    pub discarded: AtomicU64,
    /// Parked children dropped because the pool shrank.
    pub shrunk: AtomicU64,
}

/// How a pool is sized and refilled.
#[derive(Debug, Clone, Copy)]
pub struct PoolPolicy {
    /// Children kept ready at start (clamped to `min..=max`).
    pub target: usize,
    /// The size never shrinks below this ...
    pub min: usize,
    /// ... nor grows above this.
    pub max: usize,
    /// Window over which unused headroom is measured before shrinking.
    pub shrink_after: Duration,
    /// Children prepared at once while refilling (the zygote forks one at a
    /// time; the daemon-side setup and each child's isolation overlap).
    pub refill_concurrency: usize,
    /// Children parked longer than this are replaced (`None`: kept until used).
    pub max_idle: Option<Duration>,
}

struct Inner {
    zygote: String,
    plan: ChildPlan,
    target: AtomicUsize,
    min: usize,
    max: usize,
    shrink_after: Duration,
    /// Fewest children left parked after a take in the current window.
    low_water: AtomicUsize,
    /// Misses in the current window.
    window_misses: AtomicU64,
    refill_concurrency: usize,
    max_idle: Option<Duration>,
    ready: Mutex<VecDeque<ReadyChild>>,
    wake: Notify,
    stopped: AtomicBool,
    stats: PoolStats,
    /// When a request last took a child (µs since `epoch`).
    last_take_us: AtomicU64,
    epoch: std::time::Instant,
}

impl Inner {
    /// Demand outran the pool: double the target (at most `max`).
    fn grow(&self) {
        let _ = self
            .target
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                let grown = t.saturating_mul(2).max(1).min(self.max);
                (grown != t).then_some(grown)
            });
    }

    /// At the end of a window: shrink by half the headroom requests never
    /// used. Returns the new target.
    fn adapt(&self, parked_now: usize) -> usize {
        let low = self.low_water.swap(parked_now, Ordering::Relaxed);
        let missed = self.window_misses.swap(0, Ordering::Relaxed);
        let target = self.target.load(Ordering::Relaxed);
        // No take at all in the window: everything parked was unused.
        let unused = low.min(parked_now).min(target);
        if missed > 0 || unused == 0 || target <= self.min {
            return target;
        }
        let shrunk = target.saturating_sub(unused.div_ceil(2)).max(self.min);
        self.target.store(shrunk, Ordering::Relaxed);
        shrunk
    }
}

/// Refills wait until requests have left the pool alone this long: on a small
/// machine a refill fork competes for the CPU a burst of requests needs, and
/// a burst is better served by the children already parked.
const QUIET_BEFORE_REFILL: Duration = Duration::from_millis(3);

/// Sources a refill task needs; shared with the daemon's on-demand path.
/// Requests in flight, counted by the daemon around each request. On two
/// cores a refill competes with the requests it is meant to serve, so the
/// pool refills between them (or at once when it runs low).
#[derive(Debug, Default)]
pub struct Load {
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Load>);

impl Load {
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Microseconds since `epoch`, saturating.
fn micros_since(epoch: std::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A refill waits while requests are in flight unless the pool has fallen
/// below this fraction of its target.
const REFILL_WHILE_BUSY_BELOW: usize = 4; // a quarter
/// Longest a refill is deferred in one go (then the state is looked at again).
const BUSY_RECHECK: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct Makers {
    pub supervisor: Arc<Supervisor>,
    pub cgroups: Arc<Manager>,
    pub netns: Arc<Option<NetnsStock>>,
    /// Sandbox ids, shared with on-demand children so they never collide.
    pub ids: Arc<AtomicU64>,
    pub load: Arc<Load>,
}

pub struct WarmPool {
    inner: Arc<Inner>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl WarmPool {
    /// Starts filling a pool of `target` children of `zygote` made with `plan`.
    pub fn start(zygote: &str, plan: ChildPlan, policy: PoolPolicy, makers: Makers) -> WarmPool {
        let max = policy.max.max(policy.min);
        let target = policy.target.clamp(policy.min, max);
        let inner = Arc::new(Inner {
            zygote: zygote.to_string(),
            plan,
            target: AtomicUsize::new(target),
            min: policy.min,
            max,
            shrink_after: policy.shrink_after,
            low_water: AtomicUsize::new(usize::MAX),
            window_misses: AtomicU64::new(0),
            refill_concurrency: policy.refill_concurrency.max(1),
            max_idle: policy.max_idle,
            ready: Mutex::new(VecDeque::with_capacity(target)),
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            stats: PoolStats::default(),
            last_take_us: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        });
        let task = tokio::spawn(refill(inner.clone(), makers));
        WarmPool {
            inner,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn plan(&self) -> &ChildPlan {
        &self.inner.plan
    }

    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Host pids of the parked children (for memory accounting).
    pub fn child_pids(&self) -> Vec<i32> {
        self.inner
            .ready
            .lock()
            .map(|r| r.iter().map(|c| c.pid).collect())
            .unwrap_or_default()
    }

    /// Children the pool currently aims to keep ready.
    pub fn target(&self) -> usize {
        self.inner.target.load(Ordering::Relaxed)
    }

    /// The bounds the target moves between.
    pub fn bounds(&self) -> (usize, usize) {
        (self.inner.min, self.inner.max)
    }

    /// Children ready right now.
    pub fn ready(&self) -> usize {
        self.inner.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// A ready child, if one is parked; counts a miss otherwise.
    pub fn take(&self) -> Option<ReadyChild> {
        let taken = {
            let mut ready = self.inner.ready.lock().ok()?;
            let mut found = None;
            while let Some(mut child) = ready.pop_front() {
                if child.is_usable() {
                    found = Some(child);
                    break;
                }
                self.inner.stats.discarded.fetch_add(1, Ordering::Relaxed);
            }
            self.inner
                .low_water
                .fetch_min(ready.len(), Ordering::Relaxed);
            found
        };
        if taken.is_none() {
            self.inner.window_misses.fetch_add(1, Ordering::Relaxed);
            self.inner.grow();
        }
        let now = micros_since(self.inner.epoch);
        self.inner.last_take_us.store(now, Ordering::Relaxed);
        self.inner.wake.notify_one();
        let counter = if taken.is_some() {
            &self.inner.stats.hits
        } else {
            &self.inner.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        taken
    }

    /// Stops refilling and kills the parked children.
    pub async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let parked: Vec<ReadyChild> = self
            .inner
            .ready
            .lock()
            .map(|mut r| r.drain(..).collect())
            .unwrap_or_default();
        drop(parked);
    }
}

async fn refill(inner: Arc<Inner>, makers: Makers) {
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = Duration::from_millis(50);
    let mut window_started = std::time::Instant::now();
    loop {
        if inner.stopped.load(Ordering::Acquire) {
            return;
        }
        let (missing, surplus) = {
            let Ok(mut ready) = inner.ready.lock() else {
                return;
            };
            let before = ready.len();
            let max_idle = inner.max_idle;
            ready.retain_mut(|c| {
                c.is_usable() && max_idle.is_none_or(|m| c.forked_at.elapsed() < m)
            });
            inner
                .stats
                .discarded
                .fetch_add((before - ready.len()) as u64, Ordering::Relaxed);
            let target = if window_started.elapsed() >= inner.shrink_after {
                window_started = std::time::Instant::now();
                inner.adapt(ready.len())
            } else {
                inner.target.load(Ordering::Relaxed)
            };
            // The oldest children go first, as they would to requests.
            let excess = ready.len().saturating_sub(target);
            let surplus: Vec<ReadyChild> = ready.drain(..excess).collect();
            (target.saturating_sub(ready.len()), surplus)
        };
        if !surplus.is_empty() {
            inner
                .stats
                .shrunk
                .fetch_add(surplus.len() as u64, Ordering::Relaxed);
            drop(surplus); // killed; their cgroups are removed in the background
        }
        if missing == 0 {
            // Woken by a take, or periodically to drop children whose zygote
            // died or was recycled.
            let _ = tokio::time::timeout(Duration::from_millis(500), inner.wake.notified()).await;
            continue;
        }
        // Yield to a burst in progress (bounded: an empty pool refills anyway
        // after a few rounds).
        // Defer while requests run, unless the pool runs low: the refill's
        // forks would take the CPU from the requests being served.
        let ready_now = inner.ready.lock().map(|r| r.len()).unwrap_or(0);
        let target = inner.target.load(Ordering::Relaxed);
        if makers.load.in_flight() > 0 && ready_now * REFILL_WHILE_BUSY_BELOW >= target {
            let idle = makers.load.idle.notified();
            let _ = tokio::time::timeout(BUSY_RECHECK, idle).await;
            continue;
        }
        for _ in 0..20 {
            let now = micros_since(inner.epoch);
            let since = now.saturating_sub(inner.last_take_us.load(Ordering::Relaxed));
            if u128::from(since) >= QUIET_BEFORE_REFILL.as_micros() {
                break;
            }
            tokio::time::sleep(QUIET_BEFORE_REFILL).await;
        }
        let zygote = match makers.supervisor.get(&inner.zygote).await {
            Ok(z) => z,
            Err(e) => {
                tracing::debug!(zygote = %inner.zygote, "warm pool waits for its zygote: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let batch = missing.min(inner.refill_concurrency);
        let mut made = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let id = makers.ids.fetch_add(1, Ordering::Relaxed);
            let (zygote, makers, plan) = (zygote.clone(), makers.clone(), inner.plan.clone());
            made.spawn(async move {
                prepare_parked(
                    &zygote,
                    &makers.cgroups,
                    makers.netns.as_ref().as_ref(),
                    id,
                    plan,
                )
                .await
            });
        }
        let mut failed = None;
        while let Some(result) = made.join_next().await {
            match result {
                Ok(Ok(child)) => {
                    inner.stats.refills.fetch_add(1, Ordering::Relaxed);
                    if inner.stopped.load(Ordering::Acquire) {
                        continue; // dropping `child` kills it
                    }
                    if let Ok(mut ready) = inner.ready.lock() {
                        ready.push_back(child);
                    }
                }
                Ok(Err(e)) => failed = Some(e.to_string()),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        match failed {
            None => backoff = Duration::from_millis(50),
            Some(e) => {
                tracing::warn!(zygote = %inner.zygote, "warm pool could not prepare a child: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
