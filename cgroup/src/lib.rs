//! Per-sandbox cgroups for forkd.
//!
//! A [`Manager`] is created once by the daemon. It finds the cgroup mounts in
//! `/proc/self/mountinfo` (no path is assumed), picks cgroup v1 or v2, and
//! creates the base directory `<root>/<parent>/<instance>` in every
//! hierarchy it uses. [`Manager::create`] then makes one [`SandboxCgroup`]
//! per sandbox with memory / CPU / pids limits; the forked child joins by
//! writing `0` into each of [`SandboxCgroup::procs_files`]. The crate never
//! moves the calling process.
//!
//! * **v2**: one directory under the v2 root (default `/sys/fs/cgroup`, or a
//!   delegated subtree via [`Config::v2_root`]); `memory`, `cpu`, `pids` are
//!   enabled in `cgroup.subtree_control` from the root down to the base.
//! * **v1**: one directory in each of the `memory`, `cpu`, `pids` hierarchies
//!   and in `cpuacct` when it is a separate mount (for CPU usage);
//!   co-mounted hierarchies (`cpu,cpuacct`) get a single directory.
//! * **Disabled**: no cgroups; sandboxes have no files and limits are not
//!   enforced ([`Manager::limits_enforced`] is false).
//!
//! Layout: what differs between the kernel interfaces lives behind one
//! private trait (`flavour::Flavour`: setup, limit files, counters) with one
//! module per flavour (`v1.rs`, `v2.rs`, and `flavour::Off` for disabled);
//! this file holds the version-independent API and `sys.rs` the shared
//! directory, kill and removal helpers.

#![deny(missing_docs)]

mod error;
mod flavour;
mod freezer;
pub mod io;
pub mod kmem;
mod parse;
mod sys;
mod v1;
mod v2;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::{debug, info, warn};

pub use error::Error;
use flavour::{Ctl, Flavour, Hier};
pub use freezer::Freezer;
pub use io::IoThrottle;

pub(crate) const MOUNTINFO: &str = "/proc/self/mountinfo";
pub(crate) const DEFAULT_V2_ROOT: &str = "/sys/fs/cgroup";
/// CFS period used for the `cpus` limit, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
const MIN_QUOTA_US: u64 = 1_000;
const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// How long removal retries a plain rmdir before killing what is inside.
const FAST_RMDIR_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// A mounted cgroup hierarchy, as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HierarchyMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// cgroup2 (else a v1 hierarchy).
    pub v2: bool,
    /// Super options: for v1 the controllers it carries (`cpu`, `name=...`)
    /// among `rw` and friends.
    pub options: Vec<String>,
}

/// Every cgroup (v1) and cgroup2 hierarchy mounted in this mount namespace.
pub fn hierarchy_mounts() -> Result<Vec<HierarchyMount>, Error> {
    let text =
        fs::read_to_string(MOUNTINFO).map_err(|e| Error::io("read", Path::new(MOUNTINFO), e))?;
    Ok(parse::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| HierarchyMount {
            v2: m.fstype == "cgroup2",
            mount_point: m.mount_point,
            options: m.super_opts,
        })
        .collect())
}

/// The cgroup flavour a [`Manager`] actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Legacy per-controller hierarchies (`/sys/fs/cgroup/memory`, ...).
    V1,
    /// The unified hierarchy.
    V2,
    /// No usable cgroup: sandboxes are created without files and limits are
    /// reported as not enforced.
    Disabled,
}

impl Mode {
    /// The implementation behind this mode.
    fn flavour(self) -> &'static dyn Flavour {
        match self {
            Mode::V1 => &v1::V1,
            Mode::V2 => &v2::V2,
            Mode::Disabled => &flavour::Off,
        }
    }
}

/// Requested mode, as written in the daemon configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeChoice {
    /// `v2_root` if set; else v2 if `/sys/fs/cgroup` is a cgroup2 mount; else
    /// v1 if the memory, cpu and pids hierarchies are mounted; else disabled.
    #[default]
    Auto,
    /// Force cgroup v1.
    V1,
    /// Force cgroup v2 (`v2_root`, else `/sys/fs/cgroup` if it is cgroup2,
    /// else the first cgroup2 mount).
    V2,
    /// Do not use cgroups.
    Disabled,
}

/// Manager configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Which cgroup flavour to use.
    pub mode: ModeChoice,
    /// cgroup v2 root to create `<parent>/<instance>` under (must be inside
    /// a cgroup2 mount, e.g. a delegated subtree). `None`: see [`ModeChoice`].
    pub v2_root: Option<PathBuf>,
    /// Directory under the root shared by all daemon instances (default
    /// `forkd`); a single path component.
    pub parent: String,
    /// This daemon's directory under `parent` (default `d<pid>`); must be
    /// unique among live managers. [`Manager::cleanup_stale`] recognises
    /// dead daemons by names of this `d<pid>` form.
    pub instance: String,
    /// Start even when `memory`, `cpu` or `pids` is unavailable (v2: not in
    /// `cgroup.controllers`; v1: not mounted). Sandboxes that request a limit
    /// needing a missing controller are then refused by [`Manager::create`].
    /// Default `false`: [`Manager::new`] fails instead.
    pub allow_missing_controllers: bool,
    /// Block I/O limits for every sandbox (not read from the `[cgroup]`
    /// table: the daemon resolves `[limits.io]` and its devices at start).
    /// `None` or inactive: no `blkio` hierarchy (v1) or `io` controller (v2)
    /// is used, so an unset limit costs nothing per sandbox.
    #[serde(skip)]
    pub io: Option<IoThrottle>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: ModeChoice::Auto,
            v2_root: None,
            parent: "forkd".to_owned(),
            instance: format!("d{}", std::process::id()),
            allow_missing_controllers: false,
            io: None,
        }
    }
}

/// Resource limits of one sandbox. `None` writes nothing (the parent's
/// setting is inherited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory limit in bytes (>= 1 MiB). Swap is included where the kernel
    /// accounts it (v1 `memsw`, v2 `memory.swap.max = 0`).
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in CPUs (finite, >= 0.01): quota `round(cpus * 100000)`
    /// per 100000 µs period.
    pub cpus: Option<f64>,
    /// Maximum number of processes/threads (>= 1).
    pub pids: Option<u64>,
}

/// Counters of one sandbox cgroup. Values a mode cannot provide are 0/`None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Processes killed by the OOM killer (v1 `memory.oom_control`
    /// `oom_kill`, v2 `memory.events` `oom_kill`).
    pub oom_kills: u64,
    /// Peak memory usage (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`
    /// on Linux >= 5.19).
    pub memory_peak_bytes: Option<u64>,
    /// Times a charge hit the limit (v2 `memory.events` `max`; v1
    /// `memory.failcnt` + `memory.memsw.failcnt`, since with memsw set to
    /// the same value the memsw counter refuses first). Note: recent kernels
    /// (seen on 6.18) only track `failcnt` on the memory counter, so
    /// `memory.memsw.failcnt` stays 0 and this is 0 on v1 with swap
    /// accounting; rely on `oom_kills` there.
    pub memory_limit_hits: u64,
    /// Forks refused by `pids.max` (`pids.events` `max`).
    pub pids_limit_hits: u64,
    /// User CPU time in µs (v1 `cpuacct.usage_user`, v2 `cpu.stat` `user_usec`).
    pub cpu_user_us: Option<u64>,
    /// System CPU time in µs (v1 `cpuacct.usage_sys`, v2 `cpu.stat` `system_usec`).
    pub cpu_system_us: Option<u64>,
    /// Whether any process is still in the cgroup (v2 `cgroup.events`; v1:
    /// any pid in `cgroup.procs` of the sandbox directories or below). Not
    /// read by [`SandboxCgroup::counters`].
    pub populated: bool,
}

/// Creates and tears down sandbox cgroups. `Send + Sync`; holds no mutable
/// state. Dropping it removes nothing: call [`Manager::shutdown`].
#[derive(Debug)]
pub struct Manager {
    mode: Mode,
    hiers: Vec<Hier>,
    instance: String,
    /// Where controller availability came from, for error messages.
    origin: PathBuf,
    /// Block I/O limits written into every new sandbox cgroup.
    io: Option<IoThrottle>,
}

/// The controllers a limit kind needs, with the limit's name.
const CONTROLLED: [(&str, &str); 3] = [("memory", "memory"), ("cpus", "cpu"), ("pids", "pids")];

impl Manager {
    /// Detects the cgroup setup and creates `<root>/<parent>/<instance>` in
    /// every hierarchy used (v2: enabling `memory`, `cpu`, `pids` in
    /// `cgroup.subtree_control` from the root down to the base). If the
    /// instance directory already exists (a previous daemon with the same
    /// pid), its leftover sandboxes are killed and removed.
    pub fn new(cfg: &Config) -> Result<Manager, Error> {
        validate_name(&cfg.parent, "parent")?;
        validate_name(&cfg.instance, "instance")?;
        if cfg.mode == ModeChoice::Disabled {
            return Ok(Manager::disabled(cfg));
        }
        let text = fs::read_to_string(MOUNTINFO).map_err(|source| Error::Mountinfo {
            path: MOUNTINFO.into(),
            source,
        })?;
        let mounts = parse::parse_mountinfo(&text);
        let top_is_cgroup2 = v2::top_is_cgroup2(&mounts);
        let v1_all = ["memory", "cpu", "pids"]
            .iter()
            .all(|c| v1::mount(&mounts, c).is_some());

        let mode = match cfg.mode {
            ModeChoice::Auto if cfg.v2_root.is_some() || top_is_cgroup2 => Mode::V2,
            ModeChoice::Auto if v1_all => Mode::V1,
            ModeChoice::Auto => {
                warn!("no cgroup2 at {DEFAULT_V2_ROOT} and cgroup v1 memory/cpu/pids not all mounted: sandbox limits are NOT enforced");
                return Ok(Manager::disabled(cfg));
            }
            ModeChoice::V1 => Mode::V1,
            ModeChoice::Disabled => return Ok(Manager::disabled(cfg)),
            ModeChoice::V2 => Mode::V2,
        };

        let mut created = Vec::new();
        let res = mode.flavour().setup(cfg, &mounts, &mut created);
        let (hiers, origin) = match res {
            Ok(v) => v,
            Err(e) => {
                for dir in created.iter().rev() {
                    let _ = sys::remove_tree(dir);
                }
                return Err(e);
            }
        };
        let mgr = Manager {
            mode,
            hiers,
            instance: cfg.instance.clone(),
            origin,
            io: cfg.io.clone().filter(IoThrottle::is_active),
        };
        info!(mode = ?mgr.mode, bases = ?mgr.base_dirs(), enforced = mgr.limits_enforced(), "cgroup manager ready");
        Ok(mgr)
    }

    fn disabled(cfg: &Config) -> Manager {
        Manager {
            mode: Mode::Disabled,
            hiers: Vec::new(),
            instance: cfg.instance.clone(),
            origin: PathBuf::new(),
            io: None,
        }
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// True when memory, cpus and pids limits can all be enforced (false in
    /// [`Mode::Disabled`] and when controllers were allowed to be missing).
    pub fn limits_enforced(&self) -> bool {
        self.mode != Mode::Disabled && CONTROLLED.iter().all(|(_, c)| self.has(c))
    }

    /// This instance's base directories, one per hierarchy (empty when disabled).
    pub fn base_dirs(&self) -> Vec<&Path> {
        self.hiers.iter().map(|h| h.base.as_path()).collect()
    }

    /// The block I/O limits every sandbox gets (`None`: not throttled).
    pub fn io_throttle(&self) -> Option<&IoThrottle> {
        self.io.as_ref()
    }

    fn has(&self, controller: &str) -> bool {
        self.hiers.iter().any(|h| h.ctl.has(controller))
    }

    /// Creates the sandbox cgroup `name` with `limits`. On any failure the
    /// directories created so far are removed. In [`Mode::Disabled`] returns
    /// a sandbox without files (limits are still validated).
    pub fn create(&self, name: &str, limits: &Limits) -> Result<SandboxCgroup, Error> {
        validate_name(name, "sandbox name")?;
        let plan = Plan::new(limits)?;
        let mut sb = SandboxCgroup {
            mode: self.mode,
            dirs: Vec::new(),
            ctls: Vec::new(),
            procs: Vec::new(),
            removed: false,
        };
        for (limit, controller) in CONTROLLED {
            let wanted = match limit {
                "memory" => plan.memory.is_some(),
                "cpus" => plan.cpu_quota.is_some(),
                _ => plan.pids.is_some(),
            };
            if wanted && self.mode != Mode::Disabled && !self.has(controller) {
                return Err(Error::LimitUnsupported {
                    limit,
                    controller,
                    path: self.origin.clone(),
                });
            }
        }
        let res = (|| {
            for h in &self.hiers {
                let dir = h.base.join(name);
                if !sys::mkdir(&dir)? {
                    return Err(Error::Exists { path: dir });
                }
                sb.dirs.push(dir.clone());
                sb.ctls.push(h.ctl);
                sb.procs.push(dir.join("cgroup.procs"));
                self.mode.flavour().apply_limits(&dir, h.ctl, &plan)?;
                if let Some(io) = &self.io {
                    self.mode.flavour().apply_io(&dir, h.ctl, io)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            if let Err(e2) = sb.remove_inner() {
                warn!("cleaning up after failed create of {name}: {e2}");
            }
            return Err(e);
        }
        debug!(name, dirs = ?sb.dirs, "sandbox cgroup created");
        Ok(sb)
    }

    /// Removes cgroups left by dead daemons: under `<root>/<parent>/`, every
    /// instance directory named `d<pid>` whose pid does not exist
    /// (kill(pid, 0) gives ESRCH) and is not ours has all its processes
    /// killed (recursively) and its directories removed bottom-up. Returns
    /// how many sandbox cgroups were removed (counted once across
    /// hierarchies). A pid reused by an unrelated process keeps its
    /// directory until a later call. All daemons sharing `<root>/<parent>`
    /// must share one pid namespace, or live instances look dead.
    pub fn cleanup_stale(&self) -> Result<usize, Error> {
        let mut stale: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for h in &self.hiers {
            for dir in sys::subdirs(&h.parent)? {
                let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if name == self.instance {
                    continue;
                }
                let Some(pid) = stale_pid(name) else { continue };
                if u32::try_from(pid).ok() == Some(std::process::id()) || sys::pid_alive(pid) {
                    continue;
                }
                stale.entry(name.to_owned()).or_default().push(dir);
            }
        }
        let mut removed = 0;
        let mut first_err = None;
        for (instance, dirs) in stale {
            let mut names = HashSet::new();
            for d in &dirs {
                for sub in sys::subdirs(d)? {
                    names.insert(sub.file_name().map(|n| n.to_os_string()));
                }
            }
            let res = sys::kill_tree(&dirs)
                .and_then(|()| dirs.iter().try_for_each(|d| sys::remove_tree(d)));
            match res {
                Ok(()) => {
                    info!(
                        instance,
                        sandboxes = names.len(),
                        "removed stale cgroups of a dead daemon"
                    );
                    removed += names.len();
                }
                Err(e) => {
                    warn!(instance, "removing stale cgroups: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// Kills every process in this instance's sandboxes and removes them and
    /// the instance directories (the shared `parent` directory stays).
    /// Sandbox handles still alive afterwards become no-ops on removal.
    pub fn shutdown(&self) -> Result<(), Error> {
        let bases: Vec<PathBuf> = self.hiers.iter().map(|h| h.base.clone()).collect();
        // A few rounds: sandboxes still exiting (or removed concurrently by
        // the background reaper) can keep a directory busy for a moment.
        let mut result = Ok(());
        for _ in 0..3 {
            result = sys::kill_tree(&bases);
            if result.is_ok() {
                for b in &bases {
                    if let Err(e) = sys::remove_tree(b) {
                        result = Err(e);
                    }
                }
            }
            if result.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        result
    }
}

/// Instance names `d<pid>` → pid.
fn stale_pid(name: &str) -> Option<i32> {
    let digits = name.strip_prefix('d')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|p| *p > 0)
}

/// Validated limit values.
pub(crate) struct Plan {
    pub(crate) memory: Option<u64>,
    pub(crate) cpu_quota: Option<u64>,
    pub(crate) pids: Option<u64>,
}

impl Plan {
    fn new(l: &Limits) -> Result<Plan, Error> {
        if let Some(m) = l.memory_bytes {
            if m < MIN_MEMORY_BYTES {
                return Err(Error::InvalidLimit(format!(
                    "memory_bytes = {m} is below the minimum of 1 MiB ({MIN_MEMORY_BYTES}); raise it or leave it unset"
                )));
            }
        }
        let cpu_quota = match l.cpus {
            None => None,
            Some(c) => {
                let q = (c * CPU_PERIOD_US as f64).round();
                if !c.is_finite() || !(MIN_QUOTA_US as f64..=1e12).contains(&q) {
                    return Err(Error::InvalidLimit(format!(
                        "cpus = {c} must be a finite number between 0.01 and 10000000; fix the configured value or leave it unset"
                    )));
                }
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "a finite quota checked above, in microseconds: whole units intended"
                )]
                Some(q as u64)
            }
        };
        if l.pids == Some(0) {
            return Err(Error::InvalidLimit(
                "pids = 0 would forbid even the sandbox's first process; use >= 1 or leave it unset".into(),
            ));
        }
        Ok(Plan {
            memory: l.memory_bytes,
            cpu_quota,
            pids: l.pids,
        })
    }
}

/// Sandbox, parent and instance names: one safe path component.
fn validate_name(name: &str, what: &'static str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// One sandbox's cgroup directories (one per hierarchy). `Send`. Dropping it
/// without [`SandboxCgroup::remove`] still kills and removes it (best effort,
/// failures logged with `tracing::warn`).
#[derive(Debug)]
pub struct SandboxCgroup {
    mode: Mode,
    dirs: Vec<PathBuf>,
    ctls: Vec<Ctl>,
    procs: Vec<PathBuf>,
    removed: bool,
}

impl SandboxCgroup {
    /// `cgroup.procs` files a forked child writes `0` into to join (v1: one
    /// per hierarchy; v2: one; disabled: none).
    pub fn procs_files(&self) -> &[PathBuf] {
        &self.procs
    }

    /// The sandbox's directories, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Changes the limits of a live sandbox cgroup (a warm-pool child made
    /// with the defaults, handed a request that asks for others). `None`
    /// leaves a limit as it is. On v1 the memory+swap limit must never drop
    /// below the memory limit, so the order of the two writes follows the
    /// direction of the change.
    pub fn set_limits(&self, limits: &Limits) -> Result<(), Error> {
        let plan = Plan::new(limits)?;
        self.dirs
            .iter()
            .zip(&self.ctls)
            .try_for_each(|(dir, ctl)| self.mode.flavour().set_limits(dir, *ctl, &plan))
    }

    /// The v2 directory (for `clone3(CLONE_INTO_CGROUP)`); `None` unless v2.
    pub fn v2_dir(&self) -> Option<&Path> {
        match self.mode {
            Mode::V2 => self.dirs.first().map(PathBuf::as_path),
            _ => None,
        }
    }

    /// Moves process `pid` into the sandbox (every hierarchy). Refuses 0 and
    /// the daemon's own pid, which would move the daemon itself.
    pub fn attach_pid(&self, pid: u32) -> Result<(), Error> {
        if pid == 0 || pid == std::process::id() {
            return Err(Error::InvalidPid(pid));
        }
        self.procs
            .iter()
            .try_for_each(|f| sys::write(f, &pid.to_string()))
    }

    /// Reads the sandbox's counters and whether anything still runs in it.
    pub fn stats(&self) -> Result<Stats, Error> {
        let flavour = self.mode.flavour();
        let mut stats = flavour.stats(&self.dirs, &self.ctls)?;
        stats.populated = flavour.populated(&self.dirs)?;
        Ok(stats)
    }

    /// [`Self::stats`] without `populated` (left `false`): what a result
    /// reports, without walking the tree for live processes (on v1 a read
    /// of every `cgroup.procs`) on the reply's path.
    pub fn counters(&self) -> Result<Stats, Error> {
        self.mode.flavour().stats(&self.dirs, &self.ctls)
    }

    /// Kills every process in the sandbox: v2 writes `1` to `cgroup.kill`
    /// when present; then (and always on v1 / old v2) reads `cgroup.procs`
    /// and sends SIGKILL until empty, for at most ~10 s.
    pub fn kill_all(&self) -> Result<(), Error> {
        if self.dirs.is_empty() {
            return Ok(());
        }
        sys::kill_tree(&self.dirs)
    }

    /// One removal attempt that never waits, for a caller that retries (a
    /// background reaper): with `kill`, first SIGKILLs whatever still runs
    /// in the cgroup and also tries sub-cgroups; then removes the
    /// directories it can. `Ok(true)` once nothing is left.
    pub fn try_remove(&mut self, kill: bool) -> Result<bool, Error> {
        if self.removed {
            return Ok(true);
        }
        if kill {
            sys::signal_tree(&self.dirs)?;
        }
        let mut left_dirs = Vec::new();
        let mut left_ctls = Vec::new();
        for (dir, ctl) in self.dirs.iter().zip(&self.ctls) {
            if !sys::try_remove_tree(dir, kill)? {
                left_dirs.push(dir.clone());
                left_ctls.push(*ctl);
            }
        }
        self.dirs = left_dirs;
        self.ctls = left_ctls;
        self.removed = self.dirs.is_empty();
        Ok(self.removed)
    }

    /// Gives up on removing: returns the directories left behind, which
    /// dropping the handle will no longer try to remove.
    pub fn abandon(mut self) -> Vec<PathBuf> {
        self.removed = true;
        std::mem::take(&mut self.dirs)
    }

    /// Kills all processes, then removes the directories (retrying EBUSY
    /// for up to ~5 s). Already-removed directories are fine.
    pub fn remove(mut self) -> Result<(), Error> {
        let res = self.remove_inner();
        self.removed = true;
        res
    }

    fn remove_inner(&mut self) -> Result<(), Error> {
        if self.removed || self.dirs.is_empty() {
            return Ok(());
        }
        // Fast path, the usual case: the sandbox is gone or finishing its
        // exit. A plain rmdir, retried briefly, needs no directory listing.
        let deadline = std::time::Instant::now() + FAST_RMDIR_WINDOW;
        let mut left: Vec<PathBuf> = self.dirs.clone();
        loop {
            left.retain(|d| match std::fs::remove_dir(d) {
                Ok(()) => false,
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            });
            if left.is_empty() {
                self.removed = true;
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Something still runs in it (or a sub-cgroup exists): kill, then
        // remove bottom-up.
        self.kill_all()?;
        let mut first_err = None;
        for d in &self.dirs {
            if let Err(e) = sys::remove_tree(d) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => {
                self.removed = true;
                Ok(())
            }
        }
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_inner() {
            warn!("leaking sandbox cgroup {:?}: {e}", self.dirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as DeError, StrDeserializer};
    use serde::de::IntoDeserializer;

    #[test]
    fn names() {
        for ok in ["a", "sb-1_2.x", "d123", "..a", "A.b"] {
            assert!(validate_name(ok, "sandbox name").is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "/", "é", "x\n"] {
            let e = validate_name(bad, "sandbox name").unwrap_err();
            assert!(matches!(e, Error::InvalidName { .. }), "{bad}: {e}");
        }
        assert!(validate_name(&"a".repeat(201), "instance").is_err());
    }

    #[test]
    fn stale_pids() {
        assert_eq!(stale_pid("d123"), Some(123));
        assert_eq!(stale_pid("d0"), None);
        assert_eq!(stale_pid("d"), None);
        assert_eq!(stale_pid("d12x"), None);
        assert_eq!(stale_pid("d+12"), None);
        assert_eq!(stale_pid("test-1-2"), None);
        assert_eq!(stale_pid("d99999999999"), None);
    }

    #[test]
    fn limit_validation() {
        let p = Plan::new(&Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(16),
        })
        .unwrap();
        assert_eq!(
            (p.memory, p.cpu_quota, p.pids),
            (Some(64 << 20), Some(50_000), Some(16))
        );
        assert_eq!(
            Plan::new(&Limits {
                cpus: Some(0.01),
                ..Default::default()
            })
            .unwrap()
            .cpu_quota,
            Some(1000)
        );
        assert_eq!(
            Plan::new(&Limits {
                cpus: Some(2.345678),
                ..Default::default()
            })
            .unwrap()
            .cpu_quota,
            Some(234_568)
        );
        let p = Plan::new(&Limits::default()).unwrap();
        assert_eq!((p.memory, p.cpu_quota, p.pids), (None, None, None));
        for bad in [
            Limits {
                memory_bytes: Some((1 << 20) - 1),
                ..Default::default()
            },
            Limits {
                cpus: Some(0.0),
                ..Default::default()
            },
            Limits {
                cpus: Some(-1.0),
                ..Default::default()
            },
            Limits {
                cpus: Some(0.0049),
                ..Default::default()
            },
            Limits {
                cpus: Some(f64::NAN),
                ..Default::default()
            },
            Limits {
                cpus: Some(f64::INFINITY),
                ..Default::default()
            },
            Limits {
                cpus: Some(1e300),
                ..Default::default()
            },
            Limits {
                pids: Some(0),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(Plan::new(&bad), Err(Error::InvalidLimit(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mode_choice_deserializes_snake_case() {
        let de = |s: &'static str| {
            ModeChoice::deserialize::<StrDeserializer<'_, DeError>>(s.into_deserializer())
        };
        assert_eq!(de("auto").unwrap(), ModeChoice::Auto);
        assert_eq!(de("v1").unwrap(), ModeChoice::V1);
        assert_eq!(de("v2").unwrap(), ModeChoice::V2);
        assert_eq!(de("disabled").unwrap(), ModeChoice::Disabled);
        assert!(de("V2").is_err());
        let c = Config::default();
        assert_eq!(c.parent, "forkd");
        assert_eq!(c.instance, format!("d{}", std::process::id()));
        assert_eq!(c.mode, ModeChoice::Auto);
        assert!(!c.allow_missing_controllers);
    }

    #[test]
    fn errors_name_path_and_remedy() {
        let e = Error::ControllerUnavailable {
            controller: "memory",
            path: "/sys/fs/cgroup/unified/cgroup.controllers".into(),
        };
        assert_eq!(
            e.to_string(),
            "cgroup v2 controller `memory` is not available in /sys/fs/cgroup/unified/cgroup.controllers: enable it in the parent's cgroup.subtree_control (delegation) or use mode v1 (or set allow_missing_controllers to start without it; sandboxes requesting that limit are then refused)"
        );
        let e = Error::io(
            "mkdir",
            Path::new("/sys/fs/cgroup/x"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        let s = e.to_string();
        assert!(
            s.starts_with("mkdir /sys/fs/cgroup/x: Permission denied"),
            "{s}"
        );
        assert!(s.contains("delegate"), "{s}");
    }

    fn _assert_send_sync() {
        fn ss<T: Send + Sync>() {}
        fn s<T: Send>() {}
        ss::<Manager>();
        s::<SandboxCgroup>();
        ss::<Error>();
    }
}
