//! How a sandbox ended, as one line a person reads. The CLI and the clients
//! print the same words (the Python client mirrors them in
//! `Execution.kill_message`), so a kill never shows as a bare empty stderr.

use crate::{CellResult, CommandResult, KilledBy, SpawnResult};

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

/// `killed: out of memory (limit 512 MiB, peak 511.8 MiB)`; without the
/// peak when it is unknown (0).
fn out_of_memory(limit: u64, peak: u64) -> String {
    if peak > 0 {
        format!(
            "killed: out of memory (limit {}, peak {})",
            format_bytes(limit),
            format_bytes(peak)
        )
    } else {
        format!("killed: out of memory (limit {})", format_bytes(limit))
    }
}

/// `timed out after 1.5 s (the timeout)`.
fn timed_out(timeout_ms: u64) -> String {
    #[allow(clippy::cast_precision_loss, reason = "milliseconds shown as seconds")]
    let secs = timeout_ms as f64 / 1000.0;
    format!("timed out after {secs} s (the timeout)")
}

impl CellResult {
    /// Why a limit stopped the cell, in [`SpawnResult::kill_message`]'s
    /// words: `killed: out of memory (limit 512 MiB, peak 511.8 MiB)` (the
    /// interpreter was replaced), `interrupted: timed out after 30 s (the
    /// timeout)` (the cell got `KeyboardInterrupt`; the session keeps its
    /// state) or `killed: timed out after ...` (it did not stop within the
    /// interrupt grace: the interpreter was replaced); `None` when no limit
    /// stopped it.
    pub fn kill_message(&self) -> Option<String> {
        if self.killed_by == Some(KilledBy::Oom) {
            return Some(out_of_memory(
                self.memory_limit_bytes.unwrap_or(0),
                self.peak_memory_bytes.unwrap_or(0),
            ));
        }
        if self.timed_out {
            let replaced = self.error.as_ref().is_some_and(|e| e.name == "KernelDied");
            return Some(format!(
                "{}: {}",
                if replaced { "killed" } else { "interrupted" },
                timed_out(self.timeout_ms.unwrap_or(0))
            ));
        }
        None
    }
}

/// `killed: output over the limit (1 MiB of stdout+stderr)`.
fn output_over(limit: u64) -> String {
    format!(
        "killed: output over the limit ({} of stdout+stderr)",
        format_bytes(limit)
    )
}

impl CommandResult {
    /// Why a limit stopped the command, in [`SpawnResult::kill_message`]'s
    /// words: `killed: timed out after 30 s (the timeout)` or `killed:
    /// output over the limit (1 MiB of stdout+stderr)`; `output cut at the
    /// limit (...)` when the output was cut but the command exited before
    /// the kill reached it (its `exit_code` is its own); `None` when no
    /// limit touched it (its `exit_code` or `signal` says how it ended).
    pub fn kill_message(&self) -> Option<String> {
        if self.timed_out {
            return Some(format!(
                "killed: {}",
                timed_out(self.timeout_ms.unwrap_or(0))
            ));
        }
        if self.stdout_truncated || self.stderr_truncated {
            let killed = self.exit_code.is_none();
            return Some(match (killed, self.output_limit_bytes) {
                (true, Some(limit)) => output_over(limit),
                (true, None) => "killed: output over the limit".to_string(),
                (false, Some(limit)) => format!(
                    "output cut at the limit ({} of stdout+stderr)",
                    format_bytes(limit)
                ),
                (false, None) => "output cut at the limit".to_string(),
            });
        }
        None
    }
}

impl SpawnResult {
    /// Why the sandbox was killed, e.g. `killed: out of memory (limit 512
    /// MiB, peak 511.8 MiB)`; `None` when the program ended on its own.
    pub fn kill_message(&self) -> Option<String> {
        let l = &self.limits;
        Some(match self.killed_by? {
            KilledBy::Oom => out_of_memory(l.memory_bytes, self.usage.peak_memory_bytes),
            KilledBy::Timeout => format!("killed: {}", timed_out(l.timeout_ms)),
            KilledBy::Pids => format!(
                "killed: process/thread limit reached (pids {}); a fork or thread start failed",
                l.pids
            ),
            KilledBy::OutputLimit => output_over(l.output_bytes),
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

    /// Commands: the same words, from the command's own fields (the Python
    /// client's `CommandResult.kill_message` checks the same table).
    #[test]
    fn commands_stopped_by_a_limit_read_as_one_line() {
        let command = |v: serde_json::Value| -> CommandResult {
            let mut base =
                serde_json::json!({"exit_code": null, "signal": 9, "stdout": "", "stderr": ""});
            base.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
            serde_json::from_value(base).unwrap()
        };
        for (fields, want) in [
            (
                serde_json::json!({"timed_out": true, "timeout_ms": 1500}),
                Some("killed: timed out after 1.5 s (the timeout)"),
            ),
            (
                serde_json::json!({"stdout_truncated": true, "output_limit_bytes": 1048576}),
                Some("killed: output over the limit (1 MiB of stdout+stderr)"),
            ),
            (
                serde_json::json!({"stderr_truncated": true}),
                Some("killed: output over the limit"),
            ),
            // It exited before the kill reached it.
            (
                serde_json::json!({"stdout_truncated": true, "output_limit_bytes": 1048576, "exit_code": 0, "signal": null}),
                Some("output cut at the limit (1 MiB of stdout+stderr)"),
            ),
            // Its own end: the status says it.
            (serde_json::json!({}), None),
            (serde_json::json!({"exit_code": 3, "signal": null}), None),
        ] {
            assert_eq!(
                command(fields.clone()).kill_message().as_deref(),
                want,
                "{fields}"
            );
        }
    }

    /// Cells: the same words, from the cell's own fields (the Python
    /// client's `CellResult.kill_message` checks the same table).
    #[test]
    fn cells_stopped_by_a_limit_read_as_one_line() {
        let cell = |v: serde_json::Value| -> CellResult {
            let mut base = serde_json::json!({"execution_count": 1, "stdout": "", "stderr": "", "duration_us": 5});
            base.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
            serde_json::from_value(base).unwrap()
        };
        let died = serde_json::json!({"name": "KernelDied", "value": "", "traceback": ""});
        let interrupted =
            serde_json::json!({"name": "KeyboardInterrupt", "value": "", "traceback": ""});
        for (fields, want) in [
            (
                serde_json::json!({"killed_by": "oom", "memory_limit_bytes": 268435456u64, "peak_memory_bytes": 268173312u64, "error": died}),
                Some("killed: out of memory (limit 256 MiB, peak 255.8 MiB)"),
            ),
            (
                serde_json::json!({"killed_by": "oom", "memory_limit_bytes": 268435456u64, "error": died}),
                Some("killed: out of memory (limit 256 MiB)"),
            ),
            (
                serde_json::json!({"timed_out": true, "timeout_ms": 1500, "error": interrupted}),
                Some("interrupted: timed out after 1.5 s (the timeout)"),
            ),
            (
                serde_json::json!({"timed_out": true, "timeout_ms": 30000, "error": died}),
                Some("killed: timed out after 30 s (the timeout)"),
            ),
            // A cell that caught the KeyboardInterrupt and went on.
            (
                serde_json::json!({"timed_out": true, "timeout_ms": 2000}),
                Some("interrupted: timed out after 2 s (the timeout)"),
            ),
            (serde_json::json!({"error": died}), None),
            (serde_json::json!({}), None),
        ] {
            assert_eq!(
                cell(fields.clone()).kill_message().as_deref(),
                want,
                "{fields}"
            );
        }
    }
}
