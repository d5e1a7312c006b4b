//! Background removal of sandbox cgroups.
//!
//! A sandbox's cgroup can only be removed once its processes have finished
//! exiting, which under a storm of exits (a burst of 1,000 sandboxes ending
//! on two cores) takes seconds. One thread per process retries every
//! pending removal with backoff instead of parking a blocking thread per
//! sandbox, so removals never starve the blocking pool that creates
//! cgroups for new sandboxes. Processes left after [`KILL_AFTER`] are
//! SIGKILLed; a cgroup still busy after [`GIVE_UP_AFTER`] is reported and
//! left (the daemon's shutdown and its next start remove it).

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use forkd_cgroup::SandboxCgroup;

/// The sandbox should be gone by then: make sure.
const KILL_AFTER: Duration = Duration::from_millis(50);
/// Retry intervals start here and double up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(500);
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

struct Pending {
    cgroup: SandboxCgroup,
    since: Instant,
    next: Instant,
    interval: Duration,
}

static QUEUE: OnceLock<Mutex<Sender<SandboxCgroup>>> = OnceLock::new();

/// Queues `cgroup` for removal; it is tried at once.
pub fn remove_later(cgroup: SandboxCgroup) {
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("forkd-cg-reaper".into())
            .spawn(move || run(rx));
        if let Err(e) = spawned {
            tracing::error!("cannot start the cgroup reaper thread: {e}");
        }
        Mutex::new(tx)
    });
    let sent = queue.lock().map(|tx| tx.send(cgroup));
    if let Ok(Err(mpsc::SendError(cgroup))) = sent {
        // No reaper thread: remove here (blocking, bounded by the crate's timeouts).
        if let Err(e) = cgroup.remove() {
            tracing::warn!("removing a sandbox cgroup failed: {e}");
        }
    }
}

fn run(rx: mpsc::Receiver<SandboxCgroup>) {
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        let wait = pending
            .iter()
            .map(|p| p.next.saturating_duration_since(Instant::now()))
            .min();
        let first = match wait {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(w) => rx.recv_timeout(w),
        };
        match first {
            Ok(cg) => push(&mut pending, cg),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) if pending.is_empty() => return,
            Err(RecvTimeoutError::Disconnected) => {}
        }
        while let Ok(cg) = rx.try_recv() {
            push(&mut pending, cg);
        }
        let now = Instant::now();
        let mut i = 0;
        while i < pending.len() {
            let p = &mut pending[i];
            if p.next > now {
                i += 1;
                continue;
            }
            let age = now.duration_since(p.since);
            let outcome = p.cgroup.try_remove(age >= KILL_AFTER);
            if matches!(outcome, Ok(false)) && age < GIVE_UP_AFTER {
                p.interval = (p.interval * 2).min(MAX_RETRY);
                p.next = now + p.interval;
                i += 1;
                continue;
            }
            let done = pending.swap_remove(i);
            match outcome {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    "sandbox cgroup {:?} still busy {GIVE_UP_AFTER:?} after its sandbox ended \
                     (a process stuck in uninterruptible sleep?); left for the daemon's \
                     shutdown or next start to remove",
                    done.cgroup.abandon()
                ),
                Err(e) => tracing::warn!(
                    "removing sandbox cgroup {:?} failed: {e}",
                    done.cgroup.abandon()
                ),
            }
        }
    }
}

fn push(pending: &mut Vec<Pending>, mut cgroup: SandboxCgroup) {
    // Usually the sandbox has already exited: done without queueing.
    if let Ok(true) = cgroup.try_remove(false) {
        return;
    }
    let now = Instant::now();
    pending.push(Pending {
        cgroup,
        since: now,
        next: now + FIRST_RETRY,
        interval: FIRST_RETRY,
    });
}
