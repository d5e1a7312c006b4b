//! The egress path against real kernels objects: a process in its own
//! network namespace (standing in for the sandbox child, which the daemon
//! tests cover), test hosts in namespaces of their own on 198.18.0.0/15.
//! Root only; skipped (with a note) otherwise.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod testbed;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use forkd_net::{Bound, Config, Enforcer};
use hickory_proto::op::ResponseCode;
use testbed::{lookup, NetnsChild, TestHost};

fn config(resolvers: Vec<SocketAddr>) -> Config {
    Config {
        resolvers,
        ..Config::default()
    }
}

fn admit(specs: &[String]) -> forkd_net::Allowlist {
    Bound::default().admit(specs).unwrap()
}

/// Connects with a bound: a refusal must come back as an error, not a hang.
fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
}

fn exchange(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

macro_rules! need_root {
    () => {
        if !testbed::available() {
            eprintln!("skipped: needs root and `ip`");
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_address_and_port_pass_everything_else_is_refused_at_once() {
    need_root!();
    let host = TestHost::create();
    host.echo(8080, "a");
    host.echo(8081, "b");
    let other = TestHost::create();
    other.echo(8080, "o");
    let enforcer = Enforcer::start(config(vec![])).unwrap();
    let child = NetnsChild::start();
    let allow = admit(&[
        format!("{}:8080", host.addr),
        format!("{}:9000", other.addr),
    ]);
    let egress = enforcer.attach(child.pidfd.as_fd(), allow).await.unwrap();

    let (a, o) = (IpAddr::V4(host.addr), IpAddr::V4(other.addr));
    let results = tokio::task::spawn_blocking(move || {
        child.run(move || {
            let mut s = connect((a, 8080).into()).expect("allowed destination");
            let echoed = exchange(&mut s, b"hi").unwrap();
            drop(s);
            // Another port of the allowed host: no listener, RST.
            let port = connect((a, 8081).into()).map(drop).unwrap_err().kind();
            // A host nobody allowed: no route.
            let host = connect((IpAddr::V4([198, 18, 255, 1].into()), 8080).into())
                .map(drop)
                .unwrap_err()
                .kind();
            // An allowed host on a port only another rule opens: accepted by
            // the kernel, reset by the proxy before a byte passes.
            let reset = connect((o, 8080).into())
                .and_then(|mut s| exchange(&mut s, b"x"))
                .map(|b| b.len());
            (echoed, port, host, reset)
        })
    })
    .await
    .unwrap();
    assert_eq!(results.0, b"a: hi");
    assert_eq!(results.1, ErrorKind::ConnectionRefused);
    assert_eq!(results.2, ErrorKind::NetworkUnreachable);
    match results.3 {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("{n} bytes came back from a refused destination"),
    }
    // The proxy's byte counts settle once both directions closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = egress.finish();
    assert_eq!(report.connections_allowed, 1);
    assert_eq!(report.connections_denied, 1);
    assert_eq!(report.bytes_out, 2);
    assert_eq!(report.bytes_in, 5);
    let ok = &report.log[0];
    assert!(ok.allowed && ok.destination == host.addr.to_string() && ok.port == Some(8080));
    assert_eq!((ok.bytes_out, ok.bytes_in), (2, 5));
    let denied = &report.log[1];
    assert!(!denied.allowed && denied.destination == other.addr.to_string());
    assert_eq!(denied.reason.as_deref(), Some("not on the allowlist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_only_when_allowed_and_never_to_private_or_metadata_addresses() {
    need_root!();
    let host = TestHost::create();
    host.echo(8080, "a");
    let names: HashMap<String, _> = [
        ("ok.test", host.addr),
        ("unlisted.test", host.addr),
        ("rebind.test", [10, 0, 0, 1].into()),
        ("local.test", [127, 0, 0, 1].into()),
        ("meta.test", [169, 254, 169, 254].into()),
        ("inside.test", [10, 7, 0, 1].into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dns = host.dns(names, 60);
    let enforcer = Enforcer::start(config(vec![dns])).unwrap();
    let child = NetnsChild::start();
    let allow = admit(&[
        "ok.test:8080".into(),
        "*.rebind.test:8080".into(),
        "rebind.test:8080".into(),
        "local.test:8080".into(),
        "meta.test:8080".into(),
        "inside.test:8080".into(),
        "10.7.0.0/16:8080".into(),
    ]);
    let egress = enforcer.attach(child.pidfd.as_fd(), allow).await.unwrap();

    let a = IpAddr::V4(host.addr);
    let r = tokio::task::spawn_blocking(move || {
        child.run(move || {
            let resolver: SocketAddr = ([127, 0, 0, 1], 53).into();
            // Not yet resolved: the address is not reachable.
            let before = connect((a, 8080).into()).map(drop).unwrap_err().kind();
            let ok = lookup(resolver, "OK.test.");
            let echoed = connect((a, 8080).into())
                .and_then(|mut s| exchange(&mut s, b"hi"))
                .unwrap();
            let other_port = connect((a, 8081).into()).map(drop).unwrap_err().kind();
            let lookups: Vec<_> = [
                "unlisted.test.",
                "rebind.test.",
                "local.test.",
                "meta.test.",
                "inside.test.",
            ]
            .iter()
            .map(|n| lookup(resolver, n))
            .collect();
            // The resolver also answers on the IPv6 loopback.
            let v6 = lookup(([0u16, 0, 0, 0, 0, 0, 0, 1], 53).into(), "ok.test.");
            (before, ok, echoed, other_port, lookups, v6)
        })
    })
    .await
    .unwrap();
    let (before, ok, echoed, other_port, lookups, v6) = r;
    assert_eq!(before, ErrorKind::NetworkUnreachable);
    assert_eq!(ok, (ResponseCode::NoError, vec![host.addr]));
    assert_eq!(echoed, b"a: hi");
    assert_eq!(other_port, ErrorKind::ConnectionRefused);
    assert_eq!(lookups[0], (ResponseCode::NXDomain, vec![]), "not allowed");
    assert_eq!(lookups[1], (ResponseCode::Refused, vec![]), "rebinding");
    assert_eq!(lookups[2], (ResponseCode::Refused, vec![]), "loopback");
    assert_eq!(lookups[3], (ResponseCode::Refused, vec![]), "metadata");
    assert_eq!(
        lookups[4],
        (ResponseCode::NoError, vec![[10, 7, 0, 1].into()]),
        "a private range the allowlist names"
    );
    assert_eq!(v6.0, ResponseCode::NoError);
    let report = egress.finish();
    assert_eq!(report.dns_queries, 7);
    assert_eq!(report.dns_refused, 4);
    let refused: Vec<_> = report.log.iter().filter(|e| e.kind == "dns").collect();
    assert_eq!(refused[0].destination, "unlisted.test");
    assert!(refused[1].reason.as_deref().unwrap().contains("rebinding"));
    assert!(refused[3]
        .reason
        .as_deref()
        .unwrap()
        .contains("169.254.0.0/16"));
    let conn = report.log.iter().find(|e| e.kind == "connect").unwrap();
    assert_eq!(conn.host.as_deref(), Some("ok.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_destinations_are_enforced_like_ipv4() {
    need_root!();
    let host = TestHost::create();
    host.echo6(8080, "six");
    let enforcer = Enforcer::start(config(vec![])).unwrap();
    let child = NetnsChild::start();
    let allow = admit(&[format!("[{}]:8080", host.addr6)]);
    let egress = enforcer.attach(child.pidfd.as_fd(), allow).await.unwrap();
    let a = IpAddr::V6(host.addr6);
    let mut other = host.addr6.segments();
    other[7] = 3;
    let o = IpAddr::V6(other.into());
    let (echoed, port, host_kind) = tokio::task::spawn_blocking(move || {
        child.run(move || {
            let echoed = connect((a, 8080).into())
                .and_then(|mut s| exchange(&mut s, b"hi"))
                .unwrap();
            let port = connect((a, 8081).into()).map(drop).unwrap_err().kind();
            let host = connect((o, 8080).into()).map(drop).unwrap_err().kind();
            (echoed, port, host)
        })
    })
    .await
    .unwrap();
    assert_eq!(echoed, b"six: hi");
    assert_eq!(port, ErrorKind::ConnectionRefused);
    assert_eq!(host_kind, ErrorKind::NetworkUnreachable);
    let report = egress.finish();
    assert_eq!(report.connections_allowed, 1);
    assert_eq!(report.log[0].destination, host.addr6.to_string());
}

/// The setup cost alone (not run by default: `cargo test --release -p
/// forkd-net --test egress -- --ignored --nocapture`): attach to a fresh
/// namespace N times, timing each attach and its finish. Noisy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn attach_cost() {
    need_root!();
    let enforcer = Enforcer::start(config(vec![])).unwrap();
    let mut times = Vec::new();
    for _ in 0..200 {
        let child = NetnsChild::start();
        // Wait until it has its own namespace (as a warm child has).
        child.run(|| ());
        // And let its `ip` finish (lo up), so only the attach is measured.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let allow = admit(&["198.18.0.1:443".into(), "pkg.test:443".into()]);
        let t = std::time::Instant::now();
        let egress = enforcer.attach(child.pidfd.as_fd(), allow).await.unwrap();
        let attached = t.elapsed();
        let t = std::time::Instant::now();
        drop(egress.finish());
        times.push((
            attached.as_secs_f64() * 1e6,
            t.elapsed().as_secs_f64() * 1e6,
        ));
    }
    let mut a: Vec<f64> = times.iter().map(|t| t.0).collect();
    let mut f: Vec<f64> = times.iter().map(|t| t.1).collect();
    a.sort_by(|x, y| x.partial_cmp(y).unwrap());
    f.sort_by(|x, y| x.partial_cmp(y).unwrap());
    println!(
        "attach p50 {:.0} µs p90 {:.0} µs; finish p50 {:.0} µs",
        a[a.len() / 2],
        a[a.len() * 9 / 10],
        f[f.len() / 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_address_is_reachable_only_for_its_ttl() {
    need_root!();
    let host = TestHost::create();
    host.echo(8080, "a");
    // TTL 1 s is clamped up to the resolver's minimum.
    let dns = host.dns(
        [("brief.test".to_string(), host.addr)]
            .into_iter()
            .collect(),
        1,
    );
    let enforcer = Enforcer::start(config(vec![dns])).unwrap();
    let child = NetnsChild::start();
    let egress = enforcer
        .attach(child.pidfd.as_fd(), admit(&["brief.test:8080".into()]))
        .await
        .unwrap();
    let a = IpAddr::V4(host.addr);
    let (ttl_ok, fresh, stale) = tokio::task::spawn_blocking(move || {
        child.run(move || {
            let (code, addrs) = lookup(([127, 0, 0, 1], 53).into(), "brief.test.");
            let fresh = connect((a, 8080).into())
                .and_then(|mut s| exchange(&mut s, b"1"))
                .map(|b| b.len());
            std::thread::sleep(Duration::from_secs(u64::from(forkd_net::dns::MIN_TTL) + 1));
            let stale = connect((a, 8080).into())
                .and_then(|mut s| exchange(&mut s, b"2"))
                .map(|b| b.len());
            (
                code == ResponseCode::NoError && addrs == vec![host.addr],
                fresh,
                stale,
            )
        })
    })
    .await
    .unwrap();
    assert!(ttl_ok);
    assert_eq!(fresh.unwrap(), 4);
    match stale {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("{n} bytes through an expired answer"),
    }
    let report = egress.finish();
    assert_eq!(
        (report.connections_allowed, report.connections_denied),
        (1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_own_addresses_stay_closed_even_when_allowed() {
    need_root!();
    let host = TestHost::create();
    // A service of "forkd's host": listening in this (the daemon's)
    // namespace on the host end of the veth.
    let service = std::net::TcpListener::bind((host.gateway, 0)).unwrap();
    let port = service.local_addr().unwrap().port();
    service.set_nonblocking(true).unwrap();
    let enforcer = Enforcer::start(config(vec![])).unwrap();
    let child = NetnsChild::start();
    let egress = enforcer
        .attach(
            child.pidfd.as_fd(),
            admit(&[format!("{}:{port}", host.gateway)]),
        )
        .await
        .unwrap();
    let g = IpAddr::V4(host.gateway);
    let got = tokio::task::spawn_blocking(move || {
        child.run(move || {
            connect((g, port).into())
                .and_then(|mut s| exchange(&mut s, b"x"))
                .map(|b| b.len())
        })
    })
    .await
    .unwrap();
    match got {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("{n} bytes from the host's own service"),
    }
    assert!(
        service.accept().is_err(),
        "the host's service saw a connection"
    );
    let report = egress.finish();
    assert_eq!(report.connections_denied, 1);
    assert_eq!(
        report.log[0].reason.as_deref(),
        Some("an address of forkd's own host")
    );
}
