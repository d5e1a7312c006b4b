//! Workspaces through a real daemon: every mode, direct and overlay, delta
//! export and apply, escapes attempted from inside the sandbox (each must
//! fail while the bystander paths keep working), refusals, and no mounts
//! left behind. Probes report `ok:<value>`, an errno name, or `exc:...`.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use forkd_ipc::{WorkspaceMode, WorkspaceRequest};

const PRELUDE: &str = r#"
import ctypes, errno, json, mmap, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def op(f):
    try:
        return "ok:" + repr(f())[:200]
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "exc:" + type(e).__name__
    except BaseException as e:
        return "exc:%s: %s" % (type(e).__name__, str(e)[:200])
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return errno.errorcode.get(ctypes.get_errno(), "?") if r == -1 else "ok:%d" % r
def read(p):
    with open(p) as f:
        return f.read()
def write(p, s="x"):
    with open(p, "w") as f:
        return f.write(s)
W = "/workspace"
R = {}
"#;

/// A project tree on the host: `src/` code, `out/` output, `secrets/`,
/// `.env`, `docs/` (view), plus symlinks planted by the "host".
struct Tree {
    _dir: tempfile::TempDir,
    /// The directory allowed as a workspace root (holds `proj` and `outside`).
    base: PathBuf,
    proj: PathBuf,
    outside: PathBuf,
}

fn tree() -> Tree {
    let dir = tempfile::Builder::new()
        .prefix("forkd-ws-")
        .tempdir()
        .unwrap();
    let base = fs::canonicalize(dir.path()).unwrap();
    let proj = base.join("proj");
    let outside = base.join("outside");
    for d in ["src/pkg", "out/keep", "secrets/deep", "docs"] {
        fs::create_dir_all(proj.join(d)).unwrap();
    }
    fs::create_dir_all(&outside).unwrap();
    for (f, c) in [
        ("src/a.py", "print('a')"),
        ("src/pkg/m.py", "M"),
        ("out/old.txt", "old"),
        ("out/keep/k.txt", "k"),
        ("secrets/key", "SECRET-KEY"),
        ("secrets/deep/x", "SECRET-X"),
        (".env", "TOKEN=SECRET-ENV"),
        ("docs/d.md", "VIEW-CONTENT"),
        ("docs/README", "readable"),
    ] {
        fs::write(proj.join(f), c).unwrap();
    }
    fs::write(outside.join("canary"), "OUTSIDE").unwrap();
    // Host symlinks: absolute out of the workspace, relative out of it,
    // and from a read area into a none one.
    symlink(outside.join("canary"), proj.join("src/abs_out")).unwrap();
    symlink("../../outside/canary", proj.join("src/rel_out")).unwrap();
    symlink("../secrets/key", proj.join("src/to_secret")).unwrap();
    symlink(proj.join("secrets/key"), proj.join("src/abs_secret")).unwrap();
    Tree {
        _dir: dir,
        base,
        proj,
        outside,
    }
}

fn rules() -> Vec<String> {
    [
        "secrets=none",
        "**/*.env=none",
        "out=write",
        "docs=view",
        "docs/README=read",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ws(path: &Path, mode: WorkspaceMode) -> WorkspaceRequest {
    WorkspaceRequest {
        path: Some(path.display().to_string()),
        rules: rules(),
        mode,
        ..Default::default()
    }
}

async fn start(base: &Path) -> TestDaemon {
    let base = base.to_path_buf();
    TestDaemon::start(move |c| {
        c.workspace_roots = vec![base];
        for z in &mut c.zygotes {
            z.warm_pool = 2;
        }
    })
    .await
}

async fn probe(
    d: &TestDaemon,
    w: WorkspaceRequest,
    body: &str,
) -> (BTreeMap<String, String>, forkd_ipc::SpawnResult) {
    let mut r = req(&format!("{PRELUDE}{body}\nprint(json.dumps(R))\n"));
    r.workspace = Some(w);
    let res = d.spawn(&r).await.expect("probe spawn");
    assert_eq!(
        (res.exit_code, res.killed_by),
        (Some(0), None),
        "probe failed; stdout: {} stderr: {}",
        res.stdout_lossy(),
        res.stderr_lossy()
    );
    let out = res.stdout_lossy();
    let line = out.lines().last().unwrap_or("{}");
    (serde_json::from_str(line).expect("probe JSON"), res)
}

fn expect(table: &mut Table, got: &BTreeMap<String, String>, cases: &[(&str, &[&str])]) {
    for (name, want) in cases {
        let g = got.get(*name).map(String::as_str).unwrap_or("<missing>");
        table.check(name, g, want);
    }
}

/// Every mode in direct mode, and the escapes that must fail there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_modes_and_escapes() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let body = r#"
R["list_root"] = op(lambda: sorted(os.listdir(W)))
R["none_open"] = op(lambda: read(W + "/secrets/key"))
R["none_stat"] = op(lambda: os.stat(W + "/secrets"))
R["none_deep"] = op(lambda: read(W + "/secrets/deep/x"))
R["none_glob"] = op(lambda: read(W + "/.env"))
R["read_file"] = op(lambda: read(W + "/src/a.py"))
R["read_write"] = op(lambda: write(W + "/src/a.py"))
R["read_create"] = op(lambda: write(W + "/src/new.py"))
R["read_unlink"] = op(lambda: os.unlink(W + "/src/a.py"))
R["view_list"] = op(lambda: sorted(os.listdir(W + "/docs")))
R["view_stat"] = op(lambda: os.stat(W + "/docs/d.md").st_size)
R["view_open"] = op(lambda: read(W + "/docs/d.md"))
R["view_readme"] = op(lambda: read(W + "/docs/README"))
R["view_write"] = op(lambda: write(W + "/docs/d.md"))
def via_opath():
    fd = os.open(W + "/docs/d.md", os.O_PATH)
    return read("/proc/self/fd/%d" % fd)
R["view_proc_fd"] = op(via_opath)
def view_sendfile():
    fd = os.open(W + "/docs/d.md", os.O_PATH)
    out = os.open("/tmp/sf", os.O_WRONLY | os.O_CREAT)
    return os.sendfile(out, fd, 0, 100)
R["view_sendfile"] = op(view_sendfile)
def view_mmap():
    fd = os.open(W + "/docs/d.md", os.O_PATH)
    return mmap.mmap(fd, 12, prot=mmap.PROT_READ)[:]
R["view_mmap"] = op(view_mmap)
R["write_create"] = op(lambda: write(W + "/out/new.txt", "new"))
R["write_mkdir"] = op(lambda: os.makedirs(W + "/out/sub/dir"))
R["write_delete"] = op(lambda: os.unlink(W + "/out/old.txt"))
R["dotdot"] = op(lambda: read(W + "/src/../../" + "etc/shadow"))
R["dotdot_none"] = op(lambda: read(W + "/src/../secrets/key"))
R["abs_symlink_out"] = op(lambda: read(W + "/src/abs_out"))
R["rel_symlink_out"] = op(lambda: read(W + "/src/rel_out"))
R["symlink_read_to_none"] = op(lambda: read(W + "/src/to_secret"))
R["abs_symlink_to_none"] = op(lambda: read(W + "/src/abs_secret"))
R["own_symlink_to_none"] = op(lambda: (os.symlink("../secrets/key", W + "/out/lnk"), read(W + "/out/lnk")))
R["hardlink_read_into_write"] = op(lambda: os.link(W + "/src/a.py", W + "/out/a_link"))
R["hardlink_view_into_write"] = op(lambda: os.link(W + "/docs/d.md", W + "/out/d_link"))
R["rename_write_to_read"] = op(lambda: os.rename(W + "/out/keep/k.txt", W + "/src/k.txt"))
R["rename_read_to_write"] = op(lambda: os.rename(W + "/src/a.py", W + "/out/a.py"))
R["rename_view_to_write"] = op(lambda: os.rename(W + "/docs/d.md", W + "/out/d.md"))
R["proc_root"] = op(lambda: read("/proc/self/root/workspace/secrets/key"))
R["proc_1_root"] = op(lambda: read("/proc/1/root/workspace/.env"))
R["mknod_whiteout"] = op(lambda: os.mknod(W + "/out/wh", 0o600 | 0o020000, 0))
buf = ctypes.create_string_buffer(128 + 8)
ctypes.memmove(buf, (128).to_bytes(4, "little"), 4)
mid = ctypes.c_int(0)
R["name_to_handle_at"] = sc(303, -100, (W + "/docs/d.md").encode(), buf, ctypes.byref(mid), 0)
R["open_by_handle_at"] = sc(304, os.open(W, os.O_RDONLY), buf, 0)
R["remount_rw"] = sc(165, None, (W + "/src").encode(), None, 0x20 | 0x1000, None)
R["umount_workspace"] = sc(166, (W + "/src").encode(), 2)
"#;
    let (got, _) = probe(&d, ws(&t.proj, WorkspaceMode::Direct), body).await;
    let mut table = Table::new();
    expect(
        &mut table,
        &got,
        &[
            ("list_root", &["ok:['docs', 'out', 'src']"]),
            ("none_open", &["ENOENT"]),
            ("none_stat", &["ENOENT"]),
            ("none_deep", &["ENOENT"]),
            ("none_glob", &["ENOENT"]),
            ("read_file", &["ok:\"print('a')\""]),
            ("read_write", &["EROFS"]),
            ("read_create", &["EROFS"]),
            ("read_unlink", &["EROFS"]),
            ("view_list", &["ok:['README', 'd.md']"]),
            ("view_stat", &["ok:12"]),
            ("view_open", &["EACCES"]),
            ("view_readme", &["ok:'readable'"]),
            ("view_write", &["EROFS", "EACCES"]),
            ("view_proc_fd", &["EACCES"]),
            ("view_sendfile", &["EBADF"]),
            ("view_mmap", &["EBADF"]),
            ("write_create", &["ok:3"]),
            ("write_mkdir", &["ok:None"]),
            ("write_delete", &["ok:None"]),
            ("dotdot", &["ENOENT"]),
            ("dotdot_none", &["ENOENT"]),
            ("abs_symlink_out", &["ENOENT"]),
            ("rel_symlink_out", &["ENOENT"]),
            ("symlink_read_to_none", &["ENOENT"]),
            ("abs_symlink_to_none", &["ENOENT"]),
            ("own_symlink_to_none", &["ENOENT"]),
            ("hardlink_read_into_write", &["EXDEV"]),
            ("hardlink_view_into_write", &["EXDEV"]),
            ("rename_write_to_read", &["EXDEV", "EROFS"]),
            ("rename_read_to_write", &["EXDEV", "EROFS"]),
            ("rename_view_to_write", &["EXDEV", "EROFS"]),
            ("proc_root", &["ENOENT"]),
            ("proc_1_root", &["ENOENT"]),
            ("mknod_whiteout", &["EACCES", "EPERM"]),
            ("name_to_handle_at", &["EPERM", "EACCES", "ok:0"]),
            ("open_by_handle_at", &["EPERM"]),
            ("remount_rw", &["EPERM"]),
            ("umount_workspace", &["EPERM"]),
        ],
    );
    table.assert_all("direct workspace");
    // Bystanders: the write area's changes reached the host, nothing else moved.
    assert_eq!(
        fs::read_to_string(t.proj.join("out/new.txt")).unwrap(),
        "new"
    );
    assert!(!t.proj.join("out/old.txt").exists());
    assert!(t.proj.join("out/sub/dir").is_dir());
    assert_eq!(
        fs::read_to_string(t.proj.join("src/a.py")).unwrap(),
        "print('a')"
    );
    assert_eq!(
        fs::read_to_string(t.proj.join("docs/d.md")).unwrap(),
        "VIEW-CONTENT"
    );
    assert_eq!(
        fs::read_to_string(t.outside.join("canary")).unwrap(),
        "OUTSIDE"
    );
    assert!(!t.proj.join("out/wh").exists());
    // The sandbox next door, without a workspace, still works (warm: on a
    // loaded machine the pool may still be refilling, so wait for a child).
    let pool = d
        .daemon
        .warm
        .get("default")
        .expect("default zygote has a pool");
    assert!(
        wait_until(Duration::from_secs(30), || pool.ready() > 0).await,
        "the warm pool did not refill"
    );
    let r = d
        .run("import os\ntry:\n    print(os.listdir('/workspace'))\nexcept OSError as e:\n    print(e.errno)")
        .await;
    assert_eq!(
        r.stdout_lossy(),
        "[]\n",
        "without a workspace: an empty mount point"
    );
    assert!(r.warm);
    d.finish().await;
}

/// Overlay mode: the host never changes, the delta records writes,
/// deletions and replaced directories, and applies to a copy; whiteouts
/// and opaque markers cannot be forged from inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_delta_export_and_apply() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let mut w = ws(&t.proj, WorkspaceMode::Overlay);
    w.rules.push("src=write".into());
    w.rules.push("src/pkg/m.py=read".into());
    w.export_delta = true;
    let body = r#"
import shutil
R["write"] = op(lambda: write(W + "/out/new.txt", "new"))
R["delete"] = op(lambda: os.unlink(W + "/out/old.txt"))
R["replace_dir"] = op(lambda: (shutil.rmtree(W + "/out/keep"), os.mkdir(W + "/out/keep"), write(W + "/out/keep/fresh", "f")))
R["src_edit"] = op(lambda: write(W + "/src/a.py", "print('b')"))
R["read_island"] = op(lambda: write(W + "/src/pkg/m.py"))
R["none_still_hidden"] = op(lambda: read(W + "/secrets/key"))
R["mknod_whiteout"] = op(lambda: os.mknod(W + "/out/wh", 0o600 | 0o020000, 0))
R["opaque_xattr"] = op(lambda: os.setxattr(W + "/out", "trusted.overlay.opaque", b"y"))
R["user_opaque_xattr"] = op(lambda: os.setxattr(W + "/out", "user.overlay.opaque", b"y"))
R["docs_write"] = op(lambda: write(W + "/docs/new"))
R["seen"] = op(lambda: sorted(os.listdir(W + "/out")))
"#;
    let (got, res) = probe(&d, w.clone(), body).await;
    let mut table = Table::new();
    expect(
        &mut table,
        &got,
        &[
            ("write", &["ok:3"]),
            ("delete", &["ok:None"]),
            ("replace_dir", &["ok:(None, None, 1)"]),
            ("src_edit", &["ok:10"]),
            ("read_island", &["EROFS"]),
            ("none_still_hidden", &["ENOENT"]),
            ("mknod_whiteout", &["EACCES", "EPERM"]),
            ("opaque_xattr", &["EPERM", "EOPNOTSUPP"]),
            // On a root daemon's overlay (trusted.* metadata) a user.*
            // xattr is the sandbox's data; the export must not believe it.
            ("user_opaque_xattr", &["EPERM", "EOPNOTSUPP", "ok:None"]),
            ("docs_write", &["EROFS"]),
            ("seen", &["ok:['keep', 'new.txt']"]),
        ],
    );
    table.assert_all("overlay workspace");
    // The host is untouched.
    assert_eq!(
        fs::read_to_string(t.proj.join("out/old.txt")).unwrap(),
        "old"
    );
    assert!(!t.proj.join("out/new.txt").exists());
    assert_eq!(
        fs::read_to_string(t.proj.join("src/a.py")).unwrap(),
        "print('a')"
    );
    assert!(res.workspace_error.is_none(), "{:?}", res.workspace_error);
    let tar = res.workspace_delta.expect("delta exported");
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n == "out/.wh..wh..opq"),
        "a forged opaque marker: {names:?}"
    );
    for want in [
        "out/new.txt",
        "out/.wh.old.txt",
        "out/keep/.wh..wh..opq",
        "out/keep/fresh",
        "src/a.py",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("secrets") || n.contains("wh") && n.ends_with("/wh")),
        "{names:?}"
    );
    // Apply to a copy, with the same rules: the copy now matches what the
    // sandbox saw.
    let copy = t.base.join("copy");
    copy_tree(&t.proj, &copy);
    let rules = forkd_workspace::Rules::parse(&w.rules, forkd_workspace::Mode::Read).unwrap();
    forkd_workspace::apply_tar(&tar[..], &copy, Some(&rules)).unwrap();
    assert_eq!(fs::read_to_string(copy.join("out/new.txt")).unwrap(), "new");
    assert!(!copy.join("out/old.txt").exists());
    assert!(!copy.join("out/keep/k.txt").exists());
    assert_eq!(
        fs::read_to_string(copy.join("out/keep/fresh")).unwrap(),
        "f"
    );
    assert_eq!(
        fs::read_to_string(copy.join("src/a.py")).unwrap(),
        "print('b')"
    );
    assert_eq!(
        fs::read_to_string(copy.join("secrets/key")).unwrap(),
        "SECRET-KEY"
    );
    // With narrower rules (src read) the same delta is refused.
    let narrow =
        forkd_workspace::Rules::parse(&["out=write"], forkd_workspace::Mode::Read).unwrap();
    assert!(forkd_workspace::apply_tar(&tar[..], &copy, Some(&narrow)).is_err());

    // A file the sandbox names like a whiteout is refused at export, not
    // turned into a deletion of `out/keep`.
    let mut w2 = ws(&t.proj, WorkspaceMode::Overlay);
    w2.export_delta = true;
    let (_, res) = probe(&d, w2, r#"R["x"] = op(lambda: write(W + "/out/.wh.keep"))"#).await;
    assert!(res.workspace_delta.is_none());
    let e = res.workspace_error.expect("refused");
    assert!(e.contains(".wh.keep"), "{e}");

    // The overlay's upper layer is bounded by the scratch size.
    let mut r = req(&format!(
        "{PRELUDE}R['big'] = op(lambda: write(W + '/out/big', 'x' * (24 << 20)))\nprint(json.dumps(R))\n"
    ));
    r.limits.scratch_bytes = Some(8 << 20);
    r.workspace = Some(ws(&t.proj, WorkspaceMode::Overlay));
    let res = d.spawn(&r).await.unwrap();
    assert!(
        res.stdout_lossy().contains("ENOSPC"),
        "{}",
        res.stdout_lossy()
    );
    d.finish().await;
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A host symlink swapped in for a planned directory while requests are
/// being set up (TOCTOU): each sandbox either fails setup with a clear
/// error or sees the real directory; never the symlink's target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_symlink_swapped_during_setup() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let real = t.proj.join("out");
    let decoy = t.base.join("decoy");
    symlink(&t.outside, &decoy).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, real, decoy) = (stop.clone(), real.clone(), decoy.clone());
        std::thread::spawn(move || {
            let (a, b) = (
                std::ffi::CString::new(real.as_os_str().as_encoded_bytes()).unwrap(),
                std::ffi::CString::new(decoy.as_os_str().as_encoded_bytes()).unwrap(),
            );
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: renameat2 with valid NUL-terminated paths.
                unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                swaps += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            swaps
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..30 {
        let mut r = req(
            "import os\ntry:\n    open('/workspace/out/marker', 'w').write('m')\n    print(sorted(os.listdir('/workspace/out')))\nexcept OSError as e:\n    print('err', e.errno)\n",
        );
        r.workspace = Some(ws(&t.proj, WorkspaceMode::Direct));
        match d.spawn(&r).await {
            Ok(res) => {
                ok += 1;
                let out = res.stdout_lossy();
                assert!(
                    !out.contains("canary"),
                    "the sandbox saw the decoy's target: {out}"
                );
            }
            Err(e) => {
                refused += 1;
                let reply = server_error(e);
                assert!(
                    reply.message.contains("workspace") || reply.message.contains("symlink"),
                    "unclear refusal: {}",
                    reply.message
                );
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 10, "the swapper ran");
    assert!(
        !t.outside.join("marker").exists(),
        "a sandbox wrote through the swapped-in symlink"
    );
    eprintln!("swapped {swaps} times: {ok} sandboxes ran on the real directory, {refused} refused");
    d.finish().await;
}

/// Files the host creates while the sandbox runs inside a hidden
/// directory stay hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_created_later_under_none_stay_hidden() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let mut r = req(&format!(
        "{PRELUDE}
write('/tmp/ready')
deadline = time.time() + 10
while not os.path.exists('/tmp/go') and time.time() < deadline:
    time.sleep(0.01)
R['late'] = op(lambda: read(W + '/secrets/late'))
R['late_list'] = op(lambda: os.path.exists(W + '/secrets'))
print(json.dumps(R))
"
    ));
    r.workspace = Some(ws(&t.proj, WorkspaceMode::Direct));
    let client = d.client().await;
    let task = tokio::spawn(async move { client.spawn(&r).await });
    let pids = d
        .wait_for_scratch_file("ready", Duration::from_secs(20))
        .await;
    fs::write(t.proj.join("secrets/late"), "LATE").unwrap();
    for (pid, _) in &pids {
        fs::write(format!("/proc/{pid}/root/tmp/go"), "").unwrap();
    }
    let res = task.await.unwrap().unwrap();
    let out = res.stdout_lossy();
    assert!(out.contains(r#""late": "ENOENT""#), "{out}");
    assert!(out.contains(r#""late_list": "ok:False""#), "{out}");

    // Between requests, plans are reused while the directories they listed
    // are unchanged; a new matching name must invalidate that.
    std::thread::sleep(Duration::from_millis(2100)); // older than a timestamp race
    let probe_env = |name: &'static str| {
        let d = &d;
        let w = ws(&t.proj, WorkspaceMode::Direct);
        async move {
            let (got, _) = probe(
                d,
                w,
                &format!("R['e'] = op(lambda: read(W + '/src/{name}'))"),
            )
            .await;
            got["e"].clone()
        }
    };
    assert_eq!(probe_env("a.py").await, "ok:\"print('a')\"");
    assert_eq!(
        probe_env("a.py").await,
        "ok:\"print('a')\"",
        "from the cached plan"
    );
    fs::write(t.proj.join("src/new.env"), "SECRET").unwrap();
    assert_eq!(
        probe_env("new.env").await,
        "ENOENT",
        "a cached plan missed a new `none` name"
    );
    d.finish().await;
}

/// Disallowed host paths are refused with messages that say what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_for_disallowed_paths() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let private = t.base.join("private");
    fs::create_dir(&private).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(&t.base, fs::Permissions::from_mode(0o755)).unwrap();
    let base = t.base.clone();
    let named = t.proj.clone();
    let d = TestDaemon::start(move |c| {
        c.workspace_roots = vec![base.join("proj"), base.join("private")];
        c.allowed_uids = Some(vec![0, 65534]);
        c.workspaces.insert(
            "repo".into(),
            forkd::config::NamedWorkspace {
                path: named,
                rules: vec!["secrets=none".into(), "out=write".into()],
                default_mode: "read".into(),
                allowed_uids: Some(vec![0]),
            },
        );
    })
    .await;
    let spawn_err = |w: WorkspaceRequest| {
        let d = &d;
        async move {
            let mut r = req("print(1)");
            r.workspace = Some(w);
            server_error(d.spawn(&r).await.expect_err("refused"))
        }
    };
    let path_req = |p: &Path| WorkspaceRequest {
        path: Some(p.display().to_string()),
        ..Default::default()
    };
    let e = spawn_err(path_req(&t.outside)).await;
    assert_eq!(e.code, forkd_ipc::ErrorCode::PermissionDenied);
    assert!(e.message.contains("workspace_roots"), "{}", e.message);
    let e = spawn_err(path_req(Path::new("/etc"))).await;
    assert!(
        e.message.contains("outside the directories"),
        "{}",
        e.message
    );
    symlink(&t.proj, t.base.join("proj-link")).unwrap();
    let e = spawn_err(path_req(&t.base.join("proj-link"))).await;
    assert_eq!(e.code, forkd_ipc::ErrorCode::InvalidRequest);
    assert!(e.message.contains("symlink"), "{}", e.message);
    let e = spawn_err(WorkspaceRequest {
        name: Some("nope".into()),
        ..Default::default()
    })
    .await;
    assert!(
        e.message
            .contains("no workspace named `nope`; configured: repo"),
        "{}",
        e.message
    );
    let e = spawn_err(WorkspaceRequest {
        path: Some(t.proj.display().to_string()),
        mount_point: Some("/etc".into()),
        ..Default::default()
    })
    .await;
    assert!(e.message.contains("mount_point"), "{}", e.message);
    let e = spawn_err(WorkspaceRequest {
        path: Some(t.proj.display().to_string()),
        rules: vec![".env=none".into()],
        default_mode: Some("write".into()),
        ..Default::default()
    })
    .await;
    assert!(e.message.contains("overlay mode"), "{}", e.message);

    // A named workspace's rules are a ceiling the request cannot lift.
    let mut r = req(&format!(
        "{PRELUDE}R['s'] = op(lambda: read(W + '/secrets/key'))\nR['w'] = op(lambda: write(W + '/src/x'))\nprint(json.dumps(R))\n"
    ));
    r.workspace = Some(WorkspaceRequest {
        name: Some("repo".into()),
        rules: vec!["secrets=write".into(), "src=write".into()],
        ..Default::default()
    });
    let res = d.spawn(&r).await.unwrap();
    assert!(
        res.stdout_lossy().contains(r#""s": "ENOENT""#),
        "{}",
        res.stdout_lossy()
    );
    assert!(
        res.stdout_lossy().contains(r#""w": "EROFS""#),
        "{}",
        res.stdout_lossy()
    );

    // ... also when the request has no rules of its own (the walk must
    // follow the ceiling's rules).
    let mut r = req(&format!(
        "{PRELUDE}R['s'] = op(lambda: read(W + '/secrets/key'))\nprint(json.dumps(R))\n"
    ));
    r.workspace = Some(WorkspaceRequest {
        name: Some("repo".into()),
        ..Default::default()
    });
    let res = d.spawn(&r).await.unwrap();
    assert!(
        res.stdout_lossy().contains(r#""s": "ENOENT""#),
        "{}",
        res.stdout_lossy()
    );

    // Another uid: a directory it cannot read, and a named workspace it
    // is not allowed to use (checked with its own credentials).
    let run_as_nobody = |args: Vec<String>| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    use std::os::unix::process::CommandExt;
    // The socket's directory must be reachable for uid 65534.
    if let Some(dir) = d.socket.parent() {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&d.socket, fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = run_as_nobody(vec![
        "--workspace".into(),
        private.display().to_string(),
        "-c".into(),
        "print(1)".into(),
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("uid 65534 cannot read"), "{err}");
    let (code, err) = run_as_nobody(vec![
        "--workspace-name".into(),
        "repo".into(),
        "-c".into(),
        "print(1)".into(),
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("may not use workspace `repo`"), "{err}");
    // A plan too large for one zygote message is refused with a hint.
    fs::create_dir(private.join("v")).unwrap();
    for i in 0..4000 {
        fs::write(
            private.join(format!("a-file-with-a-longish-name-{i:05}.txt")),
            "",
        )
        .unwrap();
    }
    let e = spawn_err(WorkspaceRequest {
        path: Some(private.display().to_string()),
        rules: vec!["v=view".into()],
        ..Default::default()
    })
    .await;
    assert!(
        e.message.contains("fewer or broader rules"),
        "{}",
        e.message
    );

    // ... while root may.
    let (code, err) = (
        d.spawn(&{
            let mut r = req("print(1)");
            r.workspace = Some(path_req(&private));
            r
        })
        .await
        .map(|r| r.exit_code),
        "",
    );
    assert_eq!(code.unwrap(), Some(0), "{err}");
    d.finish().await;
}

/// Many spawns with workspaces (both modes) leave no mounts, upper layers
/// or processes behind (the harness compares the host's mountinfo).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mounts_left_after_many_spawns() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let client = d.client().await;
    let n = std::env::var("FORKD_WS_SPAWNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = client.clone();
        let mut r = req("import os; print(len(os.listdir('/workspace')))");
        let mut w = ws(
            &t.proj,
            if i % 2 == 0 {
                WorkspaceMode::Direct
            } else {
                WorkspaceMode::Overlay
            },
        );
        w.export_delta = i % 4 == 1;
        r.workspace = Some(w);
        tasks.push(tokio::spawn(async move { client.spawn(&r).await }));
        if tasks.len() >= 8 {
            for t in tasks.drain(..) {
                let res = t.await.unwrap().unwrap();
                assert_eq!(res.stdout_lossy(), "3\n");
            }
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().stdout_lossy(), "3\n");
    }
    drop(client);
    let socket_dir = d.socket.parent().unwrap().to_path_buf();
    // Upper layers are removed shortly after each result.
    assert!(
        wait_until(Duration::from_secs(10), || fs::read_dir(
            socket_dir.join("workspaces")
        )
        .map(|r| r.count() == 0)
        .unwrap_or(true))
        .await,
        "overlay upper layers left behind"
    );
    d.finish().await;
}

/// A session keeps its workspace across cells, commands and file calls;
/// the rules hold for all of them; an overlay never reaches the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_workspace_and_its_rules() {
    if skip_unless_root("starts a daemon that mounts workspaces") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let c = d.client().await;
    let s = c
        .session_create(&forkd_ipc::SessionCreate {
            workspace: Some(ws(&t.proj, WorkspaceMode::Overlay)),
            ..Default::default()
        })
        .await
        .unwrap()
        .session;
    let cell = |code: &str| forkd_ipc::RunCode {
        session: s.clone(),
        code: code.into(),
        timeout_ms: Some(20_000),
    };
    let r = c
        .run_code(&cell("open('/workspace/out/new.txt', 'w').write('n')\nsorted(os.listdir('/workspace')) if (os := __import__('os')) else 0"))
        .await
        .unwrap();
    let listing = r.text.unwrap_or_default();
    assert!(
        listing.contains("'src'") && !listing.contains("secrets"),
        "{listing}"
    );
    let r = c
        .run_code(&cell("open('/workspace/out/new.txt').read()"))
        .await
        .unwrap();
    assert_eq!(r.text.as_deref(), Some("'n'"), "{r:?}");
    let e = server_error(c.read_file(&s, "/workspace/secrets/key").await.unwrap_err());
    assert_eq!(e.code, forkd_ipc::ErrorCode::NotFound, "{e:?}");
    let e = server_error(
        c.write_file(&s, "/workspace/src/a.py", b"x", None)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, forkd_ipc::ErrorCode::FileError, "{e:?}");
    let out = c
        .command(&forkd_ipc::Command {
            session: s.clone(),
            cmd: "cat /workspace/src/a.py; cat /workspace/secrets/key".into(),
            timeout_ms: Some(20_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(out.stdout, b"print('a')");
    assert_ne!(out.exit_code, Some(0));
    // The changes so far, while the session lives (and again after more).
    let files = |tar: Vec<u8>| -> Vec<(String, Vec<u8>)> {
        use std::io::Read;
        let mut a = tar::Archive::new(&tar[..]);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect()
    };
    let delta = files(c.session_workspace_delta(&s).await.unwrap());
    assert!(
        delta.contains(&("out/new.txt".into(), b"n".to_vec())),
        "{delta:?}"
    );
    c.run_code(&cell("import os; os.unlink('/workspace/out/old.txt')"))
        .await
        .unwrap();
    let delta = files(c.session_workspace_delta(&s).await.unwrap());
    let names: Vec<&str> = delta.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"out/.wh.old.txt") && names.contains(&"out/new.txt"),
        "{names:?}"
    );
    // The same through forkd-run, to stdout.
    let (socket, sid) = (d.socket.clone(), s.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .args(["session", "delta", "--socket"])
            .arg(&socket)
            .args([sid.as_str(), "-"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(files(out.stdout)
        .iter()
        .any(|(n, d)| n == "out/new.txt" && d == b"n"));
    c.session_kill(&s).await.unwrap();
    let e = server_error(c.session_workspace_delta(&s).await.unwrap_err());
    assert_eq!(e.code, forkd_ipc::ErrorCode::SessionEnded, "{e:?}");
    assert!(
        !t.proj.join("out/new.txt").exists(),
        "an overlay reached the host"
    );
    // export_delta is spawn's; a session is told what to use instead.
    let mut asks_export = ws(&t.proj, WorkspaceMode::Overlay);
    asks_export.export_delta = true;
    let e = server_error(
        c.session_create(&forkd_ipc::SessionCreate {
            workspace: Some(asks_export),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    assert!(e.message.contains("session_workspace_delta"), "{e:?}");
    // No workspace, or a direct one: nothing to export, said so.
    for workspace in [None, Some(ws(&t.proj, WorkspaceMode::Direct))] {
        let s = c
            .session_create(&forkd_ipc::SessionCreate {
                workspace,
                ..Default::default()
            })
            .await
            .unwrap()
            .session;
        let e = server_error(c.session_workspace_delta(&s).await.unwrap_err());
        assert_eq!(e.code, forkd_ipc::ErrorCode::InvalidRequest, "{e:?}");
        assert!(e.message.contains("overlay"), "{e:?}");
        c.session_kill(&s).await.unwrap();
    }
    drop(c);
    d.finish().await;
}

/// Rules that mounts alone enforce (no `view`): what a branchable session
/// may have.
fn rules_without_view() -> Vec<String> {
    ["secrets=none", "**/*.env=none", "out=write"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn ws_branchable(path: &Path) -> WorkspaceRequest {
    WorkspaceRequest {
        path: Some(path.display().to_string()),
        rules: rules_without_view(),
        mode: WorkspaceMode::Overlay,
        ..Default::default()
    }
}

/// Runs `body` (after PRELUDE) as a cell of session `s` and returns its `R`.
async fn probe_cell(c: &forkd_ipc::AsyncClient, s: &str, body: &str) -> BTreeMap<String, String> {
    let r = c
        .run_code(&common::cells::cell(
            s,
            &format!("{PRELUDE}{body}\nprint(json.dumps(R))\n"),
        ))
        .await
        .unwrap();
    assert!(
        r.error.is_none(),
        "{:?}\n{}",
        r.error,
        String::from_utf8_lossy(&r.stderr)
    );
    let out = String::from_utf8_lossy(&r.stdout).to_string();
    serde_json::from_str(out.lines().last().unwrap_or("{}")).expect("probe JSON")
}

/// The entries of a delta tar: name and content.
fn tar_entries(tar: &[u8]) -> BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut a = tar::Archive::new(tar);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

/// Issue 18's "branches of a session get their own copy of the delta": a
/// branch of an overlay-workspace session starts with the session's
/// changes (files, a deletion, an opaque directory, a hard link, a
/// symlink), keeps its rules (hidden paths absent, read paths read-only,
/// the escapes fail), and from then on writes only its own layer: the
/// session, a sibling and the host never see its writes, nor it theirs.
/// Each exports its own delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_session_branches_each_get_their_own_delta() {
    if skip_unless_root("starts a daemon that mounts workspaces and branches sessions") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let c = d.client().await;
    let s = c
        .session_create(&forkd_ipc::SessionCreate {
            workspace: Some(ws_branchable(&t.proj)),
            ..Default::default()
        })
        .await
        .unwrap()
        .session;
    let before = probe_cell(
        &c,
        &s,
        r#"
import shutil, stat
x = 41
write(W + "/out/s1.txt", "S1")
os.unlink(W + "/out/old.txt")
shutil.rmtree(W + "/out/keep"); os.mkdir(W + "/out/keep"); write(W + "/out/keep/n.txt", "N")
os.mkdir(W + "/out/sub"); write(W + "/out/sub/f", "F")
os.link(W + "/out/s1.txt", W + "/out/s1.link")
os.symlink("s1.txt", W + "/out/s1.sym")
# For the daemon's copy: a symlink it must not follow, a link across dirs.
os.symlink("/etc", W + "/out/evil")
os.mkdir(W + "/out/sub/deeper"); os.link(W + "/out/sub/f", W + "/out/sub/deeper/g")
# The session can be branched, and that widened nothing: still no device
# nodes (a 0/0 one would be a whiteout) and no overlay markers.
R["s_whiteout"] = op(lambda: os.mknod(W + "/out/w", 0o600 | stat.S_IFCHR, 0))
R["s_opaque"] = op(lambda: os.setxattr(W + "/out", "trusted.overlay.opaque", b"y"))
R["s_src_write"] = op(lambda: write(W + "/src/a.py"))
R["s_uid"] = op(lambda: os.getuid())
R["s_mine"] = op(lambda: (os.getgid() == os.getuid(), os.stat(W + "/out/s1.txt").st_uid == os.getuid()))
"#,
    )
    .await;
    let mut table = Table::new();
    expect(
        &mut table,
        &before,
        &[
            ("s_whiteout", &["EACCES", "EPERM"]),
            ("s_opaque", &["EPERM"]),
            ("s_src_write", &["EROFS"]),
            ("s_mine", &["ok:(True, True)"]),
        ],
    );
    table.assert_all("overlay session before branching");
    // The session runs as its own uid, not host root.
    let s_uid = before.get("s_uid").cloned().unwrap_or_default();
    assert!(
        s_uid.starts_with("ok:") && s_uid != "ok:0",
        "an overlay session's uid: {s_uid}"
    );
    let mut host_uids = vec![s_uid];

    let branches = c
        .session_branch(forkd_ipc::SessionBranch {
            session: s.clone(),
            count: 2,
            same_seed: false,
            force: false,
            labels: None,
        })
        .await
        .unwrap();
    let (b1, b2) = (branches[0].session.clone(), branches[1].session.clone());
    for b in [&b1, &b2] {
        let got = probe_cell(
            &c,
            b,
            r#"
import stat
R["x"] = op(lambda: x)
R["s1"] = op(lambda: read(W + "/out/s1.txt"))
R["old"] = op(lambda: read(W + "/out/old.txt"))
R["keep"] = op(lambda: sorted(os.listdir(W + "/out/keep")))
R["sub"] = op(lambda: read(W + "/out/sub/f"))
R["link"] = op(lambda: (os.stat(W + "/out/s1.link").st_nlink, read(W + "/out/s1.link")))
R["sym"] = op(lambda: os.readlink(W + "/out/s1.sym"))
R["evil"] = op(lambda: (os.path.islink(W + "/out/evil"), os.readlink(W + "/out/evil")))
R["deep_link"] = op(lambda: (os.stat(W + "/out/sub/deeper/g").st_nlink, os.stat(W + "/out/sub/deeper/g").st_ino == os.stat(W + "/out/sub/f").st_ino))
R["listed"] = op(lambda: sorted(n for n in os.listdir(W) if n in ("secrets", ".env")))
R["secret"] = op(lambda: read(W + "/secrets/key"))
R["secret_deep"] = op(lambda: os.stat(W + "/secrets/deep/x"))
R["env"] = op(lambda: read(W + "/.env"))
R["src"] = op(lambda: read(W + "/src/a.py") == "print('a')")
R["src_write"] = op(lambda: write(W + "/src/a.py"))
R["src_new"] = op(lambda: write(W + "/src/new.py"))
R["dotdot"] = op(lambda: read(W + "/out/../secrets/key"))
R["rel_to_secret"] = op(lambda: read(W + "/src/to_secret"))
R["abs_out"] = op(lambda: read(W + "/src/abs_out"))
R["my_symlink"] = op(lambda: (os.symlink("../secrets/key", W + "/out/sym"), read(W + "/out/sym")))
R["hardlink_in"] = op(lambda: os.link(W + "/src/a.py", W + "/out/hl"))
R["rename_to_read"] = op(lambda: os.rename(W + "/out/s1.txt", W + "/src/s1.txt"))
R["rename_from_read"] = op(lambda: os.rename(W + "/src/a.py", W + "/out/a.py"))
R["proc_root"] = op(lambda: read("/proc/self/root/workspace/secrets/key"))
R["proc_fd"] = op(lambda: read("/proc/self/fd/%d/../secrets/key" % os.open(W + "/out", os.O_RDONLY)))
R["whiteout"] = op(lambda: os.mknod(W + "/out/w", 0o600 | stat.S_IFCHR, 0))
R["opaque"] = op(lambda: os.setxattr(W + "/out", "trusted.overlay.opaque", b"y"))
R["host_uid"] = op(lambda: int(read("/proc/self/uid_map").split()[1]))
R["mine"] = op(lambda: (os.stat(W + "/out/s1.txt").st_uid == os.getuid(), os.access(W + "/out/s1.txt", os.W_OK)))
"#,
        )
        .await;
        // Its own host uid (uid 0 of its user namespace), which owns the
        // copy of the session's changes.
        let host_uid = got.get("host_uid").cloned().unwrap_or_default();
        assert!(
            host_uid.starts_with("ok:") && !host_uids.contains(&host_uid) && host_uid != "ok:0",
            "a branch's host uid {host_uid}, others {host_uids:?}"
        );
        host_uids.push(host_uid);
        let mut table = Table::new();
        expect(
            &mut table,
            &got,
            &[
                ("mine", &["ok:(True, True)"]),
                ("x", &["ok:41"]),
                ("s1", &["ok:'S1'"]),
                ("old", &["ENOENT"]),
                ("keep", &["ok:['n.txt']"]),
                ("sub", &["ok:'F'"]),
                ("link", &["ok:(2, 'S1')"]),
                ("sym", &["ok:'s1.txt'"]),
                ("evil", &["ok:(True, '/etc')"]),
                ("deep_link", &["ok:(2, True)"]),
                ("listed", &["ok:[]"]),
                ("secret", &["ENOENT"]),
                ("secret_deep", &["ENOENT"]),
                ("env", &["ENOENT"]),
                ("src", &["ok:True"]),
                ("src_write", &["EROFS"]),
                ("src_new", &["EROFS"]),
                ("dotdot", &["ENOENT"]),
                ("rel_to_secret", &["ENOENT"]),
                ("abs_out", &["ENOENT"]),
                ("my_symlink", &["ENOENT"]),
                ("hardlink_in", &["EXDEV"]),
                ("rename_to_read", &["EXDEV"]),
                ("rename_from_read", &["EXDEV"]),
                ("proc_root", &["ENOENT"]),
                ("proc_fd", &["ENOENT"]),
                ("whiteout", &["EACCES", "EPERM"]),
                ("opaque", &["EPERM"]),
            ],
        );
        table.assert_all("a branch's workspace");
    }
    // Divergence: each writes its own layer.
    common::cells::text(&c, &b1, "open('/workspace/out/b1.txt', 'w').write('B1'); open('/workspace/out/s1.txt', 'w').write('B1MOD')").await;
    common::cells::text(&c, &b2, "open('/workspace/out/b2.txt', 'w').write('B2')").await;
    common::cells::text(&c, &s, "open('/workspace/out/s2.txt', 'w').write('S2')").await;
    let look = "import os; (sorted(n for n in os.listdir('/workspace/out') if n[:1] in 'bs' and n.endswith('.txt')), open('/workspace/out/s1.link').read())";
    assert_eq!(
        common::cells::text(&c, &s, look).await,
        "(['s1.txt', 's2.txt'], 'S1')",
        "the session"
    );
    assert_eq!(
        common::cells::text(&c, &b1, look).await,
        "(['b1.txt', 's1.txt'], 'B1MOD')",
        "branch 1 (its write through one name of a hard link shows through the other)"
    );
    assert_eq!(
        common::cells::text(&c, &b2, look).await,
        "(['b2.txt', 's1.txt'], 'S1')",
        "branch 2"
    );
    // Each exports its own delta.
    let d1 = tar_entries(&c.session_workspace_delta(&b1).await.unwrap());
    let ds = tar_entries(&c.session_workspace_delta(&s).await.unwrap());
    assert_eq!(
        d1.get("out/b1.txt").map(Vec::as_slice),
        Some(&b"B1"[..]),
        "{:?}",
        d1.keys()
    );
    assert_eq!(d1.get("out/s1.txt").map(Vec::as_slice), Some(&b"B1MOD"[..]));
    assert!(d1.contains_key("out/.wh.old.txt"), "{:?}", d1.keys());
    assert!(d1.contains_key("out/keep/.wh..wh..opq"), "{:?}", d1.keys());
    assert_eq!(d1.get("out/sub/f").map(Vec::as_slice), Some(&b"F"[..]));
    assert!(!d1.contains_key("out/s2.txt") && !d1.contains_key("out/b2.txt"));
    assert_eq!(ds.get("out/s1.txt").map(Vec::as_slice), Some(&b"S1"[..]));
    assert!(ds.contains_key("out/s2.txt") && !ds.contains_key("out/b1.txt"));
    // The host directory never changed.
    assert_eq!(
        fs::read_to_string(t.proj.join("out/old.txt")).unwrap(),
        "old"
    );
    assert!(t.proj.join("out/keep/k.txt").exists());
    for f in ["out/s1.txt", "out/s2.txt", "out/b1.txt", "out/b2.txt"] {
        assert!(!t.proj.join(f).exists(), "{f} reached the host");
    }
    // A branch with a workspace is not branched again; it checkpoints and
    // restores its own workspace.
    let e = server_error(
        c.session_branch(forkd_ipc::SessionBranch {
            session: b2.clone(),
            count: 1,
            same_seed: false,
            force: false,
            labels: None,
        })
        .await
        .unwrap_err(),
    );
    assert!(e.message.contains("branch with a workspace"), "{e:?}");
    let ck = c.session_checkpoint(&b2, false).await.unwrap().checkpoint;
    common::cells::text(&c, &b2, "open('/workspace/out/b2.txt', 'w').write('B2-LATER'); open('/workspace/out/b2b.txt', 'w').write('x')").await;
    c.session_restore(&b2, &ck).await.unwrap();
    assert_eq!(
        common::cells::text(&c, &b2, "import os; (open('/workspace/out/b2.txt').read(), os.path.exists('/workspace/out/b2b.txt'))").await,
        "('B2', False)",
        "branch 2 after its restore"
    );
    assert_eq!(
        common::cells::text(&c, &s, look).await,
        "(['s1.txt', 's2.txt'], 'S1')"
    );
    // A branch ends without touching the session's workspace.
    c.session_kill(&b1).await.unwrap();
    assert_eq!(
        common::cells::text(&c, &s, look).await,
        "(['s1.txt', 's2.txt'], 'S1')"
    );
    // A branch outlives its parent (docs/branch.md, "Lifetime"), workspace
    // included.
    c.session_kill(&s).await.unwrap();
    assert_eq!(
        common::cells::text(&c, &b2, "open('/workspace/out/b2.txt').read()").await,
        "'B2'",
        "branch 2 after its parent ended"
    );
    c.session_kill(&b2).await.unwrap();
    drop(c);
    d.finish().await;
}

/// Workspace sessions a branch cannot be made of say why and what to do
/// (direct mode; `view` rules), through the client and forkd-run; a
/// checkpoint is refused; and branch/kill cycles of an overlay session
/// leave no mount, process or descriptor behind (`finish`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_branch_refusals_and_no_leaks() {
    if skip_unless_root("starts a daemon that mounts workspaces and branches sessions") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let c = d.client().await;
    let create = |w: WorkspaceRequest| {
        let c = c.clone();
        async move {
            c.session_create(&forkd_ipc::SessionCreate {
                workspace: Some(w),
                ..Default::default()
            })
            .await
            .unwrap()
            .session
        }
    };
    let branch = |s: &str, count| forkd_ipc::SessionBranch {
        session: s.into(),
        count,
        same_seed: false,
        force: false,
        labels: None,
    };
    let mut direct = ws_branchable(&t.proj);
    direct.mode = WorkspaceMode::Direct;
    let sd = create(direct).await;
    let e = server_error(c.session_branch(branch(&sd, 1)).await.unwrap_err());
    assert_eq!(e.code, forkd_ipc::ErrorCode::InvalidRequest, "{e:?}");
    assert!(
        e.message.contains("direct") && e.message.contains("mode overlay"),
        "{e:?}"
    );
    let (socket, sid) = (d.socket.clone(), sd.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
            .args(["session", "branch", "--socket"])
            .arg(&socket)
            .arg(sid.as_str())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mode overlay"),
        "{out:?}"
    );
    let sv = create(ws(&t.proj, WorkspaceMode::Overlay)).await; // docs=view
    let e = server_error(c.session_branch(branch(&sv, 1)).await.unwrap_err());
    assert!(e.message.contains("`view`"), "{e:?}");
    for id in [&sd, &sv] {
        let e = server_error(c.session_checkpoint(id, false).await.unwrap_err());
        assert!(e.message.contains("cannot be checkpointed"), "{e:?}");
    }
    let so = create(ws_branchable(&t.proj)).await;
    for id in [&sd, &sv] {
        c.session_kill(id).await.unwrap();
    }
    common::cells::text(&c, &so, "open('/workspace/out/s.txt', 'w').write('S')").await;
    let n = std::env::var("FORKD_WS_BRANCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    for i in 0..n {
        let bs = c.session_branch(branch(&so, 2)).await.unwrap();
        for b in &bs {
            assert_eq!(
                common::cells::text(&c, &b.session, "open('/workspace/out/s.txt').read()").await,
                "'S'",
                "cycle {i}"
            );
            c.session_kill(&b.session).await.unwrap();
        }
    }
    c.session_kill(&so).await.unwrap();
    drop(c);
    d.finish().await;
}

/// Checkpoint and restore of an overlay-workspace session: the restore
/// puts the workspace's layer back as it was (files written after the
/// checkpoint disappear, deleted ones come back, changed ones revert), the
/// rules hold on the remounted workspace, a checkpoint restores twice, and
/// the host directory never changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_session_checkpoint_restores_the_workspace() {
    if skip_unless_root("starts a daemon that mounts workspaces") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let c = d.client().await;
    let s = c
        .session_create(&forkd_ipc::SessionCreate {
            workspace: Some(ws_branchable(&t.proj)),
            ..Default::default()
        })
        .await
        .unwrap()
        .session;
    let text = |code: &'static str| {
        let (c, s) = (c.clone(), s.clone());
        async move { common::cells::text(&c, &s, code).await }
    };
    text("import os\nx = 1\nopen('/workspace/out/a.txt', 'w').write('A')\nos.unlink('/workspace/out/old.txt')").await;
    let ck = c.session_checkpoint(&s, false).await.unwrap().checkpoint;
    let look = "(x, sorted(os.listdir('/workspace/out')), sorted(os.listdir('/workspace/out/keep')), open('/workspace/out/a.txt').read())";
    let want = "(1, ['a.txt', 'keep'], ['k.txt'], 'A')";
    for round in 0..2 {
        text("x = 2\nopen('/workspace/out/a.txt', 'w').write('A2')\nopen('/workspace/out/b.txt', 'w').write('B')\nos.unlink('/workspace/out/keep/k.txt')").await;
        assert_eq!(
            text(look).await,
            "(2, ['a.txt', 'b.txt', 'keep'], [], 'A2')",
            "round {round}"
        );
        c.session_restore(&s, &ck).await.unwrap();
        assert_eq!(text(look).await, want, "after restore {round}");
    }
    let got = probe_cell(
        &c,
        &s,
        r#"
R["secret"] = op(lambda: read(W + "/secrets/key"))
R["env"] = op(lambda: read(W + "/.env"))
R["src_write"] = op(lambda: write(W + "/src/a.py"))
R["hardlink_in"] = op(lambda: os.link(W + "/src/a.py", W + "/out/hl"))
R["out_write"] = op(lambda: write(W + "/out/c.txt", "C"))
# Still its own uid, and the restored copy (and the host layer) still its own.
R["mine"] = op(lambda: (os.getuid() != 0, os.stat(W + "/out/a.txt").st_uid == os.getuid(), os.stat(W + "/out/keep/k.txt").st_uid == os.getuid(), write(W + "/out/a.txt", "A")))
"#,
    )
    .await;
    let mut table = Table::new();
    expect(
        &mut table,
        &got,
        &[
            ("mine", &["ok:(True, True, True, 1)"]),
            ("secret", &["ENOENT"]),
            ("env", &["ENOENT"]),
            ("src_write", &["EROFS"]),
            ("hardlink_in", &["EXDEV"]),
            ("out_write", &["ok:1"]),
        ],
    );
    table.assert_all("the restored workspace");
    let delta = tar_entries(&c.session_workspace_delta(&s).await.unwrap());
    assert_eq!(
        delta.get("out/a.txt").map(Vec::as_slice),
        Some(&b"A"[..]),
        "{:?}",
        delta.keys()
    );
    assert!(delta.contains_key("out/.wh.old.txt") && delta.contains_key("out/c.txt"));
    assert!(!delta.contains_key("out/b.txt") && !delta.contains_key("out/keep/.wh.k.txt"));
    assert_eq!(
        fs::read_to_string(t.proj.join("out/old.txt")).unwrap(),
        "old"
    );
    assert!(t.proj.join("out/keep/k.txt").exists());
    for f in ["out/a.txt", "out/b.txt", "out/c.txt"] {
        assert!(!t.proj.join(f).exists(), "{f} reached the host");
    }
    c.session_kill(&s).await.unwrap();
    drop(c);
    d.finish().await;
}

/// The requester of [`direct_workspace_runs_as_its_own_uid_and_writes_as_the_requester`].
const OWNER: (u32, u32) = (4242, 4243);

/// A direct workspace's sandbox runs as its own leased uid, not uid 0: its
/// host mounts are idmapped so that the requester's files are its own and
/// what it writes lands on the host as the requester's, while host files of
/// other users (root's included) stay as unwritable as for any stranger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_workspace_runs_as_its_own_uid_and_writes_as_the_requester() {
    use std::os::unix::fs::{chown, PermissionsExt};
    if skip_unless_root("starts a daemon that mounts workspaces") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("forkd-wsuid-")
        .tempdir()
        .unwrap();
    let base = fs::canonicalize(dir.path()).unwrap();
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
    let proj = base.join("proj");
    for d in ["src", "out", "out/rootdir"] {
        fs::create_dir_all(proj.join(d)).unwrap();
    }
    fs::write(proj.join("src/mine.txt"), "MINE").unwrap();
    fs::set_permissions(proj.join("src/mine.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(proj.join("src/secret"), "ROOT-SECRET").unwrap();
    fs::set_permissions(proj.join("src/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(proj.join("out/rootfile"), "ROOT").unwrap();
    fs::write(proj.join("hidden.txt"), "H").unwrap();
    fs::set_permissions(proj.join("out/rootfile"), fs::Permissions::from_mode(0o644)).unwrap();
    for p in ["", "src", "src/mine.txt", "out"] {
        chown(proj.join(p), Some(OWNER.0), Some(OWNER.1)).unwrap();
    }
    let roots = base.clone();
    let d = TestDaemon::start(move |c| {
        c.workspace_roots = vec![roots];
        c.allowed_uids = Some(vec![0, OWNER.0]);
    })
    .await;
    if let Some(sock_dir) = d.socket.parent() {
        fs::set_permissions(sock_dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&d.socket, fs::Permissions::from_mode(0o777)).unwrap();
    let body = r#"
R["uid"] = "%d:%d" % (os.getuid(), os.getgid())
R["write_new"] = op(lambda: write(W + "/out/new.txt", "new"))
R["new_is_mine"] = op(lambda: os.stat(W + "/out/new.txt").st_uid == os.getuid())
R["requester_file"] = op(lambda: (os.stat(W + "/src/mine.txt").st_uid == os.getuid(), read(W + "/src/mine.txt")))
R["root_file_write"] = op(lambda: write(W + "/out/rootfile", "pwned"))
R["root_file_chmod"] = op(lambda: os.chmod(W + "/out/rootfile", 0o666))
R["root_dir_create"] = op(lambda: write(W + "/out/rootdir/x"))
R["root_secret_read"] = op(lambda: read(W + "/src/secret"))
R["chown_to_root"] = op(lambda: os.chown(W + "/out/new.txt", 0, 0))
R["hidden"] = op(lambda: read(W + "/hidden.txt"))
print(json.dumps(R))
"#;
    // Root asks for the same workspace and rules first: its warm children
    // (made with root as the owner) must not serve the other requester, whose
    // probe checks that it writes as itself.
    let mut as_root = req("print(1)");
    as_root.workspace = Some(WorkspaceRequest {
        path: Some(proj.display().to_string()),
        rules: vec!["out=write".into()],
        ..Default::default()
    });
    assert!(
        wait_warm(&d, &as_root).await,
        "root's second identical request is served warm"
    );
    // Without and with a `none` path: the base is a clone of the host
    // directory, or an overlay over it (the mask); both are idmapped.
    for extra in [None, Some("hidden.txt=none")] {
        probe_as_owner(&d, &proj, extra, body);
    }
    // Root's own key is still warm: the owner's requests did not take it.
    assert!(d.spawn(&as_root).await.unwrap().warm);
    // The sandbox next door keeps working.
    assert_eq!(d.run("print(6 * 7)").await.stdout_lossy(), "42\n");
    d.finish().await;
}

/// An overlay workspace's sandbox (root daemon) runs as its own leased uid
/// too: the host layer and the upper layer are idmapped (requester <->
/// sandbox uid, host root stays root), so the requester's files are its
/// own, root's stay root's (0644: readable, not writable, in a `read` or a
/// `write` area), what it creates or copies up is its own inside and the
/// requester's in the upper layer, the host never changes, and the delta
/// (which carries no owner) applies as the requester.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_workspace_runs_as_its_own_uid() {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if skip_unless_root("starts a daemon that mounts workspaces") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("forkd-ovluid-")
        .tempdir()
        .unwrap();
    let base = fs::canonicalize(dir.path()).unwrap();
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
    let proj = base.join("proj");
    for d in ["src", "out", "out/rootdir", "out/mydir", "out/other"] {
        fs::create_dir_all(proj.join(d)).unwrap();
    }
    for (f, text, mode) in [
        ("src/rootfile", "ROOT", 0o644),
        ("out/rootfile", "ROOT", 0o644),
        ("out/mine.txt", "MINE", 0o600),
        ("out/old.txt", "OLD", 0o644),
        ("out/mydir/m.txt", "M", 0o644),
        ("out/other.txt", "OTHER", 0o666),
    ] {
        fs::write(proj.join(f), text).unwrap();
        fs::set_permissions(proj.join(f), fs::Permissions::from_mode(mode)).unwrap();
    }
    for p in [
        "",
        "src",
        "out",
        "out/mine.txt",
        "out/old.txt",
        "out/mydir",
        "out/mydir/m.txt",
    ] {
        chown(proj.join(p), Some(OWNER.0), Some(OWNER.1)).unwrap();
    }
    // A third user's world-writable entries: unmapped ids.
    fs::set_permissions(proj.join("out/other"), fs::Permissions::from_mode(0o777)).unwrap();
    for p in ["out/other", "out/other.txt"] {
        chown(proj.join(p), Some(4343), Some(4343)).unwrap();
    }
    // Where the requester receives the delta and applies it.
    let mine = base.join("mine");
    fs::create_dir(&mine).unwrap();
    chown(&mine, Some(OWNER.0), Some(OWNER.1)).unwrap();
    let roots = base.clone();
    let d = TestDaemon::start(move |c| {
        c.workspace_roots = vec![roots];
        c.allowed_uids = Some(vec![0, OWNER.0]);
    })
    .await;
    if let Some(sock_dir) = d.socket.parent() {
        fs::set_permissions(sock_dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&d.socket, fs::Permissions::from_mode(0o777)).unwrap();
    let body = r#"
me = os.getuid()
R["uid"] = "%d:%d" % (me, os.getgid())
R["write_new"] = op(lambda: write(W + "/out/new.txt", "new"))
R["new_is_mine"] = op(lambda: (os.stat(W + "/out/new.txt").st_uid, os.stat(W + "/out/new.txt").st_gid) == (me, me))
R["mkdir_new"] = op(lambda: (os.mkdir(W + "/out/newdir"), write(W + "/out/newdir/f", "F"), os.stat(W + "/out/newdir").st_uid == me))
R["copy_up"] = op(lambda: (os.stat(W + "/out/mine.txt").st_uid == me, write(W + "/out/mine.txt", "EDITED"), os.stat(W + "/out/mine.txt").st_uid == me, read(W + "/out/mine.txt")))
R["copy_up_dir"] = op(lambda: (write(W + "/out/mydir/n.txt", "N"), os.stat(W + "/out/mydir").st_uid == me))
R["delete_mine"] = op(lambda: os.unlink(W + "/out/old.txt"))
R["root_owner"] = op(lambda: (os.stat(W + "/out/rootfile").st_uid, os.stat(W + "/out/rootfile").st_mode & 0o7777))
R["root_read"] = op(lambda: read(W + "/out/rootfile"))
R["root_write"] = op(lambda: write(W + "/out/rootfile", "pwned"))
R["root_append"] = op(lambda: os.open(W + "/out/rootfile", os.O_WRONLY | os.O_APPEND))
R["root_chmod"] = op(lambda: os.chmod(W + "/out/rootfile", 0o666))
R["root_dir_create"] = op(lambda: write(W + "/out/rootdir/x"))
R["root_file_delete"] = op(lambda: os.unlink(W + "/out/rootfile"))
R["read_area_root_write"] = op(lambda: write(W + "/src/rootfile", "pwned"))
R["read_area_root_read"] = op(lambda: read(W + "/src/rootfile"))
R["chown_to_root"] = op(lambda: os.chown(W + "/out/new.txt", 0, 0))
R["other_owner"] = op(lambda: os.stat(W + "/out/other.txt").st_uid)
R["other_write"] = op(lambda: write(W + "/out/other.txt", "pwned"))
R["other_dir_create"] = op(lambda: write(W + "/out/other/x"))
R["setuid_bit"] = op(lambda: (os.chmod(W + "/out/new.txt", 0o4755), os.stat(W + "/out/new.txt").st_mode & 0o7777))
print(json.dumps(R))
"#;
    let delta = mine.join("change.tar");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("--workspace")
        .arg(&proj)
        .args(["--workspace-mode", "overlay", "--rule", "out=write"])
        .arg("--export-delta")
        .arg(&delta)
        .arg("-c")
        .arg(format!("{PRELUDE}{body}"))
        .uid(OWNER.0)
        .gid(OWNER.1)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeMap<String, String> =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("probe JSON");
    let ids = got.get("uid").cloned().unwrap_or_default();
    let (uid, gid) = ids.split_once(':').expect("uid:gid");
    assert_ne!(
        uid, "0",
        "an overlay workspace's sandbox must not run as uid 0"
    );
    assert_ne!(uid, OWNER.0.to_string(), "its own uid, not the requester's");
    assert_eq!(uid, gid, "its gid is its uid");
    let mut table = Table::new();
    expect(
        &mut table,
        &got,
        &[
            ("write_new", &["ok:3"]),
            ("new_is_mine", &["ok:True"]),
            ("mkdir_new", &["ok:(None, 1, True)"]),
            ("copy_up", &["ok:(True, 6, True, 'EDITED')"]),
            ("copy_up_dir", &["ok:(1, True)"]),
            ("delete_mine", &["ok:None"]),
            ("root_owner", &["ok:(0, 420)"]),
            ("root_read", &["ok:'ROOT'"]),
            ("root_write", &["EACCES"]),
            ("root_append", &["EACCES"]),
            ("root_chmod", &["EPERM"]),
            ("root_dir_create", &["EACCES"]),
            // out/ is the requester's (the sandbox's): removing an entry
            // there is a whiteout, not a write to root's file.
            ("root_file_delete", &["ok:None"]),
            ("read_area_root_write", &["EROFS"]),
            ("read_area_root_read", &["ok:'ROOT'"]),
            ("chown_to_root", &["EPERM"]),
            ("other_owner", &["ok:65534"]),
            // The kernel writes no inode with an unmapped owner, whatever
            // its mode (so nothing of theirs is ever copied up).
            ("other_write", &["EACCES"]),
            ("other_dir_create", &["EACCES"]),
            ("setuid_bit", &["ok:(None, 2541)"]),
        ],
    );
    table.assert_all("overlay workspace as its own uid");
    // The host never changed.
    for (f, text) in [
        ("out/rootfile", "ROOT"),
        ("out/mine.txt", "MINE"),
        ("out/old.txt", "OLD"),
    ] {
        assert_eq!(fs::read_to_string(proj.join(f)).unwrap(), text, "{f}");
    }
    for f in ["out/new.txt", "out/newdir", "out/mydir/n.txt"] {
        assert!(!proj.join(f).exists(), "{f} reached the host");
    }
    // The delta: the changes, no owner (uid/gid 0 in every header), no
    // setuid bit.
    let tar = fs::read(&delta).unwrap();
    assert_eq!(
        fs::metadata(&delta).unwrap().uid(),
        OWNER.0,
        "the client wrote it"
    );
    let mut owners = std::collections::BTreeSet::new();
    let mut archive = tar::Archive::new(&tar[..]);
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        owners.insert((h.uid().unwrap(), h.gid().unwrap()));
        assert_eq!(h.mode().unwrap() & 0o7000, 0, "{:?}", e.path());
    }
    assert_eq!(owners.into_iter().collect::<Vec<_>>(), vec![(0, 0)]);
    let entries = tar_entries(&tar);
    for (name, content) in [
        ("out/new.txt", &b"new"[..]),
        ("out/mine.txt", b"EDITED"),
        ("out/newdir/f", b"F"),
        ("out/mydir/n.txt", b"N"),
    ] {
        assert_eq!(
            entries.get(name).map(Vec::as_slice),
            Some(content),
            "{name} in {:?}",
            entries.keys()
        );
    }
    for wh in ["out/.wh.old.txt", "out/.wh.rootfile"] {
        assert!(entries.contains_key(wh), "{wh} in {:?}", entries.keys());
    }
    // The requester applies it to its own copy, as itself.
    let copy = mine.join("proj");
    copy_tree(&proj, &copy);
    for p in [
        "",
        "src",
        "out",
        "out/mine.txt",
        "out/old.txt",
        "out/mydir",
        "out/mydir/m.txt",
    ] {
        chown(copy.join(p), Some(OWNER.0), Some(OWNER.1)).unwrap();
    }
    // Deleting root's file needs only its directory, the requester's.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"))
        .args(["workspace", "apply"])
        .arg(&delta)
        .arg(&copy)
        .args(["--rule", "out=write"])
        .uid(OWNER.0)
        .gid(OWNER.1)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "apply as the requester: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(copy.join("out/mine.txt")).unwrap(),
        "EDITED"
    );
    assert_eq!(fs::read_to_string(copy.join("out/newdir/f")).unwrap(), "F");
    assert!(!copy.join("out/old.txt").exists() && !copy.join("out/rootfile").exists());
    let meta = fs::metadata(copy.join("out/new.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), OWNER, "applied as the requester");
    // The sandbox next door keeps working.
    assert_eq!(d.run("print(6 * 7)").await.stdout_lossy(), "42\n");
    d.finish().await;
}

fn probe_as_owner(d: &TestDaemon, proj: &Path, extra: Option<&str>, body: &str) {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let _ = fs::remove_file(proj.join("out/new.txt"));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_forkd-run"));
    cmd.arg("--socket")
        .arg(&d.socket)
        .arg("--workspace")
        .arg(proj)
        .args(["--rule", "out=write"]);
    if let Some(rule) = extra {
        cmd.args(["--rule", rule]);
    }
    let out = cmd
        .arg("-c")
        .arg(format!("{PRELUDE}{body}"))
        .uid(OWNER.0)
        .gid(OWNER.1)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeMap<String, String> =
        serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("probe JSON");
    let ids = got.get("uid").cloned().unwrap_or_default();
    let (uid, gid) = ids.split_once(':').expect("uid:gid");
    assert_ne!(
        uid, "0",
        "a direct workspace's sandbox must not run as uid 0"
    );
    assert_ne!(
        uid,
        OWNER.0.to_string(),
        "it runs as its own uid, not the requester's"
    );
    assert_eq!(uid, gid, "its gid is its uid");
    let mut table = Table::new();
    expect(
        &mut table,
        &got,
        &[
            ("write_new", &["ok:3"]),
            ("new_is_mine", &["ok:True"]),
            ("requester_file", &["ok:(True, 'MINE')"]),
            ("root_file_write", &["EACCES"]),
            ("root_file_chmod", &["EPERM", "EOVERFLOW"]),
            ("root_dir_create", &["EACCES"]),
            ("root_secret_read", &["EACCES"]),
            ("chown_to_root", &["EPERM", "EOVERFLOW", "EINVAL"]),
        ],
    );
    table.assert_all(&format!("direct workspace as its own uid ({extra:?})"));
    // On the host: the new file is the requester's, root's files are untouched.
    let meta = fs::metadata(proj.join("out/new.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), OWNER, "written as the requester");
    assert_eq!(
        fs::read_to_string(proj.join("out/rootfile")).unwrap(),
        "ROOT"
    );
    let meta = fs::metadata(proj.join("out/rootfile")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o644));
    assert!(!proj.join("out/rootdir/x").exists());
    assert_eq!(
        got.get("hidden").map(String::as_str),
        Some(if extra.is_some() { "ENOENT" } else { "ok:'H'" }),
        "{extra:?}"
    );
}

/// Spawns `r` until it is served by a warm workspace child (the first of a
/// key never is; its children are made after it); false after 20 tries.
async fn wait_warm(d: &TestDaemon, r: &forkd_ipc::SpawnRequest) -> bool {
    for _ in 0..20 {
        let res = d.spawn(r).await.expect("spawn");
        assert_eq!(res.exit_code, Some(0), "{}", res.stderr_lossy());
        if res.warm {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// A second identical workspace request is served by a child made warm
/// with the workspace mounted; the escapes fail there as on demand; a plan
/// that went stale (the host tree changed) is not served warm; an overlay's
/// warm children each have their own upper layer (one's delta never shows
/// another's writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_workspace_requests_are_served_warm() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let d = start(&t.base).await;
    let body = r#"
R["list_root"] = op(lambda: sorted(os.listdir(W)))
R["none_open"] = op(lambda: read(W + "/secrets/key"))
R["none_glob"] = op(lambda: read(W + "/.env"))
R["late_env"] = op(lambda: read(W + "/src/late.env"))
R["read_write"] = op(lambda: write(W + "/src/a.py"))
R["view_open"] = op(lambda: read(W + "/docs/d.md"))
def view_mmap():
    fd = os.open(W + "/docs/d.md", os.O_PATH)
    return mmap.mmap(fd, 12, prot=mmap.PROT_READ)[:]
R["view_mmap"] = op(view_mmap)
R["view_readme"] = op(lambda: read(W + "/docs/README"))
R["symlink_read_to_none"] = op(lambda: read(W + "/src/to_secret"))
R["hardlink_read_into_write"] = op(lambda: os.link(W + "/src/a.py", W + "/out/a_link"))
R["rename_write_to_read"] = op(lambda: os.rename(W + "/out/keep/k.txt", W + "/src/k.txt"))
R["proc_1_root"] = op(lambda: read("/proc/1/root/workspace/.env"))
R["umount_workspace"] = sc(166, (W + "/src").encode(), 2)
"#;
    let cases: &[(&str, &[&str])] = &[
        ("list_root", &["ok:['docs', 'out', 'src']"]),
        ("none_open", &["ENOENT"]),
        ("none_glob", &["ENOENT"]),
        ("late_env", &["ENOENT"]),
        ("read_write", &["EROFS"]),
        ("view_open", &["EACCES"]),
        ("view_mmap", &["EBADF"]),
        ("view_readme", &["ok:'readable'"]),
        ("symlink_read_to_none", &["ENOENT"]),
        ("hardlink_read_into_write", &["EXDEV"]),
        ("rename_write_to_read", &["EXDEV", "EROFS"]),
        ("proc_1_root", &["ENOENT"]),
        ("umount_workspace", &["EPERM"]),
    ];
    for mode in [WorkspaceMode::Direct, WorkspaceMode::Overlay] {
        let w = ws(&t.proj, mode);
        let (got, first) = probe(&d, w.clone(), body).await;
        assert!(
            !first.warm,
            "{mode:?}: the first request of a key forks on demand"
        );
        let mut table = Table::new();
        expect(&mut table, &got, cases);
        table.assert_all(&format!("{mode:?} on demand"));
        let mut served = false;
        for _ in 0..20 {
            let (got, res) = probe(&d, w.clone(), body).await;
            let mut table = Table::new();
            expect(&mut table, &got, cases);
            table.assert_all(&format!("{mode:?}, warm: {}", res.warm));
            if res.warm {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(served, "{mode:?}: an identical request is served warm");
    }
    // Overlay: two warm children, each with its own upper layer.
    let mut w = ws(&t.proj, WorkspaceMode::Overlay);
    w.export_delta = true;
    let mut seen = Vec::new();
    for i in 0..6 {
        let mut r = req(&format!(
            "import os\nopen('/workspace/out/n{i}', 'w').write('x')\nprint(sorted(os.listdir('/workspace/out')))"
        ));
        r.workspace = Some(w.clone());
        let res = d.spawn(&r).await.unwrap();
        assert_eq!(res.exit_code, Some(0), "{}", res.stderr_lossy());
        let names: Vec<String> = tar_entries(res.workspace_delta.as_deref().unwrap())
            .into_keys()
            .filter(|k| k.starts_with("out/n"))
            .collect();
        assert_eq!(names, vec![format!("out/n{i}")], "only its own writes");
        assert_eq!(
            res.stdout_lossy(),
            format!("['keep', 'n{i}', 'old.txt']\n"),
            "no other sandbox's writes"
        );
        seen.push(res.warm);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        seen.iter().skip(1).any(|w| *w),
        "overlay with export served warm: {seen:?}"
    );
    // The host tree changes: a new file matches `**/*.env=none`. The
    // re-validated plan differs, so no child made before is handed out,
    // and the new file is hidden.
    fs::write(t.proj.join("src/late.env"), "LATE-SECRET").unwrap();
    let (got, res) = probe(&d, ws(&t.proj, WorkspaceMode::Direct), body).await;
    assert!(!res.warm, "a stale plan's warm children are not handed out");
    let mut table = Table::new();
    expect(&mut table, &got, cases);
    table.assert_all("after the tree changed");
    assert!(
        !t.proj.join("src/k.txt").exists() && t.proj.join("out/keep/k.txt").exists(),
        "nothing moved on the host"
    );
    d.finish().await;
}

/// A workspace key no request used for `idle_ms` is dropped with its warm
/// children (killed, their cgroups and mounts gone: the leak checks at
/// `finish` run with the daemon's other children gone too); the next
/// request forks on demand again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_workspace_children_expire_when_idle() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let t = tree();
    let base = t.base.clone();
    let d = TestDaemon::start(move |c| {
        c.workspace_roots = vec![base];
        c.workspace_warm.idle_ms = 1500;
    })
    .await;
    let mut r = req("print(1)");
    r.workspace = Some(ws(&t.proj, WorkspaceMode::Overlay));
    assert!(wait_warm(&d, &r).await, "served warm while in use");
    assert!(d.daemon.ws_warm.ready() > 0, "children parked for the key");
    assert!(
        wait_until(Duration::from_secs(10), || d.daemon.ws_warm.ready() == 0).await,
        "an idle key's children are dropped"
    );
    let res = d.spawn(&r).await.unwrap();
    assert!(!res.warm, "an expired key forks on demand");
    d.finish().await;
}
