//! What the running daemon holds to run sandboxes: zygotes, warm pools,
//! cgroups, network namespaces, the concurrency slots and the shutdown
//! signal. Built by the composition root ([`crate::daemon`]); the sandbox
//! runner works on it, and nothing here knows about sockets, metrics or audit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use forkd_pool::{Load, Makers, NetnsStock, Supervisor, WarmPool};
use tokio::sync::{watch, Semaphore};

pub struct State {
    pub pool: Arc<Supervisor>,
    pub cgroups: Arc<forkd_cgroup::Manager>,
    /// Warm pools by zygote name.
    pub warm: HashMap<String, WarmPool>,
    pub(crate) netns: Arc<Option<NetnsStock>>,
    pub(crate) slots: Semaphore,
    max_concurrent: usize,
    next_id: Arc<AtomicU64>,
    /// Requests in flight, for the warm pools' refill timing.
    pub(crate) load: Arc<Load>,
    shutdown: watch::Receiver<bool>,
    /// Turns true when shutdown begins: no new work is taken, running
    /// sandboxes may finish (until `shutdown` turns true).
    draining: watch::Receiver<bool>,
    /// Egress for requests with `allow_net`.
    pub network: crate::network::Network,
    /// Warm children per workspace (crate::ws_warm).
    pub ws_warm: Arc<crate::ws_warm::WsWarm>,
}

impl State {
    /// The state around the parts the warm pools were made with.
    pub(crate) fn new(
        makers: &Makers,
        warm: HashMap<String, WarmPool>,
        max_concurrent: usize,
        shutdown: watch::Receiver<bool>,
        draining: watch::Receiver<bool>,
        network: crate::network::Network,
        ws_warm: crate::ws_warm::Policy,
    ) -> State {
        State {
            pool: makers.supervisor.clone(),
            cgroups: makers.cgroups.clone(),
            warm,
            netns: makers.netns.clone(),
            slots: Semaphore::new(max_concurrent),
            max_concurrent,
            next_id: makers.ids.clone(),
            load: makers.load.clone(),
            shutdown,
            draining,
            network,
            ws_warm: Arc::new(crate::ws_warm::WsWarm::new(ws_warm, makers.clone())),
        }
    }

    pub fn next_sandbox_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Turns true when running sandboxes and sessions are to be killed.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Turns true when shutdown begins (no new work; running work may finish).
    pub fn draining_signal(&self) -> watch::Receiver<bool> {
        self.draining.clone()
    }

    /// Shutdown has begun: new sandboxes and sessions are refused.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Sandboxes running right now.
    pub fn running(&self) -> usize {
        self.max_concurrent - self.slots.available_permits()
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// Pool, zygote and load figures for a metrics scrape.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        use crate::metrics::{Snapshot, WarmSnapshot, ZygoteSnapshot};
        let mut names: Vec<&str> = self.pool.names().collect();
        names.sort_unstable();
        let zygotes = names
            .into_iter()
            .map(|name| {
                let stats = self.pool.stats(name);
                let get = |f: fn(&forkd_pool::ZygoteStats) -> &AtomicU64| {
                    stats.map_or(0, |s| f(s).load(Ordering::Relaxed))
                };
                ZygoteSnapshot {
                    name: name.to_string(),
                    up: self.pool.is_ready(name),
                    starts: get(|s| &s.starts),
                    start_failures: get(|s| &s.start_failures),
                    deaths: get(|s| &s.deaths),
                    recycles: get(|s| &s.recycles),
                    pool: self.warm.get(name).map(|p| {
                        let s = p.stats();
                        WarmSnapshot {
                            ready: p.ready() as u64,
                            target: p.target() as u64,
                            hits: s.hits.load(Ordering::Relaxed),
                            misses: s.misses.load(Ordering::Relaxed),
                            refills: s.refills.load(Ordering::Relaxed),
                            discarded: s.discarded.load(Ordering::Relaxed),
                            shrunk: s.shrunk.load(Ordering::Relaxed),
                        }
                    }),
                }
            })
            .collect();
        Snapshot {
            running: self.running() as u64,
            max_concurrent: self.max_concurrent as u64,
            zygotes,
            sessions: crate::metrics::SessionSnapshot::default(),
        }
    }
}

/// Resolves once shutdown has begun.
pub async fn stopping(rx: &mut watch::Receiver<bool>) {
    // The guard wait_for returns must not live across an await point.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
