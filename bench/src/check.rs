//! `forkd-bench check`: the perf-regression check (measuring side; the
//! statistics and the rule are in the library's `perfcheck` module).
//!
//! One embedded daemon with two zygotes (`pooled`: warm pool of `burst`
//! children; `nopool`: forked on demand), two independent floor servers
//! (bench/floor: pool of `burst`; none) and the no-isolation reference
//! zygote are started once. Each round then measures, back to back, each
//! forkd figure right after the floor figure it is divided by: floor single
//! → (no-isolation single) → warm single; floor burst, pool → (no-isolation
//! burst) → pooled burst; floor burst, no pool → no-pool burst; floor
//! sustained → sustained. (The no-isolation figures keep their place right
//! before forkd's, as in records taken before the floor existed.) Pools are refilled and the machine left to settle
//! before each figure, so one scenario's refill does not land in another's
//! measurement.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use forkd_bench::perfcheck::{self, HostFacts, Metric, Record, Reference, Round, Rule, Settings};
use forkd_ipc::{AsyncClient, SpawnRequest};

use crate::floor::Floor;
use crate::indep::IndepFloor;
use crate::{burst, request, single, sustained, uss, wait_zygote_pool_full};

const POOLED: &str = "pooled";
const NOPOOL: &str = "nopool";

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Interpreter of the zygotes (e.g. .venv/bin/python).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Preload modules.
    #[arg(long, value_delimiter = ',', default_value = "numpy")]
    preload: Vec<String>,
    /// Baseline to compare with (its settings are used for this run).
    #[arg(long, default_value = "bench/baseline.json")]
    baseline: PathBuf,
    /// Rounds to measure (and again as many to confirm a suspected
    /// regression).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Measure and rewrite the baseline instead of comparing (deliberate:
    /// needs --reason; commit the file with that reason).
    #[arg(long, requires = "reason")]
    update_baseline: bool,
    /// Why the baseline is being replaced (stored in the file).
    #[arg(long)]
    reason: Option<String>,
    /// Only measure and write --out, compare nothing (the base side of an
    /// A/B run).
    #[arg(long, requires = "out", conflicts_with = "update_baseline")]
    record_only: bool,
    /// Also write this run's record here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Append the comparison table (Markdown) to this file, e.g.
    /// $GITHUB_STEP_SUMMARY.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Compare even when the host's CPU count or cgroup mode differs from
    /// the baseline's (otherwise the check is skipped, loudly).
    #[arg(long)]
    ignore_host: bool,
    /// Sequential spawns per single-spawn figure (new baselines only).
    #[arg(long, default_value_t = 40)]
    single: usize,
    /// Concurrent spawns per burst, also the warm pool size (new baselines
    /// only).
    #[arg(long, default_value_t = 100)]
    burst: usize,
    /// Seconds of sustained load per round (new baselines only).
    #[arg(long, default_value_t = 1.5)]
    sustained_secs: f64,
    /// Concurrency of the sustained load (new baselines only).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The reference record (a baseline, or the base side of an A/B run).
    baseline: PathBuf,
    /// The record to judge.
    current: PathBuf,
    /// Append the comparison table (Markdown) to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Compare even when CPU count or cgroup mode differ.
    #[arg(long)]
    ignore_host: bool,
}

/// The independent floor with a warm pool of `burst`, and without one.
struct Indep {
    pool: Arc<IndepFloor>,
    nopool: Arc<IndepFloor>,
}

impl Indep {
    async fn start(args: &CheckArgs, burst: usize) -> Result<Indep> {
        let pool = IndepFloor::start(&args.python, &args.preload)?;
        let nopool = IndepFloor::start(&args.python, &args.preload)?;
        pool.set_pool(burst).await?;
        Ok(Indep { pool, nopool })
    }
}

/// What runs during a check: the floor zygote and an embedded daemon.
struct Bench {
    floor: Arc<Floor>,
    /// The independent floor with a warm pool of `burst`, and without one.
    /// `None` when the floor could not start on this host (the run is then
    /// judged on the no-isolation reference, loudly).
    indep: Option<Indep>,
    running: forkd::Running,
    client: AsyncClient,
    dir: PathBuf,
    settings: Settings,
    host: HostFacts,
}

impl Bench {
    async fn start(args: &CheckArgs, settings: Settings) -> Result<Bench> {
        // A floor that cannot run here (e.g. a cgroup setup it does not
        // handle) is not a regression: the check carries on with the
        // no-isolation reference every record has, and says so.
        let indep = match Indep::start(args, settings.burst).await {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!(
                    "forkd-bench check: WARNING: the independent floor could not start ({e:#}); \
                     this run records no floor figures and is compared on the no-isolation reference"
                );
                None
            }
        };
        let floor = Floor::start(&args.python, &args.preload).await?;
        let zygote = |name: &str, warm_pool: usize| forkd::config::ZygoteSection {
            name: name.into(),
            python: args.python.clone(),
            preload: args.preload.clone(),
            warm_pool,
            // No recycling mid-check: a zygote restart would land in one
            // round's figures and nowhere else.
            max_forks: None,
            max_age_secs: None,
            ..Default::default()
        };
        let config = forkd::Config {
            zygotes: vec![zygote(POOLED, settings.burst), zygote(NOPOOL, 0)],
            default_zygote: POOLED.into(),
            max_concurrent: 4096,
            ..Default::default()
        };
        let dir = std::env::temp_dir().join(format!("forkd-bench-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("forkd.sock");
        let running = forkd::start(config, Some(&socket)).await?;
        let client = AsyncClient::connect(&socket).await?;
        let host = HostFacts {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cgroup_mode: format!("{:?}", running.daemon.cgroups.mode()),
            python: interpreter_version(&args.python, &args.preload),
        };
        Ok(Bench {
            floor,
            indep,
            running,
            client,
            dir,
            settings,
            host,
        })
    }

    fn request(zygote: &str) -> SpawnRequest {
        SpawnRequest {
            zygote: Some(zygote.into()),
            ..request()
        }
    }

    /// Pools full again and the refills' last children settled.
    async fn settle(&self) -> Result<()> {
        if let Some(i) = &self.indep {
            i.pool.wait_full().await?;
        }
        wait_zygote_pool_full(&self.running.daemon, POOLED, self.settings.burst).await;
        Ok(())
    }

    /// Spawns whose figures are thrown away: first forks of fresh zygotes
    /// fault in pages every later fork shares.
    async fn warm_up(&self) -> Result<()> {
        self.settle().await?;
        if let Some(i) = &self.indep {
            i.pool.single(20).await?;
            i.nopool.single(20).await?;
        }
        self.floor.single(20).await?;
        single(&self.client, 20, &Self::request(POOLED)).await;
        single(&self.client, 20, &Self::request(NOPOOL)).await;
        self.floor.burst(self.settings.burst).await?;
        if let Some(i) = &self.indep {
            i.pool.burst(self.settings.burst).await?;
            i.nopool.burst(self.settings.burst).await?;
        }
        burst(&self.client, self.settings.burst, &Self::request(NOPOOL)).await;
        Ok(())
    }

    async fn round(&self) -> Result<Round> {
        let s = &self.settings;
        let verify = |what: &str, ok: u64, of: u64| -> Result<()> {
            if ok != of {
                bail!("{what}: {ok} of {of} spawns returned the expected output; that is a correctness failure, not a performance one (run `forkd-bench --quick` and the tests)");
            }
            Ok(())
        };
        self.settle().await?;
        let neighbour_cores = neighbour_cores(std::time::Duration::from_millis(300)).await;
        let idle_child_uss_bytes = self.idle_child_uss();
        let indep = self.indep.as_ref();
        let indep_single = match indep {
            Some(i) => Some(i.pool.single(s.single_spawns).await?),
            None => None,
        };
        if let Some(l) = &indep_single {
            verify("floor single", l.ok, l.count)?;
        }
        let floor_single = self.floor.single(s.single_spawns).await?;
        verify("no-isolation single", floor_single.ok, floor_single.count)?;
        let warm_single = single(&self.client, s.single_spawns, &Self::request(POOLED)).await;
        verify("warm single", warm_single.ok, warm_single.count)?;
        self.settle().await?;
        let mut indep_burst_pool = None;
        if let Some(i) = indep {
            let (wall, ok) = i.pool.burst(s.burst).await?;
            verify("floor burst, pool", ok, s.burst as u64)?;
            indep_burst_pool = Some(wall as f64);
            self.settle().await?;
        }
        let (floor_burst, ok) = self.floor.burst(s.burst).await?;
        verify("no-isolation burst", ok, s.burst as u64)?;
        let (burst_pool, ok) = burst(&self.client, s.burst, &Self::request(POOLED)).await;
        verify("burst, pool", ok, s.burst as u64)?;
        self.settle().await?;
        let mut indep_burst_nopool = None;
        if let Some(i) = indep {
            let (wall, ok) = i.nopool.burst(s.burst).await?;
            verify("floor burst, no pool", ok, s.burst as u64)?;
            indep_burst_nopool = Some(wall as f64);
            // Its children's teardown must not land in forkd's burst.
            self.settle().await?;
        }
        let (burst_nopool, ok) = burst(&self.client, s.burst, &Self::request(NOPOOL)).await;
        verify("burst, no pool", ok, s.burst as u64)?;
        self.settle().await?;
        let mut indep_rate = None;
        if let Some(i) = indep {
            let (rate, _, failed) = i
                .pool
                .sustained(s.sustained_secs, s.sustained_concurrency)
                .await?;
            verify("floor sustained", 0, failed)?;
            indep_rate = Some(rate);
            self.settle().await?;
        }
        let (rate, _, failed) =
            sustained(&self.client, s.sustained_secs, s.sustained_concurrency).await;
        verify("sustained", 0, failed)?;
        Ok(Round {
            floor_single_p50_us: floor_single.p50_us as f64,
            floor_burst_wall_us: floor_burst as f64,
            warm_single_p50_us: warm_single.p50_us as f64,
            burst_pool_wall_us: burst_pool as f64,
            burst_nopool_wall_us: burst_nopool as f64,
            sustained_per_sec: rate,
            idle_child_uss_bytes,
            neighbour_cores,
            indep_single_p50_us: indep_single.map(|l| l.p50_us as f64),
            indep_burst_pool_wall_us: indep_burst_pool,
            indep_burst_nopool_wall_us: indep_burst_nopool,
            indep_sustained_per_sec: indep_rate,
        })
    }

    fn idle_child_uss(&self) -> Option<f64> {
        let pool = self.running.daemon.warm.get(POOLED)?;
        let mut sizes: Vec<u64> = pool.child_pids().into_iter().filter_map(uss).collect();
        sizes.sort_unstable();
        sizes.get(sizes.len() / 2).map(|&b| b as f64)
    }

    async fn measure(&self, rounds: usize, label: &str) -> Result<Vec<Round>> {
        let mut out = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let t = Instant::now();
            let r = self.round().await?;
            // The values the rule will judge, with the reference they use.
            let reference = if self.indep.is_some() {
                Reference::IndependentFloor
            } else {
                Reference::NoIsolation
            };
            let v = |m: Metric| m.value(&r, &self.settings, reference).unwrap_or(f64::NAN);
            eprintln!(
                "forkd-bench check: {label}round {}/{rounds} ({:.1} s): single {:.3}, burst pool {:.3}, burst no pool {:.3}, sustained {:.3} × {}; others' load {} cores",
                i + 1,
                t.elapsed().as_secs_f64(),
                v(Metric::SingleWarm),
                v(Metric::BurstPool),
                v(Metric::BurstNoPool),
                v(Metric::Sustained),
                if self.indep.is_some() { "floor" } else { "no-isolation reference" },
                r.neighbour_cores.map(|c| format!("{c:.2}")).unwrap_or_else(|| "?".into()),
            );
            out.push(r);
        }
        Ok(out)
    }

    fn record(&self, rounds: Vec<Round>, reason: Option<String>) -> Record {
        Record {
            format: perfcheck::FORMAT,
            taken_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            commit: git_head(),
            reason,
            host: self.host.clone(),
            settings: self.settings.clone(),
            rounds,
        }
    }

    async fn stop(self) {
        drop(self.client);
        self.running.shutdown().await;
        self.floor.drain().await;
        if let Some(i) = &self.indep {
            i.pool.stop();
            i.nopool.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Cores kept busy by everything else while this process sits idle for
/// `window` (the pool is full and nothing of ours runs, so what burns CPU
/// belongs to other processes, plus the kernel's leftover cleanup of our
/// sandboxes).
async fn neighbour_cores(window: std::time::Duration) -> Option<f64> {
    // Steal counts as busy here: a neighbour guest slows us down too.
    let jiffies = || {
        let t = crate::hostcpu::CpuTimes::now()?;
        Some((t.busy + t.steal, t.busy + t.steal + t.idle))
    };
    let (busy0, total0) = jiffies()?;
    tokio::time::sleep(window).await;
    let (busy1, total1) = jiffies()?;
    let cpus = std::thread::available_parallelism().ok()?.get() as f64;
    let total = total1.checked_sub(total0)?;
    (total > 0).then(|| (busy1.saturating_sub(busy0)) as f64 / total as f64 * cpus)
}

/// `python --version` and the preload modules' versions, e.g.
/// "Python 3.11.7, numpy 2.4.6" (best effort: "unknown" if it fails).
fn interpreter_version(python: &Path, preload: &[String]) -> String {
    const SCRIPT: &str = "import importlib, sys\n\
        parts = ['Python ' + sys.version.split()[0]]\n\
        for m in sys.argv[1:]:\n    parts.append(m + ' ' + str(getattr(importlib.import_module(m), '__version__', '?')))\n\
        print(', '.join(parts))";
    std::process::Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .args(preload)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The measured tree's commit: `FORKD_BENCH_COMMIT` when set (an A/B run
/// measures two builds from one directory), else `git rev-parse HEAD`.
fn git_head() -> Option<String> {
    if let Some(commit) = std::env::var("FORKD_BENCH_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
    {
        return Some(commit);
    }
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn write_record(path: &Path, record: &Record) -> Result<()> {
    let json = serde_json::to_string_pretty(record)? + "\n";
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

fn append_summary(path: Option<&Path>, text: &str) -> Result<()> {
    if let Some(path) = path {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("appending the table to {}", path.display()))?;
        writeln!(f, "{text}")?;
    }
    Ok(())
}

/// The message for a host that differs from the baseline's in a way that
/// makes ratios incomparable; the check is then skipped, not failed.
fn skipped_for_host(blocking: &[String], baseline: &Path) -> String {
    let mut text = String::from(
        "### forkd perf-regression check: SKIPPED\n\n\
         This host differs from the one the baseline was taken on, in a way that changes the\n\
         ratios themselves, so comparing them would say nothing about the code:\n\n",
    );
    for line in blocking {
        text.push_str(&format!("- {line}\n"));
    }
    text.push_str(&format!(
        "\nTake a baseline on this kind of host (`forkd-bench check --update-baseline --reason '...' --baseline {}`), \
         run an A/B comparison (`check --record-only` on both trees, then `forkd-bench compare`), \
         or pass --ignore-host to compare anyway.\n",
        baseline.display()
    ));
    text
}

pub async fn run(args: CheckArgs) -> Result<ExitCode> {
    if args.rounds < 3 {
        bail!("--rounds {}: at least 3 are needed for a median and a permutation test (10 is the default)", args.rounds);
    }
    let started = Instant::now();
    let comparing = !args.update_baseline && !args.record_only;
    let baseline = if comparing {
        Some(Record::load(&args.baseline).with_context(|| {
            format!(
                "no usable baseline; take one with `forkd-bench check --update-baseline --reason '...' --baseline {}`",
                args.baseline.display()
            )
        })?)
    } else {
        None
    };
    let settings = match &baseline {
        Some(b) => b.settings.clone(),
        None => Settings {
            single_spawns: args.single,
            burst: args.burst,
            sustained_secs: args.sustained_secs,
            sustained_concurrency: args.concurrency,
        },
    };
    forkd::init_logging("warn", false);
    let bench = Bench::start(&args, settings).await?;
    let outcome = run_started(&args, &bench, baseline.as_ref()).await;
    bench.stop().await;
    eprintln!(
        "forkd-bench check: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    outcome
}

async fn run_started(
    args: &CheckArgs,
    bench: &Bench,
    baseline: Option<&Record>,
) -> Result<ExitCode> {
    if let Some(baseline) = baseline {
        let hosts = perfcheck::compare_hosts(&baseline.host, &bench.host);
        if !hosts.blocking.is_empty() && !args.ignore_host {
            let text = skipped_for_host(&hosts.blocking, &args.baseline);
            eprintln!("\n{text}");
            println!("{text}");
            append_summary(args.summary.as_deref(), &text)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    bench.warm_up().await?;
    let rounds = bench.measure(args.rounds, "").await?;
    let record = bench.record(rounds, args.reason.clone());
    if let Some(out) = &args.out {
        write_record(out, &record)?;
    }
    let Some(baseline) = baseline else {
        if args.update_baseline {
            let busy: Vec<f64> = record
                .rounds
                .iter()
                .filter_map(|r| r.neighbour_cores)
                .collect();
            if let Some(busy) =
                forkd_bench::stats::median(&busy).filter(|&c| c > Rule::default().busy_cores)
            {
                eprintln!(
                    "forkd-bench check: WARNING: others kept {busy:.2} cores busy during this baseline (median); \
                     ratios measured on a busy host are inflated, so later runs on a quiet host look faster and \
                     a real regression may hide behind the difference. Prefer a quiet host for baselines."
                );
            }
            write_record(&args.baseline, &record)?;
            println!(
                "forkd-bench check: wrote a new baseline ({} rounds) to {}.\nCommit it with the reason, e.g.: git commit -m 'bench baseline: {}' {}",
                record.rounds.len(),
                args.baseline.display(),
                args.reason.as_deref().unwrap_or(""),
                args.baseline.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let rule = Rule::default();
    let first = perfcheck::compare(baseline, &record, &rule)?;
    let table = perfcheck::render(&first, baseline, &record);
    println!("{table}");
    let suspected = first.regressions();
    if suspected.is_empty() {
        let verdict = first.pass_text();
        println!("forkd-bench check: {verdict}");
        append_summary(args.summary.as_deref(), &format!("{table}\n**{verdict}**"))?;
        return Ok(ExitCode::SUCCESS);
    }
    // A neighbour's burst of load can push one run over the line; a real
    // regression shows again in fresh rounds.
    let names: Vec<&str> = suspected.iter().map(|m| m.name()).collect();
    println!(
        "forkd-bench check: suspected regression in {}; confirming with {} fresh rounds",
        names.join(", "),
        args.rounds
    );
    let again = bench.record(bench.measure(args.rounds, "confirmation ").await?, None);
    let second = perfcheck::compare(baseline, &again, &rule)?;
    let table2 = perfcheck::render(&second, baseline, &again);
    println!("{table2}");
    let confirmed: Vec<&str> = second
        .regressions()
        .into_iter()
        .filter(|m| suspected.contains(m))
        .map(|m| m.name())
        .collect();
    let verdict = if confirmed.is_empty() {
        format!(
            "forkd-bench check: PASS — the suspected regression in {} did not repeat in fresh rounds (noise)",
            names.join(", ")
        )
    } else {
        format!(
            "forkd-bench check: FAIL — confirmed regression in {} (flagged in two independent sets of rounds). \
             If the slowdown is intended, take a new baseline: forkd-bench check --update-baseline --reason '...'",
            confirmed.join(", ")
        )
    };
    println!("{verdict}");
    append_summary(
        args.summary.as_deref(),
        &format!("{table}\n#### confirmation\n\n{table2}\n**{verdict}**"),
    )?;
    Ok(if confirmed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `forkd-bench compare A B`: the rule applied to two recorded runs, without
/// measuring (no confirmation round is possible here).
pub fn compare_files(args: CompareArgs) -> Result<ExitCode> {
    let baseline = Record::load(&args.baseline)?;
    let current = Record::load(&args.current)?;
    let cmp = perfcheck::compare(&baseline, &current, &Rule::default())?;
    if !cmp.hosts.blocking.is_empty() && !args.ignore_host {
        let text = skipped_for_host(&cmp.hosts.blocking, &args.baseline);
        println!("{text}");
        append_summary(args.summary.as_deref(), &text)?;
        return Ok(ExitCode::SUCCESS);
    }
    let table = perfcheck::render(&cmp, &baseline, &current);
    println!("{table}");
    let regressions: Vec<&str> = cmp.regressions().iter().map(|m| m.name()).collect();
    let verdict = if regressions.is_empty() {
        cmp.pass_text().to_string()
    } else {
        format!("FAIL — regression in {}", regressions.join(", "))
    };
    println!("forkd-bench compare: {verdict}");
    append_summary(args.summary.as_deref(), &format!("{table}\n**{verdict}**"))?;
    Ok(if regressions.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
