//! The Unix-socket server: peer checks, framing, pipelined requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkd_ipc::frame::{
    encode_frame, peek_request_id, peek_request_version, read_frame_bytes_async_within, FrameError,
};
use forkd_ipc::{
    ErrorCode, ErrorReply, Request, RequestBody, Response, ResponseBody, OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::admission::Admission;
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::settings::FrameLimits;
use crate::state::{stopping, State};

/// Replies queued per connection before its reader waits for the writer.
const REPLY_QUEUE: usize = 256;

/// How long a refused peer's connection stays half-open so that its first
/// request does not race our close (see `connection`), and how much of what
/// it sends meanwhile is read and discarded.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
const REFUSAL_DISCARD_BYTES: usize = 1 << 20;

/// What the socket's handlers need: admission for peers and requests, the
/// sandbox runner's state, and where outcomes are recorded.
pub struct Server {
    pub state: Arc<State>,
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    pub audit: Option<Arc<AuditLog>>,
    pub frames: FrameLimits,
    pub sessions: Arc<crate::session::Sessions>,
    next_connection: AtomicU64,
}

impl Server {
    pub fn new(
        state: Arc<State>,
        admission: Arc<Admission>,
        metrics: Arc<Metrics>,
        audit: Option<Arc<AuditLog>>,
        frames: FrameLimits,
        sessions: Arc<crate::session::Sessions>,
    ) -> Server {
        Server {
            state,
            admission,
            metrics,
            audit,
            frames,
            sessions,
            next_connection: AtomicU64::new(1),
        }
    }
}

pub async fn serve(
    server: Arc<Server>,
    listener: UnixListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(server.clone(), stream));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopping(&mut shutdown) => break,
        }
    }
}

/// An error no request version can be attributed to (a refused peer, a
/// frame that is not a request): sent as version 1, which every client
/// reads (the error shape is the same in every version).
fn error_response(id: u64, code: ErrorCode, message: impl Into<String>) -> Response {
    Response {
        v: OLDEST_PROTOCOL_VERSION,
        id,
        body: ResponseBody::Error(ErrorReply {
            code,
            message: message.into(),
        }),
    }
}

/// Runs one spawn request: admission, the sandbox, its reply, its metrics
/// and its audit record.
async fn spawn_request(
    server: Arc<Server>,
    tx: mpsc::Sender<Response>,
    gone: watch::Receiver<bool>,
    spawn: forkd_ipc::SpawnRequest,
    peer: crate::audit::Peer,
    connection: u64,
    (v, id): (u32, u64),
) {
    let started = std::time::Instant::now();
    let pending = server
        .audit
        .as_ref()
        .map(|audit| crate::audit::Record::request(peer, connection, id, &spawn, audit.payloads));
    let asked = (spawn.zygote.clone(), spawn.policy.clone());
    let outcome = match server.admission.resolve(&spawn) {
        Ok(resolved) => match &spawn.workspace {
            None => crate::sandbox::run_sandbox(&server.state, resolved, spawn, gone).await,
            Some(w) => {
                let who = crate::workspace::Requester {
                    uid: peer.uid,
                    gid: peer.gid,
                    pid: peer.pid,
                };
                match crate::workspace::plan_request(
                    &server.admission.workspaces,
                    w,
                    Some(who),
                    resolved.limits.scratch_bytes,
                )
                .await
                {
                    Ok(ws) => {
                        crate::sandbox::run_sandbox_with(
                            &server.state,
                            resolved,
                            spawn,
                            gone,
                            Some(ws),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }
            }
        },
        Err(e) => Err(e),
    };
    let elapsed = started.elapsed();
    // Only errors and audit records need the names: a plain success skips them.
    let names = (outcome.is_err() || pending.is_some()).then(|| {
        server
            .admission
            .configured_names(asked.0.as_deref(), asked.1.as_deref())
    });
    match &outcome {
        Ok(result) => server.metrics.record_result(result, elapsed),
        Err(e) => {
            let zygote = names.as_ref().and_then(|n| n.0.as_deref());
            server
                .metrics
                .record_error(zygote.unwrap_or(crate::metrics::NO_ZYGOTE), e.code)
        }
    }
    // Queued before the reply when the writer keeps up (a non-blocking
    // send), so a record cannot miss the audit log's close at shutdown;
    // otherwise after the reply: the audit never delays it.
    let mut late = None;
    if let (Some(audit), Some(record)) = (&server.audit, pending) {
        let (zygote, policy) = names.unwrap_or_default();
        late = audit
            .try_record(Box::new(record.complete(zygote, policy, &outcome, elapsed)))
            .err();
    }
    let body = match outcome {
        Ok(result) => ResponseBody::Result(result),
        Err(e) => ResponseBody::Error(e),
    };
    let _ = tx.send(Response { v, id, body }).await;
    if let (Some(audit), Some(record)) = (&server.audit, late) {
        audit.record(record).await;
    }
}

/// Turns one frame body into a request this daemon speaks, or the error
/// the reply carries (`malformed_frame`, or `unsupported_version` for another
/// protocol version) with the id to send it under (the frame's own when one
/// can be read, else 0). Pure, so that the fuzz target (fuzz/) exercises
/// exactly what the daemon runs.
pub fn parse_request(bytes: &[u8]) -> Result<Request, (u64, ErrorReply)> {
    let unsupported = |v| {
        ErrorReply {
        code: ErrorCode::UnsupportedVersion,
        message: format!(
            "protocol version {v} is not supported; this daemon speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
        ),
    }
    };
    let spoken =
        |v: u64| (u64::from(OLDEST_PROTOCOL_VERSION)..=u64::from(PROTOCOL_VERSION)).contains(&v);
    let request = match serde_json::from_slice::<Request>(bytes) {
        Ok(r) => r,
        Err(e) => {
            let id = peek_request_id(bytes);
            return Err(match peek_request_version(bytes) {
                Some(v) if !spoken(v) => (id, unsupported(v)),
                _ => (
                    id,
                    ErrorReply {
                        code: ErrorCode::MalformedFrame,
                        message: format!("not a valid forkd request: {e}"),
                    },
                ),
            });
        }
    };
    if !spoken(u64::from(request.v)) {
        return Err((request.id, unsupported(u64::from(request.v))));
    }
    if request.v < request.body.since_version() {
        return Err((
            request.id,
            ErrorReply {
                code: ErrorCode::UnsupportedVersion,
                message: format!(
                    "`{}` needs protocol version {}; the request says {}",
                    request.body.op(),
                    request.body.since_version(),
                    request.v
                ),
            },
        ));
    }
    Ok(request)
}

/// The version an error reply to `bytes` carries: the request's own when
/// this daemon speaks it (an old client gets replies it can read), else 1
/// (see [`error_response`]).
fn reply_version(bytes: &[u8]) -> u32 {
    peek_request_version(bytes)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(v))
        .unwrap_or(OLDEST_PROTOCOL_VERSION)
}

async fn connection(server: Arc<Server>, stream: UnixStream) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot read peer credentials: {e}");
            return;
        }
    };
    let (mut reader, mut writer) = stream.into_split();
    let connection = server.next_connection.fetch_add(1, Ordering::Relaxed);
    let peer = crate::audit::Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let allowed = server.admission.peer_allowed(cred.uid(), cred.gid());
    server.metrics.record_connection(allowed);
    if !allowed {
        if let Some(audit) = &server.audit {
            audit
                .record(Box::new(crate::audit::Record::refused(peer, connection)))
                .await;
        }
        tracing::warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "refused connection from a peer not on the allow-list");
        let reply = error_response(
            0,
            ErrorCode::PermissionDenied,
            format!(
                "uid {} / gid {} may not use this forkd; ask its operator to add you to allowed_uids or allowed_gids",
                cred.uid(),
                cred.gid()
            ),
        );
        if let Ok(frame) = encode_frame(&reply) {
            let _ = writer.write_all(&frame).await;
        }
        // Closing at once would race the peer's first request: written after
        // our close, it fails with EPIPE and the client reports a closed
        // connection instead of the refusal. Half-close, and discard what the
        // peer sends until it hangs up (bounded in time and bytes).
        let _ = writer.shutdown().await;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            let mut sink = [0u8; 4096];
            let mut discarded = 0usize;
            while discarded < REFUSAL_DISCARD_BYTES {
                match reader.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => discarded += n,
                }
            }
        })
        .await;
        return;
    }

    let (tx, mut rx) = mpsc::channel::<Response>(REPLY_QUEUE);
    let write_task = tokio::spawn(async move {
        while let Some(resp) = rx.recv().await {
            let frame = match encode_frame(&resp) {
                Ok(f) => f,
                Err(e) => match encode_frame(&error_response(
                    resp.id,
                    ErrorCode::Internal,
                    format!("the reply could not be encoded ({e}); lower limits.output_bytes"),
                )) {
                    Ok(f) => f,
                    Err(_) => continue,
                },
            };
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    });

    let (client_gone, _) = tokio::sync::watch::channel(false);
    let cancels = crate::session::ops::Cancels::default();
    // Session requests hold a task each until they answer: bounded per
    // connection, so one client cannot make the daemon hold without limit.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(
        server.sessions.cfg.max_requests_per_connection,
    ));
    let max = server.frames.max_bytes;
    let frame_timeout = server.frames.timeout;
    loop {
        let bytes = match read_frame_bytes_async_within(&mut reader, max, frame_timeout).await {
            Ok(b) => b,
            Err(FrameError::Stalled { after }) => {
                tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "closing a connection whose frame stalled for {after:?}");
                break;
            }
            Err(FrameError::TooLarge { len, max }) => {
                let _ = tx
                    .send(error_response(
                        0,
                        ErrorCode::FrameTooLarge,
                        format!("frame of {len} bytes exceeds the {max}-byte limit; send smaller code, stdin or files"),
                    ))
                    .await;
                break;
            }
            Err(FrameError::Empty) => {
                let _ = tx
                    .send(error_response(
                        0,
                        ErrorCode::MalformedFrame,
                        "zero-length frame: every frame carries a JSON request",
                    ))
                    .await;
                continue;
            }
            // Clean close, a frame cut short by EOF, or a broken stream.
            Err(_) => break,
        };
        let request = match parse_request(&bytes) {
            Ok(r) => r,
            Err((id, e)) => {
                let reply = Response {
                    v: reply_version(&bytes),
                    id,
                    body: ResponseBody::Error(e),
                };
                if tx.send(reply).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let (v, id) = (request.v, request.id);
        match request.body {
            RequestBody::Ping => {
                let reply = Response {
                    v,
                    id,
                    body: ResponseBody::Pong {
                        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
                    },
                };
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
            RequestBody::Spawn(spawn) => {
                let server = server.clone();
                let tx = tx.clone();
                let gone = client_gone.subscribe();
                tokio::spawn(spawn_request(
                    server,
                    tx,
                    gone,
                    spawn,
                    peer,
                    connection,
                    (v, id),
                ));
            }
            RequestBody::Cancel(c) => {
                if let Some(cancel) = crate::session::ops::lock_cancels(&cancels).get(&c.target) {
                    let _ = cancel.send(true);
                }
                let reply = Response {
                    v,
                    id,
                    body: ResponseBody::Done {},
                };
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
            body => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    server.sessions.count_request(body.op(), "busy");
                    let reply = error_response(
                        id,
                        ErrorCode::Busy,
                        format!(
                            "this connection already has {} session requests in flight ([sessions] max_requests_per_connection); wait for replies or open another connection",
                            server.sessions.cfg.max_requests_per_connection
                        ),
                    );
                    if tx.send(Response { v, ..reply }).await.is_err() {
                        break;
                    }
                    continue;
                };
                let cancel = crate::session::ops::register_cancel(&cancels, id);
                let replier = crate::session::ops::Replier {
                    tx: tx.clone(),
                    v,
                    id,
                };
                let sessions = server.sessions.clone();
                let cancels = cancels.clone();
                tokio::spawn(async move {
                    crate::session::ops::serve(sessions, body, peer, replier, cancel, cancels)
                        .await;
                    drop(permit);
                });
            }
        }
    }
    // Streamed session requests of this connection stop too.
    for (_, cancel) in crate::session::ops::lock_cancels(&cancels).drain() {
        let _ = cancel.send(true);
    }
    // The client closed (or broke) its side: nobody can receive the replies
    // of its sandboxes still running, so they are killed and cleaned up.
    let _ = client_gone.send(true);
    // In-flight requests keep their own senders; the writer ends after them.
    drop(tx);
    let _ = write_task.await;
}
