//! The terms of one sandbox, shared by one-shot spawns ([`crate::protocol`])
//! and sessions ([`crate::session`]): the limits asked for and applied, the
//! workspace, and why a sandbox was killed. Both message modules build on
//! this one; it depends on neither.

use serde::{Deserialize, Serialize};

/// A workspace: a host directory (named in the daemon's configuration, or an
/// ad-hoc path beneath its `workspace_roots`) seen at `mount_point` with
/// per-path modes (`none`, `view`, `read`, `write`) from ordered `GLOB=MODE`
/// rules. See `docs/workspaces.md`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRequest {
    /// A workspace configured by name (its rules are a ceiling: a request's
    /// rules can only narrow them). Exactly one of `name` and `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An absolute host path without symlinks, beneath one of the daemon's
    /// `workspace_roots`, that the requesting uid can access itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Ordered `GLOB=MODE` rules; most specific match wins, ties go to the
    /// later rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// Mode of paths no rule matches: `none`, `view`, `read` (default) or `write`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<String>,
    /// `direct` (default: writes land in the host directory) or `overlay`
    /// (copy-on-write; the host never changes).
    #[serde(default)]
    pub mode: WorkspaceMode,
    /// Where the sandbox sees it; default `/workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// Overlay mode: return the changes as a tar in
    /// [`SpawnResult::workspace_delta`](crate::SpawnResult::workspace_delta).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export_delta: bool,
}

/// Where a workspace's writes go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceMode {
    /// Into the host directory.
    #[default]
    Direct,
    /// Into a copy-on-write layer of the sandbox's own.
    Overlay,
}

/// Per-request resource limits. `None` takes the daemon's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory (RSS + page cache + tmpfs pages charged to the sandbox), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in cores (1.5 = one and a half cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads in the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Maximum bytes of stdout plus stderr kept; more kills the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// Size of the scratch tmpfs (working directory and /tmp), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_bytes: Option<u64>,
    /// RLIMIT_NOFILE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// RLIMIT_FSIZE: largest file the program may write, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size_bytes: Option<u64>,
}

/// Why a sandbox run ended abnormally: a limit the daemon enforced, the
/// kernel acting on a limit, or a signal. When several apply, the cause the
/// daemon acted on itself (timeout, output limit, shutdown) wins over the
/// ones inferred afterwards (oom, pids, signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KilledBy {
    /// The wall-clock timeout expired.
    Timeout,
    /// The kernel's OOM killer fired in the sandbox's cgroup (read from the
    /// cgroup's own counters).
    Oom,
    /// The pids limit refused a fork and the program then failed.
    Pids,
    /// stdout plus stderr exceeded the output limit.
    OutputLimit,
    /// Died from a signal nobody above accounts for.
    Signal,
    /// The daemon shut down while the sandbox ran.
    Shutdown,
}

/// Limits in force for a sandbox after defaults were filled in; same units
/// as [`Limits`] and [`SpawnRequest::timeout_ms`](crate::SpawnRequest::timeout_ms).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppliedLimits {
    /// Wall-clock limit, milliseconds.
    pub timeout_ms: u64,
    /// Memory limit, bytes.
    pub memory_bytes: u64,
    /// CPU bandwidth, cores.
    pub cpus: f64,
    /// Process/thread limit.
    pub pids: u64,
    /// stdout plus stderr limit, bytes.
    pub output_bytes: u64,
    /// Scratch tmpfs size, bytes.
    pub scratch_bytes: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_FSIZE, bytes.
    pub file_size_bytes: u64,
    /// False when the daemon has no usable cgroup (e.g. rootless without a
    /// delegated subtree): memory, cpu and pids were then NOT enforced.
    pub cgroup_enforced: bool,
}
