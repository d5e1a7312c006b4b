//! `forkd-bench`: measures a real forkd daemon through the client library.
//!
//! Every figure is taken in one run next to the **independent floor**
//! (`indep`, `bench/floor/`): a minimal fork server written for the bench,
//! sharing no code with forkd, that applies the same isolation steps, keeps a
//! warm pool and is driven in-process over pipes; each forkd figure is
//! reported as a ratio to the floor's figure for the same scenario, measured
//! right before it. The older **no-isolation reference** (`floor`: forkd's
//! own zygote forking the snippet with no isolation, driven through forkd's
//! pool code) is kept as a second line. A spawn counts only if it printed
//! the expected output.

mod branch;
mod check;
mod coldembedded;
mod floor;
mod hostcpu;
mod indep;
mod sessions;

use std::path::PathBuf;
use std::sync::Arc;
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
    /// Session figures: create, cell round trip, streaming, idle memory, files.
    Sessions(sessions::SessionArgs),
    /// Live branch of a session (k=1 with 50 and 500 MB arrays, k=16) next to
    /// a plain Python os.fork floor.
    Branch(branch::BranchArgs),
    /// `forkd-run --embedded --warm-pool N -n N` against N concurrent cold
    /// `python -c` of the same snippet, alternating, several rounds.
    ColdVsEmbedded(coldembedded::ColdArgs),
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
    /// Throttle every sandbox's disk reads to this many bytes/s
    /// (`[limits.io] read_bps`), to measure what the throttle costs per spawn.
    #[arg(long)]
    io_read_bps: Option<u64>,
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
    /// The independent floor's burst of the same size, each round measured
    /// right before forkd's.
    floor_walls_us: Vec<u64>,
    floor_median_wall_us: u64,
    floor_ok: u64,
    /// Median of the per-round ratios forkd ÷ floor.
    ratio_to_floor: f64,
    /// Per-sandbox latency from the burst's start, p99 (median over rounds).
    p99_us: u64,
    floor_p99_us: u64,
}

fn median_u64(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

fn median_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
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
    /// The independent floor with the same pool size (0: forked on demand).
    floor_single: Latency,
    /// Median USS of the floor's parked children.
    floor_idle_child_uss_bytes: Option<u64>,
    floor_sustained_per_sec: f64,
    floor_sustained_failed: u64,
    /// CPU per spawn split by process (single phase, sequential): forkd and
    /// the independent floor.
    single_cpu: Option<hostcpu::Split>,
    floor_single_cpu: Option<hostcpu::Split>,
    /// The same over the sustained phase.
    sustained_cpu: Option<hostcpu::Split>,
    floor_sustained_cpu: Option<hostcpu::Split>,
}

/// What the independent floor applies, for the record.
#[derive(Debug, Serialize, Default)]
struct FloorSetup {
    seccomp_instructions: usize,
    /// forkd's default policy's filter, for comparison.
    forkd_seccomp_instructions: usize,
    cgroup_mode: String,
    landlock_abi: i64,
    bound_paths: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    host: serde_json::Value,
    independent_floor: FloorSetup,
    /// The no-isolation reference (forkd's zygote without isolation).
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
    config.limits.io.read_bps = args.io_read_bps;
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
        let _ = h.record(forkd_bench::stats::micros(t.elapsed()).max(1));
        if matches!(&r, Ok(res) if res.stdout == EXPECTED.as_bytes()) {
            ok += 1;
        }
    }
    Latency::from(&h, ok)
}

async fn burst(client: &AsyncClient, n: usize, req: &SpawnRequest) -> (u64, u64) {
    let (wall, ok, _) = burst_timed(client, n, req).await;
    (wall, ok)
}

/// A burst of `n` concurrent spawns: (wall µs, verified, each spawn's
/// latency from the burst's start in µs).
async fn burst_timed(client: &AsyncClient, n: usize, req: &SpawnRequest) -> (u64, u64, Vec<u64>) {
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (c, req) = (client.clone(), req.clone());
        set.spawn(async move {
            let r = c.spawn(&req).await;
            (r, Instant::now())
        });
    }
    let (mut ok, mut last) = (0, t);
    let mut latencies = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        if let Ok((r, done)) = r {
            // The wall ends at the last result, as the floor's does (not
            // when this loop has joined every task).
            last = last.max(done);
            latencies.push(forkd_bench::stats::micros(done - t));
            if matches!(r, Ok(res) if res.stdout == EXPECTED.as_bytes()) {
                ok += 1;
            }
        }
    }
    (forkd_bench::stats::micros(last - t), ok, latencies)
}

/// The 99th percentile (nearest rank) of `v`, 0 when empty.
fn p99(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = (s.len() * 99).div_ceil(100);
    s.get(rank.saturating_sub(1)).copied().unwrap_or(0)
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

/// The zygote's pid and where its sandboxes' CPU time adds up, for the
/// CPU split.
async fn zygote_and_children(daemon: &forkd::state::State) -> (Option<i32>, Option<PathBuf>) {
    let pid = daemon
        .pool
        .get("default")
        .await
        .ok()
        .map(|z| z.process_id() as i32);
    (pid, hostcpu::cgroup_cpu_file(&daemon.cgroups.base_dirs()))
}

async fn run_mode(
    args: &Args,
    name: &str,
    warm_pool: usize,
    n_single: usize,
    indep: &Arc<indep::IndepFloor>,
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
    indep.set_pool(warm_pool).await?;
    let (zygote_pid, children_file) = zygote_and_children(&running.daemon).await;
    let floor_children = indep.info.cpu_usage_file.clone();
    let both_full = || async {
        indep.wait_full().await?;
        wait_pool_full(&running.daemon, warm_pool).await;
        anyhow::Ok(())
    };
    both_full().await?;
    if let Some(pool) = running.daemon.warm.get("default") {
        let sizes: Vec<u64> = pool.child_pids().into_iter().filter_map(uss).collect();
        if !sizes.is_empty() {
            let mut sorted = sizes.clone();
            sorted.sort_unstable();
            mode.idle_child_uss_bytes = Some(sorted[sorted.len() / 2]);
        }
    }
    let mut sizes: Vec<u64> = indep.parked_pids().into_iter().filter_map(uss).collect();
    sizes.sort_unstable();
    mode.floor_idle_child_uss_bytes = sizes.get(sizes.len() / 2).copied();
    let split = hostcpu::SplitMeter::start(Some(indep.server_pid), floor_children.clone());
    mode.floor_single = indep.single(n_single).await?;
    mode.floor_single_cpu = split.per_spawn(mode.floor_single.count);
    both_full().await?;
    let meter = hostcpu::Meter::start();
    let split = hostcpu::SplitMeter::start(zygote_pid, children_file.clone());
    mode.single = single(&client, n_single, &request()).await;
    mode.single_cpu_ms_per_spawn = meter.per_spawn_ms(mode.single.count);
    mode.single_cpu = split.per_spawn(mode.single.count);
    for &n in &args.bursts {
        let (mut walls, mut floor_walls, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut p99s, mut floor_p99s) = (Vec::new(), Vec::new());
        let (mut ok, mut floor_ok) = (0, 0);
        for _ in 0..args.rounds {
            both_full().await?;
            let (floor_wall, o, lat) = indep.burst_timed(n).await?;
            floor_walls.push(floor_wall);
            floor_p99s.push(p99(&lat));
            floor_ok += o;
            both_full().await?;
            let (wall, o, lat) = burst_timed(&client, n, &request()).await;
            walls.push(wall);
            p99s.push(p99(&lat));
            ok += o;
            ratios.push(wall as f64 / floor_wall.max(1) as f64);
        }
        mode.bursts.push(Burst {
            n,
            median_wall_us: median_u64(&walls),
            walls_us: walls,
            ok,
            attempted: (n * args.rounds) as u64,
            floor_median_wall_us: median_u64(&floor_walls),
            floor_walls_us: floor_walls,
            floor_ok,
            ratio_to_floor: median_f64(&ratios),
            p99_us: median_u64(&p99s),
            floor_p99_us: median_u64(&floor_p99s),
        });
    }
    both_full().await?;
    let split = hostcpu::SplitMeter::start(Some(indep.server_pid), floor_children);
    let (rate, ok, failed) = indep
        .sustained(args.sustained_secs, args.concurrency)
        .await?;
    mode.floor_sustained_per_sec = rate;
    mode.floor_sustained_failed = failed;
    mode.floor_sustained_cpu = split.per_spawn(ok + failed);
    both_full().await?;
    let meter = hostcpu::Meter::start();
    let split = hostcpu::SplitMeter::start(zygote_pid, children_file);
    let (rate, ok, failed) = sustained(&client, args.sustained_secs, args.concurrency).await;
    mode.sustained_cpu_ms_per_spawn = meter.per_spawn_ms(ok + failed);
    mode.sustained_cpu = split.per_spawn(ok + failed);
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

fn split_line(label: &str, s: Option<hostcpu::Split>, zygote: &str) -> String {
    match s {
        Some(s) => format!(
            "{label}: {:.2} ms = this process {:.2} + {zygote} {:.2} + sandboxes {:.2} + rest of host {:.2}",
            s.total_ms, s.bench_process_ms, s.zygote_ms, s.children_ms, s.rest_ms
        ),
        None => format!("{label}: unreadable"),
    }
}

fn print_table(r: &Report) {
    println!("forkd-bench — host: {}", r.host);
    let f = &r.independent_floor;
    println!(
        "independent floor (bench/floor: minimal fork server, same isolation, no forkd code): seccomp {} BPF instructions (forkd {}), cgroup {}, landlock ABI {}, {} bound paths",
        f.seccomp_instructions,
        f.forkd_seccomp_instructions,
        f.cgroup_mode,
        f.landlock_abi,
        f.bound_paths.len()
    );
    println!(
        "no-isolation reference (forkd's zygote, fork + snippet, no isolation): p50 {}  p90 {}  p99 {}  ({} of {} ok)",
        ms(r.floor.p50_us),
        ms(r.floor.p90_us),
        ms(r.floor.p99_us),
        r.floor.ok,
        r.floor.count
    );
    let cpu = |ms: Option<f64>| ms.map_or("unreadable".to_string(), |v| format!("{v:.2} ms"));
    println!(
        "host CPU per spawn (all processes, /proc/stat): no-isolation reference {} (sequential)",
        cpu(r.floor_cpu_ms_per_spawn)
    );
    for m in &r.modes {
        println!(
            "\n## {} (warm pool {}; the floor's pool the same)",
            m.name, m.warm_pool
        );
        println!(
            "single spawn: p50 {}  p90 {}  p99 {}  max {}  ({} of {} ok)  = {:.2}× floor p50, {:.2}× floor p99; {:.2}× no-isolation reference p50",
            ms(m.single.p50_us),
            ms(m.single.p90_us),
            ms(m.single.p99_us),
            ms(m.single.max_us),
            m.single.ok,
            m.single.count,
            m.single.p50_us as f64 / m.floor_single.p50_us.max(1) as f64,
            m.single.p99_us as f64 / m.floor_single.p99_us.max(1) as f64,
            m.single.p50_us as f64 / r.floor.p50_us.max(1) as f64
        );
        println!(
            "  floor single: p50 {}  p90 {}  p99 {}  max {}  ({} of {} ok)",
            ms(m.floor_single.p50_us),
            ms(m.floor_single.p90_us),
            ms(m.floor_single.p99_us),
            ms(m.floor_single.max_us),
            m.floor_single.ok,
            m.floor_single.count
        );
        for b in &m.bursts {
            println!(
                "burst N={:<5} median wall {:>10} = {:.2}× floor (median of per-round ratios); floor {:>10}; per-sandbox p99 {} (floor {})  ({} / {} of {} ok; rounds {:?} / floor {:?} µs)",
                b.n,
                ms(b.median_wall_us),
                b.ratio_to_floor,
                ms(b.floor_median_wall_us),
                ms(b.p99_us),
                ms(b.floor_p99_us),
                b.ok,
                b.floor_ok,
                b.attempted,
                b.walls_us,
                b.floor_walls_us
            );
        }
        println!(
            "sustained: {:.0} spawns/s ({} ok, {} failed) = {:.2}× floor's {:.0}/s",
            m.sustained_per_sec,
            m.sustained_ok,
            m.sustained_failed,
            m.sustained_per_sec / m.floor_sustained_per_sec.max(1e-9),
            m.floor_sustained_per_sec
        );
        let ratio = match (m.single_cpu_ms_per_spawn, r.floor_cpu_ms_per_spawn) {
            (Some(a), Some(f)) if f > 0.0 => format!(" = {:.2}× no-isolation reference", a / f),
            _ => String::new(),
        };
        println!(
            "host CPU per spawn: single {}{ratio}; sustained {}",
            cpu(m.single_cpu_ms_per_spawn),
            cpu(m.sustained_cpu_ms_per_spawn)
        );
        println!("CPU per spawn by process (ms; this process is daemon + client for forkd, the driver for the floor):");
        println!("  {}", split_line("forkd single", m.single_cpu, "zygote"));
        println!(
            "  {}",
            split_line("floor single", m.floor_single_cpu, "server")
        );
        println!(
            "  {}",
            split_line("forkd sustained", m.sustained_cpu, "zygote")
        );
        println!(
            "  {}",
            split_line("floor sustained", m.floor_sustained_cpu, "server")
        );
        if let Some(uss) = m.idle_child_uss_bytes {
            println!(
                "idle pooled child USS (median): {:.2} MB (floor's {})",
                uss as f64 / 1e6,
                m.floor_idle_child_uss_bytes
                    .map_or("–".into(), |b| format!("{:.2} MB", b as f64 / 1e6))
            );
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
        Some(Command::Sessions(args)) => runtime.block_on(sessions::run(args)),
        Some(Command::Branch(args)) => runtime.block_on(branch::run(args)),
        Some(Command::ColdVsEmbedded(args)) => runtime.block_on(coldembedded::run(args)),
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
    let indep = indep::IndepFloor::start(&args.python, &args.preload)?;
    let independent_floor = FloorSetup {
        seccomp_instructions: indep.info.seccomp_instructions,
        forkd_seccomp_instructions: forkd_zygote::Policy::default_policy()
            .compile_seccomp()
            .map(|p| p.len())
            .unwrap_or(0),
        cgroup_mode: indep.info.cgroup_mode.clone(),
        landlock_abi: indep.info.landlock_abi,
        bound_paths: indep.info.bound.clone(),
    };
    let floor_zygote = floor::Floor::start(&args.python, &args.preload).await?;
    let meter = hostcpu::Meter::start();
    let floor = floor_zygote.single(args.single).await?;
    let floor_cpu_ms_per_spawn = meter.per_spawn_ms(floor.count);
    floor_zygote.drain().await;
    let (on, host) = run_mode(&args, "warm pool", pool, args.single, &indep).await?;
    let (off, _) = run_mode(&args, "no pool", 0, args.single, &indep).await?;
    indep.stop();
    let report = Report {
        host,
        independent_floor,
        floor,
        floor_cpu_ms_per_spawn,
        modes: vec![on, off],
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    let failures = report.modes.iter().any(|m| {
        m.single.ok != m.single.count
            || m.floor_single.ok != m.floor_single.count
            || m.floor_sustained_failed > 0
            || m.bursts
                .iter()
                .any(|b| b.ok != b.attempted || b.floor_ok != b.attempted)
    });
    if failures || report.floor.ok != report.floor.count {
        bail!("some spawns did not return the expected output");
    }
    Ok(())
}
