//! The daemon's few raw system calls, behind safe wrappers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A pipe with close-on-exec ends: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-element out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded; both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// An anonymous, close-on-exec memory file holding `data`.
pub fn memfd_with(name: &[u8], data: &[u8]) -> io::Result<OwnedFd> {
    let name = String::from_utf8_lossy(name).into_owned();
    let memfd = memfd::MemfdOptions::default()
        .close_on_exec(true)
        .create(name)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let file = memfd.into_file();
    io::Write::write_all(&mut &file, data)?;
    Ok(OwnedFd::from(file))
}

/// Sends SIGKILL through a pidfd. Killing a pid namespace's init kills every
/// process in that namespace; a process that already exited is not an error.
pub fn kill_pidfd(pidfd: BorrowedFd<'_>) {
    // SAFETY: pidfd_send_signal with a borrowed, open pidfd and no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        );
    }
}

pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}
