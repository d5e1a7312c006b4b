//! Small filesystem/process helpers shared by the manager and sandboxes.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::parse;
use crate::Error;

/// How long [`kill_tree`] keeps sending SIGKILL before giving up.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`remove_tree`] retries `rmdir` on EBUSY.
pub(crate) const RMDIR_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `sig` to the single process `pid`.
///
/// Refuses `pid <= 0`: kill(2) would then signal a process group or every
/// process we may signal, which must never happen because of a bad
/// `cgroup.procs` read.
pub(crate) fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill(2) takes two plain integers and accesses no memory of
    // ours; `pid > 0` was checked above, so it addresses exactly one process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a process with this pid exists (kill(pid, 0): EPERM still means
/// it exists; only ESRCH means it is gone).
pub(crate) fn pid_alive(pid: i32) -> bool {
    match kill(pid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() != Some(libc::ESRCH),
    }
}

/// Writes `value` to an existing cgroup control file (never creates it).
pub(crate) fn write(path: &Path, value: &str) -> Result<(), Error> {
    write_existing(path, value).map_err(|e| Error::io("write", path, e))
}

fn write_existing(path: &Path, value: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
}

/// Whether an error means the cgroup is gone: ENOENT, or ENODEV from a
/// control file opened just before its directory was removed (kernfs).
fn cgroup_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

/// Reads a control file; `Ok(None)` when it (or its cgroup) is gone.
pub(crate) fn read_opt(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if cgroup_gone(&e) => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Writes `cgroup.kill` in `dir` if the kernel has it (v2, Linux >= 5.14);
/// a cgroup removed meanwhile (by the reaper, racing) needs no kill.
fn write_kill_file(dir: &Path) -> Result<(), Error> {
    let kill_file = dir.join("cgroup.kill");
    if !kill_file.exists() {
        return Ok(());
    }
    match write_existing(&kill_file, "1") {
        Err(e) if !cgroup_gone(&e) => Err(Error::io("write", &kill_file, e)),
        _ => Ok(()),
    }
}

/// Creates a directory; `Ok(false)` if it already existed.
pub(crate) fn mkdir(path: &Path) -> Result<bool, Error> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io("mkdir", path, e)),
    }
}

/// Child directories of a cgroup (control files are regular files).
/// A missing directory (or one removed while listed) has no children.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if cgroup_gone(&e) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = match ent {
            Ok(ent) => ent,
            Err(e) if cgroup_gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", dir, e)),
        };
        if ent.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(ent.path());
        }
    }
    Ok(out)
}

/// Pids in `dir` and all its descendant cgroups.
fn pids_in_tree(dir: &Path, out: &mut Vec<i32>) -> Result<(), Error> {
    if let Some(text) = read_opt(&dir.join("cgroup.procs"))? {
        out.extend(parse::pids(&text));
    }
    for sub in subdirs(dir)? {
        pids_in_tree(&sub, out)?;
    }
    Ok(())
}

/// Whether any process is in `dirs` or below.
pub(crate) fn tree_populated(dirs: &[PathBuf]) -> Result<bool, Error> {
    let mut pids = Vec::new();
    for d in dirs {
        pids_in_tree(d, &mut pids)?;
    }
    Ok(!pids.is_empty())
}

/// Kills every process in `dirs` and their descendants: writes `1` to
/// `cgroup.kill` where that file exists (cgroup v2, Linux >= 5.14), then
/// loops reading `cgroup.procs` and sending SIGKILL until all are empty
/// (this also covers v1 and forks racing with the kill), for at most
/// [`KILL_TIMEOUT`]. Our own pid is never signalled.
pub(crate) fn kill_tree(dirs: &[PathBuf]) -> Result<(), Error> {
    for d in dirs {
        write_kill_file(d)?;
    }
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let start = Instant::now();
    let mut round = 0u32;
    loop {
        let mut pids = Vec::new();
        for d in dirs {
            pids_in_tree(d, &mut pids)?;
        }
        pids.retain(|p| *p != me);
        if pids.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= KILL_TIMEOUT {
            return Err(Error::KillTimeout {
                path: dirs.first().cloned().unwrap_or_default(),
                pids,
                timeout: KILL_TIMEOUT,
            });
        }
        for p in &pids {
            // ESRCH: already gone. Anything else surfaces as a timeout above.
            let _ = kill(*p, libc::SIGKILL);
        }
        round += 1;
        sleep(Duration::from_millis(if round < 10 { 1 } else { 10 }));
    }
}

/// Removes `dir` and its descendant cgroups bottom-up. `rmdir` is retried on
/// EBUSY for up to [`RMDIR_TIMEOUT`] (a cgroup can stay busy for a moment
/// after its last process died). A missing directory counts as removed.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), Error> {
    for sub in subdirs(dir)? {
        remove_tree(&sub)?;
    }
    let start = Instant::now();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < RMDIR_TIMEOUT => {
                sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(Error::io("rmdir", dir, e)),
        }
    }
}

/// One pass, never waiting: SIGKILLs every process in `dirs` and below
/// (`cgroup.kill` where it exists). For callers that retry on their own.
pub(crate) fn signal_tree(dirs: &[PathBuf]) -> Result<(), Error> {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let mut pids = Vec::new();
    for d in dirs {
        write_kill_file(d)?;
        pids_in_tree(d, &mut pids)?;
    }
    for p in pids.into_iter().filter(|p| *p != me) {
        // ESRCH: already gone.
        let _ = kill(p, libc::SIGKILL);
    }
    Ok(())
}

/// One removal attempt of `dir` and its descendant cgroups, bottom-up,
/// never waiting: `Ok(false)` while something is still busy.
pub(crate) fn try_remove_tree(dir: &Path, descend: bool) -> Result<bool, Error> {
    match fs::remove_dir(dir) {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => return Err(Error::io("rmdir", dir, e)),
    }
    if !descend {
        return Ok(false);
    }
    let mut all = true;
    for sub in subdirs(dir)? {
        all &= try_remove_tree(&sub, true)?;
    }
    if !all {
        return Ok(false);
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
        Err(e) => Err(Error::io("rmdir", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The race the reaper and shutdown run into: a control file opened just
    /// before its cgroup is removed reads ENODEV, which must count as gone.
    /// Needs root (skipped, saying so, without); as root it needs a
    /// cgroup hierarchy it can write, or fails.
    #[test]
    fn control_file_of_a_removed_cgroup_counts_as_gone() {
        // SAFETY: geteuid cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            // Straight to stderr: the harness hides eprintln! of passing tests.
            let _ = io::Write::write_all(
                &mut io::stderr().lock(),
                b"skipped: needs root (creates a cgroup)\n",
            );
            return;
        }
        let mounts = crate::hierarchy_mounts().expect("read mountinfo");
        let m = mounts
            .iter()
            .find(|m| fs::create_dir(m.mount_point.join("forkd-enodev-probe")).is_ok())
            .unwrap_or_else(|| panic!("root, yet no cgroup hierarchy took a probe: {mounts:?}"));
        let dir = m.mount_point.join("forkd-enodev-probe");
        let mut procs = fs::File::open(dir.join("cgroup.procs")).expect("open cgroup.procs");
        fs::remove_dir(&dir).expect("rmdir the empty probe cgroup");
        let mut text = String::new();
        let err = io::Read::read_to_string(&mut procs, &mut text)
            .expect_err("reading a removed cgroup's control file must fail");
        assert!(cgroup_gone(&err), "unexpected error {err:?}");
        assert_eq!(read_opt(&dir.join("cgroup.procs")).unwrap(), None);
        assert!(subdirs(&dir).unwrap().is_empty());
    }
}
