//! Per-child cost of the isolation sequence (a benchmark, not a test; root):
//! builds the default policy's root once, then forks children that each
//! enter a fresh pid namespace and run `isolate_child`, timing that call.
//! Variants run interleaved, so host noise hits them alike:
//!   base     the default policy, as the zygote's root would run it (uid 0)
//!   uid      plus its own uid/gid (what a root daemon does)
//!   no-mask  uid, without the /proc masks
//!   no-pts   uid, without the private devpts mount (policy `devpts = false`)
//!   no-cpus  uid, without the per-sandbox CPU list (/sys/devices/system/cpu/online)
//!   locks    uid, with `private_locks` (an overlay per bound tree)
//!   ws       uid, with a direct workspace (a clone of a host directory)
//!   ws-idmap ws, idmapped to an owner (what a root daemon does: the cost
//!            of the user namespace helper and `MOUNT_ATTR_IDMAP`)
//!   ov       an overlay workspace without an owner (uid 0, as before)
//!   ov-idmap an overlay workspace as a root daemon makes it: own uid, host
//!            and upper layers idmapped (one clone and idmap more)
//!   cg-first cg, run first: a cgroup join after other work may wait for
//!            an RCU grace period (the kernel's cgroup migration lock; ms),
//!            which joins right after it skip; it pays that for `cg` and
//!            `cg-view`, so their difference is the view's
//!   cg       uid, joining its own cgroup in each memory/cpu/cpuacct/pids hierarchy
//!            (v1) or the v2 one, without the cgroup view
//!   cg-view  cg, with the read-only view of it (policy `cgroup_view`, a
//!            mount per hierarchy)
//!
//!   cargo run --release -p forkd-zygote --example isolate_cost [N]

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "a benchmark example: a panic is its failure report; nanosecond counts fit"
)]

use std::io::Read;
use std::os::fd::AsFd;
use std::time::Instant;

use forkd_zygote::isolate::{isolate_child, Prepared};
use forkd_zygote::{sys, template, ChildSpec, Policy};

fn prepared(policy: &Policy, mask: bool, devpts: bool, private_locks: bool) -> Prepared {
    // Interpreter trees bound beside the policy's (a venv, a pyenv prefix):
    // `ISOLATE_COST_PATHS=/a:/b`; each is one more overlay with private locks.
    let paths: Vec<String> = std::env::var("ISOLATE_COST_PATHS")
        .map(|v| {
            v.split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut fs = policy.filesystem.clone();
    fs.private_locks = private_locks;
    Prepared {
        template: template::build(&fs, &paths, "sandbox").expect("template"),
        seccomp: policy.compile_seccomp().expect("seccomp"),
        landlock: policy.landlock,
        proc_masked: if mask {
            policy
                .filesystem
                .proc_masked
                .iter()
                .map(|f| std::ffi::CString::new(format!("/proc/{f}")).unwrap())
                .collect()
        } else {
            Vec::new()
        },
        devpts: devpts && policy.filesystem.devpts,
    }
}

fn one(spec: &ChildSpec, p: &Prepared, netns: &std::os::fd::OwnedFd) -> Option<u64> {
    let (r, w) = sys::pipe().ok()?;
    sys::unshare(libc::CLONE_NEWPID).ok()?;
    // SAFETY: this example is single-threaded.
    let fork = unsafe { sys::fork() };
    match fork.ok()? {
        sys::Fork::Child => {
            drop(r);
            // isolate_child closes descriptors from 4 up: report on fd 3.
            // SAFETY: dup2 onto a number this process does not otherwise use.
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&w), 3) };
            // SAFETY: fd 3 was just made a copy of the pipe's write end.
            let w: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(3) };
            let t = Instant::now();
            let ok = isolate_child(
                spec,
                p,
                "bench",
                sys::last_capability(),
                Some(netns.as_fd()),
            );
            if let Err(e) = &ok {
                eprintln!("isolate_child: {e}");
            }
            let ns = if ok.is_ok() {
                t.elapsed().as_nanos() as u64
            } else {
                0
            };
            let _ = sys::write_all(w.as_fd(), &ns.to_le_bytes());
            sys::exit_now(0);
        }
        sys::Fork::Parent(pid) => {
            drop(w);
            let mut buf = [0u8; 8];
            let n = std::fs::File::from(r).read(&mut buf).unwrap_or(0);
            let _ = sys::waitpid(pid);
            (n == 8 && u64::from_le_bytes(buf) > 0).then(|| u64::from_le_bytes(buf))
        }
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    // Keep fd 3 for the children's reports (opened before anything else).
    let _reserved = std::fs::File::open("/dev/null").unwrap();
    let policy = Policy::default_policy();
    let masked = prepared(&policy, true, true, false);
    let unmasked = prepared(&policy, false, true, false);
    let no_pts = prepared(&policy, true, false, false);
    let locks = prepared(&policy, true, true, true);
    let mut no_cpus = prepared(&policy, true, true, false);
    no_cpus.template.host_cpus = None;
    let mut no_view = prepared(&policy, true, true, false);
    no_view.template.cgroup_views.clear();
    // A cgroup of the bench's own in each hierarchy a daemon would use,
    // which every `cg` child joins (and leaves by exiting).
    let cgroups: Vec<std::path::PathBuf> = masked
        .template
        .cgroup_views
        .iter()
        .filter(|v| {
            let c = v
                .controllers
                .as_ref()
                .map(|c| c.to_string_lossy().into_owned());
            match c {
                None => !masked
                    .template
                    .cgroup_views
                    .iter()
                    .any(|o| o.controllers.is_some()),
                Some(c) => c
                    .split(',')
                    .any(|c| matches!(c, "memory" | "cpu" | "cpuacct" | "pids")),
            }
        })
        .map(|v| {
            v.mount_point
                .join(format!("isolate-cost-{}", std::process::id()))
        })
        .collect();
    for dir in &cgroups {
        std::fs::create_dir_all(dir).unwrap();
    }
    let procs: Vec<String> = cgroups
        .iter()
        .map(|d| d.join("cgroup.procs").display().to_string())
        .collect();
    // One shared network namespace: its creation is not what is measured.
    let own_net = std::fs::File::open("/proc/self/ns/net").unwrap();
    sys::unshare(libc::CLONE_NEWNET).unwrap();
    let netns: std::os::fd::OwnedFd = std::fs::File::open("/proc/self/ns/net").unwrap().into();
    sys::setns(own_net.as_fd(), libc::CLONE_NEWNET).unwrap();
    let own_pid: std::os::fd::OwnedFd = std::fs::File::open("/proc/self/ns/pid").unwrap().into();
    // A host directory for the workspace variants.
    let ws_dir = std::env::temp_dir().join(format!("isolate-cost-ws-{}", std::process::id()));
    std::fs::create_dir_all(&ws_dir).unwrap();
    let ws_meta = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&ws_dir).unwrap();
        (m.dev(), m.ino())
    };
    // An upper layer for the overlay variants, as the daemon makes it: a
    // tmpfs mounted nowhere, reached through /proc/<pid>/fd/<n>.
    let upper_mnt = {
        use rustix::mount::{
            fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
            MountAttrFlags,
        };
        let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).unwrap();
        fsconfig_set_string(&fs, "size", "64m").unwrap();
        fsconfig_set_string(&fs, "mode", "0700").unwrap();
        fsconfig_create(&fs).unwrap();
        let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty()).unwrap();
        for d in ["upper", "work"] {
            rustix::fs::mkdirat(&mnt, d, rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
        }
        mnt
    };
    let ws_upper = std::path::PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&upper_mnt)
    ));
    let ws_plan = |owner: Option<(u32, u32)>, overlay: bool| forkd_workspace::MountPlan {
        host_root: ws_dir.clone(),
        root_dev: ws_meta.0,
        root_ino: ws_meta.1,
        mount_point: forkd_workspace::DEFAULT_MOUNT_POINT.into(),
        kind: if overlay {
            forkd_workspace::Kind::Overlay
        } else {
            forkd_workspace::Kind::Direct
        },
        upper: overlay.then(|| ws_upper.clone()),
        root_mode: forkd_workspace::Mode::Write,
        hidden: Vec::new(),
        binds: Vec::new(),
        grants: Vec::new(),
        visited: 0,
        owner,
        idmap_to: owner.map(|_| 1_879_048_192),
    };
    let with_ws = |mut s: ChildSpec, owner: Option<(u32, u32)>| {
        s.workspace = Some(ws_plan(owner, false));
        s
    };
    let with_ov = |mut s: ChildSpec, owner: Option<(u32, u32)>| {
        s.workspace = Some(ws_plan(owner, true));
        s
    };
    let spec = |uid: Option<u32>| ChildSpec {
        policy: "default".into(),
        cgroup_procs: Vec::new(),
        scratch_bytes: 64 << 20,
        open_files: 256,
        file_size_bytes: 64 << 20,
        isolate: true,
        workspace: None,
        uid,
        cpus: Some(1),
        branchable: false,
        branch: None,
    };
    let in_cgroups = |mut s: ChildSpec| {
        s.cgroup_procs = procs.clone();
        s
    };
    let variants: [(&str, ChildSpec, &Prepared); 13] = [
        ("base", spec(None), &masked),
        ("uid", spec(Some(1_879_048_192)), &masked),
        ("no-mask", spec(Some(1_879_048_192)), &unmasked),
        ("no-pts", spec(Some(1_879_048_192)), &no_pts),
        ("no-cpus", spec(Some(1_879_048_192)), &no_cpus),
        ("locks", spec(Some(1_879_048_192)), &locks),
        ("ws", with_ws(spec(Some(1_879_048_192)), None), &masked),
        (
            "ws-idmap",
            with_ws(spec(Some(1_879_048_192)), Some((4242, 4243))),
            &masked,
        ),
        ("ov", with_ov(spec(None), None), &masked),
        (
            "ov-idmap",
            with_ov(spec(Some(1_879_048_192)), Some((4242, 4243))),
            &masked,
        ),
        ("cg-first", in_cgroups(spec(Some(1_879_048_192))), &no_view),
        ("cg", in_cgroups(spec(Some(1_879_048_192))), &no_view),
        ("cg-view", in_cgroups(spec(Some(1_879_048_192))), &masked),
    ];
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); variants.len()];
    for _ in 0..n {
        for (i, (_, s, p)) in variants.iter().enumerate() {
            if let Some(t) = one(s, p, &netns) {
                times[i].push(t);
            }
            sys::setns(own_pid.as_fd(), libc::CLONE_NEWPID).unwrap();
        }
    }
    let _ = std::fs::remove_dir(&ws_dir);
    for dir in &cgroups {
        let _ = std::fs::remove_dir(dir);
    }
    drop(upper_mnt);
    for ((name, _, _), mut t) in variants.iter().zip(times) {
        t.sort_unstable();
        if t.is_empty() {
            println!("{name:8} failed");
            continue;
        }
        let pct = |p: usize| t[(t.len() * p / 100).min(t.len() - 1)] as f64 / 1000.0;
        println!(
            "{name:8} isolate_child p50 {:.1} us  p90 {:.1} us  (n={})",
            pct(50),
            pct(90),
            t.len()
        );
    }
}
