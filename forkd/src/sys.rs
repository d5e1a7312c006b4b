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

/// While alive, the calling thread creates and opens files as `id` (its
/// filesystem uid and gid; the process's other ids, and other threads, are
/// untouched). Dropping it makes the thread root again. For files made in a
/// branch's scratch, whose user namespace maps no other id.
pub struct FsIds(());

impl FsIds {
    pub fn enter(id: u32) -> FsIds {
        // SAFETY: setfsgid/setfsuid take integers and change only this
        // thread's filesystem ids (the raw syscalls, not libc's
        // process-wide emulation: glibc's setfsuid is the syscall).
        unsafe {
            libc::setfsgid(id);
            libc::setfsuid(id);
        }
        FsIds(())
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; the real and effective uid are still 0,
        // so the thread may take 0 back (and its capabilities with it).
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
        }
    }
}
