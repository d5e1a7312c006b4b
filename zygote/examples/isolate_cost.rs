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
    // One shared network namespace: its creation is not what is measured.
    let own_net = std::fs::File::open("/proc/self/ns/net").unwrap();
    sys::unshare(libc::CLONE_NEWNET).unwrap();
    let netns: std::os::fd::OwnedFd = std::fs::File::open("/proc/self/ns/net").unwrap().into();
    sys::setns(own_net.as_fd(), libc::CLONE_NEWNET).unwrap();
    let own_pid: std::os::fd::OwnedFd = std::fs::File::open("/proc/self/ns/pid").unwrap().into();
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
    let variants: [(&str, ChildSpec, &Prepared); 6] = [
        ("base", spec(None), &masked),
        ("uid", spec(Some(1_879_048_192)), &masked),
        ("no-mask", spec(Some(1_879_048_192)), &unmasked),
        ("no-pts", spec(Some(1_879_048_192)), &no_pts),
        ("no-cpus", spec(Some(1_879_048_192)), &no_cpus),
        ("locks", spec(Some(1_879_048_192)), &locks),
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
