//! `forkd-bench`: measures a real forkd daemon through the client library.
//!
//! Every figure is taken in one run next to the **floor reference**: the same
//! interpreter and preload list in a zygote of the same kind, forking the same
//! snippet with no isolation at all (no namespaces, cgroup, landlock or
//! seccomp; the bench drives that zygote directly, the daemon cannot be asked
//! for it). A spawn counts only if it printed the expected output.

mod check;
mod floor;
mod hostcpu;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use forkd_ipc::{AsyncClient, Program, SpawnRequest};
use hdrhistogram::Histogram;
use serde::Serialize;

const SNIPPET: &str = "import numpy; print(numpy.zeros(5).tolist())";
const EXPECTED: &str = "[0.0, 0.0, 0.0, 0.0, 0.0]\n";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmarks forkd against its own no-isolation floor",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Perf-regression check: measure rounds of same-run ratios to the floor
    /// and compare them with a baseline (exit 1 on a confirmed regression).
    Check(check::CheckArgs),
    /// Compare two recorded check runs (`check --out`) without measuring.
    Compare(check::CompareArgs),
}

#[derive(clap::Args, Debug)]
struct Args {
    /// Interpreter of the zygote (e.g. .venv/bin/python).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Preload modules.
    #[arg(long, value_delimiter = ',', default_value = "numpy")]
    preload: Vec<String>,
    /// Sequential spawns for the single-spawn latency.
    #[arg(long, default_value_t = 300)]
    single: usize,
    /// Burst sizes (N concurrent spawns).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    bursts: Vec<usize>,
    /// Rounds per burst size (the median wall is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of sustained load.
    #[arg(long, default_value_t = 5.0)]
    sustained_secs: f64,
    /// Concurrency of the sustained load.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Warm pool size for the pool-on runs (default: the largest burst).
    #[arg(long)]
    pool: Option<usize>,
    /// Write the full results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Small, fast run (smoke test).
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Serialize, Default, Clone)]
struct Latency {
    count: u64,
    ok: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl Latency {
    fn from(h: &Histogram<u64>, ok: u64) -> Latency {
        Latency {
            count: h.len(),
            ok,
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Serialize, Clone)]
struct Burst {
    n: usize,
    walls_us: Vec<u64>,
    median_wall_us: u64,
    ok: u64,
    attempted: u64,
}

#[derive(Debug, Serialize, Default, Clone)]
struct Mode {
    name: String,
    warm_pool: usize,
    single: Latency,
    bursts: Vec<Burst>,
    sustained_per_sec: f64,
    sustained_ok: u64,
    sustained_failed: u64,
    idle_child_uss_bytes: Option<u64>,
    /// Host CPU per spawn over the single-spawn phase (sequential, like the
    /// floor's), in ms: see `hostcpu`.
    single_cpu_ms_per_spawn: Option<f64>,
    /// Host CPU per spawn over the sustained phase, in ms.
    sustained_cpu_ms_per_spawn: Option<f64>,
    /// Median USS of children running a sleeping numpy program.
    running_child_uss_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    host: serde_json::Value,
    floor: Latency,
    /// Host CPU per floor spawn (sequential), in ms.
    floor_cpu_ms_per_spawn: Option<f64>,
    modes: Vec<Mode>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

fn request() -> SpawnRequest {
    SpawnRequest {
        program: Program::Code(SNIPPET.into()),
        timeout_ms: Some(30_000),
        ..SpawnRequest::default()
    }
}

fn host_facts(daemon: &forkd::state::State, python: &str) -> serde_json::Value {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cgroup_mode": format!("{:?}", daemon.cgroups.mode()),
        "python": python,
        "forkd": env!("CARGO_PKG_VERSION"),
    })
}

fn config(args: &Args, warm_pool: usize) -> forkd::Config {
    let mut config = forkd::Config::default();
    forkd::config::apply_overrides(
        &mut config,
        Some(args.python.clone()),
        Some(args.preload.clone()),
    );
    config.zygotes[0].warm_pool = warm_pool;
    config.max_concurrent = 4096;
    config
}

async fn wait_pool_full(daemon: &forkd::state::State, want: usize) {
    wait_zygote_pool_full(daemon, "default", want).await;
}

async fn wait_zygote_pool_full(daemon: &forkd::state::State, zygote: &str, want: usize) {
    let Some(pool) = daemon.warm.get(zygote) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.ready() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the refill's last children settle.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn single(client: &AsyncClient, n: usize, req: &SpawnRequest) -> Latency {
    let mut h = histogram();
    let mut ok = 0;
    for _ in 0..n {
        let t = Instant::now();
        let r = client.spawn(req).await;
        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
        if matches!(&r, Ok(res) if res.stdout == EXPECTED.as_bytes()) {
            ok += 1;
        }
    }
    Latency::from(&h, ok)
}

async fn burst(client: &AsyncClient, n: usize, req: &SpawnRequest) -> (u64, u64) {
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (c, req) = (client.clone(), req.clone());
        set.spawn(async move { c.spawn(&req).await });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(Ok(res)) if res.stdout == EXPECTED.as_bytes()) {
            ok += 1;
        }
    }
    (t.elapsed().as_micros() as u64, ok)
}

async fn sustained(client: &AsyncClient, secs: f64, concurrency: usize) -> (f64, u64, u64) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let c = client.clone();
        set.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < end {
                match c.spawn(&request()).await {
                    Ok(res) if res.stdout == EXPECTED.as_bytes() => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(Ok((o, f))) = set.join_next().await {
        ok += o;
        failed += f;
    }
    (ok as f64 / started.elapsed().as_secs_f64(), ok, failed)
}

/// Unique set size (private pages) of a process, from smaps_rollup.
fn uss(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((kb("Private_Clean:") + kb("Private_Dirty:")) * 1024)
}

/// Median USS of 10 sandboxes running the snippet and then sleeping: their
/// pids come from the sandbox cgroups (parked warm children excluded).
async fn running_uss(daemon: &forkd::state::State, client: &AsyncClient) -> Option<u64> {
    let parked: std::collections::BTreeSet<i32> =
        daemon.warm.values().flat_map(|p| p.child_pids()).collect();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let c = client.clone();
        set.spawn(async move {
            let mut r = request();
            r.program = Program::Code(format!("{SNIPPET}\nimport time; time.sleep(1.5)"));
            c.spawn(&r).await
        });
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut pids = std::collections::BTreeSet::new();
    for base in daemon.cgroups.base_dirs() {
        for sandbox in std::fs::read_dir(base).ok()?.flatten() {
            let procs =
                std::fs::read_to_string(sandbox.path().join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    let mut sizes: Vec<u64> = pids
        .into_iter()
        .filter(|p| !parked.contains(p))
        .filter_map(uss)
        .collect();
    while set.join_next().await.is_some() {}
    sizes.sort_unstable();
    sizes.get(sizes.len() / 2).copied()
}

async fn run_mode(
    args: &Args,
    name: &str,
    warm_pool: usize,
    n_single: usize,
) -> Result<(Mode, serde_json::Value)> {
    let dir = std::env::temp_dir().join(format!("forkd-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("forkd.sock");
    let running = forkd::start(config(args, warm_pool), Some(&socket)).await?;
    let host = host_facts(&running.daemon, &args.python.display().to_string());
    let client = AsyncClient::connect(&socket).await?;
    let mut mode = Mode {
        name: name.into(),
        warm_pool,
        ..Mode::default()
    };
    wait_pool_full(&running.daemon, warm_pool).await;
    if let Some(pool) = running.daemon.warm.get("default") {
        let sizes: Vec<u64> = pool.child_pids().into_iter().filter_map(uss).collect();
        if !sizes.is_empty() {
            let mut sorted = sizes.clone();
            sorted.sort_unstable();
            mode.idle_child_uss_bytes = Some(sorted[sorted.len() / 2]);
        }
    }
    let meter = hostcpu::Meter::start();
    mode.single = single(&client, n_single, &request()).await;
    mode.single_cpu_ms_per_spawn = meter.per_spawn_ms(mode.single.count);
    for &n in &args.bursts {
        let mut walls = Vec::new();
        let mut ok = 0;
        for _ in 0..args.rounds {
            wait_pool_full(&running.daemon, warm_pool).await;
            let (wall, o) = burst(&client, n, &request()).await;
            walls.push(wall);
            ok += o;
        }
        let mut sorted = walls.clone();
        sorted.sort_unstable();
        mode.bursts.push(Burst {
            n,
            median_wall_us: sorted[sorted.len() / 2],
            walls_us: walls,
            ok,
            attempted: (n * args.rounds) as u64,
        });
    }
    wait_pool_full(&running.daemon, warm_pool).await;
    let meter = hostcpu::Meter::start();
    let (rate, ok, failed) = sustained(&client, args.sustained_secs, args.concurrency).await;
    mode.sustained_cpu_ms_per_spawn = meter.per_spawn_ms(ok + failed);
    mode.sustained_per_sec = rate;
    mode.sustained_ok = ok;
    mode.sustained_failed = failed;
    mode.running_child_uss_bytes = running_uss(&running.daemon, &client).await;
    drop(client);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((mode, host))
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn print_table(r: &Report) {
    println!("forkd-bench — host: {}", r.host);
    println!(
        "floor (same zygote, fork + snippet, no isolation): p50 {}  p90 {}  p99 {}  ({} of {} ok)",
        ms(r.floor.p50_us),
        ms(r.floor.p90_us),
        ms(r.floor.p99_us),
        r.floor.ok,
        r.floor.count
    );
    let cpu = |ms: Option<f64>| ms.map_or("unreadable".to_string(), |v| format!("{v:.2} ms"));
    println!(
        "host CPU per spawn (all processes, /proc/stat): floor {} (sequential)",
        cpu(r.floor_cpu_ms_per_spawn)
    );
    for m in &r.modes {
        println!("\n## {} (warm pool {})", m.name, m.warm_pool);
        println!(
            "single spawn: p50 {}  p90 {}  p99 {}  max {}  ({} of {} ok)  = {:.2}× floor p50",
            ms(m.single.p50_us),
            ms(m.single.p90_us),
            ms(m.single.p99_us),
            ms(m.single.max_us),
            m.single.ok,
            m.single.count,
            m.single.p50_us as f64 / r.floor.p50_us.max(1) as f64
        );
        for b in &m.bursts {
            println!(
                "burst N={:<5} median wall {:>10}  ({} of {} ok; rounds {:?} µs)",
                b.n,
                ms(b.median_wall_us),
                b.ok,
                b.attempted,
                b.walls_us
            );
        }
        println!(
            "sustained: {:.0} spawns/s ({} ok, {} failed)",
            m.sustained_per_sec, m.sustained_ok, m.sustained_failed
        );
        let ratio = match (m.single_cpu_ms_per_spawn, r.floor_cpu_ms_per_spawn) {
            (Some(a), Some(f)) if f > 0.0 => format!(" = {:.2}× floor", a / f),
            _ => String::new(),
        };
        println!(
            "host CPU per spawn: single {}{ratio}; sustained {}",
            cpu(m.single_cpu_ms_per_spawn),
            cpu(m.sustained_cpu_ms_per_spawn)
        );
        if let Some(uss) = m.idle_child_uss_bytes {
            println!("idle pooled child USS (median): {:.2} MB", uss as f64 / 1e6);
        }
        if let Some(uss) = m.running_child_uss_bytes {
            println!(
                "running child USS (median of 10): {:.2} MB",
                uss as f64 / 1e6
            );
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = match cli.command {
        None => runtime
            .block_on(bench(cli.bench))
            .map(|()| std::process::ExitCode::SUCCESS),
        Some(Command::Check(args)) => runtime.block_on(check::run(args)),
        Some(Command::Compare(args)) => check::compare_files(args),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forkd-bench: {e:#}");
            // 3, not 1: a failure to measure is not a detected regression.
            std::process::ExitCode::from(3)
        }
    }
}

async fn bench(mut args: Args) -> Result<()> {
    if args.quick {
        args.single = 30;
        args.bursts = vec![1, 10];
        args.rounds = 2;
        args.sustained_secs = 1.0;
    }
    forkd::init_logging("warn", false);
    let pool = args
        .pool
        .unwrap_or_else(|| args.bursts.iter().copied().max().unwrap_or(16));
    let floor_zygote = floor::Floor::start(&args.python, &args.preload).await?;
    let meter = hostcpu::Meter::start();
    let floor = floor_zygote.single(args.single).await?;
    let floor_cpu_ms_per_spawn = meter.per_spawn_ms(floor.count);
    floor_zygote.drain().await;
    let (on, host) = run_mode(&args, "warm pool", pool, args.single).await?;
    let (off, _) = run_mode(&args, "no pool", 0, args.single).await?;
    let report = Report {
        host,
        floor,
        floor_cpu_ms_per_spawn,
        modes: vec![on, off],
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    let failures = report
        .modes
        .iter()
        .any(|m| m.single.ok != m.single.count || m.bursts.iter().any(|b| b.ok != b.attempted));
    if failures || report.floor.ok != report.floor.count {
        bail!("some spawns did not return the expected output");
    }
    Ok(())
}
