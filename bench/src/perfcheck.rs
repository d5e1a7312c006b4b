//! The perf-regression check's data and decision rule: what one measured
//! round holds, the metrics derived from it, and how a run is compared with a
//! baseline. No measuring here (that is `forkd-bench check`), so the rule can
//! be tested on recorded files.
//!
//! **Timed metrics are ratios measured in the same round**: each forkd figure
//! is divided by the **independent floor**'s figure for the same scenario,
//! measured right before it (bench/floor: a minimal fork server with the
//! same isolation and a warm pool, sharing no code with forkd), so a machine
//! that is slower today, or busy with a neighbour, moves numerator and
//! denominator together, and a slowdown in code forkd shares with its
//! reference cannot cancel out. Records taken before the independent floor
//! existed carry only the older **no-isolation reference** (forkd's own
//! zygote forking without isolation); a comparison involving one falls back
//! to that reference for both sides and says so ([`Reference`]).
//!
//! **The rule** (see [`Rule`]): a timed metric regresses when the median of
//! this run's per-round ratios is more than [`Rule::min_effect`] above the
//! baseline's median *and* a one-sided permutation test on the two sets of
//! per-round ratios (Wilcoxon rank-sum statistic) gives p < [`Rule::alpha`]. The idle child's memory is not
//! timing-noisy and is compared in absolute megabytes against
//! [`Rule::uss_tolerance_mb`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::stats;

/// Version of the record file layout; bump when fields change meaning.
pub const FORMAT: u32 = 1;

/// One interleaved round of measurements (raw figures; ratios are derived).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// Floor: p50 of sequential no-isolation spawns.
    pub floor_single_p50_us: f64,
    /// Floor: wall of `burst` concurrent no-isolation spawns.
    pub floor_burst_wall_us: f64,
    /// forkd with the warm pool: p50 of sequential spawns.
    pub warm_single_p50_us: f64,
    /// forkd with the warm pool: wall of `burst` concurrent spawns.
    pub burst_pool_wall_us: f64,
    /// forkd without a pool: wall of `burst` concurrent spawns.
    pub burst_nopool_wall_us: f64,
    /// forkd with the warm pool: verified spawns per second at `concurrency`.
    pub sustained_per_sec: f64,
    /// Median unique memory of the parked warm children (none parked: `None`).
    pub idle_child_uss_bytes: Option<f64>,
    /// CPU cores kept busy by others while the check sat idle for a moment
    /// at the start of the round (see `Rule::busy_cores`).
    #[serde(default)]
    pub neighbour_cores: Option<f64>,
    /// Independent floor, warm pool of `burst`: p50 of sequential spawns.
    #[serde(default)]
    pub indep_single_p50_us: Option<f64>,
    /// Independent floor, warm pool of `burst`: wall of `burst` concurrent
    /// spawns.
    #[serde(default)]
    pub indep_burst_pool_wall_us: Option<f64>,
    /// Independent floor without a pool: wall of `burst` concurrent spawns.
    #[serde(default)]
    pub indep_burst_nopool_wall_us: Option<f64>,
    /// Independent floor, warm pool: verified spawns per second at
    /// `concurrency`.
    #[serde(default)]
    pub indep_sustained_per_sec: Option<f64>,
}

impl Round {
    fn has_independent_floor(&self) -> bool {
        self.indep_single_p50_us.is_some()
            && self.indep_burst_pool_wall_us.is_some()
            && self.indep_burst_nopool_wall_us.is_some()
            && self.indep_sustained_per_sec.is_some()
    }
}

/// What the timed figures are divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// The independent floor's figure for the same scenario.
    IndependentFloor,
    /// The no-isolation reference (forkd's zygote without isolation): only
    /// when a record predates the independent floor.
    NoIsolation,
}

impl Reference {
    pub fn describe(self) -> &'static str {
        match self {
            Reference::IndependentFloor => "the independent floor (bench/floor: minimal fork server, same isolation, no forkd code)",
            Reference::NoIsolation => "the no-isolation reference (forkd's zygote without isolation) — a record lacks the independent floor's figures (it predates the floor, or the floor could not start on its host); take a new baseline to compare against the floor",
        }
    }
}

/// What the run was measured on. Ratios travel between machines far better
/// than absolute times, but not between CPU counts or cgroup versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub cpus: usize,
    pub kernel: String,
    pub cgroup_mode: String,
    /// `python --version` of the zygotes' interpreter, with numpy's version.
    pub python: String,
}

/// How each round was measured; two records compare only with equal settings
/// (the number of rounds may differ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Sequential spawns per single-spawn measurement.
    pub single_spawns: usize,
    /// Concurrent spawns per burst (also the warm pool's size).
    pub burst: usize,
    pub sustained_secs: f64,
    pub sustained_concurrency: usize,
}

/// A run of the check, or a baseline: per-round samples with their context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    /// Seconds since the Unix epoch when the run ended.
    pub taken_at_unix: u64,
    /// `git rev-parse HEAD` of the measured tree, when known.
    pub commit: Option<String>,
    /// Why this baseline was taken (`--update-baseline --reason`).
    pub reason: Option<String>,
    pub host: HostFacts,
    pub settings: Settings,
    pub rounds: Vec<Round>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a forkd-bench perf record ({source}); take a new one with `forkd-bench check --update-baseline --reason '...'`", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{} has record format {found}, this forkd-bench reads format {FORMAT}; take a new baseline with `forkd-bench check --update-baseline --reason '...'`", path.display())]
    Format { path: PathBuf, found: u32 },
    #[error("the {which} record has no rounds: it cannot be compared")]
    NoRounds { which: &'static str },
    #[error("the baseline was measured with other settings ({baseline:?}) than this run ({current:?}); run the check with the baseline's settings, or take a new baseline")]
    SettingsDiffer {
        baseline: Box<Settings>,
        current: Box<Settings>,
    },
}

impl Record {
    pub fn load(path: &Path) -> Result<Record, CheckError> {
        let text = std::fs::read_to_string(path).map_err(|source| CheckError::Read {
            path: path.to_owned(),
            source,
        })?;
        // Read the format first so an old file gets the format message, not
        // a missing-field one.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_str(&text).map_err(|source| CheckError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if head.format != FORMAT {
            return Err(CheckError::Format {
                path: path.to_owned(),
                found: head.format,
            });
        }
        serde_json::from_str(&text).map_err(|source| CheckError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The reference every round of this record can be divided by.
    pub fn reference(&self) -> Reference {
        if !self.rounds.is_empty() && self.rounds.iter().all(Round::has_independent_floor) {
            Reference::IndependentFloor
        } else {
            Reference::NoIsolation
        }
    }
}

/// The reference two records can share.
pub fn common_reference(a: &Record, b: &Record) -> Reference {
    match (a.reference(), b.reference()) {
        (Reference::IndependentFloor, Reference::IndependentFloor) => Reference::IndependentFloor,
        _ => Reference::NoIsolation,
    }
}

/// The figures the check compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    SingleWarm,
    BurstPool,
    BurstNoPool,
    Sustained,
    IdleChildUss,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::SingleWarm,
        Metric::BurstPool,
        Metric::BurstNoPool,
        Metric::Sustained,
        Metric::IdleChildUss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::SingleWarm => "single spawn p50, warm pool",
            Metric::BurstPool => "burst wall, warm pool",
            Metric::BurstNoPool => "burst wall, no pool",
            Metric::Sustained => "sustained throughput, warm pool",
            Metric::IdleChildUss => "idle pooled child USS",
        }
    }

    /// What the per-round value is.
    pub fn measure(self, reference: Reference) -> &'static str {
        match (self, reference) {
            (Metric::SingleWarm, Reference::IndependentFloor) => "÷ floor single p50",
            (Metric::BurstPool, Reference::IndependentFloor) => "÷ floor burst wall, pool",
            (Metric::BurstNoPool, Reference::IndependentFloor) => "÷ floor burst wall, no pool",
            (Metric::Sustained, Reference::IndependentFloor) => "floor rate ÷ forkd rate",
            (Metric::SingleWarm, Reference::NoIsolation) => "÷ no-isolation single p50",
            (Metric::BurstPool | Metric::BurstNoPool, Reference::NoIsolation) => {
                "÷ no-isolation burst wall"
            }
            (Metric::Sustained, Reference::NoIsolation) => "no-isolation burst rate ÷ forkd rate",
            (Metric::IdleChildUss, _) => "MB",
        }
    }

    /// Timed metrics are same-round ratios (higher is worse); memory is
    /// absolute.
    pub fn is_ratio(self) -> bool {
        !matches!(self, Metric::IdleChildUss)
    }

    /// The metric's value in one round; higher is worse for every metric.
    pub fn value(self, round: &Round, settings: &Settings, reference: Reference) -> Option<f64> {
        let ratio = |a: f64, b: f64| (a > 0.0 && b > 0.0).then(|| a / b);
        if reference == Reference::IndependentFloor {
            return match self {
                Metric::SingleWarm => ratio(round.warm_single_p50_us, round.indep_single_p50_us?),
                Metric::BurstPool => {
                    ratio(round.burst_pool_wall_us, round.indep_burst_pool_wall_us?)
                }
                Metric::BurstNoPool => ratio(
                    round.burst_nopool_wall_us,
                    round.indep_burst_nopool_wall_us?,
                ),
                // Throughput as a cost, higher is worse like the others.
                Metric::Sustained => ratio(round.indep_sustained_per_sec?, round.sustained_per_sec),
                Metric::IdleChildUss => round.idle_child_uss_bytes.map(|b| b / 1e6),
            };
        }
        match self {
            Metric::SingleWarm => ratio(round.warm_single_p50_us, round.floor_single_p50_us),
            Metric::BurstPool => ratio(round.burst_pool_wall_us, round.floor_burst_wall_us),
            Metric::BurstNoPool => ratio(round.burst_nopool_wall_us, round.floor_burst_wall_us),
            // Throughput turned into a cost so that higher is worse, like the
            // others: the floor's spawns per second in its burst over forkd's
            // sustained spawns per second.
            Metric::Sustained => {
                let floor_rate = ratio(settings.burst as f64 * 1e6, round.floor_burst_wall_us)?;
                ratio(floor_rate, round.sustained_per_sec)
            }
            Metric::IdleChildUss => round.idle_child_uss_bytes.map(|b| b / 1e6),
        }
    }

    fn values(self, record: &Record, reference: Reference) -> Vec<f64> {
        record
            .rounds
            .iter()
            .filter_map(|r| self.value(r, &record.settings, reference))
            .collect()
    }
}

/// The decision rule and its thresholds (README: "Performance regression
/// check" explains how they were chosen).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Significance level of the one-sided permutation test.
    pub alpha: f64,
    /// Smallest relative rise of a median ratio that counts as a regression.
    pub min_effect: f64,
    /// Largest rise of the idle child's median USS, in MB, that is tolerated.
    pub uss_tolerance_mb: f64,
    /// Random relabellings drawn by the permutation test.
    pub resamples: usize,
    /// Seed of those draws (fixed: the same files give the same verdict).
    pub seed: u64,
    /// When the median neighbour load of the judged run, or of the
    /// baseline, exceeds this many cores, a timing regression is reported as
    /// inconclusive instead: others' processes then compete with the
    /// daemon's threads far more than with the floor's simpler path, and
    /// ratios move by several times without any change in the code.
    pub busy_cores: f64,
}

impl Default for Rule {
    fn default() -> Self {
        Rule {
            alpha: 0.01,
            min_effect: 0.10,
            uss_tolerance_mb: 0.25,
            resamples: 20_000,
            seed: 0x5eed_f04c_d000_0001,
            busy_cores: 0.5,
        }
    }
}

impl Rule {
    /// The rule as one line of text, for tables and logs.
    pub fn describe(&self) -> String {
        format!(
            "timed: regression if the median same-round ratio rises by more than {:.0}% and a one-sided permutation test (rank sum) of the per-round ratios gives p < {}; memory: regression if the median idle child USS rises by more than {:.2} MB; inconclusive instead when others kept more than {} cores busy (median)",
            self.min_effect * 100.0,
            self.alpha,
            self.uss_tolerance_mb,
            self.busy_cores
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Significantly better beyond the effect threshold.
    Improved,
    Regression,
    /// Would be a regression, but the host was busy with other work.
    Inconclusive,
    /// Either side lacks values (e.g. no parked child to measure).
    NotMeasured,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Improved => "improved",
            Verdict::Regression => "**REGRESSION**",
            Verdict::Inconclusive => "slower, inconclusive (busy host)",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// One metric compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub metric: Metric,
    pub baseline_median: Option<f64>,
    pub current_median: Option<f64>,
    pub baseline_rounds: usize,
    pub current_rounds: usize,
    /// Relative change of the medians (timed) or absolute MB (memory).
    pub change: Option<f64>,
    /// One-sided p-value of "this run is slower" (timed metrics only).
    pub p_slower: Option<f64>,
    pub verdict: Verdict,
}

/// Differences between the hosts of two records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostDiff {
    /// Differences that make the ratios incomparable (CPU count, cgroup mode).
    pub blocking: Vec<String>,
    /// Differences worth reporting that leave ratios comparable (kernel,
    /// interpreter).
    pub warnings: Vec<String>,
}

pub fn compare_hosts(baseline: &HostFacts, current: &HostFacts) -> HostDiff {
    let mut diff = HostDiff::default();
    let mut note =
        |blocking: bool, what: &str, b: &dyn std::fmt::Display, c: &dyn std::fmt::Display| {
            let line = format!("{what}: baseline {b}, this host {c}");
            if blocking {
                diff.blocking.push(line);
            } else {
                diff.warnings.push(line);
            }
        };
    if baseline.cpus != current.cpus {
        note(true, "CPU count", &baseline.cpus, &current.cpus);
    }
    if baseline.cgroup_mode != current.cgroup_mode {
        note(
            true,
            "cgroup mode",
            &baseline.cgroup_mode,
            &current.cgroup_mode,
        );
    }
    if baseline.kernel != current.kernel {
        note(false, "kernel", &baseline.kernel, &current.kernel);
    }
    if baseline.python != current.python {
        note(false, "interpreter", &baseline.python, &current.python);
    }
    diff
}

/// The comparison of a run with a baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub rows: Vec<Row>,
    /// What the timed figures were divided by (on both sides).
    pub reference: Reference,
    pub hosts: HostDiff,
    pub rule: Rule,
    /// Median neighbour load (cores) of the baseline and of the judged run.
    pub neighbour_cores: (Option<f64>, Option<f64>),
}

impl Comparison {
    /// Whether others kept the host busier than the rule accepts while this
    /// run was measured.
    pub fn host_busy(&self) -> bool {
        self.neighbour_cores
            .1
            .is_some_and(|c| c > self.rule.busy_cores)
    }

    /// Whether the baseline itself was taken on a busy host (its ratios are
    /// then inflated and say little about the code: take it again).
    pub fn baseline_busy(&self) -> bool {
        self.neighbour_cores
            .0
            .is_some_and(|c| c > self.rule.busy_cores)
    }

    /// The verdict line of a comparison without regressions: says plainly
    /// when timing could not be judged.
    pub fn pass_text(&self) -> &'static str {
        if self.baseline_busy() {
            "PASS on memory only — timing not judged: the baseline was taken on a busy host (take a new one on a quiet host)"
        } else if self.host_busy() {
            if self.rows.iter().any(|r| r.verdict == Verdict::Inconclusive) {
                "PASS, inconclusive — the host was busy with other work and some timing looked slower; re-run on a quiet host to be sure"
            } else {
                "PASS — no regression (host busy: a timing regression would have been reported as inconclusive)"
            }
        } else {
            "PASS — no regression"
        }
    }

    pub fn regressions(&self) -> Vec<Metric> {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Regression)
            .map(|r| r.metric)
            .collect()
    }
}

/// Compares `current` with `baseline` under `rule`. Host differences are
/// reported in the result, not refused here: the caller decides.
pub fn compare(baseline: &Record, current: &Record, rule: &Rule) -> Result<Comparison, CheckError> {
    if baseline.rounds.is_empty() {
        return Err(CheckError::NoRounds { which: "baseline" });
    }
    if current.rounds.is_empty() {
        return Err(CheckError::NoRounds { which: "current" });
    }
    if baseline.settings != current.settings {
        return Err(CheckError::SettingsDiffer {
            baseline: Box::new(baseline.settings.clone()),
            current: Box::new(current.settings.clone()),
        });
    }
    let neighbours = |r: &Record| {
        let v: Vec<f64> = r.rounds.iter().filter_map(|r| r.neighbour_cores).collect();
        stats::median(&v)
    };
    let reference = common_reference(baseline, current);
    let mut cmp = Comparison {
        rows: Vec::new(),
        reference,
        hosts: compare_hosts(&baseline.host, &current.host),
        rule: rule.clone(),
        neighbour_cores: (neighbours(baseline), neighbours(current)),
    };
    let busy = cmp.host_busy() || cmp.baseline_busy();
    cmp.rows = Metric::ALL
        .iter()
        .map(|&metric| {
            let mut row = compare_metric(
                metric,
                &metric.values(baseline, reference),
                &metric.values(current, reference),
                rule,
            );
            // Memory does not depend on others' load; timing does.
            if busy && metric.is_ratio() && row.verdict == Verdict::Regression {
                row.verdict = Verdict::Inconclusive;
            }
            row
        })
        .collect();
    Ok(cmp)
}

fn compare_metric(metric: Metric, base: &[f64], cur: &[f64], rule: &Rule) -> Row {
    let (bm, cm) = (stats::median(base), stats::median(cur));
    let mut row = Row {
        metric,
        baseline_median: bm,
        current_median: cm,
        baseline_rounds: base.len(),
        current_rounds: cur.len(),
        change: None,
        p_slower: None,
        verdict: Verdict::NotMeasured,
    };
    let (Some(bm), Some(cm)) = (bm, cm) else {
        return row;
    };
    if !metric.is_ratio() {
        let rise = cm - bm;
        row.change = Some(rise);
        row.verdict = if rise > rule.uss_tolerance_mb {
            Verdict::Regression
        } else if rise < -rule.uss_tolerance_mb {
            Verdict::Improved
        } else {
            Verdict::Ok
        };
        return row;
    }
    let effect = cm / bm - 1.0;
    row.change = Some(effect);
    row.p_slower = stats::permutation_p_value(base, cur, rule.resamples, rule.seed);
    let p_faster = stats::permutation_p_value(cur, base, rule.resamples, rule.seed);
    let significant = |p: Option<f64>| p.is_some_and(|p| p < rule.alpha);
    row.verdict = if effect > rule.min_effect && significant(row.p_slower) {
        Verdict::Regression
    } else if effect < -rule.min_effect && significant(p_faster) {
        Verdict::Improved
    } else {
        Verdict::Ok
    };
    row
}

/// A raw figure of the context table: name, accessor, divisor, unit.
type RawFigure = (&'static str, fn(&Round) -> f64, f64, &'static str);

/// Median of a raw figure over a record's rounds, for the context table.
fn raw_median(record: &Record, field: fn(&Round) -> f64) -> Option<f64> {
    let values: Vec<f64> = record
        .rounds
        .iter()
        .map(field)
        .filter(|v| v.is_finite())
        .collect();
    stats::median(&values)
}

/// "2026-11-30 19:40 UTC" from Unix seconds (civil-from-days, H. Hinnant).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}

/// The comparison as a Markdown table (readable as plain text too), with the
/// absolute medians of both records underneath for context.
pub fn render(cmp: &Comparison, baseline: &Record, current: &Record) -> String {
    let mut out = String::new();
    let describe = |r: &Record| {
        format!(
            "{} rounds, {}{}",
            r.rounds.len(),
            utc_date(r.taken_at_unix),
            r.commit
                .as_deref()
                .map(|c| format!(", commit {}", &c[..c.len().min(12)]))
                .unwrap_or_default()
        )
    };
    let _ = writeln!(out, "### forkd perf-regression check\n");
    let _ = writeln!(out, "- baseline: {}", describe(baseline));
    let _ = writeln!(out, "- this run: {}", describe(current));
    let _ = writeln!(
        out,
        "- host: {} CPUs, kernel {}, cgroup {}, {}",
        current.host.cpus, current.host.kernel, current.host.cgroup_mode, current.host.python
    );
    for line in &cmp.hosts.blocking {
        let _ = writeln!(out, "- **host differs** — {line}");
    }
    for line in &cmp.hosts.warnings {
        let _ = writeln!(out, "- host differs (ratios still compared) — {line}");
    }
    let cores = |c: Option<f64>| c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "–".into());
    let _ = writeln!(
        out,
        "- others' load while the check idled (median, cores): baseline {}, this run {}{}",
        cores(cmp.neighbour_cores.0),
        cores(cmp.neighbour_cores.1),
        match (cmp.baseline_busy(), cmp.host_busy()) {
            (true, _) => " — **the baseline was taken on a busy host: timing regressions are reported as inconclusive; take a new baseline on a quiet host**",
            (false, true) => " — **host busy: timing regressions are reported as inconclusive**",
            (false, false) => "",
        }
    );
    let _ = writeln!(
        out,
        "- timed figures divided by {}",
        cmp.reference.describe()
    );
    let _ = writeln!(out, "- rule: {}\n", cmp.rule.describe());
    let _ = writeln!(
        out,
        "| scenario (N = {}) | per-round value | baseline median | this run median | change | p (slower) | verdict |",
        current.settings.burst
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for row in &cmp.rows {
        let fmt_value = |v: Option<f64>| match v {
            Some(v) if row.metric.is_ratio() => format!("{v:.3}"),
            Some(v) => format!("{v:.2} MB"),
            None => "–".into(),
        };
        let change = match row.change {
            Some(c) if row.metric.is_ratio() => format!("{:+.1}%", c * 100.0),
            Some(c) => format!("{c:+.2} MB"),
            None => "–".into(),
        };
        let p = row
            .p_slower
            .map(|p| format!("{p:.4}"))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.metric.name(),
            row.metric.measure(cmp.reference),
            fmt_value(row.baseline_median),
            fmt_value(row.current_median),
            change,
            p,
            row.verdict.label()
        );
    }
    let fields: [RawFigure; 10] = [
        (
            "floor single p50",
            |r| r.indep_single_p50_us.unwrap_or(f64::NAN),
            1e3,
            "ms",
        ),
        (
            "floor burst wall, pool",
            |r| r.indep_burst_pool_wall_us.unwrap_or(f64::NAN),
            1e3,
            "ms",
        ),
        (
            "floor burst wall, no pool",
            |r| r.indep_burst_nopool_wall_us.unwrap_or(f64::NAN),
            1e3,
            "ms",
        ),
        (
            "floor sustained",
            |r| r.indep_sustained_per_sec.unwrap_or(f64::NAN),
            1.0,
            "/s",
        ),
        (
            "no-isolation single p50",
            |r| r.floor_single_p50_us,
            1e3,
            "ms",
        ),
        (
            "no-isolation burst wall",
            |r| r.floor_burst_wall_us,
            1e3,
            "ms",
        ),
        ("warm single p50", |r| r.warm_single_p50_us, 1e3, "ms"),
        ("burst wall, pool", |r| r.burst_pool_wall_us, 1e3, "ms"),
        ("burst wall, no pool", |r| r.burst_nopool_wall_us, 1e3, "ms"),
        ("sustained", |r| r.sustained_per_sec, 1.0, "/s"),
    ];
    let _ = writeln!(out, "\nAbsolute medians (context only, not compared):");
    let _ = writeln!(out, "\n| figure | baseline | this run |\n|---|---|---|");
    for (name, field, scale, unit) in fields {
        let show = |r: &Record| {
            raw_median(r, field)
                .map(|v| format!("{:.2} {unit}", v / scale))
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(out, "| {name} | {} | {} |", show(baseline), show(current));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(k: f64) -> Round {
        Round {
            floor_single_p50_us: 2700.0 * k,
            floor_burst_wall_us: 250_000.0 * k,
            warm_single_p50_us: 2500.0 * k,
            burst_pool_wall_us: 300_000.0 * k,
            burst_nopool_wall_us: 320_000.0 * k,
            sustained_per_sec: 330.0 / k,
            idle_child_uss_bytes: Some(840_000.0),
            neighbour_cores: Some(0.05),
            indep_single_p50_us: Some(2700.0 * k),
            indep_burst_pool_wall_us: Some(250_000.0 * k),
            indep_burst_nopool_wall_us: Some(250_000.0 * k),
            indep_sustained_per_sec: Some(400.0 / k),
        }
    }

    fn record(rounds: Vec<Round>) -> Record {
        Record {
            format: FORMAT,
            taken_at_unix: 1_796_000_000,
            commit: Some("0123456789abcdef".into()),
            reason: None,
            host: HostFacts {
                cpus: 2,
                kernel: "6.18.0".into(),
                cgroup_mode: "V1".into(),
                python: "Python 3.11.7, numpy 2.4.6".into(),
            },
            settings: Settings {
                single_spawns: 40,
                burst: 100,
                sustained_secs: 1.5,
                sustained_concurrency: 8,
            },
            rounds,
        }
    }

    /// Rounds whose machine speed varies by up to ±20% while the ratios
    /// stay nearly constant: what the same-round ratio is for.
    fn noisy_rounds() -> Vec<Round> {
        [1.0, 1.2, 0.85, 1.1, 0.95, 1.15, 0.8, 1.05, 0.9, 1.0]
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let mut r = round(k);
                r.warm_single_p50_us *= 1.0 + 0.01 * (i % 3) as f64;
                r
            })
            .collect()
    }

    #[test]
    fn machine_speed_cancels_in_ratios() {
        let base = record(noisy_rounds());
        let cmp = compare(&base, &base, &Rule::default()).unwrap();
        assert!(cmp.regressions().is_empty(), "{cmp:?}");
        let single = &cmp.rows[0];
        assert!((single.baseline_median.unwrap() - 2500.0 / 2700.0).abs() < 0.02);
        assert_eq!(single.change, Some(0.0));
    }

    #[test]
    fn slowdown_above_threshold_is_flagged_below_is_not() {
        let base = record(noisy_rounds());
        for (factor, flagged) in [(1.5, true), (1.2, true), (1.05, false)] {
            let mut slow = base.clone();
            for r in &mut slow.rounds {
                r.burst_nopool_wall_us *= factor;
            }
            let cmp = compare(&base, &slow, &Rule::default()).unwrap();
            let want: Vec<Metric> = if flagged {
                vec![Metric::BurstNoPool]
            } else {
                vec![]
            };
            assert_eq!(cmp.regressions(), want, "factor {factor}");
        }
    }

    #[test]
    fn sustained_is_a_cost_higher_is_worse() {
        let base = record(noisy_rounds());
        let mut slow = base.clone();
        for r in &mut slow.rounds {
            r.sustained_per_sec /= 1.5;
        }
        let cmp = compare(&base, &slow, &Rule::default()).unwrap();
        assert_eq!(cmp.regressions(), vec![Metric::Sustained]);
        let cmp = compare(&slow, &base, &Rule::default()).unwrap();
        assert!(cmp.regressions().is_empty());
        assert_eq!(cmp.rows[3].verdict, Verdict::Improved);
    }

    #[test]
    fn memory_uses_an_absolute_tolerance() {
        let base = record(noisy_rounds());
        let mut more = base.clone();
        for r in &mut more.rounds {
            r.idle_child_uss_bytes = Some(840_000.0 + 200_000.0);
        }
        assert!(compare(&base, &more, &Rule::default())
            .unwrap()
            .regressions()
            .is_empty());
        for r in &mut more.rounds {
            r.idle_child_uss_bytes = Some(840_000.0 + 400_000.0);
        }
        assert_eq!(
            compare(&base, &more, &Rule::default())
                .unwrap()
                .regressions(),
            vec![Metric::IdleChildUss]
        );
        for r in &mut more.rounds {
            r.idle_child_uss_bytes = None;
        }
        let cmp = compare(&base, &more, &Rule::default()).unwrap();
        assert_eq!(cmp.rows[4].verdict, Verdict::NotMeasured);
    }

    #[test]
    fn a_few_slow_rounds_are_not_a_regression() {
        // Two rounds of ten hit by a neighbour (1.6× on the forkd side only):
        // the medians barely move.
        let base = record(noisy_rounds());
        let mut hit = base.clone();
        for r in hit.rounds.iter_mut().take(2) {
            r.burst_pool_wall_us *= 1.6;
        }
        assert!(compare(&base, &hit, &Rule::default())
            .unwrap()
            .regressions()
            .is_empty());
    }

    #[test]
    fn busy_host_makes_timing_regressions_inconclusive() {
        let base = record(noisy_rounds());
        let mut slow = base.clone();
        for r in &mut slow.rounds {
            r.warm_single_p50_us *= 1.5;
            r.idle_child_uss_bytes = Some(2_000_000.0);
            r.neighbour_cores = Some(1.2);
        }
        let cmp = compare(&base, &slow, &Rule::default()).unwrap();
        assert!(cmp.host_busy());
        assert_eq!(cmp.rows[0].verdict, Verdict::Inconclusive);
        // Memory is still judged.
        assert_eq!(cmp.regressions(), vec![Metric::IdleChildUss]);
        // A baseline taken on a busy host makes timing inconclusive too.
        let mut busy_base = base.clone();
        for r in &mut busy_base.rounds {
            r.neighbour_cores = Some(1.5);
        }
        let mut slow = base.clone();
        for r in &mut slow.rounds {
            r.warm_single_p50_us *= 1.5;
        }
        let cmp = compare(&busy_base, &slow, &Rule::default()).unwrap();
        assert!(cmp.baseline_busy() && !cmp.host_busy());
        assert!(cmp.pass_text().starts_with("PASS on memory only"));
        assert_eq!(cmp.rows[0].verdict, Verdict::Inconclusive);
        assert!(cmp.regressions().is_empty());
    }

    #[test]
    fn settings_and_hosts() {
        let base = record(noisy_rounds());
        let mut other = base.clone();
        other.settings.burst = 10;
        assert!(matches!(
            compare(&base, &other, &Rule::default()),
            Err(CheckError::SettingsDiffer { .. })
        ));
        let mut other = base.clone();
        other.host.cpus = 4;
        other.host.kernel = "6.1.0".into();
        let cmp = compare(&base, &other, &Rule::default()).unwrap();
        assert_eq!(cmp.hosts.blocking.len(), 1);
        assert_eq!(cmp.hosts.warnings.len(), 1);
        let empty = record(Vec::new());
        assert!(matches!(
            compare(&empty, &base, &Rule::default()),
            Err(CheckError::NoRounds { which: "baseline" })
        ));
    }

    /// A slowdown in code forkd shares with the no-isolation reference (its
    /// zygote) moves both and cancels in that ratio; the independent floor
    /// shares nothing and sees it. A record without the floor falls back to
    /// the no-isolation reference for both sides, and says so.
    #[test]
    fn the_independent_floor_sees_what_the_shared_reference_hides() {
        let base = record(noisy_rounds());
        assert_eq!(base.reference(), Reference::IndependentFloor);
        let mut shared_slowdown = base.clone();
        for r in &mut shared_slowdown.rounds {
            r.warm_single_p50_us *= 1.5;
            r.floor_single_p50_us *= 1.5;
        }
        let cmp = compare(&base, &shared_slowdown, &Rule::default()).unwrap();
        assert_eq!(cmp.reference, Reference::IndependentFloor);
        assert_eq!(cmp.regressions(), vec![Metric::SingleWarm]);

        let mut old = base.clone();
        for r in &mut old.rounds {
            r.indep_single_p50_us = None;
        }
        assert_eq!(old.reference(), Reference::NoIsolation);
        let cmp = compare(&old, &shared_slowdown, &Rule::default()).unwrap();
        assert_eq!(cmp.reference, Reference::NoIsolation);
        assert!(cmp.regressions().is_empty(), "{:#?}", cmp.rows);
        assert!(render(&cmp, &old, &shared_slowdown).contains("lacks the independent floor"));
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_796_070_600), "2026-11-30 20:30 UTC");
    }

    #[test]
    fn table_lists_every_metric_and_verdict() {
        let base = record(noisy_rounds());
        let mut slow = base.clone();
        for r in &mut slow.rounds {
            r.warm_single_p50_us *= 1.5;
        }
        let cmp = compare(&base, &slow, &Rule::default()).unwrap();
        let table = render(&cmp, &base, &slow);
        for m in Metric::ALL {
            assert!(table.contains(m.name()), "{table}");
        }
        assert_eq!(table.matches("**REGRESSION**").count(), 1, "{table}");
        assert!(table.contains("+50.0%"), "{table}");
    }
}
