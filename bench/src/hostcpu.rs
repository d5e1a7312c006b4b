//! Host-wide CPU time, from the first line of `/proc/stat`.
//!
//! A spawn's cost is spread over the client, the daemon's threads, the
//! zygote, the child and the kernel work they cause (namespaces, cgroups,
//! page faults), so the bench measures what the whole host spent during a
//! phase and divides by the spawns in it. Other load on the host inflates
//! the figure: compare it only with the floor measured in the same run.

/// Busy CPU time of the host so far (user, nice, system, irq, softirq; not
/// idle, iowait or steal), in seconds.
pub fn busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    Some(busy as f64 / clock_ticks_per_sec())
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
pub struct Meter(Option<f64>);

impl Meter {
    pub fn start() -> Meter {
        Meter(busy_secs())
    }

    /// Host CPU milliseconds per spawn since `start`; `None` if `/proc/stat`
    /// could not be read or nothing was spawned.
    pub fn per_spawn_ms(&self, spawns: u64) -> Option<f64> {
        let spent = busy_secs()? - self.0?;
        (spawns > 0).then(|| spent * 1000.0 / spawns as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spinning one thread for 300 ms must show up as roughly 300 ms of host
    /// CPU (more if the host is busy, never much less).
    #[test]
    fn counts_a_known_amount_of_work() {
        let meter = Meter::start();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let ms = meter.per_spawn_ms(1).expect("/proc/stat readable");
        assert!(ms >= 250.0, "a 300 ms spin measured as {ms:.0} ms");
        assert_eq!(meter.per_spawn_ms(0), None);
    }
}
