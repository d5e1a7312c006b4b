//! Freezing a sandbox's processes (session pause).
//!
//! v2: the sandbox's own `cgroup.freeze`. v1: the freezer controller has its
//! own hierarchy, which sandboxes do not join at spawn (a request pays only
//! for what it uses): the first pause makes a cgroup of the sandbox's name
//! there, sets it `FROZEN`, and moves the sandbox's processes in until none
//! is left outside (a process moved into a frozen cgroup freezes; one forked
//! meanwhile by a process not yet moved is caught by the next pass). The
//! directory is removed when the [`Freezer`] is dropped (after the sandbox
//! ended).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{parse, sys, Error, Mode, SandboxCgroup};

/// How long a freeze may take to settle.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Freezes and thaws one sandbox.
#[derive(Debug)]
pub struct Freezer {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    V2 {
        dir: PathBuf,
    },
    V1 {
        dir: PathBuf,
        source_procs: PathBuf,
        /// Parents made for it below the freezer root, deepest first
        /// (removed by whichever freezer is dropped last).
        parents: Vec<PathBuf>,
    },
}

impl SandboxCgroup {
    /// A freezer for this sandbox (v1: its freezer cgroup is made now).
    pub fn freezer(&self) -> Result<Freezer, Error> {
        match self.mode {
            Mode::V2 => {
                let dir = self.dirs.first().cloned().ok_or(Error::NoFreezer)?;
                Ok(Freezer {
                    kind: Kind::V2 { dir },
                })
            }
            Mode::V1 => {
                let mounts = crate::hierarchy_mounts()?;
                let freezer_root = mounts
                    .iter()
                    .find(|m| !m.v2 && m.options.iter().any(|o| o == "freezer"))
                    .map(|m| m.mount_point.clone())
                    .ok_or(Error::NoFreezer)?;
                // The sandbox's path below its first hierarchy's mount.
                let first = self.dirs.first().ok_or(Error::NoFreezer)?;
                let rel = mounts
                    .iter()
                    .filter(|m| !m.v2)
                    .filter_map(|m| first.strip_prefix(&m.mount_point).ok())
                    .min_by_key(|r| r.as_os_str().len())
                    .ok_or(Error::NoFreezer)?
                    .to_path_buf();
                let dir = freezer_root.join(&rel);
                let parents: Vec<PathBuf> = dir
                    .ancestors()
                    .skip(1)
                    .take_while(|p| p.starts_with(&freezer_root) && *p != freezer_root)
                    .map(Path::to_path_buf)
                    .collect();
                // Another sandbox's freezer may remove an empty parent
                // between our mkdirs: try again.
                let mut tries = 0;
                loop {
                    match std::fs::create_dir_all(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => {
                            tries += 1
                        }
                        Err(e) => return Err(Error::io("create", &dir, e)),
                    }
                }
                Ok(Freezer {
                    kind: Kind::V1 {
                        dir,
                        source_procs: first.join("cgroup.procs"),
                        parents,
                    },
                })
            }
            Mode::Disabled => Err(Error::NoFreezer),
        }
    }

    /// Memory charged and processes in the sandbox now (`None` where the
    /// controller is not there).
    pub fn usage_now(&self) -> (Option<u64>, Option<u64>) {
        let mut memory = None;
        let mut pids = None;
        for dir in &self.dirs {
            for name in ["memory.current", "memory.usage_in_bytes"] {
                if memory.is_none() {
                    memory = read_u64(&dir.join(name));
                }
            }
            if pids.is_none() {
                pids = read_u64(&dir.join("pids.current"));
            }
        }
        (memory, pids)
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    sys::read_opt(path).ok().flatten()?.trim().parse().ok()
}

impl Freezer {
    /// Stops every process of the sandbox; returns once they are frozen.
    pub fn freeze(&self) -> Result<(), Error> {
        match &self.kind {
            Kind::V2 { dir } => {
                sys::write(&dir.join("cgroup.freeze"), "1")?;
                wait_for(|| {
                    Ok(sys::read_opt(&dir.join("cgroup.events"))?
                        .is_some_and(|t| t.lines().any(|l| l.trim() == "frozen 1")))
                })
            }
            Kind::V1 {
                dir, source_procs, ..
            } => {
                sys::write(&dir.join("freezer.state"), "FROZEN")?;
                let procs = dir.join("cgroup.procs");
                wait_for(|| {
                    let left = parse::pids(&sys::read_opt(source_procs)?.unwrap_or_default());
                    let inside = parse::pids(&sys::read_opt(&procs)?.unwrap_or_default());
                    let outside: Vec<_> =
                        left.into_iter().filter(|p| !inside.contains(p)).collect();
                    for pid in &outside {
                        // A process that exited meanwhile is fine.
                        let _ = sys::write(&procs, &pid.to_string());
                    }
                    if !outside.is_empty() {
                        return Ok(false);
                    }
                    Ok(sys::read_opt(&dir.join("freezer.state"))?
                        .is_some_and(|s| s.trim() == "FROZEN"))
                })
            }
        }
    }

    /// Lets the processes run again.
    pub fn thaw(&self) -> Result<(), Error> {
        match &self.kind {
            Kind::V2 { dir } => sys::write(&dir.join("cgroup.freeze"), "0"),
            Kind::V1 { dir, .. } => sys::write(&dir.join("freezer.state"), "THAWED"),
        }
    }
}

fn wait_for(mut done: impl FnMut() -> Result<bool, Error>) -> Result<(), Error> {
    let deadline = Instant::now() + FREEZE_TIMEOUT;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::FreezeTimeout);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        if let Kind::V1 { dir, parents, .. } = &self.kind {
            let _ = sys::write(&dir.join("freezer.state"), "THAWED");
            // Empty once the sandbox has ended; a live one stays in its
            // memory/cpu/pids cgroups either way.
            if let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove freezer cgroup {}: {e}", dir.display());
                }
            }
            // Fails (harmlessly) while another sandbox's freezer is inside.
            for p in parents {
                if std::fs::remove_dir(p).is_err() {
                    break;
                }
            }
        }
    }
}
