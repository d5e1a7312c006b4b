//! forkd workspaces: a host directory inside the sandbox with per-path
//! modes enforced by the kernel (overlayfs, bind mounts, landlock), no FUSE.
//!
//! [`rules`] parses `GLOB=MODE` rules and decides each path's mode
//! ([`Rules::explain`] says why); [`plan`] walks the host directory once,
//! safely, and turns the rules into a [`MountPlan`] the sandbox's child
//! executes (see `forkd_zygote::workspace`); [`delta`] exports an overlay
//! workspace's changes and applies them to a host directory.
//! Design and limits: `docs/workspaces.md`.

pub mod delta;
pub mod plan;
pub mod rules;

pub use delta::{apply_tar, export_tar, export_tar_from, unpack_tree, DeltaError, DeltaStats};
pub use plan::{
    plan, plan_stamped, Access, Bind, Grant, Kind, MountPlan, PlanError, Stamps, MAX_PLAN_ITEMS,
};
pub use rules::{Mode, Reason, Rule, RuleError, Rules};

/// Where a workspace appears in the sandbox unless the request says otherwise.
pub const DEFAULT_MOUNT_POINT: &str = "/workspace";
