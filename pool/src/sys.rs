//! The descriptor tricks the daemon needs for starting a zygote.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

pub fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Makes the spawned process find `fd` at descriptor number `target`.
pub fn pass_fd_as(cmd: &mut tokio::process::Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs between fork and exec and calls only dup2,
    // which is async-signal-safe (as is fcntl). `fd` stays open in the parent until spawn
    // returns, so it is valid in the forked child. dup2 clears close-on-exec
    // on the target, which is what hands it to the interpreter.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                // dup2 would be a no-op and leave close-on-exec set.
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                return Ok(());
            }
            if libc::dup2(fd, target) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A memory file holding `data`, sealed against any change, so the zygote
/// reads exactly the script this daemon was built with (nothing on disk to
/// swap). Close-on-exec: [`pass_fd_as`] hands it on explicitly.
pub fn sealed_memfd(name: &str, data: &[u8]) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let fd = memfd_create(
        &cname,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, data)?;
    let fd = OwnedFd::from(file);
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SEAL
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE,
        ),
    )?;
    Ok(fd)
}
