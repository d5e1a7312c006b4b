//! `forkd-bench sessions`: what sessions cost, each figure next to a
//! reference measured in the same run.
//!
//! * create: `session_create` from the warm pool, interleaved with warm
//!   one-shot spawns of the same daemon (target: create ≤ spawn + 10 %);
//! * cell round trip of `x + 1` through the Rust client, next to an
//!   independent floor: a plain Python process that `eval`s lines from a
//!   pipe and answers on another (no forkd code, no isolation);
//! * first streamed chunk: time from a `print` in the cell (its
//!   `time.time_ns()`) to the client holding the output event;
//! * idle USS per session (executor + interpreter), and N idle sessions at
//!   once, each still answering;
//! * file write and read of 100 MiB.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_ipc::{AsyncClient, Event, RunCode, SessionCreate};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct SessionArgs {
    /// Interpreter of the zygote (e.g. .venv/bin/python).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Preload modules.
    #[arg(long, value_delimiter = ',', default_value = "numpy")]
    preload: Vec<String>,
    /// Cells for the round-trip figure.
    #[arg(long, default_value_t = 2000)]
    cells: usize,
    /// Create/spawn pairs for the create figure.
    #[arg(long, default_value_t = 100)]
    creates: usize,
    /// Idle sessions held at once.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// File size for the throughput figure, MiB.
    #[arg(long, default_value_t = 100)]
    file_mib: usize,
    /// Warm pool size.
    #[arg(long, default_value_t = 16)]
    pool: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Small, fast run (smoke test).
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    create_p50_us: u64,
    warm_spawn_p50_us: u64,
    create_over_spawn: f64,
    cell_rtt_p50_us: u64,
    cell_rtt_p90_us: u64,
    floor_cell_rtt_p50_us: u64,
    cell_rtt_over_floor: f64,
    first_chunk_p50_us: u64,
    first_chunk_p90_us: u64,
    idle_session_uss_bytes: u64,
    idle_sessions: usize,
    idle_sessions_answering: usize,
    idle_create_secs: f64,
    file_write_mb_s: f64,
    file_read_mb_s: f64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn cell(session: &str, code: &str) -> RunCode {
    RunCode {
        session: session.into(),
        code: code.into(),
        timeout_ms: Some(60_000),
    }
}

pub async fn run(mut args: SessionArgs) -> Result<std::process::ExitCode> {
    if args.quick {
        args.cells = 200;
        args.creates = 20;
        args.idle = 50;
        args.file_mib = 16;
    }
    forkd::init_logging("warn", false);
    let dir = std::env::temp_dir().join(format!("forkd-bench-sessions-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("forkd.sock");
    let mut config = forkd::Config::default();
    forkd::config::apply_overrides(
        &mut config,
        Some(args.python.clone()),
        Some(args.preload.clone()),
    );
    config.zygotes[0].warm_pool = args.pool;
    config.max_concurrent = 4096;
    config.sessions.max = args.idle + 64;
    config.sessions.max_per_uid = args.idle + 64;
    config.limits.default.scratch_bytes = ((args.file_mib as u64) << 20) * 2 + (64 << 20);
    config.limits.default.file_size_bytes = ((args.file_mib as u64) << 20) * 2;
    config.limits.default.memory_bytes = ((args.file_mib as u64) << 20) * 3 + (512 << 20);
    config.limits.max.scratch_bytes = config
        .limits
        .max
        .scratch_bytes
        .max(config.limits.default.scratch_bytes);
    config.limits.max.file_size_bytes = config
        .limits
        .max
        .file_size_bytes
        .max(config.limits.default.file_size_bytes);
    config.limits.max.memory_bytes = config
        .limits
        .max
        .memory_bytes
        .max(config.limits.default.memory_bytes);
    let running = forkd::start(config, Some(&socket)).await?;
    let client = AsyncClient::connect(&socket).await?;
    let mut report = Report::default();
    let result = measure(&args, &running.daemon, &client, &mut report).await;
    drop(client);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn wait_pool(daemon: &forkd::state::State, want: usize) {
    let Some(pool) = daemon.warm.get("default") else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.ready() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn measure(
    args: &SessionArgs,
    daemon: &forkd::state::State,
    client: &AsyncClient,
    report: &mut Report,
) -> Result<()> {
    // create vs warm spawn, interleaved, each from a full pool.
    let spawn = forkd_ipc::SpawnRequest {
        program: forkd_ipc::Program::Code("pass".into()),
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    let (mut creates, mut spawns) = (crate::histogram(), crate::histogram());
    for _ in 0..args.creates {
        wait_pool(daemon, args.pool).await;
        let t = Instant::now();
        let s = client.session_create(&SessionCreate::default()).await?;
        creates.record(micros(t.elapsed()))?;
        client.session_kill(&s.session).await?;
        wait_pool(daemon, args.pool).await;
        let t = Instant::now();
        let r = client.spawn(&spawn).await?;
        spawns.record(micros(t.elapsed()))?;
        if r.exit_code != Some(0) {
            bail!("a warm spawn failed: {r:?}");
        }
    }
    report.create_p50_us = creates.value_at_quantile(0.5);
    report.warm_spawn_p50_us = spawns.value_at_quantile(0.5);
    report.create_over_spawn = report.create_p50_us as f64 / report.warm_spawn_p50_us.max(1) as f64;

    // Cell round trip, and the floor right after it.
    let s = client
        .session_create(&SessionCreate::default())
        .await?
        .session;
    client.run_code(&cell(&s, "x = 41")).await?;
    let mut rtt = crate::histogram();
    for _ in 0..args.cells {
        let t = Instant::now();
        let r = client.run_code(&cell(&s, "x + 1")).await?;
        rtt.record(micros(t.elapsed()))?;
        if r.text.as_deref() != Some("42") {
            bail!("a cell answered {r:?}");
        }
    }
    report.cell_rtt_p50_us = rtt.value_at_quantile(0.5);
    report.cell_rtt_p90_us = rtt.value_at_quantile(0.9);
    report.floor_cell_rtt_p50_us = floor_cell_rtt(&args.python, args.cells)?;
    report.cell_rtt_over_floor =
        report.cell_rtt_p50_us as f64 / report.floor_cell_rtt_p50_us.max(1) as f64;

    // First streamed chunk.
    let mut first = crate::histogram();
    for _ in 0..(args.cells / 20).max(10) {
        let mut stream = client
            .run_code_stream(&cell(
                &s,
                "import time\nprint(time.time_ns(), flush=True)\ntime.sleep(0.01)",
            ))
            .await?;
        match stream.next_event().await? {
            Some(Event::Output { data, .. }) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos();
                let printed: u128 = String::from_utf8_lossy(&data).trim().parse()?;
                first.record(
                    u64::try_from(now.saturating_sub(printed) / 1000).unwrap_or(u64::MAX),
                )?;
            }
            other => bail!("expected output first, got {other:?}"),
        }
        stream.cell().await?;
    }
    report.first_chunk_p50_us = first.value_at_quantile(0.5);
    report.first_chunk_p90_us = first.value_at_quantile(0.9);

    // Files.
    let data: Vec<u8> = (0..(args.file_mib << 20))
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let t = Instant::now();
    client.write_file(&s, "big.bin", &data, None).await?;
    report.file_write_mb_s = data.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = client.read_file(&s, "big.bin").await?;
    report.file_read_mb_s = back.len() as f64 / 1e6 / t.elapsed().as_secs_f64();
    if back != data {
        bail!("the file came back different");
    }
    client.remove_file(&s, "big.bin").await?;
    client.session_kill(&s).await?;

    // Idle sessions: N at once, each answering; USS per session.
    let t = Instant::now();
    let mut ids = Vec::with_capacity(args.idle);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..args.idle {
        let c = client.clone();
        set.spawn(async move { c.session_create(&SessionCreate::default()).await });
        if set.len() >= 16 {
            if let Some(r) = set.join_next().await {
                ids.push(r??.session);
            }
        }
    }
    while let Some(r) = set.join_next().await {
        ids.push(r??.session);
    }
    report.idle_create_secs = t.elapsed().as_secs_f64();
    report.idle_sessions = ids.len();
    let mut answering = 0;
    for id in &ids {
        // Every session starts its interpreter; the first cell waits for it.
        if client.run_code(&cell(id, "1 + 1")).await?.text.as_deref() == Some("2") {
            answering += 1;
        }
    }
    report.idle_sessions_answering = answering;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.idle_session_uss_bytes = session_uss(daemon).context("session USS")?;
    for id in &ids {
        client.session_kill(id).await?;
    }
    Ok(())
}

/// Median over sessions of the USS of all processes in one session's cgroup.
fn session_uss(daemon: &forkd::state::State) -> Option<u64> {
    let parked: std::collections::BTreeSet<i32> =
        daemon.warm.values().flat_map(|p| p.child_pids()).collect();
    let mut per = Vec::new();
    for base in daemon.cgroups.base_dirs() {
        for sandbox in std::fs::read_dir(base).ok()?.flatten() {
            let procs =
                std::fs::read_to_string(sandbox.path().join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.len() < 2 || pids.iter().any(|p| parked.contains(p)) {
                continue; // not a session (a parked child has one process)
            }
            per.push(pids.into_iter().filter_map(crate::uss).sum::<u64>());
        }
        if !per.is_empty() {
            break; // v1: the first hierarchy lists every sandbox already
        }
    }
    per.sort_unstable();
    per.get(per.len() / 2).copied()
}

/// The independent floor of a cell: a plain Python that evaluates a line
/// from one pipe and answers on another.
fn floor_cell_rtt(python: &PathBuf, n: usize) -> Result<u64> {
    let mut child = Command::new(python)
        .args([
            "-u",
            "-c",
            "import sys\nns = {'x': 41}\nfor line in sys.stdin:\n    print(repr(eval(compile(line, '<cell>', 'eval'), ns)), flush=True)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut h = crate::histogram();
    let mut line = String::new();
    for _ in 0..n {
        let t = Instant::now();
        stdin.write_all(b"x + 1\n")?;
        line.clear();
        stdout.read_line(&mut line)?;
        h.record(micros(t.elapsed()))?;
        if line.trim() != "42" {
            bail!("the floor answered {line:?}");
        }
    }
    drop(stdin);
    let _ = child.wait();
    Ok(h.value_at_quantile(0.5))
}

fn print(r: &Report) {
    println!("sessions (medians; same run):");
    println!(
        "  create {:.3} ms vs warm spawn {:.3} ms: {:.2}x",
        r.create_p50_us as f64 / 1e3,
        r.warm_spawn_p50_us as f64 / 1e3,
        r.create_over_spawn
    );
    println!(
        "  cell round trip (x + 1, Rust client) p50 {} us, p90 {} us; floor (plain Python over pipes) {} us: {:.2}x",
        r.cell_rtt_p50_us, r.cell_rtt_p90_us, r.floor_cell_rtt_p50_us, r.cell_rtt_over_floor
    );
    println!(
        "  first streamed chunk after the print: p50 {} us, p90 {} us",
        r.first_chunk_p50_us, r.first_chunk_p90_us
    );
    println!(
        "  idle session USS (executor + interpreter): {:.2} MB",
        r.idle_session_uss_bytes as f64 / 1e6
    );
    println!(
        "  {} idle sessions created in {:.1} s; {} answered a cell",
        r.idle_sessions, r.idle_create_secs, r.idle_sessions_answering
    );
    println!(
        "  files: write {:.0} MB/s, read {:.0} MB/s",
        r.file_write_mb_s, r.file_read_mb_s
    );
}
