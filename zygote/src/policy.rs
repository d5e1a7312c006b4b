//! Isolation policy: data shipped in `policy/*.toml`, compiled once per zygote.

use std::collections::BTreeMap;

use seccompiler::BpfProgram;
use serde::{Deserialize, Serialize};

/// The policy shipped with forkd (`policy/default.toml`).
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../policy/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML for forkd: {0} (compare with policy/default.toml)")]
    Parse(#[from] toml::de::Error),
    #[error("policy names unknown system call `{0}` for this architecture: remove it or fix the spelling")]
    UnknownSyscall(String),
    #[error("policy path `{0}` must be absolute and must not contain `..`")]
    BadPath(String),
    #[error("policy /etc entry `{0}` must be a plain name or relative path without `..`")]
    BadEtcEntry(String),
    #[error("policy proc_masked entry `{0}` must be a relative path under /proc such as `keys`")]
    BadProcEntry(String),
    #[error("policy device `{0}` must be a plain device name such as `null`")]
    BadDevice(String),
    #[error("compiling the seccomp filter failed: {0}")]
    Seccomp(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What a kernel lacking part of the landlock ruleset means.
    #[serde(default)]
    pub landlock: LandlockLevel,
    pub filesystem: FilesystemPolicy,
    pub seccomp: SeccompPolicy,
}

/// Policy key `landlock`: how the landlock ruleset degrades on a kernel that
/// lacks part of it (rust-landlock's [`landlock::CompatLevel`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockLevel {
    /// Enforce what the kernel supports, down to nothing on a kernel without
    /// landlock (the mount namespace then confines the filesystem alone).
    /// The status each spawn result reports says which it was.
    #[default]
    BestEffort,
    /// Every requested right and scope must be enforced: a kernel that lacks
    /// one fails the zygote's start (and any child's isolation) instead.
    Required,
}

impl LandlockLevel {
    /// The rust-landlock compatibility level this stands for.
    pub fn compat_level(self) -> landlock::CompatLevel {
        match self {
            LandlockLevel::BestEffort => landlock::CompatLevel::BestEffort,
            LandlockLevel::Required => landlock::CompatLevel::HardRequirement,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesystemPolicy {
    /// Host paths bound read-only at the same place and allowed read+execute.
    #[serde(default)]
    pub read_only: Vec<String>,
    /// Entries of the host's /etc made visible read-only.
    #[serde(default)]
    pub etc: Vec<String>,
    /// Device nodes (names under /dev) readable and writable.
    #[serde(default)]
    pub devices_rw: Vec<String>,
    /// Device nodes readable only.
    #[serde(default)]
    pub devices_ro: Vec<String>,
    /// Files of /proc covered with /dev/null in every sandbox (host
    /// information a sandbox does not need). Names absent from the running
    /// kernel are skipped.
    #[serde(default)]
    pub proc_masked: Vec<String>,
    /// Give each sandbox its own inodes for the bound directory trees (a
    /// read-only overlayfs per tree, per child), so `flock()` and POSIX
    /// locks on a shared file cannot block another tenant: locks belong to
    /// inodes, and bind mounts share the host's. Costs one overlay mount
    /// per tree per sandbox (SECURITY.md); `/etc` entries are copied into
    /// the root and covered by one more. Off when absent (the shipped policy
    /// turns it on).
    #[serde(default)]
    pub private_locks: bool,
    /// A private devpts instance on /dev/pts (and /dev/ptmx) in every
    /// sandbox, for pty users (`os.openpty`, `pty.spawn`, `script`). Costs a
    /// mount per sandbox (made before the request for warm-pool children).
    #[serde(default)]
    pub devpts: bool,
    /// `/sys/devices/system/cpu/online` shows each sandbox the CPUs of its
    /// cpu limit (rounded up), so `os.cpu_count()` follows it. Costs a file
    /// write per sandbox (made before the request for warm-pool children).
    #[serde(default)]
    pub cpu_count: bool,
    /// Pin each sandbox with a cpu limit below the host's CPUs to that many
    /// CPUs (rounded up; a random run of the zygote's allowed CPUs), so
    /// `os.sched_getaffinity`, `os.process_cpu_count` and thread pools sized
    /// by the affinity (OpenBLAS, OpenMP) follow the limit. Opt-in: a pinned
    /// sandbox cannot use an idle CPU outside its set, which the cpu limit
    /// alone would allow; it may widen its own affinity again (the limit is
    /// the cgroup's, not the set).
    #[serde(default)]
    pub cpu_affinity: bool,
    /// Each sandbox sees its own cgroup read-only at the host's cgroup mount
    /// points (`/sys/fs/cgroup/memory.max` on v2,
    /// `/sys/fs/cgroup/memory/memory.limit_in_bytes` on v1), rooted there by
    /// its cgroup namespace, as in a container: cgroup-aware code finds its
    /// memory and CPU limits and usage. Costs a mount per hierarchy per
    /// sandbox (made before the request for warm-pool children).
    #[serde(default)]
    pub cgroup_view: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompPolicy {
    /// System calls that fail with EPERM (the classic privileged interfaces).
    #[serde(default)]
    pub deny: Vec<String>,
    /// Groups of allowed system calls, each with its reason. Everything not
    /// allowed or denied fails with ENOSYS.
    #[serde(default)]
    pub allow: Vec<AllowGroup>,
    /// Argument filters of allowed calls.
    #[serde(default)]
    pub rules: ArgRules,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowGroup {
    /// Why a sandbox needs these calls (one line; documentation only).
    pub why: String,
    pub syscalls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgRules {
    /// socket() address families allowed (`AF_UNIX`, ...); others fail with EPERM.
    #[serde(default = "default_families")]
    pub socket_families: Vec<String>,
    /// AF_NETLINK protocols allowed (only `NETLINK_ROUTE` is accepted: the
    /// sandbox's own interfaces and routes); empty: no netlink at all.
    #[serde(default = "default_netlink")]
    pub netlink_protocols: Vec<String>,
    /// ioctl() request type bytes (bits 8-15 of the request) allowed; others
    /// fail with ENOTTY.
    #[serde(default = "default_ioctl_types")]
    pub ioctl_types: Vec<u8>,
    /// ioctl() requests that fail with EPERM although their type is allowed
    /// (`TIOCSTI`: typing into a terminal's input; `TIOCLINUX`).
    #[serde(default = "default_ioctl_deny")]
    pub ioctl_deny: Vec<String>,
    /// fcntl() commands that fail with EPERM.
    #[serde(default = "default_fcntl_deny")]
    pub fcntl_deny: Vec<String>,
    /// Deny clone() with namespace flags (EPERM).
    #[serde(default = "yes")]
    pub deny_clone_namespaces: bool,
}

impl Default for ArgRules {
    fn default() -> Self {
        ArgRules {
            socket_families: default_families(),
            netlink_protocols: default_netlink(),
            ioctl_types: default_ioctl_types(),
            ioctl_deny: default_ioctl_deny(),
            fcntl_deny: default_fcntl_deny(),
            deny_clone_namespaces: true,
        }
    }
}

fn default_families() -> Vec<String> {
    ["AF_UNIX", "AF_INET", "AF_INET6"]
        .map(String::from)
        .to_vec()
}

fn default_ioctl_deny() -> Vec<String> {
    vec!["TIOCSTI".into(), "TIOCLINUX".into()]
}

fn default_netlink() -> Vec<String> {
    vec!["NETLINK_ROUTE".into()]
}

fn default_ioctl_types() -> Vec<u8> {
    vec![0x54, 0x89]
}

fn default_fcntl_deny() -> Vec<String> {
    ["F_SETLEASE", "F_NOTIFY"].map(String::from).to_vec()
}

fn yes() -> bool {
    true
}

impl Policy {
    pub fn default_policy() -> Policy {
        // The shipped file is covered by a unit test, so this cannot fail at run time.
        Policy::from_toml(DEFAULT_POLICY_TOML).expect("policy/default.toml is valid")
    }

    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text)?;
        policy.validate()?;
        Ok(policy)
    }

    fn validate(&self) -> Result<(), PolicyError> {
        for p in &self.filesystem.read_only {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(PolicyError::BadPath(p.clone()));
            }
        }
        for e in &self.filesystem.etc {
            if e.is_empty() || e.starts_with('/') || e.split('/').any(|c| c == ".." || c == ".") {
                return Err(PolicyError::BadEtcEntry(e.clone()));
            }
        }
        for d in self
            .filesystem
            .devices_rw
            .iter()
            .chain(&self.filesystem.devices_ro)
        {
            if d.is_empty() || d.contains('/') || d == "." || d == ".." {
                return Err(PolicyError::BadDevice(d.clone()));
            }
        }
        for f in &self.filesystem.proc_masked {
            if f.is_empty()
                || f.starts_with('/')
                || f.split('/').any(|c| c == ".." || c == "." || c.is_empty())
            {
                return Err(PolicyError::BadProcEntry(f.clone()));
            }
        }
        // Compiling checks every syscall name.
        self.compile_seccomp().map(|_| ())
    }

    /// Compiles the seccomp part to a BPF program (see [`crate::seccomp`]).
    pub fn compile_seccomp(&self) -> Result<BpfProgram, PolicyError> {
        crate::seccomp::compile(&self.seccomp)
    }
}

/// Named policies, as a daemon configures them.
pub type PolicySet = BTreeMap<String, Policy>;

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test values are small constants"
)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_parses_and_denies_the_required_calls() {
        let p = Policy::default_policy();
        for required in [
            "mount",
            "umount2",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "bpf",
            "perf_event_open",
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "keyctl",
            "add_key",
            "request_key",
            "unshare",
            // (setns is allowed: a session's interpreter enters a branch's
            // namespaces with it; see policy/default.toml.)
            "io_uring_setup",
            "userfaultfd",
            "open_by_handle_at",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "pivot_root",
            "chroot",
        ] {
            assert!(
                p.seccomp.deny.iter().any(|d| d == required),
                "{required} not denied"
            );
        }
        assert!(p.seccomp.rules.deny_clone_namespaces);
    }

    #[test]
    fn unknown_syscall_is_named() {
        let text = DEFAULT_POLICY_TOML.replace("\"mount\",", "\"mount\", \"no_such_call\",");
        match Policy::from_toml(&text) {
            Err(PolicyError::UnknownSyscall(name)) => assert_eq!(name, "no_such_call"),
            other => panic!("expected UnknownSyscall, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_and_bad_paths_are_refused() {
        let extra = format!("{DEFAULT_POLICY_TOML}\n[network]\nallow = true\n");
        assert!(matches!(
            Policy::from_toml(&extra),
            Err(PolicyError::Parse(_))
        ));
        let rel = DEFAULT_POLICY_TOML.replace("\"/usr\",", "\"usr\",");
        assert!(matches!(
            Policy::from_toml(&rel),
            Err(PolicyError::BadPath(_))
        ));
        let dots = DEFAULT_POLICY_TOML.replace("\"/usr\",", "\"/usr/../root\",");
        assert!(matches!(
            Policy::from_toml(&dots),
            Err(PolicyError::BadPath(_))
        ));
        let etc = DEFAULT_POLICY_TOML.replace("\"passwd\",", "\"../root\",");
        assert!(matches!(
            Policy::from_toml(&etc),
            Err(PolicyError::BadEtcEntry(_))
        ));
        let dev = DEFAULT_POLICY_TOML.replace("\"null\",", "\"../sda\",");
        assert!(matches!(
            Policy::from_toml(&dev),
            Err(PolicyError::BadDevice(_))
        ));
    }

    #[test]
    fn landlock_level_key() {
        assert_eq!(Policy::default_policy().landlock, LandlockLevel::BestEffort);
        let required =
            DEFAULT_POLICY_TOML.replace("landlock = \"best_effort\"", "landlock = \"required\"");
        let p = Policy::from_toml(&required).unwrap();
        assert_eq!(p.landlock, LandlockLevel::Required);
        assert_eq!(
            p.landlock.compat_level(),
            landlock::CompatLevel::HardRequirement
        );
        // Absent: best effort (policies written before the key existed).
        let absent = DEFAULT_POLICY_TOML.replace("landlock = \"best_effort\"", "");
        assert_eq!(
            Policy::from_toml(&absent).unwrap().landlock,
            LandlockLevel::BestEffort
        );
        let typo =
            DEFAULT_POLICY_TOML.replace("landlock = \"best_effort\"", "landlock = \"strict\"");
        let e = Policy::from_toml(&typo).unwrap_err().to_string();
        assert!(e.contains("best_effort") && e.contains("required"), "{e}");
    }

    #[test]
    fn seccomp_rule_mistakes_are_named() {
        let both = DEFAULT_POLICY_TOML.replace("\"mount\",", "\"mount\", \"read\",");
        match Policy::from_toml(&both) {
            Err(PolicyError::Seccomp(msg)) => assert!(msg.contains("`read`"), "{msg}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        let family = DEFAULT_POLICY_TOML.replace("\"AF_INET6\"]", "\"AF_INET6\", \"AF_NOPE\"]");
        match Policy::from_toml(&family) {
            Err(PolicyError::Seccomp(msg)) => assert!(msg.contains("AF_NOPE"), "{msg}"),
            other => panic!("expected an unknown family, got {other:?}"),
        }
        let netlink = DEFAULT_POLICY_TOML.replace(
            "netlink_protocols = [\"NETLINK_ROUTE\"]",
            "netlink_protocols = [\"NETLINK_KOBJECT_UEVENT\"]",
        );
        match Policy::from_toml(&netlink) {
            Err(PolicyError::Seccomp(msg)) => assert!(msg.contains("only NETLINK_ROUTE"), "{msg}"),
            other => panic!("expected a refused protocol, got {other:?}"),
        }
        let proc_entry = DEFAULT_POLICY_TOML.replace("\"keys\",", "\"../keys\",");
        assert!(matches!(
            Policy::from_toml(&proc_entry),
            Err(PolicyError::BadProcEntry(_))
        ));
    }
}
