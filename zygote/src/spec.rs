//! Data the daemon sends to a zygote: its start-up configuration and the
//! per-child isolation parameters. Both travel as JSON through the Python
//! zygote, which passes them to this library unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// Configuration for `forkd_init`, built by the daemon; the Python side adds
/// `interpreter_paths` (its prefixes and `sys.path`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    pub policies: BTreeMap<String, Policy>,
    #[serde(default)]
    pub interpreter_paths: Vec<String>,
    #[serde(default = "default_hostname")]
    pub hostname: String,
}

fn default_hostname() -> String {
    "sandbox".into()
}

/// Isolation parameters of one child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildSpec {
    /// Name of a policy from [`InitConfig::policies`].
    pub policy: String,
    /// `cgroup.procs` files the child joins (writes "0" into) first.
    #[serde(default)]
    pub cgroup_procs: Vec<String>,
    pub scratch_bytes: u64,
    pub open_files: u64,
    pub file_size_bytes: u64,
    /// False only for the benchmark's no-isolation floor reference, which
    /// drives its own zygote; the daemon always isolates and no request can
    /// change that.
    #[serde(default = "yes")]
    pub isolate: bool,
    /// A workspace to mount (planned by the daemon; see `workspace.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<forkd_workspace::MountPlan>,
    /// Unprivileged uid (and gid) the sandbox runs as; None keeps the
    /// zygote's (a rootless zygote's user namespace maps only that one).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The CPUs its cgroup's cpu limit amounts to, rounded up (None: not
    /// enforced); `/sys/devices/system/cpu/online` shows that many (at most
    /// the host's), so `os.cpu_count()` and what sizes itself by it follow.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// A session that may be branched: landlock grants its scratch rights
    /// on the sandbox's root (read-only mounts keep the rest read-only), so
    /// that a copy of its interpreter can use a branch's fresh scratch
    /// (docs/branch.md). With a workspace only where mounts alone enforce
    /// it (overlay, no `view`: `MountPlan::branchable`), so nothing widens.
    #[serde(default)]
    pub branchable: bool,
    /// Make this child a branch of a running session: its namespaces are
    /// made so that a copy of that session's interpreter can join them
    /// (`uid` is then the branch's host uid, uid 0 inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<BranchOf>,
}

/// The session a branch is made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchOf {
    /// Host pid of the parent session's init (its executor).
    pub parent_pid: i32,
    /// The parent session's uid: the owner of the branch's user namespace.
    pub parent_uid: u32,
    /// Host ids (first, count) the branch's user namespace maps from its
    /// uid 1 on, for its own branches' uids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<(u32, u32)>,
    /// (A branch of a branch.) The branch's uid as its parent's user
    /// namespace maps it (from the parent's block): its user namespace is
    /// made inside the parent's, whose uid 0 owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_uid: Option<u32>,
}

fn yes() -> bool {
    true
}

/// What `forkd_init` reports back (JSON from `forkd_info`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitInfo {
    /// Landlock ABI the kernel offers (0: none; the sandbox then relies on the
    /// mount namespace alone for filesystem confinement).
    pub landlock_abi: i32,
    /// Per policy: what the kernel enforces of its landlock ruleset, measured
    /// at init by applying it in a throwaway child (every sandbox of this
    /// zygote gets the same kernel and ruleset, hence the same status).
    #[serde(default)]
    pub landlock: BTreeMap<String, LandlockStatus>,
    /// Instruction count of each policy's seccomp filter.
    pub seccomp_instructions: BTreeMap<String, usize>,
    /// Host paths bound read-only into each policy's root.
    pub bound_paths: BTreeMap<String, Vec<String>>,
}

/// What the kernel enforces of a policy's landlock ruleset (rust-landlock's
/// `RulesetStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockStatus {
    /// Every requested right and scope.
    FullyEnforced,
    /// Part of them (an older landlock ABI; best-effort policies only).
    PartiallyEnforced,
    /// None (no landlock in the kernel; best-effort policies only).
    NotEnforced,
}
