//! `forkd-bench branch`: what a live branch of a session costs (issue 16),
//! next to an independent floor measured in the same run.
//!
//! forkd: a session S holds numpy and an array (`a = np.ones(...)`, every
//! page written) and `x = 41`; the figure is the time from the
//! `session_branch(k)` request until every one of the k branches has
//! answered the cell `x + 1` with 42 (Rust client, cells sent concurrently).
//!
//! Floor, written for the bench (no forkd code, no isolation): a plain
//! Python process with the same interpreter, numpy and the same array. Asked
//! for k copies on its stdin, it `os.fork()`s k children and says so; the
//! bench then writes k requests `x + 1` into a pipe the children share and
//! reads k answers from another. Same shape as forkd's (branch request,
//! reply, one cell per copy), with nothing but the fork and the pipes.
//!
//! Scenarios: k=1 with a 50 MB and a 500 MB array, k=16 with 50 MB; each
//! round measures the floor right before forkd.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_bench_floor::sys;
use forkd_ipc::{AsyncClient, Limits, RunCode, SessionBranch, SessionCreate};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct BranchArgs {
    /// Interpreter of the zygote and of the floor (e.g. .venv/bin/python).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Rounds of each k=1 scenario (medians are reported).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Rounds of the k-branch scenario.
    #[arg(long, default_value_t = 3)]
    rounds_many: usize,
    /// Branches in the k-branch scenario.
    #[arg(long, default_value_t = 16)]
    k: usize,
    /// Array sizes of the k=1 scenarios, MB (the k-branch one uses the first).
    #[arg(long, value_delimiter = ',', default_value = "50,500")]
    sizes_mb: Vec<u64>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Small, fast run (smoke test): 50 MB only, k=4, 2 rounds each.
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Serialize, Clone)]
struct Scenario {
    array_mb: u64,
    k: usize,
    /// ms of the session's first branch request (no spare shells yet; not
    /// in the medians).
    first_forkd_ms: f64,
    /// ms, per round after the first, each once the session's spare shells
    /// for the next request are ready (`spare_branches` in its info).
    forkd_ms: Vec<f64>,
    floor_ms: Vec<f64>,
    /// Cores others kept busy in 0.3 s before each round.
    others_busy_cores: Vec<Option<f64>>,
    median_forkd_ms: f64,
    median_floor_ms: f64,
    /// Median of the per-round ratios forkd ÷ floor.
    ratio_to_floor: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    load_average_at_start: Option<f64>,
    python: String,
    scenarios: Vec<Scenario>,
}

fn median(v: &[f64]) -> f64 {
    forkd_bench::stats::median(v).unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The floor's server: numpy, the array, `x`; on a line `k` it forks k
/// children, each answering one request from fd 3 on fd 4.
const FLOOR_SERVER: &str = r#"
import os, signal, sys
import numpy as np
a = np.ones(int(sys.argv[1]) // 8)
x = 41
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them
out = sys.stdout.buffer
out.write(b"ready\n"); out.flush()
for line in sys.stdin.buffer:
    for _ in range(int(line)):
        if os.fork() == 0:
            try:
                req = os.read(3, 6)  # one request: b"x + 1\n"
                os.write(4, (repr(eval(req.decode())) + "\n").encode())
            finally:
                os._exit(0)
    out.write(b"forked\n"); out.flush()
"#;

/// One request, as the floor's children read it (exactly 6 bytes).
const FLOOR_REQUEST: &[u8; 6] = b"x + 1\n";

struct FloorServer {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    requests: std::fs::File,
    answers: std::fs::File,
}

impl FloorServer {
    fn start(python: &Path, bytes: u64) -> Result<FloorServer> {
        let (req_r, req_w) = sys::pipe()?;
        let (ans_r, ans_w) = sys::pipe()?;
        let (r, w) = (req_r.as_raw_fd(), ans_w.as_raw_fd());
        let mut cmd = Command::new(python);
        cmd.args(["-c", FLOOR_SERVER, &bytes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for v in ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
            cmd.env(v, "1");
        }
        // SAFETY: between fork and exec only fcntl and dup2 run
        // (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || sys::move_onto(&[(r, 3), (w, 4)]));
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the branch floor with {}", python.display()))?;
        drop((req_r, ans_w));
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line != "ready\n" {
            bail!("the branch floor did not start (said {line:?})");
        }
        Ok(FloorServer {
            child,
            stdin,
            stdout,
            requests: std::fs::File::from(req_w),
            answers: std::fs::File::from(ans_r),
        })
    }

    /// k copies, each answering `x + 1`: time until all k answered 42.
    fn branch(&mut self, k: usize) -> Result<Duration> {
        let t = Instant::now();
        writeln!(self.stdin, "{k}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line != "forked\n" {
            bail!("the branch floor said {line:?}");
        }
        // One write (under PIPE_BUF): each child's 6-byte read takes one.
        self.requests.write_all(&FLOOR_REQUEST.repeat(k))?;
        let want = b"42\n".repeat(k);
        let mut got = vec![0u8; want.len()];
        self.answers.read_exact(&mut got)?;
        let took = t.elapsed();
        if got != want {
            bail!(
                "the branch floor's copies answered {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        Ok(took)
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cell(session: &str, code: &str) -> RunCode {
    RunCode {
        session: session.into(),
        code: code.into(),
        timeout_ms: Some(120_000),
    }
}

/// forkd: k branches of `parent`, each answering `x + 1`; time until all
/// answered, and the branches' ids (to kill after the clock stops).
async fn forkd_branch(
    client: &AsyncClient,
    parent: &str,
    k: usize,
) -> Result<(Duration, Vec<String>)> {
    let t = Instant::now();
    let branches = client
        .session_branch(SessionBranch {
            session: parent.into(),
            count: u32::try_from(k).context("k")?,
            same_seed: false,
            force: false,
            labels: None,
        })
        .await?;
    let mut set = tokio::task::JoinSet::new();
    for b in &branches {
        let (c, id) = (client.clone(), b.session.clone());
        set.spawn(async move { c.run_code(&cell(&id, "x + 1")).await });
    }
    while let Some(r) = set.join_next().await {
        let r = r??;
        if r.text.as_deref() != Some("42") {
            bail!("a branch answered {r:?}");
        }
    }
    let took = t.elapsed();
    Ok((took, branches.into_iter().map(|b| b.session).collect()))
}

async fn others_busy() -> Option<f64> {
    tokio::task::spawn_blocking(|| crate::hostcpu::others_busy_cores(Duration::from_millis(300)))
        .await
        .ok()
        .flatten()
}

async fn scenario(
    args: &BranchArgs,
    client: &AsyncClient,
    mb: u64,
    k: usize,
    rounds: usize,
) -> Result<Scenario> {
    let bytes = mb * 1_000_000;
    let mut floor = FloorServer::start(&args.python, bytes)?;
    let create = SessionCreate {
        limits: Limits {
            memory_bytes: Some(2 * bytes + (512 << 20)),
            ..Limits::default()
        },
        ..SessionCreate::default()
    };
    let parent = client.session_create(&create).await?.session;
    let setup = format!("import numpy as np\na = np.ones({} // 8)\nx = 41", bytes);
    let r = client.run_code(&cell(&parent, &setup)).await?;
    if r.error.is_some() {
        bail!("setting up the parent session failed: {r:?}");
    }
    let mut s = Scenario {
        array_mb: mb,
        k,
        first_forkd_ms: 0.0,
        forkd_ms: Vec::new(),
        floor_ms: Vec::new(),
        others_busy_cores: Vec::new(),
        median_forkd_ms: 0.0,
        median_floor_ms: 0.0,
        ratio_to_floor: 0.0,
    };
    // The first request makes every shell; it leaves k spares made for the
    // next (docs/branch.md, "Spare branches"), which the timed rounds use.
    let (first, ids) = forkd_branch(client, &parent, k).await?;
    for id in &ids {
        client.session_kill(id).await?;
    }
    s.first_forkd_ms = ms(first);
    for round in 0..rounds {
        let ready = Instant::now() + Duration::from_secs(30);
        while client.session_info(&parent).await?.spare_branches < u32::try_from(k)? {
            if Instant::now() > ready {
                bail!("the session's {k} spare branches were not made within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        s.others_busy_cores.push(others_busy().await);
        let f = tokio::task::block_in_place(|| floor.branch(k))?;
        let (d, ids) = forkd_branch(client, &parent, k).await?;
        if round == 0 {
            // The copy holds the parent's array (not timed).
            let r = client.run_code(&cell(&ids[0], "int(a.nbytes)")).await?;
            if r.text.as_deref() != Some(&(bytes / 8 * 8).to_string()) {
                bail!("a branch's array: {r:?}");
            }
        }
        for id in &ids {
            client.session_kill(id).await?;
        }
        s.floor_ms.push(ms(f));
        s.forkd_ms.push(ms(d));
        eprintln!(
            "branch {mb} MB k={k} round {}: forkd {:.1} ms, floor {:.2} ms",
            round + 1,
            ms(d),
            ms(f)
        );
    }
    client.session_kill(&parent).await?;
    drop(floor);
    s.median_forkd_ms = median(&s.forkd_ms);
    s.median_floor_ms = median(&s.floor_ms);
    let ratios: Vec<f64> = s
        .forkd_ms
        .iter()
        .zip(&s.floor_ms)
        .map(|(a, b)| a / b.max(1e-3))
        .collect();
    s.ratio_to_floor = median(&ratios);
    Ok(s)
}

pub async fn run(mut args: BranchArgs) -> Result<std::process::ExitCode> {
    if args.quick {
        args.sizes_mb.truncate(1);
        args.k = 4;
        args.rounds = 2;
        args.rounds_many = 2;
    }
    let Some(&first) = args.sizes_mb.first() else {
        bail!("--sizes-mb needs at least one size");
    };
    forkd::init_logging("warn", false);
    let load_average_at_start = crate::hostcpu::load_average();
    let dir = std::env::temp_dir().join(format!("forkd-bench-branch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("forkd.sock");
    let mut config = forkd::Config::default();
    forkd::config::apply_overrides(
        &mut config,
        Some(args.python.clone()),
        Some(vec!["numpy".into()]),
    );
    config.zygotes[0].warm_pool = 2;
    // k branches, k spare shells made beside them (they count as sessions
    // when made), the parents.
    config.sessions.max = 2 * args.k + 16;
    config.sessions.max_per_uid = 2 * args.k + 16;
    let most = args.sizes_mb.iter().max().copied().unwrap_or(first) * 1_000_000;
    config.limits.max.memory_bytes = config.limits.max.memory_bytes.max(2 * most + (512 << 20));
    let running = forkd::start(config, Some(&socket)).await?;
    let client = AsyncClient::connect(&socket).await?;
    let mut scenarios = Vec::new();
    let mut outcome = Ok(());
    let plan: Vec<(u64, usize, usize)> = args
        .sizes_mb
        .iter()
        .map(|&mb| (mb, 1, args.rounds))
        .chain([(first, args.k, args.rounds_many)])
        .collect();
    for (mb, k, rounds) in plan {
        match scenario(&args, &client, mb, k, rounds).await {
            Ok(s) => scenarios.push(s),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    drop(client);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;
    let report = Report {
        load_average_at_start,
        python: args.python.display().to_string(),
        scenarios,
    };
    print(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print(r: &Report) {
    println!(
        "branch (request -> every branch answered `x + 1`; medians; load average at start {}):",
        r.load_average_at_start
            .map_or_else(|| "?".into(), |l| format!("{l:.2}"))
    );
    for s in &r.scenarios {
        let busy: Vec<String> = s
            .others_busy_cores
            .iter()
            .map(|c| c.map_or_else(|| "?".into(), |c| format!("{c:.2}")))
            .collect();
        println!(
            "  {} MB array, k={}: forkd {:.1} ms (spares ready; first request {:.1} ms), floor (python os.fork + pipes) {:.2} ms: {:.1}x  ({} rounds; others busy {} cores)",
            s.array_mb,
            s.k,
            s.median_forkd_ms,
            s.first_forkd_ms,
            s.median_floor_ms,
            s.ratio_to_floor,
            s.forkd_ms.len(),
            busy.join("/")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `$FORKD_TEST_PYTHON`, else the workspace's `.venv/bin/python`. The
    /// unprivileged tier runs before the venv is made: there a missing
    /// interpreter skips (saying so); as root (the full suite) it fails.
    fn python() -> Option<PathBuf> {
        let p = std::env::var_os("FORKD_TEST_PYTHON")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
        if p.exists() {
            return Some(p);
        }
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            !root,
            "test interpreter {} missing: run scripts/venv.sh",
            p.display()
        );
        use std::io::Write;
        let _ = std::io::stderr().write_all(
            format!(
                "skipped: needs root (the full suite, with the test interpreter; {} is missing)\n",
                p.display()
            )
            .as_bytes(),
        );
        None
    }

    /// The floor's copies hold the parent's state and each answers once;
    /// a copy left waiting ends when the bench closes its request pipe.
    #[test]
    fn the_floors_copies_answer_from_the_parents_state() {
        let Some(python) = python() else {
            return;
        };
        let mut floor = FloorServer::start(&python, 8_000_000).unwrap();
        for k in [1, 3, 1] {
            floor.branch(k).unwrap();
        }
        let server = i32::try_from(floor.child.id()).unwrap();
        // One copy that never gets its request.
        writeln!(floor.stdin, "1").unwrap();
        floor.stdin.flush().unwrap();
        let mut line = String::new();
        floor.stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "forked\n");
        // The copies that answered are gone (reaped by the kernel); the one
        // still waiting for its request is left.
        let children = || {
            std::fs::read_to_string(format!("/proc/{server}/task/{server}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while children().len() != 1 {
            assert!(Instant::now() < deadline, "children: {:?}", children());
            std::thread::sleep(Duration::from_millis(20));
        }
        let waiting = children();
        drop(floor);
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiting
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            assert!(
                Instant::now() < deadline,
                "a waiting copy outlived the floor"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
