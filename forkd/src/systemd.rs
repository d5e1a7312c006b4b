//! systemd integration: socket activation and readiness notification.
//!
//! **Socket activation** (`sd_listen_fds(3)`): the service manager binds the
//! socket, starts the daemon with it as fd 3 and sets `LISTEN_PID` to the
//! daemon's pid and `LISTEN_FDS` to the number of descriptors passed. forkd
//! serves exactly one Unix stream socket, so it accepts exactly one
//! descriptor.
//!
//! [`take_listener`] must run before any thread starts: it clears the
//! `LISTEN_*` variables (so nothing started later inherits them) and marks
//! the descriptor close-on-exec, so a zygote can never inherit the listening
//! socket and accept other clients' connections.
//!
//! **Readiness** (`sd_notify(3)`, for `Type=notify`): [`notify`] sends
//! `READY=1` once the zygotes are up and the socket is served, and
//! `STOPPING=1` when shutdown begins, to the datagram socket named by
//! `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt, SockType};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// What [`take_listener`] found in the environment, read once.
static NOTIFY_SOCKET: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors; start forkd from its .socket unit or unset LISTEN_FDS and LISTEN_PID")]
    BadCount(String),
    #[error("systemd passed {0} sockets but forkd serves exactly one: give forkd.socket a single ListenStream= line")]
    NotOne(usize),
    #[error("the descriptor systemd passed (fd 3) is unusable: {0}; forkd.socket must have ListenStream=/path/to/forkd.sock (a Unix stream socket) and Accept=no")]
    Unusable(String),
}

/// The socket systemd passed, ready to serve.
#[derive(Debug)]
pub struct Activated {
    /// Listening, close-on-exec and non-blocking.
    pub listener: UnixListener,
    /// Its filesystem path (from `getsockname`).
    pub path: PathBuf,
}

/// How many descriptors were passed to the process `own_pid`, from the values
/// of `LISTEN_PID` and `LISTEN_FDS`. Variables meant for another process (a
/// parent that was activated and exec'd us without clearing them) mean none.
fn passed_count(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    own_pid: u32,
) -> Result<usize, ActivationError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(0);
    };
    if pid.trim().parse::<u32>().ok() != Some(own_pid) {
        return Ok(0);
    }
    fds.trim()
        .parse::<usize>()
        .map_err(|_| ActivationError::BadCount(fds.to_string()))
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes the socket systemd passed to this process, if any (`Ok(None)` when
/// the daemon was not socket-activated). Call once, early in `main`, while
/// the process is single-threaded: it removes `LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES` and `NOTIFY_SOCKET` from the environment (keeping the
/// latter for [`notify`]).
pub fn take_listener() -> Result<Option<Activated>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let _ = NOTIFY_SOCKET.set(std::env::var_os("NOTIFY_SOCKET"));
    for var in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        // Single-threaded at this point (see above), so this cannot race a
        // concurrent getenv.
        std::env::remove_var(var);
    }
    match passed_count(pid.as_deref(), fds.as_deref(), std::process::id())? {
        0 => return Ok(None),
        1 => {}
        n => return Err(ActivationError::NotOne(n)),
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ActivationError::Unusable(
            "it was already taken by an earlier call".into(),
        ));
    }
    let unusable =
        |what: &str, e: &dyn std::fmt::Display| ActivationError::Unusable(format!("{what}: {e}"));
    // Check that fd 3 is open before taking ownership of it.
    fcntl(LISTEN_FDS_START, FcntlArg::F_GETFD).map_err(|e| unusable("fd 3 is not open", &e))?;
    // SAFETY: LISTEN_PID names this process, so the service manager opened
    // fd 3 for it; the TAKEN flag makes this the only owner in the process.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    fcntl(LISTEN_FDS_START, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| unusable("cannot set close-on-exec", &e))?;
    match getsockopt(&fd.as_fd(), sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(other) => {
            return Err(ActivationError::Unusable(format!(
                "it is a {other:?} socket, not a stream socket"
            )))
        }
        Err(e) => return Err(unusable("not a socket", &e)),
    }
    match getsockopt(&fd.as_fd(), sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => {
            return Err(ActivationError::Unusable(
                "it is not listening (Accept=yes passes connections, forkd needs Accept=no)".into(),
            ))
        }
        Err(e) => return Err(unusable("not a socket", &e)),
    }
    let listener = UnixListener::from(fd);
    // std refuses a socket of another family here.
    let addr = listener
        .local_addr()
        .map_err(|e| unusable("not a Unix socket", &e))?;
    let path = addr
        .as_pathname()
        .ok_or_else(|| {
            ActivationError::Unusable("it has no filesystem path (abstract or unnamed)".into())
        })?
        .to_path_buf();
    listener
        .set_nonblocking(true)
        .map_err(|e| unusable("cannot make it non-blocking", &e))?;
    Ok(Some(Activated { listener, path }))
}

/// Tells the service manager about a state change (`READY=1`,
/// `STOPPING=1`). A no-op when not started with `NOTIFY_SOCKET` (or when
/// [`take_listener`] has not read it); failures are logged, never fatal: the
/// daemon works without a supervisor.
pub fn notify(state: &str) {
    let Some(Some(target)) = NOTIFY_SOCKET.get() else {
        return;
    };
    if let Err(e) = send_notification(target, state) {
        tracing::warn!(notify_socket = ?target, "cannot notify systemd of {state}: {e}");
    }
}

fn send_notification(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(target))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_variables_means_not_activated() {
        assert_eq!(passed_count(None, None, 42).unwrap(), 0);
        assert_eq!(passed_count(Some("42"), None, 42).unwrap(), 0);
        assert_eq!(passed_count(None, Some("1"), 42).unwrap(), 0);
    }

    #[test]
    fn variables_for_another_process_are_ignored() {
        assert_eq!(passed_count(Some("41"), Some("1"), 42).unwrap(), 0);
        assert_eq!(passed_count(Some("x"), Some("1"), 42).unwrap(), 0);
    }

    #[test]
    fn count_for_this_process_is_parsed() {
        assert_eq!(passed_count(Some("42"), Some("1"), 42).unwrap(), 1);
        assert_eq!(passed_count(Some("42"), Some("2"), 42).unwrap(), 2);
        assert!(matches!(
            passed_count(Some("42"), Some("one"), 42),
            Err(ActivationError::BadCount(s)) if s == "one"
        ));
    }
}
