//! The per-child isolation sequence, run in a freshly forked child before any
//! user code. The order matters: each step needs privileges that a later step
//! removes.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use landlock::{Access, AccessFs, BitFlags, ABI};
use seccompiler::BpfProgram;

use crate::kernel::{Kernel, LandlockRule, LinuxKernel};
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
    /// Mount a private devpts instance on /dev/pts in every child.
    pub devpts: bool,
}

/// One tmpfs for /tmp and /dev/shm together (one `scratch_bytes` budget),
/// owned by the sandbox's uid when it has one.
fn mount_scratch<K: Kernel>(k: &K, bytes: u64, uid: Option<u32>) -> Result<(), IsolateError> {
    let owner = uid
        .map(|id| format!(",uid={id},gid={id}"))
        .unwrap_or_default();
    let mode = if uid.is_some() { 0o700 } else { 0o1777 };
    let opts = CString::new(format!("size={bytes},nr_inodes=65536,mode={mode:o}{owner}"))
        .map_err(|_| at("scratch options")(io::ErrorKind::InvalidInput.into()))?;
    k.mount(
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
        k.mkdir_owned(dir, mode, uid)
            .map_err(at("make a scratch directory"))?;
        k.mount(Some(dir), target, None, libc::MS_BIND, None)
            .map_err(at("bind a scratch directory"))?;
    }
    // The home and working directory: /tmp's directory under the name an
    // ordinary user's cwd has (landlock's /tmp rule is on the same inode).
    k.mount(
        Some(c"/dev/.scratch/tmp"),
        c"/home/user",
        None,
        libc::MS_BIND,
        None,
    )
    .map_err(at("bind a scratch directory"))?;
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

impl IsolateError {
    /// The step of the sequence that failed.
    pub fn step(&self) -> &'static str {
        self.step
    }
    /// The kernel's error (errno) or the reason.
    pub fn io_error(&self) -> &io::Error {
        &self.source
    }
}

fn at(step: &'static str) -> impl FnOnce(io::Error) -> IsolateError {
    move |source| IsolateError { step, source }
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
    isolate_with(&LinuxKernel, spec, policy, hostname, last_cap, netns)
}

/// The isolation sequence, performed through `k` (the unit tests below run it
/// against a recording [`Kernel`]). Every kernel error stops it at once and
/// names the step.
pub fn isolate_with<K: Kernel>(
    k: &K,
    spec: &ChildSpec,
    policy: &Prepared,
    hostname: &str,
    last_cap: u32,
    netns: Option<BorrowedFd<'_>>,
) -> Result<(), IsolateError> {
    // Die with the zygote: a sandbox never outlives the process that reports it.
    k.set_parent_death_signal(libc::SIGKILL)
        .map_err(at("set parent-death signal"))?;

    // Join the cgroup while the host's cgroupfs is still visible.
    for procs in &spec.cgroup_procs {
        k.join_cgroup(procs).map_err(at("join cgroup"))?;
    }

    // Workspace mounts are made while the host is still visible (see workspace.rs).
    let workspace = match &spec.workspace {
        Some(plan) => Some(k.prepare_workspace(plan).map_err(at("workspace"))?),
        None => None,
    };

    // The uid the sandbox's files and processes have in its namespaces.
    let mut uid = spec.uid;
    let mut netns = netns;
    match &spec.branch {
        None => {
            k.setns(policy.template.mount_ns.as_fd(), libc::CLONE_NEWNS)
                .map_err(at("enter the sandbox root"))?;
            // A network namespace made ahead of time (lo already up) saves
            // most of the isolation cost; without one the child makes its own.
            let mut fresh =
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP;
            match netns {
                Some(fd) => k
                    .setns(fd, libc::CLONE_NEWNET)
                    .map_err(at("enter the prepared network namespace"))?,
                None => fresh |= libc::CLONE_NEWNET,
            }
            k.unshare(fresh).map_err(at("unshare namespaces"))?;
        }
        Some(branch) => {
            let branch_uid = spec.uid.ok_or_else(|| {
                at("branch")(io::Error::other(
                    "a branch needs its own uid (a root daemon)",
                ))
            })?;
            // Returns in the branch's init: uid 0 of a user namespace that
            // maps it to `branch_uid`, already switched to.
            k.enter_branch(branch, branch_uid, policy.template.mount_ns.as_fd())
                .map_err(at("make the branch's namespaces"))?;
            uid = Some(0);
            netns = None;
        }
    }

    // Private inodes for the bound trees (policy `private_locks`): a lock
    // taken on a file there cannot reach another sandbox or the host.
    // Those under /tmp (a venv there) are covered after being bound again.
    let mut lock_dirs = Vec::new();
    let (shadowed_lock_dirs, lock_dirs_now): (Vec<_>, Vec<_>) = policy
        .template
        .private_lock_dirs
        .iter()
        .partition(|(dir, _)| crate::template::under_per_child_tmpfs(dir));
    for (dir, options) in lock_dirs_now {
        lock_dirs.push(private_overlay(k, dir, options)?);
    }

    // Binds the fresh tmpfs mounts below would hide (a venv under /tmp):
    // keep a handle on each to bind it again on top.
    let shadowed = reopen_shadowed(k, &policy.template.shadowed)?;

    // Its /etc/passwd and /etc/group (the root links them here): the host's
    // with an entry for its own uid, so code that looks the user up works.
    let accounts = match (&policy.template.passwd, &policy.template.group, uid) {
        (Some(passwd), Some(group), Some(id)) => {
            Some(crate::template::account_files(passwd, group, id))
        }
        (Some(passwd), Some(group), None) => Some((passwd.clone(), group.clone())),
        _ => None,
    };
    // The CPU list and the account files below take pages of the scratch
    // tmpfs: add them, so that /tmp and /dev/shm keep exactly
    // `scratch_bytes` (x86-64 pages).
    let pages = |len: usize| u64::try_from(len.div_ceil(4096) * 4096).unwrap_or(u64::MAX);
    let cpu_page = if policy.template.host_cpus.is_some() {
        4096
    } else {
        0
    };
    let account_pages = accounts
        .as_ref()
        .map_or(0, |(p, g)| pages(p.len()).saturating_add(pages(g.len())));
    mount_scratch(
        k,
        spec.scratch_bytes
            .saturating_add(cpu_page)
            .saturating_add(account_pages),
        uid,
    )?;
    if let Some((passwd, group)) = &accounts {
        k.write_file(c"/dev/.scratch/.passwd", passwd)
            .map_err(at("write the sandbox's /etc/passwd"))?;
        k.write_file(c"/dev/.scratch/.group", group)
            .map_err(at("write the sandbox's /etc/group"))?;
    }
    if let Some(host) = policy.template.host_cpus {
        // What /sys/devices/system/cpu/online (a link to it) shows: the CPUs
        // of its cpu limit, so os.cpu_count() and libraries sizing thread
        // pools by it follow the limit. A file write, not a mount.
        let text = crate::template::cpu_online_text(spec.cpus, host);
        k.write_file(c"/dev/.scratch/.cpu-online", text.as_bytes())
            .map_err(at("write the sandbox's CPU list"))?;
    }
    if let (true, Some(n)) = (policy.template.cpu_affinity, spec.cpus) {
        let allowed = k.allowed_cpus().map_err(at("read the CPU affinity"))?;
        if let Some(set) = pinned_cpus(&allowed, n, random_start()) {
            k.pin_cpus(&set)
                .map_err(at("pin the sandbox to its CPUs"))?;
        }
    }
    k.mount(
        Some(c"proc"),
        c"/proc",
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        None,
    )
    .map_err(at("mount /proc"))?;
    for file in &policy.proc_masked {
        match k.mount(Some(c"/dev/null"), file, None, libc::MS_BIND, None) {
            // Not in this kernel: nothing to hide.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => r.map_err(at("mask a /proc file"))?,
        }
    }
    if policy.devpts {
        // Its own instance: no host pty (nor another sandbox's) is in it,
        // and ptmx (the template's /dev/ptmx links here) opens only its own.
        k.mount(
            Some(c"devpts"),
            c"/dev/pts",
            Some(c"devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(c"newinstance,ptmxmode=0666,mode=620"),
        )
        .map_err(at("mount /dev/pts"))?;
    }
    for view in cgroup_views(policy, spec) {
        // Its own cgroup, read-only: the cgroup namespace made above roots
        // the hierarchy there, so no other cgroup (nor a v1 release_agent,
        // which only the hierarchy's root has) is in it.
        let mounted = k.mount(
            Some(&view.fstype),
            &sys::cstring(&view.mount_point).map_err(at("cgroup mount point"))?,
            Some(&view.fstype),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            view.controllers.as_deref(),
        );
        match mounted {
            Ok(()) => {}
            // A hierarchy this kernel will not mount again from here (v1
            // options that differ from the host's mount, a user namespace
            // that may not): its mount point stays an empty directory, as
            // documented, rather than failing every sandbox on that host.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EBUSY | libc::EINVAL | libc::EPERM | libc::ENODEV)
                ) => {}
            Err(e) => return Err(at("mount its cgroup read-only")(e)),
        }
    }
    for (path, fd) in &shadowed {
        rebind(k, path, fd).map_err(at("bind an interpreter path under /tmp"))?;
    }
    drop(shadowed);
    for (dir, options) in shadowed_lock_dirs {
        lock_dirs.push(private_overlay(k, dir, options)?);
    }
    let mut workspace_rules = match workspace {
        Some(ws) => k
            .attach_workspace(ws, LANDLOCK_ABI)
            .map_err(at("workspace"))?,
        None => Vec::new(),
    };
    workspace_rules.append(&mut lock_dirs);
    k.chdir(c"/home/user").map_err(at("chdir to scratch"))?;

    k.sethostname(hostname.as_bytes())
        .map_err(at("set hostname"))?;
    if netns.is_none() {
        k.loopback_up().map_err(at("bring loopback up"))?;
    }

    k.setrlimit(libc::RLIMIT_CORE, 0)
        .map_err(at("RLIMIT_CORE"))?;
    // Budgets the kernel keeps per user (and the sandbox's uid is its own),
    // set here rather than inherited from the daemon.
    k.setrlimit(libc::RLIMIT_MEMLOCK, MEMLOCK_BYTES)
        .map_err(at("RLIMIT_MEMLOCK"))?;
    k.setrlimit(libc::RLIMIT_MSGQUEUE, MSGQUEUE_BYTES)
        .map_err(at("RLIMIT_MSGQUEUE"))?;
    k.setrlimit(libc::RLIMIT_SIGPENDING, SIGPENDING)
        .map_err(at("RLIMIT_SIGPENDING"))?;
    // No real-time scheduling whatever the daemon was started with: the
    // policy allows sched_setscheduler (SCHED_BATCH/IDLE, as for any user).
    k.setrlimit(libc::RLIMIT_RTPRIO, 0)
        .map_err(at("RLIMIT_RTPRIO"))?;
    k.setrlimit(libc::RLIMIT_FSIZE, spec.file_size_bytes)
        .map_err(at("RLIMIT_FSIZE"))?;

    // Capabilities: bounding set (needs CAP_SETPCAP, so first), securebits,
    // ambient, then the process's own sets.
    for cap in 0..=last_cap {
        match k.drop_bounding_cap(cap) {
            Ok(()) => {}
            // A capability number this kernel does not know.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(at("drop bounding capability")(e)),
        }
    }
    k.lock_securebits().map_err(at("lock securebits"))?;
    if let Some(uid) = uid {
        // Own unprivileged ids: per-user kernel budgets are this sandbox's
        // alone and owner checks fail on host objects. (NO_SETUID_FIXUP is
        // locked, so capabilities survive this; they are cleared next.) A
        // branch's init already has its ids, and its user namespace denies
        // setgroups.
        if spec.branch.is_none() {
            k.become_user(uid, uid)
                .map_err(at("switch to the sandbox's uid"))?;
        }
        k.set_dumpable().map_err(at("set dumpable"))?;
        // A credential change clears the parent-death signal: without it
        // again, a sandbox would outlive its zygote (and a killed daemon).
        k.set_parent_death_signal(libc::SIGKILL)
            .map_err(at("set parent-death signal again"))?;
    }
    k.clear_ambient_caps()
        .map_err(at("clear ambient capabilities"))?;
    k.clear_capabilities().map_err(at("drop capabilities"))?;
    k.set_no_new_privs().map_err(at("set no_new_privs"))?;

    if spec.branch.is_some() {
        // A branch's init is landlocked and filtered only once the copy of
        // the parent's interpreter has joined it (`seal_branch`): landlock
        // refuses a landlocked process ptrace-class access (which entering
        // another process's namespaces is) to a process outside its domain.
        // Until then it runs only the executor's code, without capabilities.
        return Ok(());
    }
    apply_landlock(k, policy, &workspace_rules, spec)?;
    drop(workspace_rules); // before close_range below closes their descriptors

    k.close_range(FIRST_CLOSED_FD, u32::MAX)
        .map_err(at("close inherited descriptors"))?;
    // Only now: until the close above, this process holds the zygote's
    // descriptors (a pidfd per running sibling), which can exceed the limit.
    k.setrlimit(libc::RLIMIT_NOFILE, spec.open_files)
        .map_err(at("RLIMIT_NOFILE"))?;
    k.apply_seccomp(&policy.seccomp)
        .map_err(at("install seccomp filter"))?;
    Ok(())
}

/// The rest of a branch init's isolation (see `isolate_with`), once the
/// copy has arrived: landlock, the zygote's descriptors (`inherited`, which
/// the landlock rules still needed) closed, the descriptor limit, seccomp.
pub fn seal_branch<K: Kernel>(
    k: &K,
    spec: &ChildSpec,
    policy: &Prepared,
    inherited: &[std::os::fd::RawFd],
) -> Result<(), IsolateError> {
    apply_landlock(k, policy, &[], spec)?;
    for fd in inherited {
        // SAFETY: descriptors this process held before its executor ran;
        // nothing in it uses them.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(*fd) });
    }
    k.setrlimit(libc::RLIMIT_NOFILE, spec.open_files)
        .map_err(at("RLIMIT_NOFILE"))?;
    k.apply_seccomp(&policy.seccomp)
        .map_err(at("install seccomp filter"))
}

/// The cgroup hierarchies (policy `cgroup_view`) a child shows itself: one
/// per `cgroup.procs` file it joined.
fn cgroup_views<'a>(
    policy: &'a Prepared,
    spec: &'a ChildSpec,
) -> impl Iterator<Item = &'a crate::template::CgroupView> {
    spec.cgroup_procs
        .iter()
        .filter_map(|procs| crate::template::cgroup_view_of(&policy.template.cgroup_views, procs))
}

/// The `n` CPUs (policy `cpu_affinity`) of a child whose cpu limit rounds up
/// to `n`: a run of `allowed` (cyclic) from index `start`, so children spread
/// over the CPUs; `None` when the limit covers them all.
fn pinned_cpus(allowed: &[usize], n: u32, start: usize) -> Option<Vec<usize>> {
    let n = usize::try_from(n).ok()?.max(1);
    (n < allowed.len()).then(|| {
        (0..n)
            .map(|i| allowed[(start + i) % allowed.len()])
            .collect()
    })
}

/// A start index for [`pinned_cpus`]: random, so that children made at the
/// same time land on different CPUs (0 if the kernel has no entropy yet).
fn random_start() -> usize {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if got == 4 {
        u32::from_ne_bytes(b) as usize
    } else {
        0
    }
}

/// Covers a bound tree with the child's own read-only overlay (policy
/// `private_locks`), returning its root for the landlock rule: landlock
/// knows the layers' inodes, not the overlay's.
fn private_overlay<K: Kernel>(
    k: &K,
    dir: &std::ffi::CStr,
    options: &std::ffi::CStr,
) -> Result<(std::os::fd::OwnedFd, BitFlags<AccessFs>), IsolateError> {
    k.mount(
        Some(c"overlay"),
        dir,
        Some(c"overlay"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        Some(options),
    )
    .map_err(at("mount a private overlay on a bound tree"))?;
    let fd = k
        .open(dir, libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(at("open a private overlay"))?;
    Ok((fd, AccessFs::from_read(LANDLOCK_ABI)))
}

fn reopen_shadowed<K: Kernel>(
    k: &K,
    paths: &[std::path::PathBuf],
) -> Result<Vec<(std::path::PathBuf, std::os::fd::OwnedFd)>, IsolateError> {
    paths
        .iter()
        .map(|p| {
            let c = sys::cstring(p).map_err(at("interpreter path"))?;
            let fd = k
                .open(&c, libc::O_PATH, 0)
                .map_err(at("open an interpreter path under /tmp"))?;
            Ok((p.clone(), fd))
        })
        .collect()
}

fn rebind<K: Kernel>(k: &K, path: &std::path::Path, fd: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let is_dir = k.is_dir(fd.as_fd())?;
    k.make_mount_point(path, is_dir)?;
    let src = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // A bind keeps the source mount's flags: read-only, nosuid, nodev.
    k.mount(Some(&src), &sys::cstring(path)?, None, libc::MS_BIND, None)
}

/// Restricts the calling process with the policy's landlock ruleset (and a
/// workspace's grants), at the policy's compatibility level; returns what the
/// kernel enforces.
fn apply_landlock<K: Kernel>(
    k: &K,
    policy: &Prepared,
    workspace: &[(std::os::fd::OwnedFd, BitFlags<AccessFs>)],
    spec: &ChildSpec,
) -> Result<LandlockStatus, IsolateError> {
    let abi = LANDLOCK_ABI;
    let all = AccessFs::from_all(abi);
    let read_dir = AccessFs::from_read(abi);
    let read_file = AccessFs::ReadFile | AccessFs::Execute;
    let rw_file = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let paths = &policy.template.landlock;

    let dir = libc::O_PATH | libc::O_DIRECTORY;
    let scratch = k.open(c"/tmp", dir, 0).map_err(at("open scratch"))?;
    let shm = k.open(c"/dev/shm", dir, 0).map_err(at("open /dev/shm"))?;
    let proc_fd = k.open(c"/proc", dir, 0).map_err(at("open /proc"))?;
    // Listing directories is granted everywhere (`ls /` works as users
    // expect): the root holds only what the template put there, and the
    // workspace hides `none` paths with whiteouts, not with landlock.
    let root = k.open(c"/", dir, 0).map_err(at("open /"))?;
    // Its CPU list (see isolate_with); absent where the probe runs.
    let cpu_online = if policy.template.host_cpus.is_some() {
        match k.open(c"/dev/.scratch/.cpu-online", libc::O_PATH, 0) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(at("open the CPU list")(e)),
        }
    } else {
        None
    };
    // Its account files (see isolate_with); absent where the probe runs.
    let mut accounts = Vec::new();
    if policy.template.passwd.is_some() && policy.template.group.is_some() {
        for file in [c"/dev/.scratch/.passwd", c"/dev/.scratch/.group"] {
            match k.open(file, libc::O_PATH, 0) {
                Ok(fd) => accounts.push(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(at("open the sandbox's account files")(e)),
            }
        }
    }
    // The sandbox's own devpts: ptys are opened, read, written and
    // configured (termios ioctls are device ioctls to landlock). Missing
    // only where the probe runs (the zygote's own root, see probe_landlock).
    let pts = if policy.devpts {
        match k.open(c"/dev/pts", dir, 0) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(at("open /dev/pts")(e)),
        }
    } else {
        None
    };

    // Its cgroup views (see isolate_with): read and listed, never written
    // (the mounts are read-only as well).
    let mut cgroups = Vec::new();
    for view in cgroup_views(policy, spec) {
        let path = sys::cstring(&view.mount_point).map_err(at("cgroup mount point"))?;
        cgroups.push(k.open(&path, dir, 0).map_err(at("open its cgroup view"))?);
    }

    let mut rules: Vec<LandlockRule<'_>> = Vec::new();
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
    if let Some(cpu_online) = &cpu_online {
        rules.push((cpu_online.as_fd(), AccessFs::ReadFile.into()));
    }
    rules.extend(
        accounts
            .iter()
            .map(|fd| (fd.as_fd(), AccessFs::ReadFile.into())),
    );
    rules.extend(
        cgroups
            .iter()
            .map(|fd| (fd.as_fd(), AccessFs::ReadFile | AccessFs::ReadDir)),
    );
    if let Some(pts) = &pts {
        rules.push((
            pts.as_fd(),
            rw_file | AccessFs::ReadDir | AccessFs::IoctlDev,
        ));
    }
    if spec.branchable || spec.branch.is_some() {
        // The scratch grant where a branch's fresh scratch is covered too:
        // landlock walks up through mount points but checks no rule on the
        // directory a mount covers, so only the root is common to a session
        // and its branches. Read-only mounts keep everything else
        // read-only; device ioctls stay refused.
        let mut wide = all & !AccessFs::IoctlDev;
        if spec.workspace.is_some() {
            // As a workspace's own grants: no device nodes (a 0/0 character
            // device is an overlayfs whiteout, which needs no CAP_MKNOD).
            wide &= !(AccessFs::MakeChar | AccessFs::MakeBlock);
        }
        rules.push((root.as_fd(), wide));
    } else {
        rules.push((root.as_fd(), AccessFs::ReadDir.into()));
    }
    rules.extend(workspace.iter().map(|(fd, access)| (fd.as_fd(), *access)));

    // A branch's init runs its executor, which must be able to interrupt and
    // kill an interpreter copied from the parent (another landlock domain).
    let scope_signals = spec.branch.is_none();
    k.restrict_landlock(abi, policy.landlock.compat_level(), &rules, scope_signals)
        .map_err(at("landlock"))
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
            let probe = ChildSpec {
                policy: String::new(),
                cgroup_procs: Vec::new(),
                scratch_bytes: 0,
                open_files: 0,
                file_size_bytes: 0,
                isolate: true,
                workspace: None,
                uid: None,
                cpus: None,
                branchable: false,
                branch: None,
            };
            let code = match apply_landlock(&LinuxKernel, policy, &[], &probe) {
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

/// The sequence's order and error handling, run against a recording kernel:
/// no root needed, and nothing happens to the test process.
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::kernel::recorder::Recorder;
    use crate::template::LandlockPaths;
    use crate::Policy;

    const UID: u32 = 1000;
    const SCRATCH: u64 = 64 << 20;
    const FSIZE: u64 = 1 << 30;
    const NOFILE: u64 = 256;
    /// Capabilities 0 and 1 only, to keep the log short.
    const LAST_CAP: u32 = 1;
    const CGROUP: &str = "/sys/fs/cgroup/forkd/sandbox-1/cgroup.procs";

    fn stand_in() -> std::os::fd::OwnedFd {
        sys::open(c"/dev/null", libc::O_PATH, 0).expect("open /dev/null")
    }

    /// The default policy, made ready as the zygote does, on stand-in
    /// descriptors; one interpreter path (a venv) lies under /tmp.
    fn prepared() -> Prepared {
        let policy = Policy::default_policy();
        Prepared {
            template: Template {
                mount_ns: stand_in(),
                landlock: LandlockPaths {
                    read_exec_dirs: vec![stand_in()],
                    ..LandlockPaths::default()
                },
                bound: Vec::new(),
                shadowed: vec![PathBuf::from("/tmp/venv")],
                private_lock_dirs: Vec::new(),
                host_cpus: Some(4),
                cpu_affinity: false,
                cgroup_views: Vec::new(),
                passwd: None,
                group: None,
            },
            seccomp: policy.compile_seccomp().expect("default policy compiles"),
            devpts: policy.filesystem.devpts,
            landlock: policy.landlock,
            proc_masked: vec![c"/proc/keys".to_owned()],
        }
    }

    fn spec(uid: Option<u32>) -> ChildSpec {
        ChildSpec {
            policy: "default".into(),
            cgroup_procs: vec![CGROUP.into()],
            scratch_bytes: SCRATCH,
            open_files: NOFILE,
            file_size_bytes: FSIZE,
            isolate: true,
            workspace: None,
            uid,
            cpus: Some(2),
            branchable: false,
            branch: None,
        }
    }

    fn run(
        k: &Recorder,
        spec: &ChildSpec,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), IsolateError> {
        isolate_with(k, spec, &prepared(), "sandbox", LAST_CAP, netns)
    }

    /// Every call of a sandbox with its own uid and a fresh network namespace,
    /// in order, with the step an error in it is reported as.
    fn expected(policy: &Prepared) -> Vec<(String, &'static str)> {
        // One page more than the scratch: the CPU list's.
        let scratch_opts = format!(
            "size={},nr_inodes=65536,mode=700,uid={UID},gid={UID}",
            SCRATCH + 4096
        );
        let calls: Vec<(String, &'static str)> = vec![
            ("pdeathsig(9)".into(), "set parent-death signal"),
            (format!("join_cgroup({CGROUP})"), "join cgroup"),
            ("setns(NEWNS)".into(), "enter the sandbox root"),
            (
                "unshare(NEWNS|NEWIPC|NEWUTS|NEWCGROUP|NEWNET)".into(),
                "unshare namespaces",
            ),
            (
                "open(/tmp/venv, O_PATH)".into(),
                "open an interpreter path under /tmp",
            ),
            (
                format!("mount(tmpfs, /dev/.scratch, tmpfs, NOSUID|NODEV, {scratch_opts})"),
                "mount scratch tmpfs",
            ),
            (
                format!("mkdir(/dev/.scratch/tmp, 700, Some({UID}))"),
                "make a scratch directory",
            ),
            (
                "mount(/dev/.scratch/tmp, /tmp, -, BIND, -)".into(),
                "bind a scratch directory",
            ),
            (
                format!("mkdir(/dev/.scratch/shm, 700, Some({UID}))"),
                "make a scratch directory",
            ),
            (
                "mount(/dev/.scratch/shm, /dev/shm, -, BIND, -)".into(),
                "bind a scratch directory",
            ),
            (
                "mount(/dev/.scratch/tmp, /home/user, -, BIND, -)".into(),
                "bind a scratch directory",
            ),
            (
                "write_file(/dev/.scratch/.cpu-online, \"0-1\\n\")".into(),
                "write the sandbox's CPU list",
            ),
            (
                "mount(proc, /proc, proc, RDONLY|NOSUID|NODEV|NOEXEC, -)".into(),
                "mount /proc",
            ),
            (
                "mount(/dev/null, /proc/keys, -, BIND, -)".into(),
                "mask a /proc file",
            ),
            (
                "mount(devpts, /dev/pts, devpts, NOSUID|NOEXEC, newinstance,ptmxmode=0666,mode=620)"
                    .into(),
                "mount /dev/pts",
            ),
            ("is_dir()".into(), "bind an interpreter path under /tmp"),
            (
                "make_mount_point(/tmp/venv, dir=true)".into(),
                "bind an interpreter path under /tmp",
            ),
            (
                "mount(/proc/self/fd/N, /tmp/venv, -, BIND, -)".into(),
                "bind an interpreter path under /tmp",
            ),
            ("chdir(/home/user)".into(), "chdir to scratch"),
            ("sethostname(sandbox)".into(), "set hostname"),
            ("loopback_up()".into(), "bring loopback up"),
            ("setrlimit(CORE, 0)".into(), "RLIMIT_CORE"),
            (
                format!("setrlimit(MEMLOCK, {MEMLOCK_BYTES})"),
                "RLIMIT_MEMLOCK",
            ),
            (
                format!("setrlimit(MSGQUEUE, {MSGQUEUE_BYTES})"),
                "RLIMIT_MSGQUEUE",
            ),
            (
                format!("setrlimit(SIGPENDING, {SIGPENDING})"),
                "RLIMIT_SIGPENDING",
            ),
            ("setrlimit(RTPRIO, 0)".into(), "RLIMIT_RTPRIO"),
            (format!("setrlimit(FSIZE, {FSIZE})"), "RLIMIT_FSIZE"),
            ("drop_bounding_cap(0)".into(), "drop bounding capability"),
            ("drop_bounding_cap(1)".into(), "drop bounding capability"),
            ("lock_securebits()".into(), "lock securebits"),
            (
                format!("become_user({UID}, {UID})"),
                "switch to the sandbox's uid",
            ),
            ("set_dumpable()".into(), "set dumpable"),
            ("pdeathsig(9)".into(), "set parent-death signal again"),
            ("clear_ambient_caps()".into(), "clear ambient capabilities"),
            ("clear_capabilities()".into(), "drop capabilities"),
            ("no_new_privs()".into(), "set no_new_privs"),
            ("open(/tmp, O_PATH|O_DIRECTORY)".into(), "open scratch"),
            ("open(/dev/shm, O_PATH|O_DIRECTORY)".into(), "open /dev/shm"),
            ("open(/proc, O_PATH|O_DIRECTORY)".into(), "open /proc"),
            ("open(/, O_PATH|O_DIRECTORY)".into(), "open /"),
            (
                "open(/dev/.scratch/.cpu-online, O_PATH)".into(),
                "open the CPU list",
            ),
            ("open(/dev/pts, O_PATH|O_DIRECTORY)".into(), "open /dev/pts"),
            // The template's one directory, /tmp, /dev/shm, /proc, the CPU
            // list and /dev/pts.
            (
                "restrict_landlock(V6, BestEffort, 7 rules)".into(),
                "landlock",
            ),
            (
                "close_range(4, 0xffffffff)".into(),
                "close inherited descriptors",
            ),
            (format!("setrlimit(NOFILE, {NOFILE})"), "RLIMIT_NOFILE"),
            (
                format!("seccomp({} instructions)", policy.seccomp.len()),
                "install seccomp filter",
            ),
        ];
        calls
    }

    /// Position of the first call rendered as `prefix...`.
    fn first(log: &[String], prefix: &str) -> usize {
        log.iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no call `{prefix}...` in {log:#?}"))
    }

    /// Position of the last call rendered as `prefix...`.
    fn last(log: &[String], prefix: &str) -> usize {
        log.iter()
            .rposition(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no call `{prefix}...` in {log:#?}"))
    }

    #[track_caller]
    fn before(log: &[String], earlier: &str, later: &str, why: &str) {
        assert!(
            last(log, earlier) < first(log, later),
            "`{earlier}` must come before `{later}` ({why}); calls: {log:#?}"
        );
    }

    #[test]
    fn pinned_cpus_are_a_run_of_the_allowed_ones_and_only_below_them_all() {
        let allowed = [0, 2, 5, 7];
        assert_eq!(pinned_cpus(&allowed, 1, 6), Some(vec![5]));
        assert_eq!(pinned_cpus(&allowed, 2, 3), Some(vec![7, 0]));
        assert_eq!(pinned_cpus(&allowed, 3, 0), Some(vec![0, 2, 5]));
        assert_eq!(pinned_cpus(&allowed, 0, 1), Some(vec![2]));
        assert_eq!(pinned_cpus(&allowed, 4, 0), None);
        assert_eq!(pinned_cpus(&allowed, 9, 0), None);
    }

    #[test]
    fn the_sequence_makes_exactly_these_calls_in_this_order() {
        let k = Recorder::new();
        run(&k, &spec(Some(UID)), None).expect("nothing fails");
        let want: Vec<String> = expected(&prepared()).into_iter().map(|(c, _)| c).collect();
        assert_eq!(k.rendered(), want);
    }

    /// Each ordering the sequence depends on, with the reason: these say which
    /// constraint a reordering breaks.
    #[test]
    fn each_step_runs_after_what_it_needs() {
        let k = Recorder::new();
        run(&k, &spec(Some(UID)), None).expect("nothing fails");
        let log = k.rendered();
        let b = |earlier, later, why| before(&log, earlier, later, why);
        b(
            "join_cgroup",
            "setns(NEWNS)",
            "the host's cgroupfs is visible only before",
        );
        b(
            "join_cgroup",
            "unshare",
            "a cgroup namespace is rooted at the cgroup joined before it",
        );
        b(
            "setns(NEWNS)",
            "unshare",
            "the fresh mount namespace copies the sandbox's root",
        );
        b(
            "unshare",
            "mount",
            "mounts must land in the child's own mount namespace",
        );
        b(
            "unshare",
            "sethostname",
            "the hostname is the child's own UTS namespace's",
        );
        b(
            "unshare",
            "loopback_up",
            "the loopback is the child's own network namespace's",
        );
        b(
            "open(/tmp/venv",
            "mount(tmpfs",
            "the scratch tmpfs hides the interpreter path",
        );
        b(
            "mount(tmpfs",
            "chdir(/home/user)",
            "the working directory is the child's scratch",
        );
        b(
            "setrlimit(FSIZE",
            "clear_capabilities",
            "setting limits may need CAP_SYS_RESOURCE",
        );
        b(
            "drop_bounding_cap",
            "clear_capabilities",
            "dropping the bounding set needs CAP_SETPCAP",
        );
        b(
            "lock_securebits",
            "become_user",
            "NO_SETUID_FIXUP keeps capabilities across the uid change",
        );
        b(
            "become_user",
            "clear_capabilities",
            "changing ids needs CAP_SETUID and CAP_SETGID",
        );
        assert_eq!(
            first(&log, "pdeathsig"),
            0,
            "die with the zygote from the start"
        );
        assert!(
            last(&log, "pdeathsig") > first(&log, "become_user"),
            "a credential change clears the parent-death signal: it is set again after; {log:#?}"
        );
        b(
            "clear_ambient_caps",
            "clear_capabilities",
            "the ambient set is cleared with the others",
        );
        b(
            "no_new_privs",
            "restrict_landlock",
            "landlock without CAP_SYS_ADMIN needs no_new_privs",
        );
        b(
            "no_new_privs",
            "seccomp",
            "a filter without CAP_SYS_ADMIN needs no_new_privs",
        );
        b(
            "open(/proc, ",
            "close_range",
            "landlock's descriptors are opened before the close",
        );
        b(
            "restrict_landlock",
            "seccomp",
            "the filter may deny the landlock calls",
        );
        b(
            "close_range",
            "seccomp",
            "the zygote's descriptors are closed before user code",
        );
        b(
            "close_range",
            "setrlimit(NOFILE",
            "the inherited descriptors may exceed the limit",
        );
        assert_eq!(
            last(&log, "seccomp"),
            log.len() - 1,
            "seccomp is the last call: {log:#?}"
        );
    }

    #[test]
    fn a_prepared_network_namespace_is_entered_not_made() {
        // And the interpreter path under /tmp is a file, not a directory.
        let k = Recorder::new().dirs(false);
        let netns = stand_in();
        run(&k, &spec(None), Some(netns.as_fd())).expect("nothing fails");
        let log = k.rendered();
        before(
            &log,
            "setns(NEWNS)",
            "setns(NEWNET)",
            "the sandbox root first",
        );
        before(
            &log,
            "setns(NEWNET)",
            "unshare",
            "the rest is unshared after",
        );
        assert!(
            log.contains(&"unshare(NEWNS|NEWIPC|NEWUTS|NEWCGROUP)".to_owned()),
            "{log:#?}"
        );
        assert!(
            !log.iter().any(|c| c.starts_with("loopback_up")),
            "lo is already up: {log:#?}"
        );
        // Without a uid of its own the sandbox neither switches ids nor
        // needs the parent-death signal again.
        assert!(!log
            .iter()
            .any(|c| c.starts_with("become_user") || c.starts_with("set_dumpable")));
        assert_eq!(log.iter().filter(|c| c.starts_with("pdeathsig")).count(), 1);
        assert!(log.contains(&"make_mount_point(/tmp/venv, dir=false)".to_owned()));
    }

    #[test]
    fn a_workspace_is_cloned_on_the_host_and_mounted_inside() {
        let k = Recorder::new();
        let mut spec = spec(Some(UID));
        spec.workspace = Some(forkd_workspace::MountPlan {
            host_root: PathBuf::from("/srv/project"),
            root_dev: 0,
            root_ino: 0,
            mount_point: forkd_workspace::DEFAULT_MOUNT_POINT.into(),
            kind: forkd_workspace::Kind::Direct,
            upper: None,
            root_mode: forkd_workspace::Mode::Write,
            hidden: Vec::new(),
            binds: Vec::new(),
            grants: Vec::new(),
            visited: 0,
            owner: None,
            idmap_to: None,
        });
        run(&k, &spec, None).expect("nothing fails");
        let log = k.rendered();
        before(
            &log,
            "join_cgroup",
            "prepare_workspace(/srv/project)",
            "as in the plain sequence",
        );
        before(
            &log,
            "prepare_workspace",
            "setns(NEWNS)",
            "the host is visible only before",
        );
        before(
            &log,
            "mount(proc",
            "attach_workspace",
            "it mounts into the child's namespace",
        );
        before(
            &log,
            "attach_workspace",
            "restrict_landlock",
            "its rules join the ruleset",
        );
        before(
            &log,
            "attach_workspace",
            "close_range",
            "its rules hold descriptors",
        );
    }

    /// A failure at any call stops the sequence at that call (nothing after it
    /// runs) and the error names the step and carries the errno.
    #[test]
    fn a_failure_at_any_step_stops_the_sequence_there() {
        let policy = prepared();
        let steps = expected(&policy);
        for (index, (call, step)) in steps.iter().enumerate() {
            // A different errno per step, so a stale one cannot pass.
            let errno = [libc::EPERM, libc::EACCES, libc::EBUSY, libc::ENOMEM][index % 4];
            let k = Recorder::fail_at(index, errno);
            let err = run(&k, &spec(Some(UID)), None)
                .expect_err(&format!("a failing `{call}` must fail the sequence"));
            let ran = k.rendered();
            assert_eq!(
                ran.last(),
                Some(call),
                "the failing call is the last one made"
            );
            assert_eq!(
                ran.len(),
                index + 1,
                "nothing runs after a failed `{call}`: {ran:#?}"
            );
            assert_eq!(err.step(), *step, "step named for a failed `{call}`");
            assert_eq!(
                err.io_error().raw_os_error(),
                Some(errno),
                "errno of a failed `{call}`"
            );
            let message = err.to_string();
            let strerror = io::Error::from_raw_os_error(errno).to_string();
            assert!(
                message.starts_with(step) && message.contains(&strerror),
                "the message names the step and the errno: {message}"
            );
        }
    }

    /// Policy `cgroup_view`: the hierarchy of a joined cgroup is mounted
    /// read-only after /dev/pts and granted read and list; a kernel that
    /// refuses that mount (EBUSY, EPERM, ...) leaves it out, any other
    /// errno is an error.
    #[test]
    fn a_joined_cgroup_is_mounted_read_only_or_left_out_when_refused() {
        let mut with_view = prepared();
        with_view.template.cgroup_views = crate::template::cgroup_views(
            "40 25 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        let run =
            |k: &Recorder| isolate_with(k, &spec(Some(UID)), &with_view, "sandbox", LAST_CAP, None);
        const MOUNT: &str =
            "mount(cgroup2, /sys/fs/cgroup, cgroup2, RDONLY|NOSUID|NODEV|NOEXEC, -)";
        let k = Recorder::default();
        run(&k).expect("isolates");
        let ran = k.rendered();
        let at = |call: &str| ran.iter().position(|c| c == call);
        let mounted = at(MOUNT).unwrap_or_else(|| panic!("no cgroup mount: {ran:#?}"));
        assert!(at("mount(devpts, /dev/pts, devpts, NOSUID|NOEXEC, newinstance,ptmxmode=0666,mode=620)") < Some(mounted));
        let opened = at("open(/sys/fs/cgroup, O_PATH|O_DIRECTORY)")
            .unwrap_or_else(|| panic!("the view is not granted: {ran:#?}"));
        assert!(mounted < opened);

        for errno in [libc::EBUSY, libc::EPERM] {
            let k = Recorder::fail_first("mount(cgroup2", errno);
            run(&k).expect("a refused cgroup view is left out");
        }
        let k = Recorder::fail_first("mount(cgroup2", libc::EIO);
        let err = run(&k).expect_err("EIO mounting the view is an error");
        assert_eq!(
            (err.step(), err.io_error().raw_os_error()),
            ("mount its cgroup read-only", Some(libc::EIO))
        );
    }

    /// The two errors the sequence tolerates, and only with their errno.
    #[test]
    fn only_an_absent_proc_file_and_an_unknown_capability_are_tolerated() {
        // A /proc file this kernel lacks has nothing to hide.
        let k = Recorder::fail_first("mount(/dev/null, /proc/keys", libc::ENOENT);
        run(&k, &spec(None), None).expect("ENOENT masking /proc/keys is tolerated");
        assert!(k
            .rendered()
            .last()
            .is_some_and(|c| c.starts_with("seccomp")));
        // A capability number this kernel does not know.
        let k = Recorder::fail_every("drop_bounding_cap", libc::EINVAL);
        run(&k, &spec(None), None).expect("EINVAL dropping a capability is tolerated");
        assert!(k
            .rendered()
            .last()
            .is_some_and(|c| c.starts_with("seccomp")));
        // Any other errno there is an error.
        let k = Recorder::fail_first("mount(/dev/null, /proc/keys", libc::EPERM);
        let err = run(&k, &spec(None), None).expect_err("EPERM masking /proc is an error");
        assert_eq!(
            (err.step(), err.io_error().raw_os_error()),
            ("mask a /proc file", Some(libc::EPERM))
        );
        let k = Recorder::fail_every("drop_bounding_cap", libc::EPERM);
        let err = run(&k, &spec(None), None).expect_err("EPERM dropping a capability is an error");
        assert_eq!(
            (err.step(), err.io_error().raw_os_error()),
            ("drop bounding capability", Some(libc::EPERM))
        );
    }
}
