//! Rootless zygotes: a user namespace of the zygote's own.
//!
//! An unprivileged daemon cannot create pid, mount or net namespaces. Its
//! zygote therefore first enters a new user namespace where it is uid 0 (with
//! capabilities over namespaces it creates from then on), mapping just its own
//! uid and gid, as an unprivileged process may. All its sandboxes live in that
//! user namespace; each still gets its own pid, mount, net, ipc, uts and cgroup
//! namespaces, and drops every capability.

use std::io;

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("cannot create a user namespace ({0}); unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or an AppArmor userns restriction): run forkd as root or allow them")]
    Unshare(io::Error),
    #[error("cannot write {file} for the new user namespace: {source}")]
    Map {
        file: &'static str,
        source: io::Error,
    },
    #[error("the zygote must be single-threaded to enter a user namespace, it has {0} threads")]
    Threads(usize),
}

pub fn enter_own_user_namespace() -> Result<(), UsernsError> {
    let threads = sys::thread_count().unwrap_or(0);
    if threads > 1 {
        return Err(UsernsError::Threads(threads));
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    sys::unshare(libc::CLONE_NEWUSER).map_err(UsernsError::Unshare)?;
    let write = |file: &'static str, data: String| {
        std::fs::write(file, data).map_err(|source| UsernsError::Map { file, source })
    };
    // setgroups must be denied before an unprivileged process may map gids.
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    Ok(())
}

/// Gives the (rootless) zygote a mount namespace whose /proc shows its own pid
/// namespace, so `/proc/<pid>` paths name the zygote's children.
pub fn private_proc() -> io::Result<()> {
    sys::unshare(libc::CLONE_NEWNS)?;
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    sys::mount(
        Some(c"proc"),
        c"/proc",
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}
