//! E2B's `fork()` on forkd's branch, E2B's snapshots (refused: forkd has no
//! sandbox templates made from a running sandbox), and forkd's checkpoints
//! as an HTTP extension (`/sandboxes/{id}/checkpoints`, `.../restore`).
//!
//! A fork is a branch: a live copy of the sandbox's interpreter and scratch
//! in a sandbox of its own, made without stopping the source. Unlike an E2B
//! fork it lives below its source: killing the source ends its forks, and a
//! fork cannot itself be forked (docs/branch.md).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkd_ipc::{CheckpointInfo, ClientError, ErrorCode, SessionBranch};
use serde::{Deserialize, Serialize};

use crate::control::{body, SandboxModel};
use crate::error::ApiError;
use crate::{labels, Gateway, Tenant};

/// Most forks one request may ask for (E2B's bound).
const MAX_FORKS: u32 = 20;

/// What forkd offers instead of E2B snapshots.
const NO_SNAPSHOTS: &str = "forkd has no snapshots that new sandboxes start from. \
     Use sandbox.fork() for live copies of a sandbox (forkd's branch), or forkd's \
     checkpoint extension to save a sandbox's state and go back to it in place: \
     POST /sandboxes/{id}/checkpoints, then POST /sandboxes/{id}/restore \
     (see docs/e2b.md)";

/// E2B's `SandboxForkRequest`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub(crate) struct ForkRequest {
    /// Seconds the forks live (default: the source's remaining timeout).
    timeout: Option<u64>,
    /// How many forks (1 to 20, default 1).
    count: Option<u32>,
}

/// E2B's `SandboxForkResult`: a fork, or why it could not be made.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<SandboxModel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<crate::openapi::ErrorBody>,
}

impl ForkResult {
    fn failed(status: StatusCode, message: String) -> Self {
        ForkResult {
            sandbox: None,
            error: Some(crate::openapi::ErrorBody {
                code: status.as_u16(),
                message,
            }),
        }
    }
}

/// Sessions `tenant` holds now (sandboxes and contexts).
async fn held(gw: &Gateway, tenant: &str) -> Result<usize, ApiError> {
    let c = gw.daemon().await?;
    let l = BTreeMap::from([(labels::TENANT.to_owned(), tenant.to_owned())]);
    Ok(c.session_list(l)
        .await?
        .iter()
        .filter(|s| crate::e2b_state(s.state).is_some())
        .count())
}

/// A branch error as E2B's, saying what forkd allows.
fn branch_error(e: ClientError) -> ApiError {
    match &e {
        ClientError::Server(r) if r.code == ErrorCode::SessionPaused => ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "forkd cannot fork a paused sandbox: connect (resume) it first ({})",
                r.message
            ),
        ),
        _ => e.into(),
    }
}

#[utoipa::path(post, path = "/sandboxes/{id}/fork", tag = "control", security(("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    request_body = ForkRequest,
    responses(
        (status = 201, description = "One result per fork asked for: a sandbox (a forkd branch of the source), or why that fork was not made (429 over the tenant's quota)", body = Vec<ForkResult>),
        (status = 400, description = "Malformed body, a count outside 1..20, or a source forkd cannot branch (a fork, a sandbox with a workspace)", body = crate::openapi::ErrorBody),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such sandbox of this tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The sandbox is paused", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn fork(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    b: Result<Json<ForkRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(b)?;
    let count = req.count.unwrap_or(1);
    if !(1..=MAX_FORKS).contains(&count) {
        return Err(ApiError::bad_request(format!(
            "count must be between 1 and {MAX_FORKS}, got {count}"
        )));
    }
    if req.timeout == Some(0) {
        return Err(ApiError::bad_request("timeout must be at least 1 second"));
    }
    let src = gw.owned(&tenant, &id, "sandbox").await?;
    // The tenant's quota: forks beyond it are per-fork 429s, as E2B's are.
    let room = match gw.opts.max_sessions_per_tenant {
        Some(max) => {
            u32::try_from(max.saturating_sub(held(&gw, &tenant).await?)).unwrap_or(u32::MAX)
        }
        None => u32::MAX,
    };
    let made = count.min(room);
    let mut results = Vec::with_capacity(count as usize);
    if made > 0 {
        let mut l = src.labels.clone();
        l.insert(labels::FORKED_FROM.to_owned(), id.clone());
        let c = gw.daemon().await?;
        let forks = c
            .session_branch(SessionBranch {
                session: id.clone(),
                count: made,
                same_seed: false,
                force: false,
                labels: Some(l),
            })
            .await
            .map_err(branch_error)?;
        for info in forks {
            let info = match req.timeout {
                Some(t) => match c
                    .session_set_ttl(&info.session, t.saturating_mul(1000))
                    .await
                {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = c.session_kill(&info.session).await;
                        let e = ApiError::from(e);
                        results.push(ForkResult::failed(e.status, e.message));
                        continue;
                    }
                },
                None => info,
            };
            tracing::info!(
                target: "forkd_gateway::audit",
                %tenant,
                sandbox = %info.session,
                source = %id,
                "sandbox forked"
            );
            results.push(ForkResult {
                sandbox: Some(gw.sandbox_json(&info)),
                error: None,
            });
        }
    }
    for _ in made..count {
        let max = gw.opts.max_sessions_per_tenant.unwrap_or(0);
        results.push(ForkResult::failed(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "tenant {tenant} holds its maximum of sandboxes and contexts \
                 (--max-sessions-per-tenant {max}); kill some first"
            ),
        ));
    }
    Ok((StatusCode::CREATED, Json(results)).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/snapshots", tag = "control", security(("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The sandbox id")),
    responses(
        (status = 400, description = "Always: forkd has no snapshots new sandboxes start from; the message names fork() and the checkpoint extension", body = crate::openapi::ErrorBody),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such sandbox of this tenant", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn create_snapshot(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    gw.owned(&tenant, &id, "sandbox").await?;
    Err(ApiError::bad_request(NO_SNAPSHOTS))
}

#[utoipa::path(get, path = "/snapshots", tag = "control", security(("ApiKeyAuth" = [])),
    responses(
        (status = 200, description = "Always empty: forkd keeps no snapshots (see POST /sandboxes/{id}/snapshots)", body = Vec<Object>),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn list_snapshots(Tenant(_tenant): Tenant) -> Json<Vec<serde_json::Value>> {
    Json(Vec::new())
}

/// forkd's `CheckpointInfo` in the gateway's JSON style.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Checkpoint {
    /// Its id: name it in `POST /sandboxes/{id}/restore`.
    #[serde(rename = "checkpointID")]
    checkpoint_id: String,
    /// The sandbox it belongs to.
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    /// Milliseconds since it was taken.
    age_ms: u64,
    /// Bytes of scratch (`/tmp`, `/dev/shm`) it holds.
    scratch_bytes: u64,
    /// Times it was restored.
    restores: u64,
}

impl Gateway {
    fn checkpoint_json(&self, c: &CheckpointInfo) -> Checkpoint {
        Checkpoint {
            checkpoint_id: c.checkpoint.clone(),
            sandbox_id: self.peers.external_id(&c.session),
            age_ms: c.age_ms,
            scratch_bytes: c.scratch_bytes,
            restores: c.restores,
        }
    }
}

/// Body of `POST /sandboxes/{id}/checkpoints`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub(crate) struct NewCheckpoint {
    /// Checkpoint although the interpreter runs threads of its own (the
    /// copy keeps only the thread that forks).
    force: bool,
}

/// Body of `POST /sandboxes/{id}/restore`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub(crate) struct RestoreBody {
    /// The checkpoint to go back to.
    #[serde(rename = "checkpointID")]
    checkpoint_id: String,
}

#[utoipa::path(post, path = "/sandboxes/{id}/checkpoints", tag = "forkd", security(("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The sandbox id")),
    request_body(content = NewCheckpoint, description = "Optional (`{}` by default)"),
    responses(
        (status = 201, description = "Taken: a frozen copy of the sandbox's interpreter and scratch, kept inside the sandbox until deleted or the sandbox ends", body = Checkpoint),
        (status = 400, description = "Malformed body, or a sandbox forkd cannot checkpoint (threads without force, a workspace)", body = crate::openapi::ErrorBody),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such sandbox of this tenant", body = crate::openapi::ErrorBody),
        (status = 409, description = "The sandbox is paused", body = crate::openapi::ErrorBody),
        (status = 429, description = "The tenant holds its quota of checkpoints (or the daemon's per-session or per-uid bound is reached)", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn checkpoint(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // The body is optional (`{}` by default).
    let req: NewCheckpoint = if raw.iter().all(u8::is_ascii_whitespace) {
        NewCheckpoint::default()
    } else {
        serde_json::from_slice(&raw)
            .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))?
    };
    gw.owned(&tenant, &id, "sandbox").await?;
    // Counted and taken under one lock, so concurrent requests cannot both
    // take the last slot.
    let _held = gw.checkpoint_lock.lock().await;
    if let Some(max) = gw.opts.max_checkpoints_per_tenant {
        let c = gw.daemon().await?;
        let l = BTreeMap::from([(labels::TENANT.to_owned(), tenant.clone())]);
        let held: usize = c
            .session_list(l)
            .await?
            .iter()
            .filter(|s| crate::e2b_state(s.state).is_some())
            .map(|s| s.checkpoints.len())
            .sum();
        if held >= max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "tenant {tenant} holds {held} checkpoints, its maximum \
                     (--max-checkpoints-per-tenant {max}); delete some first"
                ),
            ));
        }
    }
    let c = gw.daemon().await?;
    let info = c
        .session_checkpoint(&id, req.force)
        .await
        .map_err(branch_error)?;
    tracing::info!(
        target: "forkd_gateway::audit",
        %tenant,
        sandbox = %id,
        checkpoint = %info.checkpoint,
        "sandbox checkpointed"
    );
    Ok((StatusCode::CREATED, Json(gw.checkpoint_json(&info))).into_response())
}

#[utoipa::path(get, path = "/sandboxes/{id}/checkpoints", tag = "forkd", security(("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The sandbox id")),
    responses(
        (status = 200, description = "The sandbox's checkpoints, oldest first", body = Vec<Checkpoint>),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such sandbox of this tenant", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn checkpoints(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Vec<Checkpoint>>, ApiError> {
    gw.owned(&tenant, &id, "sandbox").await?;
    let c = gw.daemon().await?;
    let list = c.session_checkpoints(&id).await?;
    Ok(Json(list.iter().map(|c| gw.checkpoint_json(c)).collect()))
}

#[utoipa::path(delete, path = "/sandboxes/{id}/checkpoints/{checkpoint}", tag = "forkd", security(("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The sandbox id"), ("checkpoint" = String, Path, description = "The checkpoint id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such sandbox of this tenant, or no such checkpoint of it", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn delete_checkpoint(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path((id, checkpoint)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    gw.owned(&tenant, &id, "sandbox").await?;
    let c = gw.daemon().await?;
    c.session_checkpoint_delete(&id, &checkpoint)
        .await
        .map_err(checkpoint_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/restore", tag = "forkd", security(("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The sandbox id")),
    request_body = RestoreBody,
    responses(
        (status = 200, description = "The sandbox, back in the checkpoint's state under the same id (its commands and processes were killed)", body = SandboxModel),
        (status = 400, description = "Malformed body or no checkpointID", body = crate::openapi::ErrorBody),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such sandbox of this tenant, or no such checkpoint of it (or it was lost)", body = crate::openapi::ErrorBody),
        (status = 409, description = "The sandbox is paused", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn restore(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    b: Result<Json<RestoreBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(b)?;
    if req.checkpoint_id.is_empty() {
        return Err(ApiError::bad_request(
            "checkpointID is required (from POST /sandboxes/{id}/checkpoints)",
        ));
    }
    gw.owned(&tenant, &id, "sandbox").await?;
    let c = gw.daemon().await?;
    let info = c
        .session_restore(&id, &req.checkpoint_id)
        .await
        .map_err(checkpoint_error)?;
    // Commands the gateway followed were killed by the restore.
    tracing::info!(
        target: "forkd_gateway::audit",
        %tenant,
        sandbox = %id,
        checkpoint = %req.checkpoint_id,
        "sandbox restored"
    );
    Ok(Json(gw.sandbox_json(&info)).into_response())
}

/// An unknown checkpoint is a 404; the rest as any daemon error.
fn checkpoint_error(e: ClientError) -> ApiError {
    match &e {
        ClientError::Server(r) if r.code == ErrorCode::UnknownCheckpoint => {
            ApiError::new(StatusCode::NOT_FOUND, format!("forkd: {}", r.message))
        }
        _ => branch_error(e),
    }
}
