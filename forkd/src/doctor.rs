//! `forkd doctor`: checks that this machine and a configuration can run
//! forkd, one `PASS`/`WARN`/`FAIL` line per check with the fix for each
//! problem.
//!
//! Kernel features are tried for real, not inferred from version numbers:
//! each namespace, `no_new_privs` and the seccomp filter is exercised by a
//! short-lived probe process (`forkd __probe <what>`, this same binary
//! re-executed), so nothing the probe changes (namespaces, a filter) touches
//! the doctor itself; as root the user-namespace probe also runs as `nobody`
//! to see what a rootless daemon would get. Cgroups are checked by creating
//! one the way the daemon would; each zygote's interpreter and preload
//! imports in a child interpreter with the zygote's environment; and finally
//! a private daemon with this configuration runs one sandbox end to end.
//! The doctor itself forks nothing but through `std::process::Command`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            verdict: Verdict::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.verdict {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{tag}  {:<22} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

/// Runs every check, printing each line as it completes. Returns the checks.
pub fn run(config: &Config, mut print: impl FnMut(&Check)) -> Vec<Check> {
    let mut all = Vec::new();
    let mut add = |c: Check, all: &mut Vec<Check>| {
        print(&c);
        all.push(c);
    };
    add(kernel(), &mut all);
    for ns in NAMESPACES {
        add(namespace(ns), &mut all);
    }
    add(unprivileged_userns(), &mut all);
    add(no_new_privs(), &mut all);
    add(seccomp(), &mut all);
    add(landlock(), &mut all);
    add(cgroups(config), &mut all);
    add(sandbox_ids(config, crate::sys::euid()), &mut all);
    add(rcu_expedited(), &mut all);
    add(library(config), &mut all);
    match config.validate().and_then(|_| config.load_policies()) {
        Ok(_) => add(
            Check::pass("configuration", "valid (limits, policies, listeners)"),
            &mut all,
        ),
        Err(e) => add(
            Check::fail(
                "configuration",
                e.to_string(),
                "correct the configuration file (forkd --check-config --config FILE repeats this check)",
            ),
            &mut all,
        ),
    }
    for z in config.zygote_sections() {
        for c in zygote_checks(&z) {
            add(c, &mut all);
        }
    }
    if all.iter().any(|c| c.verdict == Verdict::Fail) {
        add(
            Check::warn(
                "sandbox",
                "not tried: an earlier check failed",
                "fix the failures above and run forkd doctor again",
            ),
            &mut all,
        );
    } else {
        add(end_to_end(config), &mut all);
    }
    all
}

/// Whether each sandbox gets its own uid: a root daemon leases them; a
/// rootless one too when it has a subordinate range and `newuidmap` (else
/// its sandboxes share its uid).
fn sandbox_ids(config: &Config, euid: u32) -> Check {
    if euid == 0 {
        return Check::pass(
            "sandbox ids",
            "each sandbox runs as its own uid (sandbox_uid_base, sandbox_uid_count)",
        );
    }
    match crate::subids::why_not(config, euid) {
        Ok(sub) => Check::pass("sandbox ids", rootless_subids_line(&sub)),
        Err(missing) => Check::warn("sandbox ids", rootless_shared_uid(euid), missing.0),
    }
}

/// What a rootless daemon with a subordinate range logs at start.
pub fn rootless_subids_line(sub: &crate::subids::SubIds) -> String {
    format!(
        "rootless: each sandbox runs as its own uid of the subordinate range {}..{} (gids {}..{}), mapped by {} and {} once per zygote",
        sub.uid_start,
        u64::from(sub.uid_start) + u64::from(sub.count),
        sub.gid_start,
        u64::from(sub.gid_start) + u64::from(sub.count),
        sub.newuidmap.display(),
        sub.newgidmap.display()
    )
}

fn rootless_shared_uid(euid: u32) -> String {
    format!("rootless: every sandbox runs as uid {euid} and shares its per-user kernel budgets (pipe buffers, pending signals, inotify, processes)")
}

/// The one line a rootless daemon without per-sandbox ids logs at start
/// (`forkd doctor` says the same in its `sandbox ids` check).
pub fn rootless_shared_uid_warning(euid: u32, missing: &crate::subids::Missing) -> String {
    format!(
        "{}; for a uid of its own per sandbox: {}",
        rootless_shared_uid(euid),
        missing.0
    )
}

/// Exit status for a report: 0 without failures (warnings allowed), else 1.
pub fn exit_code(checks: &[Check]) -> u8 {
    u8::from(checks.iter().any(|c| c.verdict == Verdict::Fail))
}

// ---------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------

/// (major, minor) of a kernel release string such as `6.18.0-1-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    match kernel_version(&release) {
        // The zygote watches its children through pidfds (pidfd_open, 5.3).
        Some(v) if v < (5, 3) => Check::fail(
            "kernel",
            format!("Linux {release}: forkd needs pidfd_open (5.3)"),
            "run on Linux 5.3 or later (5.13+ for landlock, 6.12+ for landlock's socket and signal scoping)",
        ),
        Some(v) if v < (5, 13) => Check::warn(
            "kernel",
            format!("Linux {release}: no landlock before 5.13"),
            "run on Linux 5.13 or later so sandboxes get landlock filesystem rules",
        ),
        Some(_) => Check::pass("kernel", format!("Linux {release}")),
        None => Check::warn(
            "kernel",
            format!("cannot parse the kernel release {release:?}"),
            "check that /proc is mounted",
        ),
    }
}

// ---------------------------------------------------------------------------
// Probes (run in a child process: `forkd __probe <what>`)
// ---------------------------------------------------------------------------

const NAMESPACES: [&str; 7] = ["user", "pid", "mount", "net", "ipc", "uts", "cgroup"];

fn ns_flag(name: &str) -> Option<libc::c_int> {
    Some(match name {
        "user" => libc::CLONE_NEWUSER,
        "pid" => libc::CLONE_NEWPID,
        "mount" => libc::CLONE_NEWNS,
        "net" => libc::CLONE_NEWNET,
        "ipc" => libc::CLONE_NEWIPC,
        "uts" => libc::CLONE_NEWUTS,
        "cgroup" => libc::CLONE_NEWCGROUP,
        _ => return None,
    })
}

/// A rootless daemon's zygote first makes a user namespace; everything else
/// is created inside it. As root, namespaces are created directly.
fn enter_userns_if_unprivileged() -> Result<(), String> {
    if crate::sys::euid() != 0 {
        forkd_zygote::sys::unshare(libc::CLONE_NEWUSER)
            .map_err(|e| format!("unshare(CLONE_NEWUSER): {e}"))?;
    }
    Ok(())
}

/// The probe side: does one thing and says how it went (exit 0 on success,
/// the detail on stdout). Runs in its own short-lived, single-threaded process.
pub fn probe(what: &str) -> Result<String, String> {
    if let Some(ns) = what.strip_prefix("ns-") {
        let flag = ns_flag(ns).ok_or_else(|| format!("unknown namespace {ns}"))?;
        if ns != "user" {
            enter_userns_if_unprivileged()?;
        }
        forkd_zygote::sys::unshare(flag).map_err(|e| format!("unshare: {e}"))?;
        // Use what the sandbox uses, not just the empty namespace.
        return match ns {
            "net" => forkd_zygote::sys::loopback_up()
                .map(|_| "created; loopback brought up inside".into())
                .map_err(|e| format!("created, but bringing lo up failed: {e}")),
            "uts" => forkd_zygote::sys::sethostname(b"sandbox")
                .map(|_| "created; hostname set inside".into())
                .map_err(|e| format!("created, but sethostname failed: {e}")),
            _ => Ok("created".into()),
        };
    }
    match what {
        "no-new-privs" => {
            forkd_zygote::sys::set_no_new_privs().map_err(|e| format!("prctl: {e}"))?;
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            if status.lines().any(|l| l == "NoNewPrivs:\t1") {
                Ok("set and confirmed in /proc/self/status".into())
            } else {
                Err("prctl succeeded but /proc/self/status does not show NoNewPrivs: 1".into())
            }
        }
        "seccomp" => {
            let policy = forkd_zygote::Policy::default_policy();
            let program = policy
                .compile_seccomp()
                .map_err(|e| format!("compiling the default policy: {e}"))?;
            forkd_zygote::sys::set_no_new_privs().map_err(|e| format!("prctl: {e}"))?;
            crate::sys::query_personality()
                .map_err(|e| format!("personality() fails even without a filter: {e}"))?;
            forkd_zygote::sys::apply_seccomp(&program)
                .map_err(|e| format!("installing the filter: {e}"))?;
            match crate::sys::query_personality() {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(format!(
                    "default policy installed ({} BPF instructions); a denied call failed with EPERM",
                    program.len()
                )),
                Err(e) => Err(format!("a denied call failed with {e}, expected EPERM")),
                Ok(_) => Err("the filter was installed but a denied call succeeded".into()),
            }
        }
        other => Err(format!("unknown probe {other}")),
    }
}

/// Runs `forkd __probe what` (as `uid` if given); (success, detail).
fn run_probe(what: &str, uid: Option<u32>) -> (bool, String) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return (false, format!("cannot find this executable: {e}")),
    };
    let mut cmd = Command::new(exe);
    cmd.args(["__probe", what]).stdin(Stdio::null()).env_clear();
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid).current_dir("/");
    }
    match output_within(cmd, Duration::from_secs(10)) {
        Ok((status, out, err)) => {
            let text = if out.trim().is_empty() { err } else { out };
            (status == Some(0), text.trim().to_string())
        }
        Err(e) => (false, format!("could not run the probe: {e}")),
    }
}

fn namespace(ns: &str) -> Check {
    let name = format!("namespace {ns}");
    let (ok, detail) = run_probe(&format!("ns-{ns}"), None);
    if ok {
        return Check::pass(name, detail);
    }
    let fix = if crate::sys::euid() == 0 {
        format!("enable CONFIG_{}_NS in the kernel; inside a container, run forkd with the privileges to create namespaces (e.g. docker --privileged or a seccomp/AppArmor profile that allows unshare)", ns.to_uppercase())
    } else {
        "a rootless daemon needs unprivileged user namespaces: see the `userns (rootless)` line, or run forkd as root".into()
    };
    Check::fail(name, detail, fix)
}

fn read_sysctl(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether unprivileged users can create user namespaces (rootless mode).
fn unprivileged_userns() -> Check {
    let name = "userns (rootless)";
    let max = read_sysctl("/proc/sys/user/max_user_namespaces");
    let apparmor = read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let debian = read_sysctl("/proc/sys/kernel/unprivileged_userns_clone");
    let mut blockers = Vec::new();
    if max == Some(0) {
        blockers
            .push("user.max_user_namespaces = 0 (fix: sysctl -w user.max_user_namespaces=10000)");
    }
    if apparmor == Some(1) {
        blockers.push("kernel.apparmor_restrict_unprivileged_userns = 1 (fix: an AppArmor profile for forkd with `userns,`, or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0)");
    }
    if debian == Some(0) {
        blockers.push(
            "kernel.unprivileged_userns_clone = 0 (fix: sysctl -w kernel.unprivileged_userns_clone=1)",
        );
    }
    let root = crate::sys::euid() == 0;
    // As root, try it for real as `nobody`; otherwise the namespace probes
    // above already ran unprivileged.
    let tried = if root {
        Some(run_probe("ns-user", Some(65534)))
    } else {
        None
    };
    let detail_sysctls = format!(
        "max_user_namespaces {}",
        max.map_or("?".into(), |m| m.to_string())
    );
    match (tried, blockers.is_empty()) {
        (Some((true, _)), _) => Check::pass(
            name,
            format!("an unprivileged user (nobody) can create one; {detail_sysctls}"),
        ),
        (Some((false, why)), _) if why.starts_with("could not run") => {
            if blockers.is_empty() {
                Check::pass(name, format!("no restriction in sysctls ({detail_sysctls}); not tried: {why}"))
            } else {
                Check::warn(name, blockers.join("; "), "only needed to run forkd as a non-root user")
            }
        }
        (Some((false, why)), _) => Check::warn(
            name,
            format!("an unprivileged user cannot create a user namespace: {why}; {}", blockers.join("; ")),
            "only needed to run forkd as a non-root user; lift the restriction named above",
        ),
        (None, true) => Check::pass(name, detail_sysctls),
        (None, false) => Check::fail(
            name,
            blockers.join("; "),
            "this daemon is not root, so it needs unprivileged user namespaces: apply the fix named above",
        ),
    }
}

fn no_new_privs() -> Check {
    let (ok, detail) = run_probe("no-new-privs", None);
    if ok {
        Check::pass("no_new_privs", detail)
    } else {
        Check::fail(
            "no_new_privs",
            detail,
            "run on Linux 3.5 or later without a security module that forbids PR_SET_NO_NEW_PRIVS",
        )
    }
}

fn seccomp() -> Check {
    let actions =
        std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    let (ok, detail) = run_probe("seccomp", None);
    if ok {
        return Check::pass("seccomp", detail);
    }
    let fix = if actions.is_empty() {
        "the kernel lacks seccomp filters: enable CONFIG_SECCOMP_FILTER"
    } else {
        "inside a container, a seccomp profile may forbid installing filters: allow seccomp(2)/prctl(PR_SET_SECCOMP)"
    };
    Check::fail("seccomp", detail, fix)
}

fn landlock() -> Check {
    match forkd_zygote::sys::landlock_abi() {
        0 => Check::warn(
            "landlock",
            "not available: sandboxes rely on the mount namespace alone for filesystem confinement",
            "use Linux 5.13+ with CONFIG_SECURITY_LANDLOCK=y and `landlock` in the lsm= boot parameter",
        ),
        abi if abi < 6 => Check::warn(
            "landlock",
            format!("ABI {abi}: filesystem rules apply; abstract-socket and signal scoping need ABI 6"),
            "use Linux 6.12+ for landlock ABI 6 (scoping)",
        ),
        abi => Check::pass("landlock", format!("ABI {abi}")),
    }
}

// ---------------------------------------------------------------------------
// Cgroups
// ---------------------------------------------------------------------------

/// Cgroup filesystems mounted here: (v1 controllers, cgroup2 mount points).
fn cgroup_mounts() -> (Vec<String>, Vec<String>) {
    const V1_CONTROLLERS: [&str; 8] = [
        "memory", "cpu", "cpuacct", "pids", "cpuset", "blkio", "devices", "freezer",
    ];
    let (mut v1, mut v2) = (Vec::new(), Vec::new());
    for m in forkd_cgroup::hierarchy_mounts().unwrap_or_default() {
        if m.v2 {
            v2.push(m.mount_point.display().to_string());
        } else {
            v1.extend(
                m.options
                    .into_iter()
                    .filter(|o| V1_CONTROLLERS.contains(&o.as_str())),
            );
        }
    }
    (v1, v2)
}

/// Moving a process between cgroups waits for an RCU grace period (the
/// cgroup threadgroup lock): 5–15 ms on an idle host unless a cgroup
/// hierarchy is mounted with `favordynmods` (the lock stays on its slow,
/// grace-period-free path; measured 14 ms → 0.47 ms for a move into four v1
/// hierarchies) or grace periods are expedited. forkd moves processes off the
/// request path (the warm pool), except a branch's copy of the interpreter
/// (docs/branch.md): k=1 went from ~22 to ~8 ms with expedited grace periods.
fn rcu_expedited() -> Check {
    let name = "rcu_expedited";
    let favordynmods = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            matches!(f.get(2), Some(&"cgroup" | &"cgroup2"))
                && f.get(3)
                    .is_some_and(|o| o.split(',').any(|o| o == "favordynmods"))
        })
    });
    if favordynmods {
        return Check::pass(
            name,
            "a cgroup hierarchy is mounted with favordynmods (fast cgroup moves)",
        );
    }
    match std::fs::read_to_string("/sys/kernel/rcu_expedited") {
        Ok(v) if v.trim() == "1" => Check::pass(name, "expedited RCU grace periods (fast cgroup moves)"),
        Ok(_) => Check::warn(
            name,
            "cgroup moves wait for an RCU grace period: a session branch and a spawn without the warm pool wait 5-15 ms per move on an idle host",
            "for faster branches: mount -o remount,favordynmods /sys/fs/cgroup (the cgroup2 mount; fork and exit take a slightly slower lock), or echo 1 > /sys/kernel/rcu_expedited (host-wide, more IPIs); the operator's choice",
        ),
        Err(e) => Check::pass(name, format!("not tunable here ({e})")),
    }
}

fn cgroups(config: &Config) -> Check {
    let name = "cgroups";
    let (v1, v2) = cgroup_mounts();
    let layout = match (v1.is_empty(), v2.is_empty()) {
        (true, false) => format!("unified (cgroup2 at {})", v2.join(", ")),
        (false, true) => format!("v1 ({})", v1.join(",")),
        (false, false) => format!("hybrid (v1 {}; cgroup2 at {})", v1.join(","), v2.join(", ")),
        (true, true) => "none mounted".into(),
    };
    let mut cfg = config.cgroup.clone();
    cfg.instance = format!("doctor-{}", std::process::id());
    let manager = match forkd_cgroup::Manager::new(&cfg) {
        Ok(m) => m,
        Err(e) if crate::sys::euid() != 0 => {
            return Check::warn(
                name,
                format!("{layout}; this user cannot create cgroups ({e}): memory, cpu and pids limits would NOT be enforced"),
                "delegate a cgroup v2 subtree to this user (systemd: Delegate=yes, or chown a directory under /sys/fs/cgroup) and set cgroup.v2_root",
            )
        }
        Err(e) => {
            return Check::fail(
                name,
                format!("{layout}; {e}"),
                "mount the cgroup v2 hierarchy (or v1 memory, cpu and pids), or set cgroup.mode = \"disabled\" to run without limits",
            )
        }
    };
    let mode = manager.mode();
    let result = if mode == forkd_cgroup::Mode::Disabled {
        Check::warn(
            name,
            format!("{layout}; cgroups disabled: memory, cpu and pids limits are NOT enforced"),
            "set cgroup.mode = \"auto\" on a host with cgroup v1 memory/cpu/pids or v2 controllers",
        )
    } else {
        let limits = forkd_cgroup::Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(16),
        };
        match manager.create("probe", &limits) {
            Ok(sandbox) => {
                let dirs = sandbox.dirs().len();
                let removed = sandbox.remove();
                match (removed, manager.limits_enforced()) {
                    (Err(e), _) => Check::fail(
                        name,
                        format!("{layout}; created a sandbox cgroup but could not remove it: {e}"),
                        "check that nothing else holds the forkd cgroup directories",
                    ),
                    (Ok(()), true) => Check::pass(
                        name,
                        format!("{layout}; uses {mode:?}: created a sandbox cgroup with memory, cpu and pids limits ({dirs} directories) and removed it"),
                    ),
                    (Ok(()), false) => Check::warn(
                        name,
                        format!("{layout}; uses {mode:?} but some of memory, cpu, pids are missing: those limits are not enforced"),
                        "enable the memory, cpu and pids controllers (v2: in cgroup.subtree_control of the parents)",
                    ),
                }
            }
            Err(e) => Check::fail(
                name,
                format!("{layout}; uses {mode:?} but creating a sandbox cgroup failed: {e}"),
                "run as root, or delegate a cgroup v2 subtree and set cgroup.v2_root",
            ),
        }
    };
    if let Err(e) = manager.shutdown() {
        tracing::warn!("removing the doctor's cgroup: {e}");
    }
    result
}

// ---------------------------------------------------------------------------
// Zygotes
// ---------------------------------------------------------------------------

fn library(config: &Config) -> Check {
    match crate::locate::find_library(config.zygote_library.as_deref()) {
        Ok(p) => Check::pass("zygote library", p.display().to_string()),
        Err(e) => Check::fail(
            "zygote library",
            e.to_string(),
            "build the workspace (cargo build --release) or install libforkd_zygote.so next to forkd",
        ),
    }
}

/// Imports each preload module in turn and reports, as JSON lines, how each
/// went, then the interpreter and the thread count (a zygote must stay
/// single-threaded to fork).
const IMPORT_SCRIPT: &str = r#"
import importlib, json, os, sys, time, traceback
for name in sys.argv[1:]:
    t = time.monotonic()
    try:
        importlib.import_module(name)
        print(json.dumps({"module": name, "ok": True, "ms": (time.monotonic() - t) * 1e3}), flush=True)
    except BaseException as e:
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        print(json.dumps({"module": name, "ok": False, "error": last}), flush=True)
print(json.dumps({"python": sys.version.split()[0], "executable": sys.executable,
                  "threads": len(os.listdir("/proc/self/task"))}), flush=True)
"#;

fn zygote_checks(z: &crate::config::ZygoteSection) -> Vec<Check> {
    let label = format!("python [{}]", z.name);
    let python = match crate::locate::find_python(&z.python, &z.name) {
        Ok(p) => p,
        Err(e) => {
            return vec![Check::fail(
                label,
                e.to_string(),
                format!(
                    "install Python 3.9+ or point zygote `{}`'s `python` at an existing interpreter (e.g. /opt/venv/bin/python)",
                    z.name
                ),
            )]
        }
    };
    let mut cmd = Command::new(&python);
    cmd.arg("-c").arg(IMPORT_SCRIPT).args(&z.preload);
    // The zygote's environment: its own `env` plus the thread caps the
    // daemon sets, nothing else of ours.
    cmd.env_clear().stdin(Stdio::null()).current_dir("/");
    for (k, v) in std::env::vars_os() {
        let key = k.to_string_lossy();
        if key == "HOME" || key == "PATH" || key.starts_with("PYENV") {
            cmd.env(&k, v);
        }
    }
    for var in ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
        cmd.env(var, "1");
    }
    cmd.envs(&z.env);
    let timeout = Duration::from_secs(z.start_timeout_secs.max(1));
    let (status, out, err) = match output_within(cmd, timeout) {
        Ok(o) => o,
        Err(e) => {
            return vec![Check::fail(
                label,
                format!("{}: {e}", python.display()),
                "point `python` at a working interpreter",
            )]
        }
    };
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let Some(summary) = lines.iter().find(|v| v.get("python").is_some()) else {
        let last = err.lines().last().unwrap_or("no output").to_string();
        return vec![Check::fail(
            label,
            format!("{} did not run (exit {status:?}): {last}", python.display()),
            "point `python` at a working Python 3 interpreter",
        )];
    };
    let mut checks = vec![Check::pass(
        label,
        format!(
            "{} (Python {})",
            python.display(),
            summary["python"].as_str().unwrap_or("?")
        ),
    )];
    for v in lines.iter().filter(|v| v.get("module").is_some()) {
        let module = v["module"].as_str().unwrap_or("?");
        let name = format!("preload [{}] {module}", z.name);
        if v["ok"].as_bool() == Some(true) {
            checks.push(Check::pass(
                name,
                format!("imports in {:.0} ms", v["ms"].as_f64().unwrap_or(0.0)),
            ));
        } else {
            checks.push(Check::fail(
                name,
                v["error"].as_str().unwrap_or("import failed").to_string(),
                format!(
                    "install it into that interpreter ({} -m pip install {module}) or remove it from zygote `{}`'s preload",
                    python.display(),
                    z.name
                ),
            ));
        }
    }
    let threads = summary["threads"].as_u64().unwrap_or(0);
    if threads > 1 {
        checks.push(Check::fail(
            format!("threads [{}]", z.name),
            format!("{threads} threads after the preload imports: the zygote refuses to fork from a threaded process"),
            "find the module that starts a thread at import and set its thread-count variable in the zygote's env (e.g. NUMEXPR_NUM_THREADS=1), or remove it from preload",
        ));
    }
    checks
}

// ---------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------

/// Starts a private daemon with this configuration (no warm pool, no
/// listeners) and runs one sandbox.
fn end_to_end(config: &Config) -> Check {
    let name = "sandbox";
    let dir = std::env::temp_dir().join(format!("forkd-doctor-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return Check::fail(
            name,
            format!("cannot create {}: {e}", dir.display()),
            "make the temporary directory writable",
        );
    }
    let socket = dir.join("forkd.sock");
    let mut config = config.clone();
    config.cgroup.instance = format!("doctor-{}", std::process::id());
    config.netns_stock = 0;
    config.metrics_listen = None;
    config.audit_log = None;
    for z in &mut config.zygotes {
        z.warm_pool = 0;
    }
    if config.zygotes.is_empty() {
        config.zygotes.push(crate::config::ZygoteSection {
            warm_pool: 0,
            ..Default::default()
        });
    }
    let zygote = config.default_zygote.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot start a runtime: {e}"),
                "check ulimits",
            )
        }
    };
    let check = runtime.block_on(async {
        let t0 = Instant::now();
        let running = match crate::start(config, Some(&socket)).await {
            Ok(r) => r,
            Err(e) => {
                return Check::fail(
                    name,
                    format!("a daemon with this configuration did not start: {e}"),
                    "see the error above; the daemon's log (RUST_LOG=debug) may say more",
                )
            }
        };
        let started = t0.elapsed();
        let request = forkd_ipc::SpawnRequest {
            program: forkd_ipc::Program::Code("import sys; print(6 * 7)".into()),
            timeout_ms: Some(10_000),
            ..Default::default()
        };
        let result = async {
            let client = forkd_ipc::AsyncClient::connect(&socket).await?;
            client.spawn(&request).await
        }
        .await;
        running.shutdown().await;
        match result {
            Ok(r) if r.exit_code == Some(0) && r.stdout == b"42\n" => Check::pass(
                name,
                format!(
                    "zygote `{zygote}` started in {} ms; one isolated sandbox ran in {:.1} ms (cgroup limits {})",
                    started.as_millis(),
                    r.timings.total_us as f64 / 1e3,
                    if r.limits.cgroup_enforced { "enforced" } else { "NOT enforced" }
                ),
            ),
            Ok(r) => Check::fail(
                name,
                format!(
                    "the sandbox ran but printed {:?} / {:?} (exit {:?}, killed_by {:?})",
                    String::from_utf8_lossy(&r.stdout),
                    String::from_utf8_lossy(&r.stderr),
                    r.exit_code,
                    r.killed_by
                ),
                "run the daemon with RUST_LOG=debug and report the output",
            ),
            Err(e) => Check::fail(
                name,
                format!("the sandbox request failed: {e}"),
                "the message says what failed; RUST_LOG=debug forkd doctor shows the daemon's log",
            ),
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    check
}

// ---------------------------------------------------------------------------

/// Runs `cmd` with stdout and stderr captured, killing it after `timeout`.
/// Returns (exit code, stdout, stderr).
fn output_within(
    mut cmd: Command,
    timeout: Duration,
) -> std::io::Result<(Option<i32>, String, String)> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    // Readers on threads so a chatty child cannot block on a full pipe.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok((
        status.code(),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    ))
}

/// The path `forkd doctor` was given, for its header line.
pub fn describe(config_path: Option<&Path>) -> String {
    match config_path {
        Some(p) => format!("forkd doctor: checking this machine and {}", p.display()),
        None => "forkd doctor: checking this machine and the default configuration".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn failures_set_the_exit_code_warnings_do_not() {
        let w = Check::warn("a", "b", "c");
        assert_eq!(exit_code(&[Check::pass("a", "b"), w.clone()]), 0);
        assert_eq!(exit_code(&[w, Check::fail("a", "b", "c")]), 1);
        assert!(Check::fail("x", "broken", "do y")
            .to_string()
            .contains("\n      fix: do y"));
    }
}
