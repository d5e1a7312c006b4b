//! What the floor's sandboxes may see and call: the same exposure as forkd's
//! shipped default policy (`policy/default.toml`), written out here on its
//! own; forkd-bench's tests compare the two so the floor follows forkd's
//! policy when it changes. Nothing here is shared with forkd: the lists are
//! written out again and the seccomp program is compiled by this file.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram};

/// Host paths bound read-only (plus the interpreter's own prefixes).
pub const READ_ONLY: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// Entries of /etc made visible.
pub const ETC: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "services",
    "protocols",
    "mime.types",
    "os-release",
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "python3",
    "python3.11",
    "matplotlibrc",
    "fonts",
];

pub const DEVICES_RW: &[&str] = &["null", "zero", "full"];
pub const DEVICES_RO: &[&str] = &["random", "urandom"];

/// Shorthand for the lists below: `("name", libc::SYS_name)`.
macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name)),*]
    };
}

/// `(name, number)` with the `SYS_` prefix dropped from the name.
pub fn name(entry: &(&'static str, libc::c_long)) -> &'static str {
    entry.0.trim_start_matches("SYS_")
}

/// System calls that fail with EPERM: the classic privileged interfaces,
/// kernel surfaces with a long CVE history, machine-wide state, LDT and
/// secret memory, and inotify (watches on shared bound files).
pub const DENY: &[(&str, libc::c_long)] = calls![
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_chroot,
    SYS_unshare,
    SYS_fsopen,
    SYS_fsconfig,
    SYS_fsmount,
    SYS_fspick,
    SYS_open_tree,
    SYS_move_mount,
    SYS_mount_setattr,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_kcmp,
    SYS_pidfd_getfd,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_userfaultfd,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_open_by_handle_at,
    SYS_name_to_handle_at,
    SYS_fanotify_init,
    SYS_kexec_load,
    SYS_kexec_file_load,
    SYS_init_module,
    SYS_finit_module,
    SYS_delete_module,
    SYS_reboot,
    SYS_swapon,
    SYS_swapoff,
    SYS_acct,
    SYS_quotactl,
    SYS_quotactl_fd,
    SYS_syslog,
    SYS_settimeofday,
    SYS_clock_settime,
    SYS_clock_adjtime,
    SYS_adjtimex,
    SYS_sethostname,
    SYS_setdomainname,
    SYS_iopl,
    SYS_ioperm,
    SYS_vhangup,
    SYS_lookup_dcookie,
    SYS_uselib,
    SYS_personality,
    SYS_modify_ldt,
    SYS_memfd_secret,
    SYS_inotify_init,
    SYS_inotify_init1,
    SYS_inotify_add_watch,
];

/// System calls allowed (the five in [`ARGUMENT_CHECKED`] only with the
/// argument rules below). Every call in neither list, and every call a newer
/// kernel adds, fails with ENOSYS.
pub const ALLOW: &[(&str, libc::c_long)] = calls![
    // descriptors: I/O, polling, pipes, event and timer fds, sync
    SYS_read,
    SYS_write,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_lseek,
    SYS_sendfile,
    SYS_splice,
    SYS_tee,
    SYS_copy_file_range,
    SYS_close,
    SYS_close_range,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_pipe,
    SYS_pipe2,
    SYS_poll,
    SYS_ppoll,
    SYS_select,
    SYS_pselect6,
    SYS_epoll_create,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd,
    SYS_eventfd2,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
    SYS_signalfd,
    SYS_signalfd4,
    SYS_fsync,
    SYS_fdatasync,
    SYS_syncfs,
    SYS_sync_file_range,
    SYS_fadvise64,
    SYS_readahead,
    SYS_ftruncate,
    SYS_truncate,
    SYS_fallocate,
    SYS_flock,
    SYS_ioctl,
    SYS_fcntl,
    // paths and metadata (landlock and the read-only root confine them)
    SYS_open,
    SYS_openat,
    SYS_openat2,
    SYS_creat,
    SYS_stat,
    SYS_fstat,
    SYS_lstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_statfs,
    SYS_fstatfs,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_getdents,
    SYS_getdents64,
    SYS_getcwd,
    SYS_chdir,
    SYS_fchdir,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_rmdir,
    SYS_link,
    SYS_linkat,
    SYS_unlink,
    SYS_unlinkat,
    SYS_symlink,
    SYS_symlinkat,
    SYS_readlink,
    SYS_readlinkat,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchmodat2,
    SYS_chown,
    SYS_fchown,
    SYS_lchown,
    SYS_fchownat,
    SYS_umask,
    SYS_utime,
    SYS_utimes,
    SYS_utimensat,
    SYS_futimesat,
    SYS_mknod,
    SYS_mknodat,
    SYS_getxattr,
    SYS_lgetxattr,
    SYS_fgetxattr,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_flistxattr,
    SYS_setxattr,
    SYS_lsetxattr,
    SYS_fsetxattr,
    SYS_removexattr,
    SYS_lremovexattr,
    SYS_fremovexattr,
    // the process's own memory
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_msync,
    SYS_mlock,
    SYS_munlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_munlockall,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_pkey_mprotect,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_mbind,
    SYS_get_mempolicy,
    SYS_set_mempolicy,
    // processes and threads inside the sandbox's pid namespace
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_wait4,
    SYS_waitid,
    SYS_kill,
    SYS_tkill,
    SYS_tgkill,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_getpid,
    SYS_getppid,
    SYS_gettid,
    SYS_getpgid,
    SYS_getpgrp,
    SYS_setpgid,
    SYS_setsid,
    SYS_getsid,
    SYS_set_tid_address,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_arch_prctl,
    SYS_prctl,
    SYS_futex,
    SYS_futex_waitv,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_sched_setaffinity,
    SYS_sched_getparam,
    SYS_sched_getscheduler,
    SYS_sched_setparam,
    SYS_sched_setscheduler,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_rr_get_interval,
    SYS_sched_getattr,
    SYS_getpriority,
    SYS_setpriority,
    SYS_getcpu,
    // forkd's branch moves a session's copy into a branch's namespaces
    SYS_setns,
    // credentials and limits of the process itself
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_getresuid,
    SYS_getresgid,
    SYS_getgroups,
    SYS_setuid,
    SYS_setgid,
    SYS_setreuid,
    SYS_setregid,
    SYS_setresuid,
    SYS_setresgid,
    SYS_setfsuid,
    SYS_setfsgid,
    SYS_setgroups,
    SYS_capget,
    SYS_capset,
    SYS_getrlimit,
    SYS_setrlimit,
    SYS_prlimit64,
    SYS_getrusage,
    SYS_times,
    SYS_uname,
    SYS_sysinfo,
    // signals and timers
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigpending,
    SYS_rt_sigtimedwait,
    SYS_rt_sigqueueinfo,
    SYS_rt_tgsigqueueinfo,
    SYS_rt_sigsuspend,
    SYS_sigaltstack,
    SYS_pause,
    SYS_alarm,
    SYS_getitimer,
    SYS_setitimer,
    SYS_restart_syscall,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_gettimeofday,
    SYS_time,
    SYS_timer_create,
    SYS_timer_settime,
    SYS_timer_gettime,
    SYS_timer_getoverrun,
    SYS_timer_delete,
    SYS_getrandom,
    // System V IPC (private to the ipc namespace)
    SYS_shmget,
    SYS_shmat,
    SYS_shmdt,
    SYS_shmctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_semctl,
    SYS_msgget,
    SYS_msgsnd,
    SYS_msgrcv,
    SYS_msgctl,
    // sockets in the sandbox's own network namespace
    SYS_socket,
    SYS_socketpair,
    SYS_connect,
    SYS_accept,
    SYS_accept4,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendmmsg,
    SYS_recvmmsg,
    SYS_shutdown,
    SYS_setsockopt,
    SYS_getsockopt,
];

/// Allowed calls whose arguments are checked.
pub const ARGUMENT_CHECKED: &[&str] = &["socket", "ioctl", "fcntl", "clone"];

/// socket() families allowed; any other fails with EPERM.
pub const SOCKET_FAMILIES: &[(&str, libc::c_int)] = &[
    ("AF_UNIX", libc::AF_UNIX),
    ("AF_INET", libc::AF_INET),
    ("AF_INET6", libc::AF_INET6),
];
/// AF_NETLINK sockets only with these protocols (the sandbox's own
/// interfaces); others (uevents, audit, sock_diag, ...) fail with EPERM.
pub const NETLINK_PROTOCOLS: &[(&str, libc::c_int)] = &[("NETLINK_ROUTE", libc::NETLINK_ROUTE)];
/// ioctl() request type bytes (bits 8-15) allowed: 'T' (terminal, FIO*) and
/// 0x89 (SIOC*); others fail with ENOTTY.
pub const IOCTL_TYPES: &[u8] = &[0x54, 0x89];
/// fcntl() commands that fail with EPERM: leases and dnotify on shared files.
pub const FCNTL_DENY: &[(&str, libc::c_int)] = &[
    ("F_SETLEASE", libc::F_SETLEASE),
    ("F_NOTIFY", libc::F_NOTIFY),
];
/// clone() with any of these flags fails with EPERM (clone3, whose flags BPF
/// cannot read, is not allowed at all: libc falls back to clone).
pub const CLONE_NAMESPACE_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

#[derive(Debug, thiserror::Error)]
#[error("compiling the floor's seccomp filter: {0}")]
pub struct SeccompError(String);

/// What one system call number gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Fail(i32),
    /// Allowed when its arguments pass the rule for this call.
    Checked(&'static str),
}

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// x32 system calls are x86-64 numbers with this bit set.
const X32_BIT: u32 = 0x4000_0000;
/// `struct seccomp_data`: nr, arch, then the low word of argument i.
const NR: u32 = 0;
const ARCH: u32 = 4;
const fn arg(i: u32) -> u32 {
    16 + 8 * i
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "classic BPF opcodes fit 16 bits"
)]
const fn op(code: u32) -> u16 {
    code as u16
}

fn ins(code: u32, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter {
        code: op(code),
        jt,
        jf,
        k,
    }
}

fn load(offset: u32) -> sock_filter {
    ins(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, offset)
}

/// `if A == k` go `jt` forward, else `jf` forward.
fn jeq(k: u32, jt: usize, jf: usize) -> Result<sock_filter, SeccompError> {
    let short = |n: usize| u8::try_from(n).map_err(|_| SeccompError(format!("jump of {n}")));
    Ok(ins(
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        short(jt)?,
        short(jf)?,
        k,
    ))
}

fn ret(value: u32) -> sock_filter {
    ins(libc::BPF_RET | libc::BPF_K, 0, 0, value)
}

fn allow() -> sock_filter {
    ret(libc::SECCOMP_RET_ALLOW)
}

fn fail(errno: i32) -> sock_filter {
    ret(libc::SECCOMP_RET_ERRNO | (errno.unsigned_abs() & libc::SECCOMP_RET_DATA))
}

fn word(v: libc::c_int) -> u32 {
    v.unsigned_abs()
}

/// `A` = arg `i`; allowed if it equals one of `ok`, else `next` (the
/// instructions that follow decide).
fn any_of(i: u32, ok: &[u32], next: Vec<sock_filter>) -> Result<Vec<sock_filter>, SeccompError> {
    // Layout: ld; jeq ok[0] .. jeq ok[n-1]; next...; ret allow.
    let mut p = vec![load(arg(i))];
    for (j, &k) in ok.iter().enumerate() {
        p.push(jeq(k, ok.len() - 1 - j + next.len(), 0)?);
    }
    p.extend(next);
    p.push(allow());
    Ok(p)
}

/// The code of one verdict; it always ends in a return.
fn leaf(v: Verdict) -> Result<Vec<sock_filter>, SeccompError> {
    Ok(match v {
        Verdict::Allow => vec![allow()],
        Verdict::Fail(e) => vec![fail(e)],
        Verdict::Checked("socket") => {
            let families: Vec<u32> = SOCKET_FAMILIES.iter().map(|f| word(f.1)).collect();
            let protocols: Vec<u32> = NETLINK_PROTOCOLS.iter().map(|p| word(p.1)).collect();
            // Not a listed family: netlink with a listed protocol, else EPERM.
            let mut netlink = vec![jeq(word(libc::AF_NETLINK), 1, 0)?, fail(libc::EPERM)];
            netlink.extend(any_of(2, &protocols, vec![fail(libc::EPERM)])?);
            any_of(0, &families, netlink)?
        }
        Verdict::Checked("ioctl") => {
            let types: Vec<u32> = IOCTL_TYPES.iter().map(|t| u32::from(*t) << 8).collect();
            let mut p = vec![
                load(arg(1)),
                ins(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, 0xff00),
            ];
            for (j, &k) in types.iter().enumerate() {
                p.push(jeq(k, types.len() - j, 0)?);
            }
            p.push(fail(libc::ENOTTY));
            p.push(allow());
            p
        }
        Verdict::Checked("fcntl") => {
            let mut p = vec![load(arg(1))];
            for (j, c) in FCNTL_DENY.iter().enumerate() {
                p.push(jeq(word(c.1), FCNTL_DENY.len() - j, 0)?);
            }
            p.push(allow());
            p.push(fail(libc::EPERM));
            p
        }
        Verdict::Checked("clone") => vec![
            load(arg(0)),
            ins(
                libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
                0,
                1,
                word(CLONE_NAMESPACE_FLAGS),
            ),
            fail(libc::EPERM),
            allow(),
        ],
        Verdict::Checked(other) => {
            return Err(SeccompError(format!("no argument rule for `{other}`")))
        }
    })
}

/// Binary search over `ranges` (first number, verdict), sorted; the number
/// is in `A`. Only forward jumps: the lower half follows the comparison, the
/// upper half follows the lower one.
fn search(ranges: &[(u32, Verdict)]) -> Result<Vec<sock_filter>, SeccompError> {
    if let [(_, v)] = ranges {
        return leaf(*v);
    }
    let half = ranges.len() / 2;
    let lower = search(&ranges[..half])?;
    let upper = search(&ranges[half..])?;
    let pivot = ranges[half].0;
    let jge = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
    let mut p = match u8::try_from(lower.len()) {
        Ok(skip) => vec![ins(jge, skip, 0, pivot)],
        // Too far for a conditional jump: go through an unconditional one.
        Err(_) => vec![
            ins(jge, 0, 1, pivot),
            ins(
                libc::BPF_JMP | libc::BPF_JA,
                0,
                0,
                u32::try_from(lower.len()).map_err(|e| SeccompError(e.to_string()))?,
            ),
        ],
    };
    p.extend(lower);
    p.extend(upper);
    Ok(p)
}

/// The filter, for x86-64: any other ABI (i386 `int 0x80`, x32) gets ENOSYS,
/// then a binary search over runs of numbers with the same verdict.
pub fn seccomp() -> Result<BpfProgram, SeccompError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(SeccompError(format!(
            "the floor's filter is written for x86-64, not {}",
            std::env::consts::ARCH
        )));
    }
    let number = |e: &(&'static str, libc::c_long)| {
        u32::try_from(e.1).map_err(|_| SeccompError(format!("{}: bad number", name(e))))
    };
    let mut verdicts = BTreeMap::new();
    for e in DENY {
        verdicts.insert(number(e)?, Verdict::Fail(libc::EPERM));
    }
    for e in ALLOW {
        let n = name(e);
        let v = match ARGUMENT_CHECKED.iter().find(|c| **c == n) {
            Some(c) => Verdict::Checked(c),
            None => Verdict::Allow,
        };
        if verdicts.insert(number(e)?, v).is_some() {
            return Err(SeccompError(format!("`{n}` is listed twice")));
        }
    }
    // Runs of numbers with one verdict; unlisted numbers, and everything
    // past the highest listed one, get ENOSYS.
    let enosys = Verdict::Fail(libc::ENOSYS);
    let end = verdicts.keys().next_back().map_or(0, |n| n + 1);
    let mut ranges: Vec<(u32, Verdict)> = Vec::new();
    for nr in 0..=end {
        let v = verdicts.get(&nr).copied().unwrap_or(enosys);
        if ranges.last().map(|r| r.1) != Some(v) {
            ranges.push((nr, v));
        }
    }
    let mut program = vec![
        load(ARCH),
        jeq(AUDIT_ARCH_X86_64, 1, 0)?,
        fail(libc::ENOSYS),
        load(NR),
        ins(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, 0, 1, X32_BIT),
        fail(libc::ENOSYS),
    ];
    program.extend(search(&ranges)?);
    if program.len() > usize::try_from(libc::BPF_MAXINSNS).unwrap_or(0) {
        return Err(SeccompError(format!("{} instructions", program.len())));
    }
    Ok(program)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::sys;
    use std::os::fd::AsFd;

    /// What a call must get: success, or this errno.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Want {
        Ok,
        Errno(i32),
    }

    /// Installs the filter in a forked child and asks the kernel: each call
    /// is chosen so that the filter's answer differs from what the kernel
    /// would say without it (a call the filter lets through fails with the
    /// kernel's own EBADF/EINVAL, or succeeds).
    #[test]
    fn the_kernel_applies_each_outcome() {
        use libc::*;
        const NS_AND_FS: c_long = (CLONE_NEWUSER | CLONE_FS) as c_long;
        let cases: &[(&str, c_long, [c_long; 6], Want)] = &[
            ("getpid", SYS_getpid, [0; 6], Want::Ok),
            ("mount", SYS_mount, [0; 6], Want::Errno(EPERM)),
            (
                "inotify_init1",
                SYS_inotify_init1,
                [0; 6],
                Want::Errno(EPERM),
            ),
            // Not listed: ENOSYS (the kernel would return 0 for length 0).
            ("mincore", SYS_mincore, [0; 6], Want::Errno(ENOSYS)),
            ("clone3", SYS_clone3, [0; 6], Want::Errno(ENOSYS)),
            (
                "x32 getpid",
                0x4000_0000 | SYS_getpid,
                [0; 6],
                Want::Errno(ENOSYS),
            ),
            (
                "socket unix",
                SYS_socket,
                [AF_UNIX.into(), SOCK_STREAM.into(), 0, 0, 0, 0],
                Want::Ok,
            ),
            (
                "socket packet",
                SYS_socket,
                [AF_PACKET.into(), SOCK_RAW.into(), 0, 0, 0, 0],
                Want::Errno(EPERM),
            ),
            (
                "netlink route",
                SYS_socket,
                [
                    AF_NETLINK.into(),
                    SOCK_RAW.into(),
                    NETLINK_ROUTE.into(),
                    0,
                    0,
                    0,
                ],
                Want::Ok,
            ),
            (
                "netlink audit",
                SYS_socket,
                [
                    AF_NETLINK.into(),
                    SOCK_RAW.into(),
                    NETLINK_AUDIT.into(),
                    0,
                    0,
                    0,
                ],
                Want::Errno(EPERM),
            ),
            (
                "ioctl TCGETS",
                SYS_ioctl,
                [-1, TCGETS as c_long, 0, 0, 0, 0],
                Want::Errno(EBADF),
            ),
            (
                "ioctl SIOCGIFFLAGS",
                SYS_ioctl,
                [-1, SIOCGIFFLAGS as c_long, 0, 0, 0, 0],
                Want::Errno(EBADF),
            ),
            (
                "ioctl FS_IOC_GETVERSION",
                SYS_ioctl,
                [-1, 0x8008_7601, 0, 0, 0, 0],
                Want::Errno(ENOTTY),
            ),
            (
                "fcntl F_GETFL",
                SYS_fcntl,
                [-1, F_GETFL.into(), 0, 0, 0, 0],
                Want::Errno(EBADF),
            ),
            (
                "fcntl F_NOTIFY",
                SYS_fcntl,
                [-1, F_NOTIFY.into(), 0, 0, 0, 0],
                Want::Errno(EPERM),
            ),
            (
                "fcntl F_SETLEASE",
                SYS_fcntl,
                [-1, F_SETLEASE.into(), 0, 0, 0, 0],
                Want::Errno(EPERM),
            ),
            // CLONE_THREAD without CLONE_SIGHAND: the kernel's EINVAL, so
            // clone itself is let through; with a namespace flag, EPERM
            // (without the filter, NEWUSER with FS is the kernel's EINVAL).
            (
                "clone thread",
                SYS_clone,
                [CLONE_THREAD.into(), 0, 0, 0, 0, 0],
                Want::Errno(EINVAL),
            ),
            (
                "clone newuser",
                SYS_clone,
                [NS_AND_FS, 0, 0, 0, 0, 0],
                Want::Errno(EPERM),
            ),
            ("setns", SYS_setns, [-1, 0, 0, 0, 0, 0], Want::Errno(EBADF)),
        ];
        let program = seccomp().unwrap();
        let (r, w) = sys::pipe().unwrap();
        // SAFETY: the child makes raw system calls and writes to a pipe
        // (nothing that allocates or takes a lock) and then _exits.
        match unsafe { sys::fork() }.unwrap() {
            sys::Fork::Child => {
                drop(r);
                if seccompiler::apply_filter(&program).is_err() {
                    sys::exit_now(2);
                }
                for (_, nr, args, _) in cases {
                    // SAFETY: integer arguments and null pointers only; no
                    // case ends or replaces the process.
                    let got = match unsafe { sys::raw_syscall(*nr, *args) } {
                        Ok(_) => 0i32,
                        Err(e) => e,
                    };
                    if sys::write_all(w.as_fd(), &got.to_le_bytes()).is_err() {
                        sys::exit_now(3);
                    }
                }
                sys::exit_now(0);
            }
            sys::Fork::Parent(pid) => {
                drop(w);
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut out).unwrap();
                let status = sys::waitpid(pid).unwrap();
                assert_eq!(status, 0, "the child failed to install the filter");
                assert_eq!(out.len(), cases.len() * 4);
                for (chunk, (what, _, _, want)) in out.chunks(4).zip(cases) {
                    let got = i32::from_le_bytes(chunk.try_into().unwrap());
                    let got = if got == 0 { Want::Ok } else { Want::Errno(got) };
                    assert_eq!(got, *want, "{what}");
                }
            }
        }
    }

    #[test]
    fn every_listed_call_is_known_and_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for e in DENY.iter().chain(ALLOW) {
            assert!(seen.insert(e.1), "{} listed twice", name(e));
        }
        for c in ARGUMENT_CHECKED {
            assert!(ALLOW.iter().any(|e| name(e) == *c), "{c}");
        }
        assert!(seccomp().unwrap().len() < 300);
    }
}
