//! The delta of an overlay workspace: export of its upper layer as a tar (or
//! a directory tree) and application to a host directory.
//!
//! The format is the OCI image layer convention: changed or new files,
//! directories and symlinks as themselves; a deleted path `d/name` as an
//! empty file `d/.wh.name`; a directory whose earlier content was replaced as
//! a whole (overlayfs' opaque directory) with a `d/.wh..wh..opq` entry right
//! after the directory. No overlayfs internals leave the export: whiteout
//! devices and opaque xattrs become those entries, a file the sandbox itself
//! named `.wh.*` is refused (it would read as a deletion), and redirect or
//! metacopy xattrs (never made with the mount options forkd uses) abort it.
//! Applying never follows a symlink (every step is `openat2` beneath the
//! target with `RESOLVE_NO_SYMLINKS`) and, given the rules, refuses any change
//! outside `write` paths.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode as FsMode, OFlags};

use crate::plan::open_beneath;
use crate::rules::{Mode, Rules};

pub const WHITEOUT_PREFIX: &str = ".wh.";
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the sandbox created `{0}`, a name the delta format reserves for deletions; rename it and export again")]
    ReservedName(String),
    #[error("`{0}` carries overlayfs redirect/metacopy metadata, which forkd's overlay never makes; refusing to export it")]
    OverlayMetadata(String),
    #[error("delta entry `{0}` is not a relative path inside the workspace")]
    BadPath(String),
    #[error(
        "delta entry `{path}` changes a path whose mode is {mode}, not write; refusing to apply it"
    )]
    NotWritable { path: String, mode: Mode },
    #[error("delta entry `{0}` has a type the delta format does not carry")]
    BadType(String),
    #[error("delta entry `{0}` has a name that is not UTF-8")]
    NotUtf8(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeltaError {
    move |source| DeltaError::Io {
        what: what.into(),
        source,
    }
}

fn errno(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> DeltaError {
    let what = what.into();
    move |e| DeltaError::Io {
        what,
        source: e.into(),
    }
}

/// Counts of what an export or apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeltaStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub deletions: u64,
    pub opaque_dirs: u64,
    /// Fifos and sockets left out of an export.
    pub skipped: u64,
}

fn getxattr(fd: impl AsFd, name: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    match rustix::fs::fgetxattr(fd, name, &mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// The xattr namespace overlayfs keeps its metadata in: `trusted.` (the
/// default, which the sandbox cannot write) or `user.` (`userxattr`, in a
/// user namespace, where overlayfs hides those names from the sandbox).
/// Only that namespace is believed: a `user.overlay.opaque` the sandbox set
/// on a `trusted.` overlay is its own data, not an opaque marker.
fn ns(userxattr: bool) -> &'static str {
    if userxattr {
        "user.overlay."
    } else {
        "trusted.overlay."
    }
}

fn is_opaque(fd: impl AsFd + Copy, userxattr: bool) -> bool {
    getxattr(fd, &format!("{}opaque", ns(userxattr))).is_some_and(|v| v == b"y" || v == b"x")
}

fn has_overlay_metadata(fd: impl AsFd + Copy, userxattr: bool) -> bool {
    ["redirect", "metacopy"]
        .iter()
        .any(|x| getxattr(fd, &format!("{}{x}", ns(userxattr))).is_some())
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode & 0o777);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

struct Exporter<W: Write> {
    tar: tar::Builder<W>,
    stats: DeltaStats,
    userxattr: bool,
}

impl<W: Write> Exporter<W> {
    fn dir(&mut self, fd: &OwnedFd, rel: &str) -> Result<(), DeltaError> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        for entry in Dir::read_from(fd).map_err(errno(format!("list {rel}")))? {
            let entry = entry.map_err(errno(format!("list {rel}")))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        // Sorted, so equal trees export to equal bytes.
        names.sort();
        for name in names {
            let name = String::from_utf8(name)
                .map_err(|e| DeltaError::NotUtf8(String::from_utf8_lossy(e.as_bytes()).into()))?;
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if name.starts_with(WHITEOUT_PREFIX) {
                return Err(DeltaError::ReservedName(path));
            }
            let st = rustix::fs::statat(fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno(format!("stat {path}")))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::CharacterDevice if st.st_rdev == 0 => {
                    let wh = match path.rsplit_once('/') {
                        Some((d, n)) => format!("{d}/{WHITEOUT_PREFIX}{n}"),
                        None => format!("{WHITEOUT_PREFIX}{name}"),
                    };
                    self.append(&wh, header(tar::EntryType::Regular, 0, 0o644), &[][..])?;
                    self.stats.deletions += 1;
                }
                FileType::Directory => {
                    let sub = open_beneath(fd, &name, OFlags::RDONLY | OFlags::DIRECTORY)
                        .map_err(io(format!("open {path}")))?;
                    if has_overlay_metadata(&sub, self.userxattr) {
                        return Err(DeltaError::OverlayMetadata(path));
                    }
                    self.append(
                        &format!("{path}/"),
                        header(tar::EntryType::Directory, 0, st.st_mode),
                        &[][..],
                    )?;
                    self.stats.dirs += 1;
                    if is_opaque(&sub, self.userxattr) {
                        self.append(
                            &format!("{path}/{OPAQUE_MARKER}"),
                            header(tar::EntryType::Regular, 0, 0o644),
                            &[][..],
                        )?;
                        self.stats.opaque_dirs += 1;
                    }
                    self.dir(&sub, &path)?;
                }
                FileType::RegularFile => {
                    let f = open_beneath(fd, &name, OFlags::RDONLY)
                        .map_err(io(format!("open {path}")))?;
                    if has_overlay_metadata(&f, self.userxattr) {
                        return Err(DeltaError::OverlayMetadata(path));
                    }
                    let file = std::fs::File::from(f);
                    self.append(
                        &path,
                        header(tar::EntryType::Regular, st.st_size as u64, st.st_mode),
                        file,
                    )?;
                    self.stats.files += 1;
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(fd, name.as_str(), Vec::new())
                        .map_err(errno(format!("readlink {path}")))?;
                    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
                    self.tar
                        .append_link(
                            &mut h,
                            &path,
                            Path::new(
                                target
                                    .to_str()
                                    .map_err(|_| DeltaError::NotUtf8(path.clone()))?,
                            ),
                        )
                        .map_err(io(format!("write {path}")))?;
                    self.stats.symlinks += 1;
                }
                _ => self.stats.skipped += 1,
            }
        }
        Ok(())
    }

    fn append(
        &mut self,
        path: &str,
        mut h: tar::Header,
        data: impl Read,
    ) -> Result<(), DeltaError> {
        self.tar
            .append_data(&mut h, path, data)
            .map_err(io(format!("write {path}")))
    }
}

/// Exports the overlay upper directory `upper` as a tar into `out`
/// (`userxattr`: the overlay kept its metadata in `user.overlay.*`).
pub fn export_tar(
    upper: &Path,
    out: impl Write,
    userxattr: bool,
) -> Result<DeltaStats, DeltaError> {
    let fd = crate::plan::open_root(upper).map_err(|e| DeltaError::Io {
        what: format!("open {}", upper.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    export_tar_from(&fd, out, userxattr)
}

/// [`export_tar`] from an open directory.
pub fn export_tar_from(
    upper: &OwnedFd,
    out: impl Write,
    userxattr: bool,
) -> Result<DeltaStats, DeltaError> {
    let mut ex = Exporter {
        tar: tar::Builder::new(out),
        stats: DeltaStats::default(),
        userxattr,
    };
    ex.tar.mode(tar::HeaderMode::Deterministic);
    ex.dir(upper, "")?;
    ex.tar.finish().map_err(io("finish tar"))?;
    Ok(ex.stats)
}

/// Validates a delta entry path: relative components only.
fn entry_components(path: &str) -> Result<Vec<&str>, DeltaError> {
    let trimmed = path.trim_end_matches('/');
    let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
    if trimmed.is_empty() || trimmed.starts_with('/') {
        return Err(DeltaError::BadPath(path.into()));
    }
    let comps: Vec<&str> = trimmed.split('/').collect();
    if comps
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == ".." || c.contains('\0'))
    {
        return Err(DeltaError::BadPath(path.into()));
    }
    Ok(comps)
}

/// Refuses to remove `path` unless the rules make it `write`.
fn may_change(rules: Option<&Rules>, path: &str) -> Result<(), DeltaError> {
    if let Some(rules) = rules {
        let mode = rules
            .mode(path)
            .map_err(|_| DeltaError::BadPath(path.into()))?;
        if mode != Mode::Write {
            return Err(DeltaError::NotWritable {
                path: path.into(),
                mode,
            });
        }
    }
    Ok(())
}

/// Removes `name` in `dir` (the workspace path `what`) whatever it is (a
/// directory recursively, each entry checked against the rules), never
/// following symlinks. Missing is fine.
fn remove(dir: &OwnedFd, name: &str, what: &str, rules: Option<&Rules>) -> Result<(), DeltaError> {
    may_change(rules, what)?;
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {
            let sub = open_beneath(dir, name, OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(io(format!("open {what}")))?;
            empty_dir(&sub, what, rules)?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
                .map_err(errno(format!("remove {what}")))
        }
        Err(e) => Err(errno(format!("remove {what}"))(e)),
    }
}

fn empty_dir(dir: &OwnedFd, what: &str, rules: Option<&Rules>) -> Result<(), DeltaError> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir).map_err(errno(format!("list {what}")))? {
        let entry = entry.map_err(errno(format!("list {what}")))?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(String::from_utf8_lossy(n).into_owned());
        }
    }
    for n in names {
        remove(dir, &n, &format!("{what}/{n}"), rules)?;
    }
    Ok(())
}

/// Opens (creating missing directories) the parent of `comps` beneath `root`.
fn open_parent(root: &OwnedFd, comps: &[&str], path: &str) -> Result<OwnedFd, DeltaError> {
    let mut cur = open_beneath(root, "", OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(io("open the target"))?;
    for c in &comps[..comps.len() - 1] {
        cur = match open_beneath(&cur, c, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rustix::fs::mkdirat(&cur, *c, FsMode::from_raw_mode(0o755))
                    .map_err(errno(format!("mkdir for {path}")))?;
                open_beneath(&cur, c, OFlags::RDONLY | OFlags::DIRECTORY)
                    .map_err(io(format!("open for {path}")))?
            }
            Err(e) => {
                return Err(io(format!(
                    "open the directory of {path} (a symlink or not a directory?)"
                ))(e))
            }
        };
    }
    Ok(cur)
}

/// Applies a delta tar to the host directory `target`. With `rules`, every
/// changed path must be `write` under them.
pub fn apply_tar(
    delta: impl Read,
    target: &Path,
    rules: Option<&Rules>,
) -> Result<DeltaStats, DeltaError> {
    let root = crate::plan::open_root(target).map_err(|e| DeltaError::Io {
        what: format!("open {}", target.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut stats = DeltaStats::default();
    let mut archive = tar::Archive::new(delta);
    for entry in archive.entries().map_err(io("read the delta"))? {
        let mut entry = entry.map_err(io("read the delta"))?;
        let raw = entry.path_bytes().into_owned();
        let path = String::from_utf8(raw)
            .map_err(|e| DeltaError::NotUtf8(String::from_utf8_lossy(e.as_bytes()).into()))?;
        let comps = entry_components(&path)?;
        let name = *comps.last().expect("non-empty");
        // The path that changes: for a whiteout the deleted one, for an
        // opaque marker its directory.
        let (changed, action) = if name == OPAQUE_MARKER {
            (comps[..comps.len() - 1].join("/"), Action::Opaque)
        } else if let Some(victim) = name.strip_prefix(WHITEOUT_PREFIX) {
            if victim.is_empty()
                || victim == "."
                || victim == ".."
                || victim.starts_with(WHITEOUT_PREFIX)
            {
                return Err(DeltaError::BadPath(path));
            }
            let mut c = comps[..comps.len() - 1].to_vec();
            c.push(victim);
            (c.join("/"), Action::Delete(victim.to_string()))
        } else {
            (comps.join("/"), Action::Put)
        };
        if changed.is_empty() {
            return Err(DeltaError::BadPath(path));
        }
        // A directory that exists already is no change (overlayfs copies up
        // every parent of a changed path): nothing to check or do.
        if matches!(action, Action::Put)
            && entry.header().entry_type() == tar::EntryType::Directory
            && open_beneath(&root, &changed, OFlags::RDONLY | OFlags::DIRECTORY).is_ok()
        {
            stats.dirs += 1;
            continue;
        }
        if let Some(rules) = rules {
            let mode = rules
                .mode(&changed)
                .map_err(|_| DeltaError::BadPath(path.clone()))?;
            if mode != Mode::Write {
                return Err(DeltaError::NotWritable {
                    path: changed,
                    mode,
                });
            }
        }
        match action {
            Action::Opaque => {
                let dir = open_beneath(&root, &changed, OFlags::RDONLY | OFlags::DIRECTORY)
                    .map_err(io(format!("open {changed}")))?;
                empty_dir(&dir, &changed, rules)?;
                stats.opaque_dirs += 1;
            }
            Action::Delete(victim) => {
                let parent = open_parent(&root, &comps, &path)?;
                remove(&parent, &victim, &changed, rules)?;
                stats.deletions += 1;
            }
            Action::Put => {
                let parent = open_parent(&root, &comps, &path)?;
                let kind = entry.header().entry_type();
                let perm = entry.header().mode().unwrap_or(0o644) & 0o777;
                match kind {
                    tar::EntryType::Directory => {
                        match open_beneath(&parent, name, OFlags::RDONLY | OFlags::DIRECTORY) {
                            Ok(_) => {}
                            Err(_) => {
                                remove(&parent, name, &changed, rules)?;
                                rustix::fs::mkdirat(&parent, name, FsMode::from_raw_mode(perm))
                                    .map_err(errno(format!("mkdir {changed}")))?;
                            }
                        }
                        stats.dirs += 1;
                    }
                    tar::EntryType::Regular => {
                        remove(&parent, name, &changed, rules)?;
                        let fd = rustix::fs::openat(
                            &parent,
                            name,
                            OFlags::WRONLY
                                | OFlags::CREATE
                                | OFlags::EXCL
                                | OFlags::NOFOLLOW
                                | OFlags::CLOEXEC,
                            FsMode::from_raw_mode(0o600),
                        )
                        .map_err(errno(format!("create {changed}")))?;
                        let mut f = std::fs::File::from(fd);
                        std::io::copy(&mut entry, &mut f)
                            .map_err(io(format!("write {changed}")))?;
                        rustix::fs::fchmod(&f, FsMode::from_raw_mode(perm))
                            .map_err(errno(format!("chmod {changed}")))?;
                        stats.files += 1;
                    }
                    tar::EntryType::Symlink => {
                        let target = entry
                            .link_name_bytes()
                            .ok_or_else(|| DeltaError::BadType(path.clone()))?
                            .into_owned();
                        remove(&parent, name, &changed, rules)?;
                        rustix::fs::symlinkat(target.as_slice(), &parent, name)
                            .map_err(errno(format!("symlink {changed}")))?;
                        stats.symlinks += 1;
                    }
                    _ => return Err(DeltaError::BadType(path)),
                }
            }
        }
    }
    Ok(stats)
}

enum Action {
    Put,
    Delete(String),
    Opaque,
}

/// Writes a delta tar out as a directory tree (whiteouts stay `.wh.` files)
/// into `dir`, which must be empty or absent.
pub fn unpack_tree(delta: impl Read, dir: &Path) -> Result<DeltaStats, DeltaError> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if std::fs::read_dir(dir)
                .map_err(io(format!("read {}", dir.display())))?
                .next()
                .is_some()
            {
                return Err(DeltaError::Io {
                    what: format!("unpack into {}", dir.display()),
                    source: std::io::Error::other(
                        "the directory is not empty; name a new or empty one",
                    ),
                });
            }
        }
        Err(e) => return Err(io(format!("create {}", dir.display()))(e)),
    }
    let root = crate::plan::open_root(dir).map_err(|e| DeltaError::Io {
        what: format!("open {}", dir.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut stats = DeltaStats::default();
    let mut archive = tar::Archive::new(delta);
    for entry in archive.entries().map_err(io("read the delta"))? {
        let mut entry = entry.map_err(io("read the delta"))?;
        let path = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|e| DeltaError::NotUtf8(String::from_utf8_lossy(e.as_bytes()).into()))?;
        let comps = entry_components(&path)?;
        let name = *comps.last().expect("non-empty");
        let parent = open_parent(&root, &comps, &path)?;
        let perm = entry.header().mode().unwrap_or(0o644) & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                if open_beneath(&parent, name, OFlags::RDONLY | OFlags::DIRECTORY).is_err() {
                    rustix::fs::mkdirat(&parent, name, FsMode::from_raw_mode(perm))
                        .map_err(errno(format!("mkdir {path}")))?;
                }
                stats.dirs += 1;
            }
            tar::EntryType::Regular => {
                let fd = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    FsMode::from_raw_mode(perm),
                )
                .map_err(errno(format!("create {path}")))?;
                let mut f = std::fs::File::from(fd);
                std::io::copy(&mut entry, &mut f).map_err(io(format!("write {path}")))?;
                if name.starts_with(WHITEOUT_PREFIX) {
                    stats.deletions += 1;
                } else {
                    stats.files += 1;
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| DeltaError::BadType(path.clone()))?
                    .into_owned();
                rustix::fs::symlinkat(target.as_slice(), &parent, name)
                    .map_err(errno(format!("symlink {path}")))?;
                stats.symlinks += 1;
            }
            _ => return Err(DeltaError::BadType(path)),
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tar_names(data: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(data);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn export_records_files_whiteouts_and_opaque_dirs() {
        let upper = tempfile::tempdir().unwrap();
        let u = upper.path();
        fs::create_dir_all(u.join("out/new")).unwrap();
        fs::write(u.join("out/new/f.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("../x", u.join("out/link")).unwrap();
        // A whiteout as overlayfs makes it: a 0/0 character device (root only).
        let wh = rustix::fs::mknodat(
            rustix::fs::CWD,
            u.join("gone.txt").as_path(),
            FileType::CharacterDevice,
            FsMode::from_raw_mode(0o644),
            0,
        );
        let root = wh.is_ok();
        fs::create_dir(u.join("replaced")).unwrap();
        let opaque = rustix::fs::setxattr(
            u.join("replaced").as_path(),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
        fs::write(u.join("replaced/only"), b"1").unwrap();
        let mut out = Vec::new();
        let stats = export_tar(u, &mut out, false).unwrap();
        let names = tar_names(&out);
        assert!(names.contains(&"out/new/f.txt".to_string()), "{names:?}");
        assert!(names.contains(&"out/link".to_string()));
        if root {
            assert!(names.contains(&".wh.gone.txt".to_string()), "{names:?}");
            assert_eq!(stats.deletions, 1);
        }
        if opaque {
            assert!(
                names.contains(&"replaced/.wh..wh..opq".to_string()),
                "{names:?}"
            );
            let i = names
                .iter()
                .position(|n| n == "replaced/.wh..wh..opq")
                .unwrap();
            let j = names.iter().position(|n| n == "replaced/only").unwrap();
            assert!(i < j, "the marker precedes the directory's new content");
        }
    }

    #[test]
    fn reserved_names_are_refused() {
        let upper = tempfile::tempdir().unwrap();
        fs::write(upper.path().join(".wh.README"), b"").unwrap();
        let e = export_tar(upper.path(), Vec::new(), false).unwrap_err();
        assert!(matches!(e, DeltaError::ReservedName(_)), "{e}");
    }

    fn delta(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            match data {
                Some(d) => {
                    let mut h = header(tar::EntryType::Regular, d.len() as u64, 0);
                    h.set_mode(0o4755);
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    let mut h = header(tar::EntryType::Directory, 0, 0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn apply_writes_deletes_and_replaces() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path();
        fs::create_dir_all(h.join("out/old")).unwrap();
        fs::write(h.join("out/old/a"), b"a").unwrap();
        fs::write(h.join("out/del"), b"d").unwrap();
        fs::write(h.join("keep"), b"k").unwrap();
        let d = delta(&[
            ("out/new.txt", Some(b"new")),
            ("out/.wh.del", Some(b"")),
            ("out/old/", None),
            ("out/old/.wh..wh..opq", Some(b"")),
            ("out/old/b", Some(b"b")),
        ]);
        let rules = Rules::parse(&["out=write"], Mode::Read).unwrap();
        let stats = apply_tar(&d[..], h, Some(&rules)).unwrap();
        assert_eq!(fs::read(h.join("out/new.txt")).unwrap(), b"new");
        assert!(!h.join("out/del").exists());
        assert!(
            !h.join("out/old/a").exists(),
            "the opaque directory's old content is gone"
        );
        assert_eq!(fs::read(h.join("out/old/b")).unwrap(), b"b");
        assert_eq!(fs::read(h.join("keep")).unwrap(), b"k");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(h.join("out/new.txt"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o755,
            "setuid stripped"
        );
        assert_eq!((stats.files, stats.deletions, stats.opaque_dirs), (2, 1, 1));
    }

    #[test]
    fn apply_refuses_escapes_and_read_paths() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"v").unwrap();
        std::os::unix::fs::symlink(outside.path(), h.join("link")).unwrap();
        fs::write(h.join("ro"), b"r").unwrap();
        let rules = Rules::parse(&["ro=read"], Mode::Write).unwrap();
        for (bad, what) in [
            (Vec::new(), "dot-dot"),
            (delta(&[("link/victim", Some(b"x"))]), "through a symlink"),
            (
                delta(&[("link/.wh.victim", Some(b""))]),
                "a deletion through a symlink",
            ),
            (delta(&[(".wh.ro", Some(b""))]), "deleting a read path"),
            (delta(&[("ro", Some(b"x"))]), "overwriting a read path"),
        ] {
            // `tar` itself refuses to build `..`; write that header by hand.
            let bad = if what == "dot-dot" {
                let mut h = header(tar::EntryType::Regular, 1, 0o644);
                h.as_gnu_mut().unwrap().name[..4].copy_from_slice(b"../x");
                h.set_cksum();
                let mut v = h.as_bytes().to_vec();
                v.extend_from_slice(&[b'x'; 512][..512]);
                v.extend_from_slice(&[0u8; 1024]);
                v
            } else {
                bad
            };
            let r = apply_tar(&bad[..], h, Some(&rules));
            assert!(r.is_err(), "{what} was applied");
        }
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"v");
        assert_eq!(fs::read(h.join("ro")).unwrap(), b"r");
    }

    #[test]
    fn deletions_never_reach_read_paths_below_a_write_dir() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path();
        fs::create_dir_all(h.join("out/keep")).unwrap();
        fs::write(h.join("out/keep/k"), b"k").unwrap();
        fs::write(h.join("out/x"), b"x").unwrap();
        let rules = Rules::parse(&["out=write", "out/keep=read"], Mode::Read).unwrap();
        let opaque = delta(&[("out/", None), ("out/.wh..wh..opq", Some(b""))]);
        assert!(apply_tar(&opaque[..], h, Some(&rules)).is_err());
        assert_eq!(fs::read(h.join("out/keep/k")).unwrap(), b"k");
        let rules = Rules::parse(&["a=write", "a/b/c=read"], Mode::Read).unwrap();
        fs::create_dir_all(h.join("a/b")).unwrap();
        fs::write(h.join("a/b/c"), b"c").unwrap();
        let wh = delta(&[("a/.wh.b", Some(b""))]);
        assert!(apply_tar(&wh[..], h, Some(&rules)).is_err());
        assert_eq!(fs::read(h.join("a/b/c")).unwrap(), b"c");
    }

    #[test]
    fn a_user_opaque_xattr_is_data_on_a_trusted_overlay() {
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir(upper.path().join("d")).unwrap();
        if rustix::fs::setxattr(
            upper.path().join("d").as_path(),
            "user.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .is_err()
        {
            return; // no user xattrs on this file system
        }
        let mut t = Vec::new();
        export_tar(upper.path(), &mut t, false).unwrap();
        assert!(!tar_names(&t).iter().any(|n| n.ends_with(OPAQUE_MARKER)));
        let mut t = Vec::new();
        export_tar(upper.path(), &mut t, true).unwrap();
        assert!(tar_names(&t).iter().any(|n| n.ends_with(OPAQUE_MARKER)));
    }

    #[test]
    fn export_then_unpack_then_apply_round_trips() {
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir_all(upper.path().join("a/b")).unwrap();
        fs::write(upper.path().join("a/b/c"), b"c").unwrap();
        let mut t = Vec::new();
        export_tar(upper.path(), &mut t, false).unwrap();
        let tree = tempfile::tempdir().unwrap();
        let dir = tree.path().join("delta");
        unpack_tree(&t[..], &dir).unwrap();
        assert_eq!(fs::read(dir.join("a/b/c")).unwrap(), b"c");
        let host = tempfile::tempdir().unwrap();
        apply_tar(&t[..], host.path(), None).unwrap();
        assert_eq!(fs::read(host.path().join("a/b/c")).unwrap(), b"c");
    }
}
