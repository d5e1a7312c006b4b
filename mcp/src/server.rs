//! The MCP server: one tool per forkd operation, over one multiplexed
//! connection to the daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use forkd_ipc::{
    AsyncClient, CellResult, ClientError, Command, CommandResult, ErrorCode, Event, RequestStream,
    RunCode, SessionCreate, Stream,
};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{
    CallToolResult, Implementation, JsonObject, ProgressNotificationParam, ServerCapabilities,
    ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};

use crate::args::{self, schema};
use crate::render::{self, tool_error};

/// Label every session created through MCP carries (value: the server's pid).
pub const LABEL: &str = "forkd.mcp";

/// Largest file read_file returns.
pub const MAX_READ_BYTES: u64 = 8 << 20;

type ToolResult = Result<CallToolResult, ErrorData>;

/// Returns the tool error of a failed argument parse.
macro_rules! parse_or_fail {
    ($tool:literal, $args:expr) => {
        match args::parse($tool, $args) {
            Ok(a) => a,
            Err(msg) => return Ok(tool_error(msg)),
        }
    };
}

/// What a failed daemon call tells the model: the daemon's own message
/// (it says what to do), or how to start a daemon that is not there.
fn daemon_error(socket: &Path, e: &ClientError) -> CallToolResult {
    match e {
        ClientError::Connect { source, .. } => tool_error(format!(
            "the forkd daemon is not running (nothing listens on {}: {source}): start it with \
             `sudo forkd` (or `forkd --socket PATH`) and give this MCP server the same path \
             with `forkd mcp --socket PATH` or FORKD_SOCKET; then retry",
            socket.display()
        )),
        ClientError::Server(reply) => {
            tool_error(format!("forkd refused: {} ({})", reply.message, reply.code))
        }
        other => tool_error(format!("forkd call failed: {other}")),
    }
}

/// Runs `work` unless the client cancels the call first (MCP
/// `notifications/cancelled`): then `work` is dropped, which cancels the
/// daemon request (a cell is interrupted, a command killed).
async fn cancellable<T>(
    ctx: &RequestContext<RoleServer>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        r = work => Some(r),
        () = ctx.ct.cancelled() => None,
    }
}

/// Reads a cell's or command's events to its end; with a progress token
/// in the call (the client asked for progress), each chunk of output is
/// sent as it comes as a progress notification whose message is the text
/// (stderr marked `[stderr]`).
async fn stream_events(
    ctx: &RequestContext<RoleServer>,
    stream: &mut RequestStream,
) -> Result<(), ClientError> {
    let token = ctx.meta.get_progress_token();
    let mut chunks: u32 = 0;
    while let Some(event) = stream.next_event().await? {
        let (Some(token), Event::Output { stream, data }) = (&token, event) else {
            continue;
        };
        chunks = chunks.saturating_add(1);
        let text = String::from_utf8_lossy(&data);
        let message = match stream {
            Stream::Stdout => text.into_owned(),
            Stream::Stderr => format!("[stderr] {text}"),
        };
        let note =
            ProgressNotificationParam::new(token.clone(), f64::from(chunks)).with_message(message);
        // A client gone deaf does not stop the work; the result still says it all.
        let _ = ctx.peer.notify_progress(note).await;
    }
    Ok(())
}

/// Runs a cell, streaming its output as progress (see [`stream_events`]).
async fn run_cell(
    client: &AsyncClient,
    req: &RunCode,
    ctx: &RequestContext<RoleServer>,
) -> Result<CellResult, ClientError> {
    let mut stream = client.run_code_stream(req).await?;
    stream_events(ctx, &mut stream).await?;
    stream.cell().await
}

/// Runs a command, streaming its output as progress.
async fn run_shell(
    client: &AsyncClient,
    req: &Command,
    ctx: &RequestContext<RoleServer>,
) -> Result<CommandResult, ClientError> {
    let mut stream = client.command_stream(req).await?;
    stream_events(ctx, &mut stream).await?;
    stream.command().await
}

/// The result of a cancelled call (the client has stopped waiting for it,
/// but it is still a well-formed answer).
fn cancelled(what: &str) -> CallToolResult {
    tool_error(format!("cancelled by the client: {what}"))
}

/// Sessions this server created and must kill when it exits.
#[derive(Debug, Default)]
pub struct Owned(Mutex<BTreeSet<String>>);

impl Owned {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn insert(&self, id: &str) {
        self.lock().insert(id.to_owned());
    }
    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
    fn contains(&self, id: &str) -> bool {
        self.lock().contains(id)
    }
    /// Takes every id (for the kill at exit).
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lock()).into_iter().collect()
    }
}

/// The connection to the daemon, made on first use and again after it broke.
#[derive(Debug)]
pub struct Daemon {
    socket: PathBuf,
    client: tokio::sync::Mutex<Option<AsyncClient>>,
}

impl Daemon {
    /// A daemon at `socket` (not connected yet).
    pub fn new(socket: PathBuf) -> Daemon {
        Daemon {
            socket,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Drops the connection after an error that says it will not serve
    /// again (the next call reconnects: a restarted daemon is found).
    pub async fn forget_if_dead(&self, e: &ClientError) {
        let dead = match e {
            ClientError::Server(reply) => reply.code == ErrorCode::ShuttingDown,
            ClientError::Connect { .. } | ClientError::PermissionDenied { .. } => false,
            _ => true,
        };
        if dead {
            *self.client.lock().await = None;
        }
    }

    /// A live client, connecting when there is none or the last one died.
    pub async fn client(&self) -> Result<AsyncClient, ClientError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = AsyncClient::connect(&self.socket).await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

/// A one-shot session: killed in the background once its call ends (the
/// reply does not wait for the teardown), or when the call is dropped
/// mid-way (the client cancelled it). Until the kill is confirmed its id
/// stays in [`Owned`], so the kill at exit covers a kill still in flight.
struct OneShot {
    client: AsyncClient,
    id: String,
    owned: Arc<Owned>,
}

impl Drop for OneShot {
    fn drop(&mut self) {
        let (client, id, owned) = (
            self.client.clone(),
            std::mem::take(&mut self.id),
            Arc::clone(&self.owned),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if client.session_kill(&id).await.is_ok() {
                    owned.remove(&id);
                }
            });
        }
    }
}

/// forkd's MCP server.
#[derive(Debug, Clone)]
pub struct ForkdMcp {
    daemon: Arc<Daemon>,
    owned: Arc<Owned>,
    tool_router: ToolRouter<ForkdMcp>,
}

impl ForkdMcp {
    /// A server for the daemon at `socket`.
    pub fn new(socket: PathBuf) -> ForkdMcp {
        ForkdMcp {
            daemon: Arc::new(Daemon::new(socket)),
            owned: Arc::new(Owned::default()),
            tool_router: Self::tool_router(),
        }
    }

    /// The sessions to kill at exit (shared with the running server).
    pub fn owned(&self) -> Arc<Owned> {
        Arc::clone(&self.owned)
    }

    /// The daemon connection (shared with the running server).
    pub fn daemon(&self) -> Arc<Daemon> {
        Arc::clone(&self.daemon)
    }

    fn labels(extra: BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut labels = extra;
        labels.insert(LABEL.into(), std::process::id().to_string());
        labels
    }

    async fn connect(&self) -> Result<AsyncClient, CallToolResult> {
        self.daemon
            .client()
            .await
            .map_err(|e| daemon_error(self.daemon.socket(), &e))
    }

    async fn fail(&self, e: &ClientError) -> ToolResult {
        self.daemon.forget_if_dead(e).await;
        Ok(daemon_error(self.daemon.socket(), e))
    }
}

#[tool_router]
impl ForkdMcp {
    #[tool(
        description = "Run Python code in a forkd sandbox (numpy and the zygote's other modules are \
            preloaded). Without session_id it runs once in a fresh, isolated sandbox that is \
            destroyed afterwards; with session_id it runs in that session, whose variables, \
            imports and files persist between calls. Returns stdout, stderr (marked [stderr]), \
            displayed values and the trailing expression's value as text, and figures/PNG \
            displays as images. An exception or timeout is reported as an error result carrying \
            the traceback. Output also streams as progress notifications when the call asks for \
            progress; cancelling the call interrupts the code.",
        input_schema = schema::<args::RunCodeArgs>(),
        annotations(title = "Run Python", read_only_hint = false, destructive_hint = false, open_world_hint = false)
    )]
    async fn run_code(&self, raw: JsonObject, ctx: RequestContext<RoleServer>) -> ToolResult {
        let a: args::RunCodeArgs = parse_or_fail!("run_code", raw);
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        if let Some(session) = a.session_id {
            let req = RunCode {
                session,
                code: a.code,
                timeout_ms: a.timeout_ms,
            };
            return match cancellable(&ctx, run_cell(&client, &req, &ctx)).await {
                Some(Ok(r)) => Ok(render::cell(&r)),
                Some(Err(e)) => self.fail(&e).await,
                None => Ok(cancelled(
                    "the cell was interrupted; the session keeps its state",
                )),
            };
        }
        // One-shot: a session of its own, killed right after (same
        // isolation as a spawn, plus values and figures as results).
        let mut labels = Self::labels(BTreeMap::new());
        labels.insert("forkd.mcp.one_shot".into(), "true".into());
        let info = match client
            .session_create(&SessionCreate {
                labels,
                ttl_ms: a.timeout_ms.map(|t| t.saturating_add(60_000)),
                ..SessionCreate::default()
            })
            .await
        {
            Ok(i) => i,
            Err(e) => return self.fail(&e).await,
        };
        self.owned.insert(&info.session);
        let _kill = OneShot {
            client: client.clone(),
            id: info.session.clone(),
            owned: Arc::clone(&self.owned),
        };
        let req = RunCode {
            session: info.session.clone(),
            code: a.code,
            timeout_ms: a.timeout_ms,
        };
        match cancellable(&ctx, run_cell(&client, &req, &ctx)).await {
            Some(Ok(r)) => Ok(render::cell(&r)),
            Some(Err(e)) => self.fail(&e).await,
            None => Ok(cancelled("the sandbox is discarded")),
        }
    }

    #[tool(
        description = "Start a forkd session: an isolated sandbox that keeps a Python interpreter \
            (state kept between run_code calls), files and a shell. Returns its session_id. \
            Sessions created here are killed when this MCP server exits (its client \
            disconnects), unless keep=true; every session also ends at its TTL (ttl_ms, default \
            the daemon's, 5 min out of the box) or when killed with session_kill.",
        input_schema = schema::<args::SessionCreateArgs>(),
        annotations(title = "Create a session", read_only_hint = false, destructive_hint = false, open_world_hint = false)
    )]
    async fn session_create(&self, raw: JsonObject) -> ToolResult {
        let a: args::SessionCreateArgs = parse_or_fail!("session_create", raw);
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        let req = SessionCreate {
            zygote: a.zygote,
            ttl_ms: a.ttl_ms,
            idle_timeout_ms: a.idle_timeout_ms,
            labels: Self::labels(a.labels),
            ..SessionCreate::default()
        };
        match client.session_create(&req).await {
            Ok(info) => {
                if !a.keep {
                    self.owned.insert(&info.session);
                }
                Ok(render::json(&render::session_json(&info, Some(!a.keep))))
            }
            Err(e) => self.fail(&e).await,
        }
    }

    #[tool(
        description = "List the forkd sessions visible to this user (optionally only those \
            carrying every given label), with state, age, TTL left, cells run, memory, and \
            whether this MCP server will kill them when it exits.",
        input_schema = schema::<args::SessionListArgs>(),
        annotations(title = "List sessions", read_only_hint = true, open_world_hint = false)
    )]
    async fn session_list(&self, raw: JsonObject) -> ToolResult {
        let a: args::SessionListArgs = parse_or_fail!("session_list", raw);
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        match client.session_list(a.labels).await {
            Ok(list) => {
                let rows: Vec<_> = list
                    .iter()
                    .map(|s| render::session_json(s, Some(self.owned.contains(&s.session))))
                    .collect();
                Ok(render::json(&rows))
            }
            Err(e) => self.fail(&e).await,
        }
    }

    #[tool(
        description = "Kill a forkd session (its processes, files and state are gone).",
        input_schema = schema::<args::SessionKillArgs>(),
        annotations(title = "Kill a session", read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn session_kill(&self, raw: JsonObject) -> ToolResult {
        let a: args::SessionKillArgs = parse_or_fail!("session_kill", raw);
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        match client.session_kill(&a.session_id).await {
            Ok(info) => {
                self.owned.remove(&a.session_id);
                Ok(render::json(&render::session_json(&info, None)))
            }
            Err(e) => self.fail(&e).await,
        }
    }

    #[tool(
        description = "Run a shell command (/bin/sh -c) in a session's sandbox. Returns the exit \
            code, then stdout and stderr (marked [stderr]); a non-zero exit, a signal or a \
            timeout is an error result. Output also streams as progress notifications when the \
            call asks for progress; cancelling the call kills the command.",
        input_schema = schema::<args::RunCommandArgs>(),
        annotations(title = "Run a shell command", read_only_hint = false, destructive_hint = true, open_world_hint = false)
    )]
    async fn run_command(&self, raw: JsonObject, ctx: RequestContext<RoleServer>) -> ToolResult {
        let a: args::RunCommandArgs = parse_or_fail!("run_command", raw);
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        let req = Command {
            session: a.session_id,
            cmd: a.command,
            cwd: a.cwd,
            timeout_ms: a.timeout_ms,
            ..Command::default()
        };
        match cancellable(&ctx, run_shell(&client, &req, &ctx)).await {
            Some(Ok(r)) => Ok(render::command(&r)),
            Some(Err(e)) => self.fail(&e).await,
            None => Ok(cancelled("the command was killed")),
        }
    }

    #[tool(
        description = "Write a file in a session's sandbox (created or replaced): text in \
            content, or bytes in content_base64.",
        input_schema = schema::<args::WriteFileArgs>(),
        annotations(title = "Write a file", read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn write_file(&self, raw: JsonObject) -> ToolResult {
        let a: args::WriteFileArgs = parse_or_fail!("write_file", raw);
        let data = match (a.content, a.content_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64.trim())
            {
                Ok(d) => d,
                Err(e) => {
                    return Ok(tool_error(format!(
                        "invalid arguments for write_file: content_base64 is not base64 ({e})"
                    )))
                }
            },
            _ => {
                return Ok(tool_error(
                    "invalid arguments for write_file: give exactly one of content (text) and \
                     content_base64 (bytes)",
                ))
            }
        };
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        match client.write_file(&a.session_id, &a.path, &data, None).await {
            Ok(()) => Ok(CallToolResult::success(vec![
                rmcp::model::ContentBlock::text(format!(
                    "wrote {} bytes to {}",
                    data.len(),
                    a.path
                )),
            ])),
            Err(e) => self.fail(&e).await,
        }
    }

    #[tool(
        description = "Read a file (at most 8 MiB) from a session's sandbox: text as text, \
            PNG/JPEG/GIF as an image, other binary files as base64 text.",
        input_schema = schema::<args::ReadFileArgs>(),
        annotations(title = "Read a file", read_only_hint = true, open_world_hint = false)
    )]
    async fn read_file(&self, raw: JsonObject) -> ToolResult {
        let a: args::ReadFileArgs = parse_or_fail!("read_file", raw);
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        // Bounded: the answer is one JSON line on stdout, and a model's
        // context is smaller still.
        match client.stat_file(&a.session_id, &a.path).await {
            Ok(st) if st.kind != "file" => {
                return Ok(tool_error(format!(
                    "{} is a {}, not a file (list_files lists directories)",
                    a.path, st.kind
                )))
            }
            Ok(st) if st.size > MAX_READ_BYTES => {
                return Ok(tool_error(format!(
                    "{} has {} bytes, more than read_file returns ({MAX_READ_BYTES}): read a part \
                     with run_command (head -c, tail -c, split) or summarize it with run_code",
                    a.path, st.size
                )))
            }
            Ok(_) => {}
            Err(e) => return self.fail(&e).await,
        }
        match client.read_file(&a.session_id, &a.path).await {
            Ok(data) => Ok(render::file(&a.path, &data)),
            Err(e) => self.fail(&e).await,
        }
    }

    #[tool(
        description = "List a directory in a session's sandbox (default: its working directory, \
            /tmp), as JSON entries with name, path, type, size, mode and modified_ms.",
        input_schema = schema::<args::ListFilesArgs>(),
        annotations(title = "List a directory", read_only_hint = true, open_world_hint = false)
    )]
    async fn list_files(&self, raw: JsonObject) -> ToolResult {
        let a: args::ListFilesArgs = parse_or_fail!("list_files", raw);
        let client = match self.connect().await {
            Ok(c) => c,
            Err(r) => return Ok(r),
        };
        let path = a.path.unwrap_or_else(|| ".".into());
        match client.list_files(&a.session_id, &path).await {
            Ok(entries) => Ok(render::entries(&entries)),
            Err(e) => self.fail(&e).await,
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ForkdMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("forkd", env!("CARGO_PKG_VERSION"))
                    .with_title("forkd sandboxes"),
            )
            .with_instructions(
                "Runs Python and shell commands in isolated forkd sandboxes. Use run_code \
                 without a session for one-off code; create a session to keep state, files and \
                 a shell between calls. Sessions created here are killed when this server exits \
                 unless created with keep=true.",
            )
    }
}

/// Kills `ids` (at exit), waiting at most `within` in all; returns how many
/// the daemon confirmed.
pub async fn kill_all(daemon: &Daemon, ids: Vec<String>, within: Duration) -> usize {
    if ids.is_empty() {
        return 0;
    }
    let work = async {
        let Ok(client) = daemon.client().await else {
            return 0;
        };
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let client = client.clone();
            set.spawn(async move { client.session_kill(&id).await.is_ok() });
        }
        let mut killed = 0;
        while let Some(r) = set.join_next().await {
            killed += usize::from(r.unwrap_or(false));
        }
        killed
    };
    tokio::time::timeout(within, work).await.unwrap_or(0)
}
