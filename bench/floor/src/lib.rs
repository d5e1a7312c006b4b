//! forkd-bench's **independent floor**: the native half of a minimal fork
//! server written for the benchmark (`floor_server.py` is the other half).
//! It shares no code with forkd's daemon, pool, zygote or ipc crates, and
//! applies the same isolation steps forkd applies to every child:
//!
//! new pid (unshared before the fork), mount, net, ipc, uts and cgroup
//! namespaces; a cgroup per child with memory (+swap), cpu and pids limits
//! in the v1 memory, cpu, cpuacct and pids hierarchies (or cgroup2); a
//! read-only minimal root (a template mount namespace, copied per child)
//! with a fresh tmpfs at /tmp and /dev/shm and a read-only /proc; hostname;
//! `lo` up; rlimits (core, fsize, nofile); every capability dropped
//! (bounding, ambient, effective, permitted, inheritable) with securebits
//! locked; no_new_privs; landlock (same grants, ABI 6 scopes); a seccomp
//! allow-list with the same calls and argument rules (compiled here, in
//! `policy.rs`); parent-death signal; inherited
//! descriptors closed.
//!
//! The Python server loads this library with ctypes, calls [`floor_init`]
//! once (single-threaded, before importing numpy), and in each forked child
//! [`floor_child_isolate`] before reading its job.

pub mod cgroup;
pub mod policy;
pub mod root;
pub mod sys;

use std::ffi::{c_char, c_int};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope, ABI,
};
use seccompiler::BpfProgram;

/// The Python half, run by forkd-bench as `python -c SERVER_SCRIPT`.
pub const SERVER_SCRIPT: &str = include_str!("../floor_server.py");

/// Per-child scratch size and rlimits: forkd's defaults.
pub const SCRATCH_BYTES: u64 = 64 << 20;
pub const OPEN_FILES: u64 = 256;
pub const FILE_SIZE_BYTES: u64 = 64 << 20;
pub const HOSTNAME: &str = "sandbox";
/// Descriptors 0-3 (stdin = job, stdout, stderr, status) stay open.
pub const FIRST_CLOSED_FD: u32 = 4;

struct State {
    root: root::Root,
    seccomp: BpfProgram,
    cgroups: cgroup::Cgroups,
    own_pid_ns: OwnedFd,
    last_cap: u32,
}

static STATE: OnceLock<State> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("floor_init was not called (or failed)")]
    NotInitialised,
    #[error("floor_init was called twice")]
    InitTwice,
    #[error(transparent)]
    Root(#[from] root::RootError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Seccomp(#[from] policy::SeccompError),
    #[error("{0}: {1}")]
    Step(&'static str, io::Error),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("install the seccomp filter: {0}")]
    SeccompInstall(String),
}

fn at(what: &'static str) -> impl FnOnce(io::Error) -> FloorError {
    move |e| FloorError::Step(what, e)
}

/// Writes `msg` NUL-terminated into the caller's buffer and returns -1.
///
/// # Safety
/// `err` must be valid for writes of `cap` bytes (or null).
unsafe fn fail(msg: &str, err: *mut c_char, cap: usize) -> c_int {
    if !err.is_null() && cap > 0 {
        let n = msg.len().min(cap - 1);
        // SAFETY: the caller's buffer holds `cap` bytes and n < cap.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
            *err.add(n) = 0;
        }
    }
    -1
}

fn init(interpreter_paths: &str) -> Result<(), FloorError> {
    if STATE.get().is_some() {
        return Err(FloorError::InitTwice);
    }
    let paths: Vec<PathBuf> = interpreter_paths
        .split('\n')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    let root = root::build(&paths)?;
    let seccomp = policy::seccomp()?;
    let cgroups = cgroup::Cgroups::setup()?;
    let own_pid_ns =
        sys::open(c"/proc/self/ns/pid", libc::O_RDONLY).map_err(at("open own pid namespace"))?;
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    STATE
        .set(State {
            root,
            seccomp,
            cgroups,
            own_pid_ns,
            last_cap,
        })
        .map_err(|_| FloorError::InitTwice)
}

/// Builds the sandbox root, compiles the filter and creates the cgroup
/// directories. `paths`: the interpreter's prefixes and sys.path entries,
/// newline-separated. Returns 0, or -1 with a message in `err`.
///
/// # Safety
/// `paths` must be valid for reads of `len` bytes; `err` for writes of
/// `cap` bytes. The calling process must be single-threaded.
#[no_mangle]
pub unsafe extern "C" fn floor_init(
    paths: *const u8,
    len: usize,
    err: *mut c_char,
    cap: usize,
) -> c_int {
    let bytes = if len == 0 {
        &[][..]
    } else {
        // SAFETY: forwarded caller contract.
        unsafe { std::slice::from_raw_parts(paths, len) }
    };
    match init(&String::from_utf8_lossy(bytes)) {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(e) => unsafe { fail(&e.to_string(), err, cap) },
    }
}

/// What was set up, as `key=value` lines: seccomp instructions, cgroup mode,
/// the file where the children's CPU time adds up, bound paths. Returns the
/// length written (or -1 if not initialised or the buffer is too small).
///
/// # Safety
/// `buf` must be valid for writes of `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn floor_info(buf: *mut u8, cap: usize) -> i64 {
    let Some(s) = STATE.get() else { return -1 };
    let mut text = format!(
        "seccomp_instructions={}\ncgroup_mode={:?}\ncpu_usage_file={}\nlandlock_abi={}\n",
        s.seccomp.len(),
        s.cgroups.mode,
        s.cgroups
            .cpu_usage_file()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        landlock_abi(),
    );
    for b in &s.root.bound {
        text.push_str(&format!("bound={}\n", b.display()));
    }
    if text.len() > cap {
        return -1;
    }
    // SAFETY: the caller's buffer holds `cap` >= text.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf, text.len()) };
    text.len() as i64
}

fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only reports the ABI.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    }
}

/// Makes the next fork's child pid 1 of a new pid namespace. Returns 0 or an
/// errno.
#[no_mangle]
pub extern "C" fn floor_pidns_new() -> c_int {
    match sys::unshare(libc::CLONE_NEWPID) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Back to the server's own pid namespace for later children. 0 or errno.
#[no_mangle]
pub extern "C" fn floor_pidns_restore() -> c_int {
    let Some(s) = STATE.get() else {
        return libc::EINVAL;
    };
    match sys::setns(s.own_pid_ns.as_fd(), libc::CLONE_NEWPID) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Removes child `id`'s cgroup (after its reap). 0, or -1 with a message.
///
/// # Safety
/// `err` must be valid for writes of `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn floor_cgroup_remove(id: u64, err: *mut c_char, cap: usize) -> c_int {
    let Some(s) = STATE.get() else {
        // SAFETY: forwarded caller contract.
        return unsafe { fail(&FloorError::NotInitialised.to_string(), err, cap) };
    };
    match s.cgroups.remove(id) {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(e) => unsafe { fail(&e.to_string(), err, cap) },
    }
}

/// Removes the server's cgroup directories (at exit, children reaped).
#[no_mangle]
pub extern "C" fn floor_teardown() -> c_int {
    match STATE.get().map(|s| s.cgroups.teardown()) {
        Some(Ok(())) => 0,
        _ => -1,
    }
}

/// Isolates the calling process: a just-forked child, pid 1 of its pid
/// namespace, with its pipes on fds 0-3. 0, or -1 with a message in `err`.
///
/// # Safety
/// `err` must be valid for writes of `cap` bytes. Call only in a forked,
/// single-threaded child.
#[no_mangle]
pub unsafe extern "C" fn floor_child_isolate(id: u64, err: *mut c_char, cap: usize) -> c_int {
    let outcome = STATE
        .get()
        .ok_or(FloorError::NotInitialised)
        .and_then(|s| isolate(s, id));
    match outcome {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(e) => unsafe { fail(&e.to_string(), err, cap) },
    }
}

fn isolate(s: &State, id: u64) -> Result<(), FloorError> {
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
        .map_err(at("parent-death signal"))?;
    // While the host's cgroupfs is still visible.
    s.cgroups.create_and_join(id)?;
    sys::setns(s.root.mount_ns.as_fd(), libc::CLONE_NEWNS).map_err(at("enter the sandbox root"))?;
    sys::unshare(
        libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWCGROUP,
    )
    .map_err(at("unshare namespaces"))?;
    // Binds the tmpfs below will cover: a handle on each, to bind it again on top.
    let shadowed = s
        .root
        .shadowed
        .iter()
        .map(|p| {
            let c = sys::cstring(p).map_err(at("interpreter path"))?;
            let fd =
                sys::open(&c, libc::O_PATH).map_err(at("open an interpreter path under /tmp"))?;
            Ok((p, c, fd))
        })
        .collect::<Result<Vec<_>, FloorError>>()?;
    let scratch = std::ffi::CString::new(format!("size={SCRATCH_BYTES},nr_inodes=65536,mode=0777"))
        .expect("no NUL");
    let tmpfs = Some(c"tmpfs");
    sys::mount(
        tmpfs,
        c"/tmp",
        tmpfs,
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&scratch),
    )
    .map_err(at("mount /tmp"))?;
    sys::mount(
        tmpfs,
        c"/dev/shm",
        tmpfs,
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&scratch),
    )
    .map_err(at("mount /dev/shm"))?;
    sys::mount(
        Some(c"proc"),
        c"/proc",
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        None,
    )
    .map_err(at("mount /proc"))?;
    for (path, c, fd) in &shadowed {
        let dir = std::fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(fd)
        ))
        .map_err(at("stat an interpreter path under /tmp"))?
        .is_dir();
        if dir {
            std::fs::create_dir_all(path)
        } else {
            path.parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::File::create(path).map(drop))
        }
        .map_err(at("recreate an interpreter path under /tmp"))?;
        let src = std::ffi::CString::new(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(fd)
        ))
        .map_err(|_| at("descriptor path")(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // A bind keeps the source mount's flags: read-only, nosuid, nodev.
        sys::mount(Some(&src), c, None, libc::MS_BIND, None)
            .map_err(at("bind an interpreter path under /tmp"))?;
    }
    drop(shadowed);
    sys::chdir(c"/tmp").map_err(at("chdir /tmp"))?;
    sys::sethostname(HOSTNAME.as_bytes()).map_err(at("sethostname"))?;
    sys::loopback_up().map_err(at("bring lo up"))?;
    sys::setrlimit(libc::RLIMIT_CORE, 0).map_err(at("RLIMIT_CORE"))?;
    sys::setrlimit(libc::RLIMIT_FSIZE, FILE_SIZE_BYTES).map_err(at("RLIMIT_FSIZE"))?;
    for cap in 0..=s.last_cap {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) {
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
                return Err(at("drop a bounding capability")(e))
            }
            _ => {}
        }
    }
    // NOROOT, NO_SETUID_FIXUP, KEEP_CAPS (locked), NO_CAP_AMBIENT_RAISE, and
    // their locks.
    sys::prctl(libc::PR_SET_SECUREBITS, 0b1110_1111).map_err(at("securebits"))?;
    // SAFETY: integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(at("clear ambient capabilities")(io::Error::last_os_error()));
    }
    sys::clear_capabilities().map_err(at("drop capabilities"))?;
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(at("no_new_privs"))?;
    landlock(&s.root.grants)?;
    sys::close_from(FIRST_CLOSED_FD).map_err(at("close inherited descriptors"))?;
    sys::setrlimit(libc::RLIMIT_NOFILE, OPEN_FILES).map_err(at("RLIMIT_NOFILE"))?;
    seccompiler::apply_filter(&s.seccomp).map_err(|e| FloorError::SeccompInstall(e.to_string()))
}

fn landlock(g: &root::Grants) -> Result<(), FloorError> {
    let abi = ABI::V6;
    let ll = |e: &dyn std::fmt::Display| FloorError::Landlock(e.to_string());
    let all = AccessFs::from_all(abi);
    let read_dir = AccessFs::from_read(abi);
    let read_file = AccessFs::ReadFile | AccessFs::Execute;
    let rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let tmp = sys::open(c"/tmp", libc::O_PATH | libc::O_DIRECTORY).map_err(at("open /tmp"))?;
    let shm =
        sys::open(c"/dev/shm", libc::O_PATH | libc::O_DIRECTORY).map_err(at("open /dev/shm"))?;
    let proc_ = sys::open(c"/proc", libc::O_PATH | libc::O_DIRECTORY).map_err(at("open /proc"))?;
    let mut rules: Vec<(BorrowedFd<'_>, BitFlags<AccessFs>)> = Vec::new();
    rules.extend(g.dirs.iter().map(|f| (f.as_fd(), read_dir)));
    rules.extend(g.files.iter().map(|f| (f.as_fd(), read_file)));
    rules.extend(g.rw_devices.iter().map(|f| (f.as_fd(), rw)));
    rules.extend(
        g.ro_devices
            .iter()
            .map(|f| (f.as_fd(), AccessFs::ReadFile.into())),
    );
    rules.push((tmp.as_fd(), all));
    rules.push((shm.as_fd(), all));
    rules.push((proc_.as_fd(), AccessFs::ReadFile | AccessFs::ReadDir));
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .map_err(|e| ll(&e))?
        .scope(Scope::from_all(abi))
        .map_err(|e| ll(&e))?
        .create()
        .map_err(|e| ll(&e))?;
    for (fd, access) in rules {
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| ll(&e))?;
    }
    ruleset.restrict_self().map_err(|e| ll(&e))?;
    Ok(())
}
