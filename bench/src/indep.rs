//! The **independent floor**: a minimal fork server written for the bench
//! (`bench/floor/`: `floor_server.py` and its native isolation helper
//! `libforkd_bench_floor.so`), sharing no code with forkd's daemon, pool,
//! zygote or ipc crates. It applies the same isolation steps to every child
//! and keeps a warm pool, and this module drives it in-process: the server
//! hands over each child's pipe ends (SCM_RIGHTS), and the bench writes the
//! job straight into the child and reads its output and exit status — no
//! daemon, socket protocol, JSON or runtime in between.
//!
//! The pool keeper plays the daemon's part: it asks the server for
//! replacements after a spawn completes, when nothing else is in flight or
//! fewer than a quarter of the target are ready (refilling while requests
//! run competes with them on a small machine); a spawn that finds the pool
//! empty asks for a child on demand.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use forkd_bench_floor::sys;
use tokio::io::AsyncReadExt;

use crate::{histogram, Latency, EXPECTED, SNIPPET};

/// One child's pipe ends, as the server handed them over.
struct Ends {
    /// The child's pid in the server's (the host's) pid namespace.
    pid: i32,
    job: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    status: OwnedFd,
}

#[derive(Default)]
struct Ready {
    queue: Mutex<VecDeque<Ends>>,
    cv: Condvar,
    notify: tokio::sync::Notify,
    /// The server's connection ended (it died or failed).
    closed: Mutex<Option<String>>,
}

impl Ready {
    fn push(&self, ends: Ends) {
        self.queue.lock().expect("queue").push_back(ends);
        self.cv.notify_one();
        self.notify.notify_one();
    }

    fn close(&self, why: String) {
        *self.closed.lock().expect("closed") = Some(why);
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    fn closed_error(&self) -> Option<anyhow::Error> {
        self.closed
            .lock()
            .expect("closed")
            .as_ref()
            .map(|why| anyhow!("the independent floor's server is gone: {why}"))
    }

    fn take_blocking(&self) -> Result<Ends> {
        let mut q = self.queue.lock().expect("queue");
        loop {
            if let Some(e) = q.pop_front() {
                return Ok(e);
            }
            if let Some(e) = self.closed_error() {
                return Err(e);
            }
            q = self.cv.wait(q).expect("queue");
        }
    }

    async fn take(&self) -> Result<Ends> {
        loop {
            let notified = self.notify.notified();
            if let Some(e) = self.queue.lock().expect("queue").pop_front() {
                return Ok(e);
            }
            if let Some(e) = self.closed_error() {
                return Err(e);
            }
            notified.await;
        }
    }
}

/// What the server reported at start-up (`floor_info`).
#[derive(Debug, Clone, Default)]
pub struct Info {
    pub seccomp_instructions: usize,
    pub cgroup_mode: String,
    pub landlock_abi: i64,
    /// Where the children's CPU time adds up.
    pub cpu_usage_file: Option<PathBuf>,
    pub bound: Vec<String>,
}

pub struct IndepFloor {
    control: OwnedFd,
    server: Mutex<std::process::Child>,
    pub server_pid: i32,
    pub info: Info,
    ready: Arc<Ready>,
    target: AtomicUsize,
    /// Children handed over and not yet taken.
    parked: Arc<AtomicUsize>,
    /// Forks asked for and not yet handed over.
    requested: Arc<AtomicUsize>,
    in_flight: AtomicUsize,
    job: Vec<u8>,
}

/// `libforkd_bench_floor.so`: `FORKD_BENCH_FLOOR_LIB`, else next to this
/// executable (or in its `deps/`, where cargo puts a dependency's cdylib).
pub fn find_library() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FORKD_BENCH_FLOOR_LIB") {
        return Ok(PathBuf::from(p));
    }
    const NAME: &str = "libforkd_bench_floor.so";
    let exe = std::env::current_exe().context("locating forkd-bench")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut tried = Vec::new();
    for d in [dir.to_path_buf(), dir.join("deps"), dir.join("..")] {
        let p = d.join(NAME);
        if p.exists() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    bail!(
        "the independent floor's library {NAME} was not found (tried {}); build it with `cargo build [--release] -p forkd-bench-floor` or set FORKD_BENCH_FLOOR_LIB",
        tried.join(", ")
    )
}

impl IndepFloor {
    /// Starts the server (numpy imported, root built) with an empty pool.
    pub fn start(python: &Path, preload: &[String]) -> Result<Arc<IndepFloor>> {
        let library = find_library()?;
        let (ours, theirs) = sys::seqpacket_pair().context("socketpair")?;
        let raw = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(python);
        cmd.arg("-c")
            .arg(forkd_bench_floor::SERVER_SCRIPT)
            .arg(&library)
            .args(preload)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: between fork and exec only dup2 runs (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || sys::dup_onto(raw, 3));
        }
        let server = cmd
            .spawn()
            .with_context(|| format!("starting the floor server with {}", python.display()))?;
        drop(theirs);
        let mut buf = vec![0u8; 1 << 16];
        let first = sys::poll_readable(&[ours.as_fd()], 120_000)
            .and_then(|_| sys::recv_with_fds(ours.as_fd(), &mut buf, 0))
            .context("waiting for the floor server")?;
        let text = match first {
            Some((n, _)) if buf[0] == b'R' => String::from_utf8_lossy(&buf[1..n]).into_owned(),
            Some((n, _)) if buf[0] == b'E' => {
                bail!(
                    "the floor server failed to start: {}",
                    String::from_utf8_lossy(&buf[1..n])
                )
            }
            _ => bail!("the floor server exited during start-up (its stderr above says why)"),
        };
        let mut info = Info::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("seccomp_instructions", v)) => {
                    info.seccomp_instructions = v.parse().unwrap_or(0)
                }
                Some(("cgroup_mode", v)) => info.cgroup_mode = v.into(),
                Some(("landlock_abi", v)) => info.landlock_abi = v.parse().unwrap_or(0),
                Some(("cpu_usage_file", v)) if !v.is_empty() => {
                    info.cpu_usage_file = Some(v.into())
                }
                Some(("bound", v)) => info.bound.push(v.into()),
                _ => {}
            }
        }
        let ready = Arc::new(Ready::default());
        let parked = Arc::new(AtomicUsize::new(0));
        let requested = Arc::new(AtomicUsize::new(0));
        let rx = ours.try_clone()?;
        {
            let (ready, parked, requested) = (ready.clone(), parked.clone(), requested.clone());
            std::thread::Builder::new()
                .name("floor-recv".into())
                .spawn(move || receive(rx, &ready, &parked, &requested))?;
        }
        let mut job = u32::try_from(SNIPPET.len())
            .expect("a short snippet")
            .to_be_bytes()
            .to_vec();
        job.extend_from_slice(SNIPPET.as_bytes());
        Ok(Arc::new(IndepFloor {
            control: ours,
            server_pid: server.id() as i32,
            server: Mutex::new(server),
            info,
            ready,
            target: AtomicUsize::new(0),
            parked,
            requested,
            in_flight: AtomicUsize::new(0),
            job,
        }))
    }

    /// Pids of the children parked in the pool right now.
    pub fn parked_pids(&self) -> Vec<i32> {
        let q = self.ready.queue.lock().expect("queue");
        q.iter().map(|e| e.pid).collect()
    }

    fn request(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.requested.fetch_add(n, Ordering::SeqCst);
        let mut msg = vec![b'F'];
        msg.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
        sys::send_message(self.control.as_fd(), &msg).context("asking the floor server to fork")
    }

    /// Sets the warm pool's size (0: every spawn forks on demand) and fills it.
    pub async fn set_pool(&self, target: usize) -> Result<()> {
        self.target.store(target, Ordering::SeqCst);
        self.refill_now()?;
        self.wait_full().await
    }

    fn refill_now(&self) -> Result<()> {
        let have = self.parked.load(Ordering::SeqCst) + self.requested.load(Ordering::SeqCst);
        self.request(self.target.load(Ordering::SeqCst).saturating_sub(have))
    }

    /// The pool full again (then a moment for the last children to settle,
    /// as the bench waits for forkd's pool).
    pub async fn wait_full(&self) -> Result<()> {
        let target = self.target.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.parked.load(Ordering::SeqCst) < target {
            if let Some(e) = self.ready.closed_error() {
                return Err(e);
            }
            if Instant::now() > deadline {
                bail!("the floor's pool did not fill in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    }

    fn before_take(&self) -> Result<()> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        // No pool, or the pool ran dry: fork one on demand.
        if self.target.load(Ordering::SeqCst) == 0
            || self.parked.load(Ordering::SeqCst) + self.requested.load(Ordering::SeqCst) == 0
        {
            self.request(1)?;
        }
        Ok(())
    }

    fn taken(&self) {
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    fn after_spawn(&self) -> Result<()> {
        let in_flight = self.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        let target = self.target.load(Ordering::SeqCst);
        let have = self.parked.load(Ordering::SeqCst) + self.requested.load(Ordering::SeqCst);
        if target > 0 && have < target && (in_flight == 0 || have < target.div_ceil(4)) {
            self.request(target - have)?;
        }
        Ok(())
    }

    /// One spawn, blocking: (when its output and exit status were complete,
    /// verified).
    fn spawn_blocking(&self) -> Result<(Instant, bool)> {
        self.before_take()?;
        let ends = self.ready.take_blocking()?;
        self.taken();
        let outcome = run_blocking(ends, &self.job);
        self.after_spawn()?;
        outcome.map(|o| (o.done, o.verified()))
    }

    /// Runs `code` in a floor child (sequentially, blocking): for tests of
    /// the floor's isolation.
    #[cfg(test)]
    pub fn run_code(&self, code: &str) -> Result<Output> {
        let mut job = u32::try_from(code.len())
            .context("the benchmark code is over 4 GiB")?
            .to_be_bytes()
            .to_vec();
        job.extend_from_slice(code.as_bytes());
        self.before_take()?;
        let ends = self.ready.take_blocking()?;
        self.taken();
        let outcome = run_blocking(ends, &job);
        self.after_spawn()?;
        outcome
    }

    /// One spawn on the runtime (for bursts and sustained load).
    pub async fn spawn(&self) -> Result<(Instant, bool)> {
        self.before_take()?;
        let ends = self.ready.take().await?;
        self.taken();
        let outcome = run_async(ends, &self.job).await;
        self.after_spawn()?;
        outcome
    }

    /// `n` sequential spawns, each request → verified result.
    pub async fn single(self: &Arc<Self>, n: usize) -> Result<Latency> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut h = histogram();
            let mut ok = 0;
            for _ in 0..n {
                let t = Instant::now();
                let (done, good) = me.spawn_blocking()?;
                let _ = h.record(forkd_bench::stats::micros(done - t).max(1));
                ok += u64::from(good);
            }
            Ok(Latency::from(&h, ok))
        })
        .await?
    }

    /// `n` concurrent spawns: (wall µs first request → last verified
    /// result, verified count).
    pub async fn burst(self: &Arc<Self>, n: usize) -> Result<(u64, u64)> {
        let (wall, ok, _) = self.burst_timed(n).await?;
        Ok((wall, ok))
    }

    /// As [`IndepFloor::burst`], with each spawn's latency from the burst's
    /// start (µs).
    pub async fn burst_timed(self: &Arc<Self>, n: usize) -> Result<(u64, u64, Vec<u64>)> {
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let me = self.clone();
            set.spawn(async move { me.spawn().await });
        }
        let (mut ok, mut last) = (0, t);
        let mut latencies = Vec::with_capacity(n);
        while let Some(r) = set.join_next().await {
            let (done, good) = r??;
            last = last.max(done);
            latencies.push(forkd_bench::stats::micros(done - t));
            ok += u64::from(good);
        }
        Ok((forkd_bench::stats::micros(last - t), ok, latencies))
    }

    /// Spawns per second over `secs` at `concurrency`: (rate, ok, failed).
    pub async fn sustained(
        self: &Arc<Self>,
        secs: f64,
        concurrency: usize,
    ) -> Result<(f64, u64, u64)> {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let me = self.clone();
            set.spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    match me.spawn().await {
                        Ok((_, true)) => ok += 1,
                        Ok((_, false)) => failed += 1,
                        Err(e) => return Err(e),
                    }
                }
                Ok((ok, failed))
            });
        }
        let (mut ok, mut failed) = (0, 0);
        while let Some(r) = set.join_next().await {
            let (o, f) = r??;
            ok += o;
            failed += f;
        }
        Ok((ok as f64 / started.elapsed().as_secs_f64(), ok, failed))
    }

    /// Ends the server: the children still parked are killed, all are
    /// reaped, the cgroups removed.
    pub fn stop(&self) {
        // Closing our end of the control socket is the server's signal.
        // SAFETY: shutdown(2) on our own open socket; the descriptor stays
        // owned (and is closed when `self` drops).
        unsafe {
            libc::shutdown(self.control.as_raw_fd(), libc::SHUT_RDWR);
        }
        let mut server = self.server.lock().expect("server");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match server.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = server.kill();
                    let _ = server.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for IndepFloor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn receive(sock: OwnedFd, ready: &Ready, parked: &AtomicUsize, requested: &AtomicUsize) {
    let mut buf = [0u8; 64];
    loop {
        match sys::recv_with_fds(sock.as_fd(), &mut buf, 4) {
            Ok(Some((13, fds))) if buf[0] == b'C' && fds.len() == 4 => {
                let mut fds = fds.into_iter();
                let mut next = || fds.next().expect("four descriptors");
                let pid = i32::from_le_bytes([buf[9], buf[10], buf[11], buf[12]]);
                let ends = Ends {
                    pid,
                    job: next(),
                    stdout: next(),
                    stderr: next(),
                    status: next(),
                };
                requested.fetch_sub(1, Ordering::SeqCst);
                parked.fetch_add(1, Ordering::SeqCst);
                ready.push(ends);
            }
            Ok(Some((n, _))) => {
                ready.close(format!("unexpected message of {n} bytes"));
                return;
            }
            Ok(None) => {
                ready.close("it closed the connection".into());
                return;
            }
            Err(e) => {
                ready.close(e.to_string());
                return;
            }
        }
    }
}

/// The child's exit status from its status pipe's bytes: `X` + code, or
/// `E` + what failed.
fn exit_code(status: &[u8]) -> Result<u8> {
    match status {
        [b'X', code, ..] => Ok(*code),
        [b'E', msg @ ..] => bail!("floor child: {}", String::from_utf8_lossy(msg)),
        _ => bail!("floor child ended without reporting a status"),
    }
}

/// What a floor child returned.
pub struct Output {
    pub done: Instant,
    pub stdout: Vec<u8>,
    /// Read so the child never blocks on a full pipe; shown by tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub stderr: Vec<u8>,
    pub code: u8,
}

impl Output {
    fn verified(&self) -> bool {
        self.code == 0 && self.stdout == EXPECTED.as_bytes()
    }
}

fn run_blocking(ends: Ends, job: &[u8]) -> Result<Output> {
    let Ends {
        pid: _,
        job: job_w,
        stdout,
        stderr,
        status,
    } = ends;
    // The job is far below a pipe's capacity: this write never blocks.
    std::fs::File::from(job_w).write_all(job)?;
    let (mut out, mut err, mut st) = (Vec::new(), Vec::new(), Vec::new());
    let mut files = [
        Some(std::fs::File::from(stdout)),
        Some(std::fs::File::from(stderr)),
        Some(std::fs::File::from(status)),
    ];
    let mut chunk = [0u8; 8192];
    loop {
        // The reply is due once stdout and stderr are closed and the exit
        // code is in (not when the child is gone: its teardown may lag).
        let status_done = files[2].is_none() || (st.len() >= 2 && st[0] == b'X');
        if status_done {
            files[2] = None;
        }
        if files.iter().all(Option::is_none) {
            break;
        }
        let open: Vec<usize> = (0..3).filter(|&i| files[i].is_some()).collect();
        let fds: Vec<_> = open
            .iter()
            .map(|&i| files[i].as_ref().expect("open").as_fd())
            .collect();
        let revents = sys::poll_readable(&fds, 30_000).context("waiting for a floor child")?;
        for (k, &i) in open.iter().enumerate() {
            if revents[k] == 0 {
                continue;
            }
            let n = files[i].as_mut().expect("open").read(&mut chunk)?;
            if n == 0 {
                files[i] = None;
            } else {
                [&mut out, &mut err, &mut st][i].extend_from_slice(&chunk[..n]);
            }
        }
    }
    let code = exit_code(&st)?;
    Ok(Output {
        done: Instant::now(),
        stdout: out,
        stderr: err,
        code,
    })
}

async fn run_async(ends: Ends, job: &[u8]) -> Result<(Instant, bool)> {
    std::fs::File::from(ends.job).write_all(job)?;
    let mut out_rx = tokio::net::unix::pipe::Receiver::from_owned_fd(ends.stdout)?;
    let mut err_rx = tokio::net::unix::pipe::Receiver::from_owned_fd(ends.stderr)?;
    let mut st_rx = tokio::net::unix::pipe::Receiver::from_owned_fd(ends.status)?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = async {
        let mut st = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            let n = st_rx.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            st.extend_from_slice(&chunk[..n]);
            if st.len() >= 2 && st[0] == b'X' {
                break;
            }
        }
        Ok::<_, std::io::Error>(st)
    };
    let (a, b, st) = tokio::join!(
        out_rx.read_to_end(&mut out),
        err_rx.read_to_end(&mut err),
        status
    );
    a?;
    b?;
    let code = exit_code(&st?)?;
    Ok((Instant::now(), code == 0 && out == EXPECTED.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True (after saying so on stderr, past the harness's capture) when not
    /// root: the floor's children need namespaces and cgroups.
    fn skip_unless_root() -> bool {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return false;
        }
        use std::io::Write;
        let _ = std::io::stderr().write_all(
            b"skipped: needs root (the floor forks isolated children: namespaces and cgroups)\n",
        );
        true
    }

    /// The interpreter for the floor's tests: `$FORKD_TEST_PYTHON`, else the
    /// workspace's `.venv/bin/python` (never skips: missing fails).
    fn python() -> PathBuf {
        let p = std::env::var_os("FORKD_TEST_PYTHON")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
        assert!(
            p.exists(),
            "test interpreter {} missing: run scripts/venv.sh",
            p.display()
        );
        p
    }

    /// (memory limit, pids limit, cpu quota µs) of the floor's cgroup that
    /// holds a process right now, read from the host (v1 or v2).
    fn running_child_limits(server: i32) -> Option<(u64, u64, Option<u64>)> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
        };
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let base = |h: &str| {
            let root = Path::new("/sys/fs/cgroup");
            let root = if v2 { root.to_path_buf() } else { root.join(h) };
            root.join("forkd-bench-floor").join(format!("f{server}"))
        };
        let dir = std::fs::read_dir(base("memory"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| read(p.join("cgroup.procs")).is_some_and(|s| !s.is_empty()))?;
        let name = dir.file_name()?.to_owned();
        if v2 {
            let cpu = read(dir.join("cpu.max"))?;
            return Some((
                read(dir.join("memory.max"))?.parse().ok()?,
                read(dir.join("pids.max"))?.parse().ok()?,
                cpu.split(' ').next()?.parse().ok(),
            ));
        }
        // The same child must be in the pids and cpu hierarchies' cgroups.
        for h in ["pids", "cpu", "cpuacct"] {
            read(base(h).join(&name).join("cgroup.procs")).filter(|s| !s.is_empty())?;
        }
        Some((
            read(dir.join("memory.limit_in_bytes"))?.parse().ok()?,
            read(base("pids").join(&name).join("pids.max"))?
                .parse()
                .ok()?,
            read(base("cpu").join(&name).join("cpu.cfs_quota_us"))?
                .parse()
                .ok(),
        ))
    }

    /// Attempts the escapes the floor's isolation must stop, from inside a
    /// real floor child, and reports what it could do.
    const PROBE: &str = r#"
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def attempt(f):
    try:
        f()
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def sysret(r):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
def write(path):
    with open(path, "w") as f:
        f.write("x")
def connect():
    s = socket.create_connection(("127.0.0.1", int(sys.argv_port)), timeout=1)
    s.close()
out = {
    "pid": os.getpid(),
    "hostname": socket.gethostname(),
    "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
    "shadow": attempt(lambda: open("/etc/shadow").read()),
    "write_usr": attempt(lambda: write("/usr/forkd-floor-probe")),
    "write_tmp": attempt(lambda: write("/tmp/probe")),
    "mount": attempt(lambda: sysret(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))),
    "unshare_net": attempt(lambda: sysret(libc.unshare(0x40000000))),
    "interfaces": sorted(n for _, n in socket.if_nameindex()),
    "connect_host": attempt(connect),
    "home": attempt(lambda: os.listdir("/root")),
    "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
}
print(repr(out))
"#;

    /// The floor exposes what forkd's shipped default policy exposes: when
    /// that policy changes, the floor (bench/floor/src/policy.rs) must follow,
    /// or its figures stop being a floor for the same isolation.
    #[test]
    fn floor_policy_matches_forkds_default_policy() {
        use forkd_bench_floor::policy as floor;
        let forkd = forkd_zygote::Policy::default_policy();
        let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hint = "forkd's policy/default.toml changed: update bench/floor/src/policy.rs to match";
        assert_eq!(forkd.filesystem.read_only, strs(floor::READ_ONLY), "{hint}");
        assert_eq!(forkd.filesystem.etc, strs(floor::ETC), "{hint}");
        assert_eq!(
            forkd.filesystem.devices_rw,
            strs(floor::DEVICES_RW),
            "{hint}"
        );
        assert_eq!(
            forkd.filesystem.devices_ro,
            strs(floor::DEVICES_RO),
            "{hint}"
        );
        // The same calls allowed, denied (EPERM) and argument-checked.
        use std::collections::BTreeSet;
        let set = |v: &mut dyn Iterator<Item = String>| v.collect::<BTreeSet<String>>();
        let floor_names =
            |l: &[(&'static str, libc::c_long)]| set(&mut l.iter().map(|e| floor::name(e).into()));
        let forkd_allow = set(&mut forkd.seccomp.allow.iter().flat_map(|g| g.syscalls.clone()));
        let floor_allow = floor_names(floor::ALLOW);
        assert_eq!(
            forkd_allow.difference(&floor_allow).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "allowed by forkd, not by the floor; {hint}"
        );
        assert_eq!(
            floor_allow.difference(&forkd_allow).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "allowed by the floor, not by forkd; {hint}"
        );
        assert_eq!(
            set(&mut forkd.seccomp.deny.iter().cloned()),
            floor_names(floor::DENY),
            "EPERM list; {hint}"
        );
        // The argument rules, by name and value.
        let rules = &forkd.seccomp.rules;
        let names = |l: &[(&str, libc::c_int)]| strs(&l.iter().map(|e| e.0).collect::<Vec<_>>());
        assert_eq!(
            rules.socket_families,
            names(floor::SOCKET_FAMILIES),
            "{hint}"
        );
        assert_eq!(
            rules.netlink_protocols,
            names(floor::NETLINK_PROTOCOLS),
            "{hint}"
        );
        assert_eq!(rules.ioctl_types, floor::IOCTL_TYPES, "{hint}");
        assert_eq!(rules.fcntl_deny, names(floor::FCNTL_DENY), "{hint}");
        assert!(rules.deny_clone_namespaces, "{hint}");

        // Both programs answer every call the same way: every number (and
        // other ABIs), and a sweep of the checked arguments. Run by forkd's
        // reference interpreter, which knows the instructions both emit.
        use forkd_zygote::seccomp::evaluate;
        let (ours, theirs) = (floor::seccomp().unwrap(), forkd.compile_seccomp().unwrap());
        const X86_64: u32 = 0xC000_003E;
        let same = |nr: u32, arch: u32, args: [u64; 6]| {
            let (a, b) = (
                evaluate(&ours, nr, arch, args),
                evaluate(&theirs, nr, arch, args),
            );
            assert_eq!(
                a, b,
                "nr {nr} arch {arch:#x} args {args:x?}: floor {a:#x}, forkd {b:#x}; {hint}"
            );
        };
        for nr in (0..1024).chain([0x4000_0000, 0x4000_0027, u32::MAX]) {
            same(nr, X86_64, [0; 6]);
            same(nr, 0x4000_0003, [0; 6]); // i386
        }
        let nr = |n: libc::c_long| u32::try_from(n).unwrap();
        for family in 0..64u64 {
            for proto in 0..32u64 {
                same(nr(libc::SYS_socket), X86_64, [family, 3, proto, 0, 0, 0]);
            }
            same(
                nr(libc::SYS_socket),
                X86_64,
                [1 << 32 | family, 1, 0, 0, 0, 0],
            );
        }
        for kind in 0..=0xffu64 {
            for dir in [0u64, 0x4004_0000, 0x8008_0000, 0xc010_0000] {
                same(
                    nr(libc::SYS_ioctl),
                    X86_64,
                    [1, dir | kind << 8 | 0x13, 0, 0, 0, 0],
                );
            }
        }
        for cmd in 0..1100u64 {
            same(nr(libc::SYS_fcntl), X86_64, [1, cmd, 0, 0, 0, 0]);
        }
        for bit in 0..64 {
            same(
                nr(libc::SYS_clone),
                X86_64,
                [1u64 << bit | 17, 0, 0, 0, 0, 0],
            );
        }
        let ns = (libc::CLONE_NEWNET | libc::CLONE_NEWUSER) as u64;
        same(nr(libc::SYS_clone), X86_64, [ns, 0, 0, 0, 0, 0]);
        // Installing costs per instruction: the floor's must not be the
        // cheaper of the two by much (or the ratios flatter forkd's).
        assert!(
            ours.len().abs_diff(theirs.len()) <= 16,
            "floor {} vs forkd {} instructions",
            ours.len(),
            theirs.len()
        );
    }

    #[test]
    fn floor_children_are_isolated_and_the_snippet_still_runs() {
        if skip_unless_root() {
            return;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let floor = IndepFloor::start(&python(), &["numpy".into()]).unwrap();
        // The library the server loaded carries this build's filter.
        assert_eq!(
            floor.info.seccomp_instructions,
            forkd_bench_floor::policy::seccomp().unwrap().len(),
            "{:?}",
            floor.info
        );
        // A listener in the host's network namespace the sandbox must not
        // reach.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let probe = format!("import sys; sys.argv_port = {port}\n{PROBE}");
        let out = floor.run_code(&probe).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.code,
            0,
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            "'pid': 1,",
            "'hostname': 'sandbox'",
            "'cap_eff': '0000000000000000'",
            "'cap_bnd': '0000000000000000'",
            "'no_new_privs': '1'",
            "'seccomp': '2'",
            "'shadow': 'ENOENT'",
            "'write_tmp': 'allowed'",
            "'mount': 'EPERM'",
            "'unshare_net': 'EPERM'",
            "'interfaces': ['lo']",
            "'connect_host': 'ECONNREFUSED'",
            "'processes': [1]",
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        // Absent from the root, or (when the interpreter lives under /root)
        // a bare mount point that landlock does not grant.
        assert!(
            text.contains("'home': 'ENOENT'") || text.contains("'home': 'EACCES'"),
            "{text}"
        );
        assert!(
            text.contains("'write_usr': 'EROFS'") || text.contains("'write_usr': 'EACCES'"),
            "{text}"
        );
        assert!(
            listener.accept().is_err(),
            "the sandbox reached the host's loopback"
        );

        // Its cgroup, seen from the host while a child runs: forkd's default
        // limits, and the child in it.
        let sleeper = {
            let floor = floor.clone();
            std::thread::spawn(move || {
                floor.run_code("import time; time.sleep(1.5); print('done')")
            })
        };
        std::thread::sleep(Duration::from_millis(700));
        let checked = running_child_limits(floor.server_pid);
        let done = sleeper.join().unwrap().unwrap();
        assert_eq!(done.stdout, b"done\n");
        let limits = checked.expect("the running child's cgroup");
        assert_eq!(
            limits,
            (512 << 20, 64, Some(100_000)),
            "memory, pids, cpu quota"
        );

        // A bystander spawn still returns the verified snippet output.
        let (_, ok) = floor.spawn_blocking().unwrap();
        assert!(ok);
        rt.block_on(async {
            let (_, ok) = floor.burst(5).await.unwrap();
            assert_eq!(ok, 5);
        });
        floor.stop();
        // Nothing of the server is left behind.
        for h in ["memory", "pids", "cpu", "cpuacct", ""] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(h)
                .join("forkd-bench-floor")
                .join(format!("f{}", floor.server_pid));
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }

    /// A server killed outright leaves its cgroups behind (its children die
    /// with it, by their parent-death signal); the next server removes them.
    #[test]
    fn a_killed_servers_cgroups_are_removed_by_the_next_one() {
        if skip_unless_root() {
            return;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = IndepFloor::start(&python(), &[]).unwrap();
        rt.block_on(a.set_pool(3)).unwrap();
        let dir =
            Path::new("/sys/fs/cgroup/pids/forkd-bench-floor").join(format!("f{}", a.server_pid));
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = if v2 {
            Path::new("/sys/fs/cgroup/forkd-bench-floor").join(format!("f{}", a.server_pid))
        } else {
            dir
        };
        assert!(dir.exists(), "{}", dir.display());
        sys::kill(a.server_pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.parked_pids().iter().all(|p| {
            !Path::new("/proc")
                .join(p.to_string())
                .join("cgroup")
                .exists()
        }) {
            assert!(
                Instant::now() < deadline,
                "parked children outlived their server"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a.stop();
        assert!(dir.exists(), "a killed server cannot clean up");
        let b = IndepFloor::start(&python(), &[]).unwrap();
        assert!(
            !dir.exists(),
            "{} left behind after the next start",
            dir.display()
        );
        b.stop();
    }
}
