//! The daemon's raw calls (and `forkd doctor`'s probes), behind safe wrappers.

pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Queries the process's execution domain (`personality(0xffffffff)` changes
/// nothing). `forkd doctor` uses it as a harmless call that the default
/// seccomp policy denies.
pub fn query_personality() -> std::io::Result<libc::c_int> {
    // SAFETY: the query form takes no pointer and has no effect.
    let ret = unsafe { libc::personality(0xffff_ffff) };
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Puts a descriptor into non-blocking mode.
pub fn set_nonblocking(fd: &std::os::fd::OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}
