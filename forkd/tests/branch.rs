//! Live branches of a session against a real daemon and kernel
//! (docs/branch.md): the copy's state, divergence, seeds, isolation from the
//! parent and siblings, limits, and cleanup.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use common::*;
use forkd_ipc::{AsyncClient, RunCode, SessionBranch, SessionCreate};

fn cell(session: &str, code: &str) -> RunCode {
    RunCode {
        session: session.into(),
        code: code.into(),
        timeout_ms: Some(30_000),
    }
}

async fn text(c: &AsyncClient, s: &str, code: &str) -> String {
    let r = c.run_code(&cell(s, code)).await.unwrap();
    assert!(
        r.error.is_none(),
        "{code}: {:?}\n{}",
        r.error,
        String::from_utf8_lossy(&r.stderr)
    );
    r.text.unwrap_or_default()
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
    let s = c
        .session_create(&SessionCreate::default())
        .await
        .unwrap()
        .session;
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
}
