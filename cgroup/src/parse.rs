//! Pure parsers for the kernel text formats this crate reads. No I/O here, so
//! everything is unit-tested with literal strings.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One line of `/proc/self/mountinfo` (only the fields this crate needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountInfo {
    /// Field 5: where the filesystem is mounted, with `\NNN` escapes decoded.
    pub mount_point: PathBuf,
    /// The filesystem type after the `-` separator (`cgroup`, `cgroup2`, ...).
    pub fstype: String,
    /// Comma-separated super options after the source (`rw,cpu,cpuacct`).
    pub super_opts: Vec<String>,
}

/// Parses `/proc/self/mountinfo` (proc(5)):
/// `id parent maj:min root mount_point opts [optional...] - fstype source super_opts`.
/// The number of optional fields varies, so the `-` separator is searched for.
/// Malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.len() < 10 {
        return None;
    }
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let fstype = fields.get(sep + 1)?;
    let super_opts = fields.get(sep + 3)?;
    Some(MountInfo {
        mount_point: PathBuf::from(OsString::from_vec(unescape_octal(fields[4]))),
        fstype: String::from_utf8_lossy(&unescape_octal(fstype)).into_owned(),
        super_opts: super_opts.split(',').map(str::to_owned).collect(),
    })
}

/// Decodes the `\NNN` octal escapes the kernel uses for space, tab, newline
/// and backslash in mountinfo paths.
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Finds `key N` in a flat-keyed cgroup file (`memory.events`,
/// `memory.oom_control`, `pids.events`, `cpu.stat`, `cgroup.events`).
pub(crate) fn keyed_u64(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        if it.next()? != key {
            return None;
        }
        it.next()?.parse().ok()
    })
}

/// Parses a single-number file such as `memory.failcnt` or `cpuacct.usage_user`.
pub(crate) fn single_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Parses `cgroup.procs`: one pid per line. Pids that are not positive (a pid
/// outside our pid namespace can read as 0) are dropped so they can never be
/// passed to kill(2).
pub(crate) fn pids(text: &str) -> Vec<i32> {
    text.lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
        .collect()
}

/// Whether a space-separated controller list (`cgroup.controllers`,
/// `cgroup.subtree_control`) contains `name`.
pub(crate) fn has_word(text: &str, name: &str) -> bool {
    text.split_whitespace().any(|w| w == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_v1_v2_hybrid() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].fstype, "tmpfs");
        assert_eq!(m[1].mount_point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(m[1].super_opts, vec!["rw", "cpu"]);
        assert_eq!(m[3].fstype, "cgroup2");
        assert_eq!(m[3].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn mountinfo_optional_fields_and_comounted() {
        // systemd hosts: several optional fields (shared:N master:M) before `-`.
        let text = "\
35 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 master:3 - cgroup cgroup rw,cpu,cpuacct
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(m[0].fstype, "cgroup");
        assert_eq!(m[0].super_opts, vec!["rw", "cpu", "cpuacct"]);
        assert_eq!(m[1].fstype, "cgroup2");
        assert_eq!(m[1].super_opts[1], "nsdelegate");
    }

    #[test]
    fn mountinfo_escaped_spaces_and_garbage() {
        let text = "\
100 31 0:40 / /mnt/my\\040cgroups\\011x\\134y rw - cgroup2 none rw
bogus line
101 31 0:41 / /mnt/no-separator rw a b c d e
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my cgroups\tx\\y"));
        assert_eq!(m[0].fstype, "cgroup2");
    }

    #[test]
    fn unescape_edge_cases() {
        assert_eq!(unescape_octal("a\\04"), b"a\\04".to_vec());
        assert_eq!(unescape_octal("\\777"), b"\\777".to_vec()); // > 255: kept literally
        assert_eq!(unescape_octal("\\012end"), b"\nend".to_vec());
        assert_eq!(unescape_octal("x\\"), b"x\\".to_vec());
    }

    #[test]
    fn oom_control_v1() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_u64(text, "oom_kill"), Some(3));
        assert_eq!(keyed_u64(text, "oom_kill_disable"), Some(0));
        assert_eq!(
            keyed_u64("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"),
            None
        );
    }

    #[test]
    fn memory_events_v2() {
        let text = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_u64(text, "oom_kill"), Some(1));
        assert_eq!(keyed_u64(text, "max"), Some(17));
        assert_eq!(keyed_u64(text, "oom"), Some(2));
    }

    #[test]
    fn pids_events() {
        assert_eq!(keyed_u64("max 0\n", "max"), Some(0));
        // Newer kernels add `max.imposed`; it must not shadow `max`.
        assert_eq!(keyed_u64("max.imposed 9\nmax 4\n", "max"), Some(4));
    }

    #[test]
    fn cpu_stat_v2() {
        let text = "usage_usec 52345\nuser_usec 40000\nsystem_usec 12345\nnr_periods 0\n\
                    nr_throttled 0\nthrottled_usec 0\n";
        assert_eq!(keyed_u64(text, "user_usec"), Some(40000));
        assert_eq!(keyed_u64(text, "system_usec"), Some(12345));
        assert_eq!(keyed_u64(text, "populated"), None);
    }

    #[test]
    fn procs_and_words() {
        assert_eq!(pids("12\n0\n\nabc\n-3\n4567\n"), vec![12, 4567]);
        assert!(pids("").is_empty());
        assert!(has_word("cpuset cpu io memory pids", "memory"));
        assert!(!has_word("cpuset cpu io memory_x pids", "memory"));
        assert_eq!(
            single_u64("9223372036854771712\n"),
            Some(9223372036854771712)
        );
        assert_eq!(single_u64("max\n"), None);
    }
}
