//! Several nodes: a sandbox id names the node that holds it, and a request
//! for another node's sandbox is forwarded there.
//!
//! A gateway with a node name (`--node`, default the host name) hands out
//! sandbox ids `SESSION--NODE` (`s-9f2c…--node-a`); the daemon's session
//! ids never hold `--`, so the node is everything after the first `--`. A
//! request names its sandbox in the path (`/sandboxes/{id}…`,
//! `/v2/sandboxes/{id}…`) or in the `E2b-Sandbox-Id` header. When that is
//! this node, the id is rewritten to the session id and the request served
//! here; when it is another node, the request goes there verbatim (method,
//! path, query, headers with the key or token, the body streamed both ways)
//! over HTTP/1.1, with a [`FORWARDED_HEADER`] naming this node. A forwarded
//! request is never forwarded again (508): two gateways that disagree about
//! who holds a sandbox cannot bounce it between them.
//!
//! The receiving node checks the key or token as for any request (both
//! nodes read the same key file; access tokens are checked by the node that
//! minted them). Peers come from `--peer NAME=http://ADDR` and, for names
//! not listed, `--peer-url` with `{node}` in it (e.g. a headless Service's
//! per-pod DNS name). Unknown node → 502; a node that does not answer → 502
//! after at most [`CONNECT_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error::ApiError;
use crate::Gateway;

/// Set on a forwarded request, naming the node that forwarded it.
pub const FORWARDED_HEADER: &str = "forkd-forwarded-from";
/// Separates the session id from the node in a sandbox id.
pub const NODE_SEPARATOR: &str = "--";
/// Longest wait for a peer's TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bad `--node`, `--peer` or `--peer-url`.
#[derive(Debug, thiserror::Error)]
pub enum PeerConfigError {
    /// Not a usable node name.
    #[error(
        "node name {0:?} is not usable: use lowercase letters, digits and '-' (at most 63; \
         dots and colons are turned into '-'), e.g. --node node-a"
    )]
    Node(String),
    /// Not `http://HOST:PORT`.
    #[error(
        "peer address {url:?} for {name:?} is not usable: {why} (give http://HOST:PORT, \
         e.g. --peer node-b=http://10.0.0.2:3000)"
    )]
    Url {
        /// The peer.
        name: String,
        /// What was given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// No `=` in `--peer`.
    #[error("--peer {0:?} is not NAME=http://HOST:PORT")]
    Syntax(String),
}

/// A node name as ids carry it: lowercase, dots and colons (a host name, an
/// IP address) as '-'. `None` if something else is left.
pub fn node_name(raw: &str) -> Option<String> {
    let n: String = raw
        .trim()
        .chars()
        .map(|c| match c {
            '.' | ':' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ok.then_some(n)
}

/// The node name when none is configured: `$FORKD_NODE` (e.g. a pod's IP
/// from the Kubernetes downward API; dots become '-'), else this machine's
/// host name (its first label), else `node`.
pub fn default_node() -> String {
    if let Some(n) = std::env::var("FORKD_NODE").ok().and_then(|n| node_name(&n)) {
        return n;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|h| h.trim().split('.').next().and_then(node_name))
        .unwrap_or_else(|| "node".to_owned())
}

/// Parses `NAME=http://HOST:PORT`.
pub fn parse_peer(s: &str) -> Result<(String, String), PeerConfigError> {
    let (n, u) = s
        .split_once('=')
        .ok_or_else(|| PeerConfigError::Syntax(s.to_owned()))?;
    Ok((n.trim().to_owned(), u.trim().to_owned()))
}

fn base_url(name: &str, url: &str) -> Result<String, PeerConfigError> {
    let bad = |why: &str| PeerConfigError::Url {
        name: name.to_owned(),
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let u: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if u.scheme_str() != Some("http") {
        return Err(bad("only http:// is spoken between gateways"));
    }
    let Some(a) = u.authority() else {
        return Err(bad("no host"));
    };
    if !matches!(u.path(), "" | "/") || u.query().is_some() {
        return Err(bad("a path or query is not allowed"));
    }
    Ok(format!("http://{a}"))
}

/// Where the other nodes are, and the client that reaches them.
pub struct Peers {
    node: Option<String>,
    named: BTreeMap<String, String>,
    template: Option<String>,
    client: Client<HttpConnector, Body>,
}

impl Peers {
    /// Checks and keeps the node name, the peer map and the template.
    pub fn new(
        node: Option<&str>,
        peers: &BTreeMap<String, String>,
        template: Option<&str>,
    ) -> Result<Peers, PeerConfigError> {
        let node = node
            .map(|n| node_name(n).ok_or_else(|| PeerConfigError::Node(n.to_owned())))
            .transpose()?;
        let mut named = BTreeMap::new();
        for (n, u) in peers {
            let name = node_name(n).ok_or_else(|| PeerConfigError::Node(n.clone()))?;
            named.insert(name, base_url(n, u)?);
        }
        if let Some(t) = template {
            if !t.contains("{node}") {
                return Err(PeerConfigError::Url {
                    name: "{node}".into(),
                    url: t.to_owned(),
                    why: "--peer-url must contain {node}".into(),
                });
            }
            base_url("{node}", &t.replace("{node}", "node"))?;
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        Ok(Peers {
            node,
            named,
            template: template.map(str::to_owned),
            client: Client::builder(TokioExecutor::new()).build(http),
        })
    }

    /// This gateway's node name.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The sandbox id a session id is handed out as.
    pub fn external_id(&self, session: &str) -> String {
        match &self.node {
            Some(n) => format!("{session}{NODE_SEPARATOR}{n}"),
            None => session.to_owned(),
        }
    }

    /// Base URL of `node`, if known.
    fn url_of(&self, node: &str) -> Option<String> {
        if let Some(u) = self.named.get(node) {
            return Some(u.clone());
        }
        // Only a well-formed name goes into a URL.
        let t = self.template.as_ref()?;
        (node_name(node).as_deref() == Some(node))
            .then(|| base_url(node, &t.replace("{node}", node)).ok())
            .flatten()
    }
}

/// Where the request names its sandbox.
enum Named {
    /// Path segment `i`.
    Path(usize),
    /// The `E2b-Sandbox-Id` header.
    Header,
}

fn sandbox_id(req: &Request) -> Option<(Named, String)> {
    let segs: Vec<&str> = req.uri().path().split('/').collect();
    let i = match segs.as_slice() {
        ["", "sandboxes", id, ..] if !id.is_empty() => Some(2),
        ["", "v2", "sandboxes", id, ..] if !id.is_empty() => Some(3),
        _ => None,
    };
    if let Some(i) = i {
        return Some((Named::Path(i), segs[i].to_owned()));
    }
    let h = req.headers().get("e2b-sandbox-id")?.to_str().ok()?.trim();
    (!h.is_empty()).then(|| (Named::Header, h.to_owned()))
}

/// Names the sandbox by its session id (`id` without the node).
fn rewrite(req: &mut Request, named: &Named, session: &str) {
    match named {
        Named::Path(i) => {
            let mut segs: Vec<&str> = req.uri().path().split('/').collect();
            segs[*i] = session;
            let mut pq = segs.join("/");
            if let Some(q) = req.uri().query() {
                pq.push('?');
                pq.push_str(q);
            }
            let mut parts = req.uri().clone().into_parts();
            if let Ok(p) = pq.parse() {
                parts.path_and_query = Some(p);
                if let Ok(u) = Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
        }
        Named::Header => {
            if let Ok(v) = HeaderValue::from_str(session) {
                req.headers_mut().insert("e2b-sandbox-id", v);
            }
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), and those `Connection` names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

/// The error chain of a failed forward, in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Middleware: serve a request for this node's sandbox here (by its session
/// id), forward one for another node's.
pub(crate) async fn forward(
    State(gw): State<Arc<Gateway>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some((named, id)) = sandbox_id(&req) else {
        return next.run(req).await;
    };
    let Some((session, node)) = id.split_once(NODE_SEPARATOR) else {
        // A bare session id: this node's.
        return next.run(req).await;
    };
    let peers = &gw.peers;
    if peers.node() == Some(node) {
        rewrite(&mut req, &named, session);
        return next.run(req).await;
    }
    let here = peers.node().unwrap_or("(unnamed)");
    if let Some(from) = req.headers().get(FORWARDED_HEADER) {
        gw.metrics
            .forward("loop", StatusCode::LOOP_DETECTED.as_u16());
        return ApiError::new(
            StatusCode::LOOP_DETECTED,
            format!(
                "sandbox {id} was forwarded here by node {} but this is node {here}: the gateways' \
                 --node and --peer settings disagree; not forwarding it again",
                String::from_utf8_lossy(from.as_bytes())
            ),
        )
        .into_response();
    }
    let Some(base) = peers.url_of(node) else {
        gw.metrics
            .forward("unknown_node", StatusCode::BAD_GATEWAY.as_u16());
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "sandbox {id} is held by node {node:?}, which this gateway (node {here}) does not \
                 know: give it --peer {node}=http://ADDR (or --peer-url), or check the sandbox id"
            ),
        )
        .into_response();
    };
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match format!("{base}{pq}").parse() {
        Ok(u) => u,
        Err(e) => {
            gw.metrics
                .forward("unreachable", StatusCode::BAD_GATEWAY.as_u16());
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("cannot forward to node {node} at {base}: {e}"),
            )
            .into_response();
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(here) {
        parts.headers.insert(FORWARDED_HEADER, v);
    }
    tracing::debug!(sandbox = %id, node, %base, "gateway: forwarding");
    match peers.client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            gw.metrics.forward("forwarded", resp.status().as_u16());
            let (mut p, b) = resp.into_parts();
            strip_hop_by_hop(&mut p.headers);
            Response::from_parts(p, Body::new(b))
        }
        Err(e) => {
            let what = if e.is_connect() {
                "could not be reached"
            } else {
                "failed"
            };
            tracing::warn!(sandbox = %id, node, %base, "gateway: forward {what}: {}", chain(&e));
            gw.metrics
                .forward("unreachable", StatusCode::BAD_GATEWAY.as_u16());
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "sandbox {id} is held by node {node}, whose gateway at {base} {what}: {} \
                     (is that node down?)",
                    chain(&e)
                ),
            )
            .into_response()
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_labels_and_ip_addresses_become_dashed() {
        assert_eq!(node_name("Node-A").as_deref(), Some("node-a"));
        assert_eq!(node_name("10.1.2.3").as_deref(), Some("10-1-2-3"));
        assert_eq!(node_name("fd00::1").as_deref(), Some("fd00--1"));
        assert_eq!(node_name(""), None);
        assert_eq!(node_name("a/b"), None);
        assert_eq!(node_name(&"x".repeat(64)), None);
    }

    #[test]
    fn peers_are_checked_and_ids_carry_the_node() {
        let m = BTreeMap::from([("node-b".to_owned(), "http://127.0.0.1:1".to_owned())]);
        let p = Peers::new(Some("node-a"), &m, Some("http://{node}.peers:3000")).unwrap();
        assert_eq!(p.external_id("s-12ab"), "s-12ab--node-a");
        assert_eq!(p.url_of("node-b").as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(
            p.url_of("10-0-0-7").as_deref(),
            Some("http://10-0-0-7.peers:3000")
        );
        assert_eq!(p.url_of("evil@host"), None);
        let bad = BTreeMap::from([("b".to_owned(), "https://x:1".to_owned())]);
        assert!(Peers::new(None, &bad, None)
            .err()
            .unwrap()
            .to_string()
            .contains("only http://"));
        assert!(Peers::new(None, &BTreeMap::new(), Some("http://x:1")).is_err());
        assert!(Peers::new(Some("a b"), &BTreeMap::new(), None).is_err());
        assert!(parse_peer("nodeb").is_err());
    }
}
