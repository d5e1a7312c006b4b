//! Live branches of a session against a real daemon and kernel
//! (docs/branch.md): the copy's state, divergence, seeds, isolation from the
//! parent and siblings, limits, and cleanup.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use common::cells::{cell, create, text};
use common::*;
use forkd_ipc::{AsyncClient, SessionBranch};

/// The error a refused branch request gets, as text.
async fn refused(c: &AsyncClient, req: SessionBranch) -> String {
    c.session_branch(req).await.unwrap_err().to_string()
}

fn branch_of(s: &str, count: u32) -> SessionBranch {
    SessionBranch {
        session: s.into(),
        count,
        same_seed: false,
        force: false,
        labels: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_copies_state_and_scratch_then_diverges() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    text(
        &c,
        &s,
        "import numpy as np\nx = 41\na = np.arange(1_000_000)\nopen('/tmp/f.txt', 'w').write('parent')\nfh = open('/tmp/f.txt')\nNone",
    )
    .await;
    let branches = c.session_branch(branch_of(&s, 2)).await.unwrap();
    assert_eq!(branches.len(), 2);
    for b in &branches {
        assert_eq!(b.parent.as_deref(), Some(s.as_str()));
        let b = &b.session;
        assert_eq!(text(&c, b, "x + 1").await, "42");
        assert_eq!(text(&c, b, "int(a.sum())").await, "499999500000");
        assert_eq!(text(&c, b, "open('/tmp/f.txt').read()").await, "'parent'");
        assert_eq!(text(&c, b, "fh.read()").await, "'parent'");
    }
    // Divergence: memory and files.
    let (b1, b2) = (&branches[0].session, &branches[1].session);
    text(&c, b1, "x = 1\nopen('/tmp/f.txt', 'w').write('b1')\nNone").await;
    assert_eq!(text(&c, &s, "x").await, "41");
    assert_eq!(text(&c, b2, "x").await, "41");
    assert_eq!(text(&c, &s, "open('/tmp/f.txt').read()").await, "'parent'");
    assert_eq!(text(&c, b2, "open('/tmp/f.txt').read()").await, "'parent'");
    assert_eq!(text(&c, b1, "open('/tmp/f.txt').read()").await, "'b1'");
    // Fresh seeds by default.
    let r1 = text(&c, b1, "import random; random.random()").await;
    let r2 = text(&c, b2, "import random; random.random()").await;
    assert_ne!(r1, r2);
    drop(c);
    d.finish().await;
}

/// What a parent and a sibling look like from inside a branch: nothing of
/// them is visible, signalable, or shared; the attempts leave both working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_cannot_reach_its_parent_or_siblings() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| {
        c.limits.default.memory_bytes = 256 << 20;
    })
    .await;
    let c = d.client().await;
    let s = create(&c).await;
    let ns_of = "import os\nsorted((n, os.readlink(f'/proc/self/ns/{n}')) for n in ('mnt', 'net', 'pid', 'ipc', 'uts', 'user', 'cgroup'))";
    text(&c, &s, "import socket\nsrv = socket.socket(socket.AF_UNIX); srv.bind('\\0forkd-parent'); srv.listen()\nkeep = 1\nNone").await;
    let parent_ns = text(&c, &s, ns_of).await;
    let parent_pids = text(
        &c,
        &s,
        "sorted(int(p) for p in os.listdir('/proc') if p.isdigit())",
    )
    .await;
    let branches = c.session_branch(branch_of(&s, 2)).await.unwrap();
    let (b1, b2) = (&branches[0].session, &branches[1].session);
    // Its own namespaces, every one.
    let b1_ns = text(&c, b1, ns_of).await;
    let b2_ns = text(&c, b2, ns_of).await;
    for (a, b) in [(&b1_ns, &parent_ns), (&b1_ns, &b2_ns)] {
        for part in a.trim_matches(['[', ']']).split("), (") {
            assert!(
                !b.contains(part.split(", ").nth(1).unwrap()),
                "shared namespace {part} in {b}"
            );
        }
    }
    // Only its own processes, no capabilities, its own cgroup root.
    let probe = text(
        &c,
        b1,
        "import os, signal\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\ncaps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\n(pids, caps, open('/proc/self/cgroup').read().split(':')[-1].strip())",
    )
    .await;
    assert!(
        probe.starts_with("([1, 2"),
        "{probe} (parent saw {parent_pids})"
    );
    assert!(
        probe.contains("['0000000000000000', '0000000000000000', '0000000000000000']"),
        "{probe}"
    );
    assert!(probe.ends_with("'/')"), "{probe}");
    // Signals reach nothing outside; the parent's abstract socket is in
    // another network namespace; its scratch is not mounted here.
    let escape = text(
        &c,
        b1,
        "import os, socket, signal\nout = []\nfor pid in range(2, 4096):\n    if pid == os.getpid(): continue\n    try:\n        os.kill(pid, signal.SIGKILL); out.append(pid)\n    except OSError: pass\ntry:\n    c = socket.socket(socket.AF_UNIX); c.connect('\\0forkd-parent'); out.append('connected')\nexcept OSError as e: out.append(e.errno)\nimport glob\nout.append(glob.glob('/dev/.scratch/.forkd-ns-*'))\nout",
    )
    .await;
    assert_eq!(escape, "[111, []]", "what the branch reached: {escape}");
    // A memory bomb in one branch kills only its interpreter.
    let r = c
        .run_code(&cell(
            b2,
            "b = bytearray(400 << 20); b[::4096] = b'x' * len(b[::4096])",
        ))
        .await
        .unwrap();
    assert!(r.error.is_some(), "{r:?}");
    assert_eq!(text(&c, &s, "keep").await, "1");
    assert_eq!(text(&c, b1, "x = 5; x").await, "5");
    assert_eq!(text(&c, b2, "2 + 2").await, "4");
    drop(c);
    d.finish().await;
}

/// The parent's code owns its scratch stage: swapping its `tmp` for a
/// symlink to the host's `/etc` must not make the daemon copy host files
/// into a branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_cannot_make_the_scratch_copy_read_host_files() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    let swapped = text(
        &c,
        &s,
        "import os\ntry:\n    os.rename('/dev/.scratch/tmp', '/dev/.scratch/old')\n    os.symlink('/etc', '/dev/.scratch/tmp')\n    r = 'swapped'\nexcept OSError as e:\n    r = e.strerror\nr",
    )
    .await;
    match c.session_branch(branch_of(&s, 1)).await {
        Err(e) => assert!(e.to_string().contains("scratch"), "{e} ({swapped})"),
        Ok(b) => {
            let seen = text(&c, &b[0].session, "import os\nsorted(os.listdir('/tmp'))").await;
            assert!(
                !seen.contains("passwd") && !seen.contains("shadow"),
                "host files copied: {seen} ({swapped})"
            );
        }
    }
    assert_eq!(text(&c, &s, "1 + 1").await, "2");
    drop(c);
    d.finish().await;
}

/// Refusals with clear errors, and many branch/kill cycles that leave
/// nothing behind (the daemon's leak check at the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_cycles_leave_nothing_behind() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let a2 = audit.clone();
    let d = TestDaemon::start(move |c| {
        c.metrics_listen = Some("127.0.0.1:0".into());
        c.audit_log = Some(a2);
    })
    .await;
    let c = d.client().await;
    let s = create(&c).await;
    // A thread of the user's own: refused unless forced.
    text(&c, &s, "import threading, time\nev = threading.Event()\nt = threading.Thread(target=ev.wait, name='worker'); t.start()\nNone").await;
    let e = refused(&c, branch_of(&s, 1)).await;
    assert!(e.contains("worker") && e.contains("force"), "{e}");
    let forced = c
        .session_branch(SessionBranch {
            force: true,
            ..branch_of(&s, 1)
        })
        .await
        .unwrap();
    assert_eq!(text(&c, &forced[0].session, "t.is_alive()").await, "False");
    text(&c, &s, "ev.set(); t.join()\nNone").await;
    let e = refused(&c, branch_of(&s, 0)).await;
    assert!(e.contains("count"), "{e}");
    // Paused: refused until resumed.
    c.session_pause(&s).await.unwrap();
    let e = refused(&c, branch_of(&s, 1)).await;
    assert!(e.contains("paused"), "{e}");
    c.session_resume(&s).await.unwrap();
    // (A branch of a branch: a_branch_of_a_branch.)
    // 20 rounds of two in CI; FORKD_BRANCH_CYCLES=200 for the count.
    let rounds: usize = std::env::var("FORKD_BRANCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for _ in 0..rounds {
        let b = c.session_branch(branch_of(&s, 2)).await.unwrap();
        for info in b {
            c.session_kill(&info.session).await.unwrap();
        }
    }
    assert_eq!(text(&c, &s, "'parent'").await, "'parent'");
    // Counted and audited: each branch's creation names its parent.
    let metrics = common::scrape::scrape(d.metrics_addr().unwrap()).await;
    let ok = common::scrape::sample(
        &metrics,
        "forkd_session_requests_total",
        &[("op", "session_branch"), ("outcome", "ok")],
    );
    assert_eq!(ok, Some(rounds as f64 + 1.0), "{metrics}");
    let created_from_s = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "session_created" && r["parent"] == s.as_str())
        .count();
    // 1 forced + 2 per cycle + the one refused for the thread (its session
    // was made, then ended when the interpreter refused).
    assert_eq!(created_from_s, 2 + 2 * rounds);
    drop(c);
    d.finish().await;
}

/// A branch is a full session: it checkpoints and restores like any other
/// (its interpreter is not its executor's child, the frozen copy is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_checkpoints_and_restores() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    text(&c, &s, "x = 41\nopen('/tmp/f', 'w').write('parent')\nNone").await;
    let b = c.session_branch(branch_of(&s, 1)).await.unwrap();
    let b = &b[0].session;
    text(&c, b, "x = 42\nopen('/tmp/f', 'w').write('branch')\nNone").await;
    let ck = c.session_checkpoint(b, false).await.unwrap();
    text(&c, b, "x = 0\nopen('/tmp/f', 'w').write('changed')\nNone").await;
    c.session_restore(b, &ck.checkpoint).await.unwrap();
    assert_eq!(
        text(&c, b, "x, open('/tmp/f').read()").await,
        "(42, 'branch')"
    );
    assert_eq!(
        text(&c, &s, "x, open('/tmp/f').read()").await,
        "(41, 'parent')"
    );
    c.session_kill(b).await.unwrap();
    drop(c);
    d.finish().await;
}

/// After a branch request the session keeps that many branch shells ready
/// (`spare_branches` in its info); the next request uses them, and what it
/// gets is a branch like any other: the state, its own namespaces and uid,
/// labels and TTL of this request, and it answers; then they are made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_branches_are_made_ready_and_handed_out() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.sessions.spare_branches = 2).await;
    let c = d.client().await;
    let s = create(&c).await;
    text(&c, &s, "x = 41\nopen('/tmp/f', 'w').write('parent')\nNone").await;
    let ns_uid = "import os\n(os.readlink('/proc/self/ns/pid'), os.readlink('/proc/self/ns/mnt'), open('/proc/self/uid_map').read().split()[1])";
    let wait_for_spares = |want: u32| {
        let (c, s) = (c.clone(), s.clone());
        async move {
            for _ in 0..500 {
                if c.session_info(&s).await.unwrap().spare_branches == want {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("the session never had {want} spare branches");
        }
    };
    let first = c.session_branch(branch_of(&s, 3)).await.unwrap();
    wait_for_spares(2).await;
    // Spares are in no list and count against nothing until handed out.
    assert_eq!(c.session_list(Default::default()).await.unwrap().len(), 4);
    let mut labelled = branch_of(&s, 2);
    labelled.labels = Some([("round".to_string(), "two".to_string())].into());
    let second = c.session_branch(labelled).await.unwrap();
    assert_eq!(c.session_info(&s).await.unwrap().spare_branches, 0);
    let mut seen = std::collections::BTreeSet::new();
    for b in first.iter().chain(&second) {
        assert_eq!(text(&c, &b.session, "x + 1").await, "42");
        assert_eq!(
            text(&c, &b.session, "open('/tmp/f').read()").await,
            "'parent'"
        );
        assert!(
            seen.insert(text(&c, &b.session, ns_uid).await),
            "two branches share namespaces or a uid"
        );
    }
    for b in &second {
        assert_eq!(b.labels.get("round").map(String::as_str), Some("two"));
        assert!(b.age_ms < 5_000 && b.ttl_left_ms > 0, "{b:?}");
    }
    wait_for_spares(2).await;
    c.session_kill(&s).await.unwrap();
    drop(c);
    d.finish().await;
}

/// The pid of host process `pid` in its innermost pid namespace.
fn inner_pid(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// A branch outlives its parent (docs/branch.md, "Lifetime"): killing the
/// parent ends it as a session (out of the lists, its interpreter, commands
/// and spares gone, its scratch emptied, audited) while its branches answer
/// cells, files and commands and say `parent_ended`; its init stays, alone
/// in its cgroup and counted against the session limits, until the last
/// branch ends; then it goes with its cgroup, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_outlives_its_killed_parent() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let a2 = audit.clone();
    let d = TestDaemon::start(move |c| {
        c.sessions.spare_branches = 1;
        c.sessions.max_per_uid = 3;
        c.audit_log = Some(a2);
    })
    .await;
    let c = d.client().await;
    let s = create(&c).await;
    text(
        &c,
        &s,
        "import subprocess\nx = 41\nopen('/tmp/marker-parent', 'w').write('parent')\nlinger = subprocess.Popen(['sleep', '1000'])\nNone",
    )
    .await;
    // The parent's processes, seen from the host: its init (pid 1 inside),
    // its interpreter and the lingering command share its scratch.
    let parent_procs = d
        .wait_for_scratch_file("marker-parent", std::time::Duration::from_secs(10))
        .await;
    let init = parent_procs
        .iter()
        .find(|(pid, _)| inner_pid(*pid) == Some(1))
        .copied()
        .expect("the parent's init");
    let init_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", init.0)).unwrap();
    let branches = c.session_branch(branch_of(&s, 2)).await.unwrap();
    let (b1, b2) = (&branches[0].session, &branches[1].session);
    for _ in 0..500 {
        if c.session_info(&s).await.unwrap().spare_branches == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let killed = c.session_kill(&s).await.unwrap();
    assert_eq!(killed.state, forkd_ipc::SessionState::Ended, "{killed:?}");
    assert_eq!(killed.ended_by, Some(forkd_ipc::SessionEnd::Killed));
    // Out of the lists, refused as ended; its branches carry on.
    let listed: Vec<String> = c
        .session_list(Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.session)
        .collect();
    assert!(
        !listed.contains(&s) && listed.contains(b1) && listed.contains(b2),
        "{listed:?}"
    );
    let e = c.run_code(&cell(&s, "1")).await.unwrap_err().to_string();
    assert!(e.contains("ended"), "{e}");
    for b in [b1, b2] {
        assert_eq!(text(&c, b, "x + 1").await, "42");
        assert_eq!(
            text(&c, b, "open('/tmp/marker-parent').read()").await,
            "'parent'"
        );
        let info = c.session_info(b).await.unwrap();
        assert_eq!(info.parent.as_deref(), Some(s.as_str()));
        assert!(info.parent_ended, "{info:?}");
        let r = c
            .command(&forkd_ipc::Command {
                session: b.clone(),
                cmd: "echo alive; cat /tmp/marker-parent".into(),
                cwd: None,
                env: Default::default(),
                timeout_ms: Some(20_000),
                stdin: false,
            })
            .await
            .unwrap();
        assert_eq!(r.stdout, b"alive\nparent", "{r:?}");
    }
    // Only the parent's init is left of it: its interpreter and command are
    // gone, its scratch is empty, its spare went.
    assert!(
        process_alive(init.0, init.1),
        "the parent's init went with its branches alive"
    );
    for (pid, start) in &parent_procs {
        if *pid != init.0 {
            assert!(
                wait_until(std::time::Duration::from_secs(5), || !process_alive(
                    *pid, *start
                ))
                .await,
                "process {pid} of the ended parent lives on"
            );
        }
    }
    assert!(!std::path::Path::new(&format!("/proc/{}/root/tmp/marker-parent", init.0)).exists());
    let remnant = c.session_info(&s).await.unwrap();
    assert_eq!(remnant.usage.pids, 1, "{remnant:?}");
    assert_eq!(remnant.spare_branches, 0, "{remnant:?}");
    // The remnant counts against the owner's sessions: 2 branches + 1.
    let e = c
        .session_create(&forkd_ipc::SessionCreate::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_per_uid"), "{e}");

    // One branch ends: the other still answers, the init stays.
    c.session_kill(b1).await.unwrap();
    assert_eq!(text(&c, b2, "x").await, "41");
    assert!(process_alive(init.0, init.1));
    // Its cgroup directories, in every hierarchy (v1 or v2), go too.
    let dirs: Vec<std::path::PathBuf> = init_cgroup
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .filter(|p| p.contains(&d.instance))
        .flat_map(|p| {
            cgroup_mounts()
                .into_iter()
                .map(move |m| m.join(p.trim_start_matches('/')))
        })
        .collect();
    assert!(dirs.iter().any(|p| p.exists()), "{init_cgroup}: {dirs:?}");
    // The last one ends: the init goes, and its cgroup with it.
    c.session_kill(b2).await.unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(10), || !process_alive(
            init.0, init.1
        ))
        .await,
        "the parent's init outlived its last branch"
    );
    assert!(
        wait_until(std::time::Duration::from_secs(10), || {
            dirs.iter().all(|p| !p.exists())
        })
        .await,
        "the parent's cgroups are left: {dirs:?}"
    );
    // Room again: a new session is admitted.
    let fresh = create(&c).await;
    c.session_kill(&fresh).await.unwrap();
    let events: Vec<(String, String)> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["session"] == s.as_str())
        .map(|r| {
            (
                r["event"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        events.contains(&("session_ended".into(), "killed".into())),
        "{events:?}"
    );
    assert!(
        events.contains(&("session_reaped".into(), "ok".into())),
        "{events:?}"
    );
    drop(c);
    d.finish().await;
}

/// A parent that reaches its TTL with a live branch ends the same way; the
/// daemon's shutdown then reaps what is left of it (leak check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_outlives_its_parents_ttl() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = c
        .session_create(&forkd_ipc::SessionCreate {
            ttl_ms: Some(4_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .session;
    text(&c, &s, "x = 41").await;
    let b = c.session_branch(branch_of(&s, 1)).await.unwrap();
    let b = &b[0].session;
    c.session_set_ttl(b, 120_000).await.unwrap();
    let mut ended = None;
    for _ in 0..300 {
        let info = c.session_info(&s).await.unwrap();
        if info.state == forkd_ipc::SessionState::Ended {
            ended = Some(info);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ended = ended.expect("the parent's TTL never ended it");
    assert_eq!(ended.ended_by, Some(forkd_ipc::SessionEnd::Ttl));
    assert_eq!(text(&c, b, "x + 1").await, "42");
    assert!(c.session_info(b).await.unwrap().parent_ended);
    drop(c);
    d.finish().await;
}

/// Restoring a parent kills the processes the parent started, not its
/// branches (they run as their own uids below its pid namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_the_parent_leaves_its_branches() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    text(&c, &s, "x = 41").await;
    let ck = c.session_checkpoint(&s, false).await.unwrap();
    let b = c.session_branch(branch_of(&s, 1)).await.unwrap();
    let b = &b[0].session;
    text(&c, &s, "x = 0").await;
    c.session_restore(&s, &ck.checkpoint).await.unwrap();
    assert_eq!(text(&c, &s, "x").await, "41");
    assert_eq!(text(&c, b, "x + 1").await, "42");
    drop(c);
    d.finish().await;
}

/// A branch of a branch (docs/branch.md, "Branches of a branch"): the state
/// two levels down, divergence, namespaces and a uid of its own; from
/// inside it nothing of its parent or grandparent is visible, signalable or
/// shared; a third level is refused; branch/kill cycles; then the
/// grandparent and the parent are killed and the grandchild carries on,
/// and once it ends nothing of the three is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_of_a_branch() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let c = d.client().await;
    let s = create(&c).await;
    text(
        &c,
        &s,
        "import os\nx = 1\nopen('/tmp/f', 'w').write('s')\nNone",
    )
    .await;
    let b = c.session_branch(branch_of(&s, 1)).await.unwrap();
    let b = &b[0].session;
    text(&c, b, "x = 2\nopen('/tmp/f', 'w').write('b')\nimport socket\nsrv = socket.socket(socket.AF_UNIX); srv.bind('\\0forkd-b'); srv.listen()\nNone").await;
    let gs = c.session_branch(branch_of(b, 2)).await.unwrap();
    let (g1, g2) = (&gs[0].session, &gs[1].session);
    for g in [g1, g2] {
        assert_eq!(
            c.session_info(g).await.unwrap().parent.as_deref(),
            Some(b.as_str())
        );
        assert_eq!(text(&c, g, "x, open('/tmp/f').read()").await, "(2, 'b')");
    }
    // Files made after the branch stay where they were made.
    text(&c, b, "open('/tmp/only-b', 'w').write('b')\nNone").await;
    text(&c, &s, "open('/tmp/only-s', 'w').write('s')\nNone").await;
    assert_eq!(
        text(&c, g1, "import os, glob\n[os.path.exists(p) for p in ('/tmp/only-b', '/tmp/only-s')], glob.glob('/dev/.scratch/.forkd-ns-*')").await,
        "([False, False], [])"
    );
    text(&c, g1, "x = 3\nopen('/tmp/f', 'w').write('g1')\nNone").await;
    assert_eq!(text(&c, g1, "x, open('/tmp/f').read()").await, "(3, 'g1')");
    assert_eq!(text(&c, g2, "x, open('/tmp/f').read()").await, "(2, 'b')");
    assert_eq!(text(&c, b, "x, open('/tmp/f').read()").await, "(2, 'b')");
    assert_eq!(text(&c, &s, "x, open('/tmp/f').read()").await, "(1, 's')");
    // Namespaces and uid of its own.
    let ns = "import os\nsorted((n, os.readlink(f'/proc/self/ns/{n}')) for n in ('mnt', 'net', 'pid', 'ipc', 'uts', 'user', 'cgroup')), open('/proc/self/uid_map').read().split()[1]";
    let (s_ns, b_ns, g1_ns, g2_ns) = (
        text(&c, &s, ns).await,
        text(&c, b, ns).await,
        text(&c, g1, ns).await,
        text(&c, g2, ns).await,
    );
    let parts = |t: &str| -> Vec<String> {
        t.replace(['[', ']', '(', ')', '\''], "")
            .split(", ")
            .map(str::to_string)
            .filter(|p| p.contains(':') || p.chars().all(|c| c.is_ascii_digit()))
            .collect()
    };
    for other in [&s_ns, &b_ns, &g2_ns] {
        for p in parts(&g1_ns) {
            assert!(
                !parts(other).contains(&p),
                "g1 shares {p}: {g1_ns} / {other}"
            );
        }
    }
    // From inside: only its own processes, no capabilities; signals reach
    // nothing outside; the parent's abstract socket is elsewhere.
    let probe = text(
        &c,
        g1,
        "import os, signal, socket\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\ncaps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\nout = []\nfor pid in range(2, 4096):\n    if pid == os.getpid(): continue\n    try:\n        os.kill(pid, signal.SIGKILL); out.append(pid)\n    except OSError: pass\ntry:\n    k = socket.socket(socket.AF_UNIX); k.connect('\\0forkd-b'); out.append('connected')\nexcept OSError as e: out.append(e.errno)\n(pids[:2], caps, out)",
    )
    .await;
    assert_eq!(
        probe, "([1, 2], ['0000000000000000', '0000000000000000', '0000000000000000'], [111])",
        "what the grandchild reached"
    );
    assert_eq!(text(&c, b, "x").await, "2");
    assert_eq!(text(&c, &s, "x").await, "1");
    assert_eq!(text(&c, g2, "x").await, "2");
    // A third level is refused, naming the way out.
    let e = refused(&c, branch_of(g1, 1)).await;
    assert!(e.contains("branch of a branch"), "{e}");
    // Cycles.
    for _ in 0..5 {
        for g in c.session_branch(branch_of(b, 2)).await.unwrap() {
            assert_eq!(text(&c, &g.session, "x").await, "2");
            c.session_kill(&g.session).await.unwrap();
        }
    }
    // The grandparent and the parent end; the grandchild carries on.
    c.session_kill(g2).await.unwrap();
    c.session_kill(&s).await.unwrap();
    c.session_kill(b).await.unwrap();
    assert_eq!(text(&c, g1, "x, open('/tmp/f').read()").await, "(3, 'g1')");
    assert!(c.session_info(g1).await.unwrap().parent_ended);
    c.session_kill(g1).await.unwrap();
    drop(c);
    d.finish().await;
}
