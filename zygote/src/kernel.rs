//! The seam between the isolation sequence ([`crate::isolate`]) and the kernel.
//!
//! [`Kernel`] names every kernel operation the per-child sequence performs, in
//! the terms the sequence uses. [`LinuxKernel`] performs them (each method is
//! one of the [`crate::sys`] wrappers); the sequence is generic over the trait,
//! so production code is monomorphised to exactly the direct calls it made
//! before (no `dyn`, no allocation, no state: `LinuxKernel` is zero-sized).
//!
//! The point is testing without root (youki's `Syscall` trait, with static
//! dispatch and one ordered log): a recording implementation (`Recorder`,
//! test-only) logs each call with its arguments and can fail a chosen one with
//! a chosen errno, so the order of the steps and their error handling are unit
//! tests that run as any user and cannot disturb the test process.
//!
//! What stays outside: the landlock rule list and the seccomp BPF program are
//! data built before the calls that apply them.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use seccompiler::BpfProgram;

use crate::spec::LandlockStatus;
use crate::sys;

/// A landlock rule: a path (an `O_PATH` descriptor) and the rights beneath it.
pub type LandlockRule<'fd> = (BorrowedFd<'fd>, BitFlags<AccessFs>);

/// The kernel operations of the isolation sequence. Errors are the kernel's
/// (errno); the sequence names the step that failed.
pub trait Kernel {
    /// A workspace's detached mounts between [`Self::prepare_workspace`] (in
    /// the host's mount namespace) and [`Self::attach_workspace`] (in the
    /// sandbox's).
    type Workspace<'p>;

    /// `prctl(PR_SET_PDEATHSIG)`.
    fn set_parent_death_signal(&self, sig: libc::c_int) -> io::Result<()>;
    /// Moves the process into a cgroup (writes "0" into its `cgroup.procs`).
    fn join_cgroup(&self, procs: &str) -> io::Result<()>;
    /// Workspace host half: clones the host directories (see workspace.rs).
    fn prepare_workspace<'p>(
        &self,
        plan: &'p forkd_workspace::MountPlan,
    ) -> io::Result<Self::Workspace<'p>>;
    /// Workspace sandbox half: mounts it and returns its landlock rules.
    fn attach_workspace(
        &self,
        workspace: Self::Workspace<'_>,
        abi: ABI,
    ) -> io::Result<Vec<(OwnedFd, BitFlags<AccessFs>)>>;
    fn setns(&self, fd: BorrowedFd<'_>, nstype: libc::c_int) -> io::Result<()>;
    fn unshare(&self, flags: libc::c_int) -> io::Result<()>;
    /// Makes a session branch's namespaces and forks its init; returns in
    /// that init only (see branch.rs).
    fn enter_branch(
        &self,
        branch: &crate::spec::BranchOf,
        branch_uid: u32,
        template: BorrowedFd<'_>,
    ) -> io::Result<()>;
    /// `open(2)`, always close-on-exec.
    fn open(&self, path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd>;
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()>;
    /// mkdir, chmod to `mode` and, with an owner, chown.
    fn mkdir_owned(&self, path: &CStr, mode: libc::mode_t, owner: Option<u32>) -> io::Result<()>;
    /// Creates (or replaces) a file holding `data`.
    fn write_file(&self, path: &CStr, data: &[u8]) -> io::Result<()>;
    /// The CPUs this process may run on (`sched_getaffinity`).
    fn allowed_cpus(&self) -> io::Result<Vec<usize>>;
    /// Restricts this process to `cpus` (`sched_setaffinity`).
    fn pin_cpus(&self, cpus: &[usize]) -> io::Result<()>;
    /// Whether an open descriptor refers to a directory.
    fn is_dir(&self, fd: BorrowedFd<'_>) -> io::Result<bool>;
    /// Creates `path` (and its parents) as an empty directory or file, to bind on.
    fn make_mount_point(&self, path: &Path, dir: bool) -> io::Result<()>;
    fn chdir(&self, path: &CStr) -> io::Result<()>;
    fn sethostname(&self, name: &[u8]) -> io::Result<()>;
    /// Brings `lo` up in the current network namespace.
    fn loopback_up(&self) -> io::Result<()>;
    /// Sets both the soft and the hard limit.
    fn setrlimit(&self, resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()>;
    /// `prctl(PR_CAPBSET_DROP)`.
    fn drop_bounding_cap(&self, cap: u32) -> io::Result<()>;
    /// `prctl(PR_SET_SECUREBITS)` with every "root is not special" bit locked.
    fn lock_securebits(&self) -> io::Result<()>;
    /// setgroups(0), setresgid, setresuid.
    fn become_user(&self, uid: u32, gid: u32) -> io::Result<()>;
    /// `prctl(PR_SET_DUMPABLE, 1)`.
    fn set_dumpable(&self) -> io::Result<()>;
    /// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`.
    fn clear_ambient_caps(&self) -> io::Result<()>;
    /// `capset` with empty effective, permitted and inheritable sets.
    fn clear_capabilities(&self) -> io::Result<()>;
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    fn set_no_new_privs(&self) -> io::Result<()>;
    /// Creates a landlock ruleset handling every right of `abi`, adds `rules`
    /// and restricts the calling process, at compatibility `level`; returns
    /// what the kernel enforces. Every scope of `abi` is set, signals only if
    /// `scope_signals`.
    fn restrict_landlock(
        &self,
        abi: ABI,
        level: CompatLevel,
        rules: &[LandlockRule<'_>],
        scope_signals: bool,
    ) -> io::Result<LandlockStatus>;
    /// Closes every descriptor in `first..=last`.
    fn close_range(&self, first: u32, last: u32) -> io::Result<()>;
    /// Installs a seccomp filter on the calling thread.
    fn apply_seccomp(&self, program: &BpfProgram) -> io::Result<()>;
}

fn fail<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// The running kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxKernel;

impl Kernel for LinuxKernel {
    type Workspace<'p> = crate::workspace::Prepared<'p>;

    #[inline]
    fn set_parent_death_signal(&self, sig: libc::c_int) -> io::Result<()> {
        sys::set_parent_death_signal(sig)
    }
    #[inline]
    fn join_cgroup(&self, procs: &str) -> io::Result<()> {
        std::fs::write(procs, b"0")
    }
    #[inline]
    fn prepare_workspace<'p>(
        &self,
        plan: &'p forkd_workspace::MountPlan,
    ) -> io::Result<Self::Workspace<'p>> {
        crate::workspace::prepare(plan).map_err(|e| io::Error::other(e.to_string()))
    }
    #[inline]
    fn attach_workspace(
        &self,
        workspace: Self::Workspace<'_>,
        abi: ABI,
    ) -> io::Result<Vec<(OwnedFd, BitFlags<AccessFs>)>> {
        workspace
            .attach(abi, sys::landlock_abi())
            .map_err(|e| io::Error::other(e.to_string()))
    }
    #[inline]
    fn setns(&self, fd: BorrowedFd<'_>, nstype: libc::c_int) -> io::Result<()> {
        sys::setns(fd, nstype)
    }
    #[inline]
    fn unshare(&self, flags: libc::c_int) -> io::Result<()> {
        sys::unshare(flags)
    }
    fn enter_branch(
        &self,
        branch: &crate::spec::BranchOf,
        branch_uid: u32,
        template: BorrowedFd<'_>,
    ) -> io::Result<()> {
        crate::branch::make_shell(branch, branch_uid, template)
    }
    #[inline]
    fn open(&self, path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
        sys::open(path, flags, mode)
    }
    #[inline]
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()> {
        sys::mount(source, target, fstype, flags, data)
    }
    #[inline]
    fn mkdir_owned(&self, path: &CStr, mode: libc::mode_t, owner: Option<u32>) -> io::Result<()> {
        sys::mkdir_owned(path, mode, owner)
    }
    #[inline]
    fn write_file(&self, path: &CStr, data: &[u8]) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        std::fs::write(std::ffi::OsStr::from_bytes(path.to_bytes()), data)
    }
    fn allowed_cpus(&self) -> io::Result<Vec<usize>> {
        // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live cpu_set_t of the size passed.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: CPU_ISSET reads the set within its size (CPU_SETSIZE).
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect())
    }
    fn pin_cpus(&self, cpus: &[usize]) -> io::Result<()> {
        // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus {
            // SAFETY: CPU_SET ignores (does not write) CPUs past CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        // SAFETY: `set` is a live cpu_set_t of the size passed.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[inline]
    fn is_dir(&self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        Ok(std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.is_dir())
    }
    #[inline]
    fn make_mount_point(&self, path: &Path, dir: bool) -> io::Result<()> {
        if dir {
            std::fs::create_dir_all(path)
        } else {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(path).map(drop)
        }
    }
    #[inline]
    fn chdir(&self, path: &CStr) -> io::Result<()> {
        sys::chdir(path)
    }
    #[inline]
    fn sethostname(&self, name: &[u8]) -> io::Result<()> {
        sys::sethostname(name)
    }
    #[inline]
    fn loopback_up(&self) -> io::Result<()> {
        sys::loopback_up()
    }
    #[inline]
    fn setrlimit(&self, resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
        sys::setrlimit(resource, value)
    }
    #[inline]
    fn drop_bounding_cap(&self, cap: u32) -> io::Result<()> {
        sys::drop_bounding_cap(cap)
    }
    #[inline]
    fn lock_securebits(&self) -> io::Result<()> {
        sys::lock_securebits()
    }
    #[inline]
    fn become_user(&self, uid: u32, gid: u32) -> io::Result<()> {
        sys::become_user(uid, gid)
    }
    #[inline]
    fn set_dumpable(&self) -> io::Result<()> {
        sys::set_dumpable()
    }
    #[inline]
    fn clear_ambient_caps(&self) -> io::Result<()> {
        sys::clear_ambient_caps()
    }
    #[inline]
    fn clear_capabilities(&self) -> io::Result<()> {
        sys::clear_capabilities()
    }
    #[inline]
    fn set_no_new_privs(&self) -> io::Result<()> {
        sys::set_no_new_privs()
    }
    fn restrict_landlock(
        &self,
        abi: ABI,
        level: CompatLevel,
        rules: &[LandlockRule<'_>],
        scope_signals: bool,
    ) -> io::Result<LandlockStatus> {
        let mut scopes = Scope::from_all(abi);
        if !scope_signals {
            scopes.remove(Scope::Signal);
        }
        let mut ruleset = Ruleset::default()
            .set_compatibility(level)
            .handle_access(AccessFs::from_all(abi))
            .map_err(fail("handle access rights"))?
            .scope(scopes)
            .map_err(fail("scope"))?
            .create()
            .map_err(fail("create the ruleset"))?;
        for (fd, access) in rules {
            ruleset = ruleset
                .add_rule(PathBeneath::new(*fd, *access))
                .map_err(fail("add a rule"))?;
        }
        // Best effort without landlock: NotEnforced, and the mount namespace
        // alone confines the filesystem. The zygote measures this status once
        // at init (probe_landlock) and the daemon reports it, keeping this
        // path quiet.
        let status = ruleset.restrict_self().map_err(fail("restrict_self"))?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced,
            RulesetStatus::PartiallyEnforced => LandlockStatus::PartiallyEnforced,
            RulesetStatus::NotEnforced => LandlockStatus::NotEnforced,
        })
    }
    #[inline]
    fn close_range(&self, first: u32, last: u32) -> io::Result<()> {
        sys::close_range(first, last)
    }
    #[inline]
    fn apply_seccomp(&self, program: &BpfProgram) -> io::Result<()> {
        sys::apply_seccomp(program)
    }
}

#[cfg(test)]
pub(crate) mod recorder {
    //! A [`Kernel`] that performs nothing: it logs each call with its
    //! arguments, in order, and fails the call the test chose. Descriptors it
    //! hands out are `/dev/null` opened `O_PATH` (harmless stand-ins the
    //! sequence only passes back to it).

    use std::cell::{Cell, RefCell};
    use std::ffi::CStr;
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};
    use std::path::Path;

    use landlock::{AccessFs, BitFlags, CompatLevel, ABI};
    use seccompiler::BpfProgram;

    use super::{Kernel, LandlockRule};
    use crate::spec::LandlockStatus;

    /// One logged call: the operation and its arguments, rendered.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Call {
        pub op: &'static str,
        pub args: String,
    }

    impl std::fmt::Display for Call {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}({})", self.op, self.args)
        }
    }

    /// Which call fails, and how.
    #[derive(Debug, Clone, Copy)]
    enum Failure {
        /// The call at this position of the log (0-based).
        At(usize, i32),
        /// The first call whose rendering (`op(args)`) starts with this prefix.
        First(&'static str, i32),
        /// Every call whose rendering starts with this prefix.
        Every(&'static str, i32),
    }

    #[derive(Default)]
    pub struct Recorder {
        log: RefCell<Vec<Call>>,
        failure: Cell<Option<Failure>>,
        /// What `is_dir` answers.
        dirs: bool,
    }

    impl Recorder {
        /// Records, fails nothing; every descriptor is a directory.
        pub fn new() -> Self {
            Self {
                dirs: true,
                ..Self::default()
            }
        }
        /// Makes `is_dir` answer `dirs`.
        pub fn dirs(mut self, dirs: bool) -> Self {
            self.dirs = dirs;
            self
        }
        /// Fails the `index`-th call (0-based, counting every call) with `errno`.
        pub fn fail_at(index: usize, errno: i32) -> Self {
            let r = Self::new();
            r.failure.set(Some(Failure::At(index, errno)));
            r
        }
        /// Fails the first call rendered as `prefix...` with `errno`.
        pub fn fail_first(prefix: &'static str, errno: i32) -> Self {
            let r = Self::new();
            r.failure.set(Some(Failure::First(prefix, errno)));
            r
        }
        /// Fails every call rendered as `prefix...` with `errno`.
        pub fn fail_every(prefix: &'static str, errno: i32) -> Self {
            let r = Self::new();
            r.failure.set(Some(Failure::Every(prefix, errno)));
            r
        }
        /// Renderings of the calls, `op(args)`.
        pub fn rendered(&self) -> Vec<String> {
            self.log.borrow().iter().map(Call::to_string).collect()
        }

        fn record(&self, op: &'static str, args: String) -> io::Result<()> {
            let call = Call { op, args };
            let rendered = call.to_string();
            let mut log = self.log.borrow_mut();
            let index = log.len();
            log.push(call);
            let errno = match self.failure.get() {
                Some(Failure::At(at, errno)) if at == index => Some(errno),
                Some(Failure::First(prefix, errno)) if rendered.starts_with(prefix) => {
                    self.failure.set(None);
                    Some(errno)
                }
                Some(Failure::Every(prefix, errno)) if rendered.starts_with(prefix) => Some(errno),
                _ => None,
            };
            errno.map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
        }
    }

    fn s(c: &CStr) -> String {
        c.to_string_lossy().into_owned()
    }

    fn opt(c: Option<&CStr>) -> String {
        c.map_or_else(|| "-".to_owned(), s)
    }

    fn stand_in() -> io::Result<OwnedFd> {
        crate::sys::open(c"/dev/null", libc::O_PATH, 0)
    }

    impl Kernel for Recorder {
        type Workspace<'p> = ();

        fn set_parent_death_signal(&self, sig: libc::c_int) -> io::Result<()> {
            self.record("pdeathsig", sig.to_string())
        }
        fn join_cgroup(&self, procs: &str) -> io::Result<()> {
            self.record("join_cgroup", procs.to_owned())
        }
        fn prepare_workspace<'p>(
            &self,
            plan: &'p forkd_workspace::MountPlan,
        ) -> io::Result<Self::Workspace<'p>> {
            self.record("prepare_workspace", plan.host_root.display().to_string())
        }
        fn attach_workspace(
            &self,
            (): Self::Workspace<'_>,
            abi: ABI,
        ) -> io::Result<Vec<(OwnedFd, BitFlags<AccessFs>)>> {
            self.record("attach_workspace", format!("{abi:?}"))?;
            Ok(Vec::new())
        }
        fn setns(&self, _fd: BorrowedFd<'_>, nstype: libc::c_int) -> io::Result<()> {
            self.record("setns", ns_name(nstype))
        }
        fn unshare(&self, flags: libc::c_int) -> io::Result<()> {
            self.record("unshare", ns_name(flags))
        }
        fn enter_branch(
            &self,
            branch: &crate::spec::BranchOf,
            branch_uid: u32,
            _template: BorrowedFd<'_>,
        ) -> io::Result<()> {
            self.record(
                "enter_branch",
                format!(
                    "parent {} uid {}, branch uid {branch_uid}",
                    branch.parent_pid, branch.parent_uid
                ),
            )
        }
        fn open(
            &self,
            path: &CStr,
            flags: libc::c_int,
            _mode: libc::mode_t,
        ) -> io::Result<OwnedFd> {
            let kind = if flags & libc::O_DIRECTORY != 0 {
                "O_PATH|O_DIRECTORY"
            } else {
                "O_PATH"
            };
            self.record("open", format!("{}, {kind}", s(path)))?;
            stand_in()
        }
        fn mount(
            &self,
            source: Option<&CStr>,
            target: &CStr,
            fstype: Option<&CStr>,
            flags: libc::c_ulong,
            data: Option<&CStr>,
        ) -> io::Result<()> {
            // A descriptor's number varies from run to run.
            let source = opt(source);
            let source = match source.strip_prefix("/proc/self/fd/") {
                Some(_) => "/proc/self/fd/N".to_owned(),
                None => source,
            };
            self.record(
                "mount",
                format!(
                    "{source}, {}, {}, {}, {}",
                    s(target),
                    opt(fstype),
                    mount_flags(flags),
                    opt(data)
                ),
            )
        }
        fn mkdir_owned(
            &self,
            path: &CStr,
            mode: libc::mode_t,
            owner: Option<u32>,
        ) -> io::Result<()> {
            self.record("mkdir", format!("{}, {mode:o}, {owner:?}", s(path)))
        }
        fn write_file(&self, path: &CStr, data: &[u8]) -> io::Result<()> {
            let data = String::from_utf8_lossy(data);
            self.record("write_file", format!("{}, {data:?}", s(path)))
        }
        fn allowed_cpus(&self) -> io::Result<Vec<usize>> {
            self.record("allowed_cpus", String::new())?;
            Ok(vec![0, 1, 2, 3])
        }
        fn pin_cpus(&self, cpus: &[usize]) -> io::Result<()> {
            self.record("pin_cpus", format!("{cpus:?}"))
        }
        fn is_dir(&self, _fd: BorrowedFd<'_>) -> io::Result<bool> {
            self.record("is_dir", String::new())?;
            Ok(self.dirs)
        }
        fn make_mount_point(&self, path: &Path, dir: bool) -> io::Result<()> {
            self.record("make_mount_point", format!("{}, dir={dir}", path.display()))
        }
        fn chdir(&self, path: &CStr) -> io::Result<()> {
            self.record("chdir", s(path))
        }
        fn sethostname(&self, name: &[u8]) -> io::Result<()> {
            self.record("sethostname", String::from_utf8_lossy(name).into_owned())
        }
        fn loopback_up(&self) -> io::Result<()> {
            self.record("loopback_up", String::new())
        }
        fn setrlimit(&self, resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
            let name = match resource {
                libc::RLIMIT_CORE => "CORE",
                libc::RLIMIT_MEMLOCK => "MEMLOCK",
                libc::RLIMIT_MSGQUEUE => "MSGQUEUE",
                libc::RLIMIT_SIGPENDING => "SIGPENDING",
                libc::RLIMIT_RTPRIO => "RTPRIO",
                libc::RLIMIT_FSIZE => "FSIZE",
                libc::RLIMIT_NOFILE => "NOFILE",
                _ => "?",
            };
            self.record("setrlimit", format!("{name}, {value}"))
        }
        fn drop_bounding_cap(&self, cap: u32) -> io::Result<()> {
            self.record("drop_bounding_cap", cap.to_string())
        }
        fn lock_securebits(&self) -> io::Result<()> {
            self.record("lock_securebits", String::new())
        }
        fn become_user(&self, uid: u32, gid: u32) -> io::Result<()> {
            self.record("become_user", format!("{uid}, {gid}"))
        }
        fn set_dumpable(&self) -> io::Result<()> {
            self.record("set_dumpable", String::new())
        }
        fn clear_ambient_caps(&self) -> io::Result<()> {
            self.record("clear_ambient_caps", String::new())
        }
        fn clear_capabilities(&self) -> io::Result<()> {
            self.record("clear_capabilities", String::new())
        }
        fn set_no_new_privs(&self) -> io::Result<()> {
            self.record("no_new_privs", String::new())
        }
        fn restrict_landlock(
            &self,
            abi: ABI,
            level: CompatLevel,
            rules: &[LandlockRule<'_>],
            scope_signals: bool,
        ) -> io::Result<LandlockStatus> {
            let scope = if scope_signals {
                ""
            } else {
                ", signals unscoped"
            };
            self.record(
                "restrict_landlock",
                format!("{abi:?}, {level:?}, {} rules{scope}", rules.len()),
            )?;
            Ok(LandlockStatus::FullyEnforced)
        }
        fn close_range(&self, first: u32, last: u32) -> io::Result<()> {
            self.record("close_range", format!("{first}, {last:#x}"))
        }
        fn apply_seccomp(&self, program: &BpfProgram) -> io::Result<()> {
            self.record("seccomp", format!("{} instructions", program.len()))
        }
    }

    /// `NOSUID|NODEV|...` for a set of `MS_*` flags.
    fn mount_flags(flags: libc::c_ulong) -> String {
        let names = [
            (libc::MS_RDONLY, "RDONLY"),
            (libc::MS_NOSUID, "NOSUID"),
            (libc::MS_NODEV, "NODEV"),
            (libc::MS_NOEXEC, "NOEXEC"),
            (libc::MS_BIND, "BIND"),
            (libc::MS_REC, "REC"),
        ];
        let known = names.iter().fold(0, |acc, (bit, _)| acc | bit);
        let mut parts: Vec<String> = names
            .iter()
            .filter(|(bit, _)| flags & bit != 0)
            .map(|(_, name)| (*name).to_owned())
            .collect();
        if flags & !known != 0 {
            parts.push(format!("{:#x}", flags & !known));
        }
        parts.join("|")
    }

    /// `NEWNS|NEWIPC|...` for a set of `CLONE_NEW*` flags.
    fn ns_name(flags: libc::c_int) -> String {
        [
            (libc::CLONE_NEWNS, "NEWNS"),
            (libc::CLONE_NEWIPC, "NEWIPC"),
            (libc::CLONE_NEWUTS, "NEWUTS"),
            (libc::CLONE_NEWCGROUP, "NEWCGROUP"),
            (libc::CLONE_NEWNET, "NEWNET"),
            (libc::CLONE_NEWPID, "NEWPID"),
            (libc::CLONE_NEWUSER, "NEWUSER"),
        ]
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join("|")
    }
}
