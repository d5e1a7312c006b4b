//! Prometheus metrics of the gateway: requests per route, method, status
//! and tenant, and time to the response head per route (a streamed cell or
//! command counts until its first event). Tenants come from verified
//! credentials only (an API key of the key file or a sandbox token's MAC),
//! so label values stay bounded by the key file; anything else is `-`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::Gateway;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
    tenant: String,
}

/// A forward's outcome (`forwarded`, `unknown_node`, `unreachable`,
/// `loop`) and the status answered; not the node, which comes from the
/// client's id and would make the label set unbounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    outcome: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

const BUCKETS: [f64; 12] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The gateway's metric families.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    forwards: Family<ForwardLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("forkd_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            histogram as fn() -> Histogram,
        );
        registry.register(
            "requests",
            "HTTP requests by route, method, status and tenant",
            requests.clone(),
        );
        registry.register(
            "response_head_seconds",
            "Time from request to response head, by route",
            latency.clone(),
        );
        let forwards = Family::<ForwardLabels, Counter>::default();
        registry.register(
            "forwards",
            "Requests for another node's sandbox, by outcome and status answered",
            forwards.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            forwards,
        }
    }
}

impl Metrics {
    /// Counts one request for another node's sandbox.
    pub(crate) fn forward(&self, outcome: &'static str, status: u16) {
        self.forwards
            .get_or_create(&ForwardLabels { outcome, status })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn tenant_of(gw: &Gateway, h: &HeaderMap) -> String {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(t) = get("x-api-key").and_then(|k| gw.keys.tenant(k)) {
        return t;
    }
    let token = get("x-access-token").or_else(|| get("e2b-traffic-access-token"));
    if let (Some(id), Some(tok)) = (get("e2b-sandbox-id"), token) {
        if let Some(t) = gw.tokens.check(id, tok) {
            return t;
        }
    }
    "-".to_owned()
}

/// Middleware: counts and times every request.
pub(crate) async fn track(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let tenant = tenant_of(&gw, req.headers());
    let resp = next.run(req).await;
    gw.metrics
        .latency
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    gw.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: resp.status().as_u16(),
            tenant,
        })
        .inc();
    resp
}

/// `GET /metrics` of the metrics listener.
pub(crate) async fn serve_metrics(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics.encode(),
    )
        .into_response()
}
