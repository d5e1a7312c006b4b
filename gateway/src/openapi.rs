//! The OpenAPI document of what the gateway serves, generated from the
//! handlers' `#[utoipa::path]` attributes: the router is built from the same
//! `routes!` lists ([`crate::router`]), so a route cannot be served without
//! being described. `gateway/openapi.json` in the repository is this
//! document; `forkd-gateway --print-openapi` prints it and a test fails when
//! the two differ.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// E2B's error shape: every HTTP error of the control plane, the envd file
/// routes and the code interpreter (and of a forward to another node).
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ErrorBody {
    /// The HTTP status.
    pub code: u16,
    /// What went wrong and what to do.
    pub message: String,
}

/// A Connect RPC error (envd's `process` and `filesystem` services).
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ConnectError {
    /// A Connect code: `invalid_argument`, `not_found`, `unauthenticated`,
    /// `unimplemented`, `unavailable`, ...
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
}

/// The methods of envd's `process.Process` Connect service. `Start` and
/// `Connect` are server streams and `StreamInput` a client stream
/// (`application/connect+proto` or `application/connect+json`); the others
/// are unary (`application/proto` or `application/json`). `Update` (a PTY
/// resize) is refused: forkd commands have no PTY.
#[derive(Debug, ToSchema)]
#[allow(dead_code, reason = "a schema: the names are the served methods")]
pub enum ProcessMethod {
    Start,
    Connect,
    List,
    SendSignal,
    SendInput,
    StreamInput,
    CloseStdin,
    Update,
}

/// The methods of envd's `filesystem.Filesystem` Connect service.
/// `WatchDir` is a server stream; the others are unary.
#[derive(Debug, ToSchema)]
#[allow(dead_code, reason = "a schema: the names are the served methods")]
pub enum FilesystemMethod {
    Stat,
    ListDir,
    MakeDir,
    Move,
    Remove,
    WatchDir,
    CreateWatcher,
    GetWatcherEvents,
    RemoveWatcher,
}

/// A protobuf message or a stream of enveloped messages (Connect framing).
#[derive(Debug, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(#[allow(dead_code, reason = "a schema")] Vec<u8>);

/// The header names the gateway reads for authentication.
pub const API_KEY_HEADER: &str = "X-API-Key";
/// A sandbox's access token (what `envdAccessToken` holds).
pub const ACCESS_TOKEN_HEADER: &str = "X-Access-Token";
/// The same token under E2B's traffic header name.
pub const TRAFFIC_TOKEN_HEADER: &str = "E2B-Traffic-Access-Token";

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "ApiKeyAuth",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                API_KEY_HEADER,
                "The tenant's API key (E2B_API_KEY), one of the --api-keys file. Control plane; \
                 on sandbox routes the owner's key works too.",
            ))),
        );
        c.add_security_scheme(
            "AccessTokenAuth",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                ACCESS_TOKEN_HEADER,
                "The sandbox's envdAccessToken (from create or connect), valid for that sandbox \
                 and this gateway run.",
            ))),
        );
        c.add_security_scheme(
            "TrafficTokenAuth",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                TRAFFIC_TOKEN_HEADER,
                "The same token as X-Access-Token, under E2B's traffic header name.",
            ))),
        );
    }
}

/// The document's fixed part; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "forkd E2B gateway",
        description = "E2B's API (control plane, envd, code interpreter) served by forkd. \
            Point the SDKs at it with E2B_API_URL and E2B_SANDBOX_URL (both this address) and \
            E2B_API_KEY; sandbox calls name their sandbox in the E2b-Sandbox-Id header. \
            Sandbox ids end in `--NODE` when the gateway has a node name; a request for \
            another node's sandbox is forwarded to that node (docs/e2b.md, \"Several nodes\"). \
            GET /openapi.json needs no key.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody, ConnectError, ProcessMethod, FilesystemMethod, Binary)),
    modifiers(&Security),
    tags(
        (name = "control", description = "E2B's REST control plane (X-API-Key)"),
        (name = "envd", description = "envd, port 49983: Connect RPCs, files, health"),
        (name = "interpreter", description = "the code interpreter, port 49999"),
        (name = "gateway", description = "the gateway itself")
    )
)]
pub struct ApiDoc;

/// The document, as served at `/openapi.json` and shipped in
/// `gateway/openapi.json` (pretty JSON with a final newline).
pub fn document() -> utoipa::openapi::OpenApi {
    crate::api_router().split_for_parts().1
}

/// [`document`] as the text of `gateway/openapi.json`.
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "gateway",
    responses((status = 200, description = "This document (no key needed)", body = Object))
)]
pub(crate) async fn serve() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(document_json).clone(),
    )
        .into_response()
}
