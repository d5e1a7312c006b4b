//! Host-wide CPU time, from the first line of `/proc/stat`.
//!
//! A spawn's cost is spread over the client, the daemon's threads, the
//! zygote, the child and the kernel work they cause (namespaces, cgroups,
//! page faults), so the bench measures what the whole host spent during a
//! phase and divides by the spawns in it. Other load on the host inflates
//! the figure: compare it only with the floor measured in the same run.
//! The perf check's busy-host guard reads the same counters.

/// The host's CPU time so far, summed over CPUs, in clock ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    /// user, nice, system, irq, softirq: work done on this host.
    pub busy: u64,
    /// Time the hypervisor gave to other guests.
    pub steal: u64,
    /// idle and iowait.
    pub idle: u64,
}

impl CpuTimes {
    pub fn now() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else {
            return None;
        };
        Some(CpuTimes {
            busy: user + nice + system + irq + softirq,
            steal,
            idle: idle + iowait,
        })
    }
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf reads a constant and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// CPU seconds a process has used itself (utime + stime of
/// `/proc/<pid>/stat`; children it reaped are not included).
pub fn process_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_sec())
}

/// Measures the host CPU spent from `start` to [`Meter::per_spawn_ms`].
pub struct Meter(Option<CpuTimes>);

impl Meter {
    pub fn start() -> Meter {
        Meter(CpuTimes::now())
    }

    /// Busy host CPU milliseconds per spawn since `start` (steal excluded);
    /// `None` if `/proc/stat` could not be read or nothing was spawned.
    pub fn per_spawn_ms(&self, spawns: u64) -> Option<f64> {
        let ticks = CpuTimes::now()?.busy.checked_sub(self.0?.busy)?;
        (spawns > 0).then(|| ticks as f64 * 1000.0 / clock_ticks_per_sec() / spawns as f64)
    }
}

/// CPU time of sandbox children, summed by their cgroup parent: v1
/// `cpuacct.usage` (ns) or v2 `cpu.stat` `usage_usec`. A parent keeps what
/// its removed children used, so this counts finished sandboxes too.
pub fn cgroup_cpu_secs(file: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(file).ok()?;
    if file.file_name()? == "cpu.stat" {
        let usec: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))?
            .trim()
            .parse()
            .ok()?;
        Some(usec / 1e6)
    } else {
        Some(text.trim().parse::<f64>().ok()? / 1e9)
    }
}

/// The file [`cgroup_cpu_secs`] reads under one of `dirs` (a cgroup manager's
/// base directories).
pub fn cgroup_cpu_file(dirs: &[&std::path::Path]) -> Option<std::path::PathBuf> {
    // v1's cpu hierarchy has a cpu.stat too, without usage: cpuacct first.
    let first = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
    first("cpuacct.usage").or_else(|| first("cpu.stat").filter(|p| cgroup_cpu_secs(p).is_some()))
}

/// Where one spawn's CPU went, in ms per spawn.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Split {
    /// Busy host CPU (all processes, /proc/stat; steal excluded).
    pub total_ms: f64,
    /// This process: forkd's embedded daemon plus the client (forkd), or the
    /// floor's driver (floor).
    pub bench_process_ms: f64,
    /// The zygote (forkd) or the fork server (floor), itself.
    pub zygote_ms: f64,
    /// The sandboxes, from their cgroups' CPU accounting.
    pub children_ms: f64,
    /// Everything else the host did meanwhile: kernel threads (e.g. network
    /// namespace cleanup), interrupts, and any other load on the machine.
    pub rest_ms: f64,
}

/// Snapshot of the counters a [`Split`] is computed from.
pub struct SplitMeter {
    host: Option<CpuTimes>,
    me: Option<f64>,
    zygote_pid: Option<i32>,
    zygote: Option<f64>,
    children_file: Option<std::path::PathBuf>,
    children: Option<f64>,
}

impl SplitMeter {
    pub fn start(zygote_pid: Option<i32>, children_file: Option<std::path::PathBuf>) -> SplitMeter {
        SplitMeter {
            host: CpuTimes::now(),
            me: process_cpu_secs(std::process::id() as i32),
            zygote: zygote_pid.and_then(process_cpu_secs),
            zygote_pid,
            children: children_file.as_deref().and_then(cgroup_cpu_secs),
            children_file,
        }
    }

    /// The split since `start`, per spawn; `None` if a counter could not be
    /// read (e.g. the zygote was replaced meanwhile) or nothing was spawned.
    pub fn per_spawn(&self, spawns: u64) -> Option<Split> {
        if spawns == 0 {
            return None;
        }
        let n = spawns as f64;
        let ms = |secs: f64| secs * 1000.0 / n;
        let total =
            CpuTimes::now()?.busy.checked_sub(self.host?.busy)? as f64 / clock_ticks_per_sec();
        let me = process_cpu_secs(std::process::id() as i32)? - self.me?;
        let zygote = process_cpu_secs(self.zygote_pid?)? - self.zygote?;
        let children = cgroup_cpu_secs(self.children_file.as_deref()?)? - self.children?;
        Some(Split {
            total_ms: ms(total),
            bench_process_ms: ms(me),
            zygote_ms: ms(zygote),
            children_ms: ms(children),
            rest_ms: ms(total - me - zygote - children),
        })
    }
}

/// Cores kept busy by everything else while this thread sleeps for
/// `window` (call it when nothing of the bench runs: what burns CPU then
/// belongs to other processes, plus leftover kernel cleanup of ours). The
/// load average cannot say this: a burst of the bench's own processes
/// stays in it for minutes.
pub fn others_busy_cores(window: std::time::Duration) -> Option<f64> {
    let jiffies = || {
        let t = CpuTimes::now()?;
        Some((t.busy + t.steal, t.busy + t.steal + t.idle))
    };
    let (busy0, total0) = jiffies()?;
    std::thread::sleep(window);
    let (busy1, total1) = jiffies()?;
    let cpus = std::thread::available_parallelism().ok()?.get() as f64;
    let total = total1.checked_sub(total0)?;
    (total > 0).then(|| busy1.saturating_sub(busy0) as f64 / total as f64 * cpus)
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Keeping every CPU busy for 400 ms must read as about 400 ms per CPU:
    /// counting idle, steal or the wrong unit would read near 0 or far off.
    #[test]
    fn counts_a_known_amount_of_work() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let meter = Meter::start();
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..cpus {
                s.spawn(|| {
                    let t = Instant::now();
                    let mut x = 0u64;
                    while t.elapsed() < Duration::from_millis(400) {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                });
            }
        });
        let ms = meter.per_spawn_ms(1).expect("/proc/stat readable");
        // At most every CPU busy for the whole time (other load included),
        // plus a clock tick per CPU of rounding.
        let most = (t0.elapsed().as_secs_f64() * 1000.0 + 20.0) * cpus as f64;
        let expected = 400.0 * cpus as f64;
        assert!(
            ms >= 0.7 * expected && ms <= most,
            "{cpus} CPUs spun for 400 ms measured as {ms:.0} ms (expected {expected:.0} to {most:.0})"
        );
        assert_eq!(meter.per_spawn_ms(0), None);
    }

    /// This thread's own CPU time (CLOCK_THREAD_CPUTIME_ID), in seconds.
    fn thread_cpu_secs() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }

    /// 300 ms of this thread's CPU (however long that takes on a loaded
    /// host) must show as about 0.3 s of this process's CPU: the unit and
    /// the fields counted after the command name.
    #[test]
    fn process_cpu_counts_own_work() {
        let me = std::process::id() as i32;
        let before = process_cpu_secs(me).expect("/proc/self/stat readable");
        let start = thread_cpu_secs();
        let mut x = 0u64;
        while thread_cpu_secs() - start < 0.3 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = process_cpu_secs(me).unwrap() - before;
        // Other tests may run in this process at the same time: the lower
        // bound is certain (less a tick of rounding), the upper generous.
        assert!(
            (0.28..5.0).contains(&used),
            "0.3 s of CPU read as {used:.3} s"
        );
        assert_eq!(process_cpu_secs(-1), None);
    }

    /// Both accounting formats, and v1's cpu hierarchy (whose cpu.stat has
    /// no usage) is not mistaken for cpuacct.
    #[test]
    fn cgroup_cpu_files_of_both_versions() {
        let dir = std::env::temp_dir().join(format!("forkd-bench-hostcpu-{}", std::process::id()));
        let (cpu, cpuacct, v2) = (dir.join("cpu"), dir.join("cpuacct"), dir.join("v2"));
        for d in [&cpu, &cpuacct, &v2] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(
            cpu.join("cpu.stat"),
            "nr_periods 5\nnr_throttled 0\nthrottled_time 0\n",
        )
        .unwrap();
        std::fs::write(cpuacct.join("cpuacct.usage"), "1500000000\n").unwrap();
        std::fs::write(
            v2.join("cpu.stat"),
            "usage_usec 2500000\nuser_usec 2000000\n",
        )
        .unwrap();
        let v1_file = cgroup_cpu_file(&[cpu.as_path(), cpuacct.as_path()]).unwrap();
        assert_eq!(v1_file, cpuacct.join("cpuacct.usage"));
        assert_eq!(cgroup_cpu_secs(&v1_file), Some(1.5));
        assert_eq!(cgroup_cpu_file(&[cpu.as_path()]), None);
        let v2_file = cgroup_cpu_file(&[v2.as_path()]).unwrap();
        assert_eq!(cgroup_cpu_secs(&v2_file), Some(2.5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
