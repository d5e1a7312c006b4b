//! Rootless zygotes: a user namespace of the zygote's own.
//!
//! An unprivileged daemon cannot create pid, mount or net namespaces. Its
//! zygote therefore first enters a new user namespace where it is uid 0 (with
//! capabilities over namespaces it creates from then on), mapping just its own
//! uid and gid, as an unprivileged process may. All its sandboxes live in that
//! user namespace; each still gets its own pid, mount, net, ipc, uts and cgroup
//! namespaces, and drops every capability.
//!
//! With a subordinate id range (`/etc/subuid`, `/etc/subgid`) and the setuid
//! helpers `newuidmap`/`newgidmap` (the rootless-podman pattern), the
//! namespace maps that range too, once, at zygote start: namespace id 0 is
//! the daemon's own, ids `1..=count` are the range, and each sandbox then
//! runs as its own id from it (leased by the daemon, as a root daemon leases
//! host ids), so per-user kernel budgets and owner checks are per sandbox.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::sys;

/// A subordinate id range of the daemon's user and the helpers that may map
/// it (found by the daemon; see `forkd::subids`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubIds {
    /// First host uid of the range (namespace uid 1).
    pub uid_start: u32,
    /// First host gid of the range (namespace gid 1).
    pub gid_start: u32,
    /// Ids mapped from each range: namespace ids `1..=count`.
    pub count: u32,
    pub newuidmap: PathBuf,
    pub newgidmap: PathBuf,
}

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
    #[error("cannot start the helper that maps the subordinate ids: {0}")]
    Helper(io::Error),
    #[error("mapping the subordinate id range failed: {0}; check the daemon user's lines in /etc/subuid and /etc/subgid (e.g. `USER:100000:65536`) and that newuidmap/newgidmap are installed setuid root (Debian package uidmap) and that the daemon does not run with no_new_privs (systemd NoNewPrivileges=yes), which stops them, or remove the lines to run every sandbox as the daemon's uid")]
    SubordinateMap(String),
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

/// [`enter_own_user_namespace`] with the subordinate range mapped too: a
/// helper forked before the `unshare` (a setuid program run from inside the
/// new namespace would not gain its owner's ids) runs `newuidmap` and
/// `newgidmap` on this process once it is in the namespace, while it waits.
/// setgroups stays allowed (the helpers map more than our own gid), so the
/// sandboxes can drop the daemon user's supplementary groups.
pub fn enter_mapped_user_namespace(sub: &SubIds) -> Result<(), UsernsError> {
    let threads = sys::thread_count().unwrap_or(0);
    if threads > 1 {
        return Err(UsernsError::Threads(threads));
    }
    // SAFETY: getuid/getgid/getpid cannot fail.
    let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
    let (go_r, go_w) = sys::pipe().map_err(UsernsError::Helper)?;
    let (err_r, err_w) = sys::pipe().map_err(UsernsError::Helper)?;
    // SAFETY: single-threaded (checked above); the child only runs the two
    // helpers and leaves with _exit.
    match unsafe { sys::fork() }.map_err(UsernsError::Helper)? {
        sys::Fork::Child => {
            drop(go_w);
            drop(err_r);
            let code = match map_helper(&go_r, pid, uid, gid, sub) {
                Ok(()) => 0,
                Err(msg) => {
                    let _ = sys::write_all(err_w.as_fd(), msg.as_bytes());
                    1
                }
            };
            sys::exit_now(code)
        }
        sys::Fork::Parent(helper) => {
            drop(go_r);
            drop(err_w);
            let unshared = sys::unshare(libc::CLONE_NEWUSER);
            // One byte: map now. EOF instead (unshare failed): do nothing.
            if unshared.is_ok() {
                let _ = sys::write_all(go_w.as_fd(), b"1");
            }
            drop(go_w);
            let status = sys::waitpid(helper).map_err(UsernsError::Helper)?;
            unshared.map_err(UsernsError::Unshare)?;
            let mut msg = String::new();
            let _ = io::Read::read_to_string(&mut std::fs::File::from(err_r), &mut msg);
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                if msg.is_empty() {
                    msg = format!("the helper ended with wait status {status:#x}");
                }
                return Err(UsernsError::SubordinateMap(msg));
            }
            Ok(())
        }
    }
}

/// The forked helper: waits for the go byte, then maps `pid`'s namespace.
fn map_helper(go: &OwnedFd, pid: i32, uid: u32, gid: u32, sub: &SubIds) -> Result<(), String> {
    let mut byte = [0u8];
    if sys::read_exact(go.as_fd(), &mut byte).is_err() {
        return Err(String::new());
    }
    for (tool, own, start) in [
        (&sub.newuidmap, uid, sub.uid_start),
        (&sub.newgidmap, gid, sub.gid_start),
    ] {
        let args = [
            pid.to_string(),
            "0".into(),
            own.to_string(),
            "1".into(),
            "1".into(),
            start.to_string(),
            sub.count.to_string(),
        ];
        let out = std::process::Command::new(tool)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`{} {}` failed ({}): {}",
                tool.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
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
