//! cgroup v1: one hierarchy per controller (`/sys/fs/cgroup/memory`, ...),
//! co-mounted controllers (`cpu,cpuacct`) sharing one directory.

use std::path::{Path, PathBuf};

use tracing::warn;

use crate::flavour::{keyed, make_base, single, Ctl, Flavour, Hier};
use crate::parse::MountInfo;
use crate::{sys, Config, Error, Plan, Stats, CPU_PERIOD_US, MOUNTINFO};

/// The cgroup v1 flavour.
pub(crate) struct V1;

/// First `cgroup` (v1) mount carrying `controller` in its super options.
pub(crate) fn mount<'a>(mounts: &'a [MountInfo], controller: &str) -> Option<&'a MountInfo> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_opts.iter().any(|o| o == controller))
}

impl Flavour for V1 {
    fn setup(
        &self,
        cfg: &Config,
        mounts: &[MountInfo],
        created: &mut Vec<PathBuf>,
    ) -> Result<(Vec<Hier>, PathBuf), Error> {
        // Group controllers by mount point so co-mounted ones share a directory.
        let mut found: Vec<(PathBuf, Ctl)> = Vec::new();
        let io = cfg.io.as_ref().is_some_and(crate::IoThrottle::is_active);
        let wanted: &[&'static str] = if io {
            &["memory", "cpu", "cpuacct", "pids", "blkio"]
        } else {
            &["memory", "cpu", "cpuacct", "pids"]
        };
        for &c in wanted {
            match mount(mounts, c) {
                Some(m) => match found.iter_mut().find(|(p, _)| *p == m.mount_point) {
                    Some((_, ctl)) => ctl.set(c),
                    None => {
                        let mut ctl = Ctl::default();
                        ctl.set(c);
                        found.push((m.mount_point.clone(), ctl));
                    }
                },
                None if c == "cpuacct" => {}
                // Configured limits are never dropped silently.
                None if c == "blkio" => return Err(Error::V1NotMounted { controller: c }),
                None if cfg.allow_missing_controllers => {
                    warn!("cgroup v1 `{c}` is not mounted: that limit cannot be enforced")
                }
                None => return Err(Error::V1NotMounted { controller: c }),
            }
        }
        if found.is_empty() {
            return Err(Error::V1NotMounted {
                controller: "memory",
            });
        }
        let mut hiers = Vec::new();
        for (mount, ctl) in found {
            let (parent, base) = make_base(&mount, cfg, created)?;
            hiers.push(Hier { parent, base, ctl });
        }
        Ok((hiers, MOUNTINFO.into()))
    }

    fn apply_limits(&self, dir: &Path, ctl: Ctl, plan: &Plan) -> Result<(), Error> {
        if let (Some(bytes), true) = (plan.memory, ctl.memory) {
            let m = bytes.to_string();
            // limit first: memsw must always be >= limit.
            sys::write(&dir.join("memory.limit_in_bytes"), &m)?;
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                sys::write(&memsw, &m)?;
            }
            crate::kmem::set_v1_tcp_limit(dir, bytes)?;
        }
        if let (Some(q), true) = (plan.cpu_quota, ctl.cpu) {
            sys::write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            sys::write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
        }
        if let (Some(p), true) = (plan.pids, ctl.pids) {
            sys::write(&dir.join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }

    fn apply_io(&self, dir: &Path, ctl: Ctl, io: &crate::IoThrottle) -> Result<(), Error> {
        if ctl.io {
            io.apply_v1(dir)?;
        }
        Ok(())
    }

    /// The memory+swap limit must never drop below the memory limit, so a
    /// raise writes memsw first (then [`V1::apply_limits`] writes the limit,
    /// then memsw again, a no-op); a lowering goes limit first.
    fn set_limits(&self, dir: &Path, ctl: Ctl, plan: &Plan) -> Result<(), Error> {
        if let (Some(m), true) = (plan.memory, ctl.memory) {
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            let raising = sys::read_opt(&memsw)?
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|current| m > current);
            if raising {
                sys::write(&memsw, &m.to_string())?;
            }
        }
        self.apply_limits(dir, ctl, plan)
    }

    fn stats(&self, dirs: &[PathBuf], ctls: &[Ctl]) -> Result<Stats, Error> {
        let mut s = Stats::default();
        for (dir, ctl) in dirs.iter().zip(ctls) {
            if ctl.pids {
                s.pids_limit_hits = keyed(dir, "pids.events", "max")?.unwrap_or(0);
            }
            if ctl.memory {
                s.oom_kills = keyed(dir, "memory.oom_control", "oom_kill")?.unwrap_or(0);
                s.memory_peak_bytes = single(dir, "memory.max_usage_in_bytes")?;
                s.memory_limit_hits = single(dir, "memory.failcnt")?.unwrap_or(0)
                    + single(dir, "memory.memsw.failcnt")?.unwrap_or(0);
            }
            if ctl.cpuacct {
                s.cpu_user_us = single(dir, "cpuacct.usage_user")?.map(|ns| ns / 1000);
                s.cpu_system_us = single(dir, "cpuacct.usage_sys")?.map(|ns| ns / 1000);
            }
        }
        Ok(s)
    }

    fn populated(&self, dirs: &[PathBuf]) -> Result<bool, Error> {
        // v1 has no `cgroup.events`: look for any pid in the tree.
        sys::tree_populated(dirs)
    }
}
