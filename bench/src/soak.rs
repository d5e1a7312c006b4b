//! `forkd-soak`: many spawns against a real `forkd` process, then a leak audit.
//!
//! Starts the `forkd` binary (next to this one unless `--forkd`), warms it
//! up, takes a baseline of what the daemon holds (RSS, descriptors, processes,
//! cgroups, network and mount namespaces), runs `--spawns` sandboxes at
//! `--concurrency` (stopping early at `--max-secs`), waits for the daemon to
//! settle and compares. Then it stops the daemon with SIGTERM and checks that
//! nothing of it is left on the host. Every spawn must print its own expected
//! output. Exit status 1 on any failed spawn, leak, or RSS growth beyond
//! `--max-rss-growth-mib` in all or `--max-late-rss-growth-mib` over the
//! second half of the spawns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use forkd_ipc::{AsyncClient, ClientError, Program, SpawnRequest};
use serde::Serialize;

/// Cgroup parent of soak daemons (`<mount>/forkd-soak/d<daemon pid>`).
const CGROUP_PARENT: &str = "forkd-soak";
/// Environment marker in the zygote's environment (inherited by every
/// sandbox), so that processes of this daemon can be found after it exits.
const MARKER_VAR: &str = "FORKD_SOAK";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Soak test: many spawns against a real forkd, then a leak audit",
    // scripts/soak.sh passes CI defaults; later flags override them.
    args_override_self = true
)]
struct Args {
    /// Interpreter of the zygote (e.g. .venv/bin/python).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Preload modules.
    #[arg(long, value_delimiter = ',', default_value = "numpy")]
    preload: Vec<String>,
    /// Spawns to run.
    #[arg(long, default_value_t = 100_000)]
    spawns: u64,
    /// Spawns in flight at once (one connection each).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Stop starting spawns after this many seconds (bounds CI runs).
    #[arg(long)]
    max_secs: Option<f64>,
    /// Warm pool size of the daemon's zygote.
    #[arg(long, default_value_t = 16)]
    warm_pool: usize,
    /// The forkd binary (default: next to this executable).
    #[arg(long)]
    forkd: Option<PathBuf>,
    /// Fail if the daemon's RSS grows by more than this between baseline and end.
    #[arg(long, default_value_t = 32)]
    max_rss_growth_mib: u64,
    /// Fail if the daemon's RSS grows by more than this over the second half
    /// of the spawns (a per-spawn leak grows there; allocator warm-up has
    /// levelled off by then).
    #[arg(long, default_value_t = 4)]
    max_late_rss_growth_mib: i64,
    /// Sample the daemon's RSS this often during the load (the trace shows
    /// whether growth levels off or keeps climbing with the spawn count).
    #[arg(long, default_value_t = 5.0)]
    sample_secs: f64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What the daemon holds at one moment.
#[derive(Debug, Serialize, Clone, Default, PartialEq)]
struct Holdings {
    rss_kib: u64,
    fds: usize,
    /// Live processes of this daemon other than itself (zygote, warm children).
    processes: usize,
    /// Cgroup directories below the daemon's own, across hierarchies.
    cgroups: usize,
    /// Distinct network namespaces (other than the host's) held by the
    /// daemon and its processes, through `ns/net` or descriptors.
    netns: usize,
    /// Distinct mount namespaces (other than the daemon's own) held the
    /// same way: zygote templates, warm children. (The host's mount table is
    /// not compared: other activity on the host changes it.)
    mntns: usize,
}

impl Holdings {
    /// The counts that must come back to the baseline (RSS is judged apart).
    fn counts(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.fds,
            self.processes,
            self.cgroups,
            self.netns,
            self.mntns,
        )
    }
}

#[derive(Debug, Serialize)]
struct Report {
    spawns_requested: u64,
    spawns_done: u64,
    ok: u64,
    wrong_output: u64,
    errors: BTreeMap<String, u64>,
    concurrency: usize,
    secs: f64,
    spawns_per_sec: f64,
    baseline: Holdings,
    end: Holdings,
    /// The daemon's RSS during the load, every `--sample-secs`.
    rss_trace: Vec<RssSample>,
    /// Median RSS over the last quarter of the spawns minus the median over
    /// the second quarter: a leak that grows with the spawn count shows
    /// here; allocator warm-up, over by then, does not. `None` when the run
    /// was too short for a sample in each of those quarters.
    late_rss_growth_kib: Option<i64>,
    /// What is left on the host after the daemon's SIGTERM exit.
    after_exit: Vec<String>,
    daemon_warnings: Vec<String>,
}

#[derive(Debug, Serialize, Clone, Copy)]
struct RssSample {
    secs: f64,
    spawns: u64,
    rss_kib: u64,
}

struct Daemon {
    child: Child,
    pid: i32,
    socket: PathBuf,
    log: PathBuf,
    marker: String,
}

fn forkd_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("forkd");
    if !p.is_file() {
        bail!(
            "{} not found: build it (cargo build -p forkd) or pass --forkd",
            p.display()
        );
    }
    Ok(p)
}

fn start_daemon(args: &Args, dir: &Path) -> Result<Daemon> {
    let marker = format!("{}-{}", std::process::id(), rand_suffix());
    let preload = args
        .preload
        .iter()
        .map(|m| format!("{m:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "max_concurrent = 256\n\n[cgroup]\nparent = \"{CGROUP_PARENT}\"\n\n[[zygote]]\nname = \"default\"\npython = {:?}\npreload = [{preload}]\nwarm_pool = {}\nenv = {{ {MARKER_VAR} = \"{marker}\" }}\n",
        args.python.display().to_string(),
        args.warm_pool
    );
    let config_path = dir.join("forkd.toml");
    std::fs::write(&config_path, config)?;
    let socket = dir.join("forkd.sock");
    let log = dir.join("forkd.log");
    let forkd = forkd_binary(args.forkd.as_deref())?;
    let mut child = Command::new(&forkd)
        .arg("--config")
        .arg(&config_path)
        .arg("--socket")
        .arg(&socket)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", forkd.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "forkd exited during start-up ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("forkd did not open its socket within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id() as i32;
    Ok(Daemon {
        child,
        pid,
        socket,
        log,
        marker,
    })
}

/// A few random hex digits (distinguishes runs with the same pid).
fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 2..].chars().next())
                .map(|c| c == 'Z' || c == 'X')
        })
        .unwrap_or(true)
}

/// Live processes of the daemon with this marker and pid (not the daemon):
/// by environment marker, or by cgroup below `forkd-soak/d<pid>`.
fn processes_of(marker: &str, daemon_pid: i32) -> Vec<i32> {
    let want = format!("{MARKER_VAR}={marker}");
    let cgroup = format!("/{CGROUP_PARENT}/d{daemon_pid}/");
    pids()
        .into_iter()
        .filter(|&p| p != daemon_pid && !is_zombie(p))
        .filter(|&p| {
            let environ = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
            environ.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
                || std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                    .is_ok_and(|c| c.contains(&cgroup))
        })
        .collect()
}

fn cgroup_mounts() -> Vec<PathBuf> {
    forkd_cgroup::hierarchy_mounts()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .collect()
}

/// Directories at or below `<mount>/forkd-soak/d<pid>` (excluding that
/// directory itself), summed over hierarchies; and the base dirs that exist.
fn cgroup_dirs(daemon_pid: i32) -> (usize, Vec<PathBuf>) {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| 1 + count(&e.path()))
                    .sum()
            })
            .unwrap_or(0)
    }
    let bases: Vec<PathBuf> = cgroup_mounts()
        .into_iter()
        .map(|m| m.join(CGROUP_PARENT).join(format!("d{daemon_pid}")))
        .filter(|p| p.exists())
        .collect();
    (bases.iter().map(|b| count(b)).sum(), bases)
}

fn ns_link(path: String, kind: &str) -> Option<String> {
    std::fs::read_link(path)
        .ok()
        .map(|t| t.display().to_string())
        .filter(|t| t.starts_with(&format!("{kind}:[")))
}

/// Namespaces of `kind` (`net`, `mnt`; other than the daemon's own)
/// referenced by these processes' `ns/<kind>` or open descriptors.
fn ns_held(kind: &str, procs: &[i32], daemon_pid: i32) -> usize {
    let host = ns_link(format!("/proc/{daemon_pid}/ns/{kind}"), kind);
    let mut seen = BTreeSet::new();
    for &p in procs.iter().chain(std::iter::once(&daemon_pid)) {
        seen.extend(ns_link(format!("/proc/{p}/ns/{kind}"), kind));
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) {
            for fd in fds.flatten() {
                seen.extend(ns_link(fd.path().display().to_string(), kind));
            }
        }
    }
    if let Some(h) = host {
        seen.remove(&h);
    }
    seen.len()
}

fn holdings(d: &Daemon) -> Holdings {
    let rss_kib = rss_kib(d.pid);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid))
        .map(|r| r.count())
        .unwrap_or(0);
    let procs = processes_of(&d.marker, d.pid);
    Holdings {
        rss_kib,
        fds,
        processes: procs.len(),
        cgroups: cgroup_dirs(d.pid).0,
        netns: ns_held("net", &procs, d.pid),
        mntns: ns_held("mnt", &procs, d.pid),
    }
}

/// Waits until the counts hold still for a second (warm pool refilled,
/// retired zygotes gone); if `target` is given, until they equal it. Gives
/// up after `limit` and returns the last measurement.
async fn settle(d: &Daemon, target: Option<&Holdings>, limit: Duration) -> Holdings {
    let deadline = Instant::now() + limit;
    let mut last = holdings(d);
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = holdings(d);
        if now.counts() != last.counts() {
            stable_since = Instant::now();
        }
        let matches = target.is_none_or(|t| t.counts() == now.counts());
        last = now;
        if (matches && stable_since.elapsed() >= Duration::from_secs(1))
            || Instant::now() > deadline
        {
            return last;
        }
    }
}

fn request(i: u64) -> (SpawnRequest, String) {
    let code = format!("import numpy; print(int(numpy.int64({i}) * 2))");
    let req = SpawnRequest {
        program: Program::Code(code),
        timeout_ms: Some(30_000),
        ..SpawnRequest::default()
    };
    (req, format!("{}\n", i * 2))
}

#[derive(Default)]
struct Tally {
    /// Spawns answered (any outcome).
    finished: AtomicU64,
    ok: AtomicU64,
    wrong: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, what: String) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *e.entry(what).or_default() += 1;
    }
}

/// Runs `n` spawns (until `stop_at`) at `concurrency`, one connection per worker.
async fn load(
    socket: &Path,
    n: u64,
    concurrency: usize,
    stop_at: Option<Instant>,
    tally: Arc<Tally>,
) -> Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = AsyncClient::connect(socket).await?;
        let (next, tally) = (next.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            loop {
                if stop_at.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (req, expected) = request(i);
                let outcome = client.spawn(&req).await;
                tally.finished.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    Ok(r) if r.exit_code == Some(0) && r.stdout == expected.as_bytes() => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        tally.wrong.fetch_add(1, Ordering::Relaxed);
                        if tally.wrong.load(Ordering::Relaxed) <= 3 {
                            eprintln!(
                                "forkd-soak: spawn {i}: exit {:?} signal {:?} killed_by {:?} stdout {:?} stderr {:?}",
                                r.exit_code,
                                r.signal,
                                r.killed_by,
                                r.stdout_lossy(),
                                r.stderr_lossy()
                            );
                        }
                    }
                    Err(ClientError::Server(e)) => {
                        tally.error(e.code.to_string());
                        eprintln!("forkd-soak: spawn {i}: {}: {}", e.code, e.message);
                    }
                    Err(e) => {
                        eprintln!("forkd-soak: spawn {i}: client: {e}");
                        tally.error(format!("client: {e}"));
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    Ok(next.load(Ordering::Relaxed).min(n))
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Median RSS over the last quarter of `done` spawns minus the median over
/// the second quarter (single samples wander by a couple of MiB with what is
/// in flight); `None` without a sample in each of those quarters.
fn late_rss_growth_kib(trace: &[RssSample], done: u64) -> Option<i64> {
    let median_between = |from: u64, to: u64| {
        let mut q: Vec<u64> = trace
            .iter()
            .filter(|s| s.spawns * 4 >= from * done && s.spawns * 4 <= to * done)
            .map(|s| s.rss_kib)
            .collect();
        q.sort_unstable();
        q.get(q.len() / 2).copied()
    };
    Some(median_between(3, 4)? as i64 - median_between(1, 2)? as i64)
}

/// Samples the daemon's RSS every `every` until `stop` fires.
async fn sample_rss(
    pid: i32,
    t0: Instant,
    every: Duration,
    tally: Arc<Tally>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<RssSample> {
    let mut trace = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => trace.push(RssSample {
                secs: t0.elapsed().as_secs_f64(),
                spawns: tally.finished.load(Ordering::Relaxed),
                rss_kib: rss_kib(pid),
            }),
            _ = &mut stop => return trace,
        }
    }
}

/// SIGTERM, then wait (SIGKILL after 30 s).
fn stop(d: &mut Daemon) -> Result<std::process::ExitStatus> {
    // SAFETY: kill with a positive pid signals exactly our child.
    unsafe { libc::kill(d.pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = d.child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            d.child.kill()?;
            return Ok(d.child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything of the daemon still on the host after it exited.
async fn leftovers(d: &Daemon) -> Vec<String> {
    // Sandboxes killed at shutdown may take a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    let procs = loop {
        let p = processes_of(&d.marker, d.pid);
        if p.is_empty() || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut left: Vec<String> = procs.iter().map(|p| format!("process {p}")).collect();
    let (_, bases) = cgroup_dirs(d.pid);
    left.extend(bases.iter().map(|b| format!("cgroup {}", b.display())));
    if d.socket.exists() {
        left.push(format!("socket {}", d.socket.display()));
    }
    left
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("forkd-soak runs a root daemon (cgroups, namespaces): run it as root");
    }
    let dir = std::env::temp_dir().join(format!("forkd-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut d = start_daemon(&args, &dir)?;
    let result = soak(&args, &d).await;
    let status = stop(&mut d)?;
    let after_exit = leftovers(&d).await;
    let warnings: Vec<String> = std::fs::read_to_string(&d.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_string)
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    for m in cgroup_mounts() {
        // Empty parent left for the next run; remove it if nothing else uses it.
        let _ = std::fs::remove_dir(m.join(CGROUP_PARENT));
    }
    let (mut report, tally) = result?;
    report.after_exit = after_exit;
    report.daemon_warnings = warnings;
    report.ok = tally.ok.load(Ordering::Relaxed);
    report.wrong_output = tally.wrong.load(Ordering::Relaxed);
    report.errors = tally
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();

    let (b, e) = (&report.baseline, &report.end);
    println!(
        "soak: {} of {} spawns in {:.1} s ({:.0}/s, concurrency {}): ok {}, wrong output {}, errors {:?}",
        report.spawns_done,
        report.spawns_requested,
        report.secs,
        report.spawns_per_sec,
        report.concurrency,
        report.ok,
        report.wrong_output,
        report.errors
    );
    let trace = &report.rss_trace;
    let step = trace.len().div_ceil(12).max(1);
    println!("daemon RSS during the load (s, spawns, KiB):");
    for (i, x) in trace.iter().enumerate() {
        if i % step == 0 || i + 1 == trace.len() {
            println!("  {:>7.1}  {:>7}  {:>7}", x.secs, x.spawns, x.rss_kib);
        }
    }
    match report.late_rss_growth_kib {
        Some(kib) => println!(
            "RSS growth over the second half of the spawns (median of the last quarter minus the second): {kib:+} KiB"
        ),
        None => println!(
            "RSS growth over the second half of the spawns: not judged (too few samples; lower --sample-secs)"
        ),
    }
    println!("daemon        baseline      end");
    println!("rss           {:>7} KiB  {:>7} KiB", b.rss_kib, e.rss_kib);
    for (name, x, y) in [
        ("fds", b.fds, e.fds),
        ("processes", b.processes, e.processes),
        ("cgroups", b.cgroups, e.cgroups),
        ("netns", b.netns, e.netns),
        ("mount ns", b.mntns, e.mntns),
    ] {
        println!("{name:<12}  {x:>11}  {y:>11}");
    }
    println!(
        "after SIGTERM exit ({status}): {}",
        if report.after_exit.is_empty() {
            "nothing left (processes, cgroups, socket)".to_string()
        } else {
            format!("LEFT {:?}", report.after_exit)
        }
    );
    if !report.daemon_warnings.is_empty() {
        println!("daemon warnings ({}):", report.daemon_warnings.len());
        for w in report.daemon_warnings.iter().take(10) {
            println!("  {w}");
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }

    let mut failures = Vec::new();
    if report.ok != report.spawns_done {
        failures.push(format!(
            "{} of {} spawns failed",
            report.spawns_done - report.ok,
            report.spawns_done
        ));
    }
    if b.counts() != e.counts() {
        failures.push("the daemon holds more or less than at the baseline".to_string());
    }
    let growth_kib = e.rss_kib.saturating_sub(b.rss_kib);
    if growth_kib > args.max_rss_growth_mib * 1024 {
        failures.push(format!(
            "daemon RSS grew by {growth_kib} KiB (limit {} MiB)",
            args.max_rss_growth_mib
        ));
    }
    if let Some(kib) = report
        .late_rss_growth_kib
        .filter(|&kib| kib > args.max_late_rss_growth_mib * 1024)
    {
        failures.push(format!(
            "daemon RSS grew by {kib} KiB over the second half of the spawns (limit {} MiB): it grows with the spawn count",
            args.max_late_rss_growth_mib
        ));
    }
    if !report.after_exit.is_empty() {
        failures.push("the daemon left things behind after exiting".to_string());
    }
    if !status.success() {
        failures.push(format!("the daemon exited with {status}"));
    }
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    println!("soak: passed (no failed spawns, no leaks, RSS +{growth_kib} KiB)");
    Ok(())
}

async fn soak(args: &Args, d: &Daemon) -> Result<(Report, Arc<Tally>)> {
    // Warm-up: the allocator and the tokio runtime reach their working size.
    let warm = Arc::new(Tally::default());
    let warmup = (args.concurrency as u64 * 4).min(args.spawns.max(1));
    load(&d.socket, warmup, args.concurrency, None, warm.clone()).await?;
    if warm.ok.load(Ordering::Relaxed) != warmup {
        bail!(
            "warm-up failed: {} of {warmup} ok, errors {:?}",
            warm.ok.load(Ordering::Relaxed),
            warm.errors.lock().unwrap_or_else(|p| p.into_inner())
        );
    }
    let baseline = settle(d, None, Duration::from_secs(30)).await;

    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let stop_at = args.max_secs.map(|s| t0 + Duration::from_secs_f64(s));
    let (stop_sampler, sampler_stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample_rss(
        d.pid,
        t0,
        Duration::from_secs_f64(args.sample_secs.max(0.1)),
        tally.clone(),
        sampler_stopped,
    ));
    let done = load(
        &d.socket,
        args.spawns,
        args.concurrency,
        stop_at,
        tally.clone(),
    )
    .await;
    let _ = stop_sampler.send(());
    let mut rss_trace = sampler.await.unwrap_or_default();
    let done = done?;
    let secs = t0.elapsed().as_secs_f64();
    let end = settle(d, Some(&baseline), Duration::from_secs(30)).await;
    rss_trace.push(RssSample {
        secs,
        spawns: done,
        rss_kib: end.rss_kib,
    });
    let late_growth = late_rss_growth_kib(&rss_trace, done);
    Ok((
        Report {
            spawns_requested: args.spawns,
            spawns_done: done,
            ok: 0,
            wrong_output: 0,
            errors: BTreeMap::new(),
            concurrency: args.concurrency,
            secs,
            spawns_per_sec: done as f64 / secs,
            baseline,
            end,
            rss_trace,
            late_rss_growth_kib: late_growth,
            after_exit: Vec::new(),
            daemon_warnings: Vec::new(),
        },
        tally,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(rss: impl Fn(u64) -> u64) -> Vec<RssSample> {
        (1..=40)
            .map(|i| RssSample {
                secs: i as f64,
                spawns: i * 2500,
                rss_kib: rss(i * 2500),
            })
            .collect()
    }

    /// 100 bytes kept per spawn over 100,000 spawns: about 4.8 MiB over the
    /// second half, past the full soak's 4 MiB limit.
    #[test]
    fn a_per_spawn_leak_shows_as_late_growth() {
        let leak = trace(|n| 14_000 + n * 100 / 1024);
        let growth = late_rss_growth_kib(&leak, 100_000).unwrap();
        assert!(growth > 4 * 1024, "{growth} KiB");
    }

    /// Allocator warm-up (a rise that levels off by a quarter of the run)
    /// with noise of ±1.5 MiB does not.
    #[test]
    fn warm_up_and_noise_do_not() {
        let warm = trace(|n| 13_000 + 8_000 * n.min(25_000) / 25_000 + (n / 2500 % 3) * 1_500);
        let growth = late_rss_growth_kib(&warm, 100_000).unwrap();
        assert!(growth.abs() <= 1_500, "{growth} KiB");
    }

    #[test]
    fn too_few_samples_are_not_judged() {
        let two = trace(|_| 14_000)[..2].to_vec();
        assert_eq!(late_rss_growth_kib(&two, 100_000), None);
    }
}
