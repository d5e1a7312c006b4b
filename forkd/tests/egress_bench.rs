//! Egress benchmarks (not run by default: `cargo test --release -p forkd
//! --test egress_bench -- --ignored --nocapture`). They print figures and
//! assert only that the work was done; the targets (spawn with an allowlist
//! ≤ +0.5 ms p50 over one without, with a warm pool; ≥ 1 Gbit/s through the
//! proxy) are judged by reading them. Noisy on shared machines.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;
#[path = "../../net/tests/testbed/mod.rs"]
mod testbed;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use testbed::TestHost;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn spawn_with_an_allowlist_costs_little_over_one_without() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let n: usize = std::env::var("FORKD_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let d = TestDaemon::start(|_| {}).await;
    let plain = req("pass");
    let mut with = req("pass");
    // Nothing is sent: the program does not use the network.
    with.allow_net = vec!["198.18.0.1:443".into(), "pkg.test:443".into()];
    for _ in 0..20 {
        d.spawn(&plain).await.unwrap();
        d.spawn(&with).await.unwrap();
    }
    let (mut a, mut b, mut a_srv, mut b_srv) = (vec![], vec![], vec![], vec![]);
    let mut warm = (0, 0);
    for _ in 0..n {
        // Let the pool refill so both kinds get a warm child.
        tokio::time::sleep(Duration::from_millis(15)).await;
        let t = Instant::now();
        let r = d.spawn(&plain).await.unwrap();
        a.push(t.elapsed().as_secs_f64() * 1e3);
        a_srv.push(r.timings.total_us as f64 / 1e3);
        warm.0 += usize::from(r.warm);
        tokio::time::sleep(Duration::from_millis(15)).await;
        let t = Instant::now();
        let r = d.spawn(&with).await.unwrap();
        b.push(t.elapsed().as_secs_f64() * 1e3);
        b_srv.push(r.timings.total_us as f64 / 1e3);
        warm.1 += usize::from(r.warm);
        assert!(r.network.is_some());
    }
    println!(
        "spawn, {n} each, alternating; warm children: {}/{n} without, {}/{n} with",
        warm.0, warm.1
    );
    println!(
        "  client wall p50: without {:.3} ms, with allow_net {:.3} ms, delta {:+.3} ms (p90 {:.3} / {:.3})",
        pct(&mut a, 0.5),
        pct(&mut b, 0.5),
        pct(&mut b, 0.5) - pct(&mut a, 0.5),
        pct(&mut a, 0.9),
        pct(&mut b, 0.9)
    );
    println!(
        "  daemon total_us p50: without {:.3} ms, with {:.3} ms, delta {:+.3} ms",
        pct(&mut a_srv, 0.5),
        pct(&mut b_srv, 0.5),
        pct(&mut b_srv, 0.5) - pct(&mut a_srv, 0.5)
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn throughput_through_the_proxy() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let mib: u64 = std::env::var("FORKD_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let host = TestHost::create();
    host.sink(9000);
    // The veth path alone, from the host's namespace (the ceiling).
    let addr = std::net::SocketAddr::from((host.addr, 9000));
    let direct = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let buf = vec![7u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..mib {
            s.write_all(&buf).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut ack = String::new();
        s.read_to_string(&mut ack).unwrap();
        assert_eq!(ack, (mib << 20).to_string());
        (mib << 20) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
    })
    .await
    .unwrap();
    let d = TestDaemon::start(|_| {}).await;
    let mut r = req(concat!(
        "import socket, sys, time\n",
        "mib = int(sys.argv[2])\n",
        "s = socket.create_connection((sys.argv[1], 9000))\n",
        "buf = b'x' * (1 << 20)\n",
        "t = time.monotonic()\n",
        "for _ in range(mib): s.sendall(buf)\n",
        "s.shutdown(socket.SHUT_WR)\n",
        "ack = s.recv(64).decode()\n",
        "dt = time.monotonic() - t\n",
        "assert ack == str(mib << 20), ack\n",
        "print(mib * (1 << 20) * 8 / dt / 1e9)\n",
    ));
    r.argv = vec![host.addr.to_string(), mib.to_string()];
    r.allow_net = vec![format!("{}:9000", host.addr)];
    r.timeout_ms = Some(120_000);
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(
        res.exit_code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let gbps: f64 = String::from_utf8_lossy(&res.stdout).trim().parse().unwrap();
    let net = res.network.unwrap();
    assert_eq!(net.bytes_out, mib << 20);
    println!(
        "throughput, {mib} MiB sandbox -> test host: {gbps:.2} Gbit/s through the proxy; {direct:.2} Gbit/s host -> test host directly"
    );
    d.finish().await;
}
