//! `[limits.io]` → the cgroup manager's block I/O throttle.
//!
//! The devices are resolved once at start: the whole disks backing every
//! policy's read-only trees, `/etc`, each zygote's interpreter (and the
//! prefix it lives in) and its `PYTHONPATH` entries, plus `limits.io.paths`.
//! A sandbox has no other block-backed file it can reach: its scratch is
//! tmpfs and its binds are read-only (a workspace lives on one of these
//! disks in practice; name it in `paths` if not).

use std::path::PathBuf;

use crate::settings::Settings;

/// The `[cgroup]` configuration with the resolved I/O throttle (none when
/// `[limits.io]` sets no limit: no per-sandbox cost).
pub fn cgroup_config(settings: &Settings) -> forkd_cgroup::Config {
    let mut cfg = settings.config.cgroup.clone();
    let io = &settings.config.limits.io;
    if !io.any() {
        return cfg;
    }
    let paths = bound_paths(settings);
    let (devices, none) = forkd_cgroup::io::backing_devices(&paths);
    if !none.is_empty() {
        tracing::info!(paths = ?none, "limits.io: these bound paths have no block device (tmpfs, overlay, missing): nothing to throttle there");
    }
    if devices.is_empty() {
        tracing::warn!("limits.io is set but no bound path is on a block device: sandbox disk I/O is not throttled");
    } else {
        tracing::info!(devices = ?devices, "limits.io: throttling these block devices per sandbox");
    }
    cfg.io = Some(forkd_cgroup::IoThrottle {
        read_bps: io.read_bps,
        write_bps: io.write_bps,
        read_iops: io.read_iops,
        write_iops: io.write_iops,
        devices,
    });
    cfg
}

/// Paths whose devices a sandbox can read through its binds.
fn bound_paths(settings: &Settings) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = vec!["/etc".into()];
    for policy in settings.policies.values() {
        paths.extend(policy.filesystem.read_only.iter().map(PathBuf::from));
    }
    for z in &settings.zygotes {
        let python = &z.section.python;
        let python = crate::locate::find_python(python, &z.section.name)
            .ok()
            .and_then(|p| std::fs::canonicalize(p).ok());
        if let Some(p) = python {
            // The interpreter's prefix (bin/..) holds its standard library.
            if let Some(prefix) = p.parent().and_then(|b| b.parent()) {
                paths.push(prefix.to_path_buf());
            }
            paths.push(p);
        }
        if let Some(pp) = z.section.env.get("PYTHONPATH") {
            paths.extend(pp.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
        }
    }
    paths.extend(settings.config.limits.io.paths.iter().cloned());
    paths
}
