//! Daemon-side management of zygotes.
//!
//! [`zygote`] drives one zygote process. [`Supervisor`] keeps one zygote per
//! configured name running: it restarts a zygote that dies (with back-off),
//! recycles one that has forked `max_forks` children or lived `max_age`
//! (bounding how long children share one ASLR layout and hash secret), and
//! hands requests the current one. [`child`] prepares one isolated child,
//! [`warm`] keeps a pool of them ready, [`netns`] a stock of network
//! namespaces.

pub mod child;
pub mod netns;
pub mod reaper;
pub mod sys;
pub mod uids;
pub mod warm;
pub mod zygote;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

pub use child::{
    kill_pidfd, prepare, prepare_branch, prepare_parked, signal_pidfd, CgroupCleanup, ChildPlan,
    PrepareError, ReadyChild,
};
pub use netns::NetnsStock;
pub use sys::set_nonblocking;
pub use warm::{InFlight, Load, Makers, PoolPolicy, PoolStats, WarmPool};
pub use zygote::{Exited, Forked, ReadyInfo, SpawnFds, Zygote, ZygoteConfig, ZygoteError};

/// When a zygote is replaced by a fresh one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recycle {
    pub max_forks: Option<u64>,
    pub max_age: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no zygote named `{0}` is configured")]
    Unknown(String),
    #[error("{0}")]
    Unavailable(ZygoteError),
    #[error("zygote `{0}` is shutting down")]
    ShuttingDown(String),
}

#[derive(Clone)]
enum SlotState {
    Starting,
    Ready(Zygote),
    Failed(ZygoteError),
    Stopped,
}

/// Lifetime counters of one configured zygote (for the daemon's metrics).
#[derive(Debug, Default)]
pub struct ZygoteStats {
    /// Successful starts, including the first and every replacement.
    pub starts: AtomicU64,
    /// Starts that failed (interpreter missing, preload import error, timeout).
    pub start_failures: AtomicU64,
    /// Zygotes that died unexpectedly and were restarted.
    pub deaths: AtomicU64,
    /// Zygotes replaced after `max_forks` or `max_age`.
    pub recycles: AtomicU64,
}

struct Slot {
    name: String,
    state: watch::Sender<SlotState>,
    stats: ZygoteStats,
    recycle_now: Notify,
    stop: Notify,
    recycle: Recycle,
    start_timeout: Duration,
}

/// Keeps the configured zygotes alive.
pub struct Supervisor {
    slots: HashMap<String, Arc<Slot>>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Supervisor {
    /// Starts a supervising task per zygote. Returns at once; use
    /// [`Supervisor::wait_ready`] to wait for the first start.
    pub fn start(zygotes: Vec<(ZygoteConfig, Recycle)>) -> Supervisor {
        let mut slots = HashMap::new();
        let mut tasks = Vec::new();
        for (cfg, recycle) in zygotes {
            let (state, _) = watch::channel(SlotState::Starting);
            let slot = Arc::new(Slot {
                name: cfg.name.clone(),
                state,
                stats: ZygoteStats::default(),
                recycle_now: Notify::new(),
                stop: Notify::new(),
                recycle,
                start_timeout: cfg.start_timeout,
            });
            tasks.push(tokio::spawn(supervise(slot.clone(), cfg)));
            slots.insert(slot.name.clone(), slot);
        }
        Supervisor {
            slots,
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// Lifetime counters of zygote `name`.
    pub fn stats(&self, name: &str) -> Option<&ZygoteStats> {
        self.slots.get(name).map(|s| &s.stats)
    }

    /// Whether zygote `name` is up and serving right now.
    pub fn is_ready(&self, name: &str) -> bool {
        self.slots
            .get(name)
            .is_some_and(|s| matches!(*s.state.borrow(), SlotState::Ready(_)))
    }

    /// Waits until every zygote has started once (or failed to), returning
    /// the first failure.
    pub async fn wait_ready(&self) -> Result<(), PoolError> {
        for name in self.slots.keys() {
            self.get(name).await?;
        }
        Ok(())
    }

    /// The zygote to fork from. Waits while it (re)starts, bounded by its
    /// start timeout; a zygote that failed to start yields its error at once.
    pub async fn get(&self, name: &str) -> Result<Zygote, PoolError> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| PoolError::Unknown(name.to_string()))?;
        let mut rx = slot.state.subscribe();
        let wait = rx.wait_for(|s| !matches!(s, SlotState::Starting));
        let state =
            match tokio::time::timeout(slot.start_timeout + Duration::from_secs(1), wait).await {
                Ok(Ok(state)) => state.clone(),
                Ok(Err(_)) => return Err(PoolError::ShuttingDown(name.to_string())),
                Err(_) => {
                    return Err(PoolError::Unavailable(ZygoteError::StartTimeout {
                        name: name.to_string(),
                        after: slot.start_timeout,
                        stage: "waiting for a restart".into(),
                    }))
                }
            };
        match state {
            SlotState::Ready(z) => {
                let r = slot.recycle;
                let worn = r.max_forks.is_some_and(|m| z.forks() + 1 >= m)
                    || r.max_age.is_some_and(|m| z.age() >= m);
                if worn {
                    slot.recycle_now.notify_one();
                }
                Ok(z)
            }
            SlotState::Failed(e) => Err(PoolError::Unavailable(e)),
            SlotState::Stopped => Err(PoolError::ShuttingDown(name.to_string())),
            SlotState::Starting => unreachable!("waited for a settled state"),
        }
    }

    /// Stops every zygote: each drains (its running children are expected to
    /// have been killed by the caller) and is killed after `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        for slot in self.slots.values() {
            slot.stop.notify_one();
        }
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for task in tasks {
            let _ = tokio::time::timeout(grace + Duration::from_secs(1), task).await;
        }
        for slot in self.slots.values() {
            slot.state.send_replace(SlotState::Stopped);
        }
    }
}

async fn retire(old: Zygote, grace: Duration) {
    old.drain().await;
    if tokio::time::timeout(grace, old.wait_exit()).await.is_err() {
        old.kill();
        old.wait_exit().await;
    }
}

async fn supervise(slot: Arc<Slot>, cfg: ZygoteConfig) {
    const MAX_BACKOFF: Duration = Duration::from_secs(10);
    let mut backoff = Duration::from_millis(100);
    loop {
        slot.state.send_replace(SlotState::Starting);
        let started = tokio::select! {
            r = Zygote::start(&cfg) => r,
            _ = slot.stop.notified() => break,
        };
        let mut current = match started {
            Ok(z) => {
                tracing::info!(
                    zygote = %cfg.name, pid = z.process_id(), python = %z.info().python,
                    init_ms = z.info().init_ms, preloaded = ?z.info().preloaded,
                    "zygote ready"
                );
                if z.info().native.landlock_abi == 0 {
                    tracing::warn!(zygote = %cfg.name, "kernel has no landlock: sandboxes rely on the mount namespace alone for filesystem confinement");
                }
                slot.stats.starts.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                z
            }
            Err(e) => {
                // Its own target: a front end that reports the start's error
                // itself (`forkd-run --embedded`) leaves this line out.
                tracing::error!(target: "forkd_pool::start", zygote = %cfg.name, "{e}");
                slot.stats.start_failures.fetch_add(1, Ordering::Relaxed);
                slot.state.send_replace(SlotState::Failed(e));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = slot.stop.notified() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        slot.state.send_replace(SlotState::Ready(current.clone()));
        loop {
            tokio::select! {
                _ = current.wait_exit() => {
                    tracing::warn!(zygote = %cfg.name, "zygote died; restarting");
                    slot.stats.deaths.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ = slot.recycle_now.notified() => {
                    // Start the replacement while the old one keeps serving.
                    match Zygote::start(&cfg).await {
                        Ok(fresh) => {
                            tracing::info!(zygote = %cfg.name, forks = current.forks(), age = ?current.age(), "zygote recycled");
                            slot.stats.starts.fetch_add(1, Ordering::Relaxed);
                            slot.stats.recycles.fetch_add(1, Ordering::Relaxed);
                            let old = std::mem::replace(&mut current, fresh);
                            slot.state.send_replace(SlotState::Ready(current.clone()));
                            tokio::spawn(retire(old, cfg.start_timeout.max(Duration::from_secs(60))));
                        }
                        Err(e) => {
                            tracing::error!(zygote = %cfg.name, "recycling failed, keeping the old zygote: {e}");
                            slot.stats.start_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ = slot.stop.notified() => {
                    retire(current, Duration::from_secs(5)).await;
                    return;
                }
            }
        }
    }
}
