//! The E2B control plane (REST, `X-API-KEY`): create, connect, list, info,
//! kill, timeout, pause and resume. Bodies and answers follow the shapes of
//! E2B's OpenAPI spec as `e2b` 2.63's generated client reads them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use forkd_ipc::{SessionCreate, SessionInfo, SessionState};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::{labels, metadata_of, time, Gateway, Tenant, ENVD_VERSION};

/// E2B's default sandbox timeout, seconds.
const DEFAULT_TIMEOUT_S: u64 = 300;

/// A JSON body, or a 400 in E2B's shape saying what is wrong with it.
pub(crate) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    match b {
        Ok(Json(v)) => Ok(v),
        Err(e) => Err(ApiError::new(
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            },
            format!("bad request body: {}", e.body_text()),
        )),
    }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub(crate) struct TimeoutBody {
    timeout: Option<u64>,
}

fn secs_to_ms(s: u64) -> u64 {
    s.saturating_mul(1000)
}

impl Gateway {
    /// The zygote an E2B template name means.
    fn zygote_for(&self, template: &str) -> Option<String> {
        if template.is_empty() || self.opts.default_templates.iter().any(|t| t == template) {
            None
        } else {
            Some(template.to_owned())
        }
    }

    /// What `create` and `connect` answer: the SDK's `Sandbox` model.
    pub(crate) fn sandbox_json(&self, info: &SessionInfo) -> SandboxModel {
        let tenant = info.labels.get(labels::TENANT).map_or("", String::as_str);
        let token = self.tokens.token(&info.session, tenant);
        SandboxModel {
            template_id: template_of(info),
            sandbox_id: self.peers.external_id(&info.session),
            client_id: CLIENT_ID.into(),
            envd_version: ENVD_VERSION.into(),
            envd_access_token: token.clone(),
            traffic_access_token: token,
            domain: None,
        }
    }
}

/// The `clientID` of every sandbox.
const CLIENT_ID: &str = "forkd";

/// E2B's `Sandbox` model: what create, connect and resume answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxModel {
    /// The template it was created from.
    #[serde(rename = "templateID")]
    template_id: String,
    /// Its id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name).
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    /// Always `forkd`.
    #[serde(rename = "clientID")]
    client_id: String,
    /// The envd version whose features the gateway serves.
    envd_version: String,
    /// The sandbox's access token (send it as `X-Access-Token`).
    envd_access_token: String,
    /// The same token, for `E2B-Traffic-Access-Token`.
    traffic_access_token: String,
    /// Always null: sandboxes are reached through the gateway's address.
    domain: Option<String>,
}

/// E2B's `ListedSandbox` model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListedSandbox {
    /// The template it was created from.
    #[serde(rename = "templateID")]
    template_id: String,
    /// The zygote that serves it.
    alias: String,
    /// Its id.
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    /// Always `forkd`.
    #[serde(rename = "clientID")]
    client_id: String,
    /// RFC 3339.
    started_at: String,
    /// When its timeout ends it, RFC 3339.
    end_at: String,
    /// The cgroup CPU quota rounded up.
    cpu_count: u64,
    /// The memory limit.
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    /// The scratch quota.
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    /// `running` or `paused`.
    state: String,
    /// The envd version whose features the gateway serves.
    envd_version: String,
    /// The metadata given at create.
    metadata: BTreeMap<String, String>,
}

/// E2B's `SandboxDetail` model: a listed sandbox with its access token.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxDetail {
    #[serde(flatten)]
    listed: ListedSandbox,
    /// The sandbox's access token.
    envd_access_token: String,
    /// Always null.
    domain: Option<String>,
}

/// E2B's `SandboxMetric` model: one sample.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxMetric {
    /// RFC 3339.
    timestamp: String,
    /// Seconds since the epoch.
    timestamp_unix: i64,
    /// As in `ListedSandbox`.
    cpu_count: u64,
    /// CPU use averaged over the sandbox's life, percent of its quota.
    cpu_used_pct: f64,
    /// Memory in use now (its cgroup), bytes.
    mem_used: u64,
    /// The memory limit, bytes.
    mem_total: u64,
    /// Always 0.
    mem_cache: u64,
    /// Always 0 (not measured).
    disk_used: u64,
    /// The scratch quota, bytes.
    disk_total: u64,
}

fn template_of(info: &SessionInfo) -> String {
    info.labels
        .get(labels::TEMPLATE)
        .cloned()
        .unwrap_or_else(|| info.zygote.clone())
}

/// `ListedSandbox` / `SandboxDetail` fields.
fn listed(gw: &Gateway, info: &SessionInfo) -> ListedSandbox {
    let now = time::now_ms();
    let started = now - i64::try_from(info.age_ms).unwrap_or(0);
    let end = now + i64::try_from(info.ttl_left_ms).unwrap_or(0);
    // Whole CPUs: the cgroup quota rounded up (at least one).
    let cpus = (1..=1024u64)
        .find(|n| *n as f64 >= info.limits.cpus)
        .unwrap_or(1);
    ListedSandbox {
        template_id: template_of(info),
        alias: info.zygote.clone(),
        sandbox_id: gw.peers.external_id(&info.session),
        client_id: CLIENT_ID.into(),
        started_at: time::rfc3339_ms(started),
        end_at: time::rfc3339_ms(end),
        cpu_count: cpus,
        memory_mb: info.limits.memory_bytes >> 20,
        disk_size_mb: info.limits.scratch_bytes >> 20,
        // Only live sessions are listed (`owned`, `list`).
        state: crate::e2b_state(info.state).unwrap_or("running").into(),
        envd_version: ENVD_VERSION.into(),
        metadata: metadata_of(&info.labels),
    }
}

#[utoipa::path(post, path = "/sandboxes", tag = "control", security(("ApiKeyAuth" = [])),
    request_body = NewSandbox,
    responses(
        (status = 201, description = "Created", body = SandboxModel),
        (status = 400, description = "Malformed body or missing templateID", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No zygote for this template", body = crate::openapi::ErrorBody), (status = 429, description = "The tenant holds its quota of sandboxes", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn create(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    b: Result<Json<NewSandbox>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(b)?;
    if req.template_id.is_empty() {
        return Err(ApiError::bad_request(
            "templateID is required (an E2B template name; forkd maps it to a zygote)",
        ));
    }
    let mut l = BTreeMap::from([
        (labels::TENANT.to_owned(), tenant.clone()),
        (labels::KIND.to_owned(), "sandbox".to_owned()),
        (labels::TEMPLATE.to_owned(), req.template_id.clone()),
    ]);
    for (k, v) in req.metadata.unwrap_or_default() {
        l.insert(format!("{}{k}", labels::META), v);
    }
    gw.admit(&tenant).await?;
    let c = gw.daemon().await?;
    let info = c
        .session_create(&SessionCreate {
            zygote: gw.zygote_for(&req.template_id),
            env: req.env_vars.unwrap_or_default(),
            ttl_ms: Some(secs_to_ms(req.timeout.unwrap_or(DEFAULT_TIMEOUT_S))),
            labels: l,
            ..Default::default()
        })
        .await
        .map_err(|e| match e {
            forkd_ipc::ClientError::Server(r) if r.code == forkd_ipc::ErrorCode::UnknownZygote => {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "template {:?} not found: forkd templates are zygote names ({})",
                        req.template_id, r.message
                    ),
                )
            }
            other => other.into(),
        })?;
    tracing::info!(
        target: "forkd_gateway::audit",
        tenant = info.labels.get(labels::TENANT).map(String::as_str),
        sandbox = %info.session,
        template = %req.template_id,
        "sandbox created"
    );
    Ok((StatusCode::CREATED, Json(gw.sandbox_json(&info))).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ListQuery {
    state: Option<String>,
}

/// Decodes `%XX` (and `+` as a space when `plus`).
fn percent_decode(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hexval = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hexval {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pairs of a query string.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// The metadata filter: the SDK sends `metadata=` + the URL-encoding of
/// `k=v&...` whose keys and values are themselves percent-quoted.
fn metadata_filter(raw: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in query_pairs(raw.unwrap_or_default()) {
        if k == "metadata" {
            for (mk, mv) in query_pairs(&v) {
                out.insert(
                    format!("{}{}", labels::META, percent_decode(&mk, false)),
                    percent_decode(&mv, false),
                );
            }
        }
    }
    out
}

#[utoipa::path(get, path = "/v2/sandboxes", tag = "control", security(("ApiKeyAuth" = [])),
    params(
        ("metadata" = Option<String>, Query, description = "URL-encoded `k=v&k2=v2` metadata filter"),
        ("state" = Option<String>, Query, description = "`running`, `paused` or both, comma separated")
    ),
    responses(
        (status = 200, description = "This node's sandboxes of the tenant", body = Vec<ListedSandbox>),
        (status = 400, description = "Malformed query", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn list(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    RawQuery(raw): RawQuery,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    let Ok(Query(q)) = q else {
        return Err(ApiError::bad_request("malformed query string"));
    };
    let mut filter = metadata_filter(raw.as_deref());
    filter.insert(labels::TENANT.into(), tenant);
    filter.insert(labels::KIND.into(), "sandbox".into());
    let states: Option<Vec<String>> = q
        .state
        .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect());
    let c = gw.daemon().await?;
    let sessions = c.session_list(filter).await?;
    let out = sessions
        .iter()
        .filter(|s| {
            crate::e2b_state(s.state)
                .is_some_and(|st| states.as_ref().map_or(true, |v| v.iter().any(|x| x == st)))
        })
        .map(|s| listed(&gw, s))
        .collect();
    Ok(Json(out))
}

#[utoipa::path(get, path = "/sandboxes/{id}", tag = "control", security(("ApiKeyAuth" = [])), params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    responses(
        (status = 200, description = "The sandbox", body = SandboxDetail),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody), (status = 404, description = "No such sandbox of this tenant (absent, ended or another tenant's)", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn info(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, ApiError> {
    let info = gw.owned(&tenant, &id, "sandbox").await?;
    Ok(Json(SandboxDetail {
        listed: listed(&gw, &info),
        envd_access_token: gw.tokens.token(&info.session, &tenant),
        domain: None,
    }))
}

/// One metrics sample, now: memory from the cgroup, CPU averaged over the
/// sandbox's life (forkd keeps no history), disk as the scratch quota.
#[utoipa::path(get, path = "/sandboxes/{id}/metrics", tag = "control", security(("ApiKeyAuth" = [])), params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    responses(
        (status = 200, description = "One sample, now", body = Vec<SandboxMetric>),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody), (status = 404, description = "No such sandbox of this tenant (absent, ended or another tenant's)", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn metrics(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Vec<SandboxMetric>>, ApiError> {
    let info = gw.owned(&tenant, &id, "sandbox").await?;
    let now = time::now_ms();
    let cpu_us = info.usage.cpu_user_us + info.usage.cpu_system_us;
    let life_us = info.age_ms.max(1) * 1000;
    let cpus = info.limits.cpus.max(0.01);
    let pct = cpu_us as f64 / life_us as f64 * 100.0 / cpus;
    Ok(Json(vec![SandboxMetric {
        timestamp: time::rfc3339_ms(now),
        timestamp_unix: now / 1000,
        cpu_count: listed(&gw, &info).cpu_count,
        cpu_used_pct: (pct * 100.0).round() / 100.0,
        mem_used: info.usage.memory_bytes,
        mem_total: info.limits.memory_bytes,
        mem_cache: 0,
        disk_used: 0,
        disk_total: info.limits.scratch_bytes,
    }]))
}

impl Gateway {
    /// The live contexts of a sandbox.
    pub(crate) async fn contexts_of(
        &self,
        tenant: &str,
        sandbox: &str,
    ) -> Result<Vec<SessionInfo>, ApiError> {
        let c = self.daemon().await?;
        let l = BTreeMap::from([
            (labels::TENANT.to_owned(), tenant.to_owned()),
            (labels::KIND.to_owned(), "context".to_owned()),
            (labels::PARENT.to_owned(), sandbox.to_owned()),
        ]);
        Ok(c.session_list(l).await?)
    }
}

#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "control", security(("ApiKeyAuth" = [])), params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    responses(
        (status = 204, description = "Killed, with its code contexts"),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody), (status = 404, description = "No such sandbox of this tenant (absent, ended or another tenant's)", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn kill(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    gw.owned(&tenant, &id, "sandbox").await?;
    let c = gw.daemon().await?;
    for ctx in gw.contexts_of(&tenant, &id).await? {
        // Already ended is fine: the goal is that none is left.
        let _ = c.session_kill(&ctx.session).await;
    }
    c.session_kill(&id).await?;
    gw.watchers.forget(&id);
    tracing::info!(target: "forkd_gateway::audit", %tenant, sandbox = %id, "sandbox killed");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/timeout", tag = "control", security(("ApiKeyAuth" = [])), params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    request_body = TimeoutBody,
    responses(
        (status = 204, description = "The sandbox now ends `timeout` seconds from now"),
        (status = 400, description = "Malformed body or no timeout", body = crate::openapi::ErrorBody), (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody), (status = 404, description = "No such sandbox of this tenant (absent, ended or another tenant's)", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn set_timeout(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    b: Result<Json<TimeoutBody>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Some(timeout) = body(b)?.timeout else {
        return Err(ApiError::bad_request("timeout (seconds) is required"));
    };
    gw.owned(&tenant, &id, "sandbox").await?;
    let c = gw.daemon().await?;
    c.session_set_ttl(&id, secs_to_ms(timeout)).await?;
    for ctx in gw.contexts_of(&tenant, &id).await? {
        let _ = c.session_set_ttl(&ctx.session, secs_to_ms(timeout)).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/pause", tag = "control", security(("ApiKeyAuth" = [])), params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    responses(
        (status = 204, description = "Paused (frozen; its timeout stops)"),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody), (status = 404, description = "No such sandbox of this tenant (absent, ended or another tenant's)", body = crate::openapi::ErrorBody), (status = 409, description = "Already paused", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn pause(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let info = gw.owned(&tenant, &id, "sandbox").await?;
    if info.state == SessionState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    gw.daemon().await?.session_pause(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Resumes if paused and applies a new timeout if given; 201 when it was
/// resumed, 200 when it was running.
async fn wake(
    gw: &Gateway,
    tenant: &str,
    id: &str,
    timeout: Option<u64>,
    must_be_paused: bool,
) -> Result<Response, ApiError> {
    let info = gw.owned(tenant, id, "sandbox").await?;
    let c = gw.daemon().await?;
    let paused = info.state == SessionState::Paused;
    if must_be_paused && !paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is not paused"),
        ));
    }
    let mut info = if paused {
        c.session_resume(id).await?
    } else {
        info
    };
    if let Some(t) = timeout {
        info = c.session_set_ttl(id, secs_to_ms(t)).await?;
    }
    let status = if paused {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(gw.sandbox_json(&info))).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/connect", tag = "control", security(("ApiKeyAuth" = [])), params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    request_body = TimeoutBody,
    responses(
        (status = 200, description = "Running already", body = SandboxModel),
        (status = 201, description = "Was paused, resumed", body = SandboxModel),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody), (status = 404, description = "No such sandbox of this tenant (absent, ended or another tenant's)", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn connect(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    b: Result<Json<TimeoutBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let t = body(b)?.timeout;
    wake(&gw, &tenant, &id, t, false).await
}

#[utoipa::path(post, path = "/sandboxes/{id}/resume", tag = "control", security(("ApiKeyAuth" = [])), params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    request_body = TimeoutBody,
    responses(
        (status = 201, description = "Resumed", body = SandboxModel),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody), (status = 404, description = "No such sandbox of this tenant (absent, ended or another tenant's)", body = crate::openapi::ErrorBody), (status = 409, description = "Not paused", body = crate::openapi::ErrorBody), (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn resume(
    State(gw): State<Arc<Gateway>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    b: Result<Json<TimeoutBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let t = body(b)?.timeout;
    wake(&gw, &tenant, &id, t, true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdks_metadata_filter_decodes() {
        // urlencode({quote("a b"): quote("x&y"), "k": "v"}) as the SDK builds it.
        let raw = "metadata=a%2520b%3Dx%2526y%26k%3Dv&limit=10";
        let f = metadata_filter(Some(raw));
        assert_eq!(f.get("e2b.meta.a b").map(String::as_str), Some("x&y"));
        assert_eq!(f.get("e2b.meta.k").map(String::as_str), Some("v"));
        assert_eq!(f.len(), 2);
        assert_eq!(percent_decode("%zz%4", false), "%zz%4");
    }
}

/// `POST /v2/sandboxes`: [`create`] under the v2 path.
#[utoipa::path(post, path = "/v2/sandboxes", tag = "control", security(("ApiKeyAuth" = [])),
    request_body = NewSandbox,
    responses(
        (status = 201, description = "Created", body = SandboxModel),
        (status = 400, description = "Malformed body or missing templateID", body = crate::openapi::ErrorBody),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn create_v2(
    gw: State<Arc<Gateway>>,
    tenant: Tenant,
    b: Result<Json<NewSandbox>, JsonRejection>,
) -> Result<Response, ApiError> {
    create(gw, tenant, b).await
}

/// `GET /sandboxes`: [`list`] under the v1 path.
#[utoipa::path(get, path = "/sandboxes", tag = "control", security(("ApiKeyAuth" = [])),
    params(
        ("metadata" = Option<String>, Query, description = "URL-encoded `k=v&k2=v2` metadata filter"),
        ("state" = Option<String>, Query, description = "`running`, `paused` or both, comma separated")
    ),
    responses(
        (status = 200, description = "This node's sandboxes of the tenant", body = Vec<ListedSandbox>),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn list_v1(
    gw: State<Arc<Gateway>>,
    tenant: Tenant,
    raw: RawQuery,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    list(gw, tenant, raw, q).await
}

/// `POST /v2/sandboxes/{id}/connect`: [`connect`] under the v2 path.
#[utoipa::path(post, path = "/v2/sandboxes/{id}/connect", tag = "control", security(("ApiKeyAuth" = [])),
    params(("id" = String, Path, description = "The sandbox id (`s-HEX`, or `s-HEX--NODE` on a gateway with a node name)")),
    request_body = TimeoutBody,
    responses(
        (status = 200, description = "Running already", body = SandboxModel),
        (status = 201, description = "Was paused, resumed", body = SandboxModel),
        (status = 401, description = "Missing or invalid X-API-Key", body = crate::openapi::ErrorBody),
        (status = 404, description = "No such sandbox of this tenant", body = crate::openapi::ErrorBody),
        (status = 502, description = "The sandbox is on another node that is unknown or did not answer", body = crate::openapi::ErrorBody)
    ))]
pub(crate) async fn connect_v2(
    gw: State<Arc<Gateway>>,
    tenant: Tenant,
    id: Path<String>,
    b: Result<Json<TimeoutBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    connect(gw, tenant, id, b).await
}
