//! The forward hop between two gateways, without daemons (the full path
//! with daemons and the SDK is `forkd/tests/e2b.rs`,
//! `two_gateways_forward_to_the_node_that_holds_the_sandbox`): which node
//! answers, and the errors for an unknown node, a node that is down and a
//! second hop.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `GET path` with `headers`; (status, body as JSON).
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let (status, body) = get_text(addr, path, headers).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// Sends `GET path` with `headers`; (status, body).
async fn get_text(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

async fn gateway(
    dir: &std::path::Path,
    node: &str,
    listener: tokio::net::TcpListener,
    peers: &[(&str, String)],
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::sync::Arc<forkd_gateway::Gateway>,
) {
    // Each node's daemon socket is absent: a request served here gets 502
    // "daemon" from this node, after the key check.
    let mut opts = forkd_gateway::Options::new(dir.join(format!("{node}.sock")));
    opts.api_keys = Some(dir.join("keys"));
    opts.node = Some(node.to_owned());
    opts.peers = peers
        .iter()
        .map(|(n, u)| ((*n).to_owned(), u.clone()))
        .collect::<BTreeMap<_, _>>();
    let gw = forkd_gateway::Gateway::new(opts).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(forkd_gateway::serve(gw.clone(), listener, async {
        let _ = stopped.await;
    }));
    (stop, gw)
}

#[tokio::test]
async fn a_request_reaches_the_node_in_the_sandbox_id_and_bad_routes_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let key = "forward-key-0123456789";
    std::fs::write(dir.path().join("keys"), format!("{key} alice\n")).unwrap();
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let down_url = format!("http://{}", down.local_addr().unwrap());
    drop(down);
    let (_sa, _) = gateway(
        dir.path(),
        "node-a",
        la,
        &[("node-b", format!("http://{b}"))],
    )
    .await;
    let (_sb, gw_b) = gateway(
        dir.path(),
        "node-b",
        lb,
        &[("node-a", format!("http://{a}")), ("node-c", down_url)],
    )
    .await;

    // Through B, node A's sandbox is A's business: A refuses a wrong key,
    // and with the right key A (not B) reports its own missing daemon.
    let (st, body) = get(
        b,
        "/sandboxes/s-00ff--node-a",
        &[("X-API-Key", "wrong-key-0123456789")],
    )
    .await;
    assert_eq!((st, body["code"].as_u64()), (401, Some(401)), "{body}");
    let (st, body) = get(b, "/sandboxes/s-00ff--node-a", &[("X-API-Key", key)]).await;
    assert_eq!(st, 502, "{body}");
    let m = body["message"].as_str().unwrap();
    assert!(m.contains("node-a.sock"), "A's daemon, not B's: {m}");
    // The same by header (sandbox calls).
    let (st, body) = get(
        b,
        "/health",
        &[("E2b-Sandbox-Id", "s-00ff--node-a"), ("X-API-Key", key)],
    )
    .await;
    assert_eq!(st, 502, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("node-a.sock"),
        "{body}"
    );
    // B's own id is served by B (with the node stripped).
    let (st, body) = get(b, "/sandboxes/s-00ff--node-b", &[("X-API-Key", key)]).await;
    assert_eq!(st, 502, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("node-b.sock"),
        "{body}"
    );

    // Unknown node.
    let (st, body) = get(b, "/sandboxes/s-00ff--node-z", &[("X-API-Key", key)]).await;
    assert_eq!((st, body["code"].as_u64()), (502, Some(502)), "{body}");
    let m = body["message"].as_str().unwrap();
    assert!(
        m.contains("\"node-z\"") && m.contains("--peer node-z="),
        "{m}"
    );

    // A node that is down: 502 at once.
    let t = Instant::now();
    let (st, body) = get(b, "/sandboxes/s-00ff--node-c", &[("X-API-Key", key)]).await;
    assert_eq!(st, 502, "{body}");
    let m = body["message"].as_str().unwrap();
    assert!(
        m.contains("node-c") && m.contains("could not be reached"),
        "{m}"
    );
    assert!(
        t.elapsed() < forkd_gateway::forward::CONNECT_TIMEOUT,
        "{:?}",
        t.elapsed()
    );

    // A forwarded request naming a third node is not forwarded again.
    let (st, body) = get(
        a,
        "/sandboxes/s-00ff--node-b",
        &[
            ("X-API-Key", key),
            (forkd_gateway::forward::FORWARDED_HEADER, "node-b"),
        ],
    )
    .await;
    assert_eq!(st, 508, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("disagree"),
        "{body}"
    );

    // B counted its forwards by outcome (A's 508 is A's).
    let ml = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let maddr = ml.local_addr().unwrap();
    tokio::spawn(forkd_gateway::serve_router(
        ml,
        forkd_gateway::metrics_router(gw_b),
    ));
    let (_, text) = get_text(maddr, "/metrics", &[]).await;
    for want in [
        r#"forkd_gateway_forwards_total{outcome="forwarded",status="401"} 1"#,
        r#"forkd_gateway_forwards_total{outcome="forwarded",status="502"} 2"#,
        r#"forkd_gateway_forwards_total{outcome="unknown_node",status="502"} 1"#,
        r#"forkd_gateway_forwards_total{outcome="unreachable",status="502"} 1"#,
    ] {
        assert!(text.contains(want), "metrics lack {want}:\n{text}");
    }
}
