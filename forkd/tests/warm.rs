//! The warm pool: children forked and isolated before the request must serve
//! it exactly like on-demand ones, with the request's own limits.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::time::Duration;

use common::*;
use forkd_ipc::{KilledBy, Limits};

const POOL: usize = 6;

async fn pool_full(d: &TestDaemon) {
    let pool = d
        .daemon
        .warm
        .get("default")
        .expect("default zygote has a pool");
    assert!(
        wait_until(Duration::from_secs(20), || pool.ready() == POOL).await,
        "warm pool did not fill: {} of {POOL}",
        pool.ready()
    );
}

/// What a program can observe about its own isolation.
const PROBE: &str = r#"
import os, socket
status = open("/proc/self/status").read()
field = lambda name: status.split(name + ":")[1].split()[0]
try:
    open("/usr/forkd-x", "w"); w = "wrote"
except OSError as e:
    w = e.errno
print(socket.gethostname(), field("CapEff"), field("CapBnd"), field("NoNewPrivs"), field("Seccomp"),
      sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), w, os.getcwd(),
      sorted(os.listdir("/tmp")), open("/proc/self/uid_map").read().split(), sorted(os.environ))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_children_serve_requests_like_on_demand_ones() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = POOL).await;
    pool_full(&d).await;

    let warm = d.run(PROBE).await;
    assert!(
        warm.warm,
        "a request with default limits takes a parked child"
    );
    assert_eq!(warm.timings.fork_us, 0);
    assert_eq!(warm.exit_code, Some(0), "stderr: {}", warm.stderr_lossy());

    // Another scratch size cannot be changed inside a parked child: forked on demand.
    let mut r = req(PROBE);
    r.limits.scratch_bytes = Some(32 * 1024 * 1024);
    let cold = d.spawn(&r).await.unwrap();
    assert!(!cold.warm);
    assert!(cold.timings.fork_us > 0);
    assert_eq!(
        warm.stdout_lossy(),
        cold.stdout_lossy(),
        "a program must not be able to tell a warm child from an on-demand one"
    );
    assert!(warm
        .stdout_lossy()
        .starts_with("sandbox 0000000000000000 0000000000000000 1 2 [1] 30 /home/user"));

    // The numpy snippet, warm.
    let r = d.run("import numpy; print(numpy.zeros(5).tolist())").await;
    assert_eq!(
        (r.stdout_lossy().as_str(), r.warm),
        ("[0.0, 0.0, 0.0, 0.0, 0.0]\n", true)
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limits_are_applied_to_a_warm_child() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = POOL).await;
    pool_full(&d).await;
    // The pool's children have the default 512 MiB; this request asks for 48 MiB.
    let mut r = req("b = bytearray(200 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')");
    r.limits = Limits {
        memory_bytes: Some(48 * 1024 * 1024),
        pids: Some(8),
        ..Limits::default()
    };
    let res = d.spawn(&r).await.unwrap();
    assert!(res.warm);
    assert_eq!(
        (res.killed_by, res.signal),
        (Some(KilledBy::Oom), Some(9)),
        "stdout {}",
        res.stdout_lossy()
    );
    assert_eq!(res.limits.memory_bytes, 48 * 1024 * 1024);

    // pids lowered too: the ninth process cannot start.
    let mut r = req("import os, sys\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            import time; time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError:\n    print(n); sys.exit(3)");
    r.limits.pids = Some(8);
    let res = d.spawn(&r).await.unwrap();
    assert!(res.warm);
    assert_eq!(
        (res.exit_code, res.killed_by),
        (Some(3), Some(KilledBy::Pids))
    );
    assert_eq!(
        res.stdout_lossy(),
        "7\n",
        "8 processes: the program and 7 children"
    );

    // A later default request is not affected by those limits.
    let res = d
        .run("b = bytearray(100 * 1024 * 1024); print(len(b) > 0)")
        .await;
    assert_eq!(
        (res.stdout_lossy().as_str(), res.killed_by),
        ("True\n", None)
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_timeouts_count_from_the_hand_off_and_stdin_flows() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = POOL).await;
    pool_full(&d).await;
    // Parked for a while already: the 400 ms must start at the request.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut r = req("import time; time.sleep(0.2); print('done')");
    r.timeout_ms = Some(400);
    let res = d.spawn(&r).await.unwrap();
    assert!(res.warm);
    assert_eq!(
        (res.stdout_lossy().as_str(), res.killed_by),
        ("done\n", None)
    );

    let mut r = req("while True: pass");
    r.timeout_ms = Some(300);
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(res.killed_by, Some(KilledBy::Timeout));
    assert!(res.timings.total_us < 2_000_000);

    // A megabyte of stdin after the job on the same pipe.
    let mut r = req(
        "import sys; d = sys.stdin.buffer.read(); print(len(d), sum(d), d[:4].hex(), d[-4:].hex())",
    );
    r.stdin = (0..1_048_576u32).map(|i| (i * 7 % 251) as u8).collect();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let expected = format!(
        "{} {} {} {}\n",
        r.stdin.len(),
        r.stdin.iter().map(|&b| u64::from(b)).sum::<u64>(),
        hex(&r.stdin[..4]),
        hex(&r.stdin[r.stdin.len() - 4..])
    );
    let res = d.spawn(&r).await.unwrap();
    assert!(res.warm);
    assert_eq!(res.stdout_lossy(), expected);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_refills_and_survives_a_zygote_crash() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = POOL).await;
    pool_full(&d).await;
    let client = d.client().await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..(POOL * 3) {
        let c = client.clone();
        set.spawn(async move { c.spawn(&req("print(1)")).await });
    }
    let mut warm = 0;
    while let Some(r) = set.join_next().await {
        let r = r.unwrap().unwrap();
        assert_eq!(r.stdout, b"1\n");
        warm += usize::from(r.warm);
    }
    assert!(warm >= POOL, "only {warm} of {} were warm", POOL * 3);
    pool_full(&d).await;

    // Parked children die with their zygote; the pool refills from the new one.
    let old = d.zygote_pid().await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !proc_alive(old)).await,
        "zygote {old} survived SIGKILL"
    );
    let mut served = None;
    for _ in 0..200 {
        if let Ok(r) = d.spawn(&req("print(2)")).await {
            if r.warm {
                served = Some(r);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = served.expect("a warm child from the restarted zygote");
    assert_eq!(r.stdout, b"2\n");
    assert_ne!(d.zygote_pid().await, old);
    drop(client);
    d.finish().await;
}

fn proc_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_warm_children_are_replaced() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.zygotes[0].warm_pool = POOL;
        c.zygotes[0].warm_max_idle_secs = Some(1);
    })
    .await;
    pool_full(&d).await;
    let pool = d.daemon.warm.get("default").unwrap();
    let before: std::collections::BTreeSet<i32> = pool.child_pids().into_iter().collect();
    let replaced = wait_until(Duration::from_secs(10), || {
        let now: std::collections::BTreeSet<i32> = pool.child_pids().into_iter().collect();
        now.len() == POOL && now.is_disjoint(&before)
    })
    .await;
    assert!(replaced, "children parked past max idle were not replaced");
    // The replaced ones are gone from the host.
    for pid in &before {
        assert!(
            wait_until(Duration::from_secs(5), || !proc_alive(*pid)).await,
            "idle child {pid} still running"
        );
    }
    assert!(
        pool.stats()
            .discarded
            .load(std::sync::atomic::Ordering::Relaxed)
            >= POOL as u64
    );
    let r = d.run("print('fresh')").await;
    assert_eq!((r.stdout_lossy().as_str(), r.warm), ("fresh\n", true));
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_pool_grows_on_misses_and_shrinks_when_idle() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        let z = &mut c.zygotes[0];
        z.warm_pool = 2;
        z.warm_pool_min = Some(1);
        z.warm_pool_max = Some(8);
        z.warm_shrink_after_secs = 1;
    })
    .await;
    let pool = d.daemon.warm.get("default").unwrap();
    assert_eq!((pool.target(), pool.bounds()), (2, (1, 8)));
    assert!(wait_until(Duration::from_secs(20), || pool.ready() == 2).await);

    // A burst larger than the pool: the requests that find it empty are
    // forked on demand and each doubles the target, up to the maximum.
    let client = d.client().await;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..8 {
        let client = client.clone();
        burst.spawn(async move { (i, client.spawn(&req(&format!("print({i})"))).await) });
    }
    while let Some(joined) = burst.join_next().await {
        let (i, r) = joined.expect("task");
        assert_eq!(r.expect("spawn").stdout_lossy(), format!("{i}\n"));
    }
    drop(client);
    let missed = pool
        .stats()
        .misses
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(missed >= 1, "an 8-request burst must miss a pool of 2");
    assert!(
        wait_until(Duration::from_secs(30), || pool.ready() > 2).await,
        "the pool did not grow after misses (target {})",
        pool.target()
    );
    let grown = pool.target();
    assert!(grown > 2 && grown <= 8, "target {grown}");

    // Idle: every window halves the unused headroom, down to the minimum,
    // and the surplus children are killed.
    assert!(
        wait_until(Duration::from_secs(30), || pool.target() == 1
            && pool.ready() == 1)
        .await,
        "the idle pool did not shrink to its minimum (target {}, ready {})",
        pool.target(),
        pool.ready()
    );
    assert!(
        pool.stats()
            .shrunk
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let r = d.run("print('after')").await;
    assert_eq!((r.stdout_lossy().as_str(), r.warm), ("after\n", true));
    d.finish().await;
}
