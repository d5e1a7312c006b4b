//! An E2B-compatible HTTP gateway in front of a forkd daemon.
//!
//! The unmodified E2B SDKs (`e2b`, `e2b-code-interpreter`) drive it when
//! pointed at it with `E2B_API_URL` and `E2B_SANDBOX_URL` (both this
//! gateway's address) and `E2B_API_KEY`. It is a *client* of the daemon's
//! Unix socket (through [`forkd_ipc::AsyncClient`]): an E2B sandbox is a
//! forkd session, its code-interpreter contexts are further sessions, and
//! its commands and files are the session's `command` and `file_*` calls.
//! The daemon's isolation is untouched; the gateway adds HTTP, API keys and
//! tenants. See `docs/e2b.md` for what is supported.
//!
//! Tenancy: every session the gateway creates carries the label
//! `e2b.tenant`; control-plane calls only see and touch sessions whose label
//! is the caller's tenant, and sandbox-plane calls need the sandbox's access
//! token, which only its tenant receives (see [`auth`]).

pub mod auth;
pub mod connect;
mod control;
mod envd;
pub mod error;
mod fork;
pub mod forward;
mod interp;
pub mod metrics;
pub mod openapi;
pub mod pb;
pub mod time;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use forkd_ipc::{AsyncClient, SessionInfo, SessionState};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Keys, Tokens};
use crate::error::ApiError;

/// The envd port of E2B's scheme (commands, files).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port of E2B's scheme.
pub const JUPYTER_PORT: u16 = 49999;
/// The envd version the gateway reports: the features of envd 0.5.7
/// (default user, octet-stream uploads) without file metadata (0.6.2).
pub const ENVD_VERSION: &str = "0.5.7";

/// A forkd session's E2B state: `running` or `paused`; `None` once it
/// ended. A dormant session (`ended_with_checkpoints`: ended, keeping
/// checkpoints taken with `keep`) is ended here too: nothing of it runs,
/// E2B has no such state, and the gateway never sends `keep` (a client of
/// the daemon's uid can, on a gateway's session), so the E2B API shows it
/// as gone (404) and it holds no place in the tenant's quota.
pub(crate) fn e2b_state(state: SessionState) -> Option<&'static str> {
    match state {
        SessionState::Running => Some("running"),
        SessionState::Paused => Some("paused"),
        SessionState::Ended | SessionState::EndedWithCheckpoints => None,
    }
}

/// Label names on the sessions the gateway creates.
pub mod labels {
    /// The owning tenant.
    pub const TENANT: &str = "e2b.tenant";
    /// `sandbox` or `context`.
    pub const KIND: &str = "e2b.kind";
    /// The E2B template the sandbox was created from.
    pub const TEMPLATE: &str = "e2b.template";
    /// A context's sandbox.
    pub const PARENT: &str = "e2b.parent";
    /// A context's id.
    pub const CONTEXT: &str = "e2b.context";
    /// A context's working directory.
    pub const CWD: &str = "e2b.cwd";
    /// Prefix of E2B metadata keys.
    pub const META: &str = "e2b.meta.";
    /// A fork's source sandbox.
    pub const FORKED_FROM: &str = "e2b.forked_from";
}

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// API key file (`None`: any key is accepted as one tenant).
    pub api_keys: Option<PathBuf>,
    /// Largest `/files` upload, bytes.
    pub max_upload: usize,
    /// Largest JSON or protobuf request body, bytes.
    pub max_body: usize,
    /// E2B template names that mean the daemon's default zygote.
    pub default_templates: Vec<String>,
    /// Longest a cell or command may run when the client sets no deadline.
    /// E2B bounds runs from the client side (its `timeout`); a client that
    /// gives up disconnects, which interrupts the cell. Default: 1 hour.
    pub max_run_ms: u64,
    /// Most sessions (sandboxes and their contexts) one tenant may hold at
    /// once (`None`: only the daemon's own limits apply).
    pub max_sessions_per_tenant: Option<usize>,
    /// Most cells one tenant may run at once, across its sandboxes (`None`:
    /// no bound beyond the daemon's); more are answered 429.
    pub max_cells_per_tenant: Option<usize>,
    /// Most checkpoints one tenant may hold at once, across its sandboxes
    /// (`None`: only the daemon's per-session and per-uid bounds apply).
    pub max_checkpoints_per_tenant: Option<usize>,
    /// A request head must arrive within this (slowloris).
    pub header_timeout: std::time::Duration,
    /// This node's name, carried in the sandbox ids handed out
    /// (`SESSION--NODE`); `None`: ids are bare session ids.
    pub node: Option<String>,
    /// Other nodes' gateways by node name (`http://HOST:PORT`).
    pub peers: BTreeMap<String, String>,
    /// Address of a node not in `peers`, with `{node}` in it.
    pub peer_url: Option<String>,
}

impl Options {
    /// Defaults for a daemon socket.
    pub fn new(socket: PathBuf) -> Self {
        Options {
            socket,
            api_keys: None,
            max_upload: 64 << 20,
            max_body: 1 << 20,
            default_templates: vec!["base".into(), "code-interpreter-v1".into()],
            max_run_ms: 3_600_000,
            max_sessions_per_tenant: None,
            max_cells_per_tenant: None,
            max_checkpoints_per_tenant: None,
            header_timeout: std::time::Duration::from_secs(30),
            node: None,
            peers: BTreeMap::new(),
            peer_url: None,
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The key file is unusable.
    #[error(transparent)]
    Keys(#[from] auth::KeyFileError),
    /// The node name or a peer is unusable.
    #[error(transparent)]
    Peers(#[from] forward::PeerConfigError),
    /// Binding or randomness failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A non-loopback address without `allow_remote`.
    #[error(
        "{0} is not a loopback address: pass --allow-remote to listen on it (and use --api-keys; \
         put TLS in front with a reverse proxy)"
    )]
    NotLoopback(SocketAddr),
}

/// A running command started through envd's `Process.Start`.
pub(crate) struct Proc {
    pub config: pb::ProcessConfig,
    pub tag: Option<String>,
    pub events: tokio::sync::broadcast::Sender<envd::Msg>,
}

/// Shared state of the handlers.
pub struct Gateway {
    opts: Options,
    keys: Keys,
    tokens: Tokens,
    daemon: tokio::sync::Mutex<Option<AsyncClient>>,
    /// Sandbox id → pid → running command.
    procs: Mutex<HashMap<String, HashMap<u32, Arc<Proc>>>>,
    metrics: metrics::Metrics,
    watchers: watch::Watchers,
    /// Cells running now, by tenant (for `max_cells_per_tenant`).
    cells: Arc<Mutex<HashMap<String, usize>>>,
    /// Held while a checkpoint is counted against its tenant's quota and taken.
    checkpoint_lock: tokio::sync::Mutex<()>,
    /// The other nodes (see [`forward`]).
    peers: forward::Peers,
}

/// One running cell of a tenant; its slot frees when this drops (the
/// cell's stream ended, or its client went).
pub(crate) struct CellSlot {
    cells: Arc<Mutex<HashMap<String, usize>>>,
    tenant: String,
}

impl Drop for CellSlot {
    fn drop(&mut self) {
        let mut cells = self
            .cells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = cells.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                cells.remove(&self.tenant);
            }
        }
    }
}

impl Gateway {
    /// State for `opts` (reads the key file).
    pub fn new(opts: Options) -> Result<Arc<Gateway>, StartError> {
        let keys = Keys::open(opts.api_keys.as_deref())?;
        let peers =
            forward::Peers::new(opts.node.as_deref(), &opts.peers, opts.peer_url.as_deref())?;
        let tokens = Tokens::new().map_err(|source| StartError::Io {
            what: "cannot read random bytes for the token secret".into(),
            source,
        })?;
        Ok(Arc::new(Gateway {
            opts,
            keys,
            tokens,
            daemon: tokio::sync::Mutex::new(None),
            procs: Mutex::new(HashMap::new()),
            metrics: metrics::Metrics::default(),
            watchers: watch::Watchers::default(),
            cells: Arc::new(Mutex::new(HashMap::new())),
            checkpoint_lock: tokio::sync::Mutex::new(()),
            peers,
        }))
    }

    /// This gateway's node name (in the sandbox ids it hands out).
    pub fn node(&self) -> Option<&str> {
        self.peers.node()
    }

    /// The API keys (e.g. to reload them).
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection to the daemon (reconnects after it died).
    pub(crate) async fn daemon(&self) -> Result<AsyncClient, ApiError> {
        let mut slot = self.daemon.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = AsyncClient::connect(&self.opts.socket)
            .await
            .map_err(ApiError::from)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A live session of `tenant`'s (of `kind`), or 404.
    pub(crate) async fn owned(
        &self,
        tenant: &str,
        id: &str,
        kind: &str,
    ) -> Result<SessionInfo, ApiError> {
        let c = self.daemon().await?;
        let info = match c.session_info(id).await {
            Ok(i) => i,
            Err(forkd_ipc::ClientError::Server(_)) => return Err(ApiError::sandbox_not_found(id)),
            Err(e) => return Err(e.into()),
        };
        let mine = info.labels.get(labels::TENANT).map(String::as_str) == Some(tenant)
            && info.labels.get(labels::KIND).map(String::as_str) == Some(kind);
        if !mine || e2b_state(info.state).is_none() {
            return Err(ApiError::sandbox_not_found(id));
        }
        Ok(info)
    }

    /// A slot for one more running cell of `tenant`, or 429 when it runs its
    /// quota already.
    pub(crate) fn cell_slot(&self, tenant: &str) -> Result<CellSlot, ApiError> {
        let mut cells = self
            .cells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let running = cells.entry(tenant.to_owned()).or_default();
        if let Some(max) = self.opts.max_cells_per_tenant {
            if *running >= max {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "tenant {tenant} runs {running} cells, its maximum \
                         (max_cells_per_tenant {max}); wait for one to finish"
                    ),
                ));
            }
        }
        *running += 1;
        Ok(CellSlot {
            cells: self.cells.clone(),
            tenant: tenant.to_owned(),
        })
    }

    /// 429 when `tenant` already holds its quota of sessions.
    pub(crate) async fn admit(&self, tenant: &str) -> Result<(), ApiError> {
        let Some(max) = self.opts.max_sessions_per_tenant else {
            return Ok(());
        };
        let c = self.daemon().await?;
        let l = BTreeMap::from([(labels::TENANT.to_owned(), tenant.to_owned())]);
        let held = c
            .session_list(l)
            .await?
            .iter()
            .filter(|s| e2b_state(s.state).is_some())
            .count();
        if held >= max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "tenant {tenant} holds {held} sandboxes and contexts, its maximum \
                     (--max-sessions-per-tenant {max}); kill some first"
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn procs_of(&self, sandbox: &str) -> Vec<(u32, Arc<Proc>)> {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sandbox)
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    pub(crate) fn add_proc(&self, sandbox: &str, pid: u32, p: Arc<Proc>) {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(sandbox.to_owned())
            .or_default()
            .insert(pid, p);
    }

    pub(crate) fn remove_proc(&self, sandbox: &str, pid: u32) {
        let mut all = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = all.get_mut(sandbox) {
            m.remove(&pid);
            if m.is_empty() {
                all.remove(sandbox);
            }
        }
    }
}

/// The caller's tenant, from `X-API-KEY` (control plane).
pub(crate) struct Tenant(pub String);

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

impl FromRequestParts<Arc<Gateway>> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gw: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let Some(key) = header(&parts.headers, "x-api-key").filter(|k| !k.is_empty()) else {
            return Err(ApiError::unauthorized(
                "missing API key: set E2B_API_KEY (sent as the X-API-KEY header)",
            ));
        };
        gw.keys
            .tenant(key)
            .map(Tenant)
            .ok_or_else(|| ApiError::unauthorized("invalid API key"))
    }
}

/// The sandbox a sandbox-plane request names (`E2b-Sandbox-Id`), checked
/// against its access token (`X-Access-Token` or
/// `E2B-Traffic-Access-Token`), or the owner's API key.
pub(crate) struct Sandbox {
    pub id: String,
    /// Its tenant (from the token's MAC or the owner's key).
    pub tenant: String,
}

impl FromRequestParts<Arc<Gateway>> for Sandbox {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        gw: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let h = &parts.headers;
        let Some(id) = header(h, "e2b-sandbox-id").filter(|s| !s.is_empty()) else {
            return Err(ApiError::bad_request(
                "missing E2b-Sandbox-Id header: sandbox calls name their sandbox in it \
                 (set E2B_SANDBOX_URL to this gateway)",
            ));
        };
        if let Some(port) = header(h, "e2b-sandbox-port") {
            if port != ENVD_PORT.to_string() && port != JUPYTER_PORT.to_string() {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "port {port} is not open: forkd sandboxes serve only envd ({ENVD_PORT}) \
                         and the code interpreter ({JUPYTER_PORT}); they have no public ports"
                    ),
                ));
            }
        }
        let token = header(h, "x-access-token").or_else(|| header(h, "e2b-traffic-access-token"));
        if let Some(t) = token {
            if let Some(tenant) = gw.tokens.check(id, t) {
                return Ok(Sandbox {
                    id: id.to_owned(),
                    tenant,
                });
            }
            return Err(ApiError::unauthorized(
                "invalid access token for this sandbox (tokens are per sandbox and per gateway \
                 run: Sandbox.connect() gives a fresh one)",
            ));
        }
        if let Some(key) = header(h, "x-api-key") {
            if let Some(tenant) = gw.keys.tenant(key) {
                gw.owned(&tenant, id, "sandbox").await?;
                return Ok(Sandbox {
                    id: id.to_owned(),
                    tenant,
                });
            }
        }
        Err(ApiError::unauthorized(
            "missing access token: send X-Access-Token (from the create response) or the \
             owner's X-API-KEY",
        ))
    }
}

/// Maps `e2b.meta.*` labels back to E2B metadata.
pub(crate) fn metadata_of(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(labels::META)
                .map(|k| (k.to_owned(), v.clone()))
        })
        .collect()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route in the forkd E2B gateway (see docs/e2b.md for what it serves)",
    )
}

/// The documented routes: everything the gateway serves but the `/files`
/// pair (which has its own body limit) and the fallback.
fn api_routes() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        // Control plane (E2B REST API).
        .routes(routes!(control::create_v2, control::list))
        .routes(routes!(control::create, control::list_v1))
        .routes(routes!(control::info, control::kill))
        .routes(routes!(control::set_timeout))
        .routes(routes!(control::metrics))
        .routes(routes!(control::pause))
        .routes(routes!(control::resume))
        .routes(routes!(control::connect))
        .routes(routes!(control::connect_v2))
        .routes(routes!(fork::fork))
        .routes(routes!(fork::create_snapshot))
        .routes(routes!(fork::list_snapshots))
        // forkd's checkpoints (an extension of E2B's API).
        .routes(routes!(fork::checkpoint, fork::checkpoints))
        .routes(routes!(fork::delete_checkpoint))
        .routes(routes!(fork::restore))
        // envd (port 49983): Connect RPCs, health.
        .routes(routes!(envd::process))
        .routes(routes!(envd::filesystem))
        .routes(routes!(envd::health))
        // Code interpreter (port 49999).
        .routes(routes!(interp::execute))
        .routes(routes!(interp::create_context, interp::list_contexts))
        .routes(routes!(interp::remove_context))
        .routes(routes!(interp::restart_context))
        .routes(routes!(openapi::serve))
}

/// envd's file routes (uploads have their own, larger, body limit).
fn file_routes() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::new().routes(routes!(envd::download, envd::upload))
}

/// Every route with its description: what [`openapi::document`] reads.
pub(crate) fn api_router() -> OpenApiRouter<Arc<Gateway>> {
    api_routes().merge(file_routes())
}

/// The gateway's routes, behind the forward to other nodes ([`forward`]).
pub fn router(gw: Arc<Gateway>) -> Router {
    let files = file_routes().layer(DefaultBodyLimit::max(gw.opts.max_upload));
    let (routes, _) = api_routes().merge(files).split_for_parts();
    let local = routes
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(gw.opts.max_body))
        .layer(axum::middleware::from_fn_with_state(
            gw.clone(),
            metrics::track,
        ))
        .with_state(gw.clone());
    // The forward looks at the request before routing: it rewrites a local
    // sandbox id to the daemon's session id, which routing then sees.
    Router::new()
        .fallback_service(local)
        .layer(axum::middleware::from_fn_with_state(gw, forward::forward))
}

/// Serves any router on `listener` (e.g. [`metrics_router`]) until the task
/// is dropped.
pub async fn serve_router(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app).await
}

/// The metrics listener's routes (`GET /metrics`, Prometheus text format).
pub fn metrics_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::serve_metrics))
        .with_state(gw)
}

/// Serves on `listener` until `shutdown` resolves; reloads the key file on
/// SIGHUP. Connections are HTTP/1.1 (what the SDKs speak to a plain-HTTP
/// URL) with `TCP_NODELAY` (a response goes out in pieces: head, then body
/// chunks; with Nagle each later piece waits for the client's delayed ACK,
/// 40 ms) and a deadline for the request head (a client that trickles its
/// headers, slowloris, is cut off). On shutdown, open requests get
/// [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let reload = gw.clone();
    let hup = tokio::spawn(async move {
        let Ok(mut sig) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while sig.recv().await.is_some() {
            match reload.keys.reload() {
                Ok(n) => tracing::info!(keys = n, "gateway: API keys reloaded"),
                Err(e) => tracing::error!("gateway: API keys NOT reloaded (old keys stay): {e}"),
            }
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(gw.opts.header_timeout));
    let app = router(gw);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // E.g. out of file descriptors: back off, keep serving.
                    tracing::warn!("gateway: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("gateway: TCP_NODELAY not set: {e}");
        }
        let svc = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("gateway: connection ended: {e}");
            }
        });
    }
    drop(listener);
    hup.abort();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("gateway: requests still open after {SHUTDOWN_GRACE:?}; dropping them");
    }
    Ok(())
}

/// How long open requests may finish after shutdown is asked for.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `addr` (loopback unless `allow_remote`), warning when a remote
/// address has no keys.
pub async fn bind(
    gw: &Gateway,
    addr: SocketAddr,
    allow_remote: bool,
) -> Result<tokio::net::TcpListener, StartError> {
    if !addr.ip().is_loopback() {
        if !allow_remote {
            return Err(StartError::NotLoopback(addr));
        }
        if !gw.keys.enforced() {
            tracing::warn!(
                "gateway listens on {addr} without --api-keys: anyone who can reach it runs code"
            );
        }
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Io {
            what: if source.kind() == std::io::ErrorKind::AddrInUse {
                format!("cannot listen on {addr} (another process listens there: stop it or choose another address)")
            } else {
                format!("cannot listen on {addr}")
            },
            source,
        })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]
mod tests {
    use super::*;

    /// Every daemon state maps to E2B's: a dormant session is gone, as an
    /// ended one (E2B has no state for it).
    #[test]
    fn session_states_map_to_e2b_states() {
        for (state, want) in [
            (SessionState::Running, Some("running")),
            (SessionState::Paused, Some("paused")),
            (SessionState::Ended, None),
            (SessionState::EndedWithCheckpoints, None),
        ] {
            assert_eq!(e2b_state(state), want, "{state:?}");
        }
        // The wire spelling the daemon sends for the dormant state.
        let dormant: SessionState = serde_json::from_str("\"ended_with_checkpoints\"").unwrap();
        assert_eq!(e2b_state(dormant), None);
    }

    #[test]
    fn a_tenant_runs_at_most_its_quota_of_cells_and_a_finished_cell_frees_its_slot() {
        let mut opts = Options::new(PathBuf::from("/nonexistent.sock"));
        opts.max_cells_per_tenant = Some(2);
        let gw = Gateway::new(opts).unwrap();
        let a1 = gw.cell_slot("alice").unwrap();
        let _a2 = gw.cell_slot("alice").unwrap();
        let Err(refused) = gw.cell_slot("alice") else {
            panic!("a third cell of alice was admitted");
        };
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.message.contains("max_cells_per_tenant 2"));
        // Another tenant is unaffected.
        let _b = gw.cell_slot("bob").unwrap();
        drop(a1);
        let _a3 = gw.cell_slot("alice").unwrap();
    }
}
