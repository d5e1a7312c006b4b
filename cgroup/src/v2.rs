//! cgroup v2: one directory in the unified hierarchy, controllers enabled
//! through `cgroup.subtree_control` from the root down to the base.

use std::fs;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::flavour::{keyed, make_base, single, Ctl, Flavour, Hier};
use crate::parse::{self, MountInfo};
use crate::{sys, Config, Error, Plan, Stats, CPU_PERIOD_US, DEFAULT_V2_ROOT};

/// The cgroup v2 flavour.
pub(crate) struct V2;

/// Whether `/sys/fs/cgroup` itself is a cgroup2 mount (the last mount on a
/// path is the visible one).
pub(crate) fn top_is_cgroup2(mounts: &[MountInfo]) -> bool {
    mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == Path::new(DEFAULT_V2_ROOT))
        .is_some_and(|m| m.fstype == "cgroup2")
}

/// The v2 root to create `<parent>/<instance>` under: `v2_root` (checked to
/// be on a cgroup2 mount), else `/sys/fs/cgroup` if it is cgroup2, else the
/// first cgroup2 mount.
fn root(cfg: &Config, mounts: &[MountInfo]) -> Result<PathBuf, Error> {
    let Some(r) = &cfg.v2_root else {
        if top_is_cgroup2(mounts) {
            return Ok(PathBuf::from(DEFAULT_V2_ROOT));
        }
        return match mounts.iter().find(|m| m.fstype == "cgroup2") {
            Some(m) => Ok(m.mount_point.clone()),
            None => Err(Error::NotCgroup2 {
                path: DEFAULT_V2_ROOT.into(),
                detail: "no cgroup2 filesystem is mounted".into(),
            }),
        };
    };
    let canon = fs::canonicalize(r).map_err(|e| Error::io("resolve v2_root", r, e))?;
    // The innermost (last, on ties) mount containing the path is the visible one.
    let m = mounts
        .iter()
        .filter(|m| canon.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count());
    match m {
        Some(m) if m.fstype == "cgroup2" => Ok(canon),
        Some(m) => Err(Error::NotCgroup2 {
            path: r.clone(),
            detail: format!(
                "it is on a {} mount at {}",
                m.fstype,
                m.mount_point.display()
            ),
        }),
        None => Err(Error::NotCgroup2 {
            path: r.clone(),
            detail: "no mount contains it".into(),
        }),
    }
}

impl Flavour for V2 {
    fn setup(
        &self,
        cfg: &Config,
        mounts: &[MountInfo],
        created: &mut Vec<PathBuf>,
    ) -> Result<(Vec<Hier>, PathBuf), Error> {
        let root = root(cfg, mounts)?;
        let controllers_file = root.join("cgroup.controllers");
        let avail = fs::read_to_string(&controllers_file)
            .map_err(|e| Error::io("read", &controllers_file, e))?;
        let mut ctl = Ctl {
            cpuacct: true, // cpu.stat usage is core in v2, no controller needed
            ..Ctl::default()
        };
        let mut enable = Vec::new();
        for c in ["memory", "cpu", "pids"] {
            if parse::has_word(&avail, c) {
                ctl.set(c);
                enable.push(c);
            } else if cfg.allow_missing_controllers {
                warn!(
                    "cgroup v2 controller `{c}` not in {}: that limit cannot be enforced",
                    controllers_file.display()
                );
            } else {
                return Err(Error::ControllerUnavailable {
                    controller: c,
                    path: controllers_file,
                });
            }
        }
        if cfg.io.as_ref().is_some_and(crate::IoThrottle::is_active) {
            // Configured limits are never dropped silently.
            if !parse::has_word(&avail, "io") {
                return Err(Error::ControllerUnavailable {
                    controller: "io",
                    path: controllers_file,
                });
            }
            ctl.set("io");
            enable.push("io");
        }
        enable_controllers(&root, &enable)?;
        let parent = root.join(&cfg.parent);
        sys::mkdir(&parent)?;
        enable_controllers(&parent, &enable)?;
        let (parent, base) = make_base(&root, cfg, created)?;
        enable_controllers(&base, &enable)?;
        Ok((vec![Hier { parent, base, ctl }], controllers_file))
    }

    fn apply_limits(&self, dir: &Path, ctl: Ctl, plan: &Plan) -> Result<(), Error> {
        if let (Some(m), true) = (plan.memory, ctl.memory) {
            sys::write(&dir.join("memory.max"), &m.to_string())?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                sys::write(&swap, "0")?;
            }
        }
        if let (Some(q), true) = (plan.cpu_quota, ctl.cpu) {
            sys::write(&dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
        }
        if let (Some(p), true) = (plan.pids, ctl.pids) {
            sys::write(&dir.join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }

    fn apply_io(&self, dir: &Path, ctl: Ctl, io: &crate::IoThrottle) -> Result<(), Error> {
        if ctl.io {
            io.apply_v2(dir)?;
        }
        Ok(())
    }

    fn stats(&self, dirs: &[PathBuf], ctls: &[Ctl]) -> Result<Stats, Error> {
        let mut s = Stats::default();
        for (dir, ctl) in dirs.iter().zip(ctls) {
            if ctl.pids {
                s.pids_limit_hits = keyed(dir, "pids.events", "max")?.unwrap_or(0);
            }
            if ctl.memory {
                s.oom_kills = keyed(dir, "memory.events", "oom_kill")?.unwrap_or(0);
                s.memory_limit_hits = keyed(dir, "memory.events", "max")?.unwrap_or(0);
                s.memory_peak_bytes = single(dir, "memory.peak")?;
            }
            s.cpu_user_us = keyed(dir, "cpu.stat", "user_usec")?;
            s.cpu_system_us = keyed(dir, "cpu.stat", "system_usec")?;
        }
        Ok(s)
    }

    fn populated(&self, dirs: &[PathBuf]) -> Result<bool, Error> {
        for dir in dirs {
            if keyed(dir, "cgroup.events", "populated")? == Some(1) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Writes `+<controller>` into `dir/cgroup.subtree_control` for each
/// controller not yet enabled there.
fn enable_controllers(dir: &Path, controllers: &[&str]) -> Result<(), Error> {
    let file = dir.join("cgroup.subtree_control");
    let current = sys::read_opt(&file)?.unwrap_or_default();
    for c in controllers {
        if !parse::has_word(&current, c) {
            fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .and_then(|mut f| std::io::Write::write_all(&mut f, format!("+{c}").as_bytes()))
                .map_err(|e| Error::io("enable controller in", &file, e))?;
        }
    }
    Ok(())
}
