//! Small, dependency-free statistics for the perf-regression check: medians
//! and a one-sided permutation test on ranks.
//!
//! Pure functions only (no clock, no I/O), so the decision rule is unit-tested
//! on fixed numbers.

/// A duration in whole microseconds, saturating (a latency sample).
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

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

/// Ranks of `values` from 1 (smallest), ties given the mean of the ranks
/// they span ("midranks").
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let midrank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = midrank;
        }
        i = j + 1;
    }
    ranks
}

/// One-sided permutation test of "`candidate` tends to be larger than
/// `baseline`", on the Wilcoxon–Mann–Whitney rank-sum statistic.
///
/// Statistic: the sum of the candidate's ranks in the pooled sample. Under
/// the null hypothesis (both samples come from one distribution, so their
/// labels are exchangeable) every relabelling of the pooled values is equally
/// likely; the p-value is the share of relabellings whose statistic is at
/// least the observed one. Ranks make it insensitive to how far an outlier
/// round lies (one round hit by a neighbour weighs as one rank, not as its
/// size). Estimated from `resamples` random relabellings drawn with a fixed
/// `seed` (the same inputs always give the same answer), as
/// `(1 + hits) / (1 + resamples)`, which is never 0 and does not understate
/// the exact value on average.
///
/// Returns `None` when either sample is empty or holds a NaN.
pub fn permutation_p_value(
    baseline: &[f64],
    candidate: &[f64],
    resamples: usize,
    seed: u64,
) -> Option<f64> {
    if baseline.is_empty()
        || candidate.is_empty()
        || baseline.iter().chain(candidate).any(|v| v.is_nan())
    {
        return None;
    }
    let pooled: Vec<f64> = baseline.iter().chain(candidate).copied().collect();
    let mut ranks = ranks(&pooled);
    let n_base = baseline.len();
    let observed: f64 = ranks[n_base..].iter().sum();
    let mut rng = SplitMix64(seed);
    let mut hits = 0usize;
    for _ in 0..resamples {
        shuffle(&mut ranks, &mut rng);
        // Rank sums are multiples of 0.5: the tolerance only absorbs float
        // rounding so that ties with the observed sum count as hits.
        if ranks[n_base..].iter().sum::<f64>() >= observed - 1e-9 {
            hits += 1;
        }
    }
    Some((1 + hits) as f64 / (1 + resamples) as f64)
}

/// Fisher–Yates shuffle.
fn shuffle(values: &mut [f64], rng: &mut SplitMix64) {
    for i in (1..values.len()).rev() {
        let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(i); // below(i + 1) <= i
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
        // is the only one with a rank sum >= the observed 7.
        let p = permutation_p_value(&[1.0, 2.0], &[3.0, 4.0], 60_000, 3).unwrap();
        assert!((p - 1.0 / 6.0).abs() < 0.01, "p = {p}");
        // {2,4} and {3,4} reach the observed 6 of candidate {2,4}: 2/6.
        let p = permutation_p_value(&[1.0, 3.0], &[2.0, 4.0], 60_000, 3).unwrap();
        assert!((p - 2.0 / 6.0).abs() < 0.01, "p = {p}");
    }

    #[test]
    fn midranks() {
        assert_eq!(ranks(&[10.0, 30.0, 20.0]), vec![1.0, 3.0, 2.0]);
        assert_eq!(ranks(&[5.0, 1.0, 5.0, 7.0]), vec![2.5, 1.0, 2.5, 4.0]);
        assert!(ranks(&[]).is_empty());
    }

    #[test]
    fn an_outlier_weighs_as_one_rank() {
        // One huge candidate round among otherwise equal-looking values is
        // not evidence of a shift.
        let base = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.00];
        let cand = [1.01, 0.99, 1.00, 0.98, 1.02, 0.97, 1.03, 9.0];
        let p = permutation_p_value(&base, &cand, 10_000, 1).unwrap();
        assert!(p > 0.1, "p = {p}");
    }

    #[test]
    fn empty_or_nan_inputs_give_none() {
        assert_eq!(permutation_p_value(&[], &[1.0], 10, 1), None);
        assert_eq!(permutation_p_value(&[1.0], &[f64::NAN], 10, 1), None);
    }
}
