//! Error type. Every message names the file or directory involved and says
//! what the operator can do about it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Pausing needs a freezer: v2, or a v1 `freezer` hierarchy.
    #[error("this host has no cgroup freezer for sandboxes (cgroup v1 without a mounted `freezer` hierarchy, or cgroups disabled): mount it (mount -t cgroup -o freezer cgroup /sys/fs/cgroup/freezer) or run on cgroup v2 to pause sessions")]
    NoFreezer,
    /// Processes did not freeze in time.
    #[error("the sandbox's processes did not freeze within 5 s (a process stuck in the kernel?); try again")]
    FreezeTimeout,
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read {}: {source}; forkd needs /proc mounted to find the cgroup mounts", path.display())]
    Mountinfo {
        /// The mountinfo path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },

    /// A required cgroup v1 hierarchy is not mounted.
    #[error("cgroup v1 `{controller}` controller is not mounted (no `cgroup` mount with option `{controller}` in /proc/self/mountinfo): mount it (mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}), use mode v2, or use mode disabled to run without limits")]
    V1NotMounted {
        /// Controller name (`memory`, `cpu`, `pids`).
        controller: &'static str,
    },

    /// No usable cgroup2 filesystem for mode v2.
    #[error("{} is not inside a cgroup2 mount ({detail}): set v2_root to a directory on a cgroup2 mount (see /proc/self/mountinfo), or use mode v1/disabled", path.display())]
    NotCgroup2 {
        /// The requested or default v2 root.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },

    /// A cgroup v2 controller is not available at the configured root.
    #[error("cgroup v2 controller `{controller}` is not available in {}: enable it in the parent's cgroup.subtree_control (delegation) or use mode v1 (or set allow_missing_controllers to start without it; sandboxes requesting that limit are then refused)", path.display())]
    ControllerUnavailable {
        /// Controller name.
        controller: &'static str,
        /// The `cgroup.controllers` file that lacks it.
        path: PathBuf,
    },

    /// A limit was requested that this manager cannot enforce (controller
    /// missing and `allow_missing_controllers` set).
    #[error("cannot enforce the {limit} limit: controller `{controller}` is not available (see {}): enable or mount the controller, or do not request this limit", path.display())]
    LimitUnsupported {
        /// Which limit (`memory`, `cpus`, `pids`).
        limit: &'static str,
        /// Controller it needs.
        controller: &'static str,
        /// Where availability was determined (`cgroup.controllers` or mountinfo).
        path: PathBuf,
    },

    /// A limit value is out of range.
    #[error("invalid limit: {0}")]
    InvalidLimit(String),

    /// [`crate::SandboxCgroup::attach_pid`] was asked to move pid 0 or the
    /// daemon itself.
    #[error("refusing to attach pid {0} to a sandbox cgroup: it would move the daemon itself; attach the child's pid, or have the child write 0 into procs_files()")]
    InvalidPid(u32),

    /// A sandbox, parent or instance name is not a safe single path component.
    #[error("invalid {what} {name:?}: use only [A-Za-z0-9_.-] (not \".\" or \"..\", not empty)")]
    InvalidName {
        /// Which name (`sandbox name`, `parent`, `instance`).
        what: &'static str,
        /// The rejected value.
        name: String,
    },

    /// A sandbox cgroup with this name already exists.
    #[error("sandbox cgroup {} already exists: use a unique sandbox name, or remove the leftover (Manager::cleanup_stale, or kill its processes and rmdir it)", path.display())]
    Exists {
        /// The existing directory.
        path: PathBuf,
    },

    /// A filesystem operation on a cgroup file or directory failed.
    #[error("{op} {}: {source}{hint}", path.display())]
    Io {
        /// What was attempted (`write`, `mkdir`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
        /// Advice derived from the errno (may be empty).
        hint: &'static str,
    },

    /// Processes survived repeated SIGKILL.
    #[error("processes {pids:?} are still in {} after {timeout:?} of SIGKILL (stuck in uninterruptible sleep?): check `cat /proc/<pid>/stack`, then kill them and rmdir the cgroup by hand", path.display())]
    KillTimeout {
        /// The cgroup directory.
        path: PathBuf,
        /// Remaining pids.
        pids: Vec<i32>,
        /// How long we tried.
        timeout: Duration,
    },
}

impl Error {
    /// Builds [`Error::Io`] with advice chosen from the errno.
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Error {
        let hint = match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => {
                "; permission denied: run forkd as root, delegate this cgroup subtree to the daemon's user (and set v2_root), or use mode disabled"
            }
            Some(libc::EROFS) => "; the cgroup filesystem is read-only: mount it read-write (containers: --cgroupns=private with a writable cgroup mount) or use mode disabled",
            Some(libc::EBUSY) if op == "enable controller in" => {
                "; the cgroup holds processes (cgroup v2 \"no internal processes\" rule): move the daemon into a leaf cgroup (e.g. <v2_root>/daemon) or choose a v2_root without processes"
            }
            Some(libc::EBUSY) => "; the cgroup is still in use: kill its processes first",
            Some(libc::ENOSPC) | Some(libc::EAGAIN) => "; cgroup limit reached (cgroup.max.descendants / cgroup.max.depth) or controller refused the value: raise the limit or remove stale cgroups",
            Some(libc::EINVAL) => "; the kernel rejected the value: check the configured limit",
            Some(libc::ENOENT) => "; it does not exist: the controller may not be enabled for this cgroup, or the cgroup was removed",
            _ => "",
        };
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
            hint,
        }
    }
}
