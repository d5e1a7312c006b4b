//! The mount plan: what the child mounts and which landlock rules it adds so
//! that the sandbox sees a host directory with the modes the rules give.
//!
//! The daemon computes it before the child exists, by walking the host
//! directory once without following symlinks (every directory is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` beneath
//! the root, which itself is opened with `RESOLVE_NO_SYMLINKS`); the child only
//! executes it (a few opens, mounts and landlock rules, no directory walk).
//!
//! How each mode is enforced (see docs/workspaces.md for why):
//! - `none`: a whiteout in a small mask layer (a tmpfs) stacked over the host
//!   directory in an overlay, so the entry is absent from listings and lookups;
//! - `view` and `read`: read-only mounts; `view` additionally gets no landlock
//!   `READ_FILE` right (listing and `stat` need none), so opening its content
//!   fails with `EACCES`, including through `/proc/self/fd` reopening;
//! - `write`: a read-write mount (direct: a bind of the host directory, so
//!   writes land there; overlay: the overlay with an upper layer in the
//!   sandbox's scratch, so the host never changes).
//!
//! A mount is placed only where the writability changes between a path and
//! its parent, so the mount count follows the rules, not the tree size.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Dir, FileType, Mode as FsMode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};

use crate::rules::{Mode, Rules};

/// Where writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Writes land in the host directory.
    #[default]
    Direct,
    /// Copy-on-write: writes land in an upper layer the daemon can export.
    Overlay,
}

/// One mount placed over the workspace's base mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// Path relative to the workspace root ("" is the root itself).
    pub path: String,
    /// Read-write (else read-only).
    pub write: bool,
    /// Cloned from the host directory (direct mode's write areas) rather
    /// than from the workspace's base mount.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_host: bool,
}

/// Landlock rights granted beneath one path of the mounted workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Every filesystem right (mounts still make read areas read-only).
    Full,
    /// List directories only: `view` subtrees.
    List,
    /// List, and create/remove/rename entries: a `write` directory holding
    /// `view` entries (new files there are not readable back).
    ListWrite,
    /// Read, write, execute, truncate: one file.
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub path: String,
    pub access: Access,
}

/// Everything the child needs to mount one workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountPlan {
    /// Absolute host path without symlinks (opened with RESOLVE_NO_SYMLINKS).
    pub host_root: PathBuf,
    /// `st_dev`/`st_ino` of the root when planned: the child refuses a root
    /// that was replaced meanwhile.
    pub root_dev: u64,
    pub root_ino: u64,
    /// Where the sandbox sees it.
    pub mount_point: String,
    pub kind: Kind,
    /// Overlay: a host directory (made by the daemon) holding `upper/` and `work/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<PathBuf>,
    /// Mode of the root.
    pub root_mode: Mode,
    /// Topmost `none` paths (whiteouts in the mask layer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<String>,
    /// Mounts over the base, parents first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<Bind>,
    /// Landlock grants beneath the mount point.
    pub grants: Vec<Grant>,
    /// Host entries visited while planning (diagnostics).
    #[serde(default)]
    pub visited: u64,
    /// Direct mode, root daemon: the requester's uid and gid (as the daemon
    /// checked them), which files the sandbox writes get on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<(u32, u32)>,
    /// The sandbox's own uid (= gid) when it has one and `owner` is set: the
    /// workspace's host mounts are idmapped so that this id acts as `owner`
    /// (zygote workspace.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idmap_to: Option<u32>,
}

impl MountPlan {
    /// The base mount is an overlay (mask layer and/or upper layer).
    pub fn base_is_overlay(&self) -> bool {
        self.kind == Kind::Overlay || !self.hidden.is_empty()
    }

    /// Some path is `view`: its rules include landlock grants narrower than
    /// full access (keyed on this mount's own inodes).
    pub fn has_view(&self) -> bool {
        self.grants.iter().any(|g| g.access != Access::Full)
    }

    /// A session with this workspace can be branched: an overlay (a branch
    /// gets its own upper layer) enforced by mounts alone (no `view`: a
    /// copy of the session's interpreter keeps its landlock domain, whose
    /// workspace rules would name the session's mount, not the branch's).
    pub fn branchable(&self) -> bool {
        self.kind == Kind::Overlay && !self.has_view()
    }

    /// Items the child handles: mounts, whiteouts and landlock rules.
    pub fn items(&self) -> usize {
        self.hidden.len() + self.binds.len() + self.grants.len()
    }
}

/// Plans with more items than this are refused: the plan travels to the
/// zygote in one message and every item costs the child a system call or two.
pub const MAX_PLAN_ITEMS: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("workspace root `{path}`: {source}; it must be an existing directory reached without symlinks")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace path `{path}` must be absolute")]
    Relative { path: PathBuf },
    #[error("cannot read `{path}` in the workspace: {source}")]
    Walk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the rules hide the whole workspace (its root is `none`); give the root a mode, e.g. a default of read")]
    RootHidden,
    #[error("`{path}` is none inside the write area `{area}`, which direct mode binds straight from the host and so cannot hide it; use overlay mode, or make `{area}` read and give write to the paths beside `{path}`")]
    NoneInsideWrite { path: String, area: String },
    #[error("workspace entry `{0}` has a name that is not UTF-8; rename it or hide its directory")]
    NotUtf8(String),
    #[error("the rules split the workspace into {items} regions (more than {max}); use fewer or broader rules")]
    TooLarge { items: usize, max: usize },
}

/// Opens `path` (absolute) as a directory without following any symlink.
pub fn open_root(path: &Path) -> Result<OwnedFd, PlanError> {
    if !path.is_absolute() {
        return Err(PlanError::Relative {
            path: path.to_path_buf(),
        });
    }
    rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        FsMode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| PlanError::Root {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Opens `rel` beneath `root` (a directory fd) refusing symlinks, `..`
/// escapes and mount crossings.
pub fn open_beneath(root: impl AsFd, rel: &str, flags: OFlags) -> std::io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    Ok(rustix::fs::openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        FsMode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )?)
}

struct Walker<'a> {
    rules: &'a Rules,
    kind: Kind,
    root_dev: u64,
    hidden: Vec<String>,
    binds: Vec<Bind>,
    visited: u64,
    stamps: Vec<Stamp>,
}

/// What a subtree holds, for the landlock grants.
struct Summary {
    view: bool,
    readable: bool,
    grants: Vec<Grant>,
    /// A readable regular file: granted on its own only if its directory
    /// mixes view and readable entries (its path is made only then).
    file: bool,
}

impl Summary {
    fn empty() -> Summary {
        Summary {
            view: false,
            readable: false,
            grants: Vec::new(),
            file: false,
        }
    }
}

fn join(comps: &[Vec<u8>]) -> Result<String, PlanError> {
    let mut s = String::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            s.push('/');
        }
        match std::str::from_utf8(c) {
            Ok(c) => s.push_str(c),
            Err(_) => {
                return Err(PlanError::NotUtf8(
                    String::from_utf8_lossy(&comps[..=i].join(&b'/')).into_owned(),
                ))
            }
        }
    }
    Ok(s)
}

use crate::rules::{Cands, Keys as Key};

impl Walker<'_> {
    #[allow(clippy::too_many_arguments)]
    fn dir(
        &mut self,
        fd: &OwnedFd,
        comps: &mut Vec<Vec<u8>>,
        key: Key,
        mode: Mode,
        write_area: &str,
        cands: &Cands,
        st: &rustix::fs::Stat,
    ) -> Result<Summary, PlanError> {
        let mut sum = Summary {
            view: mode == Mode::View,
            readable: mode >= Mode::Read,
            ..Summary::empty()
        };
        let below = {
            let borrowed: Vec<&[u8]> = comps.iter().map(|c| c.as_slice()).collect();
            self.rules.cands_below(cands, &borrowed)
        };
        // Readable files of this directory, granted one by one if it is mixed.
        let mut files: Vec<Vec<u8>> = Vec::new();
        if !below.is_empty() {
            self.stamps.push(Stamp {
                path: join(comps)?,
                ino: st.st_ino,
                mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            });
            let walk_err = |e: rustix::io::Errno, comps: &[Vec<u8>]| PlanError::Walk {
                path: join(comps)
                    .ok()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| ".".into()),
                source: e.into(),
            };
            let dir = Dir::read_from(fd).map_err(|e| walk_err(e, comps))?;
            for entry in dir {
                let entry = entry.map_err(|e| walk_err(e, comps))?;
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                self.visited += 1;
                comps.push(name.to_vec());
                let r = self.entry(fd, comps, entry.file_type(), key, mode, write_area, &below);
                let name = comps.pop().unwrap_or_default();
                let s = r?;
                sum.view |= s.view;
                sum.readable |= s.readable;
                sum.grants.extend(s.grants);
                if s.file {
                    files.push(name);
                }
            }
        }
        let path = join(comps)?;
        sum.grants = if !sum.view {
            vec![Grant {
                path,
                access: Access::Full,
            }]
        } else if !sum.readable {
            vec![Grant {
                path,
                access: Access::List,
            }]
        } else {
            let mut g = Vec::with_capacity(1 + files.len() + sum.grants.len());
            for name in files {
                comps.push(name);
                let file = join(comps);
                comps.pop();
                g.push(Grant {
                    path: file?,
                    access: Access::File,
                });
            }
            g.push(Grant {
                path,
                access: if mode == Mode::Write {
                    Access::ListWrite
                } else {
                    Access::List
                },
            });
            g.append(&mut sum.grants);
            g
        };
        Ok(sum)
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        parent: &OwnedFd,
        comps: &mut Vec<Vec<u8>>,
        ftype: FileType,
        parent_key: Key,
        parent_mode: Mode,
        write_area: &str,
        cands: &Cands,
    ) -> Result<Summary, PlanError> {
        let key = {
            let borrowed: Vec<&[u8]> = comps.iter().map(|c| c.as_slice()).collect();
            self.rules.step_in(parent_key, &borrowed, cands)
        };
        let mode = self.rules.mode_at(key);
        if mode == Mode::None {
            let path = join(comps)?;
            if self.kind == Kind::Direct && parent_mode == Mode::Write {
                return Err(PlanError::NoneInsideWrite {
                    path,
                    area: if write_area.is_empty() {
                        ".".into()
                    } else {
                        write_area.into()
                    },
                });
            }
            self.hidden.push(path);
            return Ok(Summary::empty());
        }
        let name = comps.last().cloned().unwrap_or_default();
        let ftype = if ftype == FileType::Unknown {
            let st = rustix::fs::statat(
                parent,
                name.as_slice(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| PlanError::Walk {
                path: join(comps).unwrap_or_default(),
                source: e.into(),
            })?;
            FileType::from_raw_mode(st.st_mode)
        } else {
            ftype
        };
        let flips = (mode == Mode::Write) != (parent_mode == Mode::Write);
        match ftype {
            FileType::Directory => {
                let fd = match open_beneath(
                    parent,
                    std::str::from_utf8(&name)
                        .map_err(|_| PlanError::NotUtf8(join(comps).unwrap_or_default()))?,
                    OFlags::RDONLY | OFlags::DIRECTORY,
                ) {
                    Ok(fd) => fd,
                    // Another file system mounted here on the host: the base
                    // mount does not cross into it, so there is nothing to plan.
                    Err(e) if e.raw_os_error() == Some(libc::EXDEV) => return Ok(Summary::empty()),
                    Err(e) => {
                        return Err(PlanError::Walk {
                            path: join(comps)?,
                            source: e,
                        })
                    }
                };
                let st = rustix::fs::fstat(&fd).map_err(|e| PlanError::Walk {
                    path: join(comps).unwrap_or_default(),
                    source: e.into(),
                })?;
                if st.st_dev != self.root_dev {
                    return Ok(Summary::empty());
                }
                let mut area = None;
                if flips {
                    let path = join(comps)?;
                    self.binds.push(Bind {
                        path: path.clone(),
                        write: mode == Mode::Write,
                        from_host: self.kind == Kind::Direct && mode == Mode::Write,
                    });
                    if mode == Mode::Write {
                        area = Some(path);
                    }
                }
                let area = area.unwrap_or_else(|| write_area.to_string());
                self.dir(&fd, comps, key, mode, &area, cands, &st)
            }
            FileType::RegularFile => {
                if flips {
                    self.binds.push(Bind {
                        path: join(comps)?,
                        write: mode == Mode::Write,
                        from_host: self.kind == Kind::Direct && mode == Mode::Write,
                    });
                }
                Ok(Summary {
                    view: mode == Mode::View,
                    readable: mode >= Mode::Read,
                    grants: Vec::new(),
                    file: mode >= Mode::Read,
                })
            }
            // Symlinks, sockets, fifos, devices: only `none` applies to them
            // (a symlink is resolved to its target, which has its own mode;
            // device nodes are useless on nodev mounts).
            _ => Ok(Summary::empty()),
        }
    }
}

/// Walks `host_root` and plans its mounts for `rules`.
pub fn plan(
    host_root: &Path,
    rules: &Rules,
    kind: Kind,
    mount_point: &str,
) -> Result<MountPlan, PlanError> {
    plan_stamped(host_root, rules, kind, mount_point).map(|(p, _)| p)
}

/// One directory the walk listed: what it was when planned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    path: String,
    ino: u64,
    mtime: (i64, i64),
}

/// The directories a plan was computed from. A plan depends only on the
/// names in the directories it listed (a mode never depends on content), and
/// creating, removing or renaming a name changes its directory's mtime: so a
/// plan whose stamps all still hold is the plan a new walk would make.
#[derive(Debug, Clone)]
pub struct Stamps {
    root: PathBuf,
    dirs: Vec<Stamp>,
}

impl Stamps {
    /// Re-checks every listed directory (`fstatat` without following
    /// symlinks, beneath the root opened without symlinks).
    pub fn still_valid(&self) -> bool {
        let Ok(root) = open_root(&self.root) else {
            return false;
        };
        self.dirs.iter().all(|d| {
            let st = if d.path.is_empty() {
                rustix::fs::fstat(&root)
            } else {
                rustix::fs::statat(
                    &root,
                    d.path.as_str(),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
            };
            st.is_ok_and(|st| {
                FileType::from_raw_mode(st.st_mode) == FileType::Directory
                    && st.st_ino == d.ino
                    && (st.st_mtime, st.st_mtime_nsec as i64) == d.mtime
            })
        })
    }

    /// A directory changed too recently for its mtime to be trusted (two
    /// changes within one timestamp tick look like one): do not cache.
    pub fn racy(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(i64::MAX);
        self.dirs.iter().any(|d| now - d.mtime.0 < 2)
    }

    /// Directories whose stamps a check reads.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

/// [`plan`], with the [`Stamps`] that say when it is still valid.
pub fn plan_stamped(
    host_root: &Path,
    rules: &Rules,
    kind: Kind,
    mount_point: &str,
) -> Result<(MountPlan, Stamps), PlanError> {
    let root = open_root(host_root)?;
    let st = rustix::fs::fstat(&root).map_err(|e| PlanError::Root {
        path: host_root.to_path_buf(),
        source: e.into(),
    })?;
    let key = rules.step(Key::default(), &[]);
    let root_mode = rules.mode_at(key);
    if root_mode == Mode::None {
        return Err(PlanError::RootHidden);
    }
    let mut w = Walker {
        rules,
        kind,
        root_dev: st.st_dev,
        hidden: Vec::new(),
        binds: Vec::new(),
        visited: 0,
        stamps: Vec::new(),
    };
    let area = "";
    let sum = w.dir(
        &root,
        &mut Vec::new(),
        key,
        root_mode,
        area,
        &rules.all_cands(),
        &st,
    )?;
    let mut binds = w.binds;
    if kind == Kind::Direct && !w.hidden.is_empty() && root_mode == Mode::Write {
        // The base is then the read-only masked overlay; the writable root
        // comes from the host on top of it (no hidden path lies directly in
        // a write area: checked above).
        binds.insert(
            0,
            Bind {
                path: String::new(),
                write: true,
                from_host: true,
            },
        );
    }
    let plan = MountPlan {
        host_root: host_root.to_path_buf(),
        root_dev: st.st_dev,
        root_ino: st.st_ino,
        mount_point: mount_point.to_string(),
        kind,
        upper: None,
        root_mode,
        hidden: w.hidden,
        binds,
        grants: sum.grants,
        visited: w.visited,
        owner: None,
        idmap_to: None,
    };
    if plan.items() > MAX_PLAN_ITEMS {
        return Err(PlanError::TooLarge {
            items: plan.items(),
            max: MAX_PLAN_ITEMS,
        });
    }
    let mut dirs = w.stamps;
    if dirs.first().is_none_or(|d| !d.path.is_empty()) {
        // The root is always checked: its identity is in the plan.
        dirs.insert(
            0,
            Stamp {
                path: String::new(),
                ino: st.st_ino,
                mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            },
        );
    }
    let stamps = Stamps {
        root: host_root.to_path_buf(),
        dirs,
    };
    Ok((plan, stamps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in ["src", "out", "secrets", "docs/sub"] {
            fs::create_dir_all(p.join(dir)).unwrap();
        }
        for f in [
            "src/a.py",
            "src/b.py",
            "out/old.txt",
            "secrets/key",
            ".env",
            "docs/sub/x.md",
            "docs/README",
        ] {
            fs::write(p.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", p.join("link")).unwrap();
        d
    }

    fn plan_of(
        d: &tempfile::TempDir,
        rules: &[&str],
        default: Mode,
        kind: Kind,
    ) -> Result<MountPlan, PlanError> {
        plan(
            d.path(),
            &Rules::parse(rules, default).unwrap(),
            kind,
            "/workspace",
        )
    }

    #[test]
    fn uniform_tree_needs_one_grant_and_no_walk() {
        let d = tree();
        let p = plan_of(&d, &[], Mode::Read, Kind::Direct).unwrap();
        assert!(p.hidden.is_empty() && p.binds.is_empty());
        assert_eq!(
            p.grants,
            vec![Grant {
                path: String::new(),
                access: Access::Full
            }]
        );
        assert_eq!(
            p.visited, 0,
            "no rule reaches below the root: nothing to walk"
        );
    }

    #[test]
    fn modes_become_whiteouts_binds_and_grants() {
        let d = tree();
        let p = plan_of(
            &d,
            &[
                "secrets=none",
                ".env=none",
                "out=write",
                "docs=view",
                "docs/README=read",
            ],
            Mode::Read,
            Kind::Direct,
        )
        .unwrap();
        let mut hidden = p.hidden.clone();
        hidden.sort();
        assert_eq!(hidden, vec![".env", "secrets"]);
        assert_eq!(
            p.binds,
            vec![Bind {
                path: "out".into(),
                write: true,
                from_host: true
            }]
        );
        assert!(p.base_is_overlay());
        let g = |path: &str| p.grants.iter().find(|g| g.path == path).map(|g| g.access);
        assert_eq!(g(""), Some(Access::List), "the root holds a view subtree");
        assert_eq!(g("src"), Some(Access::Full));
        assert_eq!(g("out"), Some(Access::Full));
        assert_eq!(g("docs"), Some(Access::List));
        assert_eq!(g("docs/sub"), Some(Access::List));
        assert_eq!(g("docs/README"), Some(Access::File));
        assert_eq!(g("docs/sub/x.md"), None, "view content gets no read right");
        assert_eq!(g("secrets"), None);
    }

    #[test]
    fn direct_mode_refuses_none_inside_write() {
        let d = tree();
        let e = plan_of(&d, &[".env=none"], Mode::Write, Kind::Direct).unwrap_err();
        assert!(matches!(e, PlanError::NoneInsideWrite { .. }), "{e}");
        assert!(e.to_string().contains("overlay"), "{e}");
        // Overlay mode hides it in the overlay itself.
        let p = plan_of(&d, &[".env=none"], Mode::Write, Kind::Overlay).unwrap();
        assert_eq!(p.hidden, vec![".env"]);
        assert!(p.binds.is_empty());
        // Direct: a write root with the hidden path under a read directory
        // is fine: the root comes from the host, the read part from the mask.
        let p = plan_of(
            &d,
            &["secrets=read", "secrets/key=none"],
            Mode::Write,
            Kind::Direct,
        )
        .unwrap();
        assert_eq!(
            p.binds[0],
            Bind {
                path: String::new(),
                write: true,
                from_host: true
            }
        );
        assert_eq!(
            p.binds[1],
            Bind {
                path: "secrets".into(),
                write: false,
                from_host: false
            }
        );
    }

    #[test]
    fn read_islands_in_write_areas_and_back() {
        let d = tree();
        let p = plan_of(
            &d,
            &["src=write", "src/b.py=read"],
            Mode::Read,
            Kind::Overlay,
        )
        .unwrap();
        assert_eq!(
            p.binds,
            vec![
                Bind {
                    path: "src".into(),
                    write: true,
                    from_host: false
                },
                Bind {
                    path: "src/b.py".into(),
                    write: false,
                    from_host: false
                },
            ]
        );
    }

    #[test]
    fn root_problems_are_explained() {
        let d = tree();
        assert!(matches!(
            plan_of(&d, &[], Mode::None, Kind::Direct),
            Err(PlanError::RootHidden)
        ));
        let link = d.path().join("link-to-src");
        std::os::unix::fs::symlink(d.path().join("src"), &link).unwrap();
        let e = plan(
            &link,
            &Rules::parse::<&str>(&[], Mode::Read).unwrap(),
            Kind::Direct,
            "/w",
        )
        .unwrap_err();
        assert!(
            matches!(e, PlanError::Root { .. }),
            "a symlinked root is refused: {e}"
        );
        let e = plan(
            Path::new("rel"),
            &Rules::parse::<&str>(&[], Mode::Read).unwrap(),
            Kind::Direct,
            "/w",
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::Relative { .. }));
    }

    #[test]
    fn stamps_notice_new_names_in_listed_directories() {
        let d = tree();
        let rules = Rules::parse(&["**/*.key=none"], Mode::Read).unwrap();
        let (p, stamps) = plan_stamped(d.path(), &rules, Kind::Overlay, "/w").unwrap();
        assert!(stamps.still_valid());
        assert!(stamps.racy(), "just made: too fresh to cache");
        assert!(p.hidden.is_empty());
        // A new matching file: the stamps no longer hold, and a new plan hides it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(d.path().join("docs/sub/new.key"), "k").unwrap();
        assert!(!stamps.still_valid());
        let (p, _) = plan_stamped(d.path(), &rules, Kind::Overlay, "/w").unwrap();
        assert_eq!(p.hidden, vec!["docs/sub/new.key"]);
        // A directory swapped for a symlink is a change too.
        let (_, stamps) = plan_stamped(d.path(), &rules, Kind::Overlay, "/w").unwrap();
        fs::rename(d.path().join("docs/sub"), d.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(d.path().join("moved"), d.path().join("docs/sub")).unwrap();
        assert!(!stamps.still_valid());
    }

    #[test]
    fn symlinks_are_not_followed() {
        let d = tree();
        // `link` points at /etc/passwd: planning must not look there.
        let p = plan_of(
            &d,
            &["**/passwd=none", "link=view"],
            Mode::Read,
            Kind::Overlay,
        )
        .unwrap();
        assert!(p.hidden.is_empty());
        assert!(p.grants.iter().all(|g| g.path != "link"));
    }
}
