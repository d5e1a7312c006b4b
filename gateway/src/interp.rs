//! The code interpreter (E2B port 49999): `/execute` streams one JSON
//! object per line (`stdout`, `stderr`, `result`, `error`,
//! `number_of_executions`, `end_of_execution`) exactly as
//! `e2b_code_interpreter`'s `parse_output` reads them; contexts are extra
//! forkd sessions of the same tenant, zygote and TTL, labelled with their
//! sandbox.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkd_ipc::{CellResult, DisplayData, Event, RunCode, SessionCreate, SessionInfo, Stream};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::control::body;
use crate::error::ApiError;
use crate::{labels, Gateway, Sandbox};

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub(crate) struct ExecuteRequest {
    code: String,
    context_id: Option<String>,
    language: Option<String>,
    env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub(crate) struct CreateContext {
    language: Option<String>,
    cwd: Option<String>,
}

/// Refuses languages other than Python.
fn check_language(lang: Option<&str>) -> Result<(), ApiError> {
    match lang.map(str::to_ascii_lowercase).as_deref() {
        None | Some("python") | Some("python3") => Ok(()),
        Some(other) => Err(ApiError::bad_request(format!(
            "language {other:?} is not supported: forkd sandboxes run Python only \
             (leave language unset or use \"python\")"
        ))),
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Splits a byte stream into valid UTF-8 text, carrying an incomplete
/// trailing sequence over to the next chunk.
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, data: &[u8]) -> String {
        self.0.extend_from_slice(data);
        let keep = match std::str::from_utf8(&self.0) {
            Ok(_) => 0,
            Err(e) if e.error_len().is_none() => self.0.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let tail = self.0.split_off(self.0.len() - keep);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = tail;
        text
    }
}

/// A rich value as the SDK's `Result(**data)`.
fn result_line(d: &DisplayData, main: bool) -> Value {
    let mut m = Map::new();
    let mut extra = Map::new();
    for (mime, v) in &d.data {
        let key = match mime.as_str() {
            "text/plain" => "text",
            "text/html" => "html",
            "text/markdown" => "markdown",
            "image/svg+xml" => "svg",
            "image/png" => "png",
            "image/jpeg" => "jpeg",
            "application/pdf" => "pdf",
            "text/latex" => "latex",
            "application/javascript" => "javascript",
            "application/json" => {
                let parsed = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
                m.insert("json".into(), parsed);
                continue;
            }
            other => {
                extra.insert(other.to_owned(), Value::String(v.clone()));
                continue;
            }
        };
        m.insert(key.into(), Value::String(v.clone()));
    }
    m.insert("type".into(), json!("result"));
    m.insert("is_main_result".into(), json!(main || d.main));
    if !extra.is_empty() {
        m.insert("extra".into(), Value::Object(extra));
    }
    Value::Object(m)
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// The lines of a cell's end: results not streamed yet, its error, the
/// execution count and the end marker.
fn final_lines(cell: &CellResult, streamed_displays: usize) -> Vec<Bytes> {
    let mut out: Vec<Bytes> = cell
        .results
        .iter()
        .skip(streamed_displays)
        .map(|d| line(&result_line(d, d.main)))
        .collect();
    if let Some(e) = &cell.error {
        out.push(line(&json!({
            "type": "error", "name": e.name, "value": e.value, "traceback": e.traceback,
        })));
    }
    out.push(line(
        &json!({"type": "number_of_executions", "execution_count": cell.execution_count}),
    ));
    out.push(line(&json!({"type": "end_of_execution"})));
    out
}

struct Lines {
    stdout: Utf8Carry,
    stderr: Utf8Carry,
    displays: usize,
}

impl Lines {
    fn of(&mut self, ev: Event) -> Option<Bytes> {
        match ev {
            Event::Output { stream, data } => {
                let (kind, carry) = match stream {
                    Stream::Stdout => ("stdout", &mut self.stdout),
                    Stream::Stderr => ("stderr", &mut self.stderr),
                };
                let text = carry.push(&data);
                (!text.is_empty())
                    .then(|| line(&json!({"type": kind, "text": text, "timestamp": now_ns()})))
            }
            Event::Display(d) => {
                self.displays += 1;
                Some(line(&result_line(&d, false)))
            }
            Event::CommandStarted { .. } => None,
        }
    }
}

impl Gateway {
    /// The session a context id names in `sandbox` (the sandbox itself for
    /// none, `default`, `python` or its own id).
    async fn context_session(&self, sb: &Sandbox, ctx: Option<&str>) -> Result<String, ApiError> {
        let sandbox = sb.id.as_str();
        let Some(ctx) = ctx.filter(|c| !["default", "python", sandbox].contains(c)) else {
            return Ok(sandbox.to_owned());
        };
        let c = self.daemon().await?;
        let l = BTreeMap::from([
            (labels::TENANT.to_owned(), sb.tenant.clone()),
            (labels::KIND.to_owned(), "context".to_owned()),
            (labels::PARENT.to_owned(), sandbox.to_owned()),
            (labels::CONTEXT.to_owned(), ctx.to_owned()),
        ]);
        let found = c.session_list(l).await?;
        found
            .into_iter()
            .find(|s| crate::e2b_state(s.state).is_some())
            .map(|s| s.session)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("context {ctx} not found in this sandbox"),
                )
            })
    }
}

#[utoipa::path(post, path = "/execute", tag = "interpreter", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])), params(("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "NDJSON events as the cell runs: stdout, stderr, result (text, html, png, json, ...), error, number_of_executions, end_of_execution", content((String = "application/x-ndjson"))),
        (status = 400, description = "Malformed body or a language other than Python", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 404, description = "No such context", body = crate::openapi::ErrorBody),
        (status = 429, description = "The tenant runs its quota of cells", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn execute(
    State(gw): State<Arc<Gateway>>,
    sb: Sandbox,
    b: Result<Json<ExecuteRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(b)?;
    check_language(req.language.as_deref())?;
    let slot = gw.cell_slot(&sb.tenant)?;
    let session = gw.context_session(&sb, req.context_id.as_deref()).await?;
    let c = gw.daemon().await?;
    let envs = req.env_vars.clone().unwrap_or_default();
    let restore = if envs.is_empty() {
        None
    } else {
        Some(with_envs(&c, &session, &envs).await?)
    };
    let mut stream = c
        .run_code_stream(&RunCode {
            session: session.clone(),
            code: req.code,
            timeout_ms: Some(gw.opts.max_run_ms),
        })
        .await?;
    let mut lines = Lines {
        stdout: Utf8Carry::default(),
        stderr: Utf8Carry::default(),
        displays: 0,
    };
    // The first event decides the status: a daemon refusal (ended or paused
    // sandbox) is an HTTP error, not a 200 stream.
    let first = stream.next_event().await;
    if first.is_err() {
        if let Some(code) = &restore {
            run_quietly(&c, &session, code).await;
        }
    }
    let first = match first {
        Ok(Some(ev)) => lines.of(ev),
        Ok(None) => None,
        Err(forkd_ipc::ClientError::Server(e))
            if matches!(
                e.code,
                forkd_ipc::ErrorCode::SessionEnded | forkd_ipc::ErrorCode::UnknownSession
            ) =>
        {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "sandbox {} was not found: it was killed or timed out",
                    sb.id
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        pump(stream, first, lines, tx).await;
        if let Some(code) = restore {
            run_quietly(&c, &session, &code).await;
        }
        drop(slot);
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Sends a cell's events and end to `tx` until the cell ends or the client
/// goes (dropping `stream` then interrupts the cell).
async fn pump(
    mut stream: forkd_ipc::RequestStream,
    first: Option<Bytes>,
    mut lines: Lines,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    if let Some(l) = first {
        if tx.send(l).await.is_err() {
            return;
        }
    }
    loop {
        match stream.next_event().await {
            Ok(Some(ev)) => {
                if let Some(l) = lines.of(ev) {
                    if tx.send(l).await.is_err() {
                        return;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx
                    .send(line(&json!({
                        "type": "error", "name": "ForkdError", "value": e.to_string(), "traceback": "",
                    })))
                    .await;
                return;
            }
        }
    }
    let displays = lines.displays;
    let end = match stream.cell().await {
        Ok(cell) => final_lines(&cell, displays),
        Err(e) => vec![line(&json!({
            "type": "error", "name": "ForkdError", "value": e.to_string(), "traceback": "",
        }))],
    };
    // One chunk: the end arrives in one write, not one per line.
    let _ = tx.send(Bytes::from(end.concat())).await;
}

/// Name of the interpreter global that holds the variables a cell's
/// `env_vars` replaced.
const SAVED_ENV: &str = "__forkd_e2b_saved_env";

/// Sets `envs` in the interpreter for the next cell (E2B's per-execution
/// `env_vars`) and returns the code that puts the old values back.
async fn with_envs(
    c: &forkd_ipc::AsyncClient,
    session: &str,
    envs: &BTreeMap<String, String>,
) -> Result<String, ApiError> {
    let map = json!(envs).to_string();
    let setup = format!(
        "import os as __forkd_os\n{SAVED_ENV} = {{k: __forkd_os.environ.get(k) for k in {map}}}\n\
         __forkd_os.environ.update({map})\ndel __forkd_os"
    );
    let r = c
        .run_code(&RunCode {
            session: session.to_owned(),
            code: setup,
            timeout_ms: Some(10_000),
        })
        .await?;
    if let Some(e) = r.error {
        return Err(ApiError::bad_request(format!(
            "cannot set env_vars: {}: {}",
            e.name, e.value
        )));
    }
    Ok(format!(
        "import os as __forkd_os\nfor __forkd_k, __forkd_v in {SAVED_ENV}.items():\n    \
         __forkd_os.environ.pop(__forkd_k, None) if __forkd_v is None \
         else __forkd_os.environ.__setitem__(__forkd_k, __forkd_v)\n\
         del __forkd_os, __forkd_k, __forkd_v, {SAVED_ENV}"
    ))
}

/// Runs a helper cell, logging (not reporting) a failure.
async fn run_quietly(c: &forkd_ipc::AsyncClient, session: &str, code: &str) {
    let r = c
        .run_code(&RunCode {
            session: session.to_owned(),
            code: code.to_owned(),
            timeout_ms: Some(10_000),
        })
        .await;
    match r {
        Ok(cell) if cell.error.is_none() => {}
        Ok(cell) => tracing::warn!("gateway: restoring env_vars failed: {:?}", cell.error),
        Err(e) => tracing::warn!("gateway: restoring env_vars failed: {e}"),
    }
}

/// A code context as the SDK reads it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Context {
    /// Its id (the sandbox's own id for the default context).
    id: String,
    /// Always `python`.
    language: String,
    /// Its working directory.
    cwd: String,
}

fn context_json(id: &str, cwd: &str) -> Context {
    Context {
        id: id.to_owned(),
        language: "python".to_owned(),
        cwd: cwd.to_owned(),
    }
}

/// The sandbox's working directory (the session's).
const DEFAULT_CWD: &str = "/tmp";

async fn new_context(
    gw: &Gateway,
    parent: &SessionInfo,
    ctx_id: &str,
    cwd: &str,
) -> Result<(), ApiError> {
    let tenant = parent
        .labels
        .get(labels::TENANT)
        .cloned()
        .unwrap_or_default();
    let l = BTreeMap::from([
        (labels::TENANT.to_owned(), tenant),
        (labels::KIND.to_owned(), "context".to_owned()),
        (labels::PARENT.to_owned(), parent.session.clone()),
        (labels::CONTEXT.to_owned(), ctx_id.to_owned()),
        (labels::CWD.to_owned(), cwd.to_owned()),
    ]);
    let c = gw.daemon().await?;
    let info = c
        .session_create(&SessionCreate {
            zygote: Some(parent.zygote.clone()),
            ttl_ms: Some(parent.ttl_left_ms.max(1000)),
            labels: l,
            ..Default::default()
        })
        .await?;
    if cwd != DEFAULT_CWD {
        let code = format!(
            "import os as __forkd_os\n__forkd_os.chdir({})\ndel __forkd_os",
            json!(cwd)
        );
        let r = c
            .run_code(&RunCode {
                session: info.session.clone(),
                code,
                timeout_ms: Some(10_000),
            })
            .await?;
        if let Some(e) = r.error {
            let _ = c.session_kill(&info.session).await;
            return Err(ApiError::bad_request(format!(
                "cannot use cwd {cwd:?}: {}: {}",
                e.name, e.value
            )));
        }
    }
    Ok(())
}

async fn parent_info(gw: &Gateway, sandbox: &str) -> Result<SessionInfo, ApiError> {
    let c = gw.daemon().await?;
    let info = c
        .session_info(sandbox)
        .await
        .map_err(|_| ApiError::sandbox_not_found(sandbox))?;
    if crate::e2b_state(info.state).is_none() {
        return Err(ApiError::sandbox_not_found(sandbox));
    }
    Ok(info)
}

fn fresh_id() -> Result<String, ApiError> {
    let mut b = [0u8; 12];
    getrandom::getrandom(&mut b).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no randomness: {e}"),
        )
    })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[utoipa::path(post, path = "/contexts", tag = "interpreter", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])), params(("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    request_body = CreateContext,
    responses(
        (status = 200, description = "The new context", body = Context),
        (status = 400, description = "Malformed body or a language other than Python", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn create_context(
    State(gw): State<Arc<Gateway>>,
    sb: Sandbox,
    b: Result<Json<CreateContext>, JsonRejection>,
) -> Result<Json<Context>, ApiError> {
    let req = body(b)?;
    check_language(req.language.as_deref())?;
    let parent = parent_info(&gw, &sb.id).await?;
    gw.admit(&sb.tenant).await?;
    let cwd = req.cwd.unwrap_or_else(|| DEFAULT_CWD.to_owned());
    let id = fresh_id()?;
    new_context(&gw, &parent, &id, &cwd).await?;
    Ok(Json(context_json(&id, &cwd)))
}

#[utoipa::path(get, path = "/contexts", tag = "interpreter", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])), params(("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    responses(
        (status = 200, description = "The sandbox's contexts, the default one first", body = Vec<Context>),
        (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn list_contexts(
    State(gw): State<Arc<Gateway>>,
    sb: Sandbox,
) -> Result<Json<Vec<Context>>, ApiError> {
    parent_info(&gw, &sb.id).await?;
    let tenant = &sb.tenant;
    let mut out = vec![context_json(&sb.id, DEFAULT_CWD)];
    for s in gw.contexts_of(tenant, &sb.id).await? {
        if let Some(id) = s.labels.get(labels::CONTEXT) {
            let cwd = s
                .labels
                .get(labels::CWD)
                .map_or(DEFAULT_CWD, String::as_str);
            out.push(context_json(id, cwd));
        }
    }
    Ok(Json(out))
}

#[utoipa::path(delete, path = "/contexts/{id}", tag = "interpreter", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The context id"), ("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 404, description = "No such context", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn remove_context(
    State(gw): State<Arc<Gateway>>,
    sb: Sandbox,
    Path(ctx): Path<String>,
) -> Result<StatusCode, ApiError> {
    let session = gw.context_session(&sb, Some(&ctx)).await?;
    if session == sb.id {
        return Err(ApiError::bad_request(
            "the default context lives as long as its sandbox; kill the sandbox instead",
        ));
    }
    gw.daemon().await?.session_kill(&session).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/contexts/{id}/restart", tag = "interpreter", security(("AccessTokenAuth" = []), ("TrafficTokenAuth" = []), ("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The context id"), ("E2b-Sandbox-Id" = String, Header, description = "The sandbox (`s-HEX` or `s-HEX--NODE`)"), ("E2b-Sandbox-Port" = Option<String>, Header, description = "49983 (envd) or 49999 (code interpreter); any other port is refused with 502")),
    responses(
        (status = 204, description = "Restarted: a fresh interpreter with the same id"),
        (status = 401, description = "Missing or invalid access token or key", body = crate::openapi::ErrorBody), (status = 404, description = "No such context", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn restart_context(
    State(gw): State<Arc<Gateway>>,
    sb: Sandbox,
    Path(ctx): Path<String>,
) -> Result<StatusCode, ApiError> {
    let session = gw.context_session(&sb, Some(&ctx)).await?;
    if session == sb.id {
        return Err(ApiError::unsupported(
            "restarting the default context (create a context with create_code_context and \
             restart that)",
        ));
    }
    let c = gw.daemon().await?;
    let old = c.session_info(&session).await?;
    let cwd = old
        .labels
        .get(labels::CWD)
        .cloned()
        .unwrap_or_else(|| DEFAULT_CWD.into());
    let parent = parent_info(&gw, &sb.id).await?;
    c.session_kill(&session).await?;
    new_context(&gw, &parent, &ctx, &cwd).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let mut c = Utf8Carry::default();
        let s = "é€".as_bytes();
        assert_eq!(c.push(&s[..1]), "");
        assert_eq!(c.push(&s[1..3]), "é");
        assert_eq!(c.push(&s[3..]), "€");
        assert_eq!(c.push(b"\xff ok"), "\u{fffd} ok");
    }

    #[test]
    fn results_map_mime_types_to_the_sdks_fields() {
        let d = DisplayData {
            data: BTreeMap::from([
                ("text/plain".into(), "42".into()),
                ("image/png".into(), "iVBO".into()),
                ("application/json".into(), "{\"a\": 1}".into()),
                ("application/x-custom".into(), "z".into()),
            ]),
            main: true,
        };
        let v = result_line(&d, false);
        assert_eq!(v["type"], "result");
        assert_eq!(v["text"], "42");
        assert_eq!(v["png"], "iVBO");
        assert_eq!(v["json"]["a"], 1);
        assert_eq!(v["extra"]["application/x-custom"], "z");
        assert_eq!(v["is_main_result"], true);
        assert!(check_language(Some("javascript")).is_err());
        assert!(check_language(Some("Python")).is_ok());
    }
}
