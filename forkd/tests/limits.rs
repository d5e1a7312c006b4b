//! Resource limits: memory, pids, wall-clock time, output.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_oom_killed() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    // 512 MiB of touched memory (bytes objects are filled, not lazily mapped).
    let mut r = req("chunks = []\nfor i in range(512):\n    chunks.append(b'\\x01' * (1 << 20))\nprint('survived', len(chunks))");
    r.limits.memory_bytes = Some(64 * MIB);
    let res = d.spawn(&r).await.unwrap();
    println!(
        "{:?} {:?} {:?} {:?}",
        res.exit_code, res.signal, res.killed_by, res.usage
    );
    assert_eq!(
        res.killed_by,
        Some(KilledBy::Oom),
        "stderr: {}",
        res.stderr_lossy()
    );
    assert_eq!((res.exit_code, res.signal), (None, Some(9)));
    assert_eq!(res.stdout, b"");
    assert_eq!(res.limits.memory_bytes, 64 * MIB);
    assert!(res.usage.peak_memory_bytes <= 64 * MIB, "{:?}", res.usage);
    assert!(res.usage.peak_memory_bytes > 32 * MIB, "{:?}", res.usage);

    // The OOM killer takes the biggest process: a child here. The program
    // survives and exits 0, and the result still says what happened.
    let code = r#"
import os
pid = os.fork()
if pid == 0:
    chunks = [b'\x01' * (1 << 20) for _ in range(512)]
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"#;
    let mut r = req(code);
    r.limits.memory_bytes = Some(64 * MIB);
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(
        res.stdout_lossy(),
        "child -9\n",
        "stderr: {}",
        res.stderr_lossy()
    );
    assert_eq!((res.exit_code, res.signal), (Some(0), None));
    assert_eq!(res.killed_by, Some(KilledBy::Oom));

    // Within the limit nothing happens.
    let mut r = req("x = b'\\x01' * (16 << 20)\nprint(len(x))");
    r.limits.memory_bytes = Some(64 * MIB);
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(
        (res.exit_code, res.killed_by),
        (Some(0), None),
        "stderr: {}",
        res.stderr_lossy()
    );
    assert!(res.usage.peak_memory_bytes >= 16 * MIB, "{:?}", res.usage);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_contained_by_the_pids_limit() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    // No warm pool: the host-side process census below counts every
    // process of this daemon, and parked children would be in it.
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = 0).await;
    let code = r#"
import os, sys, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except BlockingIOError as e:
    print(n, e.errno, flush=True)
    sys.exit(3)
"#;
    let mut r = req(code);
    r.limits.pids = Some(16);
    r.timeout_ms = Some(15_000);
    let started = Instant::now();
    let res = d.spawn(&r).await.unwrap();
    let elapsed = started.elapsed();
    // Right away (no wait): nothing of the sandbox may be left on the host.
    let left = sandbox_processes(&d.instance, res.sandbox);
    println!(
        "{:?} {:?} {:?} {:?} in {elapsed:?}",
        res.exit_code,
        res.signal,
        res.killed_by,
        res.stdout_lossy()
    );
    assert!(left.is_empty(), "fork bomb survivors: {left:#?}");
    // Also by the zygote's environment marker, which forked processes keep
    // wherever they end up: only the zygote itself is left.
    let zygote = d.zygote_pid().await;
    let ours: Vec<ProcInfo> = processes_of(&d.instance)
        .into_iter()
        .filter(|p| p.pid != zygote)
        .collect();
    assert!(
        ours.is_empty(),
        "processes of this daemon besides its zygote: {ours:#?}"
    );
    // 16 pids: the program itself and 15 sleeping children; the 16th fork
    // fails with EAGAIN.
    assert_eq!(
        res.stdout_lossy(),
        "15 11\n",
        "stderr: {}",
        res.stderr_lossy()
    );
    assert_eq!((res.exit_code, res.signal), (Some(3), None));
    assert_eq!(res.killed_by, Some(KilledBy::Pids));
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(
        !d.settings().config.limits.default.pids.eq(&16),
        "the default must differ for this test to mean anything"
    );

    // Hitting the pids limit but exiting 0 is not blamed on the limit.
    let code = r#"
import os
try:
    while True:
        if os.fork() == 0:
            import time; time.sleep(60)
except BlockingIOError:
    print("stopped")
"#;
    let mut r = req(code);
    r.limits.pids = Some(4);
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(
        res.stdout_lossy(),
        "stopped\n",
        "stderr: {}",
        res.stderr_lossy()
    );
    assert_eq!((res.exit_code, res.killed_by), (Some(0), None));
    assert!(sandbox_processes(&d.instance, res.sandbox).is_empty());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_loop_and_its_child_die_at_the_timeout() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    // No warm pool: the host-side process census below counts every
    // process of this daemon, and parked children would be in it.
    let d = TestDaemon::start(|c| c.zygotes[0].warm_pool = 0).await;
    let code = "import os\npid = os.fork()\nif pid == 0:\n    while True: pass\nprint('child', pid, flush=True)\nwhile True: pass";
    let mut r = req(code);
    // Long enough for the host-side scan below to see both processes even
    // under emulation (tests/vm/cgroup-v2-vm.sh runs this in a TCG guest).
    r.timeout_ms = Some(2_000);
    let client = d.client().await;
    let task = tokio::spawn(async move { client.spawn(&r).await });
    // Watch both spinning processes from the host.
    let instance = d.instance.clone();
    let mut seen: Vec<ProcInfo> = Vec::new();
    let found = wait_until(Duration::from_secs(5), || {
        seen = processes_of(&instance)
            .into_iter()
            .filter(|p| p.state != 'Z' && cgroup_under(&p.cgroup, &instance, None))
            .collect();
        seen.len() == 2
    })
    .await;
    assert!(found, "expected 2 sandbox processes, saw {seen:#?}");
    let res = task.await.unwrap().expect("spawn");
    println!(
        "{:?} {:?} {:?} {:?}",
        res.exit_code, res.signal, res.killed_by, res.timings
    );
    assert_eq!(res.killed_by, Some(KilledBy::Timeout));
    // The timeout's SIGTERM interrupted the loop: it ended by SIGTERM.
    assert_eq!((res.exit_code, res.signal), (None, Some(15)));
    assert_eq!(res.stdout_lossy(), "child 2\n");
    assert!(res.timings.total_us >= 2_000_000, "{:?}", res.timings);
    // Killed promptly: the program ran no longer than the timeout plus the
    // kill's latency. (Not the total: fork and isolation come first and take
    // over a second each in an emulated guest.)
    assert!(res.timings.run_us < 3_500_000, "{:?}", res.timings);
    assert!(
        res.usage.cpu_user_us > 100_000,
        "it did spin: {:?}",
        res.usage
    );
    // Both are dead by the time the reply arrives (no wait).
    for p in &seen {
        assert!(
            !process_alive(p.pid, p.starttime),
            "sandbox process survived the timeout: {p}"
        );
    }
    let zygote = d.zygote_pid().await;
    let ours: Vec<ProcInfo> = processes_of(&d.instance)
        .into_iter()
        .filter(|p| p.pid != zygote)
        .collect();
    assert!(
        ours.is_empty(),
        "processes of this daemon besides its zygote: {ours:#?}"
    );
    d.finish().await;
}

/// `len` bytes of a pattern that differs per `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + seed as usize * 13) % 256) as u8)
        .collect()
}

const PY_PATTERN: &str =
    "def pattern(n, seed):\n    return bytes((i * 7 + seed * 13) % 256 for i in range(n))\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_bounded_and_large_output_is_intact() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;

    // 10 MB of stdout under a 1 MiB limit: exactly the limit is kept.
    let mut r = req("import sys\nsys.stdout.buffer.write(b'x' * 10_000_000)\nsys.stdout.flush()\nprint('done', file=sys.stderr)");
    r.limits.output_bytes = Some(MIB);
    let started = Instant::now();
    let res = d.spawn(&r).await.unwrap();
    println!(
        "flood: {:?} {:?} {:?} in {:?}",
        res.exit_code,
        res.signal,
        res.killed_by,
        started.elapsed()
    );
    assert_eq!(res.killed_by, Some(KilledBy::OutputLimit));
    assert!(res.stdout_truncated);
    assert!(!res.stderr_truncated);
    assert_eq!(
        res.stdout.len() as u64,
        MIB,
        "the daemon keeps exactly output_bytes"
    );
    assert!(res.stdout.iter().all(|b| *b == b'x'));
    assert!(res.stderr.is_empty(), "{}", res.stderr_lossy());
    assert!(started.elapsed() < Duration::from_secs(10));

    // stdout and stderr share one budget.
    let mut r = req("import sys\nsys.stdout.buffer.write(b'o' * 60000); sys.stdout.flush()\nsys.stderr.buffer.write(b'e' * 60000); sys.stderr.flush()");
    r.limits.output_bytes = Some(100_000);
    let res = d.spawn(&r).await.unwrap();
    assert_eq!(res.killed_by, Some(KilledBy::OutputLimit));
    // Which stream hits the limit depends on the order the daemon happens to
    // read the two pipes in; what is kept is a prefix of each, 100 000 bytes
    // in total.
    assert_eq!(res.stdout.len() + res.stderr.len(), 100_000);
    assert!(res.stdout.iter().all(|b| *b == b'o') && res.stdout.len() <= 60_000);
    assert!(res.stderr.iter().all(|b| *b == b'e') && res.stderr.len() <= 60_000);
    assert!(res.stdout_truncated || res.stderr_truncated);

    // Exactly the limit is not an overflow; one byte more is.
    for (n, over) in [(100_000usize, false), (100_001, true)] {
        let mut r = req(&format!("import sys\nsys.stdout.buffer.write(b'z' * {n})"));
        r.limits.output_bytes = Some(100_000);
        let res = d.spawn(&r).await.unwrap();
        assert_eq!(res.stdout.len(), 100_000, "n = {n}");
        assert_eq!(res.stdout_truncated, over, "n = {n}");
        if over {
            assert_eq!(res.killed_by, Some(KilledBy::OutputLimit));
        } else {
            assert_eq!((res.exit_code, res.killed_by), (Some(0), None));
        }
    }

    // 200 KB on each stream (more than a pipe buffer), big writes and then
    // interleaved small ones: everything arrives intact, nothing deadlocks.
    let code = format!(
        "{PY_PATTERN}import sys\nout, err = sys.stdout.buffer, sys.stderr.buffer\nout.write(pattern(200000, 1)); out.flush()\nerr.write(pattern(200000, 2)); err.flush()\na, b = pattern(50000, 3), pattern(50000, 4)\nfor i in range(0, 50000, 1000):\n    out.write(a[i:i+1000]); out.flush()\n    err.write(b[i:i+1000]); err.flush()\n"
    );
    let res = d.spawn(&req(&code)).await.unwrap();
    assert_eq!(
        (res.exit_code, res.killed_by),
        (Some(0), None),
        "stderr tail: {:?}",
        &res.stderr_lossy()
            .chars()
            .rev()
            .take(300)
            .collect::<String>()
    );
    let mut want_out = pattern(200_000, 1);
    want_out.extend(pattern(50_000, 3));
    let mut want_err = pattern(200_000, 2);
    want_err.extend(pattern(50_000, 4));
    assert!(
        res.stdout == want_out,
        "stdout differs (len {} vs {})",
        res.stdout.len(),
        want_out.len()
    );
    assert!(
        res.stderr == want_err,
        "stderr differs (len {} vs {})",
        res.stderr.len(),
        want_err.len()
    );
    assert!(!res.stdout_truncated && !res.stderr_truncated);
    d.finish().await;
}

/// The zygote holds a pidfd per running sandbox, and a freshly forked child
/// inherits them until it closes everything it does not need; a low
/// open-files limit must not make isolation fail while many sandboxes run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_open_files_limit_with_many_sandboxes_running() {
    if skip_unless_root("starts a daemon that creates namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|_| {}).await;
    let client = d.client().await;
    let mut sleepers = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let client = client.clone();
        let mut r = req("import time; time.sleep(3); print('slept')");
        r.timeout_ms = Some(30_000);
        sleepers.spawn(async move { client.spawn(&r).await });
    }
    // Wait until the zygote holds a pidfd for each of them.
    let zygote = d.zygote_pid().await;
    let zygote_fds = || {
        std::fs::read_dir(format!("/proc/{zygote}/fd"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || zygote_fds() >= 40).await,
        "the zygote holds only {} descriptors",
        zygote_fds()
    );
    let mut r = req("import os; print(len(os.listdir('/proc/self/fd')))");
    r.limits.open_files = Some(16);
    let res = d.spawn(&r).await.expect("a sandbox with open_files = 16");
    assert_eq!(res.exit_code, Some(0), "stderr: {}", res.stderr_lossy());
    // stdin, stdout, stderr and the listing's own descriptor (fd 3, the
    // status pipe, is close-on-exec but still open: listed too).
    let fds: u32 = res.stdout_lossy().trim().parse().unwrap();
    assert!(fds <= 5, "{fds} descriptors open in the sandbox");
    while let Some(joined) = sleepers.join_next().await {
        let r = joined.unwrap().expect("sleeper");
        assert_eq!(r.stdout_lossy(), "slept\n");
    }
    drop(client);
    d.finish().await;
}

/// A timeout sends SIGTERM first: a program at Python's default disposition
/// stops gracefully (its `finally`, atexit functions and the final flush of
/// buffered output run, as for an interrupt, with no traceback) and ends by
/// SIGTERM; a SIGTERM handler of its own runs; a program that ignores
/// SIGTERM is SIGKILLed once the grace has passed; a grace of 0 SIGKILLs at
/// once (buffered output lost). The result says `killed_by: timeout` each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_sends_sigterm_then_sigkill_after_the_grace() {
    if skip_unless_root("starts daemons that create namespaces and cgroups") {
        return;
    }
    let d = TestDaemon::start(|c| c.limits.default.timeout_grace_ms = 1_000).await;
    let run = |code: &str| {
        let mut r = req(code);
        r.timeout_ms = Some(1_000);
        r
    };
    let mut t = Table::new();
    let summary = |res: &forkd_ipc::SpawnResult| {
        format!(
            "{:?} {:?} {:?} out={:?} err={:?}",
            res.killed_by,
            res.exit_code,
            res.signal,
            res.stdout_lossy(),
            res.stderr_lossy()
        )
    };

    let res = d
        .spawn(&run("import atexit, sys, time\natexit.register(lambda: print('atexit'))\nprint('buffered')\nsys.stderr.write('to stderr\\n')\ntry:\n    time.sleep(30)\nfinally:\n    print('finally')\n"))
        .await
        .unwrap();
    t.check(
        "default SIGTERM: finally, atexit and buffered output arrive",
        &summary(&res),
        &["Some(Timeout) None Some(15) out=\"buffered\\nfinally\\natexit\\n\" err=\"to stderr\\n\""],
    );
    let res = d
        .spawn(&run("import signal, sys, time\ndef bye(signum, frame):\n    print('handler', signum)\n    sys.exit(3)\nsignal.signal(signal.SIGTERM, bye)\nprint('buffered')\ntime.sleep(30)\n"))
        .await
        .unwrap();
    t.check(
        "the program's own SIGTERM handler runs",
        &summary(&res),
        &["Some(Timeout) Some(3) None out=\"buffered\\nhandler 15\\n\" err=\"\""],
    );
    let t0 = Instant::now();
    let res = d
        .spawn(&run("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('lost')\nwhile True:\n    time.sleep(0.01)\n"))
        .await
        .unwrap();
    let took = t0.elapsed();
    t.check(
        "SIGTERM ignored: SIGKILL after the grace",
        &summary(&res),
        &["Some(Timeout) None Some(9) out=\"\" err=\"\""],
    );
    t.check(
        "  ... not before the timeout plus the grace",
        &(took >= Duration::from_millis(2_000)).to_string(),
        &["true"],
    );
    d.finish().await;

    let d = TestDaemon::start(|c| c.limits.default.timeout_grace_ms = 0).await;
    let res = d
        .spawn(&run("import time\nprint('lost')\ntry:\n    time.sleep(30)\nfinally:\n    print('finally')\n"))
        .await
        .unwrap();
    t.check(
        "grace 0: SIGKILL at once",
        &summary(&res),
        &["Some(Timeout) None Some(9) out=\"\" err=\"\""],
    );
    d.finish().await;
    t.assert_all("timeout: SIGTERM, grace, SIGKILL");
}
