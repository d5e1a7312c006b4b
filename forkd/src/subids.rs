//! A rootless daemon's subordinate id range (`/etc/subuid`, `/etc/subgid`)
//! and the setuid helpers that map it (`newuidmap`, `newgidmap`): with both,
//! its zygotes' user namespaces map the range once at start and every
//! sandbox runs as its own id from it (see `forkd_zygote::userns`). Without
//! them every sandbox keeps the daemon's uid; [`why_not`] then says what to
//! add.

use std::path::{Path, PathBuf};

pub use forkd_zygote::userns::SubIds;

/// Directories searched for the helpers after `PATH` (a daemon started by
/// systemd may have a short one).
const HELPER_DIRS: [&str; 4] = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"];

/// Why a rootless daemon cannot give its sandboxes ids of their own: a
/// sentence naming what to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub String);

/// The range of the user `uid` (named `name`, if it has a name) in the
/// text of an `/etc/subuid`-style file: `owner:start:count` lines, the owner
/// a name or a numeric id; the first line that names the user wins.
pub fn range_in(text: &str, name: Option<&str>, uid: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let (owner, start, count) = (f.next()?, f.next()?, f.next()?);
        let owner_matches = Some(owner) == name || owner.parse::<u32>().ok() == Some(uid);
        let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
        (owner_matches && count > 0).then_some((start, count))
    })
}

/// The account name of `uid` in `/etc/passwd`-style `text`.
pub fn name_in(text: &str, uid: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

fn helper(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(HELPER_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The daemon user's range and helpers, if it has both; `needed`: the least
/// count that serves (every running and warm sandbox holds an id, twice
/// over, as for `sandbox_uid_count`); `max`: at most this many are used.
pub fn detect(uid: u32, needed: u64, max: u32) -> Result<SubIds, Missing> {
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|t| name_in(&t, uid));
    detect_in(Path::new("/etc"), name.as_deref(), uid, needed, max)
}

fn detect_in(
    etc: &Path,
    name: Option<&str>,
    uid: u32,
    needed: u64,
    max: u32,
) -> Result<SubIds, Missing> {
    let who = name.map_or_else(|| uid.to_string(), str::to_owned);
    const INSTALL: &str =
        "install newuidmap/newgidmap (Debian/Ubuntu package uidmap, Fedora shadow-utils)";
    let tools = ["newuidmap", "newgidmap"].map(helper);
    let tools_missing = tools.iter().any(Option::is_none);
    let range = |file: &str| {
        let path = etc.join(file);
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| range_in(&t, name, uid))
            .ok_or_else(|| {
                Missing(format!(
                    "{} has no line for {who}: add one such as `{who}:100000:65536` (a range no other user has) to /etc/subuid and /etc/subgid{}",
                    path.display(),
                    if tools_missing { format!(", and {INSTALL}") } else { String::new() }
                ))
            })
    };
    let (uid_start, uid_count) = range("subuid")?;
    let (gid_start, gid_count) = range("subgid")?;
    let [Some(newuidmap), Some(newgidmap)] = tools else {
        return Err(Missing(format!("{INSTALL}: they are not installed")));
    };
    let count = uid_count.min(gid_count).min(max);
    if u64::from(count) < needed {
        return Err(Missing(format!(
            "the subordinate range of {who} holds {count} ids, fewer than the {needed} that max_concurrent and the warm pools need: give it at least {needed} in /etc/subuid and /etc/subgid"
        )));
    }
    Ok(SubIds {
        uid_start,
        gid_start,
        count,
        newuidmap,
        newgidmap,
    })
}

/// The per-sandbox ids a rootless daemon with this configuration gets, or
/// what to add for them (`forkd doctor` and the start-up warning).
pub fn why_not(config: &crate::config::Config, uid: u32) -> Result<SubIds, Missing> {
    detect(uid, config.sandbox_ids_needed(), config.sandbox_uid_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_by_name_or_id_first_line_wins() {
        let text = "alice:100000:65536\n# junk\n1001:200000:10\nbob:300000:0\nbob:400000:5\n";
        assert_eq!(range_in(text, Some("alice"), 1000), Some((100_000, 65_536)));
        assert_eq!(range_in(text, Some("carol"), 1001), Some((200_000, 10)));
        assert_eq!(
            range_in(text, Some("bob"), 7),
            Some((400_000, 5)),
            "empty range skipped"
        );
        assert_eq!(range_in(text, None, 9), None);
        assert_eq!(range_in("", Some("alice"), 1000), None);
    }

    #[test]
    fn names_come_from_passwd() {
        let text = "root:x:0:0:root:/root:/bin/bash\nforkd-it:x:999:995::/:/usr/sbin/nologin\n";
        assert_eq!(name_in(text, 999).as_deref(), Some("forkd-it"));
        assert_eq!(name_in(text, 5), None);
    }

    #[test]
    fn a_missing_line_or_a_small_range_says_what_to_add() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(etc.path().join("subuid"), "me:100000:65536\n").unwrap();
        let e = detect_in(etc.path(), Some("me"), 1000, 10, 65_536).unwrap_err();
        assert!(e.0.contains("subgid has no line for me"), "{e:?}");
        assert!(e.0.contains("`me:100000:65536`"), "{e:?}");
        std::fs::write(etc.path().join("subgid"), "me:100000:16\n").unwrap();
        if helper("newuidmap").is_some() && helper("newgidmap").is_some() {
            let e = detect_in(etc.path(), Some("me"), 1000, 32, 65_536).unwrap_err();
            assert!(e.0.contains("holds 16 ids, fewer than the 32"), "{e:?}");
            let ok = detect_in(etc.path(), Some("me"), 1000, 10, 12).unwrap();
            assert_eq!(
                (ok.uid_start, ok.gid_start, ok.count),
                (100_000, 100_000, 12)
            );
        }
    }
}
