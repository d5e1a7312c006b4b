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
