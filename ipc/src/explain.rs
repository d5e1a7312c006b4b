//! How a sandbox ended, as one line a person reads. The CLI and the clients
//! print the same words (the Python client mirrors them in
//! `Execution.kill_message`), so a kill never shows as a bare empty stderr.

use crate::{KilledBy, SpawnResult};

/// A byte count as people read it: `512 MiB`, `1 GiB`, `498.3 MiB`, `812 B`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if n.is_multiple_of(scale) {
        format!("{} {}", n / scale, UNITS[unit])
    } else {
        #[allow(
            clippy::cast_precision_loss,
            reason = "one decimal shown; a byte of precision does not matter"
        )]
        let v = n as f64 / scale as f64;
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl SpawnResult {
    /// Why the sandbox was killed, e.g. `killed: out of memory (limit 512
    /// MiB, peak 511.8 MiB)`; `None` when the program ended on its own.
    pub fn kill_message(&self) -> Option<String> {
        let l = &self.limits;
        Some(match self.killed_by? {
            KilledBy::Oom if self.usage.peak_memory_bytes > 0 => format!(
                "killed: out of memory (limit {}, peak {})",
                format_bytes(l.memory_bytes),
                format_bytes(self.usage.peak_memory_bytes)
            ),
            KilledBy::Oom => format!(
                "killed: out of memory (limit {})",
                format_bytes(l.memory_bytes)
            ),
            KilledBy::Timeout => {
                #[allow(clippy::cast_precision_loss, reason = "milliseconds shown as seconds")]
                let secs = l.timeout_ms as f64 / 1000.0;
                format!("killed: timed out after {secs} s (the timeout)")
            }
            KilledBy::Pids => format!(
                "killed: process/thread limit reached (pids {}); a fork or thread start failed",
                l.pids
            ),
            KilledBy::OutputLimit => format!(
                "killed: output over the limit ({} of stdout+stderr)",
                format_bytes(l.output_bytes)
            ),
            KilledBy::Signal => match self.signal {
                Some(sig) => format!("killed by signal {sig}"),
                None => "killed by a signal".to_string(),
            },
            KilledBy::Shutdown => "killed: the daemon shut down while it ran".to_string(),
        })
    }

    /// False when the daemon could not enforce memory, cpu and pids limits
    /// (no usable cgroup, e.g. rootless without a delegated subtree); the
    /// limits in [`SpawnResult::limits`] were then not applied.
    pub fn limits_enforced(&self) -> bool {
        self.limits.cgroup_enforced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(format_bytes(1 << 30), "1 GiB");
        assert_eq!(format_bytes(812), "812 B");
        assert_eq!(format_bytes((498 << 20) + (3 << 20) / 10), "498.3 MiB");
    }

    fn result(killed_by: &str, signal: Option<i32>, peak: u64) -> SpawnResult {
        serde_json::from_value(serde_json::json!({
            "sandbox": 1, "zygote": "default", "exit_code": null, "signal": signal,
            "killed_by": serde_json::from_str::<serde_json::Value>(killed_by).unwrap(),
            "stdout": "", "stderr": "", "stdout_truncated": false, "stderr_truncated": false,
            "timings": {"total_us": 0, "fork_us": 0, "isolated_us": 0, "run_us": 0},
            "usage": {"cpu_user_us": 0, "cpu_system_us": 0, "peak_memory_bytes": peak},
            "limits": {"timeout_ms": 1500, "memory_bytes": 536870912u64, "cpus": 1.0, "pids": 64,
                       "output_bytes": 1048576, "scratch_bytes": 0, "open_files": 0,
                       "file_size_bytes": 0, "cgroup_enforced": false}
        }))
        .unwrap()
    }

    /// The same words as the Python client's `Execution.kill_message`
    /// (clients/python/tests/test_client.py checks the same table).
    #[test]
    fn kills_read_as_one_line() {
        let mut r = result("\"timeout\"", Some(9), 0);
        r.limits.timeout_ms = 30_000;
        assert_eq!(
            r.kill_message().as_deref(),
            Some("killed: timed out after 30 s (the timeout)")
        );
        for (killed_by, signal, peak, want) in [
            (
                "\"oom\"",
                Some(9),
                536_608_768,
                Some("killed: out of memory (limit 512 MiB, peak 511.8 MiB)"),
            ),
            (
                "\"oom\"",
                Some(9),
                0,
                Some("killed: out of memory (limit 512 MiB)"),
            ),
            (
                "\"timeout\"",
                Some(9),
                0,
                Some("killed: timed out after 1.5 s (the timeout)"),
            ),
            (
                "\"pids\"",
                None,
                0,
                Some(
                    "killed: process/thread limit reached (pids 64); a fork or thread start failed",
                ),
            ),
            (
                "\"output_limit\"",
                Some(9),
                0,
                Some("killed: output over the limit (1 MiB of stdout+stderr)"),
            ),
            ("\"signal\"", Some(11), 0, Some("killed by signal 11")),
            (
                "\"shutdown\"",
                Some(9),
                0,
                Some("killed: the daemon shut down while it ran"),
            ),
            ("null", None, 0, None),
        ] {
            let r = result(killed_by, signal, peak);
            assert_eq!(r.kill_message().as_deref(), want, "{killed_by}");
            assert!(!r.limits_enforced());
        }
    }
}
