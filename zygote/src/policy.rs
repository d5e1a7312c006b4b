//! Isolation policy: data shipped in `policy/*.toml`, compiled once per zygote.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram};
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompPolicy {
    /// System calls that fail with EPERM.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Deny clone() with namespace flags and make clone3() fail with ENOSYS.
    #[serde(default = "yes")]
    pub deny_clone_namespaces: bool,
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
        // Compiling checks every syscall name.
        self.compile_seccomp().map(|_| ())
    }

    /// Compiles the seccomp part to a BPF program for the running architecture.
    ///
    /// Layout: a short hand-written prefix (x32 system calls and clone3 → ENOSYS),
    /// then seccompiler's filter (architecture check, then the deny list with
    /// EPERM). The prefix's jumps are local, so appending seccompiler's program
    /// unchanged keeps its own relative jumps valid.
    pub fn compile_seccomp(&self) -> Result<BpfProgram, PolicyError> {
        const CLONE_NS_FLAGS: [u64; 7] = [
            libc::CLONE_NEWNS as u64,
            libc::CLONE_NEWUTS as u64,
            libc::CLONE_NEWIPC as u64,
            libc::CLONE_NEWUSER as u64,
            libc::CLONE_NEWPID as u64,
            libc::CLONE_NEWNET as u64,
            libc::CLONE_NEWCGROUP as u64,
        ];
        let mut filter = Vec::new();
        for name in &self.seccomp.deny {
            filter.push(serde_json::json!({ "syscall": name }));
        }
        if self.seccomp.deny_clone_namespaces {
            for flag in CLONE_NS_FLAGS {
                filter.push(serde_json::json!({
                    "syscall": "clone",
                    "args": [{ "index": 0, "type": "qword", "op": { "masked_eq": flag }, "val": flag }],
                }));
            }
        }
        let json = serde_json::json!({
            "forkd": {
                "mismatch_action": "allow",
                "match_action": { "errno": libc::EPERM },
                "filter": filter,
            }
        });
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e| PolicyError::Seccomp(format!("unsupported architecture: {e:?}")))?;
        let mut map = seccompiler::compile_from_json(json.to_string().as_bytes(), arch).map_err(
            |e| match &e {
                seccompiler::Error::JsonFrontend(inner) => {
                    let msg = inner.to_string();
                    match self.seccomp.deny.iter().find(|n| msg.contains(n.as_str())) {
                        Some(name) => PolicyError::UnknownSyscall(name.clone()),
                        None => PolicyError::Seccomp(msg),
                    }
                }
                _ => PolicyError::Seccomp(e.to_string()),
            },
        )?;
        let body = map
            .remove("forkd")
            .ok_or_else(|| PolicyError::Seccomp("compiled filter missing".into()))?;
        let mut program = if self.seccomp.deny_clone_namespaces {
            prefix_enosys_clone3()
        } else {
            prefix_x32_only()
        };
        program.extend(body);
        Ok(program)
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
#[allow(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes are 16-bit by definition"
)]
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Bit that marks x32 system calls on x86_64: a deny list keyed on x86_64
/// numbers would not see them, so they are refused outright.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret_errno(errno: i32) -> sock_filter {
    insn(
        BPF_RET_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
    )
}

fn prefix_x32_only() -> BpfProgram {
    vec![
        insn(BPF_LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        insn(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        ret_errno(libc::ENOSYS),
    ]
}

fn prefix_enosys_clone3() -> BpfProgram {
    let mut p = prefix_x32_only();
    #[allow(
        clippy::cast_possible_truncation,
        reason = "syscall numbers are 32-bit in seccomp_data"
    )]
    p.push(insn(BPF_JEQ_K, 0, 1, libc::SYS_clone3 as u32));
    p.push(ret_errno(libc::ENOSYS));
    p
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
            "setns",
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
        assert!(p.seccomp.deny_clone_namespaces);
    }

    #[test]
    fn default_filter_stays_small() {
        // Install cost grows with length (600 instructions cost 0.3 ms here).
        // seccompiler emits ~5 instructions per denied call: 345 today.
        let prog = Policy::default_policy().compile_seccomp().unwrap();
        assert!(prog.len() < 400, "filter has {} instructions", prog.len());
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
    fn prefix_jumps_land_on_the_returns() {
        let p = prefix_enosys_clone3();
        // JGE x32: true → next (ret ENOSYS), false → skip it.
        assert_eq!((p[1].jt, p[1].jf), (0, 1));
        assert_eq!(p[2].k, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        assert_eq!(p[3].k, libc::SYS_clone3 as u32);
        assert_eq!(p[4].k, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    }
}
