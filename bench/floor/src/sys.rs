//! The floor's raw system calls, each behind a safe wrapper that checks the
//! result. Nothing here is shared with forkd: the floor must not inherit
//! forkd's mistakes (or its speed-ups) through common code.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_long(ret: libc::c_long) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn cstring(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; the returned descriptor is checked
    // and then owned by exactly one OwnedFd.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and owned once each.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: integer argument only.
    check(unsafe { libc::unshare(flags) })
}

pub fn setns(fd: BorrowedFd<'_>, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: a borrowed, open namespace descriptor.
    check(unsafe { libc::setns(fd.as_raw_fd(), nstype) })
}

pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string or null, as mount(2)
    // accepts for the optional ones.
    check(unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    })
}

pub fn umount_detach(target: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })
}

pub fn pivot_root_here() -> io::Result<()> {
    // SAFETY: two NUL-terminated paths ("." and "."): the new root stacks the
    // old one, which the caller detaches.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) })
}

pub fn chdir(path: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::chdir(path.as_ptr()) })
}

pub fn sethostname(name: &[u8]) -> io::Result<()> {
    // SAFETY: pointer and length of a live slice.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

pub fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: pointer to a live rlimit.
    check(unsafe { libc::setrlimit(resource, &lim) })
}

pub fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the options used here take integer arguments only.
    check(unsafe { libc::prctl(option, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) })
}

/// Empties the effective, permitted and inheritable sets (capset v3).
pub fn clear_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and the two-element data array match the v3 ABI.
    check_long(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) })
}

pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: closes descriptors this process owns from `first` on; the
    // caller (the child, before running user code) holds no Rust owner of
    // any of them that is used afterwards.
    check_long(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) })
}

/// Brings `lo` up in the current network namespace.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation, checked and owned below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor, owned once.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "IFF_UP | IFF_RUNNING (0x41) fits a c_short"
    )]
    const UP_RUNNING: libc::c_short = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    req.ifr_ifru.ifru_flags = UP_RUNNING;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })
}

pub fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: integer arguments only; an exited pid is not an error here.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub enum Fork {
    Child,
    Parent(i32),
}

/// # Safety
/// The caller must be single-threaded (the child gets only the calling
/// thread), and the child must only make async-signal-safe calls or exit.
pub unsafe fn fork() -> io::Result<Fork> {
    // SAFETY: forwarded to the caller.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

pub fn waitpid(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: pointer to a live int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without running destructors or atexit
    // handlers (which belong to the parent's copy of this process).
    unsafe { libc::_exit(code) }
}

/// Receives one message of at most `buf.len()` bytes with up to `max_fds`
/// descriptors (SCM_RIGHTS) from a SOCK_SEQPACKET socket. `Ok(None)` at EOF.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    #[allow(clippy::cast_possible_truncation, reason = "a handful of descriptors")]
    let space = unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) };
    let mut cbuf = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as usize;
    let n = loop {
        // SAFETY: msg points at our live iovec and control buffer.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in,
    // bounded by msg_controllen; each SCM_RIGHTS payload is an array of
    // descriptors now owned by this process, taken once each.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were truncated"));
    }
    Ok((n > 0 || !fds.is_empty()).then_some((n, fds)))
}

/// A connected pair of SOCK_SEQPACKET Unix sockets (close-on-exec).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors are fresh and owned once each.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message (no descriptors) on a SOCK_SEQPACKET socket.
pub fn send_message(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: pointer and length of a live slice; MSG_NOSIGNAL turns a
        // closed peer into EPIPE instead of a signal.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until one of `fds` is readable (or hung up); returns their
/// `revents`.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<libc::c_short>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: pointer and length of our live pollfd vector.
        let r = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
        if r > 0 {
            return Ok(polls.iter().map(|p| p.revents).collect());
        }
        if r == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Moves `fd` onto descriptor `target` in a child between fork and exec
/// (dup2 leaves the copy without close-on-exec; when `fd` already is
/// `target`, dup2 does nothing, so close-on-exec is cleared instead).
///
/// # Safety
/// Only between fork and exec: dup2 and fcntl are async-signal-safe.
pub unsafe fn dup_onto(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // SAFETY: forwarded caller contract; F_SETFD touches no memory.
        return check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) });
    }
    // SAFETY: forwarded caller contract; dup2 touches no memory.
    check(unsafe { libc::dup2(fd, target) })
}

/// Moves each `(fd, target)` onto its target in a child between fork and
/// exec, correct even when a source is another pair's target: every source
/// is first copied above the targets (close-on-exec copies, gone at exec).
///
/// # Safety
/// Only between fork and exec: fcntl and dup2 are async-signal-safe.
pub unsafe fn move_onto(pairs: &[(RawFd, RawFd)]) -> io::Result<()> {
    let mut high = [0 as RawFd; 8];
    if pairs.len() > high.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let above = pairs.iter().map(|p| p.1).max().unwrap_or(0) + 1;
    for (slot, (fd, _)) in high.iter_mut().zip(pairs) {
        // SAFETY: forwarded caller contract; F_DUPFD_CLOEXEC touches no memory.
        *slot = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if *slot == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    for (fd, (_, target)) in high.iter().zip(pairs) {
        // SAFETY: forwarded caller contract; the copy is above every target.
        unsafe { dup_onto(*fd, *target)? };
    }
    Ok(())
}

/// A system call with integer arguments only: its result or the errno it
/// failed with. For tests that ask the kernel what a filter answers.
///
/// # Safety
/// The arguments must not make the kernel write to memory the caller does
/// not own, and the call must not end or replace the process unexpectedly.
pub unsafe fn raw_syscall(nr: libc::c_long, args: [libc::c_long; 6]) -> Result<libc::c_long, i32> {
    // SAFETY: forwarded to the caller.
    let r = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    if r == -1 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

/// Writes all of `data` to `fd` (no allocation).
pub fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: reads `data`, which is alive.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        match usize::try_from(n) {
            Ok(n) => data = &data[n..],
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
