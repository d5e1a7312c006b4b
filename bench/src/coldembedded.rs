//! `forkd-bench cold-vs-embedded`: issue 13's command-line target, side by
//! side in one run. Each round runs, in alternating order:
//!
//! * **embedded**: `forkd-run --embedded --warm-pool N -n N` of the snippet,
//!   as a user would type it; its own report gives the wall of the N
//!   concurrent spawns (first request → last verified result, after the
//!   embedded daemon is up and its pool full), and the bench times the
//!   whole command (daemon start, pool fill, spawns, shutdown) from outside;
//! * **cold**: N concurrent `python -c` of the same snippet with the same
//!   interpreter, wall from the first start to the last verified output —
//!   once with BLAS limited to one thread as forkd's zygote runs it (the
//!   cheaper cold start, so the ratio to it is the conservative one), and
//!   once with the environment as it is.
//!
//! Reported: medians over rounds and the median of the per-round ratios
//! cold ÷ embedded, with the load average at the start and the cores others
//! kept busy before each round.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::{EXPECTED, SNIPPET};

#[derive(clap::Args, Debug)]
pub struct ColdArgs {
    /// Interpreter of the zygote and of the cold runs (e.g. .venv/bin/python).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Concurrent sandboxes / cold interpreters per round (and the warm pool).
    #[arg(short = 'n', long, default_value_t = 100)]
    n: usize,
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The forkd-run binary (default: next to forkd-bench).
    #[arg(long)]
    forkd_run: Option<PathBuf>,
    /// Skip the cold runs with the environment as it is (BLAS threads).
    #[arg(long)]
    no_default_env: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Small, fast run (smoke test): n = 10, 2 rounds.
    #[arg(long)]
    quick: bool,
}

/// One round's figures, in ms.
#[derive(Debug, Serialize, Clone, Default)]
struct Round {
    /// Cores others kept busy in 0.3 s before the round (nothing of ours
    /// running).
    others_busy_cores: Option<f64>,
    /// forkd-run's wall of the N spawns (pool full, daemon up).
    embedded_burst_ms: f64,
    /// The whole `forkd-run --embedded` command, timed from outside.
    embedded_command_ms: f64,
    /// forkd-run's "embedded daemon ready in" (start + pool fill).
    embedded_ready_ms: f64,
    cold_single_thread_ms: f64,
    cold_default_env_ms: Option<f64>,
}

#[derive(Debug, Serialize, Default)]
struct Report {
    n: usize,
    /// The 1-minute load average when the run started (later ones include
    /// the cold runs' own hundred processes).
    load_average_at_start: Option<f64>,
    python: String,
    rounds: Vec<Round>,
    median_embedded_burst_ms: f64,
    median_embedded_command_ms: f64,
    median_cold_single_thread_ms: f64,
    median_cold_default_env_ms: Option<f64>,
    /// Median of per-round cold (one BLAS thread) ÷ embedded burst.
    speedup_burst: f64,
    /// Median of per-round cold (default environment) ÷ embedded burst.
    speedup_burst_default_env: Option<f64>,
    /// Median of per-round cold (one BLAS thread) ÷ the whole command.
    speedup_command: f64,
}

fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = v.into_iter().collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// `forkd-run` next to this executable.
fn find_forkd_run() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating forkd-bench")?;
    let p = exe.parent().unwrap_or(Path::new(".")).join("forkd-run");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build it with `cargo build --release -p forkd` or pass --forkd-run",
            p.display()
        )
    }
}

/// N concurrent cold interpreters; wall from the first start to the last
/// verified output.
fn cold(python: &Path, n: usize, single_thread: bool) -> Result<f64> {
    let t = Instant::now();
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cmd = Command::new(python);
        cmd.args(["-c", SNIPPET])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if single_thread {
            for v in ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
                cmd.env(v, "1");
            }
        }
        children.push(
            cmd.spawn()
                .with_context(|| format!("starting {}", python.display()))?,
        );
    }
    let mut failed = Vec::new();
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() || out.stdout != EXPECTED.as_bytes() {
            failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    let wall = ms_since(t);
    if let Some(first) = failed.first() {
        bail!(
            "{} of {n} cold interpreters did not print the expected output: {first}",
            failed.len()
        );
    }
    Ok(wall)
}

/// One `forkd-run --embedded` command: (its burst wall, its ready time,
/// the whole command's wall).
fn embedded(forkd_run: &Path, python: &Path, n: usize) -> Result<(f64, f64, f64)> {
    let t = Instant::now();
    let out = Command::new(forkd_run)
        .arg("--embedded")
        .arg("--python")
        .arg(python)
        .args(["--preload", "numpy", "--warm-pool"])
        .arg(n.to_string())
        .arg("-n")
        .arg(n.to_string())
        .args(["--expect", EXPECTED.trim_end(), "-c", SNIPPET])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", forkd_run.display()))?;
    let command = ms_since(t);
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("forkd-run failed ({}): {text}", out.status);
    }
    // "ok 100/100  wall 351.6 ms ..." and "... daemon ready in 736 ms (...".
    let number_after = |key: &str| -> Option<f64> {
        let rest = &text[text.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let ok = format!("ok {n}/{n} ");
    if !text.contains(&ok) {
        bail!("forkd-run did not report {ok}: {text}");
    }
    let burst = number_after("  wall ").context("forkd-run's wall figure")?;
    let ready = number_after("ready in ").context("forkd-run's ready figure")?;
    Ok((burst, ready, command))
}

pub async fn run(mut args: ColdArgs) -> Result<std::process::ExitCode> {
    if args.quick {
        args.n = 10;
        args.rounds = 2;
    }
    let forkd_run = match &args.forkd_run {
        Some(p) => p.clone(),
        None => find_forkd_run()?,
    };
    let report = tokio::task::spawn_blocking(move || measure(&args, &forkd_run)).await??;
    print(&report);
    Ok(std::process::ExitCode::SUCCESS)
}

fn measure(args: &ColdArgs, forkd_run: &Path) -> Result<Report> {
    let load_average_at_start = crate::hostcpu::load_average();
    let mut rounds = Vec::with_capacity(args.rounds);
    for i in 0..args.rounds {
        let mut r = Round {
            others_busy_cores: crate::hostcpu::others_busy_cores(Duration::from_millis(300)),
            ..Round::default()
        };
        // Alternate which goes first, so neither always follows the other's
        // teardown.
        let run_embedded = |r: &mut Round| -> Result<()> {
            (
                r.embedded_burst_ms,
                r.embedded_ready_ms,
                r.embedded_command_ms,
            ) = embedded(forkd_run, &args.python, args.n)?;
            Ok(())
        };
        let run_cold = |r: &mut Round| -> Result<()> {
            r.cold_single_thread_ms = cold(&args.python, args.n, true)?;
            if !args.no_default_env {
                r.cold_default_env_ms = Some(cold(&args.python, args.n, false)?);
            }
            Ok(())
        };
        if i % 2 == 0 {
            run_embedded(&mut r)?;
            run_cold(&mut r)?;
        } else {
            run_cold(&mut r)?;
            run_embedded(&mut r)?;
        }
        eprintln!(
            "round {}: others busy {}; embedded burst {:.1} ms (command {:.0} ms); cold {:.0} ms{}",
            i + 1,
            cores(r.others_busy_cores),
            r.embedded_burst_ms,
            r.embedded_command_ms,
            r.cold_single_thread_ms,
            r.cold_default_env_ms
                .map(|c| format!(", with BLAS threads {c:.0} ms"))
                .unwrap_or_default()
        );
        rounds.push(r);
    }
    let with_default = !args.no_default_env;
    let report = Report {
        n: args.n,
        load_average_at_start,
        python: args.python.display().to_string(),
        median_embedded_burst_ms: median(rounds.iter().map(|r| r.embedded_burst_ms)),
        median_embedded_command_ms: median(rounds.iter().map(|r| r.embedded_command_ms)),
        median_cold_single_thread_ms: median(rounds.iter().map(|r| r.cold_single_thread_ms)),
        median_cold_default_env_ms: with_default
            .then(|| median(rounds.iter().filter_map(|r| r.cold_default_env_ms))),
        speedup_burst: median(
            rounds
                .iter()
                .map(|r| r.cold_single_thread_ms / r.embedded_burst_ms),
        ),
        speedup_burst_default_env: with_default.then(|| {
            median(
                rounds
                    .iter()
                    .filter_map(|r| Some(r.cold_default_env_ms? / r.embedded_burst_ms)),
            )
        }),
        speedup_command: median(
            rounds
                .iter()
                .map(|r| r.cold_single_thread_ms / r.embedded_command_ms),
        ),
        rounds,
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

fn cores(c: Option<f64>) -> String {
    c.map_or_else(|| "?".into(), |c| format!("{c:.2} cores"))
}

fn print(r: &Report) {
    let busy: Vec<String> = r
        .rounds
        .iter()
        .map(|x| cores(x.others_busy_cores))
        .collect();
    println!(
        "cold vs embedded, N={} ({} rounds, medians; load average at start {}; others busy before each round: {})",
        r.n,
        r.rounds.len(),
        r.load_average_at_start
            .map_or_else(|| "?".into(), |l| format!("{l:.2}")),
        busy.join(", ")
    );
    println!(
        "  forkd-run --embedded --warm-pool {n} -n {n}: {:.1} ms for the {n} spawns (whole command {:.0} ms: daemon start, pool fill, spawns, shutdown)",
        r.median_embedded_burst_ms,
        r.median_embedded_command_ms,
        n = r.n
    );
    println!(
        "  {} concurrent cold `python -c` (one BLAS thread): {:.0} ms -> forkd {:.1}x faster (whole command: {:.1}x)",
        r.n, r.median_cold_single_thread_ms, r.speedup_burst, r.speedup_command
    );
    if let (Some(c), Some(s)) = (r.median_cold_default_env_ms, r.speedup_burst_default_env) {
        println!(
            "  {} concurrent cold `python -c` (environment as is, BLAS threads): {c:.0} ms -> forkd {s:.1}x faster",
            r.n
        );
    }
}
