//! The C ABI the Python zygote calls through ctypes.
//!
//! Every function returns 0 on success or -1 with a message copied into the
//! caller's buffer (NUL-terminated, truncated to fit). Pointers come from
//! ctypes buffers owned by the caller for the duration of the call.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use crate::isolate::{isolate_child, Prepared};
use crate::policy::PolicyError;
use crate::spec::{ChildSpec, InitConfig, InitInfo};
use crate::{sys, template};

struct State {
    policies: BTreeMap<String, Prepared>,
    hostname: String,
    own_pid_ns: OwnedFd,
    last_cap: u32,
    info: InitInfo,
}

static STATE: OnceLock<State> = OnceLock::new();

/// In a branch's init between its isolation and its seal: its spec and the
/// descriptors it inherited from the zygote (see `isolate::seal_branch`).
static UNSEALED: OnceLock<(ChildSpec, Vec<std::os::fd::RawFd>)> = OnceLock::new();

/// # Safety
/// `ptr` must be valid for reads of `len` bytes (or `len` must be 0).
unsafe fn input<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// Copies `msg` into the caller's buffer and returns -1.
///
/// # Safety
/// `buf` must be valid for writes of `cap` bytes (or null).
unsafe fn fail(msg: &str, buf: *mut u8, cap: usize) -> i32 {
    if !buf.is_null() && cap > 0 {
        let n = msg.len().min(cap - 1);
        // SAFETY: n < cap and buf is valid for cap bytes (caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), buf, n);
            *buf.add(n) = 0;
        }
    }
    -1
}

fn init(config: &[u8]) -> Result<State, String> {
    if STATE.get().is_some() {
        return Err("forkd_init was already called in this zygote".into());
    }
    let threads = sys::thread_count().map_err(|e| format!("count threads: {e}"))?;
    if threads != 1 {
        return Err(format!(
            "the zygote has {threads} threads before init; it must be single-threaded to fork"
        ));
    }
    let config: InitConfig =
        serde_json::from_slice(config).map_err(|e| format!("bad init config: {e}"))?;
    let mut info = InitInfo {
        landlock_abi: sys::landlock_abi(),
        ..InitInfo::default()
    };
    let mut policies = BTreeMap::new();
    for (name, policy) in config.policies {
        let seccomp = policy
            .compile_seccomp()
            .map_err(|e: PolicyError| format!("policy `{name}`: {e}"))?;
        let template = template::build(
            &policy.filesystem,
            &config.interpreter_paths,
            &config.hostname,
        )
        .map_err(|e| format!("policy `{name}`: {e}"))?;
        info.seccomp_instructions
            .insert(name.clone(), seccomp.len());
        info.bound_paths.insert(
            name.clone(),
            template
                .bound
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        );
        let proc_masked = policy
            .filesystem
            .proc_masked
            .iter()
            .map(|f| std::ffi::CString::new(format!("/proc/{f}")))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("policy `{name}`: a proc_masked entry contains a NUL byte"))?;
        let prepared = Prepared {
            template,
            seccomp,
            landlock: policy.landlock,
            proc_masked,
            devpts: policy.filesystem.devpts,
        };
        let status = crate::isolate::probe_landlock(&prepared)
            .map_err(|e| format!("policy `{name}`: {e}"))?;
        info.landlock.insert(name.clone(), status);
        policies.insert(name, prepared);
    }
    let own_pid_ns = sys::open(c"/proc/self/ns/pid", libc::O_RDONLY, 0)
        .map_err(|e| format!("open own pid namespace: {e}"))?;
    Ok(State {
        policies,
        hostname: config.hostname,
        own_pid_ns,
        last_cap: sys::last_capability(),
        info,
    })
}

/// Compiles the policies and builds their sandbox roots. Must be called once,
/// while the process is single-threaded (before importing preload modules).
///
/// # Safety
/// `config` must be valid for `len` bytes; `err` valid for `err_cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn forkd_init(
    config: *const u8,
    len: usize,
    err: *mut u8,
    err_cap: usize,
) -> i32 {
    // SAFETY: forwarded caller contract.
    let config = unsafe { input(config, len) };
    match init(config) {
        Ok(state) => {
            let _ = STATE.set(state);
            0
        }
        // SAFETY: forwarded caller contract.
        Err(msg) => unsafe { fail(&msg, err, err_cap) },
    }
}

/// Writes the init report (JSON) into `buf`; returns its length, or -1 if
/// `forkd_init` has not succeeded or the buffer is too small.
///
/// # Safety
/// `buf` must be valid for writes of `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn forkd_info(buf: *mut u8, cap: usize) -> i64 {
    let Some(state) = STATE.get() else { return -1 };
    let json = serde_json::to_vec(&state.info).unwrap_or_default();
    if json.len() > cap || buf.is_null() {
        return -1;
    }
    // SAFETY: json.len() <= cap and buf is valid for cap bytes.
    unsafe { std::ptr::copy_nonoverlapping(json.as_ptr(), buf, json.len()) };
    json.len() as i64
}

/// Rootless start: moves the (single-threaded) calling process into a new
/// user namespace in which it is root, mapping only its own uid and gid.
///
/// # Safety
/// `err` must be valid for writes of `err_cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn forkd_enter_userns(err: *mut u8, err_cap: usize) -> i32 {
    match crate::userns::enter_own_user_namespace() {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(e) => unsafe { fail(&e.to_string(), err, err_cap) },
    }
}

/// Rootless start with a subordinate id range: [`forkd_enter_userns`] that
/// also maps the range given as JSON ([`crate::userns::SubIds`]).
///
/// # Safety
/// `subids` must be valid for reads of `len` bytes; `err` valid for writes
/// of `err_cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn forkd_enter_userns_mapped(
    subids: *const u8,
    len: usize,
    err: *mut u8,
    err_cap: usize,
) -> i32 {
    // SAFETY: forwarded caller contract.
    let raw = unsafe { input(subids, len) };
    let result = serde_json::from_slice::<crate::userns::SubIds>(raw)
        .map_err(|e| format!("bad subordinate id range: {e}"))
        .and_then(|sub| {
            crate::userns::enter_mapped_user_namespace(&sub).map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(msg) => unsafe { fail(&msg, err, err_cap) },
    }
}

/// Rootless start, in the inner zygote: a private mount namespace with a
/// /proc of its own pid namespace.
#[no_mangle]
pub extern "C" fn forkd_private_proc() -> i32 {
    match crate::userns::private_proc() {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// SIGKILL for the caller when its parent dies.
#[no_mangle]
pub extern "C" fn forkd_die_with_parent() -> i32 {
    match sys::set_parent_death_signal(libc::SIGKILL) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// In a fresh fork of a session's interpreter: joins the branch whose
/// namespaces are shown in directory `dir` and returns 0 in a child that
/// lives in it (the calling process exits); or an error, written to `err`,
/// and -1.
///
/// # Safety
/// `dir` must be a NUL-terminated string; `err` valid for `err_cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn forkd_branch_join(
    dir: *const std::ffi::c_char,
    err: *mut u8,
    err_cap: usize,
) -> i32 {
    // SAFETY: guaranteed by the caller.
    let dir = unsafe { std::ffi::CStr::from_ptr(dir) }.to_string_lossy();
    match crate::branch::join(&dir) {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(e) => unsafe { fail(&e.to_string(), err, err_cap) },
    }
}

/// In a branch's init, once the copy of the interpreter arrived: applies the
/// rest of its isolation (landlock, seccomp) and closes what it inherited.
///
/// # Safety
/// `err` must be valid for `err_cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn forkd_branch_seal(err: *mut u8, err_cap: usize) -> i32 {
    let result = (|| -> Result<(), String> {
        let state = STATE.get().ok_or("forkd_init has not run in this zygote")?;
        let (spec, inherited) = UNSEALED
            .get()
            .ok_or("this process is not an unsealed branch init")?;
        let policy = state
            .policies
            .get(&spec.policy)
            .ok_or_else(|| format!("unknown policy `{}`", spec.policy))?;
        crate::isolate::seal_branch(&crate::kernel::LinuxKernel, spec, policy, inherited)
            .map_err(|e| e.to_string())
    })();
    match result {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(msg) => unsafe { fail(&msg, err, err_cap) },
    }
}

/// Makes the next fork land in a new pid namespace (as its pid 1).
#[no_mangle]
pub extern "C" fn forkd_pidns_enter_new() -> i32 {
    match sys::unshare(libc::CLONE_NEWPID) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Points later forks back at the zygote's own pid namespace (undoes
/// `forkd_pidns_enter_new` so the next one can create a fresh namespace).
#[no_mangle]
pub extern "C" fn forkd_pidns_restore() -> i32 {
    let Some(state) = STATE.get() else {
        return libc::EINVAL;
    };
    match sys::setns(state.own_pid_ns.as_fd(), libc::CLONE_NEWPID) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Isolates the calling (freshly forked) child according to `spec` (JSON
/// [`ChildSpec`]), entering the network namespace `netns_fd` when it is not
/// -1 (else making one). Descriptors 0-3 survive; everything else is closed.
///
/// # Safety
/// `spec` must be valid for `len` bytes; `err` valid for `err_cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn forkd_child_isolate(
    spec: *const u8,
    len: usize,
    netns_fd: i32,
    err: *mut u8,
    err_cap: usize,
) -> i32 {
    // SAFETY: forwarded caller contract.
    let spec = unsafe { input(spec, len) };
    let result = (|| -> Result<(), String> {
        let state = STATE.get().ok_or("forkd_init has not run in this zygote")?;
        let spec: ChildSpec =
            serde_json::from_slice(spec).map_err(|e| format!("bad child spec: {e}"))?;
        if !spec.isolate {
            return Ok(());
        }
        let policy = state
            .policies
            .get(&spec.policy)
            .ok_or_else(|| format!("unknown policy `{}`", spec.policy))?;
        // SAFETY: the Python side passes a descriptor it received for this
        // child and keeps open until the call returns (or -1).
        let netns =
            (netns_fd >= 0).then(|| unsafe { std::os::fd::BorrowedFd::borrow_raw(netns_fd) });
        isolate_child(&spec, policy, &state.hostname, state.last_cap, netns)
            .map_err(|e| e.to_string())?;
        if spec.branch.is_some() {
            let inherited = sys::open_fds_from(crate::isolate::FIRST_CLOSED_FD)
                .map_err(|e| format!("list descriptors: {e}"))?;
            let _ = UNSEALED.set((spec, inherited));
        }
        Ok(())
    })();
    match result {
        Ok(()) => 0,
        // SAFETY: forwarded caller contract.
        Err(msg) => unsafe { fail(&msg, err, err_cap) },
    }
}

/// Descriptor the signal reporter writes to (the status pipe), or -1.
static REPORT_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// CPython's `PyErr_SetInterruptEx` (3.10+), documented as callable from a C
/// signal handler without the GIL; 0 when the interpreter lacks it.
static SET_INTERRUPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Set when the daemon asked the program to stop (SIGTERM from outside the
/// sandbox, i.e. a timeout's grace period began).
static TERMINATING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn report_signal_and_exit(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // A SIGTERM from outside the pid namespace (sender pid 0 as seen from
    // here: the daemon's timeout) stops the program gracefully: Python gets
    // an interrupt at its next check, so `finally`, atexit and the final
    // flush of buffered output run; the daemon SIGKILLs after its grace.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let external = sig == libc::SIGTERM
        && !info.is_null()
        && unsafe { (*info).si_code == libc::SI_USER && (*info).si_pid() == 0 };
    let set_interrupt = SET_INTERRUPT.load(std::sync::atomic::Ordering::Relaxed);
    if external && set_interrupt != 0 {
        TERMINATING.store(true, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the address is PyErr_SetInterruptEx's, looked up by name
        // in this process; it is async-signal-safe by its documentation.
        let f: extern "C" fn(libc::c_int) -> libc::c_int =
            unsafe { std::mem::transmute(set_interrupt) };
        f(libc::SIGINT);
        return;
    }
    let fd = REPORT_FD.load(std::sync::atomic::Ordering::Relaxed);
    // A fixed array, not StatusReport::encode: a signal handler must not allocate.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "signal numbers are below 65"
    )]
    let msg = [crate::wire::TAG_SELF_SIGNAL, sig as u8];
    // SAFETY: write and _exit are async-signal-safe; msg lives on this stack.
    unsafe {
        if fd >= 0 {
            libc::write(fd, msg.as_ptr().cast(), msg.len());
        }
        libc::_exit(128 + sig);
    }
}

/// 1 once the daemon's SIGTERM asked the program to stop (the interrupt
/// Python then raised is the daemon's, not the user's), else 0.
#[no_mangle]
pub extern "C" fn forkd_terminating() -> i32 {
    i32::from(TERMINATING.load(std::sync::atomic::Ordering::Relaxed))
}

/// The program runs as pid 1 of its pid namespace, and the kernel drops
/// signals a namespace's init sends itself while their action is the default
/// (`os.kill(os.getpid(), SIGTERM)`, and `abort()` would end as SIGSEGV).
/// This installs, for every signal whose default action terminates and whose
/// disposition is still the default, a handler that reports `K<signal>` on
/// `fd` and exits with 128+signal, so the daemon can report the signal the
/// program meant to die of. A SIGTERM from outside the sandbox (the daemon's
/// timeout) instead interrupts Python (KeyboardInterrupt, marked by
/// [`forkd_terminating`]) so the program ends gracefully within the grace.
/// Returns 0, or an errno.
#[no_mangle]
pub extern "C" fn forkd_report_signals(fd: i32) -> i32 {
    const FATAL: [libc::c_int; 21] = [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGILL,
        libc::SIGTRAP,
        libc::SIGABRT,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGUSR1,
        libc::SIGSEGV,
        libc::SIGUSR2,
        libc::SIGPIPE,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGPWR,
        libc::SIGSYS,
    ];
    REPORT_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name; the result
    // is only stored (null when the interpreter does not export it).
    let set_interrupt =
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"PyErr_SetInterruptEx".as_ptr()) };
    SET_INTERRUPT.store(set_interrupt as usize, std::sync::atomic::Ordering::Relaxed);
    for sig in FATAL {
        // SAFETY: sigaction with valid out/in pointers to zeroed, then filled,
        // plain-data structs; the handler only calls async-signal-safe functions.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                return *libc::__errno_location();
            }
            if old.sa_sigaction != libc::SIG_DFL {
                continue; // Python's own handlers and ignored signals stay.
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = report_signal_and_exit as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(sig, &new, std::ptr::null_mut()) != 0 {
                return *libc::__errno_location();
            }
        }
    }
    0
}
