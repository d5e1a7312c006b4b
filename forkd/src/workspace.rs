//! Workspaces on the daemon's side: which host directories a request may
//! mount (named workspaces from the configuration; ad-hoc paths beneath
//! `workspace_roots` that the requesting uid can access itself), the mount
//! plan (computed on a blocking thread, before the child is forked), the
//! overlay's upper layer and the delta export. The child mounts the plan
//! (`forkd_zygote::workspace`); see docs/workspaces.md.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use forkd_ipc::{ErrorCode, ErrorReply, WorkspaceMode, WorkspaceRequest};
use forkd_workspace::{Kind, Mode, MountPlan, Rules};
use rustix::fs::OFlags;
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
    MountAttrFlags,
};

use crate::config::{Config, NamedWorkspace};

/// The workspace part of the configuration, copied into admission.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    workspaces: std::collections::BTreeMap<String, NamedWorkspace>,
    roots: Vec<PathBuf>,
    /// Where a rootless daemon keeps overlay upper layers.
    dir: PathBuf,
}

impl Policy {
    pub fn from_config(config: &Config) -> Policy {
        let dir = config.workspace_dir.clone().unwrap_or_else(|| {
            let socket = config
                .socket
                .clone()
                .unwrap_or_else(forkd_ipc::client::default_socket_path);
            socket
                .parent()
                .unwrap_or(Path::new("/tmp"))
                .join("workspaces")
        });
        Policy {
            workspaces: config.workspaces.clone(),
            roots: config.workspace_roots.clone(),
            dir,
        }
    }
}

fn refused(message: String) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::PermissionDenied,
        message,
    }
}

fn invalid(message: String) -> ErrorReply {
    ErrorReply {
        code: ErrorCode::InvalidRequest,
        message,
    }
}

/// Who asks (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// A request's workspace after the checks, ready to plan.
#[derive(Debug)]
struct Checked {
    host: PathBuf,
    rules: Rules,
    kind: Kind,
    mount_point: String,
}

fn check(
    config: &Policy,
    req: &WorkspaceRequest,
    who: Option<Requester>,
) -> Result<Checked, ErrorReply> {
    let kind = match req.mode {
        WorkspaceMode::Direct => Kind::Direct,
        WorkspaceMode::Overlay => Kind::Overlay,
    };
    if req.export_delta && kind != Kind::Overlay {
        return Err(invalid(
            "workspace.export_delta needs mode overlay: a direct workspace writes into the host directory, there is no delta".into(),
        ));
    }
    let mount_point = req
        .mount_point
        .clone()
        .unwrap_or_else(|| forkd_workspace::DEFAULT_MOUNT_POINT.to_string());
    let mp = Path::new(&mount_point);
    let clean = mp.is_absolute()
        && mp
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
        && mount_point.len() < 256;
    let under_tmp = mp.starts_with("/tmp") && mp != Path::new("/tmp");
    if !clean || !(mount_point == forkd_workspace::DEFAULT_MOUNT_POINT || under_tmp) {
        return Err(invalid(format!(
            "workspace.mount_point `{mount_point}` must be /workspace or a path below /tmp (the sandbox's root is read-only elsewhere)"
        )));
    }
    let default: Mode = match &req.default_mode {
        Some(m) => m
            .parse()
            .map_err(|e| invalid(format!("workspace.default_mode: {e}")))?,
        None => Mode::Read,
    };
    let own =
        Rules::parse(&req.rules, default).map_err(|e| invalid(format!("workspace.rules: {e}")))?;
    let (host, rules) = match (&req.name, &req.path) {
        (Some(name), None) => {
            let ws = config.workspaces.get(name).ok_or_else(|| {
                invalid(format!(
                    "no workspace named `{name}`; configured: {}",
                    config.workspaces.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            if let (Some(allowed), Some(who)) = (&ws.allowed_uids, who) {
                if !allowed.contains(&who.uid) {
                    return Err(refused(format!(
                        "uid {} may not use workspace `{name}`; ask the operator to add it to workspaces.{name}.allowed_uids",
                        who.uid
                    )));
                }
            }
            let mode: Mode = ws.default_mode.parse().map_err(|e| invalid(format!("{e}")))?;
            let ceiling = Rules::parse(&ws.rules, mode).map_err(|e| invalid(format!("{e}")))?;
            (ws.path.clone(), own.with_ceiling(ceiling))
        }
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            check_ad_hoc(config, &path, who, kind, &own)?;
            (path, own)
        }
        _ => {
            return Err(invalid(
                "workspace needs exactly one of `name` (a configured workspace) and `path` (a host directory)".into(),
            ))
        }
    };
    if mount_point != forkd_workspace::DEFAULT_MOUNT_POINT && rules.may_view() {
        return Err(invalid(format!(
            "workspace.mount_point `{mount_point}` is below /tmp, where the sandbox may read everything: `view` rules need /workspace"
        )));
    }
    Ok(Checked {
        host,
        rules,
        kind,
        mount_point,
    })
}

fn check_ad_hoc(
    config: &Policy,
    path: &Path,
    who: Option<Requester>,
    kind: Kind,
    rules: &Rules,
) -> Result<(), ErrorReply> {
    if !path.is_absolute() {
        return Err(invalid(format!(
            "workspace.path `{}` must be absolute",
            path.display()
        )));
    }
    if config.roots.is_empty() {
        return Err(refused(format!(
            "this forkd allows no ad-hoc workspace paths (`{}`): use a workspace the operator configured by name, or ask the operator to add a parent directory to workspace_roots",
            path.display()
        )));
    }
    let real = std::fs::canonicalize(path).map_err(|e| {
        invalid(format!(
            "workspace.path `{}`: {e}; it must be an existing directory",
            path.display()
        ))
    })?;
    if real != path {
        return Err(invalid(format!(
            "workspace.path `{}` goes through a symlink or `..` (it is `{}`); give the real path",
            path.display(),
            real.display()
        )));
    }
    let inside = config
        .roots
        .iter()
        .any(|root| std::fs::canonicalize(root).is_ok_and(|r| real.starts_with(r)));
    if !inside {
        return Err(refused(format!(
            "workspace.path `{}` is outside the directories this forkd allows ({}); ask the operator to add it to workspace_roots",
            path.display(),
            config
                .roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let Some(who) = who else { return Ok(()) };
    // Writes reach the host only in direct mode: then the requester must
    // be able to write there too.
    let write = kind == Kind::Direct && rules.may_write();
    if let Err(e) = requester_can_access(&real, who, write) {
        return Err(refused(format!(
            "uid {} cannot {} `{}` itself ({e}), so forkd will not mount it for you",
            who.uid,
            if write { "read and write" } else { "read" },
            path.display()
        )));
    }
    Ok(())
}

/// The peer's supplementary groups, from `/proc/<pid>/status`.
fn peer_groups(pid: Option<i32>) -> Vec<u32> {
    let Some(pid) = pid else { return Vec::new() };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// Asks the kernel whether the requester could access `path` (search every
/// component, read (and write) the directory), on a thread of its own that
/// takes the requester's fsuid, fsgid and groups (per-thread on Linux; a
/// root thread that changes its fsuid also loses its file capabilities).
fn requester_can_access(path: &Path, who: Requester, write: bool) -> std::io::Result<()> {
    if who.uid == 0 {
        return Ok(());
    }
    let groups = peer_groups(who.pid);
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    std::thread::spawn(move || -> std::io::Result<()> {
        // SAFETY: raw syscalls (not glibc's process-wide setxid wrappers)
        // change only this thread's credentials; the thread ends right after.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_setfsgid, who.gid);
            libc::syscall(libc::SYS_setfsuid, who.uid);
            if libc::syscall(libc::SYS_setfsuid, -1i32) != who.uid as libc::c_long {
                return Err(std::io::Error::other("cannot take the requester's uid"));
            }
        }
        let mut mode = libc::R_OK | libc::X_OK;
        if write {
            mode |= libc::W_OK;
        }
        // SAFETY: a valid NUL-terminated path; AT_EACCESS checks with this
        // thread's fsuid/fsgid/groups.
        if unsafe { libc::faccessat(libc::AT_FDCWD, cpath.as_ptr(), mode, libc::AT_EACCESS) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("access check thread panicked"))?
}

static NEXT: AtomicU64 = AtomicU64::new(1);

/// Plans most recently made, with the directory stamps that prove them
/// current: a request for the same directory and rules reuses the plan after
/// re-checking only the directories it listed (a `stat` each) instead of
/// walking the tree again.
type PlanCache = std::sync::Mutex<Vec<(String, MountPlan, forkd_workspace::Stamps)>>;
static PLANS: PlanCache = std::sync::Mutex::new(Vec::new());
const PLAN_CACHE_SIZE: usize = 32;
/// Largest plan (as JSON) sent to a zygote.
const MAX_PLAN_BYTES: usize = 128 * 1024;

fn cached_plan(checked: &Checked) -> Result<MountPlan, ErrorReply> {
    let key = format!(
        "{}\0{:?}\0{:?}\0{}",
        checked.host.display(),
        checked.rules,
        checked.kind,
        checked.mount_point
    );
    let hit = PLANS.lock().ok().and_then(|c| {
        c.iter()
            .find(|(k, ..)| *k == key)
            .map(|(_, p, s)| (p.clone(), s.clone()))
    });
    if let Some((plan, stamps)) = hit {
        if stamps.still_valid() {
            return Ok(plan);
        }
    }
    let (plan, stamps) = forkd_workspace::plan_stamped(
        &checked.host,
        &checked.rules,
        checked.kind,
        &checked.mount_point,
    )
    .map_err(|e| invalid(format!("workspace: {e}")))?;
    // The plan reaches the zygote inside one SOCK_SEQPACKET message, which
    // the default socket buffer (net.core.wmem_default, 208 KiB) bounds.
    let size = serde_json::to_vec(&plan)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_PLAN_BYTES {
        return Err(invalid(format!(
            "workspace: the rules split {} into {} mounts, whiteouts and landlock grants ({} KiB planned, at most {} KiB); use fewer or broader rules (each `view` directory grants every readable entry beside it separately)",
            checked.host.display(),
            plan.items(),
            size / 1024,
            MAX_PLAN_BYTES / 1024
        )));
    }
    if let Ok(mut c) = PLANS.lock() {
        c.retain(|(k, ..)| *k != key);
        if !stamps.racy() {
            if c.len() >= PLAN_CACHE_SIZE {
                c.remove(0);
            }
            c.push((key, plan.clone(), stamps));
        }
    }
    Ok(plan)
}

/// A workspace ready for a child: its plan, and for overlay mode the upper
/// layer, released when this is dropped.
pub struct Ready {
    pub plan: MountPlan,
    upper: Option<Upper>,
    /// Overlay mode whose upper layer is not made yet (a warm child brings
    /// its own): where a rootless daemon makes it, and its size.
    pending_upper: Option<(PathBuf, u64)>,
    /// Who asked (uid, gid): warm children are kept per requester.
    pub(crate) requester: Option<(u32, u32)>,
}

/// The overlay's upper layer. As root: a tmpfs of the sandbox's scratch
/// size, mounted nowhere (`fsmount` without `move_mount`), held by this
/// descriptor only: no mount table ever lists it, and it is gone when the
/// descriptor and the sandbox's overlay are, even if the daemon crashes.
/// The child reaches it through `/proc/<daemon>/fd/<fd>`. Rootless (no
/// `fsopen` for the daemon): a plain directory, removed afterwards.
enum Upper {
    Detached(OwnedFd),
    Dir(PathBuf),
}

impl Drop for Upper {
    fn drop(&mut self) {
        if let Upper::Dir(dir) = self {
            let dir = std::mem::take(dir);
            // Off the runtime: removal walks the layer.
            std::thread::spawn(move || std::fs::remove_dir_all(dir));
        }
    }
}

impl Upper {
    /// The path the plan carries: a directory holding `upper/` and `work/`.
    fn path(&self) -> PathBuf {
        match self {
            Upper::Detached(fd) => PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                fd.as_raw_fd()
            )),
            Upper::Dir(d) => d.clone(),
        }
    }
}

/// Checks, plans and (overlay) makes the upper layer, on a blocking thread.
pub async fn prepare(
    config: &Policy,
    req: &WorkspaceRequest,
    who: Option<Requester>,
    scratch_bytes: u64,
) -> Result<Ready, ErrorReply> {
    let ready = plan_request(config, req, who, scratch_bytes).await?;
    ready.with_upper().await
}

/// Checks and plans (on a blocking thread), for the requesting peer, now;
/// an overlay's upper layer is left to [`Ready::with_upper`] (or comes with
/// a warm child, `crate::ws_warm`).
pub async fn plan_request(
    config: &Policy,
    req: &WorkspaceRequest,
    who: Option<Requester>,
    scratch_bytes: u64,
) -> Result<Ready, ErrorReply> {
    let checked = check(config, req, who)?;
    let base = config.dir.clone();
    tokio::task::spawn_blocking(move || -> Result<Ready, ErrorReply> {
        let mut plan = cached_plan(&checked)?;
        // A root daemon's sandbox runs as its own uid and acts on the
        // workspace as the requester through idmapped mounts (zygote
        // workspace.rs): the host directory in direct mode, the host layer
        // and the upper layer in overlay mode (its files are stored as the
        // requester's, docs/workspaces.md).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            plan.owner = who.map(|w| (w.uid, w.gid));
        }
        let pending_upper = (checked.kind == Kind::Overlay).then_some((base, scratch_bytes));
        Ok(Ready {
            plan,
            upper: None,
            pending_upper,
            requester: who.map(|w| (w.uid, w.gid)),
        })
    })
    .await
    .map_err(|e| ErrorReply {
        code: ErrorCode::Internal,
        message: format!("workspace planning: {e}"),
    })?
}

impl Ready {
    /// Whether this workspace's child may come from warm children made for
    /// it: direct mode, or overlay mode before its upper layer was made.
    pub(crate) fn warmable(&self) -> bool {
        self.upper.is_none()
    }

    /// The same workspace without an upper layer (what warm children are
    /// keyed on and made from).
    pub(crate) fn blank(&self) -> Ready {
        let mut plan = self.plan.clone();
        plan.upper = None;
        Ready {
            plan,
            upper: None,
            pending_upper: self.pending_upper.clone(),
            requester: self.requester,
        }
    }

    /// Makes the overlay's upper layer if it is still to be made (blocking:
    /// a rootless daemon creates directories).
    pub(crate) fn fill_upper(&mut self) -> Result<(), ErrorReply> {
        let Some((base, scratch_bytes)) = self.pending_upper.take() else {
            return Ok(());
        };
        let failed = |e: std::io::Error| ErrorReply {
            code: ErrorCode::SpawnFailed,
            message: format!("cannot make the overlay's upper layer: {e}"),
        };
        let upper = make_upper(&base, scratch_bytes).map_err(failed)?;
        if let (Some(_), Upper::Detached(layer)) = (self.plan.owner, &upper) {
            like_host_root(&self.plan, layer).map_err(failed)?;
        }
        self.plan.upper = Some(upper.path());
        self.upper = Some(upper);
        Ok(())
    }

    /// [`Ready::fill_upper`] on a blocking thread.
    pub async fn with_upper(mut self) -> Result<Ready, ErrorReply> {
        if self.pending_upper.is_none() {
            return Ok(self);
        }
        tokio::task::spawn_blocking(move || self.fill_upper().map(|()| self))
            .await
            .map_err(|e| ErrorReply {
                code: ErrorCode::Internal,
                message: format!("workspace upper layer: {e}"),
            })?
    }
}

/// Gives a fresh upper layer's root the owner and mode of the host
/// directory: the overlay's root takes them from the upper layer, and
/// through the idmap the requester's directory is the sandbox's own.
fn like_host_root(plan: &MountPlan, layer: &OwnedFd) -> std::io::Result<()> {
    let root = forkd_workspace::plan::open_root(&plan.host_root).map_err(std::io::Error::other)?;
    let st = rustix::fs::fstat(&root)?;
    if st.st_dev != plan.root_dev || st.st_ino != plan.root_ino {
        return Err(std::io::Error::other(format!(
            "{} was replaced after the request was planned; retry",
            plan.host_root.display()
        )));
    }
    let up = open_upper_dir(layer)?;
    take_owner_and_mode(&up, &st)
}

/// Gives `fd` the owner, group and permission bits (setuid/setgid/sticky
/// included) that `st` records.
fn take_owner_and_mode(fd: impl rustix::fd::AsFd, st: &rustix::fs::Stat) -> std::io::Result<()> {
    rustix::fs::fchown(
        &fd,
        Some(rustix::fs::Uid::from_raw(st.st_uid)),
        Some(rustix::fs::Gid::from_raw(st.st_gid)),
    )?;
    rustix::fs::fchmod(
        &fd,
        rustix::fs::Mode::from_raw_mode(st.st_mode) & rustix::fs::Mode::from_bits_truncate(0o7777),
    )?;
    Ok(())
}

/// Makes the upper layer (see [`Upper`]) with `upper/` and `work/` in it.
/// The `upper` directory of a detached layer (its `upper` and `work` pair),
/// never through a symlink.
fn open_upper_dir(layer: impl rustix::fd::AsFd) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        layer,
        "upper",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

fn make_upper(base: &Path, scratch_bytes: u64) -> std::io::Result<Upper> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
        fsconfig_set_string(&fs, "size", scratch_bytes.to_string())?;
        fsconfig_set_string(&fs, "mode", "0700")?;
        fsconfig_create(&fs)?;
        let mnt = fsmount(
            &fs,
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
        )?;
        for d in ["upper", "work"] {
            rustix::fs::mkdirat(&mnt, d, rustix::fs::Mode::from_raw_mode(0o755))?;
        }
        return Ok(Upper::Detached(mnt));
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(base)?;
    let dir = base.join(format!(
        "ws-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let upper = Upper::Dir(dir.clone());
    std::fs::create_dir(dir.join("upper"))?;
    std::fs::create_dir(dir.join("work"))?;
    Ok(upper)
}

impl Ready {
    /// The workspace of a branch of the session holding this one: the same
    /// plan (host directory, hidden paths, mounts) over a new upper layer
    /// holding a copy of this one's at this instant (docs/branch.md,
    /// "Workspaces"). The branch's writes land in its own layer; the host
    /// directory stays the lower layer of both, never written.
    pub async fn with_copied_layer(&self, scratch_bytes: u64) -> Result<Ready, ErrorReply> {
        let failed = |e: std::io::Error| ErrorReply {
            code: ErrorCode::SpawnFailed,
            message: format!("cannot copy the workspace's changes for the branch: {e}"),
        };
        let Some(Upper::Detached(from)) = &self.upper else {
            return Err(invalid(
                "only an overlay workspace of a root daemon can be copied for a branch".into(),
            ));
        };
        let from = open_upper_dir(from).map_err(failed)?;
        let mut plan = self.plan.clone();
        tokio::task::spawn_blocking(move || -> Result<Ready, ErrorReply> {
            let upper = make_upper(Path::new("/"), scratch_bytes).map_err(failed)?;
            let Upper::Detached(to) = &upper else {
                return Err(failed(std::io::Error::other("not a detached layer")));
            };
            let to_dir = open_upper_dir(to).map_err(failed)?;
            let mut links = Links {
                root: rustix::io::dup(&to_dir).map_err(|e| failed(e.into()))?,
                first: std::collections::HashMap::new(),
            };
            copy_layer(&from, &to_dir, Path::new(""), &mut links, 0).map_err(failed)?;
            copy_attrs(&from, &to_dir).map_err(failed)?;
            plan.upper = Some(upper.path());
            Ok(Ready {
                plan,
                upper: Some(upper),
                pending_upper: None,
                requester: None,
            })
        })
        .await
        .map_err(|e| ErrorReply {
            code: ErrorCode::Internal,
            message: format!("workspace copy: {e}"),
        })?
    }
}

impl Ready {
    /// Mounts this workspace at its mount point in the mount namespace of
    /// the process `pidfd` names (a session's init; a pidfd, so a reused
    /// pid cannot redirect it) in place of the one there (a restore). A
    /// thread of its own makes the overlay while it still sees the host,
    /// then leaves the daemon's shared filesystem context (`unshare
    /// (CLONE_FS)`, which `setns` into a mount namespace needs), enters the
    /// session's mount namespace, detaches what is mounted at the mount
    /// point (without following a symlink) and attaches the new tree; the
    /// thread ends there. Only for `/workspace` (the session cannot change
    /// that path: the sandbox's root is read-only) and plans without
    /// landlock grants (`MountPlan::branchable`).
    pub async fn remount_in(&self, pidfd: OwnedFd) -> Result<(), ErrorReply> {
        if !self.plan.branchable() || self.plan.mount_point != forkd_workspace::DEFAULT_MOUNT_POINT
        {
            return Err(invalid(format!(
                "only an overlay workspace at {} without `view` rules can be put back",
                forkd_workspace::DEFAULT_MOUNT_POINT
            )));
        }
        let plan = self.plan.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(remount_thread(&plan, &pidfd));
        });
        rx.await
            .map_err(|_| std::io::Error::other("the remount thread panicked"))
            .and_then(|r| r)
            .map_err(|e| ErrorReply {
                code: ErrorCode::Internal,
                message: format!("putting the workspace back: {e}"),
            })
    }
}

/// The body of [`Ready::remount_in`]'s thread (which ends after it: its
/// filesystem context is then the session's).
fn remount_thread(plan: &MountPlan, pidfd: &OwnedFd) -> std::io::Result<()> {
    let prepared = forkd_zygote::workspace::prepare(plan).map_err(std::io::Error::other)?;
    // SAFETY: unshare and setns change only this thread's filesystem
    // context and mount namespace; the thread does nothing else afterwards.
    unsafe {
        if libc::unshare(libc::CLONE_FS) != 0
            || libc::setns(pidfd.as_raw_fd(), libc::CLONE_NEWNS) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mp = std::ffi::CString::new(plan.mount_point.as_str()).map_err(std::io::Error::other)?;
    // The stack at the mount point (a bind on the root sits on the base).
    for _ in 0..64 {
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(mp.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // nothing mounted there any more
            }
            return Err(e);
        }
    }
    prepared
        .attach(
            forkd_zygote::isolate::LANDLOCK_ABI,
            forkd_zygote::sys::landlock_abi(),
        )
        .map(drop)
        .map_err(std::io::Error::other)
}

/// Deepest directory nesting an upper layer copy follows (the copy
/// recurses on a blocking thread's stack).
const MAX_LAYER_DEPTH: usize = 256;

/// Copies one upper layer directory into another, as overlayfs reads it:
/// files, directories, symlinks, FIFOs, whiteouts (0/0 character devices),
/// hard links, owners, modes, times and xattrs (`trusted.overlay.opaque`
/// marks a directory opaque). The session may change its layer meanwhile:
/// every step is an `openat` with `O_NOFOLLOW` on a directory descriptor
/// of this layer (a tmpfs that holds no other mount), so a name swapped for
/// a symlink is skipped, never followed.
/// Hard links of a layer copy: where each multiply-linked inode was first
/// copied, as a path beneath the new layer's root (which only the daemon
/// reaches: no symlink of the session's is on that path's directories).
/// Paths, not descriptors: the session decides how many there are.
struct Links {
    root: OwnedFd,
    first: std::collections::HashMap<u64, PathBuf>,
}

fn copy_layer(
    from: &OwnedFd,
    to: &OwnedFd,
    rel: &Path,
    links: &mut Links,
    depth: usize,
) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Dir, FileType, Mode as FsMode};
    use rustix::io::Errno;
    use std::os::unix::ffi::OsStrExt;
    if depth > MAX_LAYER_DEPTH {
        return Err(std::io::Error::other(format!(
            "the workspace's changes nest deeper than {MAX_LAYER_DEPTH} directories"
        )));
    }
    let nofollow = OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for entry in Dir::read_from(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let st = match rustix::fs::statat(from, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue, // removed meanwhile
            Err(e) => return Err(e.into()),
        };
        let mode = FsMode::from_raw_mode(st.st_mode) & FsMode::from_bits_truncate(0o7777);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let src = match rustix::fs::openat(
                    from,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | nofollow,
                    FsMode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                    Err(e) => return Err(e.into()),
                };
                rustix::fs::mkdirat(to, name, FsMode::from_bits_truncate(0o700))?;
                let dst = rustix::fs::openat(
                    to,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | nofollow,
                    FsMode::empty(),
                )?;
                let sub = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
                copy_layer(&src, &dst, &sub, links, depth + 1)?;
                copy_attrs(&src, &dst)?;
            }
            FileType::RegularFile => {
                if st.st_nlink > 1 {
                    if let Some(first) = links.first.get(&st.st_ino) {
                        match rustix::fs::linkat(&links.root, first, to, name, AtFlags::empty()) {
                            Ok(()) => continue,
                            // Too deep to name: a copy of its own instead.
                            Err(Errno::NAMETOOLONG) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                let src = match rustix::fs::openat(
                    from,
                    name,
                    OFlags::RDONLY | nofollow,
                    FsMode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT | Errno::LOOP) => continue,
                    Err(e) => return Err(e.into()),
                };
                let dst = rustix::fs::openat(
                    to,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | nofollow,
                    FsMode::from_bits_truncate(0o600),
                )?;
                let mut r = std::fs::File::from(src);
                let mut w = std::fs::File::from(dst);
                std::io::copy(&mut r, &mut w)?;
                copy_attrs(&r, &w)?;
                if st.st_nlink > 1 {
                    let path = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
                    links.first.entry(st.st_ino).or_insert(path);
                }
            }
            FileType::Symlink => {
                let target = match rustix::fs::readlinkat(from, name, Vec::new()) {
                    Ok(t) => t,
                    Err(Errno::NOENT | Errno::INVAL) => continue,
                    Err(e) => return Err(e.into()),
                };
                rustix::fs::symlinkat(target.as_c_str(), to, name)?;
                rustix::fs::chownat(
                    to,
                    name,
                    Some(rustix::fs::Uid::from_raw(st.st_uid)),
                    Some(rustix::fs::Gid::from_raw(st.st_gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            // A whiteout: the lower entry of that name is deleted.
            FileType::CharacterDevice if st.st_rdev == 0 => {
                rustix::fs::mknodat(to, name, FileType::CharacterDevice, FsMode::empty(), 0)?;
                rustix::fs::chownat(
                    to,
                    name,
                    Some(rustix::fs::Uid::from_raw(st.st_uid)),
                    Some(rustix::fs::Gid::from_raw(st.st_gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            FileType::Fifo => {
                rustix::fs::mknodat(to, name, FileType::Fifo, mode, 0)?;
                rustix::fs::chownat(
                    to,
                    name,
                    Some(rustix::fs::Uid::from_raw(st.st_uid)),
                    Some(rustix::fs::Gid::from_raw(st.st_gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            // Sockets are not data; other devices cannot be made through
            // the overlay (no CAP_MKNOD, nodev).
            _ => {}
        }
    }
    Ok(())
}

/// Owner, mode, times and extended attributes of `from` onto `to` (the
/// daemon is root: `trusted.*` included, which carries overlayfs' markers).
fn copy_attrs(from: impl rustix::fd::AsFd, to: impl rustix::fd::AsFd) -> std::io::Result<()> {
    let st = rustix::fs::fstat(&from)?;
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::flistxattr(&from, &mut names) {
        Ok(n) => n,
        Err(rustix::io::Errno::RANGE) => {
            names = vec![0u8; 65536];
            rustix::fs::flistxattr(&from, &mut names)?
        }
        Err(e) => return Err(e.into()),
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 65536];
        let len = match rustix::fs::fgetxattr(&from, name.as_c_str(), &mut value) {
            Ok(len) => len,
            Err(rustix::io::Errno::NODATA) => continue, // removed meanwhile
            Err(e) => return Err(e.into()),
        };
        rustix::fs::fsetxattr(
            &to,
            name.as_c_str(),
            &value[..len],
            rustix::fs::XattrFlags::empty(),
        )?;
    }
    take_owner_and_mode(&to, &st)?;
    let ts = |s: i64, ns: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns as _,
    };
    rustix::fs::futimens(
        &to,
        &rustix::fs::Timestamps {
            last_access: ts(st.st_atime as i64, st.st_atime_nsec as i64),
            last_modification: ts(st.st_mtime as i64, st.st_mtime_nsec as i64),
        },
    )?;
    Ok(())
}

/// Largest delta returned in a result (it travels base64 in one frame).
pub const MAX_DELTA_BYTES: usize = 8 * 1024 * 1024;

impl Ready {
    /// Whether this workspace has an overlay (a delta to export).
    pub fn plan_is_overlay(&self) -> bool {
        self.upper.is_some()
    }

    /// Exports the overlay's changes as a tar (after the sandbox ended, or
    /// from a live session).
    pub async fn export(&self) -> Result<Vec<u8>, String> {
        let Some(upper) = &self.upper else {
            return Err("not an overlay workspace".into());
        };
        // The overlay keeps its metadata in user.* xattrs in a user
        // namespace (a rootless daemon's zygote), else in trusted.*.
        let userxattr = matches!(upper, Upper::Dir(_));
        let dir = match upper {
            Upper::Detached(fd) => open_upper_dir(fd),
            Upper::Dir(d) => rustix::fs::open(
                d.join("upper"),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(std::io::Error::from),
        }
        .map_err(|e| format!("open the upper layer: {e}"))?;
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            forkd_workspace::export_tar_from(&dir, &mut out, userxattr)
                .map_err(|e| e.to_string())?;
            if out.len() > MAX_DELTA_BYTES {
                return Err(format!(
                    "the delta is {} bytes, more than the {} a result can carry",
                    out.len(),
                    MAX_DELTA_BYTES
                ));
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
