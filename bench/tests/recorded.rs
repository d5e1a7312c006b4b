//! The perf-regression rule applied to runs recorded on the development VM
//! (`bench/testdata/run-*.json`, written by `forkd-bench check --out`): no
//! timing happens here. Three real runs of the same code must compare clean
//! in every pairing; the same runs with one scenario made slower must be
//! flagged, on that scenario only.

use std::path::{Path, PathBuf};
use std::process::Command;

use forkd_bench::perfcheck::{compare, Metric, Record, Rule, Verdict};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn runs() -> Vec<(String, Record)> {
    ["run-1.json", "run-2.json", "run-3.json"]
        .iter()
        .map(|n| (n.to_string(), Record::load(&testdata(n)).expect(n)))
        .collect()
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

#[test]
fn recorded_runs_are_usable() {
    for (name, run) in runs() {
        assert!(
            run.rounds.len() >= 10,
            "{name}: {} rounds",
            run.rounds.len()
        );
        for m in Metric::ALL {
            let values = run
                .rounds
                .iter()
                .filter_map(|r| m.value(r, &run.settings))
                .count();
            assert_eq!(values, run.rounds.len(), "{name}: {m:?}");
        }
    }
}

#[test]
fn identical_inputs_pass() {
    for (name, run) in runs() {
        let cmp = compare(&run, &run, &Rule::default()).unwrap();
        for row in &cmp.rows {
            assert_eq!(row.verdict, Verdict::Ok, "{name}: {row:?}");
            assert_eq!(row.change, Some(0.0), "{name}: {row:?}");
        }
    }
}

#[test]
fn independent_runs_of_the_same_code_pass() {
    let runs = runs();
    for (a_name, a) in &runs {
        for (b_name, b) in &runs {
            if a_name == b_name {
                continue;
            }
            let cmp = compare(a, b, &Rule::default()).unwrap();
            assert!(
                cmp.regressions().is_empty(),
                "{b_name} against {a_name}: {:#?}",
                cmp.rows
            );
        }
    }
}

#[test]
fn one_and_a_half_times_slower_is_flagged_on_that_scenario_only() {
    for (name, run) in runs() {
        for metric in Metric::ALL.into_iter().filter(|m| m.is_ratio()) {
            let cmp = compare(&run, &slowed(&run, metric, 1.5), &Rule::default()).unwrap();
            assert_eq!(cmp.regressions(), vec![metric], "{name}: {:#?}", cmp.rows);
        }
    }
}

#[test]
fn slowdown_against_another_run_is_flagged() {
    // Baseline and judged run are different real runs (noise on both
    // sides), as in CI.
    let runs = runs();
    for (a_name, a) in &runs {
        for (b_name, b) in &runs {
            if a_name == b_name {
                continue;
            }
            for metric in Metric::ALL.into_iter().filter(|m| m.is_ratio()) {
                let cmp = compare(a, &slowed(b, metric, 1.5), &Rule::default()).unwrap();
                assert_eq!(
                    cmp.regressions(),
                    vec![metric],
                    "{b_name} ×1.5 against {a_name}: {:#?}",
                    cmp.rows
                );
            }
            // The target: a change making spawning 20% slower.
            let cmp = compare(a, &slowed(b, Metric::SingleWarm, 1.2), &Rule::default()).unwrap();
            assert_eq!(
                cmp.regressions(),
                vec![Metric::SingleWarm],
                "{b_name} single ×1.2 against {a_name}: {:#?}",
                cmp.rows
            );
        }
    }
}

#[test]
fn memory_growth_is_flagged() {
    for (name, run) in runs() {
        let mut fat = run.clone();
        for r in &mut fat.rounds {
            r.idle_child_uss_bytes = r.idle_child_uss_bytes.map(|b| b + 500_000.0);
        }
        let cmp = compare(&run, &fat, &Rule::default()).unwrap();
        assert_eq!(cmp.regressions(), vec![Metric::IdleChildUss], "{name}");
    }
}

/// The command-line `compare` gives the exit status CI acts on.
#[test]
fn compare_command_exit_status() {
    let bin = env!("CARGO_BIN_EXE_forkd-bench");
    let status = |a: &Path, b: &Path| {
        Command::new(bin)
            .arg("compare")
            .arg(a)
            .arg(b)
            .output()
            .expect("run forkd-bench compare")
    };
    let same = status(&testdata("run-1.json"), &testdata("run-2.json"));
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
    assert!(String::from_utf8_lossy(&same.stdout).contains("| single spawn p50, warm pool |"));

    let dir = std::env::temp_dir().join(format!("forkd-bench-recorded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let slow_path = dir.join("slow.json");
    let slow = slowed(
        &Record::load(&testdata("run-2.json")).unwrap(),
        Metric::BurstPool,
        1.5,
    );
    std::fs::write(&slow_path, serde_json::to_string(&slow).unwrap()).unwrap();
    let out = status(&testdata("run-1.json"), &slow_path);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("**REGRESSION**"), "{stdout}");
    assert!(
        stdout.contains("FAIL — regression in burst wall, warm pool"),
        "{stdout}"
    );
}
