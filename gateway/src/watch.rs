//! Directory watchers for envd's polling API (`CreateWatcher`,
//! `GetWatcherEvents`, `RemoveWatcher`), which `e2b`'s `files.watch_dir`
//! uses. The daemon has no file notifications, so a watcher keeps a
//! snapshot of the directory (names, kinds, sizes, times, modes) and each
//! poll lists it again and reports the differences: creates, writes (size
//! or mtime changed), removes and chmods. A rename shows as a remove and a
//! create; changes undone between two polls are not seen.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use forkd_ipc::{AsyncClient, FileEntry};

use crate::connect::{Code, RpcError};
use crate::pb;

/// Most watchers the gateway keeps (all sandboxes).
pub const MAX_WATCHERS: usize = 1024;
/// Most entries a watched tree may have.
pub const MAX_ENTRIES: usize = 10_000;
/// Deepest level a recursive watch descends.
pub const MAX_DEPTH: u32 = 16;

type Snapshot = BTreeMap<String, (String, u64, u64, u32)>;

struct Watcher {
    sandbox: String,
    path: String,
    recursive: bool,
    seen: Snapshot,
}

/// The watchers of every sandbox.
#[derive(Default)]
pub struct Watchers {
    all: Mutex<HashMap<String, Watcher>>,
}

fn key(e: &FileEntry) -> (String, u64, u64, u32) {
    (e.kind.clone(), e.size, e.modified_ms, e.mode)
}

/// The tree under `root` as names relative to it.
async fn snapshot(
    c: &AsyncClient,
    sandbox: &str,
    root: &str,
    recursive: bool,
) -> Result<Snapshot, RpcError> {
    let mut out = Snapshot::new();
    let mut todo = vec![(root.to_owned(), String::new(), 1u32)];
    while let Some((dir, prefix, level)) = todo.pop() {
        for e in c
            .list_files(sandbox, &dir)
            .await
            .map_err(crate::envd::file_error)?
        {
            let name = format!("{prefix}{}", e.name);
            if recursive && e.kind == "dir" && level < MAX_DEPTH {
                todo.push((e.path.clone(), format!("{name}/"), level + 1));
            }
            out.insert(name, key(&e));
            if out.len() > MAX_ENTRIES {
                return Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!(
                        "{root} holds more than {MAX_ENTRIES} entries: watch a smaller directory"
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn diff(old: &Snapshot, new: &Snapshot) -> Vec<pb::FilesystemEvent> {
    let ev = |name: &str, t: i32| pb::FilesystemEvent {
        name: name.to_owned(),
        r#type: t,
        entry: None,
    };
    let mut out = Vec::new();
    for (name, now) in new {
        match old.get(name) {
            None => out.push(ev(name, 1)),
            Some(was) if was.0 != now.0 => {
                out.push(ev(name, 3));
                out.push(ev(name, 1));
            }
            Some(was) if (was.1, was.2) != (now.1, now.2) && now.0 != "dir" => {
                out.push(ev(name, 2))
            }
            Some(was) if was.3 != now.3 => out.push(ev(name, 5)),
            Some(_) => {}
        }
    }
    out.extend(
        old.keys()
            .filter(|n| !new.contains_key(*n))
            .map(|n| ev(n, 3)),
    );
    out
}

fn fresh_id() -> Result<String, RpcError> {
    let mut b = [0u8; 12];
    getrandom::getrandom(&mut b)
        .map_err(|e| RpcError::new(Code::Internal, format!("no randomness: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watcher>> {
        self.all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts watching `req.path` of `sandbox`.
    pub async fn create(
        &self,
        c: &AsyncClient,
        sandbox: &str,
        req: &pb::CreateWatcherRequest,
    ) -> Result<String, RpcError> {
        let st = c
            .stat_file(sandbox, &req.path)
            .await
            .map_err(crate::envd::file_error)?;
        if st.kind != "dir" {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!("{} is not a directory", req.path),
            ));
        }
        if self.lock().len() >= MAX_WATCHERS {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("the gateway already keeps {MAX_WATCHERS} watchers: stop some"),
            ));
        }
        let seen = snapshot(c, sandbox, &st.path, req.recursive).await?;
        let id = fresh_id()?;
        self.lock().insert(
            id.clone(),
            Watcher {
                sandbox: sandbox.to_owned(),
                path: st.path,
                recursive: req.recursive,
                seen,
            },
        );
        Ok(id)
    }

    /// What changed since the last poll.
    pub async fn events(
        &self,
        c: &AsyncClient,
        sandbox: &str,
        id: &str,
    ) -> Result<Vec<pb::FilesystemEvent>, RpcError> {
        let (path, recursive) = {
            let all = self.lock();
            match all.get(id).filter(|w| w.sandbox == sandbox) {
                Some(w) => (w.path.clone(), w.recursive),
                None => {
                    return Err(RpcError::new(
                        Code::NotFound,
                        format!("watcher {id} not found"),
                    ))
                }
            }
        };
        let now = match snapshot(c, sandbox, &path, recursive).await {
            Ok(s) => s,
            Err(e) => {
                // The directory or the sandbox is gone: so is the watcher.
                self.lock().remove(id);
                return Err(e);
            }
        };
        let mut all = self.lock();
        let Some(w) = all.get_mut(id) else {
            return Err(RpcError::new(
                Code::NotFound,
                format!("watcher {id} not found"),
            ));
        };
        let events = diff(&w.seen, &now);
        w.seen = now;
        Ok(events)
    }

    /// Drops every watcher of a killed sandbox.
    pub fn forget(&self, sandbox: &str) {
        self.lock().retain(|_, w| w.sandbox != sandbox);
    }

    /// Stops a watcher.
    pub fn remove(&self, sandbox: &str, id: &str) -> Result<(), RpcError> {
        let mut all = self.lock();
        match all.get(id) {
            Some(w) if w.sandbox == sandbox => {
                all.remove(id);
                Ok(())
            }
            _ => Err(RpcError::new(
                Code::NotFound,
                format!("watcher {id} not found"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_become_events() {
        let old = Snapshot::from([
            ("a".into(), ("file".into(), 1, 10, 0o644)),
            ("b".into(), ("file".into(), 1, 10, 0o644)),
            ("c".into(), ("file".into(), 1, 10, 0o644)),
            ("d".into(), ("dir".into(), 0, 10, 0o755)),
        ]);
        let new = Snapshot::from([
            ("a".into(), ("file".into(), 2, 11, 0o644)),
            ("c".into(), ("file".into(), 1, 10, 0o600)),
            ("d".into(), ("dir".into(), 0, 12, 0o755)),
            ("e".into(), ("file".into(), 0, 12, 0o644)),
        ]);
        let got: Vec<(String, i32)> = diff(&old, &new)
            .into_iter()
            .map(|e| (e.name, e.r#type))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 2),
                ("c".into(), 5),
                ("e".into(), 1),
                ("b".into(), 3)
            ]
        );
    }
}
