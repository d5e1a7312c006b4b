//! Mounting a workspace inside a freshly forked child, from a
//! [`MountPlan`] the daemon computed (see `forkd_workspace::plan`).
//!
//! Two halves, around the switch into the sandbox's mount namespace:
//! - [`prepare`] runs while the child still sees the host: it opens the host
//!   directory with `openat2(RESOLVE_NO_SYMLINKS)` and checks it is the
//!   directory that was planned (device and inode), builds the mask layer
//!   (a private tmpfs holding a whiteout per `none` path), the overlay (mask,
//!   host directory, and for overlay mode the upper layer the daemon made)
//!   or a clone of the host directory, and clones the host's `write` areas
//!   (direct mode), each opened beneath the root with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`. Everything is a
//!   detached mount held by a descriptor: a symlink swapped into the host
//!   tree meanwhile fails the open (`ELOOP`), it cannot redirect a mount.
//! - [`Prepared::attach`] runs in the sandbox's namespace: it moves the base
//!   mount onto the mount point, places the binds (read-only islands and
//!   read-write areas) and opens the landlock grant paths, which the caller
//!   adds to the child's one landlock rule set.
//!
//! The new mount API (`fsopen`, `fsmount`, `open_tree`, `move_mount`,
//! `mount_setattr`) is used throughout: it works on descriptors, needs no
//! staging directory, and a clone made in the host namespace can be attached
//! in another one.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use forkd_workspace::plan::{open_beneath, open_root};
pub use forkd_workspace::MountPlan;
use forkd_workspace::{Access, Kind, Mode};
use landlock::{Access as _, AccessFs, BitFlags, ABI};
use rustix::fs::{FileType, Mode as FsMode, OFlags, ResolveFlags};
use rustix::mount::{
    fsconfig_create, fsconfig_set_fd, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen,
    move_mount, open_tree, FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags,
    OpenTreeFlags,
};

#[derive(Debug, thiserror::Error)]
#[error("workspace: {step}: {source}")]
pub struct WorkspaceError {
    step: String,
    #[source]
    source: io::Error,
}

fn at(step: impl Into<String>) -> impl FnOnce(io::Error) -> WorkspaceError {
    move |source| WorkspaceError {
        step: step.into(),
        source,
    }
}

fn errno(step: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> WorkspaceError {
    let step = step.into();
    move |e| WorkspaceError {
        step,
        source: e.into(),
    }
}

fn other(step: impl Into<String>, msg: impl Into<String>) -> WorkspaceError {
    WorkspaceError {
        step: step.into(),
        source: io::Error::other(msg.into()),
    }
}

/// Detached mounts and descriptors made in the host namespace.
pub struct Prepared<'p> {
    plan: &'p MountPlan,
    base: OwnedFd,
    /// Clones of host `write` areas, by bind index (direct mode).
    host_clones: Vec<(usize, OwnedFd)>,
}

const CLONE: OpenTreeFlags = OpenTreeFlags::OPEN_TREE_CLONE
    .union(OpenTreeFlags::OPEN_TREE_CLOEXEC)
    .union(OpenTreeFlags::AT_EMPTY_PATH);

/// `mount_setattr(fd, "", AT_EMPTY_PATH, set/clear)` on one detached mount.
fn mount_setattr(fd: BorrowedFd<'_>, set: u64, clear: u64) -> io::Result<()> {
    mount_setattr_ns(fd, set, clear, None)
}

/// [`mount_setattr`] with a user namespace (`MOUNT_ATTR_IDMAP`).
fn mount_setattr_ns(
    fd: BorrowedFd<'_>,
    set: u64,
    clear: u64,
    userns: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: userns.map_or(0, |ns| ns.as_raw_fd() as u64),
    };
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from `attr`,
    // a live, initialized repr(C) struct matching the kernel's `mount_attr`
    // (MOUNT_ATTR_SIZE_VER0); the path is a NUL-terminated empty string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const ATTR_RDONLY: u64 = MountAttrFlags::MOUNT_ATTR_RDONLY.bits() as u64;
const ATTR_SAFE: u64 =
    (MountAttrFlags::MOUNT_ATTR_NOSUID.bits() | MountAttrFlags::MOUNT_ATTR_NODEV.bits()) as u64;

fn set_writable(fd: BorrowedFd<'_>, write: bool) -> io::Result<()> {
    if write {
        mount_setattr(fd, ATTR_SAFE, ATTR_RDONLY)
    } else {
        mount_setattr(fd, ATTR_SAFE | ATTR_RDONLY, 0)
    }
}

const ATTR_IDMAP: u64 = MountAttrFlags::MOUNT_ATTR_IDMAP.bits() as u64;

/// A user namespace whose only mappings send `owner`'s uid and gid to
/// `inner` (the sandbox's uid, which is also its gid): as the idmap of a
/// mount, files of `owner` appear as `inner`'s, files `inner` creates are
/// written as `owner`'s, and every other id (host root included) appears
/// as the overflow id, which the sandbox's uid is not.
///
/// `mounter`: the layers of an overlay also need host root (the overlay's
/// mounter, which makes its work directory, whiteouts and copy-up files
/// with its own credentials) mapped: root stays root (or, when `owner` is
/// root, root's vfs id 0 is stored as `inner`, the one host id that is
/// then free). So root's files appear as root's, still not the sandbox's.
///
/// The kernel offers no way to make a user namespace without a process in
/// it: a helper is cloned into a new one with `CLONE_VM | CLONE_VFORK` (no
/// copy of this large process's page tables; this process waits until the
/// helper is gone) on a small stack of its own, and returns at once, so this
/// process resumes with a zombie whose credentials (and so its user
/// namespace) live until it is reaped: its maps are written from here (root
/// in the parent namespace), its namespace is opened, and it is reaped. No
/// signal, and no wait for a helper to be scheduled again (a kill-and-reap
/// version had a 2-3 ms tail on a loaded machine). This process is pid 1 of
/// a new pid namespace while the host's /proc is mounted: the helper's pid
/// there comes from its pidfd's fdinfo.
fn idmap_userns(owner: (u32, u32), inner: u32, mounter: bool) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    extern "C" fn helper(_: *mut libc::c_void) -> libc::c_int {
        0
    }
    let mut stack = vec![0u8; 16 * 1024];
    let mut pidfd: libc::c_int = -1;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_PIDFD
        | libc::CLONE_VM
        | libc::CLONE_VFORK
        | libc::SIGCHLD;
    // SAFETY: glibc's clone runs `helper` on the top of `stack` (16-byte
    // aligned, alive until clone returns: CLONE_VFORK suspends this process
    // until the helper has exited), and `helper` touches no memory but that
    // stack. `pidfd` is a live c_int the kernel writes the pidfd into
    // (CLONE_PIDFD uses the parent_tid argument).
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = top.sub(top as usize % 16);
        libc::clone(
            helper,
            top.cast(),
            flags,
            std::ptr::null_mut(),
            &mut pidfd as *mut libc::c_int,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stack);
    // SAFETY: clone succeeded with CLONE_PIDFD: `pidfd` is a new descriptor
    // owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let made = (|| {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
        let host_pid: i32 = info
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|p| p.trim().parse().ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| io::Error::other("no pid in the helper's pidfd fdinfo"))?;
        std::fs::write(
            format!("/proc/{host_pid}/uid_map"),
            id_map(owner.0, inner, mounter),
        )?;
        std::fs::write(
            format!("/proc/{host_pid}/gid_map"),
            id_map(owner.1, inner, mounter),
        )?;
        let ns = std::fs::File::open(format!("/proc/{host_pid}/ns/user"))?;
        Ok(OwnedFd::from(ns))
    })();
    // SAFETY: reaps our own (exited) child by its pidfd; `info` is a zeroed
    // siginfo_t the kernel fills in (all-zero is a valid siginfo_t).
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        );
    }
    made
}

/// One uid or gid map of [`idmap_userns`]: `owner` (on disk) is `inner`
/// (to the sandbox); with `mounter`, host id 0 is also mapped, to 0 on disk,
/// or to `inner` on disk when `owner` is 0 itself (neither side of a map
/// may repeat an id).
fn id_map(owner: u32, inner: u32, mounter: bool) -> String {
    let mut map = format!("{owner} {inner} 1\n");
    if mounter && inner != 0 {
        let disk = if owner == 0 { inner } else { 0 };
        if disk != owner {
            map.push_str(&format!("{disk} 0 1\n"));
        }
    }
    map
}

/// Idmaps one detached mount with `userns` (see [`idmap_userns`]).
fn idmap(fd: BorrowedFd<'_>, userns: Option<&OwnedFd>) -> io::Result<()> {
    match userns {
        Some(ns) => mount_setattr_ns(fd, ATTR_IDMAP, 0, Some(ns.as_fd())),
        None => Ok(()),
    }
}

/// Does this process run in the initial user namespace? (Overlayfs in a
/// user namespace must keep its metadata in `user.*` xattrs.)
fn in_initial_userns() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
        .unwrap_or(true)
}

/// The mask layer: a small tmpfs with a whiteout for each hidden path.
fn mask_layer(hidden: &[String]) -> Result<OwnedFd, WorkspaceError> {
    let fs =
        fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(errno("open tmpfs for the mask"))?;
    fsconfig_set_string(&fs, "size", "1m").map_err(errno("size the mask"))?;
    fsconfig_set_string(&fs, "mode", "0755").map_err(errno("mode of the mask"))?;
    fsconfig_create(&fs).map_err(errno("create the mask"))?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(errno("mount the mask"))?;
    for path in hidden {
        let comps: Vec<&str> = path.split('/').collect();
        let (name, parents) = comps
            .split_last()
            .ok_or_else(|| other("mask", "empty hidden path"))?;
        let mut dir = open_beneath(&mnt, "", OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(at("open the mask"))?;
        for p in parents {
            match rustix::fs::mkdirat(&dir, *p, FsMode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(errno(format!("mask directory for {path}"))(e)),
            }
            dir = open_beneath(&dir, p, OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(at(format!("mask directory for {path}")))?;
        }
        // A 0/0 character device is overlayfs' whiteout: the lower entry
        // of that name does not exist in the merged view.
        rustix::fs::mknodat(
            &dir,
            *name,
            FileType::CharacterDevice,
            FsMode::from_raw_mode(0),
            0,
        )
        .map_err(errno(format!("whiteout for {path}")))?;
    }
    Ok(mnt)
}

/// Host half: runs in the child before it enters the sandbox's mount
/// namespace, with the host still visible and its capabilities intact.
pub fn prepare(plan: &MountPlan) -> Result<Prepared<'_>, WorkspaceError> {
    let root =
        open_root(&plan.host_root).map_err(|e| other("open the host directory", e.to_string()))?;
    let st = rustix::fs::fstat(&root).map_err(errno("stat the host directory"))?;
    if st.st_dev != plan.root_dev || st.st_ino != plan.root_ino {
        return Err(other(
            "open the host directory",
            format!(
                "{} was replaced after the request was planned; retry",
                plan.host_root.display()
            ),
        ));
    }
    let root_write = plan.root_mode == Mode::Write;
    // The host mounts the sandbox may write, idmapped to the requester.
    let userns = match (plan.owner, plan.idmap_to) {
        (Some(owner), Some(inner)) => Some(
            idmap_userns(owner, inner, plan.kind == Kind::Overlay)
                .map_err(at("make the user namespace of the workspace's idmap"))?,
        ),
        _ => None,
    };
    let base = if plan.base_is_overlay() {
        let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(errno("open overlayfs"))?;
        if !in_initial_userns() {
            fsconfig_set_flag(&fs, "userxattr").map_err(errno("overlay userxattr"))?;
        }
        let mask = if plan.hidden.is_empty() {
            None
        } else {
            Some(mask_layer(&plan.hidden)?)
        };
        if let Some(mask) = &mask {
            fsconfig_set_fd(&fs, "lowerdir+", mask).map_err(errno("overlay mask layer"))?;
        }
        // The host layer is idmapped too (overlayfs cannot be idmapped
        // itself, EINVAL; 6.18 takes idmapped layers), so the requester's
        // files read as the sandbox's.
        let idmapped_root = match &userns {
            Some(ns) => {
                let clone =
                    open_tree(&root, "", CLONE).map_err(errno("clone the host directory"))?;
                idmap(clone.as_fd(), Some(ns)).map_err(at("idmap the host directory"))?;
                Some(clone)
            }
            None => None,
        };
        let host_layer = idmapped_root.as_ref().map_or(root.as_fd(), AsFd::as_fd);
        fsconfig_set_fd(&fs, "lowerdir+", host_layer).map_err(errno("overlay host layer"))?;
        // The upper layer's idmapped clone: held until the overlay is
        // made (closing a detached mount's last descriptor dissolves it).
        let mut upper_clone = None;
        if plan.kind == Kind::Overlay {
            let upper = plan
                .upper
                .as_ref()
                .ok_or_else(|| other("overlay", "no upper directory in the plan"))?;
            // The daemon's path (often `/proc/<daemon>/fd/<n>`, a detached
            // tmpfs: a magic link by design), so opened as given.
            let layer = rustix::fs::open(
                upper,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                FsMode::empty(),
            )
            .map_err(errno("open the overlay's upper layer"))?;
            // With an idmap, a clone of the layer idmapped as the lower is:
            // what the sandbox's uid writes is stored as the requester's
            // (upper and work stay on one mount, as overlayfs requires).
            if let Some(ns) = &userns {
                let clone = open_tree(&layer, "", CLONE)
                    .map_err(errno("clone the overlay's upper layer"))?;
                idmap(clone.as_fd(), Some(ns)).map_err(at("idmap the upper layer"))?;
                upper_clone = Some(clone);
            }
            let layer = upper_clone.as_ref().map_or(layer.as_fd(), AsFd::as_fd);
            let open_dir = |name: &str| {
                rustix::fs::openat(
                    layer,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    FsMode::empty(),
                )
                .map_err(errno(format!("open the overlay's {name} directory")))
            };
            let up = open_dir("upper")?;
            let work = open_dir("work")?;
            fsconfig_set_fd(&fs, "upperdir", &up).map_err(errno("overlay upper layer"))?;
            fsconfig_set_fd(&fs, "workdir", &work).map_err(errno("overlay work directory"))?;
            // A plain upper tree: renamed directories are copied, not
            // redirected, and no metadata-only copies, so the delta is
            // exactly the files it holds.
            for (k, v) in [
                ("redirect_dir", "off"),
                ("metacopy", "off"),
                ("index", "off"),
            ] {
                fsconfig_set_string(&fs, k, v).map_err(errno(format!("overlay {k}={v}")))?;
            }
        }
        fsconfig_create(&fs).map_err(errno("create the overlay"))?;
        drop(upper_clone);
        let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
        if plan.kind == Kind::Direct || !root_write {
            attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
        }
        fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(errno("mount the overlay"))?
    } else {
        let base = open_tree(&root, "", CLONE).map_err(errno("clone the host directory"))?;
        set_writable(base.as_fd(), root_write).map_err(at("set the workspace's mount flags"))?;
        idmap(base.as_fd(), userns.as_ref()).map_err(at("idmap the host directory"))?;
        base
    };
    let mut host_clones = Vec::new();
    for (i, bind) in plan.binds.iter().enumerate().filter(|(_, b)| b.from_host) {
        let fd = open_beneath(&root, &bind.path, OFlags::PATH)
            .map_err(at(format!("open `{}` in the host directory", bind.path)))?;
        let clone = open_tree(&fd, "", CLONE).map_err(errno(format!("clone `{}`", bind.path)))?;
        set_writable(clone.as_fd(), bind.write)
            .map_err(at(format!("mount flags of `{}`", bind.path)))?;
        idmap(clone.as_fd(), userns.as_ref()).map_err(at(format!("idmap `{}`", bind.path)))?;
        host_clones.push((i, clone));
    }
    Ok(Prepared {
        plan,
        base,
        host_clones,
    })
}

/// Opens `rel` beneath `dir` inside the sandbox: no symlinks, no `..` out,
/// but crossing the binds placed so far.
fn open_inside(dir: impl AsFd, rel: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    Ok(rustix::fs::openat2(
        dir,
        rel,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        FsMode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?)
}

fn open_mount_point(path: &str) -> Result<OwnedFd, WorkspaceError> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FsMode::empty(),
    )
    .map_err(errno(format!("open the mount point {path}")))
}

/// The landlock rights of a grant.
fn rights(access: Access, abi: ABI) -> BitFlags<AccessFs> {
    match access {
        // No device nodes (useless on nodev mounts; and a 0/0 character
        // device is an overlayfs whiteout, which needs no CAP_MKNOD).
        Access::Full => AccessFs::from_all(abi) & !(AccessFs::MakeChar | AccessFs::MakeBlock),
        Access::List => AccessFs::ReadDir.into(),
        Access::ListWrite => {
            AccessFs::ReadDir
                | AccessFs::MakeReg
                | AccessFs::MakeDir
                | AccessFs::MakeSym
                | AccessFs::RemoveFile
                | AccessFs::RemoveDir
        }
        Access::File => AccessFs::from_file(abi),
    }
}

impl Prepared<'_> {
    /// Sandbox half: mounts the workspace at its mount point in the current
    /// (the sandbox's) mount namespace and returns the landlock rules for it.
    pub fn attach(
        self,
        abi: ABI,
        landlock_abi: i32,
    ) -> Result<Vec<(OwnedFd, BitFlags<AccessFs>)>, WorkspaceError> {
        let plan = self.plan;
        if landlock_abi < 1 && plan.grants.iter().any(|g| g.access != Access::Full) {
            return Err(other(
                "view",
                "`view` paths need landlock, which this kernel does not offer; use read or none",
            ));
        }
        let mp = plan.mount_point.as_str();
        if mp != forkd_workspace::DEFAULT_MOUNT_POINT {
            std::fs::create_dir_all(mp).map_err(at(format!("create the mount point {mp}")))?;
        }
        move_mount(
            &self.base,
            "",
            rustix::fs::CWD,
            mp,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(errno(format!("mount the workspace at {mp}")))?;
        drop(self.base);
        // Clones of the base come first: a bind of the host's root placed
        // later would hide the base from path lookups.
        let mut base_root = open_mount_point(mp)?;
        let mut sources: Vec<Option<OwnedFd>> = Vec::with_capacity(plan.binds.len());
        let mut host = self.host_clones.into_iter().peekable();
        for (i, bind) in plan.binds.iter().enumerate() {
            if host.peek().is_some_and(|(j, _)| *j == i) {
                sources.push(host.next().map(|(_, fd)| fd));
                continue;
            }
            let fd = open_inside(&base_root, &bind.path, OFlags::PATH)
                .map_err(at(format!("open `{}` in the workspace", bind.path)))?;
            let clone =
                open_tree(&fd, "", CLONE).map_err(errno(format!("clone `{}`", bind.path)))?;
            set_writable(clone.as_fd(), bind.write)
                .map_err(at(format!("mount flags of `{}`", bind.path)))?;
            sources.push(Some(clone));
        }
        for (bind, source) in plan.binds.iter().zip(sources) {
            let source = source.ok_or_else(|| other("bind", "missing source"))?;
            let target = open_inside(&base_root, &bind.path, OFlags::PATH)
                .map_err(at(format!("open `{}` in the workspace", bind.path)))?;
            move_mount(
                &source,
                "",
                &target,
                "",
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
            )
            .map_err(errno(format!("mount `{}`", bind.path)))?;
            if bind.path.is_empty() {
                // A mount on the mount point itself: look it up again.
                base_root = open_mount_point(mp)?;
            }
        }
        let top = open_mount_point(mp)?;
        plan.grants
            .iter()
            .map(|g| {
                let fd = open_inside(&top, &g.path, OFlags::PATH)
                    .map_err(at(format!("open `{}` for landlock", g.path)))?;
                Ok((fd, rights(g.access, abi)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::id_map;

    #[test]
    fn overlay_idmaps_keep_the_overlays_mounter_mapped() {
        // Direct mode: the requester only.
        assert_eq!(id_map(1000, 5000, false), "1000 5000 1\n");
        // Overlay layers: host root stays root on disk.
        assert_eq!(id_map(1000, 5000, true), "1000 5000 1\n0 0 1\n");
        // A root requester: root's vfs id is stored as the sandbox's uid.
        assert_eq!(id_map(0, 5000, true), "0 5000 1\n5000 0 1\n");
    }
}
