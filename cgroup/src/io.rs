//! Block I/O throttling: cgroup v1 `blkio.throttle.*_device`, v2 `io.max`.
//!
//! Which devices: the whole-disk block devices that back the paths a
//! sandbox can read (its bound trees), resolved once when the daemon starts
//! ([`backing_devices`]). A partition is throttled through its disk (the
//! kernel's throttle refuses partitions); a path on a filesystem without a
//! block device (tmpfs, overlay, btrfs subvolume: major 0) has nothing to
//! throttle and is reported back so the daemon can say so. The scratch is
//! tmpfs, so it never needs one.

use std::path::{Path, PathBuf};

use crate::{sys, Error};

/// Per-device limits applied to every sandbox cgroup. `None`: that
/// direction/unit is not limited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoThrottle {
    /// Read bytes per second.
    pub read_bps: Option<u64>,
    /// Written bytes per second.
    pub write_bps: Option<u64>,
    /// Read operations per second.
    pub read_iops: Option<u64>,
    /// Write operations per second.
    pub write_iops: Option<u64>,
    /// `(major, minor)` of each whole-disk device to throttle.
    pub devices: Vec<(u32, u32)>,
}

impl IoThrottle {
    /// Whether any limit is set and there is a device to apply it to.
    pub fn is_active(&self) -> bool {
        !self.devices.is_empty()
            && [
                self.read_bps,
                self.write_bps,
                self.read_iops,
                self.write_iops,
            ]
            .iter()
            .any(Option::is_some)
    }

    /// The v1 writes: `(file, "major:minor value")`.
    pub(crate) fn v1_lines(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (maj, min) in &self.devices {
            for (file, v) in [
                ("blkio.throttle.read_bps_device", self.read_bps),
                ("blkio.throttle.write_bps_device", self.write_bps),
                ("blkio.throttle.read_iops_device", self.read_iops),
                ("blkio.throttle.write_iops_device", self.write_iops),
            ] {
                if let Some(v) = v {
                    out.push((file, format!("{maj}:{min} {v}")));
                }
            }
        }
        out
    }

    /// The v2 `io.max` lines, one per device.
    pub(crate) fn v2_lines(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|(maj, min)| {
                let mut line = format!("{maj}:{min}");
                for (key, v) in [
                    ("rbps", self.read_bps),
                    ("wbps", self.write_bps),
                    ("riops", self.read_iops),
                    ("wiops", self.write_iops),
                ] {
                    if let Some(v) = v {
                        line.push_str(&format!(" {key}={v}"));
                    }
                }
                line
            })
            .collect()
    }

    /// Writes the v1 throttle files of a `blkio` sandbox directory.
    pub(crate) fn apply_v1(&self, dir: &Path) -> Result<(), Error> {
        self.v1_lines()
            .iter()
            .try_for_each(|(file, line)| sys::write(&dir.join(file), line))
    }

    /// Writes `io.max` of a v2 sandbox directory.
    pub(crate) fn apply_v2(&self, dir: &Path) -> Result<(), Error> {
        self.v2_lines()
            .iter()
            .try_for_each(|line| sys::write(&dir.join("io.max"), line))
    }
}

/// The whole-disk devices backing `paths` (deduplicated, in first-seen
/// order), and the paths that have none (no such path, or a filesystem
/// without a block device). A path naming a block device node itself
/// (`/dev/vdb`) stands for that device.
pub fn backing_devices(paths: &[PathBuf]) -> (Vec<(u32, u32)>, Vec<PathBuf>) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut devices = Vec::new();
    let mut none = Vec::new();
    for p in paths {
        let dev = match std::fs::metadata(p) {
            Ok(m) if m.file_type().is_block_device() => m.rdev(),
            Ok(m) => m.dev(),
            Err(_) => {
                none.push(p.clone());
                continue;
            }
        };
        let (maj, min) = (libc::major(dev), libc::minor(dev));
        match whole_disk(maj, min) {
            Some(d) if !devices.contains(&d) => devices.push(d),
            Some(_) => {}
            None => none.push(p.clone()),
        }
    }
    (devices, none)
}

/// The disk of a block device (itself unless it is a partition); `None` for
/// an anonymous device (major 0) or one sysfs does not know.
fn whole_disk(maj: u32, min: u32) -> Option<(u32, u32)> {
    if maj == 0 {
        return None;
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    if !sys.join("partition").exists() {
        return sys.exists().then_some((maj, min));
    }
    let disk = std::fs::canonicalize(&sys).ok()?.parent()?.join("dev");
    parse_dev(std::fs::read_to_string(disk).ok()?.trim())
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_each_device_and_only_set_limits() {
        let t = IoThrottle {
            read_bps: Some(10 << 20),
            write_iops: Some(100),
            devices: vec![(254, 0), (8, 16)],
            ..IoThrottle::default()
        };
        assert!(t.is_active());
        assert_eq!(
            t.v2_lines(),
            [
                "254:0 rbps=10485760 wiops=100",
                "8:16 rbps=10485760 wiops=100"
            ]
        );
        assert_eq!(
            t.v1_lines(),
            [
                (
                    "blkio.throttle.read_bps_device",
                    "254:0 10485760".to_owned()
                ),
                ("blkio.throttle.write_iops_device", "254:0 100".to_owned()),
                ("blkio.throttle.read_bps_device", "8:16 10485760".to_owned()),
                ("blkio.throttle.write_iops_device", "8:16 100".to_owned()),
            ]
        );
        assert!(!IoThrottle {
            devices: vec![(254, 0)],
            ..IoThrottle::default()
        }
        .is_active());
        assert!(!IoThrottle {
            read_bps: Some(1),
            ..IoThrottle::default()
        }
        .is_active());
    }

    #[test]
    fn tmpfs_and_missing_paths_have_no_device() {
        let (devs, none) = backing_devices(&["/dev/shm".into(), "/no/such/path".into()]);
        assert!(devs.is_empty(), "{devs:?}");
        assert_eq!(none.len(), 2);
        assert_eq!(parse_dev("254:0"), Some((254, 0)));
        assert_eq!(parse_dev("x"), None);
    }
}
