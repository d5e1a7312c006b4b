//! The seam between the cgroup-version-independent [`crate::Manager`] /
//! [`crate::SandboxCgroup`] and the two kernel interfaces (youki's
//! `libcgroups` shape): everything that differs between cgroup v1 and v2
//! (finding and preparing the hierarchies, the limit files, the counters)
//! sits behind [`Flavour`], implemented by [`crate::v1::V1`],
//! [`crate::v2::V2`] and [`Off`]. Everything that is the same (directories,
//! `cgroup.procs`, killing, removal) stays in `lib.rs` and `sys.rs`.

use std::path::{Path, PathBuf};

use crate::parse::MountInfo;
use crate::{sys, Config, Error, Plan, Stats};

/// What differs between cgroup v1 and v2. Private to the crate: callers see
/// only [`crate::Mode`].
pub(crate) trait Flavour: Sync {
    /// Finds the hierarchies this flavour uses and creates
    /// `<root>/<parent>/<instance>` in each; returns them and the file that
    /// says which controllers exist (for error messages). Directories it
    /// created are pushed to `created` so a failure can remove them.
    fn setup(
        &self,
        cfg: &Config,
        mounts: &[MountInfo],
        created: &mut Vec<PathBuf>,
    ) -> Result<(Vec<Hier>, PathBuf), Error>;

    /// Writes the limits of `plan` into a new sandbox directory.
    fn apply_limits(&self, dir: &Path, ctl: Ctl, plan: &Plan) -> Result<(), Error>;

    /// Changes the limits of a live sandbox directory. Default: the same
    /// writes as [`Flavour::apply_limits`].
    fn set_limits(&self, dir: &Path, ctl: Ctl, plan: &Plan) -> Result<(), Error> {
        self.apply_limits(dir, ctl, plan)
    }

    /// Writes the block I/O limits into a new sandbox directory (only the
    /// hierarchy carrying the I/O controller). Default: nothing.
    fn apply_io(&self, _dir: &Path, _ctl: Ctl, _io: &crate::IoThrottle) -> Result<(), Error> {
        Ok(())
    }

    /// Reads the counters of a sandbox's directories (one per hierarchy),
    /// without `populated`.
    fn stats(&self, dirs: &[PathBuf], ctls: &[Ctl]) -> Result<Stats, Error>;

    /// Whether any process is still in the sandbox's directories.
    fn populated(&self, dirs: &[PathBuf]) -> Result<bool, Error>;
}

/// Which controllers a hierarchy directory carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ctl {
    pub(crate) memory: bool,
    pub(crate) cpu: bool,
    pub(crate) cpuacct: bool,
    pub(crate) pids: bool,
    /// v1 `blkio` / v2 `io` (only when block I/O limits are configured).
    pub(crate) io: bool,
}

impl Ctl {
    pub(crate) fn set(&mut self, name: &str) {
        match name {
            "memory" => self.memory = true,
            "cpu" => self.cpu = true,
            "cpuacct" => self.cpuacct = true,
            "pids" => self.pids = true,
            "blkio" | "io" => self.io = true,
            _ => {}
        }
    }
    pub(crate) fn has(&self, name: &str) -> bool {
        match name {
            "memory" => self.memory,
            "cpu" => self.cpu,
            "cpuacct" => self.cpuacct,
            "pids" => self.pids,
            "blkio" | "io" => self.io,
            _ => false,
        }
    }
}

/// One hierarchy (v1 mount or the v2 root) with this instance's base dir.
#[derive(Debug, Clone)]
pub(crate) struct Hier {
    /// `<root>/<parent>`, shared by all daemon instances.
    pub(crate) parent: PathBuf,
    /// `<root>/<parent>/<instance>`, this manager's.
    pub(crate) base: PathBuf,
    pub(crate) ctl: Ctl,
}

/// Mode disabled: no hierarchy, so no directory, limit or counter.
pub(crate) struct Off;

impl Flavour for Off {
    fn setup(
        &self,
        _: &Config,
        _: &[MountInfo],
        _: &mut Vec<PathBuf>,
    ) -> Result<(Vec<Hier>, PathBuf), Error> {
        Ok((Vec::new(), PathBuf::new()))
    }
    fn apply_limits(&self, _: &Path, _: Ctl, _: &Plan) -> Result<(), Error> {
        Ok(())
    }
    fn stats(&self, _: &[PathBuf], _: &[Ctl]) -> Result<Stats, Error> {
        Ok(Stats::default())
    }
    fn populated(&self, _: &[PathBuf]) -> Result<bool, Error> {
        Ok(false)
    }
}

/// Creates `<mount>/<parent>/<instance>` in a hierarchy, recording new dirs in
/// `created`; an existing instance dir is purged of leftover sandboxes.
/// Returns `(parent, base)`.
pub(crate) fn make_base(
    mount: &Path,
    cfg: &Config,
    created: &mut Vec<PathBuf>,
) -> Result<(PathBuf, PathBuf), Error> {
    let parent = mount.join(&cfg.parent);
    sys::mkdir(&parent)?;
    let base = parent.join(&cfg.instance);
    if sys::mkdir(&base)? {
        created.push(base.clone());
    } else {
        tracing::warn!(base = %base.display(), "instance cgroup already exists; removing leftover sandboxes");
        sys::kill_tree(std::slice::from_ref(&base))?;
        for sub in sys::subdirs(&base)? {
            sys::remove_tree(&sub)?;
        }
    }
    Ok((parent, base))
}

/// Reads a flat-keyed counter (`memory.events`, `pids.events`, ...) in `dir`.
pub(crate) fn keyed(dir: &Path, file: &str, key: &str) -> Result<Option<u64>, Error> {
    Ok(sys::read_opt(&dir.join(file))?.and_then(|t| crate::parse::keyed_u64(&t, key)))
}

/// Reads a single-number file (`memory.failcnt`, ...) in `dir`.
pub(crate) fn single(dir: &Path, file: &str) -> Result<Option<u64>, Error> {
    Ok(sys::read_opt(&dir.join(file))?.and_then(|t| crate::parse::single_u64(&t)))
}
