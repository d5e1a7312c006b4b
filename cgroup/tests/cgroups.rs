//! Real-cgroup tests. They need root and mount cgroup hierarchies; each runs
//! serialized (one global lock), uses instance `test-<pid>-<n>` under parent
//! `forkd-test`, and a guard removes every directory it registered even when
//! the test panics. At the end each test asserts the parent is empty.
//!
//! v1 tests run when a v1 `memory` hierarchy is mounted (this dev VM);
//! v2 tests use the first cgroup2 mount (`/sys/fs/cgroup/unified` here), and
//! the v2 limit tests need a cgroup2 root with the memory, cpu and pids
//! controllers (a pure v2 host such as the guest of tests/vm/cgroup-v2-vm.sh).
//! Without root, or where a flavour is missing, its tests print
//! `skipped: <reason>` and pass, unless
//! `FORKD_TEST_EXPECT_CGROUP_V2` is set (that guest): then a missing v2
//! controller fails them.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

use std::fs;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use forkd_cgroup::{Config, Error, Limits, Manager, Mode, ModeChoice, SandboxCgroup};

const PARENT: &str = "forkd-test";
const MIB: u64 = 1 << 20;

static LOCK: Mutex<()> = Mutex::new(());
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A case run on v1 when this host has v1 controllers and on v2 when a
/// cgroup2 root with controllers exists (the guest of tests/vm/cgroup-v2-vm.sh).
macro_rules! both_modes {
    ($case:ident, $v1:ident, $v2:ident) => {
        #[test]
        fn $v1() {
            if have_v1() {
                $case(ModeChoice::V1, None);
            }
        }

        #[test]
        fn $v2() {
            if let Some(root) = v2_with_controllers() {
                $case(ModeChoice::V2, Some(root));
            }
        }
    };
}

// ---------- environment probes (independent of the crate) ----------

fn mounts() -> Vec<(PathBuf, String, String)> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                f[4].into(),
                f[sep + 1].to_owned(),
                f.get(sep + 3)?.to_string(),
            ))
        })
        .collect()
}

fn v1_mount(ctl: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == ctl))
        .map(|m| m.0)
}

fn first_cgroup2() -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|(_, t, _)| t == "cgroup2")
        .map(|m| m.0)
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// Prints `skipped: <why>` past the test harness's capture (which hides
/// `eprintln!` of passing tests), so a skip never looks like a pass.
fn skipped(why: &str) {
    // One write: stderr is unbuffered and the harness prints meanwhile.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("skipped: {why}\n").as_bytes(),
    );
}

/// True when root; otherwise prints why the test is skipped.
fn root_or_skip() -> bool {
    let root = is_root();
    if !root {
        skipped("needs root (creates and writes cgroups)");
    }
    root
}

fn have_v1() -> bool {
    if !root_or_skip() {
        return false;
    }
    let ok = ["memory", "cpu", "pids"]
        .iter()
        .all(|c| v1_mount(c).is_some());
    if !ok {
        skipped("needs cgroup v1 memory, cpu and pids hierarchies");
    }
    ok
}

fn have_v2() -> bool {
    if !root_or_skip() {
        return false;
    }
    let ok = first_cgroup2().is_some();
    if !ok {
        skipped("needs a cgroup2 mount");
    }
    ok
}

/// A cgroup2 root with the memory, cpu and pids controllers available:
/// `/sys/fs/cgroup` if it is cgroup2, else the first cgroup2 mount.
fn v2_with_controllers() -> Option<PathBuf> {
    let expected = std::env::var_os("FORKD_TEST_EXPECT_CGROUP_V2").is_some();
    let all = mounts();
    let root = all
        .iter()
        .rev()
        .find(|(p, t, _)| p == Path::new("/sys/fs/cgroup") && t == "cgroup2")
        .map(|m| m.0.clone())
        .or_else(first_cgroup2);
    let usable = root.filter(|r| {
        let avail = fs::read_to_string(r.join("cgroup.controllers")).unwrap_or_default();
        ["memory", "cpu", "pids"]
            .iter()
            .all(|c| avail.split_whitespace().any(|w| w == *c))
    });
    if usable.is_none() {
        assert!(
            !expected,
            "FORKD_TEST_EXPECT_CGROUP_V2 is set but no cgroup2 root has memory, cpu and pids"
        );
        skipped("needs a cgroup2 root with the memory, cpu and pids controllers (a pure v2 host such as the guest of tests/vm/cgroup-v2-vm.sh)");
        return None;
    }
    if !root_or_skip() {
        return None;
    }
    usable
}

fn read_pids(procs: &Path) -> Vec<u32> {
    fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Gone, or a zombie waiting to be reaped.
fn dead(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        }
    }
}

/// Dead within 2 s. A killed task leaves `cgroup.procs` early in its exit
/// (v2: before it turns into a zombie), so an empty cgroup means "dying",
/// and the last steps of the exit can lag under emulation.
fn dies(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !dead(pid) {
        if Instant::now() > deadline {
            return false;
        }
        sleep(Duration::from_millis(5));
    }
    true
}

fn sigkill(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        if p > 0 {
            // SAFETY: plain syscall on a positive pid read from cgroup.procs.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

// ---------- guard ----------

/// Serializes the test and force-removes every registered cgroup directory
/// (killing anything inside) on drop, then the parent if empty.
struct Guard {
    dirs: Vec<PathBuf>,
    _lock: MutexGuard<'static, ()>,
}

impl Guard {
    fn new() -> Guard {
        Guard {
            _lock: LOCK.lock().unwrap_or_else(|e| e.into_inner()),
            dirs: Vec::new(),
        }
    }

    fn instance() -> String {
        format!(
            "test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        )
    }

    fn manager(
        &mut self,
        mode: ModeChoice,
        v2_root: Option<PathBuf>,
        allow_missing: bool,
    ) -> Result<Manager, Error> {
        self.manager_named(mode, v2_root, allow_missing, Self::instance())
    }

    fn manager_named(
        &mut self,
        mode: ModeChoice,
        v2_root: Option<PathBuf>,
        allow_missing: bool,
        instance: String,
    ) -> Result<Manager, Error> {
        let cfg = Config {
            mode,
            v2_root,
            parent: PARENT.into(),
            instance,
            allow_missing_controllers: allow_missing,
            io: None,
        };
        let m = Manager::new(&cfg)?;
        self.dirs
            .extend(m.base_dirs().iter().map(|p| p.to_path_buf()));
        Ok(m)
    }

    /// Shuts the manager down and asserts nothing is left under the parents.
    fn finish(mut self, mgr: Manager) {
        mgr.shutdown().expect("shutdown");
        for b in mgr.base_dirs() {
            assert!(!b.exists(), "{} left behind", b.display());
        }
        let parents = self.parents();
        for p in &parents {
            let left: Vec<_> = fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "left behind under {}: {left:?}",
                p.display()
            );
        }
        self.cleanup();
        for p in &parents {
            assert!(!p.exists(), "{} could not be removed", p.display());
        }
    }

    fn parents(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .dirs
            .iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect();
        v.dedup();
        v
    }

    fn cleanup(&mut self) {
        let parents = self.parents();
        for d in std::mem::take(&mut self.dirs) {
            force_remove(&d);
        }
        for p in parents {
            let _ = fs::remove_dir(p);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn force_remove(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                force_remove(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let pids = read_pids(&dir.join("cgroup.procs"));
        pids.iter().for_each(|p| sigkill(*p));
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        sleep(Duration::from_millis(10));
    }
    eprintln!("WARNING: could not remove {}", dir.display());
}

fn spawn_sleep() -> Child {
    Command::new("sleep").arg("30").spawn().unwrap()
}

/// `sh -c script` whose script starts with `read _` so it can be attached
/// before it does anything; `go` releases it.
fn spawn_held(program: &str, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn go(child: &mut Child) {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

fn wait_timeout(child: &mut Child, t: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "child {} did not exit in {t:?}",
            child.id()
        );
        sleep(Duration::from_millis(10));
    }
}

fn find_dir<'a>(sb: &'a SandboxCgroup, file: &str) -> &'a Path {
    sb.dirs()
        .iter()
        .find(|d| d.join(file).exists())
        .unwrap_or_else(|| panic!("no sandbox dir has {file}: {:?}", sb.dirs()))
}

// ---------- v1 ----------

#[test]
fn v1_limits_attach_stats_remove() {
    if !have_v1() {
        return;
    }
    let mut g = Guard::new();
    let mgr = g.manager(ModeChoice::V1, None, false).unwrap();
    assert_eq!(mgr.mode(), Mode::V1);
    assert!(mgr.limits_enforced());
    let limits = Limits {
        memory_bytes: Some(64 * MIB),
        cpus: Some(0.5),
        pids: Some(16),
    };
    let sb = mgr.create("sb1", &limits).unwrap();
    // One dir per distinct hierarchy: memory, cpu, pids, plus cpuacct when separate.
    let mut expect: Vec<PathBuf> = ["memory", "cpu", "cpuacct", "pids"]
        .iter()
        .filter_map(|c| v1_mount(c))
        .map(|m| {
            m.join(PARENT)
                .join(mgr.base_dirs()[0].file_name().unwrap())
                .join("sb1")
        })
        .collect();
    expect.dedup();
    let mut got = sb.dirs().to_vec();
    got.sort();
    expect.sort();
    assert_eq!(got, expect);
    assert_eq!(sb.procs_files().len(), expect.len());
    assert!(sb.v2_dir().is_none());

    let mem = find_dir(&sb, "memory.limit_in_bytes");
    assert_eq!(
        read(&mem.join("memory.limit_in_bytes")).trim(),
        (64 * MIB).to_string()
    );
    if mem.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(
            read(&mem.join("memory.memsw.limit_in_bytes")).trim(),
            (64 * MIB).to_string()
        );
    }
    let cpu = find_dir(&sb, "cpu.cfs_quota_us");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")).trim(), "50000");
    assert_eq!(read(&cpu.join("cpu.cfs_period_us")).trim(), "100000");
    let pids = find_dir(&sb, "pids.max");
    assert_eq!(read(&pids.join("pids.max")).trim(), "16");

    let mut child = spawn_sleep();
    let pid = child.id();
    sb.attach_pid(pid).unwrap();
    for f in sb.procs_files() {
        assert_eq!(read_pids(f), vec![pid], "{}", f.display());
    }
    let st = sb.stats().unwrap();
    assert!(st.populated);
    // The result's counters skip the populated walk, and only that.
    let counters = sb.counters().unwrap();
    assert!(!counters.populated);
    assert_eq!(
        (
            counters.oom_kills,
            counters.pids_limit_hits,
            counters.memory_limit_hits
        ),
        (st.oom_kills, st.pids_limit_hits, st.memory_limit_hits)
    );
    assert_eq!(
        (st.oom_kills, st.pids_limit_hits, st.memory_limit_hits),
        (0, 0, 0)
    );
    // v1 does not move a migrated process's charges, so an idle `sleep` may
    // have charged nothing yet: the counter must be readable, not non-zero.
    assert!(st.memory_peak_bytes.is_some());
    assert!(st.cpu_user_us.is_some() == v1_mount("cpuacct").is_some());

    // The daemon itself never joins.
    assert!(matches!(
        sb.attach_pid(std::process::id()),
        Err(Error::InvalidPid(_))
    ));
    assert!(matches!(sb.attach_pid(0), Err(Error::InvalidPid(0))));

    let dirs = sb.dirs().to_vec();
    sb.remove().unwrap();
    for d in &dirs {
        assert!(!d.exists(), "{} still exists", d.display());
    }
    assert!(dies(pid));
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(2)).signal(),
        Some(libc::SIGKILL)
    );
    g.finish(mgr);
}

#[test]
fn v1_set_limits_raises_and_lowers_in_a_valid_order() {
    if !have_v1() {
        return;
    }
    let mut g = Guard::new();
    let mgr = g.manager(ModeChoice::V1, None, false).unwrap();
    let sb = mgr
        .create(
            "sbl",
            &Limits {
                memory_bytes: Some(64 * MIB),
                cpus: Some(0.5),
                pids: Some(16),
            },
        )
        .unwrap();
    let mem = find_dir(&sb, "memory.limit_in_bytes").to_path_buf();
    let memsw = mem.join("memory.memsw.limit_in_bytes");
    for target in [256 * MIB, 32 * MIB, 128 * MIB] {
        sb.set_limits(&Limits {
            memory_bytes: Some(target),
            cpus: Some(1.5),
            pids: Some(40),
        })
        .unwrap();
        assert_eq!(
            read(&mem.join("memory.limit_in_bytes")).trim(),
            target.to_string()
        );
        if memsw.exists() {
            assert_eq!(read(&memsw).trim(), target.to_string());
        }
    }
    assert_eq!(
        read(&find_dir(&sb, "cpu.cfs_quota_us").join("cpu.cfs_quota_us")).trim(),
        "150000"
    );
    assert_eq!(
        read(&find_dir(&sb, "pids.max").join("pids.max")).trim(),
        "40"
    );
    // Unset limits stay as they are.
    sb.set_limits(&Limits::default()).unwrap();
    assert_eq!(
        read(&find_dir(&sb, "pids.max").join("pids.max")).trim(),
        "40"
    );
    sb.remove().unwrap();
    g.finish(mgr);
}

both_modes!(
    cpu_quota_case,
    v1_cpu_quota_is_enforced_and_accounted,
    v2_cpu_quota_is_enforced_and_accounted
);

fn cpu_quota_case(mode: ModeChoice, v2_root: Option<PathBuf>) {
    let mut g = Guard::new();
    let mgr = g.manager(mode, v2_root, false).unwrap();
    let sb = mgr
        .create(
            "cpu",
            &Limits {
                cpus: Some(0.2),
                ..Default::default()
            },
        )
        .unwrap();
    let mut child = spawn_held(
        "python3",
        &[
            "-c",
            "import sys,time\nsys.stdin.readline()\nt=time.time()+1.0\nwhile time.time()<t: pass",
        ],
    );
    sb.attach_pid(child.id()).unwrap();
    // Charged from here on: the interpreter's start-up too (slow under
    // emulation), so the bound below is relative to this wall time.
    let attached = Instant::now();
    go(&mut child);
    assert!(wait_timeout(&mut child, Duration::from_secs(30)).success());
    let wall_us = attached.elapsed().as_micros() as u64;
    let st = sb.stats().unwrap();
    assert!(!st.populated);
    // v1 accounts CPU time only where cpuacct is mounted; v2 always does.
    if mgr.mode() == Mode::V2 || v1_mount("cpuacct").is_some() {
        let total = st.cpu_user_us.unwrap() + st.cpu_system_us.unwrap();
        // At 0.2 CPU the spinning child gets at most a fifth of the wall
        // time (plus one period's quota of slack at the edges), where it
        // would otherwise take all of it.
        let bound = wall_us / 5 + 100_000;
        assert!(
            (5_000..bound).contains(&total),
            "cpu usage {total} µs in {wall_us} µs of wall time at 0.2 cpus (bound {bound})"
        );
    }
    let cpu = find_dir(&sb, "cpu.stat");
    let throttled = read(&cpu.join("cpu.stat"))
        .lines()
        .find_map(|l| {
            l.strip_prefix("nr_throttled ")
                .map(|v| v.trim().parse::<u64>().unwrap())
        })
        .unwrap();
    assert!(throttled > 0, "quota never throttled");
    sb.remove().unwrap();
    g.finish(mgr);
}

both_modes!(oom_case, v1_oom_kill_is_counted, v2_oom_kill_is_counted);

fn oom_case(mode: ModeChoice, v2_root: Option<PathBuf>) {
    let mut g = Guard::new();
    let mgr = g.manager(mode, v2_root, false).unwrap();
    let sb = mgr
        .create(
            "oom",
            &Limits {
                memory_bytes: Some(32 * MIB),
                ..Default::default()
            },
        )
        .unwrap();
    let mut child = spawn_held(
        "python3",
        &[
            "-c",
            "import sys\nsys.stdin.readline()\nb = b'x' * (200 * 1024 * 1024)\n",
        ],
    );
    sb.attach_pid(child.id()).unwrap();
    assert_eq!(sb.stats().unwrap().oom_kills, 0);
    go(&mut child);
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let st = sb.stats().unwrap();
    assert!(st.oom_kills >= 1, "{st:?}");
    if mgr.mode() == Mode::V1 {
        // v1 failcnt semantics: the sum of both counters. (On this 6.18
        // kernel memsw.failcnt is never incremented, and with memsw == limit
        // the memsw counter is the one that refuses, so the sum is 0 here.)
        let mem = find_dir(&sb, "memory.failcnt");
        let failcnt: u64 = ["memory.failcnt", "memory.memsw.failcnt"]
            .iter()
            .filter_map(|f| fs::read_to_string(mem.join(f)).ok())
            .map(|t| t.trim().parse::<u64>().unwrap())
            .sum();
        assert_eq!(st.memory_limit_hits, failcnt, "{st:?}");
        if !mem.join("memory.memsw.limit_in_bytes").exists() {
            assert!(st.memory_limit_hits >= 1, "{st:?}");
        }
    } else {
        // memory.events: `max` counts every charge that hit memory.max, and
        // the kill is also in `oom_kill` as read from the file itself.
        let events = read(&sb.v2_dir().unwrap().join("memory.events"));
        let field = |k: &str| -> u64 {
            events
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap()
        };
        assert_eq!(st.oom_kills, field("oom_kill"), "{events}");
        assert_eq!(st.memory_limit_hits, field("max"), "{events}");
        assert!(st.memory_limit_hits >= 1, "{st:?}");
    }
    let peak = st.memory_peak_bytes.unwrap();
    assert!((24 * MIB..=32 * MIB).contains(&peak), "peak {peak}");
    assert!(!st.populated);
    sb.remove().unwrap();
    g.finish(mgr);
}

both_modes!(
    pids_case,
    v1_pids_limit_hits_are_counted,
    v2_pids_limit_hits_are_counted
);

fn pids_case(mode: ModeChoice, v2_root: Option<PathBuf>) {
    let mut g = Guard::new();
    let mgr = g.manager(mode, v2_root, false).unwrap();
    let sb = mgr
        .create(
            "pids",
            &Limits {
                pids: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
    let script = "read _; for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do sleep 30 & done; wait";
    let mut child = spawn_held("sh", &["-c", script]);
    sb.attach_pid(child.id()).unwrap();
    go(&mut child);
    let pids_dir = find_dir(&sb, "pids.max").to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sb.stats().unwrap().pids_limit_hits == 0 {
        assert!(Instant::now() < deadline, "no pids.events max");
        sleep(Duration::from_millis(20));
    }
    let current: u64 = read(&pids_dir.join("pids.current")).trim().parse().unwrap();
    assert!(current <= 5, "pids.current {current}");
    let members: Vec<u32> = sb.procs_files().iter().flat_map(|f| read_pids(f)).collect();
    assert!(!members.is_empty());
    sb.remove().unwrap();
    assert!(!pids_dir.exists());
    for p in members {
        assert!(dies(p), "pid {p} survived");
    }
    let _ = wait_timeout(&mut child, Duration::from_secs(2));
    g.finish(mgr);
}

both_modes!(
    kill_tree_case,
    v1_kill_all_reaches_grandchildren_and_drop_removes,
    v2_kill_all_reaches_grandchildren_and_drop_removes
);

fn kill_tree_case(mode: ModeChoice, v2_root: Option<PathBuf>) {
    let mut g = Guard::new();
    let mgr = g.manager(mode, v2_root, false).unwrap();
    let sb = mgr.create("tree", &Limits::default()).unwrap();
    let mut child = spawn_held(
        "sh",
        &[
            "-c",
            "read _; sleep 30 & sleep 30 & sh -c 'sleep 30 & wait' & wait",
        ],
    );
    sb.attach_pid(child.id()).unwrap();
    go(&mut child);
    let deadline = Instant::now() + Duration::from_secs(5);
    let members = loop {
        let m = read_pids(&sb.procs_files()[0]);
        if m.len() >= 5 {
            break m;
        }
        assert!(Instant::now() < deadline, "only {m:?}");
        sleep(Duration::from_millis(10));
    };
    sb.kill_all().unwrap();
    assert!(members.iter().all(|p| dies(*p)));
    assert!(!sb.stats().unwrap().populated);
    // Name collision is refused and does not touch the existing cgroup.
    assert!(matches!(
        mgr.create("tree", &Limits::default()),
        Err(Error::Exists { .. })
    ));
    assert!(sb.dirs().iter().all(|d| d.exists()));
    let dirs = sb.dirs().to_vec();
    drop(sb); // Drop removes
    assert!(dirs.iter().all(|d| !d.exists()));
    let _ = wait_timeout(&mut child, Duration::from_secs(2));
    g.finish(mgr);
}

// ---------- v2 ----------

#[test]
fn v2_missing_controller_is_a_clear_error() {
    if !have_v2() {
        return;
    }
    let root = first_cgroup2().unwrap();
    let avail = read(&root.join("cgroup.controllers"));
    let mut g = Guard::new();
    let res = g.manager(ModeChoice::V2, Some(root.clone()), false);
    let missing = ["memory", "cpu", "pids"]
        .into_iter()
        .find(|c| !avail.split_whitespace().any(|w| w == *c));
    match missing {
        Some(c) => {
            let msg = res.unwrap_err().to_string();
            eprintln!("expected error: {msg}");
            assert!(msg.contains(&format!("controller `{c}`")), "{msg}");
            assert!(
                msg.contains(&root.join("cgroup.controllers").display().to_string()),
                "{msg}"
            );
            assert!(msg.contains("subtree_control"), "{msg}");
            // Nothing was created.
            assert!(
                !root.join(PARENT).exists()
                    || fs::read_dir(root.join(PARENT)).unwrap().next().is_none()
            );
            let _ = fs::remove_dir(root.join(PARENT));
        }
        None => {
            let mgr = res.unwrap();
            assert!(mgr.limits_enforced());
            g.finish(mgr);
        }
    }
}

#[test]
fn v2_attach_kill_remove_without_controllers() {
    if !have_v2() {
        return;
    }
    let root = first_cgroup2().unwrap();
    let mut g = Guard::new();
    let mgr = g.manager(ModeChoice::V2, Some(root.clone()), true).unwrap();
    assert_eq!(mgr.mode(), Mode::V2);
    let avail = read(&root.join("cgroup.controllers"));
    if !avail.split_whitespace().any(|w| w == "memory") {
        assert!(!mgr.limits_enforced());
        let e = mgr
            .create(
                "m",
                &Limits {
                    memory_bytes: Some(64 * MIB),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::LimitUnsupported {
                    limit: "memory",
                    ..
                }
            ),
            "{e}"
        );
        assert!(!mgr.base_dirs()[0].join("m").exists());
    }
    let sb = mgr.create("sb", &Limits::default()).unwrap();
    let dir = sb.v2_dir().unwrap().to_path_buf();
    assert_eq!(dir, mgr.base_dirs()[0].join("sb"));
    assert_eq!(sb.procs_files(), &[dir.join("cgroup.procs")]);

    let mut a = spawn_held("sh", &["-c", "read _; sleep 30 & sleep 30 & wait"]);
    sb.attach_pid(a.id()).unwrap();
    go(&mut a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while read_pids(&dir.join("cgroup.procs")).len() < 3 {
        assert!(Instant::now() < deadline);
        sleep(Duration::from_millis(10));
    }
    let members = read_pids(&dir.join("cgroup.procs"));
    let st = sb.stats().unwrap();
    assert!(st.populated);
    assert!(st.cpu_user_us.is_some() && st.cpu_system_us.is_some());
    assert_eq!(st.oom_kills, 0);

    sb.kill_all().unwrap(); // cgroup.kill where available
    assert_eq!(
        wait_timeout(&mut a, Duration::from_secs(2)).signal(),
        Some(libc::SIGKILL)
    );
    assert!(members.iter().all(|p| dies(*p)));
    assert!(!sb.stats().unwrap().populated);

    // remove() kills a freshly attached process too.
    let mut b = spawn_sleep();
    sb.attach_pid(b.id()).unwrap();
    sb.remove().unwrap();
    assert!(!dir.exists());
    assert_eq!(
        wait_timeout(&mut b, Duration::from_secs(2)).signal(),
        Some(libc::SIGKILL)
    );
    g.finish(mgr);
}

#[test]
fn v2_root_must_be_cgroup2() {
    if !have_v2() {
        return;
    }
    let mut g = Guard::new();
    let e = g
        .manager(ModeChoice::V2, Some("/tmp".into()), true)
        .unwrap_err();
    assert!(matches!(e, Error::NotCgroup2 { .. }), "{e}");
    assert!(e.to_string().contains("/tmp"), "{e}");
}

#[test]
fn v2_limits_attach_stats_remove() {
    let Some(root) = v2_with_controllers() else {
        return;
    };
    let mut g = Guard::new();
    let mgr = g.manager(ModeChoice::V2, Some(root), false).unwrap();
    assert_eq!(mgr.mode(), Mode::V2);
    assert!(mgr.limits_enforced());
    // The controllers are enabled from the root down to the instance.
    for dir in [mgr.base_dirs()[0].parent().unwrap(), mgr.base_dirs()[0]] {
        let enabled = read(&dir.join("cgroup.subtree_control"));
        for c in ["memory", "cpu", "pids"] {
            assert!(
                enabled.split_whitespace().any(|w| w == c),
                "{c} not in {}: {enabled}",
                dir.display()
            );
        }
    }
    let sb = mgr
        .create(
            "sb1",
            &Limits {
                memory_bytes: Some(64 * MIB),
                cpus: Some(0.5),
                pids: Some(16),
            },
        )
        .unwrap();
    let dir = sb.v2_dir().unwrap().to_path_buf();
    assert_eq!(sb.dirs(), std::slice::from_ref(&dir));
    assert_eq!(read(&dir.join("memory.max")).trim(), (64 * MIB).to_string());
    if dir.join("memory.swap.max").exists() {
        assert_eq!(read(&dir.join("memory.swap.max")).trim(), "0");
    }
    assert_eq!(read(&dir.join("cpu.max")).trim(), "50000 100000");
    assert_eq!(read(&dir.join("pids.max")).trim(), "16");

    let mut child = spawn_sleep();
    let pid = child.id();
    sb.attach_pid(pid).unwrap();
    assert_eq!(read_pids(&dir.join("cgroup.procs")), vec![pid]);
    let st = sb.stats().unwrap();
    assert!(st.populated);
    // The result's counters skip the populated walk, and only that.
    let counters = sb.counters().unwrap();
    assert!(!counters.populated);
    assert_eq!(
        (
            counters.oom_kills,
            counters.pids_limit_hits,
            counters.memory_limit_hits
        ),
        (st.oom_kills, st.pids_limit_hits, st.memory_limit_hits)
    );
    assert_eq!(
        (st.oom_kills, st.pids_limit_hits, st.memory_limit_hits),
        (0, 0, 0)
    );
    assert!(
        st.memory_peak_bytes.is_some(),
        "memory.peak (Linux >= 5.19)"
    );
    assert!(st.cpu_user_us.is_some() && st.cpu_system_us.is_some());
    assert!(matches!(
        sb.attach_pid(std::process::id()),
        Err(Error::InvalidPid(_))
    ));

    sb.remove().unwrap();
    assert!(!dir.exists());
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(2)).signal(),
        Some(libc::SIGKILL)
    );
    g.finish(mgr);
}

#[test]
fn v2_set_limits_changes_a_live_cgroup() {
    let Some(root) = v2_with_controllers() else {
        return;
    };
    let mut g = Guard::new();
    let mgr = g.manager(ModeChoice::V2, Some(root), false).unwrap();
    let sb = mgr
        .create(
            "sbl",
            &Limits {
                memory_bytes: Some(64 * MIB),
                cpus: Some(0.5),
                pids: Some(16),
            },
        )
        .unwrap();
    let dir = sb.v2_dir().unwrap().to_path_buf();
    for target in [256 * MIB, 32 * MIB, 128 * MIB] {
        sb.set_limits(&Limits {
            memory_bytes: Some(target),
            cpus: Some(1.5),
            pids: Some(40),
        })
        .unwrap();
        assert_eq!(read(&dir.join("memory.max")).trim(), target.to_string());
    }
    assert_eq!(read(&dir.join("cpu.max")).trim(), "150000 100000");
    assert_eq!(read(&dir.join("pids.max")).trim(), "40");
    sb.set_limits(&Limits::default()).unwrap();
    assert_eq!(read(&dir.join("pids.max")).trim(), "40");
    sb.remove().unwrap();
    g.finish(mgr);
}

// ---------- stale cleanup, auto, disabled ----------

#[test]
fn cleanup_stale_kills_and_removes_dead_instances() {
    if !root_or_skip() {
        return;
    }
    if first_cgroup2().is_none() && v1_mount("memory").is_none() {
        skipped("needs a cgroup2 mount or a cgroup v1 memory hierarchy");
        return;
    }
    let mut g = Guard::new();
    let mut t = Command::new("true").spawn().unwrap();
    let dead_pid = t.id();
    t.wait().unwrap();
    assert!(dead(dead_pid));

    let stale = g
        .manager_named(ModeChoice::Auto, None, true, format!("d{dead_pid}"))
        .unwrap();
    let stale_bases: Vec<PathBuf> = stale.base_dirs().iter().map(|p| p.to_path_buf()).collect();
    let sb = stale.create("busy", &Limits::default()).unwrap();
    let mut child = spawn_sleep();
    sb.attach_pid(child.id()).unwrap();
    let idle = stale.create("idle", &Limits::default()).unwrap();
    std::mem::forget(sb);
    std::mem::forget(idle);
    drop(stale); // no shutdown: simulates a crashed daemon

    let mgr = g.manager(ModeChoice::Auto, None, true).unwrap();
    let n = mgr.cleanup_stale().unwrap();
    assert!(n >= 2, "removed {n}");
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(2)).signal(),
        Some(libc::SIGKILL)
    );
    for b in &stale_bases {
        assert!(!b.exists(), "{} still exists", b.display());
    }
    // Our own instance is never touched, and a second pass finds nothing.
    assert!(mgr.base_dirs().iter().all(|b| b.exists()));
    assert_eq!(mgr.cleanup_stale().unwrap(), 0);
    g.finish(mgr);
}

#[test]
fn auto_mode_matches_the_host() {
    if !root_or_skip() {
        return;
    }
    let top_is_v2 = mounts()
        .iter()
        .rev()
        .find(|(p, _, _)| p == Path::new("/sys/fs/cgroup"))
        .is_some_and(|(_, t, _)| t == "cgroup2");
    let mut g = Guard::new();
    let mgr = g.manager(ModeChoice::Auto, None, false).unwrap();
    if top_is_v2 {
        assert_eq!(mgr.mode(), Mode::V2);
    } else if ["memory", "cpu", "pids"]
        .iter()
        .all(|c| v1_mount(c).is_some())
    {
        assert_eq!(mgr.mode(), Mode::V1); // this dev VM
        assert!(mgr.limits_enforced());
    }
    g.finish(mgr);
}

#[test]
fn disabled_mode_creates_nothing() {
    let mgr = Manager::new(&Config {
        mode: ModeChoice::Disabled,
        parent: PARENT.into(),
        instance: Guard::instance(),
        ..Config::default()
    })
    .unwrap();
    assert_eq!(mgr.mode(), Mode::Disabled);
    assert!(!mgr.limits_enforced());
    assert!(mgr.base_dirs().is_empty());
    let limits = Limits {
        memory_bytes: Some(64 * MIB),
        cpus: Some(1.0),
        pids: Some(10),
    };
    let sb = mgr.create("x", &limits).unwrap();
    assert!(sb.procs_files().is_empty() && sb.v2_dir().is_none());
    assert_eq!(sb.stats().unwrap(), Default::default());
    sb.attach_pid(12345).unwrap();
    sb.kill_all().unwrap();
    sb.remove().unwrap();
    assert!(matches!(
        mgr.create("../x", &limits),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        mgr.create(
            "x",
            &Limits {
                cpus: Some(f64::NAN),
                ..limits
            }
        ),
        Err(Error::InvalidLimit(_))
    ));
    assert_eq!(mgr.cleanup_stale().unwrap(), 0);
    mgr.shutdown().unwrap();
}

both_modes!(
    reused_instance_case,
    v1_reused_instance_dir_is_purged_on_new,
    v2_reused_instance_dir_is_purged_on_new
);

fn reused_instance_case(mode: ModeChoice, v2_root: Option<PathBuf>) {
    let mut g = Guard::new();
    let instance = Guard::instance();
    let first = g
        .manager_named(mode, v2_root.clone(), false, instance.clone())
        .unwrap();
    let sb = first.create("left", &Limits::default()).unwrap();
    let mut child = spawn_sleep();
    sb.attach_pid(child.id()).unwrap();
    let dirs = sb.dirs().to_vec();
    std::mem::forget(sb);
    drop(first); // crashed daemon; a new one gets the same pid / instance name
    let mgr = g.manager_named(mode, v2_root, false, instance).unwrap();
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(2)).signal(),
        Some(libc::SIGKILL)
    );
    assert!(dirs.iter().all(|d| !d.exists()));
    assert!(mgr.base_dirs().iter().all(|b| b.exists()));
    g.finish(mgr);
}
