//! The sandbox root, built once as a mount namespace that every child copies:
//! a read-only tmpfs holding read-only binds of the system and interpreter
//! paths, the chosen /etc entries and device nodes, and empty mount points
//! for /proc, /tmp and /dev/shm (each child mounts its own there).

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::policy;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("building the floor's sandbox root: {what}: {source}")]
    Step {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the floor's root helper failed: {0}")]
    Helper(String),
}

fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> RootError {
    move |source| RootError::Step {
        what: what.into(),
        source,
    }
}

enum Kind {
    Bind { dir: bool },
    Device { rw: bool },
    Link(PathBuf),
    Dir,
}

/// Landlock grants, as O_PATH descriptors opened on the host (a bind shares
/// its source's inode, so rules on these cover the sandbox's view).
#[derive(Default)]
pub struct Grants {
    pub dirs: Vec<OwnedFd>,
    pub files: Vec<OwnedFd>,
    pub rw_devices: Vec<OwnedFd>,
    pub ro_devices: Vec<OwnedFd>,
}

pub struct Root {
    pub mount_ns: OwnedFd,
    pub grants: Grants,
    pub bound: Vec<PathBuf>,
    /// Bound paths under /tmp or /dev/shm (a venv in a checkout under
    /// /tmp): each child's own tmpfs covers them, so it binds them again on
    /// top, as forkd does.
    pub shadowed: Vec<PathBuf>,
}

/// Whether a per-child tmpfs covers `path`.
fn under_per_child_tmpfs(path: &Path) -> bool {
    path.starts_with("/tmp") || path.starts_with("/dev/shm")
}

fn entries(interpreter_paths: &[PathBuf]) -> Result<Vec<(PathBuf, Kind)>, RootError> {
    let mut out = Vec::new();
    let mut binds: Vec<PathBuf> = Vec::new();
    fn add(path: PathBuf, out: &mut Vec<(PathBuf, Kind)>, binds: &mut Vec<PathBuf>) {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    out.push((path, Kind::Link(target)));
                }
            }
            Ok(m) => {
                if !binds.iter().any(|b| path.starts_with(b)) {
                    binds.push(path.clone());
                    out.push((path, Kind::Bind { dir: m.is_dir() }));
                }
            }
            Err(_) => {}
        }
    }
    for p in policy::READ_ONLY {
        add(PathBuf::from(p), &mut out, &mut binds);
    }
    let mut extra = Vec::new();
    for p in interpreter_paths.iter().filter(|p| p.is_absolute()) {
        if let Ok(real) = std::fs::canonicalize(p) {
            if real != *p {
                extra.push(p.clone());
            }
            extra.push(real);
        }
    }
    extra.sort_by_key(|p| p.as_os_str().len());
    for p in extra {
        if p.parent().is_some() && std::fs::metadata(&p).is_ok() {
            // Through symlinks too: a bind of the spelled path.
            let dir = std::fs::metadata(&p).map(|m| m.is_dir()).unwrap_or(false);
            if !binds.iter().any(|b| p.starts_with(b)) {
                binds.push(p.clone());
                out.push((p, Kind::Bind { dir }));
            }
        }
    }
    for e in policy::ETC {
        add(Path::new("/etc").join(e), &mut out, &mut binds);
    }
    for (names, rw) in [(policy::DEVICES_RW, true), (policy::DEVICES_RO, false)] {
        for d in names {
            let host = Path::new("/dev").join(d);
            if host.exists() {
                out.push((host, Kind::Device { rw }));
            }
        }
    }
    for d in ["/proc", "/tmp", "/dev/shm"] {
        out.push((PathBuf::from(d), Kind::Dir));
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        out.push((Path::new("/dev").join(name), Kind::Link(target.into())));
    }
    Ok(out)
}

fn open_path(p: &Path) -> Result<OwnedFd, RootError> {
    sys::open(&sys::cstring(p).map_err(step("path"))?, libc::O_PATH)
        .map_err(step(format!("open {}", p.display())))
}

/// Builds the root in a helper process. The caller must be single-threaded.
pub fn build(interpreter_paths: &[PathBuf]) -> Result<Root, RootError> {
    let plan = entries(interpreter_paths)?;
    let mut grants = Grants::default();
    let mut bound = Vec::new();
    for (path, kind) in &plan {
        match kind {
            Kind::Bind { dir } => {
                let fd = open_path(path)?;
                if *dir {
                    grants.dirs.push(fd)
                } else {
                    grants.files.push(fd)
                }
                bound.push(path.clone());
            }
            Kind::Device { rw: true } => grants.rw_devices.push(open_path(path)?),
            Kind::Device { rw: false } => grants.ro_devices.push(open_path(path)?),
            _ => {}
        }
    }
    let (ready_r, ready_w) = sys::pipe().map_err(step("pipe"))?;
    let (hold_r, hold_w) = sys::pipe().map_err(step("pipe"))?;
    // SAFETY: floor_init runs before the server imports anything that could
    // start a thread; the helper only makes system calls and exits.
    let pid = match unsafe { sys::fork() }.map_err(step("fork the root helper"))? {
        sys::Fork::Child => {
            drop((ready_r, hold_w));
            let outcome = assemble(&plan);
            let msg = outcome
                .as_ref()
                .map_or_else(|e| e.to_string(), |_| "ok".into());
            let _ = std::fs::File::from(ready_w).write_all(msg.as_bytes());
            // Keep the namespace alive until the parent holds it.
            let _ = std::fs::File::from(hold_r).read(&mut [0u8; 1]);
            sys::exit_now(i32::from(outcome.is_err()));
        }
        sys::Fork::Parent(pid) => pid,
    };
    drop((ready_w, hold_r));
    let mut msg = String::new();
    let got = std::fs::File::from(ready_r).read_to_string(&mut msg);
    let ns = match got {
        Ok(_) if msg == "ok" => sys::open(
            &CString::new(format!("/proc/{pid}/ns/mnt")).expect("no NUL"),
            libc::O_RDONLY,
        )
        .map_err(step("open the helper's mount namespace")),
        Ok(_) => Err(RootError::Helper(msg)),
        Err(e) => Err(step("read the helper's status")(e)),
    };
    drop(hold_w);
    let _ = sys::waitpid(pid);
    let shadowed = bound
        .iter()
        .filter(|p| under_per_child_tmpfs(p))
        .cloned()
        .collect();
    Ok(Root {
        mount_ns: ns?,
        grants,
        bound,
        shadowed,
    })
}

/// In the helper: a private mount namespace whose root becomes the tmpfs.
fn assemble(plan: &[(PathBuf, Kind)]) -> Result<(), RootError> {
    sys::unshare(libc::CLONE_NEWNS).map_err(step("unshare mount namespace"))?;
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(step("make / private"))?;
    // Sources are opened before the stage tmpfs covers /tmp.
    let sources: Vec<Option<OwnedFd>> = plan
        .iter()
        .map(|(p, k)| match k {
            Kind::Bind { .. } | Kind::Device { .. } => open_path(p).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let stage = Path::new("/tmp");
    sys::mount(
        Some(c"tmpfs"),
        c"/tmp",
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(c"size=1m,nr_inodes=4096,mode=0755"),
    )
    .map_err(step("mount the stage tmpfs"))?;
    for ((path, kind), source) in plan.iter().zip(&sources) {
        let target = stage.join(path.strip_prefix("/").unwrap_or(path));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(step(format!("mkdir {}", parent.display())))?;
        }
        match kind {
            Kind::Dir => std::fs::create_dir_all(&target)
                .map_err(step(format!("mkdir {}", path.display())))?,
            Kind::Link(to) => {
                if std::fs::symlink_metadata(&target).is_err() {
                    std::os::unix::fs::symlink(to, &target)
                        .map_err(step(format!("symlink {}", path.display())))?;
                }
            }
            Kind::Bind { .. } | Kind::Device { .. } => {
                if matches!(kind, Kind::Bind { dir: true }) {
                    std::fs::create_dir_all(&target)
                } else {
                    std::fs::File::create(&target).map(drop)
                }
                .map_err(step(format!("create {}", path.display())))?;
                let fd = source.as_ref().expect("opened above");
                let src =
                    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
                let dst = sys::cstring(&target).map_err(step("path"))?;
                sys::mount(Some(&src), &dst, None, libc::MS_BIND | libc::MS_REC, None)
                    .map_err(step(format!("bind {}", path.display())))?;
                let mut flags =
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID;
                if matches!(kind, Kind::Bind { .. }) {
                    flags |= libc::MS_NODEV;
                }
                sys::mount(None, &dst, None, flags, None)
                    .map_err(step(format!("make {} read-only", path.display())))?;
            }
        }
    }
    sys::chdir(c"/tmp").map_err(step("chdir to the stage"))?;
    sys::pivot_root_here().map_err(step("pivot_root"))?;
    sys::umount_detach(c".").map_err(step("detach the old root"))?;
    sys::chdir(c"/").map_err(step("chdir /"))?;
    sys::mount(
        None,
        c"/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .map_err(step("make the root read-only"))
}
