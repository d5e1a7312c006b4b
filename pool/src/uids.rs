//! Per-sandbox user and group ids (root daemons, and rootless daemons with a
//! subordinate id range).
//!
//! Every sandbox runs as its own unprivileged uid (and gid of the same
//! number), taken from a range no host account uses: for a root daemon host
//! ids, for a rootless one the ids `1..=count` of its zygotes' user
//! namespaces, which map its subordinate range ([`configure_subordinate`]). Per-user kernel budgets
//! (pipe buffers, inotify, POSIX message queues, locked shared memory,
//! pending signals, RLIMIT_NPROC) are then per sandbox, and owner checks fail
//! on host objects (root-owned files, sockets, leases).
//!
//! A [`Lease`] holds its id until dropped. The zygote driver keeps it with
//! the child's pending entry and drops it when the zygote has reaped the
//! sandbox's init; a pid namespace's init is reaped only after every other
//! process in it is gone, so no process of the old sandbox can hold the id
//! when it is handed out again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Default first id: far above any account range (useradd, systemd dynamic
/// users, subordinate ids of container runtimes usually stay below 2^30).
pub const DEFAULT_BASE: u32 = 1_879_048_192; // 0x7000_0000
/// Default number of ids: more than forkd ever runs at once.
pub const DEFAULT_COUNT: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("all {0} sandbox user ids are in use; raise `sandbox_uid_count`")]
    Exhausted(u32),
    #[error("sandbox user id range {base}+{count} is invalid: it must lie in 1..4294967294 and hold at least one id")]
    BadRange { base: u32, count: u32 },
}

struct State {
    /// Next slot to try (round robin, so a released id rests before reuse).
    next: u32,
    used: Vec<bool>,
    in_use: u32,
}

struct Inner {
    base: u32,
    count: u32,
    state: Mutex<State>,
    /// (A block of another range.) Its slots there, freed when this range
    /// and every lease from it are gone.
    _block: Option<Block>,
}

/// Consecutive slots of a range, held by a sub-range ([`UidRange::lease_block`]).
struct Block {
    range: Arc<Inner>,
    start: u32,
    count: u32,
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Ok(mut s) = self.range.state.lock() {
            for slot in self.start..self.start + self.count {
                s.used[slot as usize] = false;
            }
            s.in_use -= self.count;
        }
    }
}

/// A range of sandbox ids.
#[derive(Clone)]
pub struct UidRange(Arc<Inner>);

/// One sandbox's id, returned to its range when dropped.
pub struct Lease {
    range: Arc<Inner>,
    slot: u32,
    /// A range this lease keeps leased as long as it lives (a branch's
    /// block for its descendants).
    _held: Option<UidRange>,
}

impl Lease {
    /// The uid, which is also the gid.
    pub fn id(&self) -> u32 {
        self.range.base + self.slot
    }

    /// Keeps `range` leased as long as this lease lives.
    pub fn keep(mut self, range: UidRange) -> Lease {
        self._held = Some(range);
        self
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut s) = self.range.state.lock() {
            s.used[self.slot as usize] = false;
            s.in_use -= 1;
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.id())
    }
}

impl UidRange {
    pub fn new(base: u32, count: u32) -> Result<UidRange, UidError> {
        let end = u64::from(base) + u64::from(count);
        // 0 is root; 2^32-1 is "no id" and 2^32-2 commonly the overflow id.
        if base == 0 || count == 0 || end > u64::from(u32::MAX - 1) {
            return Err(UidError::BadRange { base, count });
        }
        Ok(UidRange(Arc::new(Inner {
            base,
            count,
            state: Mutex::new(State {
                next: 0,
                used: vec![false; count as usize],
                in_use: 0,
            }),
            _block: None,
        })))
    }

    /// The first id.
    pub fn base(&self) -> u32 {
        self.0.base
    }

    /// How many ids.
    pub fn count(&self) -> u32 {
        self.0.count
    }

    /// `count` consecutive free ids of this range as a range of their own
    /// (a session branch's ids for its own branches, which its user
    /// namespace maps); they return here once that range and every lease
    /// from it are gone.
    pub fn lease_block(&self, count: u32) -> Result<UidRange, UidError> {
        let inner = &self.0;
        let mut s = inner
            .state
            .lock()
            .map_err(|_| UidError::Exhausted(inner.count))?;
        let mut run = 0u32;
        let mut found = None;
        for slot in 0..inner.count {
            run = if s.used[slot as usize] { 0 } else { run + 1 };
            if run == count {
                found = Some(slot + 1 - count);
                break;
            }
        }
        let start = found.ok_or(UidError::Exhausted(inner.count))?;
        for slot in start..start + count {
            s.used[slot as usize] = true;
        }
        s.in_use += count;
        drop(s);
        Ok(UidRange(Arc::new(Inner {
            base: inner.base + start,
            count,
            state: Mutex::new(State {
                next: 0,
                used: vec![false; count as usize],
                in_use: 0,
            }),
            _block: Some(Block {
                range: inner.clone(),
                start,
                count,
            }),
        })))
    }

    pub fn lease(&self) -> Result<Lease, UidError> {
        let inner = &self.0;
        let mut s = inner
            .state
            .lock()
            .map_err(|_| UidError::Exhausted(inner.count))?;
        if s.in_use == inner.count {
            return Err(UidError::Exhausted(inner.count));
        }
        let mut slot = s.next;
        while s.used[slot as usize] {
            slot = (slot + 1) % inner.count;
        }
        s.used[slot as usize] = true;
        s.in_use += 1;
        s.next = (slot + 1) % inner.count;
        Ok(Lease {
            range: inner.clone(),
            slot,
            _held: None,
        })
    }

    pub fn in_use(&self) -> u32 {
        self.0.state.lock().map(|s| s.in_use).unwrap_or(0)
    }
}

static RANGE: OnceLock<UidRange> = OnceLock::new();

/// Sets the process-wide range (the daemon's `sandbox_uid_base` and
/// `sandbox_uid_count`); the first call wins, later ones are ignored.
pub fn configure(base: u32, count: u32) -> Result<(), UidError> {
    let range = UidRange::new(base, count)?;
    let _ = RANGE.set(range);
    Ok(())
}

static SUBORDINATE: AtomicBool = AtomicBool::new(false);

/// A rootless daemon whose zygotes map `count` subordinate ids: sandbox ids
/// are namespace ids `1..=count`. The first call of this or [`configure`]
/// wins.
pub fn configure_subordinate(count: u32) -> Result<(), UidError> {
    let range = UidRange::new(1, count)?;
    if RANGE.set(range).is_ok() {
        SUBORDINATE.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// Whether each sandbox gets its own id: always for a root daemon; for a
/// rootless one only with a subordinate range (otherwise its zygotes map
/// just its own uid, which every sandbox keeps).
pub fn per_sandbox() -> bool {
    // SAFETY: geteuid cannot fail.
    (unsafe { libc::geteuid() } == 0) || SUBORDINATE.load(Ordering::Relaxed)
}

/// The process-wide range (the defaults unless [`configure`] ran first).
pub fn global() -> &'static UidRange {
    RANGE
        .get_or_init(|| UidRange::new(DEFAULT_BASE, DEFAULT_COUNT).expect("default range is valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_its_own_range_and_returns_when_its_last_holder_goes() {
        let r = UidRange::new(1000, 8).unwrap();
        let first = r.lease().unwrap();
        let block = r.lease_block(4).unwrap();
        assert_eq!((block.base(), block.count(), r.in_use()), (1001, 4, 5));
        let inner = block.lease().unwrap();
        assert_eq!(inner.id(), 1001);
        let kept = first.keep(block.clone());
        drop(block);
        assert_eq!(r.in_use(), 5, "held by the lease that keeps it");
        drop(kept);
        assert_eq!(r.in_use(), 4, "and by a lease from it");
        drop(inner);
        assert_eq!(r.in_use(), 0);
        assert!(r.lease_block(9).is_err());
    }

    #[test]
    fn leases_are_unique_until_dropped() {
        let r = UidRange::new(5000, 3).unwrap();
        let a = r.lease().unwrap();
        let b = r.lease().unwrap();
        let c = r.lease().unwrap();
        let mut ids = vec![a.id(), b.id(), c.id()];
        ids.sort();
        assert_eq!(ids, vec![5000, 5001, 5002]);
        assert!(matches!(r.lease(), Err(UidError::Exhausted(3))));
        let freed = b.id();
        drop(b);
        assert_eq!(r.lease().unwrap().id(), freed);
        assert_eq!(r.in_use(), 2);
    }

    #[test]
    fn released_ids_rest_before_reuse() {
        let r = UidRange::new(100, 4).unwrap();
        let first = r.lease().unwrap().id();
        // Dropped at once, but the next lease takes the following slot.
        assert_eq!(r.lease().unwrap().id(), first + 1);
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(UidRange::new(0, 10).is_err());
        assert!(UidRange::new(10, 0).is_err());
        assert!(UidRange::new(u32::MAX - 5, 10).is_err());
    }
}
