//! One zygote process, seen from the daemon.
//!
//! The daemon never forks into sandboxes itself: it starts a Python zygote
//! (`fork+exec` of the interpreter, which is safe from a threaded process) and
//! sends it spawn orders over a `SOCK_SEQPACKET` socket, passing the child's
//! descriptors with `SCM_RIGHTS`. A reader task routes the zygote's replies
//! (`forked` with a pidfd, `exited` with the wait status) to the waiting
//! requests by id. If the zygote dies, every waiting request gets
//! [`ZygoteError::Died`] at once: nobody hangs.

use std::collections::{BTreeMap, HashMap};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_zygote::wire::{FromZygote, ToZygote, MAX_CONTROL_MESSAGE, WIRE_VERSION};
use forkd_zygote::InitConfig;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{oneshot, watch};

/// Largest message either side sends; spawn orders are a few hundred bytes,
/// the init message carries the policies.
const MAX_MESSAGE: usize = MAX_CONTROL_MESSAGE;

/// The descriptor the zygote's script is read from (a sealed memfd): the
/// command line then reads `python /dev/fd/4 forkd-zygote NAME` instead of
/// carrying the whole source as a `-c` argument.
const SCRIPT_FD: RawFd = 4;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ZygoteError {
    #[error("cannot start zygote `{name}` with {python}: {reason}")]
    Start {
        name: String,
        python: String,
        reason: String,
    },
    #[error("zygote `{name}` failed to start: {error}")]
    Fatal { name: String, error: String },
    #[error("zygote `{name}` did not become ready within {after:?} (last step: {stage}); raise `start_timeout_secs` if its preload modules are slow to import")]
    StartTimeout {
        name: String,
        after: Duration,
        stage: String,
    },
    #[error("zygote `{name}` died ({how}); it is being restarted, retry the request")]
    Died { name: String, how: String },
    #[error("zygote `{name}` could not fork the sandbox: {error}")]
    Spawn { name: String, error: String },
    #[error("talking to zygote `{name}` failed: {error}")]
    Channel { name: String, error: String },
}

/// How to start one zygote.
#[derive(Debug, Clone)]
pub struct ZygoteConfig {
    pub name: String,
    /// Interpreter to run (a venv's `bin/python` selects that venv).
    pub python: PathBuf,
    pub preload: Vec<String>,
    /// Extra environment of the zygote (and so of its children's imports).
    pub env: BTreeMap<String, String>,
    /// `libforkd_zygote.so`.
    pub library: PathBuf,
    pub init: InitConfig,
    pub start_timeout: Duration,
    /// Unprivileged daemon: the zygote makes a user namespace of its own first.
    pub rootless: bool,
    /// Rootless: a subordinate id range its user namespace maps too.
    pub subids: Option<forkd_zygote::userns::SubIds>,
}

pub use forkd_zygote::wire::{Exited, ReadyInfo};

/// The descriptors a child receives, in the order the zygote expects them.
pub struct SpawnFds {
    /// Read end of the job pipe: the child reads its job (length-prefixed
    /// JSON), then the program's stdin, from it.
    pub job: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Write end of the status pipe: setup errors are written here; its EOF
    /// means the program started.
    pub status: OwnedFd,
    /// A network namespace made ahead of time (lo up) for the child to
    /// enter; `None`: the child makes its own.
    pub netns: Option<OwnedFd>,
}

/// A forked sandbox.
pub struct Forked {
    /// Host pid of the sandbox's init process.
    pub pid: i32,
    /// pidfd of that process, for race-free kills.
    pub pidfd: OwnedFd,
    /// Resolves when the zygote has reaped the process.
    pub exited: oneshot::Receiver<Result<Exited, ZygoteError>>,
}

#[derive(Default)]
struct Pending {
    forked: Option<oneshot::Sender<Result<(i32, OwnedFd), ZygoteError>>>,
    exited: Option<oneshot::Sender<Result<Exited, ZygoteError>>>,
    /// The sandbox's user id, held until its init is reaped (see [`crate::uids`]).
    _uid: Option<crate::uids::Lease>,
}

struct Shared {
    name: String,
    socket: AsyncFd<OwnedFd>,
    pending: Mutex<HashMap<u64, Pending>>,
    dead: AtomicBool,
    /// Set once the zygote was told to drain: its exit is then expected.
    draining: AtomicBool,
    death: Mutex<Option<String>>,
}

/// A running zygote. Cheap to clone.
#[derive(Clone)]
pub struct Zygote {
    shared: Arc<Shared>,
    /// Host pid of the process the daemon started (our unreaped child).
    process_id: u32,
    info: Arc<ReadyInfo>,
    started: Instant,
    forks: Arc<AtomicU64>,
    /// Flips to true when the process is gone.
    exited: watch::Receiver<bool>,
}

impl Zygote {
    /// Starts the interpreter, sends the init message and waits until the
    /// preload modules are imported.
    pub async fn start(cfg: &ZygoteConfig) -> Result<Zygote, ZygoteError> {
        let start_err = |reason: String| ZygoteError::Start {
            name: cfg.name.clone(),
            python: cfg.python.display().to_string(),
            reason,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| start_err(format!("socketpair: {e}")))?;
        crate::sys::set_nonblocking(&ours).map_err(|e| start_err(format!("fcntl: {e}")))?;

        // A clean environment: children can read the zygote's initial
        // environment block (/proc/self/environ, their own memory), so
        // nothing of the daemon's environment beyond what an interpreter
        // needs to start may reach it.
        let passthrough = std::env::vars_os().filter(|(k, _)| {
            let k = k.to_string_lossy();
            k == "HOME" || k.starts_with("PYENV")
        });
        let script =
            crate::sys::sealed_memfd("forkd_zygote.py", forkd_zygote::ZYGOTE_PY.as_bytes())
                .map_err(|e| start_err(format!("cannot hold the zygote script in memory: {e}")))?;
        let mut cmd = tokio::process::Command::new(&cfg.python);
        // -P (3.11+) would keep /dev/fd off sys.path; the script removes it
        // itself so that older interpreters work too.
        cmd.arg(format!("/dev/fd/{SCRIPT_FD}"))
            .arg("forkd-zygote")
            .arg(&cfg.name)
            .env_clear()
            .envs(passthrough)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(&cfg.env)
            .current_dir("/")
            // Pipes, not /dev/null: the interpreter builds sys.stdin/stdout
            // once and caches what it saw (seekable, a character device),
            // and every child inherits those objects over its own pipes.
            // Its stdin is at EOF; its stdout is logged as stderr is.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false)
            // Its own process group: a terminal's ^C reaches the daemon,
            // which then shuts the zygote down in order.
            .process_group(0);
        crate::sys::pass_fd_as(&mut cmd, theirs.as_raw_fd(), 3);
        crate::sys::pass_fd_as(&mut cmd, script.as_raw_fd(), SCRIPT_FD);
        let mut child = cmd.spawn().map_err(|e| start_err(e.to_string()))?;
        drop(theirs);
        drop(script);
        // The process we started; a rootless zygote reports pid 1 of its own
        // pid namespace as its pid, so kills must use this one.
        let process_id = child.id().unwrap_or(0);

        drop(child.stdin.take());
        if let Some(stderr) = child.stderr.take() {
            let name = cfg.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(zygote = %name, "zygote stderr: {line}");
                }
            });
        }
        if let Some(stdout) = child.stdout.take() {
            let name = cfg.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(zygote = %name, "zygote stdout: {line}");
                }
            });
        }

        // SAFETY: `ours` is an open OwnedFd that the AsyncFd owns from here on;
        // nothing else closes or replaces it.
        let socket = unsafe { AsyncFd::register(ours) }
            .map_err(|e| start_err(format!("register socket: {e}")))?;
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            socket,
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            death: Mutex::new(None),
        });

        let init = ToZygote::Init {
            wire: WIRE_VERSION,
            lib: cfg.library.clone(),
            config: cfg.init.clone(),
            preload: cfg.preload.clone(),
            rootless: cfg.rootless,
            subids: cfg.subids.clone(),
        };
        if let Err(e) = send(&shared, &init.encode(), &[]).await {
            // Gone before reading init: it ran nothing of ours.
            let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .ok()
                .and_then(Result::ok);
            if let Some(error) = not_python(&cfg.python, status) {
                return Err(ZygoteError::Fatal {
                    name: cfg.name.clone(),
                    error,
                });
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(start_err(format!("send init: {e}")));
        }

        // Start-up handshake: read messages until ready / fatal / death.
        let mut stage = "loading the native library and building the sandbox root".to_string();
        let deadline = tokio::time::Instant::now() + cfg.start_timeout;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut heard = false;
        let info = loop {
            let next = tokio::time::timeout_at(deadline, recv(&shared, &mut buf));
            match next.await {
                Err(_) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(ZygoteError::StartTimeout {
                        name: cfg.name.clone(),
                        after: cfg.start_timeout,
                        stage,
                    });
                }
                Ok(Err(e)) => {
                    let status = child.wait().await.ok();
                    if let Some(error) = not_python(&cfg.python, status).filter(|_| !heard) {
                        return Err(ZygoteError::Fatal {
                            name: cfg.name.clone(),
                            error,
                        });
                    }
                    return Err(ZygoteError::Fatal {
                        name: cfg.name.clone(),
                        error: format!(
                            "it exited ({}) while {stage} ({e})",
                            describe_status(status)
                        ),
                    });
                }
                Ok(Ok((msg, fds))) => {
                    drop(fds);
                    heard = true;
                    match FromZygote::decode(msg) {
                        Ok(FromZygote::Importing { module }) => {
                            stage = format!("importing preload module `{module}`");
                        }
                        Ok(FromZygote::Ready(info)) => break info,
                        Ok(FromZygote::Fatal { error }) => {
                            let _ = child.wait().await;
                            return Err(ZygoteError::Fatal {
                                name: cfg.name.clone(),
                                error,
                            });
                        }
                        Ok(_) | Err(_) => {
                            let _ = child.start_kill();
                            let _ = child.wait().await;
                            return Err(start_err(format!(
                                "unexpected start-up message: {}",
                                String::from_utf8_lossy(msg)
                            )));
                        }
                    }
                }
            }
        };

        let (exited_tx, exited_rx) = watch::channel(false);
        tokio::spawn(read_loop(shared.clone(), child, exited_tx, buf));
        Ok(Zygote {
            shared,
            process_id,
            info: Arc::new(info),
            started: Instant::now(),
            forks: Arc::new(AtomicU64::new(0)),
            exited: exited_rx,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn info(&self) -> &ReadyInfo {
        &self.info
    }

    /// Host pid of the zygote process the daemon started.
    pub fn process_id(&self) -> u32 {
        self.process_id
    }

    pub fn forks(&self) -> u64 {
        self.forks.load(Ordering::Relaxed)
    }

    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn is_alive(&self) -> bool {
        !self.shared.dead.load(Ordering::Acquire)
    }

    /// Told to drain: replaced by a fresh zygote (not crashed).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Dead, or told to drain (replaced by a fresh zygote).
    pub fn is_retired(&self) -> bool {
        !self.is_alive() || self.shared.draining.load(Ordering::Acquire)
    }

    /// Resolves once the zygote process has exited.
    pub async fn wait_exit(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|gone| *gone).await;
    }

    fn died_error(&self) -> ZygoteError {
        ZygoteError::Died {
            name: self.shared.name.clone(),
            how: self
                .shared
                .death
                .lock()
                .ok()
                .and_then(|d| d.clone())
                .unwrap_or_else(|| "connection lost".into()),
        }
    }

    /// Orders one child. `spec` is the [`forkd_zygote::ChildSpec`] as JSON.
    /// Returns once the child exists; its exit arrives on [`Forked::exited`].
    /// `parked`: the child waits in the warm pool (and pre-touches memory meanwhile).
    pub async fn spawn(
        &self,
        id: u64,
        spec: &str,
        fds: SpawnFds,
        parked: bool,
    ) -> Result<Forked, ZygoteError> {
        self.spawn_leased(id, spec, fds, parked, None).await
    }

    /// [`Zygote::spawn`], holding `uid` until the child's init is reaped.
    pub async fn spawn_leased(
        &self,
        id: u64,
        spec: &str,
        fds: SpawnFds,
        parked: bool,
        uid: Option<crate::uids::Lease>,
    ) -> Result<Forked, ZygoteError> {
        let branch = false;
        self.order(id, spec, fds, parked, branch, uid).await
    }

    /// Forks a session branch's init (see `ChildSpec::branch`).
    pub async fn spawn_branch(
        &self,
        id: u64,
        spec: &str,
        fds: SpawnFds,
        uid: Option<crate::uids::Lease>,
    ) -> Result<Forked, ZygoteError> {
        self.order(id, spec, fds, false, true, uid).await
    }

    async fn order(
        &self,
        id: u64,
        spec: &str,
        fds: SpawnFds,
        parked: bool,
        branch: bool,
        uid: Option<crate::uids::Lease>,
    ) -> Result<Forked, ZygoteError> {
        if !self.is_alive() {
            return Err(self.died_error());
        }
        let (forked_tx, forked_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending.lock().expect("pending lock");
            pending.insert(
                id,
                Pending {
                    forked: Some(forked_tx),
                    exited: Some(exited_tx),
                    _uid: uid,
                },
            );
        }
        // The reader may have drained `pending` just before our insert.
        if !self.is_alive() {
            self.forget(id);
            return Err(self.died_error());
        }
        let msg = ToZygote::Spawn {
            id,
            spec: spec.to_owned(),
            parked,
            branch,
        }
        .encode();
        let mut raw = vec![
            fds.job.as_raw_fd(),
            fds.stdout.as_raw_fd(),
            fds.stderr.as_raw_fd(),
            fds.status.as_raw_fd(),
        ];
        raw.extend(fds.netns.as_ref().map(|fd| fd.as_raw_fd()));
        if let Err(e) = send(&self.shared, &msg, &raw).await {
            self.forget(id);
            return Err(ZygoteError::Channel {
                name: self.shared.name.clone(),
                error: e.to_string(),
            });
        }
        // The zygote holds its own copies now; ours must close so EOFs work.
        drop(fds);
        self.forks.fetch_add(1, Ordering::Relaxed);
        match forked_rx.await {
            Ok(Ok((pid, pidfd))) => Ok(Forked {
                pid,
                pidfd,
                exited: exited_rx,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.died_error()),
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.remove(&id);
        }
    }

    /// Asks the zygote to exit once its running children are reaped; it takes
    /// no new orders after this.
    pub async fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        let _ = send(&self.shared, &ToZygote::Drain.encode(), &[]).await;
    }

    /// Kills the zygote process (its sandboxes die with it: parent-death signal).
    pub fn kill(&self) {
        // The process is our unreaped child until the reader task waits for
        // it, so its pid cannot have been reused.
        if self.process_id > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.process_id as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Number of sandboxes this zygote is running.
    pub fn running(&self) -> usize {
        self.shared.pending.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// Our script reports every start-up failure on the socket before exiting:
/// a plain exit before any message means the interpreter never ran it.
fn not_python(
    python: &std::path::Path,
    status: Option<std::process::ExitStatus>,
) -> Option<String> {
    status.filter(|s| s.code().is_some()).map(|s| {
        format!(
            "`{}` exited ({}) without running forkd's zygote script: it does not look like a Python 3 interpreter (anything it printed is logged as `zygote stderr`); set `python` (--python) to one, e.g. a venv's bin/python",
            python.display(),
            describe_status(Some(s))
        )
    })
}

fn describe_status(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
            _ => "unknown status".into(),
        },
        None => "status unknown".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

async fn read_loop(
    shared: Arc<Shared>,
    mut child: tokio::process::Child,
    exited: watch::Sender<bool>,
    mut buf: Vec<u8>,
) {
    let reason = loop {
        match recv(&shared, &mut buf).await {
            Ok((msg, mut fds)) => match FromZygote::decode(msg) {
                Ok(FromZygote::Forked { id, pid }) => {
                    let entry = shared
                        .pending
                        .lock()
                        .ok()
                        .and_then(|mut p| p.get_mut(&id).and_then(|e| e.forked.take()));
                    if let (Some(tx), Some(pidfd)) = (entry, fds.pop()) {
                        let _ = tx.send(Ok((pid, pidfd)));
                    }
                }
                Ok(FromZygote::Exited { id, exited }) => {
                    let entry = shared.pending.lock().ok().and_then(|mut p| p.remove(&id));
                    if let Some(tx) = entry.and_then(|e| e.exited) {
                        let _ = tx.send(Ok(exited));
                    }
                }
                Ok(FromZygote::SpawnError { id, error }) => {
                    let entry = shared.pending.lock().ok().and_then(|mut p| p.remove(&id));
                    if let Some(tx) = entry.and_then(|e| e.forked) {
                        let _ = tx.send(Err(ZygoteError::Spawn {
                            name: shared.name.clone(),
                            error,
                        }));
                    }
                }
                Ok(FromZygote::Fatal { error }) => break format!("fatal: {error}"),
                Ok(FromZygote::Importing { .. } | FromZygote::Ready(_)) => {}
                Err(e) => {
                    tracing::warn!(zygote = %shared.name, "unreadable zygote message: {e}");
                }
            },
            Err(e) => break e,
        }
    };
    shared.dead.store(true, Ordering::Release);
    // A zygote that closed its socket is exiting (a rootless one's outer
    // process needs a moment to relay the exit); one that broke protocol is not.
    let status = match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    };
    let how = format!("{}; {reason}", describe_status(status));
    let expected = shared.draining.load(Ordering::Acquire) && status.is_some_and(|s| s.success());
    if expected {
        tracing::debug!(zygote = %shared.name, "zygote drained and exited");
    } else {
        tracing::warn!(zygote = %shared.name, "zygote exited: {how}");
    }
    if let Ok(mut d) = shared.death.lock() {
        *d = Some(how.clone());
    }
    let pending: Vec<Pending> = shared
        .pending
        .lock()
        .map(|mut p| p.drain().map(|(_, v)| v).collect())
        .unwrap_or_default();
    for p in pending {
        let err = ZygoteError::Died {
            name: shared.name.clone(),
            how: how.clone(),
        };
        if let Some(tx) = p.forked {
            let _ = tx.send(Err(err.clone()));
        }
        if let Some(tx) = p.exited {
            let _ = tx.send(Err(err));
        }
    }
    let _ = exited.send(true);
}

async fn send(shared: &Shared, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    loop {
        let mut guard = shared.socket.writable().await?;
        let res = guard.try_io(|inner| {
            let iov = [IoSlice::new(data)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() {
                &[]
            } else {
                &[ControlMessage::ScmRights(fds)]
            };
            sendmsg::<()>(
                inner.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match res {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Receives one message with its descriptors; a clean EOF is an error too
/// (the zygote never closes its end while it lives).
async fn recv<'b>(shared: &Shared, buf: &'b mut [u8]) -> Result<(&'b [u8], Vec<OwnedFd>), String> {
    loop {
        let mut guard = shared.socket.readable().await.map_err(|e| e.to_string())?;
        let res = guard.try_io(|inner| {
            let mut cmsg = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [IoSliceMut::new(&mut *buf)];
            let msg = recvmsg::<()>(
                inner.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: SCM_RIGHTS descriptors are new in this process
                    // and owned by nobody else.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            Ok((msg.bytes, fds, truncated))
        });
        match res {
            Ok(Ok((0, _, _))) => return Err("zygote closed its control socket".into()),
            Ok(Ok((_, _, true))) => return Err("zygote message exceeded 1 MiB".into()),
            Ok(Ok((n, fds, false))) => return Ok((&buf[..n], fds)),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_would_block) => continue,
        }
    }
}
