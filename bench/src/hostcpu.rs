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
}
