//! Host-side work of a session branch (docs/branch.md): copying the parent's
//! scratch into the branch's, and checking the copied interpreter from
//! outside before the branch is handed out.
//!
//! The parent's scratch is the parent's own data, but its processes may
//! change it while it is copied: every step is an `openat` on a directory
//! descriptor with `O_NOFOLLOW`, so a path swapped for a symlink is never
//! followed out of the scratch (an absolute symlink read through
//! `/proc/<pid>/root` would otherwise resolve against the daemon's root),
//! and nothing on another filesystem (a bind mounted under /tmp) is entered.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Dir, FileType, Mode, OFlags, Timestamps};

/// Most bytes one branch's scratch copy moves (beyond it the copy fails:
/// the branch's scratch has the parent's size limit anyway).
const MAX_COPY_BYTES: u64 = 16 << 30;

fn errno(what: &str) -> impl FnOnce(rustix::io::Errno) -> io::Error + '_ {
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

/// Copies `/tmp` and `/dev/shm` of the session whose init is `parent` into
/// those of the branch whose init is `branch`, owned by the branch's uid.
pub fn copy_scratch(parent: i32, branch: i32) -> io::Result<()> {
    let owner = uid_of(branch)?;
    let mut budget = MAX_COPY_BYTES;
    for dir in ["tmp", "shm"] {
        let from = open_scratch(parent, dir)?;
        let to = open_scratch(branch, dir)?;
        let dev = rustix::fs::fstat(&from)
            .map_err(errno("stat the scratch"))?
            .st_dev;
        copy_dir(&from, &to, dev, owner, &mut budget)?;
    }
    Ok(())
}

/// `/dev/.scratch/{dir}` of the sandbox whose init is `pid`. Only the
/// `/proc/<pid>/root` magic link is followed: the stage is the sandbox's own
/// tmpfs, where its code may have put symlinks (an absolute one would
/// otherwise resolve against the daemon's root).
fn open_scratch(pid: i32, dir: &str) -> io::Result<OwnedFd> {
    let what = format!("/proc/{pid}/root/dev/.scratch/{dir}");
    let fail = |e: rustix::io::Errno| {
        io::Error::new(io::Error::from(e).kind(), format!("open {what}: {e}"))
    };
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    rustix::fs::openat2(
        &root,
        format!("dev/.scratch/{dir}"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        rustix::fs::ResolveFlags::BENEATH
            | rustix::fs::ResolveFlags::NO_SYMLINKS
            | rustix::fs::ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(fail)
}

/// The real uid of `pid`.
pub fn uid_of(pid: i32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no uid for {pid}")))
}

fn copy_dir(
    from: &OwnedFd,
    to: &OwnedFd,
    dev: u64,
    owner: u32,
    budget: &mut u64,
) -> io::Result<()> {
    let nofollow = OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for entry in Dir::read_from(from).map_err(errno("list"))? {
        let entry = entry.map_err(errno("list"))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let st = match rustix::fs::statat(from, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue, // removed meanwhile
            Err(e) => return Err(errno("stat")(e)),
        };
        if st.st_dev != dev {
            continue; // a bind mounted into the scratch, not scratch data
        }
        let mode = Mode::from_raw_mode(st.st_mode) & Mode::from_bits_truncate(0o7777);
        let times = Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec as _,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec as _,
            },
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let src = match rustix::fs::openat(
                    from,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | nofollow,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(
                        rustix::io::Errno::NOENT
                        | rustix::io::Errno::NOTDIR
                        | rustix::io::Errno::LOOP,
                    ) => continue,
                    Err(e) => return Err(errno("open a directory")(e)),
                };
                let dst = {
                    let _as = crate::sys::FsIds::enter(owner);
                    // Already there: a mount point the branch's own set-up
                    // made (an interpreter bound under /tmp); merged into.
                    match rustix::fs::mkdirat(to, name, Mode::from_bits_truncate(0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(errno("make a directory")(e)),
                    }
                    rustix::fs::openat(
                        to,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | nofollow,
                        Mode::empty(),
                    )
                    .map_err(errno("open a new directory"))?
                };
                copy_dir(&src, &dst, dev, owner, budget)?;
                finish(&dst, owner, mode, &times)?;
            }
            FileType::RegularFile => {
                let src = match rustix::fs::openat(
                    from,
                    name,
                    OFlags::RDONLY | nofollow,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP) => continue,
                    Err(e) => return Err(errno("open a file")(e)),
                };
                if !FileType::from_raw_mode(rustix::fs::fstat(&src).map_err(errno("stat"))?.st_mode)
                    .eq(&FileType::RegularFile)
                {
                    continue;
                }
                let dst = {
                    let _as = crate::sys::FsIds::enter(owner);
                    match rustix::fs::openat(
                        to,
                        name,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | nofollow,
                        Mode::from_bits_truncate(0o600),
                    ) {
                        Ok(fd) => fd,
                        // The branch's own (a mount point): it stays.
                        Err(rustix::io::Errno::EXIST) => continue,
                        Err(e) => return Err(errno("create a file")(e)),
                    }
                };
                let mut r = std::fs::File::from(src);
                let mut w = std::fs::File::from(dst);
                let n = io::copy(&mut r, &mut w)?;
                *budget = budget
                    .checked_sub(n)
                    .ok_or_else(|| io::Error::other("the scratch is larger than a copy may be"))?;
                finish(&w, owner, mode, &times)?;
            }
            FileType::Symlink => {
                let target = match rustix::fs::readlinkat(from, name, Vec::new()) {
                    Ok(t) => t,
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(errno("read a symlink")(e)),
                };
                let _as = crate::sys::FsIds::enter(owner);
                match rustix::fs::symlinkat(target.as_c_str(), to, name) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(errno("make a symlink")(e)),
                }
            }
            FileType::Fifo => {
                let _as = crate::sys::FsIds::enter(owner);
                match rustix::fs::mknodat(to, name, FileType::Fifo, mode, 0) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(errno("make a fifo")(e)),
                }
            }
            // Sockets and devices are not data: a branch has its own.
            _ => {}
        }
    }
    Ok(())
}

/// Mode and times of a copied file or directory (made by `owner`, who may
/// set them).
fn finish(fd: impl AsFd, owner: u32, mode: Mode, times: &Timestamps) -> io::Result<()> {
    let _as = crate::sys::FsIds::enter(owner);
    rustix::fs::fchmod(&fd, mode).map_err(errno("chmod"))?;
    rustix::fs::futimens(&fd, times).map_err(errno("set times"))
}

/// The copy of the interpreter is pid `copy` of the branch whose root
/// helper is `helper`: finds it among the parent's cgroup members, moves
/// it into the branch's cgroup (`to`), and checks it is where a branch's
/// interpreter must be: every namespace the branch's init's, the branch's
/// uid and gid, no capability in any set.
pub fn settle_copy(
    helper: i32,
    copy: i32,
    parent_procs: &[std::path::PathBuf],
    to: &[std::path::PathBuf],
) -> io::Result<()> {
    let (init, _) = init_pids(helper)?;
    let init_pidns = ns_of(init, "pid")?;
    let mut found = None;
    if let Some(procs) = parent_procs.first() {
        for line in std::fs::read_to_string(procs)?.lines() {
            let Ok(pid) = line.trim().parse::<i32>() else {
                continue;
            };
            let Ok(nspid) = field(pid, "NSpid:") else {
                continue;
            };
            if nspid.split_whitespace().last() == Some(&copy.to_string())
                && ns_of(pid, "pid").ok().as_deref() == Some(init_pidns.as_str())
            {
                found = Some(pid);
                break;
            }
        }
    }
    let host =
        found.ok_or_else(|| io::Error::other("the copy is not among the parent's processes"))?;
    // The first move waits for an RCU grace period (the cgroup threadgroup
    // lock): 5-10 ms on an idle host, ~0.1 ms with expedited grace periods
    // (`forkd doctor`, rcu_expedited); the rest of the branch is ~8 ms.
    for procs in to {
        std::fs::write(procs, host.to_string()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("move the copy into {}: {e}", procs.display()),
            )
        })?;
    }
    for ns in ["user", "mnt", "net", "ipc", "uts", "pid", "cgroup"] {
        if ns_of(host, ns)? != ns_of(init, ns)? {
            return Err(io::Error::other(format!(
                "its {ns} namespace is not the branch's"
            )));
        }
    }
    for key in ["Uid:", "Gid:"] {
        let (mine, want) = (field(host, key)?, field(init, key)?);
        if mine.split_whitespace().collect::<Vec<_>>()
            != want.split_whitespace().collect::<Vec<_>>()
        {
            return Err(io::Error::other(format!(
                "its {key} {mine} is not the branch's {want}"
            )));
        }
    }
    for key in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        let v = field(host, key)?;
        if u64::from_str_radix(v.trim(), 16).map_err(io::Error::other)? != 0 {
            return Err(io::Error::other(format!(
                "it holds capabilities ({key} {v})"
            )));
        }
    }
    Ok(())
}

/// The branch init under a branch's root helper: its host pid, and its pid
/// in the parent session's pid namespace (where a copy names it).
pub fn init_pids(helper: i32) -> io::Result<(i32, i32)> {
    // helper → its child in the parent's pid namespace → the init (the
    // helper's other child, root in the host's namespaces, has none)
    let host = children(helper)?
        .into_iter()
        .find_map(|c| children(c).ok()?.first().copied())
        .ok_or_else(|| io::Error::other("the branch's helper has no grandchild"))?;
    let levels: Vec<i32> = field(host, "NSpid:")?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    // host, the parent session's namespace (and its parent's, for a
    // branch of a branch), the branch's (where it is 1)
    match levels.as_slice() {
        [_, .., in_parent, 1] if levels.len() >= 3 => Ok((host, *in_parent)),
        other => Err(io::Error::other(format!(
            "unexpected pid namespace levels {other:?} of the branch's init"
        ))),
    }
}

fn children(pid: i32) -> io::Result<Vec<i32>> {
    Ok(
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
    )
}

fn field(pid: i32, key: &str) -> io::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .ok_or_else(|| io::Error::other(format!("no {key} in /proc/{pid}/status")))
}

fn ns_of(pid: i32, ns: &str) -> io::Result<String> {
    Ok(
        std::fs::read_link(Path::new(&format!("/proc/{pid}/ns/{ns}")))?
            .display()
            .to_string(),
    )
}
