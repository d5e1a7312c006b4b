//! The perf-regression rule applied to runs recorded on the development VM
//! (`bench/testdata/*.json`, written by `forkd-bench check --out`): no
//! timing happens here, only recorded figures.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is the failure report, and casts are of small test values"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use forkd_bench::perfcheck::{compare, Metric, Record, Reference, Rule, Verdict};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn load(names: &[&str]) -> Vec<(String, Record)> {
    names
        .iter()
        .map(|n| (n.to_string(), Record::load(&testdata(n)).expect(n)))
        .collect()
}

/// Three back-to-back runs recorded on 2026-11-30 while other work kept both
/// cores of the VM saturated (others' load 2.0 cores in every round): the
/// worst case for the rule.
fn busy_runs() -> Vec<(String, Record)> {
    load(&["busy-1.json", "busy-2.json", "busy-3.json"])
}

/// `record` with one scenario's forkd figure made `factor` times slower in
/// every round (the floor, measured next to it, unchanged).
fn slowed(record: &Record, metric: Metric, factor: f64) -> Record {
    let mut r = record.clone();
    for round in &mut r.rounds {
        match metric {
            Metric::SingleWarm => round.warm_single_p50_us *= factor,
            Metric::BurstPool => round.burst_pool_wall_us *= factor,
            Metric::BurstNoPool => round.burst_nopool_wall_us *= factor,
            Metric::Sustained => round.sustained_per_sec /= factor,
            Metric::IdleChildUss => {
                round.idle_child_uss_bytes = round.idle_child_uss_bytes.map(|b| b * factor)
            }
        }
    }
    r
}

/// The committed baseline as it stood before the independent floor (taken
/// 2026-11-30): the recorded runs below were judged against it. A copy, so
/// retaking `bench/baseline.json` on new code does not change what these
/// tests of the rule mean.
fn pre_floor_baseline() -> Record {
    Record::load(&testdata("baseline-pre-floor.json")).expect("baseline-pre-floor.json")
}

#[test]
fn recorded_runs_are_usable() {
    for (name, run) in busy_runs() {
        assert_eq!(run.rounds.len(), 10, "{name}");
        for m in Metric::ALL {
            let values = run
                .rounds
                .iter()
                .filter_map(|r| m.value(r, &run.settings, run.reference()))
                .count();
            assert_eq!(values, run.rounds.len(), "{name}: {m:?}");
        }
        assert!(
            run.rounds.iter().all(|r| r.neighbour_cores > Some(1.9)),
            "{name}"
        );
    }
}

#[test]
fn identical_inputs_pass() {
    for (name, run) in busy_runs() {
        let cmp = compare(&run, &run, &Rule::default()).unwrap();
        for row in &cmp.rows {
            assert_eq!(row.verdict, Verdict::Ok, "{name}: {row:?}");
            assert_eq!(row.change, Some(0.0), "{name}: {row:?}");
        }
    }
}

#[test]
fn saturated_runs_of_the_same_code_do_not_fail() {
    let runs = busy_runs();
    for (a_name, a) in &runs {
        for (b_name, b) in &runs {
            let cmp = compare(a, b, &Rule::default()).unwrap();
            assert!(
                cmp.regressions().is_empty(),
                "{b_name} against {a_name}: {:#?}",
                cmp.rows
            );
        }
    }
}

/// Why the busy-host guard exists, on real data: without it, two runs of the
/// same code on the saturated VM differ "significantly" (busy-3 against
/// busy-2 is flagged); with it the difference is reported as inconclusive.
#[test]
fn busy_host_guard_is_what_keeps_saturated_runs_from_failing() {
    let runs = load(&["busy-2.json", "busy-3.json"]);
    let (a, b) = (&runs[0].1, &runs[1].1);
    let unguarded = Rule {
        busy_cores: f64::INFINITY,
        ..Rule::default()
    };
    let cmp = compare(a, b, &unguarded).unwrap();
    assert!(!cmp.regressions().is_empty(), "{:#?}", cmp.rows);
    let cmp = compare(a, b, &Rule::default()).unwrap();
    assert!(cmp.regressions().is_empty());
    assert!(cmp.rows.iter().any(|r| r.verdict == Verdict::Inconclusive));
}

#[test]
fn memory_growth_is_flagged_even_on_a_busy_host() {
    for (name, run) in busy_runs() {
        let fat = slowed(&run, Metric::IdleChildUss, 1.5);
        let cmp = compare(&run, &fat, &Rule::default()).unwrap();
        assert_eq!(cmp.regressions(), vec![Metric::IdleChildUss], "{name}");
    }
}

/// The command-line `compare` gives the exit status CI acts on.
#[test]
fn compare_command_exit_status() {
    let bin = env!("CARGO_BIN_EXE_forkd-bench");
    let run = |a: &Path, b: &Path| {
        Command::new(bin)
            .arg("compare")
            .arg(a)
            .arg(b)
            .output()
            .expect("run forkd-bench compare")
    };
    let same = run(&testdata("busy-1.json"), &testdata("busy-2.json"));
    let stdout = String::from_utf8_lossy(&same.stdout);
    assert_eq!(same.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("| single spawn p50, warm pool |"),
        "{stdout}"
    );

    let dir = std::env::temp_dir().join(format!("forkd-bench-recorded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fat_path = dir.join("fat.json");
    let base = Record::load(&testdata("busy-1.json")).unwrap();
    let fat = slowed(&base, Metric::IdleChildUss, 1.5);
    std::fs::write(&fat_path, serde_json::to_string(&fat).unwrap()).unwrap();
    let out = run(&testdata("busy-1.json"), &fat_path);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("**REGRESSION**"), "{stdout}");
    assert!(
        stdout.contains("FAIL — regression in idle pooled child USS"),
        "{stdout}"
    );
}

/// Three back-to-back runs recorded on 2026-11-30 on the quiet VM (nothing
/// else running), against the quiet baseline: what CI normally sees.
fn quiet_runs() -> Vec<(String, Record)> {
    load(&["quiet-1.json", "quiet-2.json", "quiet-3.json"])
}

const TIMED: [Metric; 4] = [
    Metric::SingleWarm,
    Metric::BurstPool,
    Metric::BurstNoPool,
    Metric::Sustained,
];

#[test]
fn on_quiet_runs_a_one_and_a_half_times_slowdown_is_flagged() {
    let runs = quiet_runs();
    for (a_name, a) in &runs {
        for (b_name, b) in &runs {
            if a_name == b_name {
                continue;
            }
            for m in TIMED {
                let cmp = compare(a, &slowed(b, m, 1.5), &Rule::default()).unwrap();
                assert!(
                    cmp.regressions().contains(&m),
                    "1.5x {m:?} in {b_name} against {a_name} not flagged: {:#?}",
                    cmp.rows
                );
            }
        }
    }
}

#[test]
fn quiet_runs_of_the_same_code_pass_against_themselves_and_the_baseline() {
    let baseline = pre_floor_baseline();
    for (name, run) in quiet_runs() {
        let cmp = compare(&run, &run, &Rule::default()).unwrap();
        assert!(cmp.regressions().is_empty(), "{name} against itself");
        // These runs passed the full check (with its confirmation rounds)
        // against this baseline; the first comparison alone must pass too.
        let cmp = compare(&baseline, &run, &Rule::default()).unwrap();
        assert!(
            cmp.regressions().is_empty(),
            "{name} against the baseline: {:#?}",
            cmp.rows
        );
    }
}

/// A run recorded with the independent floor (2026-12-04, VM saturated by
/// others' builds): against itself its ratios are to the floor; against the
/// pre-floor baseline, both sides fall back to the
/// no-isolation reference that every record carries (what CI does until the
/// baseline is retaken), and a slowdown is still judged, as inconclusive on
/// this busy host.
#[test]
fn a_run_with_the_independent_floor_against_an_older_baseline() {
    let run = Record::load(&testdata("busy-floor-1.json")).unwrap();
    assert_eq!(run.reference(), Reference::IndependentFloor);
    for m in Metric::ALL {
        let n = run
            .rounds
            .iter()
            .filter_map(|r| m.value(r, &run.settings, Reference::IndependentFloor))
            .count();
        assert_eq!(n, run.rounds.len(), "{m:?}");
    }
    let cmp = compare(&run, &run, &Rule::default()).unwrap();
    assert_eq!(cmp.reference, Reference::IndependentFloor);
    assert!(
        cmp.rows.iter().all(|r| r.verdict == Verdict::Ok),
        "{:#?}",
        cmp.rows
    );

    let baseline = pre_floor_baseline();
    let cmp = compare(&baseline, &run, &Rule::default()).unwrap();
    assert_eq!(cmp.reference, Reference::NoIsolation);
    assert!(cmp.regressions().is_empty(), "{:#?}", cmp.rows);

    let slow = slowed(&run, Metric::BurstNoPool, 1.5);
    let cmp = compare(&run, &slow, &Rule::default()).unwrap();
    assert_eq!(
        cmp.rows[2].verdict,
        Verdict::Inconclusive,
        "{:#?}",
        cmp.rows
    );
    let unguarded = Rule {
        busy_cores: f64::INFINITY,
        ..Rule::default()
    };
    let cmp = compare(&run, &slow, &unguarded).unwrap();
    assert_eq!(cmp.regressions(), vec![Metric::BurstNoPool]);
}

/// The baseline CI compares against is readable, carries the independent
/// floor, and has a figure for every metric in every round (a baseline that
/// lost one would silently stop judging that metric).
#[test]
fn the_committed_baseline_judges_every_metric_against_the_floor() {
    let baseline = Record::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("baseline.json"))
        .expect("bench/baseline.json");
    assert_eq!(baseline.reference(), Reference::IndependentFloor);
    for m in Metric::ALL {
        let n = baseline
            .rounds
            .iter()
            .filter_map(|r| m.value(r, &baseline.settings, Reference::IndependentFloor))
            .count();
        assert_eq!(n, baseline.rounds.len(), "{m:?}");
    }
}
