//! The per-child isolation sequence, run in a freshly forked child before any
//! user code. The order matters: each step needs privileges that a later step
//! removes.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use landlock::{
    Access, AccessFs, BitFlags, Compatible, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};
use seccompiler::BpfProgram;

use crate::policy::LandlockLevel;
use crate::spec::{ChildSpec, LandlockStatus};
use crate::sys;
use crate::template::Template;

/// Landlock ABI whose rights we request; newer kernels are used at this level,
/// older ones degrade as the policy's `landlock` key says ([`LandlockLevel`]).
pub const LANDLOCK_ABI: ABI = ABI::V6;

/// First descriptor closed before user code: 0-2 are stdio, 3 the status pipe
/// the Python side closes once the program starts.
pub const FIRST_CLOSED_FD: u32 = 4;

/// RLIMIT_MEMLOCK of a sandbox (the kernel's default since 5.16).
pub const MEMLOCK_BYTES: u64 = 8 << 20;
/// RLIMIT_MSGQUEUE of a sandbox (the kernel's default).
pub const MSGQUEUE_BYTES: u64 = 819_200;
/// RLIMIT_SIGPENDING of a sandbox.
pub const SIGPENDING: u64 = 1024;

/// A policy made ready in the zygote.
pub struct Prepared {
    pub template: Template,
    pub seccomp: BpfProgram,
    pub landlock: LandlockLevel,
    /// /proc files covered with /dev/null in every child (absolute, as C strings).
    pub proc_masked: Vec<CString>,
}

/// One tmpfs for /tmp and /dev/shm together (one `scratch_bytes` budget),
/// owned by the sandbox's uid when it has one.
fn mount_scratch(spec: &ChildSpec) -> Result<(), IsolateError> {
    let owner = spec
        .uid
        .map(|id| format!(",uid={id},gid={id}"))
        .unwrap_or_default();
    let mode = if spec.uid.is_some() { 0o700 } else { 0o1777 };
    let opts = CString::new(format!(
        "size={},nr_inodes=65536,mode={mode:o}{owner}",
        spec.scratch_bytes
    ))
    .map_err(|_| at("scratch options")(io::ErrorKind::InvalidInput.into()))?;
    sys::mount(
        Some(c"tmpfs"),
        c"/dev/.scratch",
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&opts),
    )
    .map_err(at("mount scratch tmpfs"))?;
    for (dir, target) in [
        (c"/dev/.scratch/tmp", c"/tmp"),
        (c"/dev/.scratch/shm", c"/dev/shm"),
    ] {
        sys::mkdir_owned(dir, mode, spec.uid).map_err(at("make a scratch directory"))?;
        sys::mount(Some(dir), target, None, libc::MS_BIND, None)
            .map_err(at("bind a scratch directory"))?;
    }
    // The stage stays mounted: an unmount waits for an expedited RCU grace
    // period, which serialises concurrent spawns (seconds under a burst).
    // /dev/.scratch/{tmp,shm} are the same directories as /tmp and /dev/shm
    // and landlock grants nothing else in it.
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct IsolateError {
    step: &'static str,
    #[source]
    source: io::Error,
}

fn at(step: &'static str) -> impl FnOnce(io::Error) -> IsolateError {
    move |source| IsolateError { step, source }
}

fn landlock_err<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> IsolateError {
    move |e| IsolateError {
        step,
        source: io::Error::other(e.to_string()),
    }
}

/// Isolates the calling process (a just-forked child, pid 1 of a new pid
/// namespace). On success the process can no longer change its namespaces,
/// mounts, privileges or filters.
pub fn isolate_child(
    spec: &ChildSpec,
    policy: &Prepared,
    hostname: &str,
    last_cap: u32,
    netns: Option<BorrowedFd<'_>>,
) -> Result<(), IsolateError> {
    // Die with the zygote: a sandbox never outlives the process that reports it.
    sys::set_parent_death_signal(libc::SIGKILL).map_err(at("set parent-death signal"))?;

    // Join the cgroup while the host's cgroupfs is still visible.
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, b"0").map_err(at("join cgroup"))?;
    }

    // Workspace mounts are made while the host is still visible (see workspace.rs).
    let workspace = match &spec.workspace {
        Some(plan) => Some(crate::workspace::prepare(plan).map_err(workspace_err)?),
        None => None,
    };

    sys::setns(policy.template.mount_ns.as_fd(), libc::CLONE_NEWNS)
        .map_err(at("enter the sandbox root"))?;
    // A network namespace made ahead of time (lo already up) saves most of
    // the isolation cost; without one the child makes its own.
    let mut fresh =
        libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP;
    match netns {
        Some(fd) => sys::setns(fd, libc::CLONE_NEWNET)
            .map_err(at("enter the prepared network namespace"))?,
        None => fresh |= libc::CLONE_NEWNET,
    }
    sys::unshare(fresh).map_err(at("unshare namespaces"))?;

    // Binds the fresh tmpfs mounts below would hide (a venv under /tmp):
    // keep a handle on each to bind it again on top.
    let shadowed = reopen_shadowed(&policy.template.shadowed)?;

    mount_scratch(spec)?;
    sys::mount(
        Some(c"proc"),
        c"/proc",
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        None,
    )
    .map_err(at("mount /proc"))?;
    for file in &policy.proc_masked {
        match sys::mount(Some(c"/dev/null"), file, None, libc::MS_BIND, None) {
            // Not in this kernel: nothing to hide.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => r.map_err(at("mask a /proc file"))?,
        }
    }
    for (path, fd) in &shadowed {
        rebind(path, fd).map_err(at("bind an interpreter path under /tmp"))?;
    }
    drop(shadowed);
    let workspace_rules = match workspace {
        Some(ws) => ws
            .attach(LANDLOCK_ABI, sys::landlock_abi())
            .map_err(workspace_err)?,
        None => Vec::new(),
    };
    sys::chdir(c"/tmp").map_err(at("chdir to scratch"))?;

    sys::sethostname(hostname.as_bytes()).map_err(at("set hostname"))?;
    if netns.is_none() {
        sys::loopback_up().map_err(at("bring loopback up"))?;
    }

    sys::setrlimit(libc::RLIMIT_CORE, 0).map_err(at("RLIMIT_CORE"))?;
    // Budgets the kernel keeps per user (and the sandbox's uid is its own),
    // set here rather than inherited from the daemon.
    sys::setrlimit(libc::RLIMIT_MEMLOCK, MEMLOCK_BYTES).map_err(at("RLIMIT_MEMLOCK"))?;
    sys::setrlimit(libc::RLIMIT_MSGQUEUE, MSGQUEUE_BYTES).map_err(at("RLIMIT_MSGQUEUE"))?;
    sys::setrlimit(libc::RLIMIT_SIGPENDING, SIGPENDING).map_err(at("RLIMIT_SIGPENDING"))?;
    sys::setrlimit(libc::RLIMIT_FSIZE, spec.file_size_bytes).map_err(at("RLIMIT_FSIZE"))?;

    // Capabilities: bounding set (needs CAP_SETPCAP, so first), securebits,
    // ambient, then the process's own sets.
    for cap in 0..=last_cap {
        match sys::drop_bounding_cap(cap) {
            Ok(()) => {}
            // A capability number this kernel does not know.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(at("drop bounding capability")(e)),
        }
    }
    sys::lock_securebits().map_err(at("lock securebits"))?;
    if let Some(uid) = spec.uid {
        // Own unprivileged ids: per-user kernel budgets are this sandbox's
        // alone and owner checks fail on host objects. (NO_SETUID_FIXUP is
        // locked, so capabilities survive this; they are cleared next.)
        sys::become_user(uid, uid).map_err(at("switch to the sandbox's uid"))?;
        sys::set_dumpable().map_err(at("set dumpable"))?;
        // A credential change clears the parent-death signal: without it
        // again, a sandbox would outlive its zygote (and a killed daemon).
        sys::set_parent_death_signal(libc::SIGKILL).map_err(at("set parent-death signal again"))?;
    }
    sys::clear_ambient_caps().map_err(at("clear ambient capabilities"))?;
    sys::clear_capabilities().map_err(at("drop capabilities"))?;
    sys::set_no_new_privs().map_err(at("set no_new_privs"))?;

    apply_landlock(policy, &workspace_rules)?;
    drop(workspace_rules); // before close_range below closes their descriptors

    sys::close_range(FIRST_CLOSED_FD, u32::MAX).map_err(at("close inherited descriptors"))?;
    // Only now: until the close above, this process holds the zygote's
    // descriptors (a pidfd per running sibling), which can exceed the limit.
    sys::setrlimit(libc::RLIMIT_NOFILE, spec.open_files).map_err(at("RLIMIT_NOFILE"))?;
    seccompiler::apply_filter(&policy.seccomp)
        .map_err(|e| at("install seccomp filter")(io::Error::other(e.to_string())))?;
    Ok(())
}

fn reopen_shadowed(
    paths: &[std::path::PathBuf],
) -> Result<Vec<(std::path::PathBuf, std::os::fd::OwnedFd)>, IsolateError> {
    paths
        .iter()
        .map(|p| {
            let c = sys::cstring(p).map_err(at("interpreter path"))?;
            let fd = sys::open(&c, libc::O_PATH, 0)
                .map_err(at("open an interpreter path under /tmp"))?;
            Ok((p.clone(), fd))
        })
        .collect()
}

fn rebind(path: &std::path::Path, fd: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let is_dir = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.is_dir();
    if is_dir {
        std::fs::create_dir_all(path)?;
    } else {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::File::create(path)?;
    }
    let src = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // A bind keeps the source mount's flags: read-only, nosuid, nodev.
    sys::mount(Some(&src), &sys::cstring(path)?, None, libc::MS_BIND, None)
}

fn workspace_err(e: crate::workspace::WorkspaceError) -> IsolateError {
    IsolateError {
        step: "workspace",
        source: io::Error::other(e.to_string()),
    }
}

/// Restricts the calling process with the policy's landlock ruleset (and a
/// workspace's grants), at the policy's compatibility level; returns what the
/// kernel enforces.
fn apply_landlock(
    policy: &Prepared,
    workspace: &[(std::os::fd::OwnedFd, BitFlags<AccessFs>)],
) -> Result<LandlockStatus, IsolateError> {
    let abi = LANDLOCK_ABI;
    let all = AccessFs::from_all(abi);
    let read_dir = AccessFs::from_read(abi);
    let read_file = AccessFs::ReadFile | AccessFs::Execute;
    let rw_file = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let paths = &policy.template.landlock;

    let scratch =
        sys::open(c"/tmp", libc::O_PATH | libc::O_DIRECTORY, 0).map_err(at("open scratch"))?;
    let shm =
        sys::open(c"/dev/shm", libc::O_PATH | libc::O_DIRECTORY, 0).map_err(at("open /dev/shm"))?;
    let proc_fd =
        sys::open(c"/proc", libc::O_PATH | libc::O_DIRECTORY, 0).map_err(at("open /proc"))?;

    let mut rules: Vec<(BorrowedFd<'_>, BitFlags<AccessFs>)> = Vec::new();
    rules.extend(paths.read_exec_dirs.iter().map(|fd| (fd.as_fd(), read_dir)));
    rules.extend(
        paths
            .read_exec_files
            .iter()
            .map(|fd| (fd.as_fd(), read_file)),
    );
    rules.extend(paths.rw_devices.iter().map(|fd| (fd.as_fd(), rw_file)));
    rules.extend(
        paths
            .ro_devices
            .iter()
            .map(|fd| (fd.as_fd(), AccessFs::ReadFile.into())),
    );
    rules.push((scratch.as_fd(), all));
    rules.push((shm.as_fd(), all));
    rules.push((proc_fd.as_fd(), AccessFs::ReadFile | AccessFs::ReadDir));
    rules.extend(workspace.iter().map(|(fd, access)| (fd.as_fd(), *access)));

    let mut ruleset = Ruleset::default()
        .set_compatibility(policy.landlock.compat_level())
        .handle_access(all)
        .map_err(landlock_err("landlock ruleset"))?
        .scope(Scope::from_all(abi))
        .map_err(landlock_err("landlock scope"))?
        .create()
        .map_err(landlock_err("landlock create"))?;
    for (fd, access) in rules {
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(landlock_err("landlock rule"))?;
    }
    // Best effort without landlock: NotEnforced, and the mount namespace alone
    // confines the filesystem. The zygote measures this status once at init
    // (probe_landlock) and the daemon reports it, keeping this path quiet.
    let status = ruleset
        .restrict_self()
        .map_err(landlock_err("landlock restrict_self"))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced,
        RulesetStatus::PartiallyEnforced => LandlockStatus::PartiallyEnforced,
        RulesetStatus::NotEnforced => LandlockStatus::NotEnforced,
    })
}

/// Measures what the kernel enforces of `policy`'s landlock ruleset: a
/// throwaway child applies it exactly as a sandbox does and exits with the
/// status. Run once per policy at zygote init, while single-threaded. A
/// `required` policy on a kernel lacking part of the ruleset fails here, with
/// the reason, instead of at every spawn.
pub fn probe_landlock(policy: &Prepared) -> Result<LandlockStatus, String> {
    const FAILED: libc::c_int = 100;
    // SAFETY: called from forkd_init, which has checked that the process is
    // single-threaded; the child only builds the ruleset and _exits.
    let pid = match unsafe { sys::fork() }.map_err(|e| format!("fork landlock probe: {e}"))? {
        sys::Fork::Child => {
            let code = match apply_landlock(policy, &[]) {
                Ok(LandlockStatus::FullyEnforced) => 0,
                Ok(LandlockStatus::PartiallyEnforced) => 1,
                Ok(LandlockStatus::NotEnforced) => 2,
                Err(e) => {
                    // stderr is the zygote's, which the daemon logs.
                    eprintln!("forkd landlock probe: {e}");
                    FAILED
                }
            };
            sys::exit_now(code)
        }
        sys::Fork::Parent(pid) => pid,
    };
    let status = sys::waitpid(pid).map_err(|e| format!("wait for landlock probe: {e}"))?;
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => Ok(LandlockStatus::FullyEnforced),
        Some(1) => Ok(LandlockStatus::PartiallyEnforced),
        Some(2) => Ok(LandlockStatus::NotEnforced),
        _ if policy.landlock == LandlockLevel::Required
            && ABI::from(sys::landlock_abi()) < LANDLOCK_ABI =>
        {
            Err(format!(
            "the policy sets landlock = \"required\" but this kernel cannot enforce its whole landlock ruleset (ABI {LANDLOCK_ABI:?} rights and scopes; kernel offers ABI {}): run Linux 6.12+ with landlock in the lsm= boot parameter, or set landlock = \"best_effort\"",
            sys::landlock_abi()
        ))
        }
        _ => Err(format!(
            "applying the landlock ruleset failed in a probe child (wait status {status:#x}); the zygote's stderr says why"
        )),
    }
}
