//! Harness for forkd's integration tests: real daemons (root, namespaces,
//! cgroups, a numpy zygote) plus leak checks that run at the end of every test.
//!
//! Every test starts its own daemon with [`TestDaemon::start`] and ends with
//! [`TestDaemon::finish`] (shutdown, then [`LeakReport::assert_clean`]):
//!
//! 1. **cgroups**: no `<mount>/forkd-it/<instance>` directory is left in any
//!    cgroup hierarchy (this covers every sandbox cgroup, which lives below).
//! 2. **processes**: no process attributed to this daemon is left anywhere on
//!    the host (attribution: the zygote's environment carries
//!    `FORKD_IT_DAEMON=<instance>`, which every forked sandbox process keeps in
//!    `/proc/<pid>/environ`; and a sandbox's `/proc/<pid>/cgroup` names
//!    `/forkd-it/<instance>/...`). Descendants of the test process (by PPid
//!    chains) that belong to no test daemon at all are reported too, if they
//!    persist across two scans.
//! 3. **fds**: the test process's descriptors are back to the set it had
//!    before the daemon started (same numbers, same targets). This is only
//!    exact when no other harness session overlapped this one (tests run in
//!    parallel threads of one process and open descriptors of their own), so
//!    it runs whenever the session was alone and is otherwise reported as
//!    skipped. `tests/leaks.rs` holds a single test so that its check is
//!    always exact (and `--test-threads=1` makes every test's check exact).
//! 4. **mounts**: the host's `/proc/self/mountinfo` is unchanged.
//!
//! `tests/leaks.rs` also proves the checks can fail (each one is made to
//! fire on a daemon that is still running, or on a real mount).

#![allow(dead_code)]

pub mod cells;
pub mod scrape;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use forkd_ipc::{
    AsyncClient, ClientError, ErrorCode, InlineFile, KilledBy, Limits, Program, SpawnRequest,
    SpawnResult,
};

/// Shared cgroup parent of every test daemon (`<mount>/forkd-it/<instance>`).
pub const CGROUP_PARENT: &str = "forkd-it";
/// Environment variable put into every test zygote's environment; its value
/// is the daemon's instance name.
pub const MARKER_VAR: &str = "FORKD_IT_DAEMON";
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("forkd/ has a parent")
        .to_path_buf()
}

/// The interpreter for test zygotes: `$FORKD_TEST_PYTHON`, else the
/// workspace's `.venv/bin/python`. Never skips: a missing interpreter fails.
pub fn python() -> PathBuf {
    let (path, origin) = match std::env::var_os("FORKD_TEST_PYTHON") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "FORKD_TEST_PYTHON"),
        _ => (workspace_root().join(".venv/bin/python"), "the default"),
    };
    if !path.exists() {
        panic!(
            "test interpreter {} ({origin}) does not exist: run scripts/venv.sh (or scripts/test.sh) first",
            path.display()
        );
    }
    path
}

/// With `FORKD_TEST_EXPECT_CGROUP_V2` set (the cgroup v2 guest of
/// tests/vm/cgroup-v2-vm.sh), a daemon that did not get cgroup v2 with every
/// limit enforced fails the test instead of quietly testing something else.
fn expect_cgroup_v2_if_asked(cgroups: &forkd_cgroup::Manager) {
    if std::env::var_os("FORKD_TEST_EXPECT_CGROUP_V2").is_some() {
        assert!(
            cgroups.mode() == forkd_cgroup::Mode::V2 && cgroups.limits_enforced(),
            "FORKD_TEST_EXPECT_CGROUP_V2 is set but the daemon uses {:?} (limits enforced: {})",
            cgroups.mode(),
            cgroups.limits_enforced()
        );
    }
}

/// True, after printing why, when this test cannot run here because the
/// process is not root: the caller returns at once. Root tests start with
/// `if skip_unless_root("...") { return; }`, so an unprivileged
/// `cargo test` reports them as skipped instead of failing or passing silently.
pub fn skip_unless_root(needs: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    skipped(&format!("needs root ({needs})"));
    true
}

/// Prints `skipped: <why>` where it is seen: straight to stderr, past the
/// test harness's capture (which hides `eprintln!` of passing tests), so a
/// skip never looks like a pass.
pub fn skipped(why: &str) {
    // One write: stderr is unbuffered and the harness prints meanwhile.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("skipped: {why}\n").as_bytes(),
    );
}

fn require_root() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("forkd's integration tests need root (namespaces and cgroups): run scripts/test.sh as root");
    }
}

/// Opt-in daemon logs (`FORKD_TEST_LOG=debug`); they go straight to stderr.
fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(level) = std::env::var("FORKD_TEST_LOG") {
            forkd::init_logging(&level, false);
        }
    });
}

// ---------------------------------------------------------------------------
// Sessions: which tests overlap in time (for the exactness of the fd check)
// ---------------------------------------------------------------------------

static SESSIONS: Mutex<Vec<Arc<AtomicBool>>> = Mutex::new(Vec::new());

/// One test's span from before its daemon starts until its leak checks are
/// done. `overlapped` becomes true as soon as another session is alive at the
/// same time.
struct Session {
    overlapped: Arc<AtomicBool>,
}

impl Session {
    fn begin() -> Session {
        let flag = Arc::new(AtomicBool::new(false));
        let mut all = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
        if !all.is_empty() {
            flag.store(true, Ordering::SeqCst);
            for other in all.iter() {
                other.store(true, Ordering::SeqCst);
            }
        }
        all.push(flag.clone());
        Session { overlapped: flag }
    }

    fn alone(&self) -> bool {
        !self.overlapped.load(Ordering::SeqCst)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut all = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|f| !Arc::ptr_eq(f, &self.overlapped));
    }
}

/// Held by a test that runs a daemon of its own (a `forkd` child process)
/// instead of a [`TestDaemon`]: other tests' fd checks then know they were
/// not alone.
pub struct ExternalSession(#[allow(dead_code)] Session);

pub fn external_session() -> ExternalSession {
    ExternalSession(Session::begin())
}

/// Installs a test's outside client (pip or npm, with pipes to this process,
/// so it counts as a session for the other tests' exact fd checks). `None`
/// (after a `skipped:` line naming `what`) when it cannot be had, unless the
/// environment variable `required_by` is set: then that is a failure.
pub async fn install_or_skip<T: Send + 'static>(
    what: &str,
    required_by: Option<&str>,
    install: fn() -> Result<T, String>,
) -> Option<T> {
    let _installing = external_session();
    match tokio::task::spawn_blocking(install).await.unwrap() {
        Ok(t) => Some(t),
        Err(why) if required_by.is_some_and(|v| std::env::var_os(v).is_some()) => {
            panic!("{what} is required here: {why}")
        }
        Err(why) => {
            skipped(&format!("{what} is not available: {why}"));
            None
        }
    }
}

// ---------------------------------------------------------------------------
// /proc scanning
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub starttime: u64,
    pub comm: String,
    /// Value of `FORKD_IT_DAEMON` in `/proc/<pid>/environ`, if any.
    pub marker: Option<String>,
    /// `/proc/<pid>/cgroup` as seen from the host.
    pub cgroup: String,
}

impl std::fmt::Display for ProcInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}) state {} ppid {} marker {:?} cgroups [{}]",
            self.pid,
            self.comm,
            self.state,
            self.ppid,
            self.marker,
            self.cgroup
                .lines()
                .filter(|l| l.contains(CGROUP_PARENT))
                .collect::<Vec<_>>()
                .join("; ")
        )
    }
}

/// Parses `/proc/<pid>/stat`: (state, ppid, starttime, comm).
pub fn proc_stat(pid: i32) -> Option<(char, i32, u64, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let state = rest.first()?.chars().next()?;
    let ppid = rest.get(1)?.parse().ok()?;
    let starttime = rest.get(19)?.parse().ok()?;
    Some((state, ppid, starttime, comm))
}

pub fn proc_info(pid: i32) -> Option<ProcInfo> {
    let (state, ppid, starttime, comm) = proc_stat(pid)?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let prefix = format!("{MARKER_VAR}=");
    let marker = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(prefix.as_str()).map(str::to_string));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    Some(ProcInfo {
        pid,
        ppid,
        state,
        starttime,
        comm,
        marker,
        cgroup,
    })
}

/// Every process (thread-group leader) on the host.
pub fn all_processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// Whether a `/proc/<pid>/cgroup` text places the process at or below
/// `/forkd-it/<instance>[/<sub>]` in some hierarchy.
pub fn cgroup_under(cgroup: &str, instance: &str, sub: Option<&str>) -> bool {
    let want = match sub {
        Some(s) => format!("/{CGROUP_PARENT}/{instance}/{s}"),
        None => format!("/{CGROUP_PARENT}/{instance}"),
    };
    cgroup.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path == want || path.starts_with(&format!("{want}/"))
    })
}

/// Processes that belong to the test daemon `instance`: its zygotes (by the
/// environment marker) and its sandboxes (marker, or cgroup for anything a
/// sandbox exec'd).
pub fn processes_of(instance: &str) -> Vec<ProcInfo> {
    all_processes()
        .into_iter()
        .filter(|p| {
            p.marker.as_deref() == Some(instance) || cgroup_under(&p.cgroup, instance, None)
        })
        .collect()
}

/// Live (non-zombie) processes of sandbox `sb<id>` of daemon `instance`.
pub fn sandbox_processes(instance: &str, sandbox: u64) -> Vec<ProcInfo> {
    let sub = format!("sb{sandbox}");
    all_processes()
        .into_iter()
        .filter(|p| p.state != 'Z' && cgroup_under(&p.cgroup, instance, Some(&sub)))
        .collect()
}

/// Descendants of `root` by PPid chains.
pub fn descendants(root: i32) -> Vec<ProcInfo> {
    let all = all_processes();
    let mut children: BTreeMap<i32, Vec<&ProcInfo>> = BTreeMap::new();
    for p in &all {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for c in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            out.push((*c).clone());
            stack.push(c.pid);
        }
    }
    out
}

/// True while `pid` is a live (non-zombie) process started at `starttime`.
pub fn process_alive(pid: i32, starttime: u64) -> bool {
    matches!(proc_stat(pid), Some((state, _, st, _)) if st == starttime && state != 'Z' && state != 'X')
}

// ---------------------------------------------------------------------------
// Descriptors and mounts
// ---------------------------------------------------------------------------

/// The test process's open descriptors: number → link target.
pub fn open_fds() -> BTreeMap<i32, String> {
    let mut out = BTreeMap::new();
    // Collect the numbers first: reading the directory holds an fd itself.
    let nums: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return out,
    };
    for n in nums {
        if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{n}")) {
            out.insert(n, target.display().to_string());
        }
    }
    out
}

/// The host's mount table, without mounts that container engines running
/// on the same machine make and remove on their own (Docker's overlays,
/// network namespaces and runtime binds): forkd never mounts there, and a
/// benchmark comparing forkd with Docker may run next to the tests.
pub fn mountinfo() -> String {
    const OTHERS: [&str; 3] = [" /var/lib/docker/", " /run/docker/", " /run/containerd/"];
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter(|l| !OTHERS.iter().any(|p| l.contains(p)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Mount points of every cgroup (v1) and cgroup2 hierarchy.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    forkd_cgroup::hierarchy_mounts()
        .expect("read /proc/self/mountinfo")
        .into_iter()
        .map(|m| m.mount_point)
        .collect()
}

/// `<mount>/forkd-it/<instance>` in every cgroup hierarchy that has it.
pub fn instance_cgroup_dirs(instance: &str) -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .map(|m| m.join(CGROUP_PARENT).join(instance))
        .filter(|p| p.exists())
        .collect()
}

/// Kills every process in a cgroup directory tree and removes it (for test
/// leftovers only; the daemon does its own cleanup).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in &pids {
            if *pid > 0 {
                // SAFETY: kill with a positive pid signals exactly that process.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes `forkd-it/t<pid>-<n>` cgroups left by test processes that died
/// (a crashed or killed test run); `cleanup_stale` only knows `d<pid>` names.
fn cleanup_dead_test_cgroups() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for mount in cgroup_mounts() {
            let parent = mount.join(CGROUP_PARENT);
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix('t')
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(p, _)| p.parse::<i32>().ok())
                else {
                    continue;
                };
                // SAFETY: kill(pid, 0) only probes for existence (pid > 0).
                let alive = pid > 0
                    && (unsafe { libc::kill(pid, 0) } == 0
                        || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH));
                if !alive {
                    eprintln!(
                        "harness: removing cgroup {} left by dead test process {pid}",
                        e.path().display()
                    );
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Leak tracking
// ---------------------------------------------------------------------------

/// What a daemon's leak checks compare against.
struct Tracker {
    instance: String,
    /// The daemon's own cgroup base dirs (empty if it never started).
    base_dirs: Vec<PathBuf>,
    fds: BTreeMap<i32, String>,
    mounts: String,
    session: Session,
}

impl Tracker {
    fn new(instance: String) -> Tracker {
        let session = Session::begin();
        Tracker {
            instance,
            base_dirs: Vec::new(),
            fds: open_fds(),
            mounts: mountinfo(),
            session,
        }
    }

    /// Takes every measurement once. `fd_wait` bounds how long descriptors
    /// closed asynchronously (reader tasks that end on EOF) may take.
    async fn report(&self, fd_wait: Duration) -> LeakReport {
        let mut report = LeakReport::default();

        // 1. cgroups
        let mut dirs: BTreeSet<PathBuf> = self
            .base_dirs
            .iter()
            .filter(|p| p.exists())
            .cloned()
            .collect();
        dirs.extend(instance_cgroup_dirs(&self.instance));
        report.cgroups = dirs.iter().map(|d| d.display().to_string()).collect();

        // 2. processes
        report.processes = processes_of(&self.instance)
            .iter()
            .map(ToString::to_string)
            .collect();
        let me = std::process::id() as i32;
        let unknown = |list: Vec<ProcInfo>| -> Vec<ProcInfo> {
            list.into_iter()
                .filter(|p| p.marker.is_none() && !p.cgroup.contains(&format!("/{CGROUP_PARENT}/")))
                .collect()
        };
        let first = unknown(descendants(me));
        // Attribution is exact only when no other test's daemon overlapped
        // this one (as for fds below): an overlapping daemon's processes in
        // transition (a zygote starting, a child between fork and its cgroup)
        // carry neither marker nor cgroup. tests/leaks.rs runs alone.
        if !first.is_empty() && self.session.alone() {
            // A daemon of another test may be between fork and exec of a
            // zygote: only what persists counts.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let second: Vec<ProcInfo> = unknown(descendants(me));
            for p in first {
                if second
                    .iter()
                    .any(|q| q.pid == p.pid && q.starttime == p.starttime)
                {
                    report
                        .processes
                        .push(format!("unattributed descendant of the test process: {p}"));
                }
            }
        }

        // 3. fds (exact only when no other session overlapped)
        if self.session.alone() {
            let deadline = Instant::now() + fd_wait;
            loop {
                let now = open_fds();
                let new: Vec<String> = now
                    .iter()
                    .filter(|(n, t)| self.fds.get(n) != Some(t))
                    .map(|(n, t)| format!("fd {n} -> {t}"))
                    .collect();
                if new.is_empty() || Instant::now() >= deadline {
                    report.fds = Some(new);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            // The session may have been joined while we polled.
            if !self.session.alone() {
                report.fds = None;
            }
        }

        // 4. mounts
        let now = mountinfo();
        if now != self.mounts {
            let before: BTreeSet<&str> = self.mounts.lines().collect();
            let after: BTreeSet<&str> = now.lines().collect();
            report
                .mounts
                .extend(after.difference(&before).map(|l| format!("new mount: {l}")));
            report.mounts.extend(
                before
                    .difference(&after)
                    .map(|l| format!("mount gone: {l}")),
            );
            if report.mounts.is_empty() {
                report.mounts.push("mount table reordered".into());
            }
        }
        report
    }
}

/// Result of the leak checks. `fds` is `None` when the fd check could not be
/// exact (another test's session overlapped this one).
#[derive(Debug, Default)]
pub struct LeakReport {
    pub cgroups: Vec<String>,
    pub processes: Vec<String>,
    pub fds: Option<Vec<String>>,
    pub mounts: Vec<String>,
}

impl LeakReport {
    pub fn is_clean(&self) -> bool {
        self.cgroups.is_empty()
            && self.processes.is_empty()
            && self.fds.as_ref().is_none_or(Vec::is_empty)
            && self.mounts.is_empty()
    }

    pub fn assert_clean(&self) {
        match &self.fds {
            Some(_) => println!("leak checks: cgroups, processes, fds (exact), mounts"),
            None => println!(
                "leak checks: cgroups, marked processes, mounts; fd and unmarked-process checks skipped (another test's daemon overlapped this one; tests/leaks.rs runs them exactly)"
            ),
        }
        assert!(self.is_clean(), "leaks after shutdown:\n{self:#?}");
    }
}

// ---------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn new_instance() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A default config for tests: one numpy zygote `default` on the test
/// interpreter, with the leak-check marker in its environment, and a unique
/// cgroup instance under `forkd-it`.
pub fn test_config(instance: &str) -> forkd::Config {
    let mut config = forkd::Config::default();
    let mut z = forkd::config::ZygoteSection {
        name: "default".into(),
        python: python(),
        preload: vec!["numpy".into()],
        ..forkd::config::ZygoteSection::default()
    };
    z.env.insert(MARKER_VAR.into(), instance.into());
    config.zygotes = vec![z];
    config.cgroup.parent = CGROUP_PARENT.into();
    config.cgroup.instance = instance.into();
    config
}

/// A daemon started for one test. Use [`TestDaemon::finish`] at the end.
pub struct TestDaemon {
    running: Option<forkd::Running>,
    pub daemon: Arc<forkd::state::State>,
    pub socket: PathBuf,
    pub instance: String,
    tracker: Option<Tracker>,
    dir: Option<tempfile::TempDir>,
}

/// A daemon after shutdown (or one that failed to start): only leak checks left.
pub struct Stopped {
    tracker: Tracker,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Stopped {
    pub async fn report(&self) -> LeakReport {
        self.tracker.report(Duration::from_secs(3)).await
    }

    pub async fn assert_no_leaks(self) {
        self.report().await.assert_clean();
    }

    pub fn fd_check_is_exact(&self) -> bool {
        self.tracker.session.alone()
    }
}

impl TestDaemon {
    /// Starts a daemon; panics with the start error.
    pub async fn start(tweak: impl FnOnce(&mut forkd::Config)) -> TestDaemon {
        match Self::try_start(None, tweak).await {
            Ok(d) => d,
            Err((e, _)) => panic!("forkd::start failed: {e}"),
        }
    }

    /// Starts a daemon on `socket` (default: a fresh tempdir). On failure
    /// returns the error and the leak checks for what the attempt created.
    pub async fn try_start(
        socket: Option<PathBuf>,
        tweak: impl FnOnce(&mut forkd::Config),
    ) -> Result<TestDaemon, (forkd::StartError, Stopped)> {
        require_root();
        init_logging();
        cleanup_dead_test_cgroups();
        let instance = new_instance();
        let mut config = test_config(&instance);
        tweak(&mut config);
        // Whatever the tweak did, every zygote carries the marker and the
        // cgroups stay unique.
        for z in &mut config.zygotes {
            z.env.insert(MARKER_VAR.into(), instance.clone());
        }
        config.cgroup.parent = CGROUP_PARENT.into();
        config.cgroup.instance = instance.clone();

        let dir = tempfile::Builder::new()
            .prefix("forkd-it-")
            .tempdir()
            .expect("tempdir");
        let socket = socket.unwrap_or_else(|| dir.path().join("forkd.sock"));
        let mut tracker = Tracker::new(instance.clone());
        match forkd::start(config, Some(&socket)).await {
            Ok(running) => {
                let daemon = running.daemon.clone();
                expect_cgroup_v2_if_asked(&daemon.cgroups);
                tracker.base_dirs = daemon
                    .cgroups
                    .base_dirs()
                    .iter()
                    .map(|p| p.to_path_buf())
                    .collect();
                Ok(TestDaemon {
                    running: Some(running),
                    daemon,
                    socket,
                    instance,
                    tracker: Some(tracker),
                    dir: Some(dir),
                })
            }
            Err(e) => Err((
                e,
                Stopped {
                    tracker,
                    socket,
                    _dir: dir,
                },
            )),
        }
    }

    /// The daemon's validated configuration.
    pub fn settings(&self) -> &forkd::settings::Settings {
        self.running
            .as_ref()
            .expect("the daemon is running")
            .settings()
    }

    /// The metrics endpoint's TCP address (when `metrics_listen` is TCP).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.running.as_ref().and_then(forkd::Running::metrics_addr)
    }

    pub async fn client(&self) -> AsyncClient {
        AsyncClient::connect(&self.socket)
            .await
            .expect("connect to the test daemon")
    }

    /// Sends one request on a fresh connection.
    pub async fn spawn(&self, req: &SpawnRequest) -> Result<SpawnResult, ClientError> {
        self.client().await.spawn(req).await
    }

    /// Runs `code` with default limits and a 20 s timeout; panics on an error reply.
    pub async fn run(&self, code: &str) -> SpawnResult {
        let r = req(code);
        self.spawn(&r)
            .await
            .unwrap_or_else(|e| panic!("spawn failed: {e}"))
    }

    /// Leak measurements while the daemon is still running (for the
    /// self-test of the checks).
    pub async fn report_now(&self) -> LeakReport {
        self.tracker
            .as_ref()
            .expect("running")
            .report(Duration::ZERO)
            .await
    }

    /// Host pid of the zygote currently serving `default`.
    pub async fn zygote_pid(&self) -> i32 {
        let z = self.daemon.pool.get("default").await.expect("zygote ready");
        z.info().pid as i32
    }

    /// (host pid, start time) of this daemon's sandbox processes that have
    /// created `/tmp/<name>` in their scratch directory (seen from the host
    /// through `/proc/<pid>/root`), waiting up to `timeout` for at least one.
    pub async fn wait_for_scratch_file(&self, name: &str, timeout: Duration) -> Vec<(i32, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<(i32, u64)> = processes_of(&self.instance)
                .into_iter()
                .filter(|p| p.state != 'Z' && cgroup_under(&p.cgroup, &self.instance, None))
                .filter(|p| Path::new(&format!("/proc/{}/root/tmp/{name}", p.pid)).exists())
                .map(|p| (p.pid, p.starttime))
                .collect();
            if !found.is_empty() {
                return found;
            }
            if Instant::now() > deadline {
                panic!(
                    "no sandbox of {} created /tmp/{name} within {timeout:?}",
                    self.instance
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Shuts the daemon down (no checks yet).
    pub async fn shutdown(self) -> Stopped {
        self.shutdown_with(std::future::pending()).await
    }

    /// Shuts down, `force` ending the drain early (as a second signal does).
    pub async fn shutdown_with(mut self, force: impl std::future::Future<Output = ()>) -> Stopped {
        let running = self.running.take().expect("not shut down yet");
        running.shutdown_with(force).await;
        Stopped {
            tracker: self.tracker.take().expect("tracker"),
            socket: self.socket.clone(),
            _dir: self.dir.take().expect("tempdir"),
        }
    }

    /// Shuts down and runs every leak check (and that the socket file is gone).
    pub async fn finish(self) {
        let stopped = self.shutdown().await;
        assert!(
            !stopped.socket.exists(),
            "socket file {} left after shutdown",
            stopped.socket.display()
        );
        stopped.assert_no_leaks().await;
    }
}

impl Drop for TestDaemon {
    /// A test that panicked before `finish`: remove what it can so one failure
    /// does not leave cgroups and zygotes behind.
    fn drop(&mut self) {
        if self.running.is_none() {
            return;
        }
        let _ = self.daemon.cgroups.shutdown();
        for p in processes_of(&self.instance) {
            if p.pid > 0 {
                // SAFETY: kill with a positive pid signals exactly that process.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
        }
        for d in instance_cgroup_dirs(&self.instance) {
            remove_cgroup_tree(&d);
        }
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// A code request with a 20 s timeout and default limits.
pub fn req(code: &str) -> SpawnRequest {
    SpawnRequest {
        program: Program::Code(code.into()),
        timeout_ms: Some(20_000),
        ..SpawnRequest::default()
    }
}

pub fn server_error(e: ClientError) -> forkd_ipc::ErrorReply {
    match e {
        ClientError::Server(reply) => reply,
        other => panic!("expected an error reply from the daemon, got {other:?}"),
    }
}

/// Polls `f` until it is true or `timeout` passes; returns the last value.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A short table printer for test output.
pub struct Table {
    rows: Vec<(String, String, String, bool)>,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    pub fn new() -> Table {
        Table { rows: Vec::new() }
    }

    /// Records one check: `got` must be one of `expected`.
    pub fn check(&mut self, name: &str, got: &str, expected: &[&str]) {
        let ok = expected.contains(&got);
        self.rows
            .push((name.into(), expected.join(" | "), got.into(), ok));
    }

    /// Records a check whose verdict was computed by the caller.
    pub fn verdict(&mut self, name: &str, got: &str, expected: &str, ok: bool) {
        self.rows
            .push((name.into(), expected.into(), got.into(), ok));
    }

    /// Prints the table and fails if any row failed.
    pub fn assert_all(&self, title: &str) {
        let w0 = self
            .rows
            .iter()
            .map(|r| r.0.len())
            .max()
            .unwrap_or(4)
            .max(5);
        let w1 = self
            .rows
            .iter()
            .map(|r| r.1.len())
            .max()
            .unwrap_or(8)
            .clamp(8, 40);
        println!("\n{title}");
        println!("{:<w0$}  {:<w1$}  {:<4}  got", "check", "expected", "ok");
        for (name, exp, got, ok) in &self.rows {
            let got: String = got.chars().take(160).collect();
            println!(
                "{name:<w0$}  {exp:<w1$}  {:<4}  {got}",
                if *ok { "yes" } else { "NO" }
            );
        }
        let failed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| !r.3)
            .map(|r| r.0.as_str())
            .collect();
        assert!(
            failed.is_empty(),
            "{title}: failed checks: {failed:?} (table above)"
        );
    }
}
