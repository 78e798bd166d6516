//! Detection metrics computed in O(n log n) time and O(n) memory: ROC AUC by ranks (ties count ½),
//! the best F1 over thresholds, the operating point at a false alarm rate, and curves (ROC, PRO)
//! built during one sweep of the threshold. Pure functions on scores and labels; the pixel
//! curves' data is in `pixels`.

/// Area under the ROC curve of `scores` for `labels` (true = anomalous). `None` when one class is
/// absent. Equals P(score_pos > score_neg) + ½ P(equal), from average ranks (Mann–Whitney U).
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Lowest score first; ties are grouped by `score_key`, as the curves group them.
    let mut order = descending_order(scores);
    order.reverse();
    let mut rank_sum_pos = 0.0f64;
    let mut start = 0;
    while start < order.len() {
        let key = score_key(scores[order[start] as usize]);
        let mut end = start + 1;
        while end < order.len() && score_key(scores[order[end] as usize]) == key {
            end += 1;
        }
        // Ranks start..end (1-based: start+1..=end) share their mean.
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        let tied_pos = order[start..end]
            .iter()
            .filter(|&&i| labels[i as usize])
            .count();
        rank_sum_pos += mean_rank * tied_pos as f64;
        start = end;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * n))
}

/// The operating point that lets at most `fpr` of the good images alert: the threshold is the
/// good score that ⌊fpr · n_good⌋ good scores lie above, and an image alerts when its score is
/// above it (so ties with that good image do not). Returns (threshold, good images above it,
/// defective images above it); `None` without good images or for a non-finite `fpr`.
pub fn at_false_alarm_rate(good: &[f32], defects: &[f32], fpr: f64) -> Option<(f32, usize, usize)> {
    if good.is_empty() || !fpr.is_finite() {
        return None;
    }
    let mut sorted = good.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let allowed =
        ((fpr.clamp(0.0, 1.0) * sorted.len() as f64 + 1e-9).floor() as usize).min(sorted.len() - 1);
    let threshold = sorted[allowed];
    let above = |scores: &[f32]| scores.iter().filter(|&&s| s > threshold).count();
    Some((threshold, above(good), above(defects)))
}

/// The highest F1 over all thresholds "anomalous if score ≥ t", and the threshold reaching it.
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Option<(f64, f32)> {
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return None;
    }
    let order = descending_order(scores);
    let (mut true_pos, mut predicted) = (0usize, 0usize);
    let mut best = (0.0f64, f32::INFINITY);
    let mut i = 0;
    while i < order.len() {
        let value = scores[order[i] as usize];
        while i < order.len() && score_key(scores[order[i] as usize]) == score_key(value) {
            predicted += 1;
            true_pos += labels[order[i] as usize] as usize;
            i += 1;
        }
        let f1 = 2.0 * true_pos as f64 / (predicted + positives) as f64;
        if f1 > best.0 {
            best = (f1, value);
        }
    }
    Some(best)
}

/// A curve through (false positive rate, y) points, x non-decreasing, from (0, 0) to (1, 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub fpr: Vec<f64>,
    pub y: Vec<f64>,
}

/// An order-preserving integer key of a score: a higher score has a higher key; −0.0 and 0.0
/// share one (they are equal scores), and a NaN gets a key of its own above +∞ (below −∞ when its
/// sign bit is set), so sorting and grouping by key always end.
pub fn score_key(value: f32) -> u32 {
    let bits = if value == 0.0 { 0 } else { value.to_bits() };
    // IEEE-754 bits made monotonic: flip all bits of negatives, only the sign bit of positives.
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

/// Indices of `scores` from the highest score to the lowest (by [`score_key`]).
pub fn descending_order(scores: &[f32]) -> Vec<u32> {
    let mut packed: Vec<u64> = scores
        .iter()
        .enumerate()
        .map(|(i, &v)| (u64::from(score_key(v)) << 32) | i as u64)
        .collect();
    packed.sort_unstable_by(|a, b| b.cmp(a));
    packed.into_iter().map(|p| p as u32).collect()
}

/// A curve built during one sweep of the threshold from the highest score down, without keeping
/// a point per distinct score (pixel curves have millions): the area under it up to `x_max` is
/// summed as the points come, and only points at least `spacing` apart (in x or y) are kept, for
/// drawing. Both totals are known beforehand, so each point is normalised as it comes.
pub struct CurveSweep {
    totals: (f64, f64),
    sums: (f64, f64),
    moved: bool,
    last: (f64, f64),
    x_max: f64,
    area: f64,
    spacing: f64,
    kept: Curve,
}

impl CurveSweep {
    /// A sweep whose negative and positive weights add up to `total_neg` and `total_pos`.
    /// `spacing` 0 keeps every point.
    pub fn new(total_neg: f64, total_pos: f64, x_max: f64, spacing: f64) -> Self {
        CurveSweep {
            totals: (total_neg, total_pos),
            sums: (0.0, 0.0),
            moved: false,
            last: (0.0, 0.0),
            x_max,
            area: 0.0,
            spacing,
            kept: Curve {
                fpr: vec![0.0],
                y: vec![0.0],
            },
        }
    }

    /// Adds a sample's (negative, positive) weights at the current threshold. Returns true when
    /// it is the first sample with a weight since the last [`close`](Self::close).
    pub fn add(&mut self, neg: f64, pos: f64) -> bool {
        self.sums.0 += neg;
        self.sums.1 += pos;
        let first = !self.moved && (neg != 0.0 || pos != 0.0);
        self.moved |= first;
        first
    }

    /// Ends the current threshold: one point, if anything was added since the last.
    pub fn close(&mut self) {
        if !self.moved {
            return;
        }
        self.moved = false;
        // The rounding of long sums (a total known beforehand, summed again here weight by weight)
        // must not leave the curve's end off (1, 1): a share within 1e-12 of 1 is 1.
        let share = |sum: f64, total: f64| {
            let share = sum / total;
            if share > 1.0 - 1e-12 { 1.0 } else { share }
        };
        let x1 = share(self.sums.0, self.totals.0);
        let y1 = share(self.sums.1, self.totals.1);
        let (x0, y0) = self.last;
        if x0 < self.x_max {
            if x1 <= self.x_max {
                self.area += 0.5 * (y0 + y1) * (x1 - x0);
            } else {
                let y_at = y0 + (y1 - y0) * (self.x_max - x0) / (x1 - x0);
                self.area += 0.5 * (y0 + y_at) * (self.x_max - x0);
            }
        }
        self.last = (x1, y1);
        let (kept_x, kept_y) = (
            self.kept.fpr.last().copied().unwrap_or(0.0),
            self.kept.y.last().copied().unwrap_or(0.0),
        );
        if x1 - kept_x >= self.spacing || y1 - kept_y >= self.spacing {
            self.kept.fpr.push(x1);
            self.kept.y.push(y1);
        }
    }

    /// The area under the curve up to `x_max`, and the points kept (always the last). `None` when
    /// no negative or no positive weight was added.
    pub fn finish(mut self) -> Option<(f64, Curve)> {
        self.close();
        if self.sums.0 <= 0.0 || self.sums.1 <= 0.0 {
            return None;
        }
        if self.kept.fpr.last() != Some(&self.last.0) || self.kept.y.last() != Some(&self.last.1) {
            self.kept.fpr.push(self.last.0);
            self.kept.y.push(self.last.1);
        }
        Some((self.area, self.kept))
    }
}

/// The ROC curve of `scores` for `labels` (true = anomalous), a point per distinct score, and the
/// area under it. `None` without both classes.
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Option<(f64, Curve)> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    let mut sweep = CurveSweep::new(negatives as f64, positives as f64, 1.0, 0.0);
    let order = descending_order(scores);
    let mut i = 0;
    while i < order.len() {
        let key = score_key(scores[order[i] as usize]);
        while i < order.len() && score_key(scores[order[i] as usize]) == key {
            if labels[order[i] as usize] {
                sweep.add(0.0, 1.0);
            } else {
                sweep.add(1.0, 0.0);
            }
            i += 1;
        }
        sweep.close();
    }
    sweep.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_false_alarm_operating_point_allows_that_share_of_good_images() {
        let good: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let defects = [99.5, 98.5, 95.5, 50.0, 101.0];
        // 1 %: one good image (100) may alert; the threshold is 99, and 101, 99.5 pass it.
        assert_eq!(
            at_false_alarm_rate(&good, &defects, 0.01),
            Some((99.0, 1, 2))
        );
        // 5 %: 96..=100 may alert; threshold 95.
        assert_eq!(
            at_false_alarm_rate(&good, &defects, 0.05),
            Some((95.0, 5, 4))
        );
        // 0 %: above every good image.
        assert_eq!(
            at_false_alarm_rate(&good, &defects, 0.0),
            Some((100.0, 0, 1))
        );
        // Ties with the threshold's good image do not alert, so fewer may be flagged than allowed.
        assert_eq!(
            at_false_alarm_rate(&[1.0, 1.0, 1.0], &[1.0, 2.0], 0.5),
            Some((1.0, 0, 1))
        );
        // 30 good images at 1 %: none may alert.
        let thirty: Vec<f32> = (0..30).map(|i| i as f32).collect();
        assert_eq!(
            at_false_alarm_rate(&thirty, &[29.5], 0.01),
            Some((29.0, 0, 1))
        );
        assert_eq!(at_false_alarm_rate(&[], &[1.0], 0.01), None);
    }
    use crate::rng::SplitMix;

    fn brute_force_auroc(scores: &[f32], labels: &[bool]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, &si) in scores.iter().enumerate() {
            for (j, &sj) in scores.iter().enumerate() {
                if labels[i] && !labels[j] {
                    pairs += 1.0;
                    wins += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        wins / pairs
    }

    #[test]
    fn auroc_equals_pairwise_count_with_ties() {
        let mut rng = SplitMix::new(42);
        for trial in 0..20 {
            let n = 5 + trial * 7;
            // Few distinct values, so ties are frequent.
            let scores: Vec<f32> = (0..n).map(|_| (rng.unit() * 6.0).floor()).collect();
            let labels: Vec<bool> = (0..n).map(|i| i % 3 == 0 || rng.unit() < 0.2).collect();
            let fast = auroc(&scores, &labels).expect("both classes");
            let slow = brute_force_auroc(&scores, &labels);
            assert!(
                (fast - slow).abs() < 1e-12,
                "trial {trial}: {fast} vs {slow}"
            );
        }
    }

    #[test]
    fn auroc_extremes_and_missing_class() {
        let labels = [false, false, true, true];
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &labels), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &labels), Some(0.0));
        assert_eq!(auroc(&[0.5; 4], &labels), Some(0.5));
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]), None);
    }

    #[test]
    fn f1_max_finds_the_separating_threshold() {
        let (f1, threshold) = f1_max(
            &[0.1, 0.2, 0.3, 0.7, 0.8],
            &[false, false, false, true, true],
        )
        .expect("f1");
        assert!((f1 - 1.0).abs() < 1e-12);
        assert_eq!(threshold, 0.7);
        let (f1, _) = f1_max(&[0.5, 0.5, 0.5, 0.5], &[true, false, false, false]).expect("f1");
        assert!(
            (f1 - 0.4).abs() < 1e-12,
            "all flagged: precision 1/4, recall 1 → {f1}"
        );
    }

    #[test]
    fn roc_curve_area_equals_pairwise_count() {
        let mut rng = SplitMix::new(7);
        for trial in 0..10 {
            let n = 20 + trial * 13;
            let scores: Vec<f32> = (0..n).map(|_| (rng.unit() * 8.0).floor()).collect();
            let labels: Vec<bool> = (0..n).map(|_| rng.unit() < 0.3).collect();
            let Some((area, curve)) = roc_curve(&scores, &labels) else {
                continue;
            };
            let slow = brute_force_auroc(&scores, &labels);
            assert!((area - slow).abs() < 1e-12, "trial {trial}");
            assert_eq!((curve.fpr[0], curve.y[0]), (0.0, 0.0));
            assert_eq!(curve.fpr.last().zip(curve.y.last()), Some((&1.0, &1.0)));
        }
    }

    #[test]
    fn nan_scores_end_the_sweeps_and_zeros_tie() {
        let scores = [0.5, f32::NAN, 0.1, -0.0, 0.0, f32::NAN];
        let labels = [true, true, false, false, true, false];
        let (area, _) = roc_curve(&scores, &labels).expect("both classes");
        assert!(area.is_finite(), "{area}");
        // The rank AUROC groups ties (NaNs, ±0) as the curve does, so both give one number.
        let ranked = auroc(&scores, &labels).expect("both classes");
        assert!((ranked - area).abs() < 1e-12, "{ranked} vs {area}");
        assert!(f1_max(&scores, &labels).is_some());
        assert_eq!(score_key(-0.0), score_key(0.0));
        let keys: Vec<u32> = [-3.0f32, -1e-9, 0.0, 1e-9, 3.0, f32::INFINITY]
            .iter()
            .map(|&v| score_key(v))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    }

    #[test]
    fn descending_order_sorts_negatives_zeros_and_positives() {
        let scores = [0.5f32, -2.0, 0.0, 3.0, -0.5, 1e-9, -0.0];
        let order = descending_order(&scores);
        let sorted: Vec<f32> = order.iter().map(|&i| scores[i as usize]).collect();
        assert!(sorted.windows(2).all(|w| w[0] >= w[1]), "{sorted:?}");
        assert_eq!(sorted[0], 3.0);
        assert_eq!(sorted[6], -2.0);
    }
}
