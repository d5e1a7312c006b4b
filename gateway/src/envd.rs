//! envd (E2B port 49983): the `process.Process` and `filesystem.Filesystem`
//! Connect services, `/files` upload and download, and `/health`, served
//! from the session's `command` and `file_*` calls.
//!
//! A started command runs in a task of its own that owns the daemon stream
//! and broadcasts its events, so the HTTP stream that started it can go
//! away (E2B's `background=True`) and `Process.Connect` can attach later;
//! the command ends with its own exit, its timeout or the sandbox.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkd_ipc::{ClientError, Command, ErrorCode, Event, FileEntry, Stream};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::connect::{end_stream, Code, Codec, RpcError};
use crate::error::ApiError;
use crate::{pb, Gateway, Proc, Sandbox};

/// What a command's task broadcasts.
#[derive(Clone, Debug)]
pub(crate) enum Msg {
    /// An envd process event.
    Event(pb::Event),
    /// The command could not run.
    Failed(Code, String),
}

/// A file error from the daemon as a Connect error (missing → not_found).
pub(crate) fn file_error(e: ClientError) -> RpcError {
    if let ClientError::Server(r) = &e {
        let m = r.message.to_ascii_lowercase();
        if r.code == ErrorCode::NotFound || m.contains("no such file") || m.contains("not found") {
            return RpcError::new(Code::NotFound, r.message.clone());
        }
        if m.contains("file exists") {
            return RpcError::new(Code::AlreadyExists, r.message.clone());
        }
        if matches!(r.code, ErrorCode::SessionEnded | ErrorCode::UnknownSession) {
            return RpcError::new(
                Code::Unavailable,
                format!("sandbox was not found: {}", r.message),
            );
        }
    }
    e.into()
}

/// `sh` quoting of one word.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn shell_line(cfg: &pb::ProcessConfig) -> String {
    std::iter::once(cfg.cmd.as_str())
        .chain(cfg.args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn permissions(kind: &str, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        "dir" => 'd',
        "symlink" => 'L',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn entry(e: &FileEntry) -> pb::EntryInfo {
    let ms = i64::try_from(e.modified_ms).unwrap_or(i64::MAX);
    pb::EntryInfo {
        name: e.name.clone(),
        r#type: match e.kind.as_str() {
            "file" => 1,
            "dir" => 2,
            "symlink" => 3,
            _ => 0,
        },
        path: e.path.clone(),
        size: i64::try_from(e.size).unwrap_or(i64::MAX),
        mode: e.mode,
        permissions: permissions(&e.kind, e.mode),
        owner: String::new(),
        group: String::new(),
        modified_time: Some(pb::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        }),
        symlink_target: None,
        metadata: Default::default(),
        is_symlink: e.kind == "symlink",
    }
}

/// Deepest `ListDir` walked.
const MAX_DEPTH: u32 = 16;

#[utoipa::path(post, path = "/filesystem.Filesystem/{method}", tag = "envd", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])),
    params(("method" = crate::openapi::FilesystemMethod, Path, description = "The RPC"), ("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    request_body(description = "One protobuf or JSON message (unary), or one enveloped message (WatchDir)", content(
        (crate::openapi::Binary = "application/proto"), (Object = "application/json"),
        (crate::openapi::Binary = "application/connect+proto"), (Object = "application/connect+json"))),
    responses(
        (status = 200, description = "The answer, or for WatchDir a stream of enveloped events", content(
            (crate::openapi::Binary = "application/proto"), (Object = "application/json"),
            (crate::openapi::Binary = "application/connect+proto"), (Object = "application/connect+json"))),
        (status = "4XX", description = "A unary call's Connect error", body = crate::openapi::ConnectError),
        (status = 502, description = "Another node's sandbox whose node is unknown or down", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn filesystem(
    State(gw): State<Arc<Gateway>>,
    Path(method): Path<String>,
    sb: Sandbox,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == "WatchDir" {
        return watch_dir(gw, sb, &headers, &body).await;
    }
    let codec = match Codec::of(&headers, false) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match fs_call(&gw, &sb.id, &method, codec, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn fs_call(
    gw: &Gateway,
    id: &str,
    method: &str,
    codec: Codec,
    body: &[u8],
) -> Result<Response, RpcError> {
    let c = gw.daemon().await?;
    match method {
        "Stat" => {
            let r: pb::PathRequest = codec.decode(body)?;
            let e = c.stat_file(id, &r.path).await.map_err(file_error)?;
            Ok(codec.unary(&pb::EntryResponse {
                entry: Some(entry(&e)),
            }))
        }
        "ListDir" => {
            let r: pb::ListDirRequest = codec.decode(body)?;
            let depth = r.depth.clamp(1, MAX_DEPTH);
            let mut out = Vec::new();
            let mut todo = vec![(r.path.clone(), 1u32)];
            while let Some((dir, level)) = todo.pop() {
                for e in c.list_files(id, &dir).await.map_err(file_error)? {
                    if e.kind == "dir" && level < depth {
                        todo.push((e.path.clone(), level + 1));
                    }
                    out.push(entry(&e));
                }
            }
            Ok(codec.unary(&pb::ListDirResponse { entries: out }))
        }
        "MakeDir" => {
            let r: pb::PathRequest = codec.decode(body)?;
            if c.stat_file(id, &r.path).await.is_ok() {
                return Err(RpcError::new(
                    Code::AlreadyExists,
                    format!("{} already exists", r.path),
                ));
            }
            c.make_dir(id, &r.path).await.map_err(file_error)?;
            let e = c.stat_file(id, &r.path).await.map_err(file_error)?;
            Ok(codec.unary(&pb::EntryResponse {
                entry: Some(entry(&e)),
            }))
        }
        "Remove" => {
            let r: pb::PathRequest = codec.decode(body)?;
            c.stat_file(id, &r.path).await.map_err(file_error)?;
            c.remove_file(id, &r.path).await.map_err(file_error)?;
            Ok(codec.unary(&pb::Empty {}))
        }
        "Move" => {
            let r: pb::MoveRequest = codec.decode(body)?;
            c.stat_file(id, &r.source).await.map_err(file_error)?;
            // The daemon has no rename: `mv` inside the sandbox does it with
            // the sandbox's own rights.
            let res = c
                .command(&Command {
                    session: id.to_owned(),
                    cmd: format!("mv -f -- {} {}", quote(&r.source), quote(&r.destination)),
                    timeout_ms: Some(30_000),
                    ..Default::default()
                })
                .await?;
            if res.exit_code != Some(0) {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    format!(
                        "cannot move: {}",
                        String::from_utf8_lossy(&res.stderr).trim()
                    ),
                ));
            }
            let e = c.stat_file(id, &r.destination).await.map_err(file_error)?;
            Ok(codec.unary(&pb::EntryResponse {
                entry: Some(entry(&e)),
            }))
        }
        "CreateWatcher" => {
            let r: pb::CreateWatcherRequest = codec.decode(body)?;
            let watcher_id = gw.watchers.create(&c, id, &r).await?;
            Ok(codec.unary(&pb::WatcherId { watcher_id }))
        }
        "GetWatcherEvents" => {
            let r: pb::WatcherId = codec.decode(body)?;
            let events = gw.watchers.events(&c, id, &r.watcher_id).await?;
            Ok(codec.unary(&pb::GetWatcherEventsResponse { events }))
        }
        "RemoveWatcher" => {
            let r: pb::WatcherId = codec.decode(body)?;
            gw.watchers.remove(id, &r.watcher_id)?;
            Ok(codec.unary(&pb::Empty {}))
        }

        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} does not exist"),
        )),
    }
}

/// How often a streaming `WatchDir` polls the directory.
const WATCH_POLL: Duration = Duration::from_millis(500);

/// Removes a streaming watch's watcher when its stream goes away.
struct WatchGuard {
    gw: Arc<Gateway>,
    sandbox: String,
    id: String,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.gw.watchers.remove(&self.sandbox, &self.id);
    }
}

/// `WatchDir`: a server stream of the changes the watcher sees, polled.
async fn watch_dir(gw: Arc<Gateway>, sb: Sandbox, headers: &HeaderMap, body: &[u8]) -> Response {
    let codec = match Codec::of(headers, true) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let req: pb::CreateWatcherRequest = match codec.unenvelope(body) {
        Ok(r) => r,
        Err(e) => return codec.stream_error(e),
    };
    let c = match gw.daemon().await {
        Ok(c) => c,
        Err(e) => return codec.stream_error(e.into()),
    };
    let id = match gw.watchers.create(&c, &sb.id, &req).await {
        Ok(id) => id,
        Err(e) => return codec.stream_error(e),
    };
    let guard = WatchGuard {
        gw: gw.clone(),
        sandbox: sb.id.clone(),
        id,
    };
    let ka = keepalive(headers).unwrap_or(Duration::from_secs(50));
    let start = pb::WatchDirResponse {
        event: Some(pb::WatchEvent::Start(pb::Empty {})),
    };
    let first = codec.envelope(&start);
    let state = (guard, c, Some(first), tokio::time::Instant::now(), false);
    let frames =
        futures_util::stream::unfold(state, move |(g, c, first, mut last, done)| async move {
            if done {
                return None;
            }
            if let Some(f) = first {
                return Some((Ok::<_, Infallible>(f), (g, c, None, last, false)));
            }
            loop {
                tokio::time::sleep(WATCH_POLL).await;
                match g.gw.watchers.events(&c, &g.sandbox, &g.id).await {
                    Ok(events) if !events.is_empty() => {
                        let mut out = Vec::new();
                        for e in events {
                            let m = pb::WatchDirResponse {
                                event: Some(pb::WatchEvent::Filesystem(Box::new(e))),
                            };
                            out.extend_from_slice(&codec.envelope(&m));
                        }
                        last = tokio::time::Instant::now();
                        return Some((Ok(Bytes::from(out)), (g, c, None, last, false)));
                    }
                    Ok(_) if last.elapsed() >= ka => {
                        let m = pb::WatchDirResponse {
                            event: Some(pb::WatchEvent::Keepalive(pb::KeepAlive {})),
                        };
                        last = tokio::time::Instant::now();
                        return Some((Ok(codec.envelope(&m)), (g, c, None, last, false)));
                    }
                    Ok(_) => {}
                    Err(e) => return Some((Ok(end_stream(Some(&e))), (g, c, None, last, true))),
                }
            }
        });
    codec.stream(frames)
}

/// Seconds between keep-alive events when the client asks for them.
fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    let s: u64 = headers
        .get("keepalive-ping-interval")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (s > 0).then(|| Duration::from_secs(s))
}

/// The stream of envelopes a client sees from `rx`: `first` (if any), the
/// events, keep-alives, and the end.
fn event_stream(
    codec: Codec,
    first: Option<pb::Event>,
    rx: broadcast::Receiver<Msg>,
    ka: Option<Duration>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    struct St {
        first: Option<pb::Event>,
        rx: broadcast::Receiver<Msg>,
        ka: Option<tokio::time::Interval>,
        done: bool,
    }
    let ka = ka.map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let st = St {
        first,
        rx,
        ka,
        done: false,
    };
    futures_util::stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(ev) = st.first.take() {
            return Some((Ok(codec.envelope(&pb::StreamResponse::of(ev))), st));
        }
        loop {
            let msg = match st.ka.as_mut() {
                Some(i) => tokio::select! {
                    m = st.rx.recv() => m,
                    _ = i.tick() => {
                        let ka = pb::StreamResponse::of(pb::Event::Keepalive(pb::KeepAlive {}));
                        return Some((Ok(codec.envelope(&ka)), st));
                    }
                },
                None => st.rx.recv().await,
            };
            match msg {
                Ok(Msg::Event(ev)) => {
                    let end = matches!(ev, pb::Event::End(_));
                    let mut out = codec.envelope(&pb::StreamResponse::of(ev)).to_vec();
                    if end {
                        out.extend_from_slice(&end_stream(None));
                        st.done = true;
                    }
                    return Some((Ok(Bytes::from(out)), st));
                }
                Ok(Msg::Failed(code, m)) => {
                    st.done = true;
                    return Some((Ok(end_stream(Some(&RpcError::new(code, m)))), st));
                }
                // A slow reader lost some output; keep going.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    st.done = true;
                    return Some((Ok(end_stream(None)), st));
                }
            }
        }
    })
}

fn end_event(r: &forkd_ipc::CommandResult) -> pb::Event {
    let (exit_code, exited, status, error) = match (r.exit_code, r.signal) {
        (Some(code), _) => (code, true, format!("exit status {code}"), None),
        (None, Some(sig)) => {
            let what = if r.timed_out {
                "killed at its timeout".to_owned()
            } else {
                format!("signal {sig}")
            };
            (-1, false, format!("signal: {sig}"), Some(what))
        }
        (None, None) => (
            -1,
            false,
            "unknown".into(),
            Some("ended without a status".into()),
        ),
    };
    pb::Event::End(pb::EndEvent {
        exit_code,
        exited,
        status,
        error,
    })
}

/// Runs the command of `req` in `sandbox`, broadcasting on `tx`.
async fn run_command(
    gw: Arc<Gateway>,
    sandbox: String,
    req: pb::StartRequest,
    timeout_ms: u64,
    tx: broadcast::Sender<Msg>,
) {
    let cfg = req.process.unwrap_or_default();
    let fail = |code: Code, m: String| {
        let _ = tx.send(Msg::Failed(code, m));
    };
    let c = match gw.daemon().await {
        Ok(c) => c,
        Err(e) => return fail(Code::Unavailable, e.message),
    };
    let cmd = Command {
        session: sandbox.clone(),
        cmd: shell_line(&cfg),
        cwd: cfg.cwd.clone().filter(|s| !s.is_empty()),
        env: cfg.envs.clone().into_iter().collect(),
        timeout_ms: Some(timeout_ms),
        // envd's default when the field is absent (older SDKs) is on.
        stdin: req.stdin.unwrap_or(true),
    };
    let mut stream = match c.command_stream(&cmd).await {
        Ok(s) => s,
        Err(e) => {
            let e = RpcError::from(e);
            return fail(e.code, e.message);
        }
    };
    let mut pid = None;
    loop {
        match stream.next_event().await {
            Ok(Some(Event::CommandStarted { pid: p })) => {
                pid = Some(p);
                gw.add_proc(
                    &sandbox,
                    p,
                    Arc::new(Proc {
                        config: cfg.clone(),
                        tag: req.tag.clone(),
                        events: tx.clone(),
                    }),
                );
                let _ = tx.send(Msg::Event(pb::Event::Start(pb::StartEvent { pid: p })));
            }
            Ok(Some(Event::Output { stream: s, data })) => {
                let out = match s {
                    Stream::Stdout => pb::Output::Stdout(data),
                    Stream::Stderr => pb::Output::Stderr(data),
                };
                let _ = tx.send(Msg::Event(pb::Event::Data(pb::DataEvent {
                    output: Some(out),
                })));
            }
            Ok(Some(Event::Display(_))) => {}
            Ok(None) => break,
            Err(e) => {
                if let Some(p) = pid {
                    gw.remove_proc(&sandbox, p);
                }
                let e = RpcError::from(e);
                return fail(e.code, e.message);
            }
        }
    }
    let result = stream.command().await;
    if let Some(p) = pid {
        gw.remove_proc(&sandbox, p);
    }
    match result {
        Ok(r) => {
            let _ = tx.send(Msg::Event(end_event(&r)));
        }
        Err(ClientError::Server(r))
            if matches!(r.code, ErrorCode::SessionEnded | ErrorCode::UnknownSession) =>
        {
            fail(
                Code::Unavailable,
                format!("sandbox {sandbox} was not found: {}", r.message),
            );
        }
        Err(e) => {
            let e = RpcError::from(e);
            fail(e.code, e.message);
        }
    }
}

fn selected(
    gw: &Gateway,
    sandbox: &str,
    sel: Option<pb::ProcessSelector>,
) -> Result<(u32, Arc<Proc>), RpcError> {
    let procs = gw.procs_of(sandbox);
    let found = match sel.and_then(|s| s.selector) {
        Some(pb::Selector::Pid(pid)) => procs.into_iter().find(|(p, _)| *p == pid),
        Some(pb::Selector::Tag(tag)) => procs
            .into_iter()
            .find(|(_, p)| p.tag.as_deref() == Some(tag.as_str())),
        None => {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "process selector (pid or tag) is required",
            ))
        }
    };
    found.ok_or_else(|| RpcError::new(Code::NotFound, "no such running process in this sandbox"))
}

/// Sends `input` (stdin bytes) to the selected process of `sandbox`, then
/// closes its stdin if `eof`.
async fn send_input(
    gw: &Gateway,
    sandbox: &str,
    sel: Option<pb::ProcessSelector>,
    input: Option<pb::ProcessInput>,
    eof: bool,
) -> Result<(), RpcError> {
    let (pid, _) = selected(gw, sandbox, sel)?;
    let data = match input.and_then(|i| i.input) {
        Some(pb::Input::Stdin(d)) => d,
        Some(pb::Input::Pty(_)) => {
            return Err(RpcError::new(
                Code::Unimplemented,
                "PTY input: forkd commands have no PTY (see docs/e2b.md)",
            ))
        }
        None if eof => Vec::new(),
        None => {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "input.stdin is required",
            ))
        }
    };
    let c = gw.daemon().await?;
    c.command_input(sandbox, pid, &data, eof)
        .await
        .map_err(input_error)
}

/// `StreamInput` (a client stream): a start event naming the process, then
/// data events, each passed on as it arrives (the body is read as a stream:
/// each message is bounded, the stream is not).
async fn stream_input(
    gw: &Gateway,
    sandbox: &str,
    codec: Codec,
    body: axum::body::Body,
) -> Result<(), RpcError> {
    use futures_util::StreamExt;
    let mut frames = body.into_data_stream();
    let mut buf = Vec::new();
    let mut sel: Option<Option<pb::ProcessSelector>> = None;
    loop {
        while let Some(n) = Codec::next_envelope(&buf)? {
            let msg: pb::StreamInputRequest = codec.unenvelope(&buf[..n])?;
            buf.drain(..n);
            match (msg.event, &sel) {
                (Some(pb::InputEvent::Start(s)), None) => sel = Some(s.process),
                (Some(pb::InputEvent::Start(_)), Some(_)) => {
                    return Err(RpcError::new(
                        Code::InvalidArgument,
                        "the input stream has a second start event",
                    ))
                }
                (_, None) => {
                    return Err(RpcError::new(
                        Code::InvalidArgument,
                        "the input stream must begin with a start event naming the process",
                    ))
                }
                (Some(pb::InputEvent::Data(d)), Some(s)) => {
                    send_input(gw, sandbox, s.clone(), d.input, false).await?;
                }
                (Some(pb::InputEvent::Keepalive(_)) | None, Some(_)) => {}
            }
        }
        match frames.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => {
                return Err(RpcError::new(
                    Code::Canceled,
                    format!("the input stream broke off: {e}"),
                ))
            }
            None => break,
        }
    }
    if !buf.is_empty() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "malformed envelope: the input stream ended inside a message",
        ));
    }
    if sel.is_none() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "the input stream must begin with a start event naming the process",
        ));
    }
    Ok(())
}

/// The daemon's answer to `command_input` as envd's: a process that ended
/// (or never was) is not found; a stdin that is closed or was never asked
/// for is a failed precondition.
fn input_error(e: ClientError) -> RpcError {
    match &e {
        ClientError::Server(r) if r.code == ErrorCode::NotFound => {
            RpcError::new(Code::NotFound, r.message.clone())
        }
        ClientError::Server(r) if r.code == ErrorCode::InvalidRequest => {
            RpcError::new(Code::FailedPrecondition, r.message.clone())
        }
        _ => e.into(),
    }
}

#[utoipa::path(post, path = "/process.Process/{method}", tag = "envd", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])),
    params(("method" = crate::openapi::ProcessMethod, Path, description = "The RPC"), ("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    request_body(description = "One protobuf or JSON message (unary), one enveloped message (server streams), or enveloped messages back to back (StreamInput: a start event, then data events)", content(
        (crate::openapi::Binary = "application/connect+proto"), (Object = "application/connect+json"),
        (crate::openapi::Binary = "application/proto"), (Object = "application/json"))),
    responses(
        (status = 200, description = "The answer, or for Start, Connect and StreamInput enveloped messages ending in an end-of-stream message", content(
            (crate::openapi::Binary = "application/connect+proto"), (Object = "application/connect+json"),
            (crate::openapi::Binary = "application/proto"), (Object = "application/json"))),
        (status = "4XX", description = "A unary call's Connect error", body = crate::openapi::ConnectError),
        (status = 502, description = "Another node's sandbox whose node is unknown or down", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn process(
    State(gw): State<Arc<Gateway>>,
    Path(method): Path<String>,
    sb: Sandbox,
    headers: HeaderMap,
    raw: axum::body::Body,
) -> Response {
    let streaming = matches!(method.as_str(), "Start" | "Connect" | "StreamInput");
    let codec = match Codec::of(&headers, streaming) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if method == "StreamInput" {
        return match stream_input(&gw, &sb.id, codec, raw).await {
            Ok(()) => {
                let mut out = codec.envelope(&pb::Empty {}).to_vec();
                out.extend_from_slice(&end_stream(None));
                codec.stream(futures_util::stream::iter([Ok(Bytes::from(out))]))
            }
            Err(e) => codec.stream_error(e),
        };
    }
    // Every other call is one bounded message.
    let body = match axum::body::to_bytes(raw, gw.opts.max_body).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body could not be read or is over {} bytes: {e}",
                    gw.opts.max_body
                ),
            )
            .into_response()
        }
    };
    let ka = keepalive(&headers);
    match method.as_str() {
        "Start" => {
            let req: pb::StartRequest = match codec.unenvelope(&body) {
                Ok(r) => r,
                Err(e) => return codec.stream_error(e),
            };
            if req.pty.is_some() {
                return codec.stream_error(RpcError::new(
                    Code::Unimplemented,
                    "PTYs are not supported by the forkd gateway (see docs/e2b.md)",
                ));
            }
            if req.process.as_ref().map_or(true, |p| p.cmd.is_empty()) {
                return codec.stream_error(RpcError::new(
                    Code::InvalidArgument,
                    "process.cmd is required",
                ));
            }
            // The client's deadline bounds the command, as the stream's.
            let timeout_ms = headers
                .get("connect-timeout-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|t| *t > 0)
                .unwrap_or(gw.opts.max_run_ms);
            let (tx, rx) = broadcast::channel(1024);
            tokio::spawn(run_command(gw.clone(), sb.id.clone(), req, timeout_ms, tx));
            codec.stream(event_stream(codec, None, rx, ka))
        }
        "Connect" => {
            let req: pb::ConnectRequest = match codec.unenvelope(&body) {
                Ok(r) => r,
                Err(e) => return codec.stream_error(e),
            };
            match selected(&gw, &sb.id, req.process) {
                Ok((pid, p)) => {
                    let rx = p.events.subscribe();
                    let start = pb::Event::Start(pb::StartEvent { pid });
                    codec.stream(event_stream(codec, Some(start), rx, ka))
                }
                Err(e) => codec.stream_error(e),
            }
        }
        "List" => {
            if let Err(e) = codec.decode::<pb::ListRequest>(&body) {
                return e.into_response();
            }
            let processes = gw
                .procs_of(&sb.id)
                .into_iter()
                .map(|(pid, p)| pb::ProcessInfo {
                    config: Some(p.config.clone()),
                    pid,
                    tag: p.tag.clone(),
                })
                .collect();
            codec.unary(&pb::ListResponse { processes })
        }
        "SendSignal" => {
            let req: pb::SendSignalRequest = match codec.decode(&body) {
                Ok(r) => r,
                Err(e) => return e.into_response(),
            };
            if req.signal != 9 && req.signal != 15 {
                return RpcError::new(Code::InvalidArgument, "signal must be SIGKILL or SIGTERM")
                    .into_response();
            }
            let pid = match selected(&gw, &sb.id, req.process) {
                Ok((pid, _)) => pid,
                Err(e) => return e.into_response(),
            };
            let r = match gw.daemon().await {
                Ok(c) => c.command_kill(&sb.id, pid).await.map_err(RpcError::from),
                Err(e) => Err(e.into()),
            };
            match r {
                Ok(()) => codec.unary(&pb::Empty {}),
                Err(e) => e.into_response(),
            }
        }
        "SendInput" => {
            let req: pb::SendInputRequest = match codec.decode(&body) {
                Ok(r) => r,
                Err(e) => return e.into_response(),
            };
            match send_input(&gw, &sb.id, req.process, req.input, false).await {
                Ok(()) => codec.unary(&pb::Empty {}),
                Err(e) => e.into_response(),
            }
        }
        "CloseStdin" => {
            let req: pb::ProcessRef = match codec.decode(&body) {
                Ok(r) => r,
                Err(e) => return e.into_response(),
            };
            match send_input(&gw, &sb.id, req.process, None, true).await {
                Ok(()) => codec.unary(&pb::Empty {}),
                Err(e) => e.into_response(),
            }
        }
        "Update" => RpcError::new(
            Code::Unimplemented,
            "process.Process/Update resizes a PTY: forkd commands have no PTY (see docs/e2b.md)",
        )
        .into_response(),
        other => RpcError::new(
            Code::Unimplemented,
            format!("process.Process/{other} does not exist"),
        )
        .into_response(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct FileQuery {
    path: Option<String>,
}

/// An envd HTTP error (`{"code", "message"}`).
fn http_error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).into_response()
}

fn file_status(code: Code) -> StatusCode {
    match code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        other => other.http(),
    }
}

fn file_http_error(e: ClientError) -> Response {
    let r = file_error(e);
    http_error(file_status(r.code), r.message)
}

#[utoipa::path(get, path = "/files", tag = "envd", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])),
    params(("path" = String, Query, description = "The file in the sandbox"), ("username" = Option<String>, Query, description = "Ignored: sandboxes have one user"), ("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    responses(
        (status = 200, description = "The file's bytes", content((crate::openapi::Binary = "application/octet-stream"))),
        (status = 400, description = "No path, or a directory", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 404, description = "No such file", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn download(
    State(gw): State<Arc<Gateway>>,
    sb: Sandbox,
    q: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(path) = q.ok().and_then(|Query(q)| q.path).filter(|p| !p.is_empty()) else {
        return http_error(
            StatusCode::BAD_REQUEST,
            "the path query parameter is required",
        );
    };
    let c = match gw.daemon().await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    match c.stat_file(&sb.id, &path).await {
        Ok(e) if e.kind == "dir" => {
            return http_error(StatusCode::BAD_REQUEST, format!("{path} is a directory"))
        }
        Ok(_) => {}
        Err(e) => return file_http_error(e),
    }
    match c.read_file(&sb.id, &path).await {
        Ok(data) => ([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response(),
        Err(e) => file_http_error(e),
    }
}

async fn write_one(
    gw: &Gateway,
    sandbox: &str,
    path: &str,
    data: &[u8],
) -> Result<Value, Response> {
    let c = gw.daemon().await.map_err(IntoResponse::into_response)?;
    if let Err(e) = c.write_file(sandbox, path, data, None).await {
        // envd makes missing parent directories; so do we, then retry once.
        let parent = std::path::Path::new(path).parent().and_then(|p| p.to_str());
        match (file_error(e), parent) {
            (r, Some(dir)) if r.code == Code::NotFound && !dir.is_empty() => {
                c.make_dir(sandbox, dir).await.map_err(file_http_error)?;
                c.write_file(sandbox, path, data, None)
                    .await
                    .map_err(file_http_error)?;
            }
            (r, _) => return Err(http_error(file_status(r.code), r.message)),
        }
    }
    let e = c.stat_file(sandbox, path).await.map_err(file_http_error)?;
    Ok(json!({"name": e.name, "type": "file", "path": e.path}))
}

#[utoipa::path(post, path = "/files", tag = "envd", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])),
    params(("path" = Option<String>, Query, description = "Where to write (else each multipart part's file name)"), ("username" = Option<String>, Query, description = "Ignored: sandboxes have one user"), ("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    request_body(description = "The file(s): multipart/form-data parts named `file`, or the raw bytes", content(
        (crate::openapi::Binary = "multipart/form-data"), (crate::openapi::Binary = "application/octet-stream"))),
    responses(
        (status = 200, description = "`EntryInfo` list (name, type, path) of what was written", body = Vec<Object>),
        (status = 400, description = "No path or a malformed body", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 413, description = "Larger than --max-upload", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn upload(
    State(gw): State<Arc<Gateway>>,
    sb: Sandbox,
    q: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Response {
    let qpath = q.ok().and_then(|Query(q)| q.path).filter(|p| !p.is_empty());
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if req.headers().get(header::CONTENT_ENCODING).is_some() {
        return http_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads are not supported: write without gzip",
        );
    }
    let mut written = Vec::new();
    if ct.starts_with("multipart/form-data") {
        let mut mp = match Multipart::from_request(req, &()).await {
            Ok(m) => m,
            Err(e) => return http_error(StatusCode::BAD_REQUEST, e.body_text()),
        };
        let mut files = Vec::new();
        loop {
            match mp.next_field().await {
                Ok(Some(f)) => {
                    let name = f.file_name().map(str::to_owned);
                    match f.bytes().await {
                        Ok(b) => files.push((name, b)),
                        Err(e) => return http_error(e.status(), e.body_text()),
                    }
                }
                Ok(None) => break,
                Err(e) => return http_error(e.status(), e.body_text()),
            }
        }
        let single = files.len() == 1;
        for (name, data) in files {
            let path =
                match (single, &qpath, name) {
                    (true, Some(p), _) => p.clone(),
                    (_, _, Some(n)) if !n.is_empty() => n,
                    _ => return http_error(
                        StatusCode::BAD_REQUEST,
                        "each file part needs a filename (its path), or pass ?path= for one file",
                    ),
                };
            match write_one(&gw, &sb.id, &path, &data).await {
                Ok(v) => written.push(v),
                Err(r) => return r,
            }
        }
    } else if ct.starts_with("application/octet-stream") {
        let Some(path) = qpath else {
            return http_error(
                StatusCode::BAD_REQUEST,
                "the path query parameter is required",
            );
        };
        let data = match Bytes::from_request(req, &()).await {
            Ok(b) => b,
            Err(e) => return http_error(e.status(), e.body_text()),
        };
        match write_one(&gw, &sb.id, &path, &data).await {
            Ok(v) => written.push(v),
            Err(r) => return r,
        }
    } else {
        return http_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "upload as multipart/form-data or application/octet-stream",
        );
    }
    Json(written).into_response()
}

#[utoipa::path(get, path = "/health", tag = "envd", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])), params(("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    responses(
        (status = 204, description = "The sandbox is alive"),
        (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox has ended, or is on a node that is unknown or down", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn health(State(gw): State<Arc<Gateway>>, sb: Sandbox) -> Response {
    let alive = match gw.daemon().await {
        Ok(c) => c.session_info(&sb.id).await.ok().map(|i| i.state),
        Err(e) => return e.into_response(),
    };
    match alive {
        Some(forkd_ipc::SessionState::Running) | Some(forkd_ipc::SessionState::Paused) => {
            StatusCode::NO_CONTENT.into_response()
        }
        _ => http_error(
            StatusCode::BAD_GATEWAY,
            format!(
                "sandbox {} was not found: it was killed or timed out",
                sb.id
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_quoted_for_sh() {
        let cfg = pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), "echo 'a b' $X".into()],
            ..Default::default()
        };
        assert_eq!(shell_line(&cfg), r#"/bin/bash -l -c 'echo '\''a b'\'' $X'"#);
        assert_eq!(quote(""), "''");
        assert_eq!(permissions("dir", 0o755), "drwxr-xr-x");
        assert_eq!(permissions("file", 0o640), "-rw-r-----");
    }
}
