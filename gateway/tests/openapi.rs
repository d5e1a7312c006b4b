//! The OpenAPI document: the shipped `gateway/openapi.json` is what the
//! code generates, every `$ref` in it resolves, and a running gateway serves
//! it at `/openapi.json` without a key.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

use std::path::PathBuf;

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
}

#[test]
fn the_shipped_openapi_json_is_what_the_code_generates() {
    let generated = forkd_gateway::openapi::document_json();
    if std::env::var_os("FORKD_WRITE_OPENAPI").is_some() {
        std::fs::write(shipped(), &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(shipped()).unwrap_or_default();
    assert!(
        on_disk == generated,
        "gateway/openapi.json differs from what the code generates: regenerate it with \
         `cargo run -p forkd-gateway -- --print-openapi > gateway/openapi.json` \
         (or FORKD_WRITE_OPENAPI=1 cargo test -p forkd-gateway --test openapi) and commit it"
    );
}

/// Every `"$ref": "#/components/schemas/X"` names a schema of the document.
#[test]
fn every_schema_reference_resolves() {
    let doc: serde_json::Value =
        serde_json::from_str(&forkd_gateway::openapi::document_json()).unwrap();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut refs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x.as_str()) {
                        ("$ref", Some(r)) => out.push(r.to_owned()),
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(schemas.contains_key(name), "dangling {r}");
    }
}

/// GET `path` on `addr` with a raw HTTP/1.1 request; (status, body).
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    // The document is sent with a Content-Length (no chunking).
    (status, body.to_owned())
}

#[tokio::test]
async fn a_running_gateway_serves_its_openapi_document_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys"), "secret-key-0123456789 alice\n").unwrap();
    // No daemon is needed: the document does not touch it.
    let mut opts = forkd_gateway::Options::new(dir.path().join("no-daemon.sock"));
    opts.api_keys = Some(dir.path().join("keys"));
    let gw = forkd_gateway::Gateway::new(opts).unwrap();
    let l = forkd_gateway::bind(&gw, "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(forkd_gateway::serve(gw, l, async {
        let _ = stopped.await;
    }));

    let (status, body) = get(addr, "/openapi.json").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/sandboxes", "post"),
        ("/v2/sandboxes", "get"),
        ("/sandboxes/{id}", "delete"),
        ("/sandboxes/{id}/timeout", "post"),
        ("/v2/sandboxes/{id}/connect", "post"),
        ("/process.Process/{method}", "post"),
        ("/filesystem.Filesystem/{method}", "post"),
        ("/files", "get"),
        ("/files", "post"),
        ("/health", "get"),
        ("/execute", "post"),
        ("/contexts", "post"),
        ("/contexts/{id}/restart", "post"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the served document"
        );
    }
    let rpc = &paths["/process.Process/{method}"]["post"]["requestBody"]["content"];
    assert!(rpc.get("application/connect+proto").is_some(), "{rpc}");
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["ApiKeyAuth"]["name"], "X-API-Key");
    assert_eq!(schemes["AccessTokenAuth"]["name"], "X-Access-Token");
    // The same document as the code generates (and as shipped).
    assert_eq!(body, forkd_gateway::openapi::document_json());
    // Other routes still want a key: the document is the only open one.
    let (status, body) = get(addr, "/v2/sandboxes").await;
    assert_eq!(status, 401, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["code"], 401);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
