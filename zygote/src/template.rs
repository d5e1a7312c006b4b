//! The sandbox's minimal root, built once per policy as a mount namespace.
//!
//! A throwaway helper process (forked while the zygote is still
//! single-threaded) unshares a mount namespace, assembles a tmpfs root holding
//! only what the policy exposes (read-only binds of system and interpreter
//! paths, selected /etc entries, a few device nodes, empty mount points for
//! /proc, /tmp and /dev/shm), pivots into it and makes it read-only. The zygote
//! keeps an fd to that namespace; each child `setns`es into it and unshares a
//! private copy, so the per-child cost is a namespace copy and three mounts
//! instead of a dozen binds.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::policy::FilesystemPolicy;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot build the sandbox root: {step}: {source}")]
    Step {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("the sandbox root helper failed: {0}")]
    Helper(String),
    #[error("bound path {path} is a {kind}, which a sandbox could use to reach a host process: remove it, or keep it out of the interpreter's prefixes, sys.path and the policy's /etc entries")]
    SpecialFile { path: PathBuf, kind: &'static str },
}

/// The first socket or FIFO at or below `root` (symlinks are not followed;
/// the directory entry's type is used, so the walk costs no stat per file).
/// Device nodes do not matter: binds are nodev.
fn find_special(root: &Path) -> Option<(PathBuf, &'static str)> {
    use std::os::unix::fs::FileTypeExt;
    let kind = |t: std::fs::FileType| {
        if t.is_socket() {
            Some("socket")
        } else if t.is_fifo() {
            Some("FIFO")
        } else {
            None
        }
    };
    if let Some(k) = std::fs::symlink_metadata(root)
        .ok()
        .and_then(|m| kind(m.file_type()))
    {
        return Some((root.to_path_buf(), k));
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if let Some(k) = kind(t) {
                return Some((e.path(), k));
            }
            if t.is_dir() {
                stack.push(e.path());
            }
        }
    }
    None
}

fn step(step: impl Into<String>) -> impl FnOnce(io::Error) -> TemplateError {
    move |source| TemplateError::Step {
        step: step.into(),
        source,
    }
}

/// What a path in the new root is made of.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    /// Bind-mount the host path (a directory or a file) read-only.
    Bind {
        host: PathBuf,
        is_dir: bool,
    },
    /// Bind-mount a device node (read-only mount; device writes still work).
    Device {
        host: PathBuf,
    },
    Symlink {
        target: PathBuf,
    },
    /// A read-only file of the root with these contents (shared by every
    /// child: no per-child cost).
    File {
        contents: Vec<u8>,
    },
    /// A copy of a host /etc file (policy `private_locks`): like `File`, but
    /// granted by the landlock rule on each child's private overlay of /etc
    /// rather than one rule per file.
    EtcCopy {
        contents: Vec<u8>,
    },
    Dir,
}

/// Paths the landlock rule set grants, as O_PATH descriptors opened on the host.
/// Bind mounts share inodes with their source, so rules on these descriptors
/// apply inside the sandbox's root.
#[derive(Debug, Default)]
pub struct LandlockPaths {
    pub read_exec_dirs: Vec<OwnedFd>,
    pub read_exec_files: Vec<OwnedFd>,
    pub rw_devices: Vec<OwnedFd>,
    pub ro_devices: Vec<OwnedFd>,
}

#[derive(Debug)]
pub struct Template {
    pub mount_ns: OwnedFd,
    pub landlock: LandlockPaths,
    /// Host paths bound read-only, for diagnostics.
    pub bound: Vec<PathBuf>,
    /// Bound paths that lie under a per-child tmpfs (/tmp, /dev/shm), e.g. a
    /// venv in /tmp: each child binds them again on top of its fresh tmpfs.
    pub shadowed: Vec<PathBuf>,
    /// With `private_locks`: (directory, overlay options) of each bound
    /// tree a child covers with its own read-only overlay (those under a
    /// per-child tmpfs, see [`under_per_child_tmpfs`], after binding them
    /// again).
    pub private_lock_dirs: Vec<(CString, CString)>,
    /// The host's online CPU count, when the root has
    /// `/sys/devices/system/cpu/online` (a link to [`CPU_ONLINE`], which each
    /// child writes with its own count).
    pub host_cpus: Option<u32>,
    /// Policy `cpu_affinity`: pin each child to its cpu limit's CPUs.
    pub cpu_affinity: bool,
    /// Policy `cgroup_view`: the host's cgroup hierarchies, each of which a
    /// child mounts read-only at the same path (rooted at its own cgroup by
    /// its cgroup namespace) when it joined a cgroup there.
    pub cgroup_views: Vec<CgroupView>,
    /// The host's `/etc/passwd` and `/etc/group` when the policy lists them:
    /// each child writes them with an entry for its own uid added (the root's
    /// /etc/passwd and /etc/group link to [`PASSWD`] and [`GROUP`]), so
    /// `pwd.getpwuid(os.getuid())` answers as for an ordinary user.
    pub passwd: Option<Vec<u8>>,
    pub group: Option<Vec<u8>>,
}

/// A cgroup hierarchy mounted on the host, as a child mounts it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupView {
    /// Its mount point, on the host and in the root.
    pub mount_point: PathBuf,
    /// `cgroup2`, or `cgroup` (v1).
    pub fstype: CString,
    /// v1: the controllers (`memory`, `cpu,cpuacct`) that name the
    /// hierarchy; a non-initial cgroup namespace may mount only one that
    /// exists, so they must be exactly the host's.
    pub controllers: Option<CString>,
}

/// The cgroup v1 controllers (a v1 mount's other super options are flags).
const V1_CONTROLLERS: [&str; 14] = [
    "cpuset",
    "cpu",
    "cpuacct",
    "blkio",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// The cgroup hierarchies in a `/proc/self/mountinfo` text: v2 mounts and v1
/// mounts of controllers (named-only v1 hierarchies such as systemd's hold
/// no limits and are left out). Each mount point once (the first).
pub fn cgroup_views(mountinfo: &str) -> Vec<CgroupView> {
    let mut out: Vec<CgroupView> = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some(fstype), Some(_source), Some(super_options)) =
            (right.next(), right.next(), right.next())
        else {
            continue;
        };
        // Octal escapes (\040) mean an unusual mount point: not ours to show.
        if !mount_point.starts_with('/') || mount_point.contains('\\') {
            continue;
        }
        let controllers = match fstype {
            "cgroup2" => None,
            "cgroup" => {
                let names: Vec<&str> = super_options
                    .split(',')
                    .filter(|o| V1_CONTROLLERS.contains(o))
                    .collect();
                if names.is_empty() {
                    continue;
                }
                Some(names.join(","))
            }
            _ => continue,
        };
        let mount_point = PathBuf::from(mount_point);
        if out.iter().any(|v| v.mount_point == mount_point) {
            continue;
        }
        let (Ok(fstype), Ok(controllers)) = (
            CString::new(fstype),
            controllers.map(CString::new).transpose(),
        ) else {
            continue;
        };
        out.push(CgroupView {
            mount_point,
            fstype,
            controllers,
        });
    }
    out
}

/// The view a child that joined `procs` (a `cgroup.procs` file) mounts: the
/// hierarchy with the longest mount point above it.
pub fn cgroup_view_of<'a>(views: &'a [CgroupView], procs: &str) -> Option<&'a CgroupView> {
    views
        .iter()
        .filter(|v| Path::new(procs).starts_with(&v.mount_point))
        .max_by_key(|v| v.mount_point.as_os_str().len())
}

/// Where a child writes its /etc/passwd and /etc/group (links in the root):
/// the host's entries plus one for the sandbox's uid.
pub const PASSWD: &str = "/dev/.scratch/.passwd";
pub const GROUP: &str = "/dev/.scratch/.group";

/// `/etc` entries each child writes for itself, and where.
const PER_CHILD_ETC: [(&str, &str); 2] = [("passwd", PASSWD), ("group", GROUP)];

/// The host's copy of a per-child /etc entry, when the policy lists it and it
/// is a regular file (a host symlink is kept as a symlink, as other entries).
fn per_child_etc(fs: &FilesystemPolicy, name: &str) -> Option<Vec<u8>> {
    let path = Path::new("/etc").join(name);
    let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
    (is_file && fs.etc.iter().any(|e| e == name))
        .then(|| std::fs::read(&path).ok())
        .flatten()
}

/// What a child writes as /etc/passwd and /etc/group: the host's, plus an
/// entry named `user` (home /home/user) for `uid` when no entry has that id.
pub fn account_files(passwd: &[u8], group: &[u8], uid: u32) -> (Vec<u8>, Vec<u8>) {
    let has_id = |table: &[u8], field: usize| {
        table
            .split(|&b| b == b'\n')
            .any(|line| line.split(|&b| b == b':').nth(field) == Some(uid.to_string().as_bytes()))
    };
    let has_name = |table: &[u8], name: &str| {
        table
            .split(|&b| b == b'\n')
            .any(|line| line.split(|&b| b == b':').next() == Some(name.as_bytes()))
    };
    let name = if has_name(passwd, "user") {
        format!("sandbox{uid}")
    } else {
        "user".to_string()
    };
    let with = |table: &[u8], present: bool, line: String| {
        let mut out = table.to_vec();
        if !present {
            if !out.is_empty() && !out.ends_with(b"\n") {
                out.push(b'\n');
            }
            out.extend_from_slice(line.as_bytes());
        }
        out
    };
    (
        with(
            passwd,
            has_id(passwd, 2),
            format!("{name}:x:{uid}:{uid}:forkd sandbox:/home/user:/bin/sh\n"),
        ),
        with(group, has_id(group, 2), format!("{name}:x:{uid}:\n")),
    )
}

/// Where a child writes the CPU list `/sys/devices/system/cpu/online` (a
/// link in the root) shows: in its own scratch stage, so each sandbox has
/// its own (`os.cpu_count()` follows its cpu limit).
pub const CPU_ONLINE: &str = "/dev/.scratch/.cpu-online";
const HOST_CPU_ONLINE: &str = "/sys/devices/system/cpu/online";

/// The number of CPUs in a kernel CPU list (`0-3,6`), or None if malformed.
pub fn cpu_list_count(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
    }
    (n > 0).then_some(n)
}

/// What `online` shows for a sandbox allowed `cpus` CPUs (rounded up) on a
/// host with `host` online: the first that many, at most the host's.
pub fn cpu_online_text(cpus: Option<u32>, host: u32) -> String {
    match cpus.map_or(host, |c| c.clamp(1, host)) {
        1 => "0\n".to_string(),
        n => format!("0-{}\n", n - 1),
    }
}

/// An empty directory of the read-only root: the second lower layer of the
/// per-child overlays (overlayfs wants two lower layers without an upper).
pub const EMPTY_LOWER: &str = "/dev/.empty";

/// Mount points each child covers with a fresh tmpfs.
pub const PER_CHILD_TMPFS: [&str; 2] = ["/tmp", "/dev/shm"];

/// The sandbox's home and working directory: the same scratch directory as
/// /tmp, bound a second time (a mount point in the root).
pub const HOME: &str = "/home/user";

/// Empty mount point where each child mounts its one scratch tmpfs and binds
/// its `tmp` and `shm` directories to /tmp and /dev/shm: one size limit
/// then covers both.
pub const SCRATCH_STAGE: &str = "/dev/.scratch";

/// Where a sandbox's private devpts instance is mounted (policy `devpts`).
pub const DEVPTS: &str = "/dev/pts";

/// Plans the root's entries: (path inside the root, entry), parents first.
fn plan(
    fs: &FilesystemPolicy,
    interpreter_paths: &[String],
    hostname: &str,
) -> Vec<(PathBuf, Entry)> {
    let mut out: Vec<(PathBuf, Entry)> = Vec::new();
    let mut binds: Vec<PathBuf> = Vec::new();
    let covered = |binds: &[PathBuf], p: &Path| binds.iter().any(|b| p.starts_with(b));

    for p in &fs.read_only {
        let path = PathBuf::from(p);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    out.push((path, Entry::Symlink { target }));
                }
            }
            Ok(m) => {
                binds.push(path.clone());
                let is_dir = m.is_dir();
                out.push((path.clone(), Entry::Bind { host: path, is_dir }));
            }
            Err(_) => {}
        }
    }
    // Interpreter paths: bind the real location, and the spelled one when it
    // differs (e.g. a venv reached through a symlink).
    let mut extra: Vec<PathBuf> = Vec::new();
    for p in interpreter_paths {
        let spelled = PathBuf::from(p);
        if !spelled.is_absolute() {
            continue;
        }
        if let Ok(real) = std::fs::canonicalize(&spelled) {
            extra.push(real.clone());
            if real != spelled {
                extra.push(spelled);
            }
        }
    }
    extra.sort_by_key(|p| p.as_os_str().len());
    for path in extra {
        if covered(&binds, &path) || path.parent().is_none() {
            continue;
        }
        if let Ok(m) = std::fs::metadata(&path) {
            binds.push(path.clone());
            out.push((
                path.clone(),
                Entry::Bind {
                    host: path,
                    is_dir: m.is_dir(),
                },
            ));
        }
    }
    for e in &fs.etc {
        let path = Path::new("/etc").join(e);
        if e == "hosts" {
            if let Some(contents) = hosts_with(&path, hostname) {
                out.push((path, Entry::File { contents }));
                continue;
            }
        }
        if let Some((_, target)) = PER_CHILD_ETC.iter().find(|(name, _)| name == e) {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                let target = PathBuf::from(target);
                out.push((path, Entry::Symlink { target }));
                continue;
            }
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    out.push((path, Entry::Symlink { target }));
                }
            }
            // With private_locks /etc is copied into the root (each child
            // covers it with its own overlay, so a lock on /etc/hosts reaches
            // nobody else): no host inode is bound there.
            Ok(_) if fs.private_locks => copy_etc(&path, &mut out),
            Ok(m) => out.push((
                path.clone(),
                Entry::Bind {
                    host: path,
                    is_dir: m.is_dir(),
                },
            )),
            Err(_) => {}
        }
    }
    for d in fs.devices_rw.iter().chain(&fs.devices_ro) {
        let host = Path::new("/dev").join(d);
        if host.exists() {
            out.push((host.clone(), Entry::Device { host }));
        }
    }
    // /workspace: the default mount point of a request's workspace.
    for dir in ["/proc", "/tmp", "/dev/shm", "/workspace", SCRATCH_STAGE] {
        out.push((PathBuf::from(dir), Entry::Dir));
    }
    if fs.private_locks {
        out.push((PathBuf::from(EMPTY_LOWER), Entry::Dir));
    }
    if fs.cpu_count && host_cpu_count().is_some() {
        out.push((PathBuf::from("/sys/devices/system/cpu"), Entry::Dir));
        out.push((
            PathBuf::from(HOST_CPU_ONLINE),
            Entry::Symlink {
                target: PathBuf::from(CPU_ONLINE),
            },
        ));
    }
    if fs.cgroup_view {
        for view in host_cgroup_views() {
            out.push((view.mount_point, Entry::Dir));
        }
    }
    if fs.devpts {
        // Each sandbox mounts its own devpts instance here; ptmx is its.
        out.push((PathBuf::from(DEVPTS), Entry::Dir));
        out.push((
            PathBuf::from("/dev/ptmx"),
            Entry::Symlink {
                target: PathBuf::from("pts/ptmx"),
            },
        ));
    }
    // The home and working directory: each child binds its scratch here
    // too, so `os.getcwd()` says /home/user as for an ordinary user.
    out.push((PathBuf::from(HOME), Entry::Dir));
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        out.push((
            Path::new("/dev").join(name),
            Entry::Symlink {
                target: PathBuf::from(target),
            },
        ));
    }
    out
}

/// Plans a copy of the host's /etc entry `path` (a file, or a directory tree
/// of files, directories and symlinks) into the root. Sockets, FIFOs and
/// device nodes are left out: nothing in a sandbox may reach a host process.
/// Read once per zygote; host changes show in zygotes started after them.
fn copy_etc(path: &Path, out: &mut Vec<(PathBuf, Entry)>) {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return;
    };
    let ft = m.file_type();
    if ft.is_symlink() {
        if let Ok(target) = std::fs::read_link(path) {
            out.push((path.to_path_buf(), Entry::Symlink { target }));
        }
    } else if ft.is_file() {
        if let Ok(contents) = std::fs::read(path) {
            out.push((path.to_path_buf(), Entry::EtcCopy { contents }));
        }
    } else if ft.is_dir() {
        out.push((path.to_path_buf(), Entry::Dir));
        let Ok(dir) = std::fs::read_dir(path) else {
            return;
        };
        let mut names: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names {
            copy_etc(&p, out);
        }
    }
}

/// The root's /etc/hosts: the host's, plus `127.0.1.1 HOSTNAME` (as Debian
/// writes for a machine's own name) when no line names the sandbox's
/// hostname, so `gethostbyname(gethostname())` resolves as on a host. `None`
/// (bind the host's as is) when it already does or the host's is not a file.
fn hosts_with(path: &Path, hostname: &str) -> Option<Vec<u8>> {
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let mut hosts = std::fs::read(path).ok()?;
    let named = String::from_utf8_lossy(&hosts).lines().any(|l| {
        let l = l.split('#').next().unwrap_or("");
        l.split_whitespace().skip(1).any(|n| n == hostname)
    });
    if named || hostname.is_empty() {
        return None;
    }
    if !hosts.is_empty() && !hosts.ends_with(b"\n") {
        hosts.push(b'\n');
    }
    hosts.extend_from_slice(format!("127.0.1.1\t{hostname}\n").as_bytes());
    Some(hosts)
}

fn host_cgroup_views() -> Vec<CgroupView> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| cgroup_views(&text))
        .unwrap_or_default()
}

fn host_cpu_count() -> Option<u32> {
    cpu_list_count(&std::fs::read_to_string(HOST_CPU_ONLINE).ok()?)
}

fn open_path(path: &Path) -> io::Result<OwnedFd> {
    sys::open(&sys::cstring(path)?, libc::O_PATH, 0)
}

/// Builds the template for one filesystem policy.
pub fn build(
    fs: &FilesystemPolicy,
    interpreter_paths: &[String],
    hostname: &str,
) -> Result<Template, TemplateError> {
    let entries = plan(fs, interpreter_paths, hostname);
    // Interpreter trees (a venv, a pyenv prefix, sys.path entries) and /etc
    // entries must hold no sockets or FIFOs: a sandbox could connect to or
    // read them. The policy's system trees (/usr, /lib, ...) are package-managed
    // and not walked (that would cost ~0.3 s of CPU per zygote start); their
    // sockets, if any, are closed to the sandbox's own uid by their modes.
    for (_, entry) in &entries {
        if let Entry::Bind { host, .. } = entry {
            if fs.read_only.iter().any(|r| Path::new(r) == host) {
                continue;
            }
            if let Some((path, kind)) = find_special(host) {
                return Err(TemplateError::SpecialFile { path, kind });
            }
        }
    }

    // Landlock rules are made from descriptors opened here, on the host: a
    // bind mount shares its source's inode, so they cover the sandbox's view.
    let mut landlock = LandlockPaths::default();
    let mut bound = Vec::new();
    for (_, entry) in &entries {
        match entry {
            Entry::Bind { host, is_dir } => {
                let fd = open_path(host).map_err(step(format!("open {}", host.display())))?;
                if *is_dir {
                    landlock.read_exec_dirs.push(fd);
                } else {
                    landlock.read_exec_files.push(fd);
                }
                bound.push(host.clone());
            }
            Entry::Device { host } => {
                let fd = open_path(host).map_err(step(format!("open {}", host.display())))?;
                let name = host.file_name().map(|n| n.to_string_lossy().into_owned());
                if name.is_some_and(|n| fs.devices_rw.contains(&n)) {
                    landlock.rw_devices.push(fd);
                } else {
                    landlock.ro_devices.push(fd);
                }
            }
            _ => {}
        }
    }

    let (ready_r, ready_w) = sys::pipe().map_err(step("pipe"))?;
    let (hold_r, hold_w) = sys::pipe().map_err(step("pipe"))?;
    // SAFETY: called from forkd_init while the zygote is single-threaded (the
    // Python side calls it before importing any preload module).
    let pid = match unsafe { sys::fork() }.map_err(step("fork helper"))? {
        sys::Fork::Child => {
            drop(ready_r);
            drop(hold_w);
            let outcome = assemble(&entries);
            let msg = match &outcome {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            };
            let _ = sys::write_all(ready_w.as_fd(), msg.as_bytes());
            drop(ready_w);
            if outcome.is_ok() {
                // Keep the namespace alive until the parent has opened it.
                let mut buf = [0u8; 1];
                let _ = std::fs::File::from(hold_r).read(&mut buf);
            }
            sys::exit_now(if outcome.is_ok() { 0 } else { 1 });
        }
        sys::Fork::Parent(pid) => pid,
    };
    drop(ready_w);
    drop(hold_r);
    let mut msg = String::new();
    let read = std::fs::File::from(ready_r).read_to_string(&mut msg);
    let result = match read {
        Ok(_) if msg == "ok" => {
            // Files written into the root are granted by their inode in it,
            // reached through the helper's root while it holds it.
            let mut files = Ok(());
            for (inner, entry) in &entries {
                if matches!(entry, Entry::File { .. }) {
                    let there = format!("/proc/{pid}/root{}", inner.display());
                    match open_path(Path::new(&there)) {
                        Ok(fd) => landlock.read_exec_files.push(fd),
                        Err(e) => {
                            files = Err(step(format!("open {} in the root", inner.display()))(e));
                            break;
                        }
                    }
                }
            }
            files.and_then(|()| {
                sys::open(
                    &CString::new(format!("/proc/{pid}/ns/mnt")).expect("no NUL"),
                    libc::O_RDONLY,
                    0,
                )
                .map_err(step("open helper mount namespace"))
            })
        }
        Ok(_) => Err(TemplateError::Helper(msg)),
        Err(e) => Err(step("read helper status")(e)),
    };
    drop(hold_w);
    let _ = sys::waitpid(pid);
    let private_lock_dirs = if fs.private_locks {
        private_lock_dirs(&entries)?
    } else {
        Vec::new()
    };
    let shadowed = entries
        .iter()
        .filter(|(inner, e)| {
            matches!(e, Entry::Bind { .. }) && PER_CHILD_TMPFS.iter().any(|t| inner.starts_with(t))
        })
        .map(|(inner, _)| inner.clone())
        .collect();
    Ok(Template {
        mount_ns: result?,
        landlock,
        bound,
        shadowed,
        private_lock_dirs,
        host_cpus: host_cpu_count().filter(|_| fs.cpu_count),
        cpu_affinity: fs.cpu_affinity,
        cgroup_views: if fs.cgroup_view {
            host_cgroup_views()
        } else {
            Vec::new()
        },
        passwd: per_child_etc(fs, "passwd"),
        group: per_child_etc(fs, "group"),
    })
}

/// Whether a root path lies under a per-child tmpfs (/tmp, /dev/shm), so
/// that a child binds it again on top of its fresh tmpfs.
pub fn under_per_child_tmpfs(path: &std::ffi::CStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()));
    PER_CHILD_TMPFS.iter().any(|t| path.starts_with(t))
}

/// The overlay of each bound directory, including those under the per-child
/// tmpfs mounts (a venv under /tmp: the child covers it after binding it
/// again). A path overlayfs options cannot carry (`,` `:` `\\`) refuses,
/// naming it.
fn private_lock_dirs(
    entries: &[(PathBuf, Entry)],
) -> Result<Vec<(CString, CString)>, TemplateError> {
    // Refuse here, once, rather than fail every spawn: overlayfs is often a
    // module (Debian's), which a sandbox's mount does not load.
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return Err(TemplateError::Helper(
            "private_locks needs overlayfs, which this kernel does not have loaded (no `overlay` in /proc/filesystems): run `modprobe overlay` (or load it at boot), or turn private_locks off".into(),
        ));
    }
    let mut out = Vec::new();
    for (inner, e) in entries {
        let Entry::Bind { is_dir: true, .. } = e else {
            continue;
        };
        let text = inner.to_string_lossy();
        if text.contains([',', ':', '\\']) || inner.to_str().is_none() {
            return Err(TemplateError::Helper(format!(
                "private_locks: bound directory {text} has a character overlayfs options cannot carry (',' ':' '\\' or non-UTF-8); rename it or turn private_locks off"
            )));
        }
        out.push((
            c(inner)?,
            CString::new(format!("lowerdir={text}:{EMPTY_LOWER}")).expect("no NUL in a path"),
        ));
    }
    // /etc holds copies (`EtcCopy`, see `plan`): one overlay covers them all.
    if entries
        .iter()
        .any(|(inner, e)| matches!(e, Entry::EtcCopy { .. }) && inner.starts_with("/etc"))
    {
        out.push((
            CString::new("/etc").expect("no NUL"),
            CString::new(format!("lowerdir=/etc:{EMPTY_LOWER}")).expect("no NUL in a path"),
        ));
    }
    Ok(out)
}

const STAGE: &str = "/tmp";

fn staged(inner: &Path) -> PathBuf {
    let rel: PathBuf = inner
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    Path::new(STAGE).join(rel)
}

fn c(path: &Path) -> Result<CString, TemplateError> {
    sys::cstring(path).map_err(step(format!("path {}", path.display())))
}

/// Runs in the helper: builds the root and pivots into it.
fn assemble(entries: &[(PathBuf, Entry)]) -> Result<(), TemplateError> {
    sys::unshare(libc::CLONE_NEWNS).map_err(step("unshare mount namespace"))?;
    let root = CString::new("/").expect("no NUL");
    sys::mount(None, &root, None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(step("make / private"))?;
    // Bind sources must be mounts of this namespace (binding from another
    // namespace is EINVAL), and opened before the staging tmpfs can shadow them.
    let mut sources = Vec::with_capacity(entries.len());
    for (_, entry) in entries {
        sources.push(match entry {
            Entry::Bind { host, .. } | Entry::Device { host } => {
                Some(open_path(host).map_err(step(format!("open {}", host.display())))?)
            }
            _ => None,
        });
    }
    let stage = CString::new(STAGE).expect("no NUL");
    let tmpfs = CString::new("tmpfs").expect("no NUL");
    let opts = CString::new("size=16m,nr_inodes=16384,mode=0755").expect("no NUL");
    sys::mount(
        Some(&tmpfs),
        &stage,
        Some(&tmpfs),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&opts),
    )
    .map_err(step("mount staging tmpfs"))?;

    for ((inner, entry), source) in entries.iter().zip(&sources) {
        let target = staged(inner);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(step(format!("mkdir {}", parent.display())))?;
        }
        match entry {
            Entry::Dir => {
                std::fs::create_dir_all(&target)
                    .map_err(step(format!("mkdir {}", target.display())))?;
                if inner == Path::new("/proc") {
                    // A user namespace may mount a fresh proc only where one is
                    // already fully visible (mount_too_revealing), so the root
                    // carries a proc mount that each child covers with its own.
                    let proc_fs = CString::new("proc").expect("no NUL");
                    sys::mount(
                        Some(&proc_fs),
                        &c(&target)?,
                        Some(&proc_fs),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                        None,
                    )
                    .map_err(step("mount proc into the root"))?;
                }
            }
            Entry::File { contents } | Entry::EtcCopy { contents } => {
                std::fs::write(&target, contents)
                    .map_err(step(format!("write {}", target.display())))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o444))
                    .map_err(step(format!("chmod {}", target.display())))?;
            }
            Entry::Symlink { target: link } => {
                if std::fs::symlink_metadata(&target).is_err() {
                    std::os::unix::fs::symlink(link, &target)
                        .map_err(step(format!("symlink {}", target.display())))?;
                }
            }
            Entry::Bind { .. } | Entry::Device { .. } => {
                let is_dir = matches!(entry, Entry::Bind { is_dir: true, .. });
                if is_dir {
                    std::fs::create_dir_all(&target)
                        .map_err(step(format!("mkdir {}", target.display())))?;
                } else if std::fs::symlink_metadata(&target).is_err() {
                    std::fs::File::create(&target)
                        .map_err(step(format!("create {}", target.display())))?;
                }
                let fd = source
                    .as_ref()
                    .ok_or_else(|| TemplateError::Helper("missing source".into()))?;
                let src =
                    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
                let dst = c(&target)?;
                sys::mount(Some(&src), &dst, None, libc::MS_BIND | libc::MS_REC, None)
                    .map_err(step(format!("bind {}", inner.display())))?;
                let mut flags =
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID;
                if !matches!(entry, Entry::Device { .. }) {
                    flags |= libc::MS_NODEV;
                }
                sys::mount(None, &dst, None, flags, None)
                    .map_err(step(format!("make {} read-only", inner.display())))?;
            }
        }
    }

    sys::chdir(&stage).map_err(step("chdir to staging root"))?;
    let dot = CString::new(".").expect("no NUL");
    sys::pivot_root(&dot, &dot).map_err(step("pivot_root"))?;
    sys::umount2(&dot, libc::MNT_DETACH).map_err(step("detach old root"))?;
    sys::chdir(&root).map_err(step("chdir /"))?;
    sys::mount(
        None,
        &root,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .map_err(step("make the root read-only"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hybrid host's mountinfo (this machine's shape, shortened) and a
    /// v2-only host's line.
    const HYBRID: &str = "\
25 31 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
30 29 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 29 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 29 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
36 29 0:33 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
37 29 0:34 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,pids
90 31 0:28 /x /srv/my\\040cgroup rw - cgroup cgroup rw,pids
";

    #[test]
    fn cgroup_views_are_the_controller_hierarchies_and_v2() {
        let views = cgroup_views(HYBRID);
        let shown: Vec<(String, String, Option<String>)> = views
            .iter()
            .map(|v| {
                (
                    v.mount_point.display().to_string(),
                    v.fstype.to_str().unwrap().to_string(),
                    v.controllers
                        .as_ref()
                        .map(|c| c.to_str().unwrap().to_string()),
                )
            })
            .collect();
        let own =
            |a: &str, b: &str, c: Option<&str>| (a.to_string(), b.to_string(), c.map(String::from));
        assert_eq!(
            shown,
            vec![
                own("/sys/fs/cgroup/unified", "cgroup2", None),
                own("/sys/fs/cgroup/cpu,cpuacct", "cgroup", Some("cpu,cpuacct")),
                own("/sys/fs/cgroup/memory", "cgroup", Some("memory")),
                own("/sys/fs/cgroup/pids", "cgroup", Some("pids")),
            ]
        );
        let procs = "/sys/fs/cgroup/memory/forkd/i/sandbox-3/cgroup.procs";
        assert_eq!(
            cgroup_view_of(&views, procs).map(|v| v.mount_point.clone()),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        // Not a prefix of the path's components: /sys/fs/cgroup/memoryx.
        assert!(cgroup_view_of(&views, "/sys/fs/cgroup/memoryx/a/cgroup.procs").is_none());

        let v2 = "40 25 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let views = cgroup_views(v2);
        assert_eq!(views.len(), 1);
        assert_eq!(
            cgroup_view_of(&views, "/sys/fs/cgroup/forkd/i/s/cgroup.procs")
                .map(|v| v.fstype.clone()),
            Some(CString::new("cgroup2").unwrap())
        );
    }

    #[test]
    fn account_files_add_the_sandbox_user_once() {
        let passwd = b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/bin/false";
        let group = b"root:x:0:\n";
        let (p, g) = account_files(passwd, group, 100_000);
        assert_eq!(
            String::from_utf8(p).unwrap(),
            "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/bin/false\n\
             user:x:100000:100000:forkd sandbox:/home/user:/bin/sh\n"
        );
        assert_eq!(String::from_utf8(g).unwrap(), "root:x:0:\nuser:x:100000:\n");
        // An id the host already names (a branch is uid 0 in its namespace)
        // keeps the host's entry.
        let (p, g) = account_files(passwd, group, 0);
        assert_eq!(p, passwd);
        assert_eq!(g, group);
        // A host account already called `user` keeps its name.
        let (p, _) = account_files(b"user:x:1000:1000::/home/user:/bin/sh\n", group, 7);
        assert!(String::from_utf8(p)
            .unwrap()
            .ends_with("\nsandbox7:x:7:7:forkd sandbox:/home/user:/bin/sh\n"));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list_count("0\n"), Some(1));
        assert_eq!(cpu_list_count("0-3,6,8-9\n"), Some(7));
        assert_eq!(cpu_list_count(""), None);
        assert_eq!(cpu_list_count("3-1"), None);
        assert_eq!(cpu_online_text(Some(1), 4), "0\n");
        assert_eq!(cpu_online_text(Some(2), 4), "0-1\n");
        assert_eq!(cpu_online_text(Some(9), 4), "0-3\n");
        assert_eq!(cpu_online_text(None, 2), "0-1\n");
    }

    #[test]
    fn plan_skips_nested_and_missing_paths() {
        let fs = FilesystemPolicy {
            read_only: vec!["/usr".into(), "/definitely/missing".into()],
            etc: vec!["passwd".into(), "no-such-entry".into()],
            devices_rw: vec!["null".into()],
            devices_ro: vec![],
            proc_masked: vec![],
            private_locks: false,
            devpts: true,
            cpu_count: true,
            cpu_affinity: false,
            cgroup_view: false,
        };
        let entries = plan(&fs, &["/usr/lib".into(), "relative".into()], "sandbox");
        let paths: Vec<_> = entries.iter().map(|(p, _)| p.clone()).collect();
        assert!(paths.contains(&PathBuf::from("/usr")));
        assert!(
            !paths.contains(&PathBuf::from("/usr/lib")),
            "nested path bound twice"
        );
        assert!(!paths.iter().any(|p| p.starts_with("/definitely")));
        assert!(paths.contains(&PathBuf::from("/etc/passwd")));
        assert!(!paths.contains(&PathBuf::from("/etc/no-such-entry")));
        assert!(paths.contains(&PathBuf::from("/dev/null")));
        assert!(paths.contains(&PathBuf::from("/tmp")));
        assert!(!paths.contains(&PathBuf::from("/etc/shadow")));
    }

    #[test]
    fn hosts_name_the_sandbox_once() {
        let dir = std::env::temp_dir().join(format!("forkd-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(
            &path,
            "127.0.0.1 localhost\n# 10.0.0.1 sandbox\n127.0.0.1 vm",
        )
        .unwrap();
        assert_eq!(
            hosts_with(&path, "sandbox").unwrap(),
            b"127.0.0.1 localhost\n# 10.0.0.1 sandbox\n127.0.0.1 vm\n127.0.1.1\tsandbox\n"
        );
        assert_eq!(hosts_with(&path, "vm"), None, "already named");
        assert_eq!(hosts_with(&dir.join("absent"), "sandbox"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_locks_overlay_each_bound_directory() {
        let has_overlay = std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("overlay");
        let bind = |p: &str, is_dir| {
            (
                PathBuf::from(p),
                Entry::Bind {
                    host: PathBuf::from(p),
                    is_dir,
                },
            )
        };
        let entries = [
            bind("/usr", true),
            bind("/etc/passwd", false),
            bind("/tmp/venv", true),
            (PathBuf::from("/proc"), Entry::Dir),
            (
                PathBuf::from("/etc/hosts"),
                Entry::EtcCopy {
                    contents: b"127.0.0.1 localhost\n".to_vec(),
                },
            ),
        ];
        let got = private_lock_dirs(&entries);
        if !has_overlay {
            let e = got.unwrap_err().to_string();
            assert!(e.contains("modprobe overlay"), "{e}");
            return;
        }
        let got: Vec<(String, String)> = got
            .unwrap()
            .into_iter()
            .map(|(d, o)| (d.into_string().unwrap(), o.into_string().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("/usr".to_owned(), format!("lowerdir=/usr:{EMPTY_LOWER}")),
                (
                    "/tmp/venv".to_owned(),
                    format!("lowerdir=/tmp/venv:{EMPTY_LOWER}")
                ),
                ("/etc".to_owned(), format!("lowerdir=/etc:{EMPTY_LOWER}")),
            ]
        );
        assert!(under_per_child_tmpfs(c"/tmp/venv"));
        assert!(!under_per_child_tmpfs(c"/tmpx/venv"));
        assert!(!under_per_child_tmpfs(c"/usr"));
        let e = private_lock_dirs(&[bind("/opt/a,b", true)]).unwrap_err();
        assert!(e.to_string().contains("/opt/a,b"), "{e}");
    }

    #[test]
    fn staged_paths_stay_under_the_stage() {
        assert_eq!(staged(Path::new("/usr/lib")), PathBuf::from("/tmp/usr/lib"));
        assert_eq!(staged(Path::new("/")), PathBuf::from("/tmp"));
    }
}
