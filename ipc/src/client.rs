//! Clients for the forkd daemon: a blocking [`Client`] (one request at a
//! time) and a multiplexed tokio [`AsyncClient`] (many concurrent requests
//! over one connection).
//!
//! Both clients bound every wait: a call that gets no reply fails with
//! [`ClientError::Timeout`], a connection that dies fails with
//! [`ClientError::Closed`] (or the I/O error), never with a hang. The wait for
//! a call is, unless overridden with `with_timeout`:
//!
//! * `spawn`: the request's `timeout_ms` plus [`REPLY_GRACE`], or
//!   [`DEFAULT_SPAWN_WAIT`] plus [`REPLY_GRACE`] when `timeout_ms` is unset
//!   (the daemon then applies its own default, which we cannot see);
//! * `ping`: [`REPLY_GRACE`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::frame::{encode_frame, read_frame_bytes, read_frame_bytes_async, FrameError};
use crate::protocol::{
    ErrorReply, RequestBody, Response, ResponseBody, SpawnRequest, SpawnResult, MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};

/// Extra time a client waits beyond the sandbox's own timeout: covers queueing
/// in the daemon, fork, isolation, teardown and the reply's transfer.
pub const REPLY_GRACE: Duration = Duration::from_secs(30);

/// Wait assumed for a spawn without `timeout_ms` (before [`REPLY_GRACE`]).
pub const DEFAULT_SPAWN_WAIT: Duration = Duration::from_secs(600);

/// Environment variable that overrides the socket path.
pub const SOCKET_ENV: &str = "FORKD_SOCKET";

/// Everything a forkd client call can fail with. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections at the socket path.
    #[error(
        "no forkd daemon is listening on {}: start one with `forkd` (or run `forkd-run --embedded`), \
         or point FORKD_SOCKET at the right socket ({source})",
        path.display()
    )]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// What `connect(2)` said.
        source: io::Error,
    },
    /// `connect(2)` failed with EACCES/EPERM.
    #[error(
        "permission denied connecting to {}: your uid is not allowed by the daemon's socket \
         permissions/allow-list; ask the operator to add you to the socket's group or to the \
         daemon's allow-list",
        path.display()
    )]
    PermissionDenied {
        /// The socket path that was tried.
        path: PathBuf,
    },
    /// The connection failed in a way not covered by the variants below.
    #[error("I/O error talking to forkd: {0}")]
    Io(#[from] io::Error),
    /// A frame could not be encoded (e.g. the request is over the 16 MiB
    /// frame limit: send less stdin or smaller files) or the daemon sent one
    /// we cannot decode.
    #[error("bad frame on the forkd connection: {0}")]
    Frame(#[from] FrameError),
    /// The daemon answered with an error reply.
    #[error("forkd refused the request ({}): {}", .0.code, .0.message)]
    Server(ErrorReply),
    /// No reply within the call's wait (see the module docs).
    #[error(
        "no reply from forkd within {after:?}: the daemon may be overloaded or stuck; \
         check its logs, or raise the client timeout"
    )]
    Timeout {
        /// How long the call waited.
        after: Duration,
    },
    /// The daemon closed the connection (or it broke) with the call pending.
    #[error("forkd closed the connection before replying (daemon restarted or crashed?)")]
    Closed,
    /// The daemon's reply does not fit the request (wrong kind or id).
    #[error("unexpected reply from forkd: {0}; reconnect and retry")]
    UnexpectedReply(String),
    /// The reply's `v` is not [`PROTOCOL_VERSION`].
    #[error(
        "forkd speaks protocol version {daemon} but this client speaks {client}: \
         use a client library that matches the daemon"
    )]
    Version {
        /// `v` of the daemon's reply.
        daemon: u32,
        /// [`PROTOCOL_VERSION`].
        client: u32,
    },
    /// A blocking [`Client`] gave up on its connection after an earlier
    /// timeout or I/O failure (the stream may hold half a frame or a late
    /// reply).
    #[error(
        "this forkd connection was abandoned after an earlier timeout or I/O error; \
         open a new one with Client::connect"
    )]
    Broken,
}

/// Where the daemon listens by default.
///
/// `$FORKD_SOCKET` if set (and non-empty); else `/run/forkd/forkd.sock` for
/// root; else `$XDG_RUNTIME_DIR/forkd/forkd.sock`, or
/// `/tmp/forkd-<uid>/forkd.sock` when `XDG_RUNTIME_DIR` is unset.
pub fn default_socket_path() -> PathBuf {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no
    // memory of ours.
    let euid = unsafe { libc::geteuid() };
    socket_path_from(
        std::env::var_os(SOCKET_ENV),
        euid,
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

/// The default socket path when `$FORKD_SOCKET` is not set: the only path
/// whose directory the daemon creates itself.
pub fn builtin_socket_path() -> PathBuf {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no
    // memory of ours.
    let euid = unsafe { libc::geteuid() };
    socket_path_from(None, euid, std::env::var_os("XDG_RUNTIME_DIR"))
}

/// [`default_socket_path`] without the process environment, for tests.
fn socket_path_from(explicit: Option<OsString>, euid: u32, xdg: Option<OsString>) -> PathBuf {
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if euid == 0 {
        return PathBuf::from("/run/forkd/forkd.sock");
    }
    match xdg.filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("forkd").join("forkd.sock"),
        None => PathBuf::from(format!("/tmp/forkd-{euid}/forkd.sock")),
    }
}

/// How long a client waits for the reply to `req` when no explicit timeout
/// is set: its `timeout_ms` (or [`DEFAULT_SPAWN_WAIT`]) plus [`REPLY_GRACE`].
pub fn spawn_reply_wait(req: &SpawnRequest) -> Duration {
    req.timeout_ms
        .map_or(DEFAULT_SPAWN_WAIT, Duration::from_millis)
        .saturating_add(REPLY_GRACE)
}

/// A request that borrows its body, so `spawn(&req)` does not clone stdin
/// and files. Serializes exactly like [`crate::protocol::Request`] (a unit
/// test pins that).
#[derive(Serialize)]
struct RequestRef<'a> {
    v: u32,
    id: u64,
    #[serde(flatten)]
    body: BodyRef<'a>,
}

#[derive(Clone, Copy)]
pub(crate) enum BodyRef<'a> {
    Spawn(&'a SpawnRequest),
    Ping,
    /// Any other request (the session operations), borrowed whole.
    Any(&'a RequestBody),
}

/// The wire shape of the borrowed version-1 bodies.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum V1Ref<'a> {
    Spawn(&'a SpawnRequest),
    Ping,
}

impl Serialize for BodyRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BodyRef::Spawn(r) => V1Ref::Spawn(r).serialize(s),
            BodyRef::Ping => V1Ref::Ping.serialize(s),
            BodyRef::Any(b) => b.serialize(s),
        }
    }
}

impl BodyRef<'_> {
    fn name(self) -> &'static str {
        match self {
            BodyRef::Spawn(_) => "spawn",
            BodyRef::Ping => "ping",
            BodyRef::Any(b) => b.op(),
        }
    }
}

/// Parses a reply frame and checks its version. On failure returns the best
/// id we could find (0 if none) with the error, so the async reader can still
/// route it.
fn decode_response(bytes: &[u8]) -> Result<Response, (u64, ClientError)> {
    let version_error = |daemon: u64| ClientError::Version {
        daemon: u32::try_from(daemon).unwrap_or(u32::MAX),
        client: PROTOCOL_VERSION,
    };
    match serde_json::from_slice::<Response>(bytes) {
        Ok(resp) if resp.v == PROTOCOL_VERSION => Ok(resp),
        // Errors have one shape in every version; a daemon sends those it
        // cannot attribute to a request (a refused peer, a frame that is not
        // a request) as version 1.
        Ok(resp)
            if resp.v >= crate::protocol::OLDEST_PROTOCOL_VERSION
                && matches!(resp.body, ResponseBody::Error(_)) =>
        {
            Ok(resp)
        }
        Ok(resp) => Err((resp.id, version_error(u64::from(resp.v)))),
        Err(e) => {
            // A daemon of another version may use shapes we cannot parse;
            // report the version, which is what the user must fix.
            let value = serde_json::from_slice::<serde_json::Value>(bytes).ok();
            let field = |name: &str| value.as_ref().and_then(|v| v.get(name)?.as_u64());
            let id = field("id").unwrap_or(0);
            match field("v") {
                Some(v) if v != u64::from(PROTOCOL_VERSION) => Err((id, version_error(v))),
                _ => Err((id, ClientError::Frame(FrameError::Json(e)))),
            }
        }
    }
}

/// Turns a reply into the caller's result, per request kind.
fn expect_result(resp: Response) -> Result<SpawnResult, ClientError> {
    match resp.body {
        ResponseBody::Result(r) => Ok(r),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("spawn", &other)),
    }
}

fn expect_pong(resp: Response) -> Result<String, ClientError> {
    match resp.body {
        ResponseBody::Pong { daemon_version } => Ok(daemon_version),
        ResponseBody::Error(e) => Err(ClientError::Server(e)),
        other => Err(unexpected("ping", &other)),
    }
}

/// A reply of the wrong kind for `op`.
pub(crate) fn unexpected(op: &str, body: &ResponseBody) -> ClientError {
    let kind = serde_json::to_value(body)
        .ok()
        .and_then(|v| v.get("kind")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    ClientError::UnexpectedReply(format!("`{kind}` in reply to a {op} request"))
}

fn connect_error(path: &Path, e: io::Error) -> ClientError {
    // std maps both EACCES and EPERM to PermissionDenied.
    if e.kind() == io::ErrorKind::PermissionDenied {
        ClientError::PermissionDenied {
            path: path.to_owned(),
        }
    } else {
        // A mistyped path: say which part is missing, not just ENOENT.
        let source = match path.parent() {
            Some(dir)
                if e.kind() == io::ErrorKind::NotFound
                    && !dir.as_os_str().is_empty()
                    && !dir.exists() =>
            {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "its directory {} does not exist: check the path for a typo",
                        dir.display()
                    ),
                )
            }
            _ => e,
        };
        ClientError::Connect {
            path: path.to_owned(),
            source,
        }
    }
}

/// Classifies an I/O error on an established connection.
fn io_error(e: io::Error, waited: Duration) -> ClientError {
    match e.kind() {
        // SO_RCVTIMEO/SO_SNDTIMEO expiry is EAGAIN; our own deadline check
        // reports TimedOut.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ClientError::Timeout { after: waited }
        }
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => ClientError::Closed,
        _ => ClientError::Io(e),
    }
}

fn frame_error(e: FrameError, waited: Duration) -> ClientError {
    match e {
        FrameError::Io(e) => io_error(e, waited),
        // EOF in the middle of the reply is as much "closed before replying"
        // as EOF before it.
        FrameError::Closed | FrameError::Truncated { .. } => ClientError::Closed,
        other => ClientError::Frame(other),
    }
}

// ---------------------------------------------------------------------------
// Blocking client
// ---------------------------------------------------------------------------

/// Blocking client: one connection, one request at a time.
///
/// After a timeout or I/O failure the connection is abandoned (it may hold a
/// partial or late reply) and later calls return [`ClientError::Broken`];
/// an error *reply* from the daemon ([`ClientError::Server`]) leaves it
/// usable.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    next_id: u64,
    timeout: Option<Duration>,
    broken: bool,
}

impl Client {
    /// Connects to the daemon listening on `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
        Ok(Client {
            stream,
            path: path.to_owned(),
            next_id: 1,
            timeout: None,
            broken: false,
        })
    }

    /// Connects to [`default_socket_path`].
    pub fn connect_default() -> Result<Self, ClientError> {
        Self::connect(default_socket_path())
    }

    /// Sets one wait (for writing the request and reading the reply) used by
    /// every later call instead of the derived ones described in the module
    /// docs. `None` (the default) restores the derived waits.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path this client connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Liveness check; returns the daemon's version string.
    pub fn ping(&mut self) -> Result<String, ClientError> {
        let wait = self.timeout.unwrap_or(REPLY_GRACE);
        expect_pong(self.call(BodyRef::Ping, wait)?)
    }

    /// Runs one sandbox and returns its result. An error reply from the
    /// daemon becomes [`ClientError::Server`].
    pub fn spawn(&mut self, req: &SpawnRequest) -> Result<SpawnResult, ClientError> {
        let wait = self.timeout.unwrap_or_else(|| spawn_reply_wait(req));
        expect_result(self.call(BodyRef::Spawn(req), wait)?)
    }

    /// The wait set with [`Self::with_timeout`], if any.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn call(&mut self, body: BodyRef<'_>, wait: Duration) -> Result<Response, ClientError> {
        self.call_streaming(body, wait, &mut |_| {})
    }

    /// Sends one request and reads its responses: the non-final ones go to
    /// `on_event`, the final one is returned. `wait` bounds the whole call.
    pub(crate) fn call_streaming(
        &mut self,
        body: BodyRef<'_>,
        wait: Duration,
        on_event: &mut dyn FnMut(ResponseBody),
    ) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let id = self.next_id;
        self.next_id += 1;
        // Encoding errors (e.g. too large) happen before any byte is sent,
        // so they leave the connection usable.
        let frame = encode_frame(&RequestRef {
            v: PROTOCOL_VERSION,
            id,
            body,
        })?;
        let result = self.exchange(id, body, &frame, wait, on_event);
        if let Err(e) = &result {
            if !matches!(e, ClientError::Server(_)) {
                // Whatever is left on the stream (half a frame, a late reply)
                // would be misread as the next call's reply.
                self.broken = true;
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }

    fn exchange(
        &mut self,
        id: u64,
        body: BodyRef<'_>,
        frame: &[u8],
        wait: Duration,
        on_event: &mut dyn FnMut(ResponseBody),
    ) -> Result<Response, ClientError> {
        let mut io = DeadlineIo {
            stream: &self.stream,
            // Overflow means "effectively forever"; then no socket timeout.
            deadline: Instant::now().checked_add(wait),
        };
        io.write_all(frame).map_err(|e| io_error(e, wait))?;
        loop {
            let bytes =
                read_frame_bytes(&mut io, MAX_FRAME_BYTES).map_err(|e| frame_error(e, wait))?;
            let resp = decode_response(&bytes).map_err(|(_, e)| e)?;
            match (&resp.id, &resp.body) {
                (got, b) if *got == id && !b.is_final() => on_event(resp.body),
                (got, _) if *got == id => return Ok(resp),
                // The daemon could not parse our request far enough to echo its
                // id; with one request in flight the error is still ours.
                (0, ResponseBody::Error(_)) => return Ok(resp),
                (got, _) => {
                    return Err(ClientError::UnexpectedReply(format!(
                        "reply for request id {got} while waiting for {} request id {id}",
                        body.name()
                    )))
                }
            }
        }
    }
}

/// A `Read + Write` view of a stream that enforces one overall deadline by
/// resetting the socket timeout to the time left before every syscall (a
/// plain socket timeout would restart on each trickle of bytes).
struct DeadlineIo<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl DeadlineIo<'_> {
    fn remaining(&self) -> io::Result<Option<Duration>> {
        let Some(deadline) = self.deadline else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // Zero would mean "no timeout" to setsockopt (std refuses it).
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "forkd reply deadline passed",
            ));
        }
        Ok(Some(left))
    }
}

impl Read for DeadlineIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(self.remaining()?)?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for DeadlineIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(self.remaining()?)?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Async client
// ---------------------------------------------------------------------------

/// What a pending call eventually receives from the reader task.
type Reply = Result<Response, ClientError>;

/// Frames queued for the writer task. Bounded so a daemon that stops reading
/// pushes back on callers instead of growing our memory.
const WRITE_QUEUE: usize = 64;

/// Why an [`AsyncClient`] connection ended; turned into a fresh
/// [`ClientError`] for each caller (the errors are not `Clone`).
#[derive(Debug, Clone)]
enum CloseReason {
    Closed,
    /// The daemon sent an unroutable error (id 0) and then closed, as it does
    /// for `permission_denied`: that error is the reason, not the EOF.
    Refused(ErrorReply),
    Io(io::ErrorKind, String),
    TooLarge {
        len: usize,
        max: usize,
    },
    Empty,
}

impl CloseReason {
    fn from_frame(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => Self::from_io(&e),
            FrameError::TooLarge { len, max } => CloseReason::TooLarge { len, max },
            FrameError::Empty => CloseReason::Empty,
            FrameError::Closed
            | FrameError::Truncated { .. }
            | FrameError::Json(_)
            | FrameError::Stalled { .. } => CloseReason::Closed,
        }
    }

    fn from_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => CloseReason::Closed,
            kind => CloseReason::Io(kind, e.to_string()),
        }
    }

    fn to_error(&self) -> ClientError {
        match self {
            CloseReason::Closed => ClientError::Closed,
            CloseReason::Refused(reply) => ClientError::Server(reply.clone()),
            CloseReason::Io(kind, msg) => ClientError::Io(io::Error::new(*kind, msg.clone())),
            CloseReason::TooLarge { len, max } => ClientError::Frame(FrameError::TooLarge {
                len: *len,
                max: *max,
            }),
            CloseReason::Empty => ClientError::Frame(FrameError::Empty),
        }
    }
}

/// Re-creates an error for every pending call when one unroutable reply
/// (id 0) must fail them all.
fn replicate(e: &ClientError) -> ClientError {
    match e {
        ClientError::Server(reply) => ClientError::Server(reply.clone()),
        ClientError::Version { daemon, client } => ClientError::Version {
            daemon: *daemon,
            client: *client,
        },
        other => ClientError::UnexpectedReply(other.to_string()),
    }
}

/// Where a pending call's replies go: one reply, or a stream of them
/// (non-final events, then the final reply).
enum Route {
    Once(oneshot::Sender<Reply>),
    Stream(mpsc::UnboundedSender<Reply>),
}

impl Route {
    fn send(self, reply: Reply) {
        match self {
            Route::Once(tx) => {
                let _ = tx.send(reply);
            }
            Route::Stream(tx) => {
                let _ = tx.send(reply);
            }
        }
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Route>,
    /// Set once, when the connection dies; new calls then fail at once.
    closed: Option<CloseReason>,
    /// The last error reply that named no request (id 0).
    unroutable: Option<ErrorReply>,
}

/// Routing table shared by callers and the reader/writer tasks. A std mutex:
/// it is never held across an await.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section can panic, but if one ever did the table is
        // still consistent enough to fail calls with.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, id: u64, route: Route) -> Result<(), ClientError> {
        let mut st = self.lock();
        if let Some(reason) = &st.closed {
            return Err(reason.to_error());
        }
        st.pending.insert(id, route);
        Ok(())
    }

    fn unregister(&self, id: u64) {
        self.lock().pending.remove(&id);
    }

    fn closed_error(&self) -> ClientError {
        self.lock()
            .closed
            .as_ref()
            .map_or(ClientError::Closed, CloseReason::to_error)
    }

    fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Hands a reply to its caller; dropped if the caller gave up already.
    fn deliver(&self, id: u64, reply: Reply) {
        let mut st = self.lock();
        if let (Some(Route::Stream(tx)), Ok(resp)) = (st.pending.get(&id), &reply) {
            if !resp.body.is_final() {
                let _ = tx.send(reply);
                return;
            }
        }
        let route = st.pending.remove(&id);
        drop(st);
        if let Some(route) = route {
            route.send(reply);
        }
    }

    /// Fails every pending call (the connection itself stays up).
    fn fail_all(&self, make: impl Fn() -> ClientError) {
        let drained: Vec<_> = self.lock().pending.drain().collect();
        for (_, route) in drained {
            route.send(Err(make()));
        }
    }

    /// Marks the connection dead and fails every pending call.
    fn close(&self, reason: CloseReason) {
        let (reason, drained): (CloseReason, Vec<_>) = {
            let mut st = self.lock();
            let reason = match (reason, st.unroutable.take()) {
                (CloseReason::Closed, Some(reply)) => CloseReason::Refused(reply),
                (reason, _) => reason,
            };
            // The first reason wins: the reader's EOF after a writer error
            // should not mask the error.
            let reason = st.closed.get_or_insert(reason).clone();
            (reason, st.pending.drain().collect())
        };
        for (_, route) in drained {
            route.send(Err(reason.to_error()));
        }
    }

    /// Routes one reply frame.
    fn dispatch(&self, bytes: &[u8]) {
        match decode_response(bytes) {
            Ok(resp) if resp.id == 0 => {
                // The daemon could not tell which request this answers, so
                // no caller can be singled out: fail them all rather than let
                // the right one hang until its timeout.
                let err = match resp.body {
                    ResponseBody::Error(reply) => {
                        self.lock().unroutable = Some(reply.clone());
                        ClientError::Server(reply)
                    }
                    other => ClientError::UnexpectedReply(format!(
                        "reply with id 0 that is not an error: {other:?}"
                    )),
                };
                self.fail_all(|| replicate(&err));
            }
            Ok(resp) => self.deliver(resp.id, Ok(resp)),
            Err((0, err)) => self.fail_all(|| replicate(&err)),
            Err((id, err)) => self.deliver(id, Err(err)),
        }
    }
}

/// Removes a call's routing entry however the call ends (reply, timeout,
/// or the caller dropping the future), so late replies are discarded.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

async fn reader_loop(mut rd: OwnedReadHalf, shared: Arc<Shared>, _alive: oneshot::Sender<()>) {
    // `_alive` is dropped when this task ends (or is aborted), which tells
    // the writer task to stop too.
    let reason = loop {
        match read_frame_bytes_async(&mut rd, MAX_FRAME_BYTES).await {
            Ok(bytes) => shared.dispatch(&bytes),
            Err(e) => break CloseReason::from_frame(e),
        }
    };
    shared.close(reason);
}

async fn writer_loop(
    mut wr: OwnedWriteHalf,
    mut frames: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    mut reader_gone: oneshot::Receiver<()>,
) {
    loop {
        let frame = tokio::select! {
            f = frames.recv() => match f {
                Some(f) => f,
                // Every AsyncClient handle is gone.
                None => return,
            },
            _ = &mut reader_gone => return,
        };
        // Written outside the select so a frame is never cut in half: the
        // writer, not the (cancellable) callers, owns the stream.
        if let Err(e) = wr.write_all(&frame).await {
            shared.close(CloseReason::from_io(&e));
            return;
        }
    }
}

/// The replies of one streamed request ([`AsyncClient`]): events, then the
/// final response. Dropped before the final response, it unregisters and
/// asks the daemon to cancel the request.
pub(crate) struct ReplyStream {
    id: u64,
    rx: mpsc::UnboundedReceiver<Reply>,
    inner: Arc<Inner>,
    done: bool,
}

impl ReplyStream {
    /// The next response; the final one ends the stream (`None` after it).
    pub(crate) async fn next(&mut self) -> Option<Reply> {
        if self.done {
            return None;
        }
        let reply = match self.rx.recv().await {
            Some(r) => r,
            None => Err(self.inner.shared.closed_error()),
        };
        if !matches!(&reply, Ok(r) if !r.body.is_final()) {
            self.done = true;
        }
        Some(reply)
    }

    /// The request's id on the connection (for `cancel`).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.inner.shared.unregister(self.id);
        let cancel = RequestBody::Cancel(crate::session::Cancel { target: self.id });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(frame) = encode_frame(&RequestRef {
            v: PROTOCOL_VERSION,
            id,
            body: BodyRef::Any(&cancel),
        }) {
            // Best effort: a full queue or a dead connection means the
            // daemon cancels it anyway when the connection closes.
            let _ = self.inner.frames.try_send(frame);
        }
    }
}

/// State owned by the user-facing handles; dropping the last handle stops
/// both tasks and closes the socket.
struct Inner {
    path: PathBuf,
    next_id: AtomicU64,
    frames: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer stops on its own once `frames` is dropped and the
        // reader is gone.
        self.reader.abort();
    }
}

/// Multiplexed tokio client: cheap to [`Clone`], and any number of
/// concurrent calls share one connection. A background task routes replies
/// to callers by `id`; another owns the write half.
///
/// If the connection dies every pending call fails with
/// [`ClientError::Closed`] (or the I/O error), and later calls fail at once.
/// Needs a tokio runtime with the time driver enabled.
#[derive(Clone)]
pub struct AsyncClient {
    inner: Arc<Inner>,
    timeout: Option<Duration>,
}

impl fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncClient")
            .field("path", &self.inner.path)
            .field("timeout", &self.timeout)
            .field("closed", &self.inner.shared.is_closed())
            .finish_non_exhaustive()
    }
}

impl AsyncClient {
    /// Connects to the daemon listening on `path` and starts the connection's
    /// reader and writer tasks on the current runtime.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| connect_error(path, e))?;
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(Shared::default());
        let (frames_tx, frames_rx) = mpsc::channel(WRITE_QUEUE);
        let (alive_tx, alive_rx) = oneshot::channel();
        let reader = tokio::spawn(reader_loop(rd, Arc::clone(&shared), alive_tx));
        tokio::spawn(writer_loop(wr, frames_rx, Arc::clone(&shared), alive_rx));
        Ok(AsyncClient {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                next_id: AtomicU64::new(1),
                frames: frames_tx,
                shared,
                reader: reader.abort_handle(),
            }),
            timeout: None,
        })
    }

    /// Connects to [`default_socket_path`].
    pub async fn connect_default() -> Result<Self, ClientError> {
        Self::connect(default_socket_path()).await
    }

    /// Sets one wait used by every later call of this handle (and of clones
    /// made from it afterwards) instead of the derived ones described in the
    /// module docs. `None` (the default) restores the derived waits.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path this client connected to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// True once the connection has died; every call then fails at once and
    /// the caller should reconnect.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.is_closed()
    }

    /// Liveness check; returns the daemon's version string.
    pub async fn ping(&self) -> Result<String, ClientError> {
        let wait = self.timeout.unwrap_or(REPLY_GRACE);
        expect_pong(self.call(BodyRef::Ping, wait).await?)
    }

    /// Runs one sandbox and returns its result. An error reply from the
    /// daemon becomes [`ClientError::Server`].
    pub async fn spawn(&self, req: &SpawnRequest) -> Result<SpawnResult, ClientError> {
        let wait = self.timeout.unwrap_or_else(|| spawn_reply_wait(req));
        expect_result(self.call(BodyRef::Spawn(req), wait).await?)
    }

    /// Sends one request whose replies are streamed: events, then the
    /// final response. Dropping the stream before its end cancels the
    /// request in the daemon.
    pub(crate) async fn call_stream(&self, body: BodyRef<'_>) -> Result<ReplyStream, ClientError> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&RequestRef {
            v: PROTOCOL_VERSION,
            id,
            body,
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        inner.shared.register(id, Route::Stream(tx))?;
        let stream = ReplyStream {
            id,
            rx,
            inner: Arc::clone(&self.inner),
            done: false,
        };
        inner
            .frames
            .send(frame)
            .await
            .map_err(|_| inner.shared.closed_error())?;
        Ok(stream)
    }

    /// The wait set with [`Self::with_timeout`], if any.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub(crate) async fn call_body(
        &self,
        body: BodyRef<'_>,
        wait: Duration,
    ) -> Result<Response, ClientError> {
        self.call(body, wait).await
    }

    async fn call(&self, body: BodyRef<'_>, wait: Duration) -> Result<Response, ClientError> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&RequestRef {
            v: PROTOCOL_VERSION,
            id,
            body,
        })?;
        let (tx, rx) = oneshot::channel();
        // Registered before the frame is queued, so the reply can never
        // arrive ahead of its routing entry.
        inner.shared.register(id, Route::Once(tx))?;
        let _guard = PendingGuard {
            shared: &inner.shared,
            id,
        };
        let exchange = async {
            // Fails only if the writer task has exited, i.e. the connection
            // is dead.
            inner
                .frames
                .send(frame)
                .await
                .map_err(|_| inner.shared.closed_error())?;
            rx.await
                .unwrap_or_else(|_| Err(inner.shared.closed_error()))
        };
        match tokio::time::timeout(wait, exchange).await {
            Ok(reply) => reply,
            Err(_elapsed) => Err(ClientError::Timeout { after: wait }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{InlineFile, Limits, Program, Request, RequestBody};

    #[test]
    fn clients_can_cross_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Client>();
        assert_send_sync::<AsyncClient>();
        assert_send_sync::<ClientError>();
    }

    #[test]
    fn socket_path_rules() {
        let p = |explicit: Option<&str>, euid, xdg: Option<&str>| {
            socket_path_from(explicit.map(Into::into), euid, xdg.map(Into::into))
        };
        assert_eq!(
            p(Some("/x/y.sock"), 0, Some("/run/user/1")),
            PathBuf::from("/x/y.sock")
        );
        assert_eq!(
            p(None, 0, Some("/run/user/0")),
            PathBuf::from("/run/forkd/forkd.sock")
        );
        assert_eq!(
            p(None, 1000, Some("/run/user/1000")),
            PathBuf::from("/run/user/1000/forkd/forkd.sock")
        );
        assert_eq!(
            p(None, 1000, None),
            PathBuf::from("/tmp/forkd-1000/forkd.sock")
        );
        // Empty variables count as unset.
        assert_eq!(
            p(Some(""), 1000, Some("")),
            PathBuf::from("/tmp/forkd-1000/forkd.sock")
        );
    }

    #[test]
    fn spawn_wait_rule() {
        let mut req = SpawnRequest::default();
        assert_eq!(spawn_reply_wait(&req), Duration::from_secs(630));
        req.timeout_ms = Some(1500);
        assert_eq!(spawn_reply_wait(&req), Duration::from_millis(31_500));
        req.timeout_ms = Some(u64::MAX);
        assert!(spawn_reply_wait(&req) >= Duration::from_millis(u64::MAX));
    }

    #[test]
    fn borrowed_request_serializes_like_request() {
        let spawn = SpawnRequest {
            zygote: Some("py".into()),
            program: Program::Code("print(1)".into()),
            argv: vec!["a".into()],
            stdin: vec![0, 255, 10],
            files: vec![InlineFile {
                path: "f.txt".into(),
                content: b"hi".to_vec(),
                mode: Some(0o600),
            }],
            timeout_ms: Some(5),
            limits: Limits {
                pids: Some(8),
                ..Limits::default()
            },
            ..SpawnRequest::default()
        };
        let owned = Request {
            v: PROTOCOL_VERSION,
            id: 9,
            body: RequestBody::Spawn(spawn.clone()),
        };
        let borrowed = RequestRef {
            v: PROTOCOL_VERSION,
            id: 9,
            body: BodyRef::Spawn(&spawn),
        };
        assert_eq!(
            serde_json::to_string(&owned).unwrap(),
            serde_json::to_string(&borrowed).unwrap()
        );
        let owned = Request {
            v: PROTOCOL_VERSION,
            id: 3,
            body: RequestBody::Ping,
        };
        let borrowed = RequestRef {
            v: PROTOCOL_VERSION,
            id: 3,
            body: BodyRef::Ping,
        };
        assert_eq!(
            serde_json::to_string(&owned).unwrap(),
            serde_json::to_string(&borrowed).unwrap()
        );
    }

    #[test]
    fn decode_checks_version() {
        let ok = br#"{"v":2,"id":4,"kind":"pong","daemon_version":"0.1.0"}"#;
        assert_eq!(decode_response(ok).unwrap().id, 4);

        let older = br#"{"v":1,"id":4,"kind":"pong","daemon_version":"9"}"#;
        assert!(matches!(
            decode_response(older),
            Err((
                4,
                ClientError::Version {
                    daemon: 1,
                    client: 2
                }
            ))
        ));
        // A future version may use shapes we cannot parse at all.
        let alien = br#"{"v":3,"id":5,"kind":"hologram"}"#;
        assert!(matches!(
            decode_response(alien),
            Err((
                5,
                ClientError::Version {
                    daemon: 3,
                    client: 2
                }
            ))
        ));
        let garbage = br#"{"v":2,"id":6,"kind":"hologram"}"#;
        assert!(matches!(
            decode_response(garbage),
            Err((6, ClientError::Frame(FrameError::Json(_))))
        ));
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let e = ClientError::Connect {
            path: "/run/forkd/forkd.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let msg = e.to_string();
        assert!(msg.contains("/run/forkd/forkd.sock"), "{msg}");
        assert!(msg.contains("FORKD_SOCKET"), "{msg}");
        let e = ClientError::Server(ErrorReply {
            code: crate::protocol::ErrorCode::UnknownZygote,
            message: "no zygote named x".into(),
        });
        assert_eq!(
            e.to_string(),
            "forkd refused the request (unknown_zygote): no zygote named x"
        );
        let e = connect_error(Path::new("/s"), io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(e, ClientError::PermissionDenied { .. }), "{e:?}");
        let e = connect_error(Path::new("/s"), io::Error::from_raw_os_error(libc::EPERM));
        assert!(matches!(e, ClientError::PermissionDenied { .. }), "{e:?}");
    }
}
