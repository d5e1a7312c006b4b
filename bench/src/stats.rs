//! Small, dependency-free statistics for the perf-regression check: medians
//! and a one-sided permutation test on the difference of medians.
//!
//! Pure functions only (no clock, no I/O), so the decision rule is unit-tested
//! on fixed numbers.

/// Median of `values` (mean of the two middle values for an even count);
/// `None` when empty or when a value is NaN.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// One-sided permutation test of "`candidate` is larger than `baseline`".
///
/// Statistic: `median(candidate) - median(baseline)`. Under the null
/// hypothesis (both samples come from one distribution, so their labels are
/// exchangeable) every relabelling of the pooled values is equally likely;
/// the p-value is the share of relabellings whose statistic is at least the
/// observed one. It is estimated from `resamples` random relabellings drawn
/// with a fixed `seed` (the same inputs always give the same answer), as
/// `(1 + hits) / (1 + resamples)`, which never underestimates the exact
/// value's expectation and is never 0.
///
/// Returns `None` when either sample is empty or holds a NaN.
pub fn permutation_p_value(
    baseline: &[f64],
    candidate: &[f64],
    resamples: usize,
    seed: u64,
) -> Option<f64> {
    let observed = median(candidate)? - median(baseline)?;
    let mut pooled: Vec<f64> = baseline.iter().chain(candidate).copied().collect();
    let n_base = baseline.len();
    let mut rng = SplitMix64(seed);
    // A relabelling that ties the observed statistic counts as a hit; the
    // tolerance keeps float rounding in the subtraction from splitting ties.
    let tolerance = 1e-12 * observed.abs().max(1.0);
    let mut hits = 0usize;
    for _ in 0..resamples {
        shuffle(&mut pooled, &mut rng);
        let (b, c) = pooled.split_at(n_base);
        let statistic = median(c)? - median(b)?;
        if statistic >= observed - tolerance {
            hits += 1;
        }
    }
    Some((1 + hits) as f64 / (1 + resamples) as f64)
}

/// Fisher–Yates shuffle.
fn shuffle(values: &mut [f64], rng: &mut SplitMix64) {
    for i in (1..values.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        values.swap(i, j);
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed deterministic
/// generator; statistical quality is ample for drawing permutations.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (rejection sampling, no modulo bias).
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let x = self.next();
            if x < zone {
                return x % bound;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn separated_samples_are_significant() {
        let base = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.00];
        let slow: Vec<f64> = base.iter().map(|v| v * 1.5).collect();
        let p = permutation_p_value(&base, &slow, 10_000, 1).unwrap();
        // Exact value: 1 / C(16, 8) = 1/12870; the estimate is (1+hits)/10001.
        assert!(p < 0.001, "p = {p}");
    }

    #[test]
    fn identical_samples_are_not_significant() {
        let base = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.00];
        let p = permutation_p_value(&base, &base, 10_000, 1).unwrap();
        assert!(p > 0.3, "p = {p}");
    }

    #[test]
    fn one_sided_improvement_is_not_a_regression() {
        let base = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.00];
        let fast: Vec<f64> = base.iter().map(|v| v * 0.7).collect();
        let p = permutation_p_value(&base, &fast, 10_000, 1).unwrap();
        assert!(p > 0.99, "p = {p}");
    }

    #[test]
    fn deterministic_for_a_seed() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let b = [2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(
            permutation_p_value(&a, &b, 5_000, 7),
            permutation_p_value(&a, &b, 5_000, 7)
        );
    }

    #[test]
    fn exact_distribution_is_approximated() {
        // Two samples of two: of the C(4,2) = 6 labellings, candidate {3,4}
        // is the only one with a difference of medians >= the observed 2.
        let p = permutation_p_value(&[1.0, 2.0], &[3.0, 4.0], 60_000, 3).unwrap();
        assert!((p - 1.0 / 6.0).abs() < 0.01, "p = {p}");
    }

    #[test]
    fn empty_or_nan_inputs_give_none() {
        assert_eq!(permutation_p_value(&[], &[1.0], 10, 1), None);
        assert_eq!(permutation_p_value(&[1.0], &[f64::NAN], 10, 1), None);
    }
}
