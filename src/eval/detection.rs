//! Detection metrics computed in O(n log n) time and O(n) memory: ROC AUC by ranks (ties count ½),
//! the best F1 over thresholds, ROC and PRO curves from one sorted sweep, 8-connected region
//! labelling and AUPRO (MVTec protocol). Pure functions on scores and labels.

/// Area under the ROC curve of `scores` for `labels` (true = anomalous). `None` when one class is
/// absent. Equals P(score_pos > score_neg) + ½ P(equal), from average ranks (Mann–Whitney U).
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| scores[a as usize].total_cmp(&scores[b as usize]));
    let mut rank_sum_pos = 0.0f64;
    let mut start = 0;
    while start < order.len() {
        let value = scores[order[start] as usize];
        let mut end = start + 1;
        while end < order.len() && scores[order[end] as usize] == value {
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
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut true_pos, mut predicted) = (0usize, 0usize);
    let mut best = (0.0f64, f32::INFINITY);
    let mut i = 0;
    while i < order.len() {
        let value = scores[order[i]];
        while i < order.len() && scores[order[i]] == value {
            predicted += 1;
            true_pos += labels[order[i]] as usize;
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

impl Curve {
    /// Area under the curve for x in [0, `x_max`], interpolating linearly at `x_max`.
    pub fn area_to(&self, x_max: f64) -> f64 {
        let mut area = 0.0;
        for i in 1..self.fpr.len() {
            let (x0, x1) = (self.fpr[i - 1], self.fpr[i]);
            let (y0, y1) = (self.y[i - 1], self.y[i]);
            if x0 >= x_max {
                break;
            }
            if x1 <= x_max {
                area += 0.5 * (y0 + y1) * (x1 - x0);
            } else {
                let y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0);
                area += 0.5 * (y0 + y_at) * (x_max - x0);
            }
        }
        area
    }

    /// At most about `points` points of the curve, for drawing (always keeps the end points).
    pub fn thinned(&self, points: usize) -> Curve {
        let step = (self.fpr.len() / points.max(2)).max(1);
        let mut fpr = Vec::new();
        let mut y = Vec::new();
        for i in (0..self.fpr.len()).step_by(step) {
            fpr.push(self.fpr[i]);
            y.push(self.y[i]);
        }
        if let (Some(&last_x), Some(&last_y)) = (self.fpr.last(), self.y.last())
            && fpr.last() != Some(&last_x)
        {
            fpr.push(last_x);
            y.push(last_y);
        }
        Curve { fpr, y }
    }
}

/// Indices of `scores` from the highest score to the lowest. Sorts packed (score bits, index)
/// integers rather than comparing through the index, which is several times faster on millions
/// of pixels.
pub fn descending_order(scores: &[f32]) -> Vec<u32> {
    // IEEE-754 bits made monotonic: flip all bits of negatives, only the sign bit of positives.
    let key = |v: f32| {
        let bits = v.to_bits();
        if bits >> 31 == 1 {
            !bits
        } else {
            bits | 1 << 31
        }
    };
    let mut packed: Vec<u64> = scores
        .iter()
        .enumerate()
        .map(|(i, &v)| (u64::from(key(v)) << 32) | i as u64)
        .collect();
    packed.sort_unstable_by(|a, b| b.cmp(a));
    packed.into_iter().map(|p| p as u32).collect()
}

/// Sweeps the threshold down through `scores` (visiting them in `order`, from
/// [`descending_order`]), skipping indices with zero weights on both sides. Each index adds its
/// `weights` (negative, positive) to the running sums; one point per distinct score, normalised by
/// the totals. `None` when either total is zero. ROC: weight 1 per negative / positive sample;
/// PRO: positive weight 1 / (region size × number of regions).
pub fn sweep(
    scores: &[f32],
    order: &[u32],
    mut weights: impl FnMut(usize) -> (f64, f64),
) -> Option<Curve> {
    let mut fp = vec![0.0];
    let mut tp = vec![0.0];
    let (mut sum_neg, mut sum_pos) = (0.0f64, 0.0f64);
    let mut i = 0;
    while i < order.len() {
        let value = scores[order[i] as usize];
        let mut moved = false;
        while i < order.len() && scores[order[i] as usize] == value {
            let (neg, pos) = weights(order[i] as usize);
            sum_neg += neg;
            sum_pos += pos;
            moved |= neg != 0.0 || pos != 0.0;
            i += 1;
        }
        if moved {
            fp.push(sum_neg);
            tp.push(sum_pos);
        }
    }
    if sum_neg <= 0.0 || sum_pos <= 0.0 {
        return None;
    }
    // Normalise in place (these hold a point per distinct score: millions for pixel curves);
    // clamp the rounding of long sums so the curve ends exactly at (1, 1).
    fp.iter_mut().for_each(|v| *v = (*v / sum_neg).min(1.0));
    tp.iter_mut().for_each(|v| *v = (*v / sum_pos).min(1.0));
    Some(Curve { fpr: fp, y: tp })
}

/// ROC curve of `scores` for `labels` (true = anomalous), restricted to `include`d indices.
pub fn roc_curve(
    scores: &[f32],
    order: &[u32],
    labels: &[bool],
    include: impl Fn(usize) -> bool,
) -> Option<Curve> {
    sweep(scores, order, |i| match (include(i), labels[i]) {
        (false, _) => (0.0, 0.0),
        (true, true) => (0.0, 1.0),
        (true, false) => (1.0, 0.0),
    })
}

/// Labels the 8-connected regions of `mask` (row-major, `width` wide): 0 for background, regions
/// 1..=n in raster order of their first pixel. Returns the labels and n.
pub fn label_regions(mask: &[bool], width: usize) -> (Vec<u32>, u32) {
    let height = mask.len().checked_div(width).unwrap_or(0);
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(index) = stack.pop() {
            let (y, x) = (index / width, index % width);
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let next = ny * width + nx;
                    if mask[next] && labels[next] == 0 {
                        labels[next] = count;
                        stack.push(next);
                    }
                }
            }
        }
    }
    (labels, count)
}

/// The per-region overlap (PRO) curve of the MVTec protocol: `regions[i]` is 0 for a normal pixel
/// and the global id (1-based) of its ground-truth region otherwise; `region_sizes[id - 1]` its
/// pixel count. y = mean over regions of the covered fraction, x = false positive rate over all
/// normal pixels. Pixels with `include(i) == false` are left out.
pub fn pro_curve(
    scores: &[f32],
    order: &[u32],
    regions: &[u32],
    region_sizes: &[u32],
    include: impl Fn(usize) -> bool,
) -> Option<Curve> {
    let n_regions = region_sizes.iter().filter(|&&s| s > 0).count() as f64;
    sweep(scores, order, |i| {
        if !include(i) {
            (0.0, 0.0)
        } else if regions[i] == 0 {
            (1.0, 0.0)
        } else {
            (
                0.0,
                1.0 / (region_sizes[regions[i] as usize - 1] as f64 * n_regions),
            )
        }
    })
}

/// The MVTec false-positive-rate limit for AUPRO.
pub const AUPRO_FPR_LIMIT: f64 = 0.3;

/// Normalised area under the PRO curve up to `fpr_limit` (1.0 = perfect, 0 = every normal pixel
/// ranks above every defect pixel). A constant map gives the diagonal: `fpr_limit / 2`.
pub fn aupro(curve: &Curve, fpr_limit: f64) -> f64 {
    curve.area_to(fpr_limit) / fpr_limit
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
            let included: Vec<bool> = (0..n).map(|_| rng.unit() < 0.8).collect();
            let order = descending_order(&scores);
            let Some(curve) = roc_curve(&scores, &order, &labels, |i| included[i]) else {
                continue;
            };
            let (s, l): (Vec<f32>, Vec<bool>) = (0..n)
                .filter(|&i| included[i])
                .map(|i| (scores[i], labels[i]))
                .unzip();
            let slow = brute_force_auroc(&s, &l);
            assert!((curve.area_to(1.0) - slow).abs() < 1e-12, "trial {trial}");
        }
    }

    /// Regions by repeated min-propagation over the 8 neighbours (slow, obviously right).
    fn slow_regions(mask: &[bool], width: usize) -> Vec<Vec<usize>> {
        let height = mask.len() / width;
        let mut id: Vec<usize> = (0..mask.len()).collect();
        loop {
            let mut changed = false;
            for y in 0..height {
                for x in 0..width {
                    let i = y * width + x;
                    if !mask[i] {
                        continue;
                    }
                    for dy in -1i64..=1 {
                        for dx in -1i64..=1 {
                            let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                            if ny < 0 || nx < 0 || ny >= height as i64 || nx >= width as i64 {
                                continue;
                            }
                            let j = ny as usize * width + nx as usize;
                            if mask[j] && id[j] < id[i] {
                                id[i] = id[j];
                                changed = true;
                            }
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for i in (0..mask.len()).filter(|&i| mask[i]) {
            groups.entry(id[i]).or_default().push(i);
        }
        groups.into_values().collect()
    }

    /// The MVTec procedure written out: every distinct threshold, FPR over all normal pixels, PRO
    /// averaged over regions, trapezoid up to the limit with interpolation, divided by the limit.
    fn slow_aupro(maps: &[Vec<f32>], masks: &[Vec<bool>], width: usize, limit: f64) -> f64 {
        let mut regions = Vec::new();
        for (image, mask) in masks.iter().enumerate() {
            for region in slow_regions(mask, width) {
                regions.push((image, region));
            }
        }
        let negatives: usize = masks.iter().flatten().filter(|&&m| !m).count();
        let mut thresholds: Vec<f32> = maps.iter().flatten().copied().collect();
        thresholds.sort_by(|a, b| b.total_cmp(a));
        thresholds.dedup();
        let mut points = vec![(0.0f64, 0.0f64)];
        for t in thresholds {
            let fp = maps
                .iter()
                .zip(masks)
                .flat_map(|(m, g)| m.iter().zip(g))
                .filter(|(v, g)| **v >= t && !**g)
                .count();
            let pro: f64 = regions
                .iter()
                .map(|(image, r)| {
                    r.iter().filter(|&&i| maps[*image][i] >= t).count() as f64 / r.len() as f64
                })
                .sum::<f64>()
                / regions.len() as f64;
            points.push((fp as f64 / negatives as f64, pro));
        }
        let mut area = 0.0;
        for w in points.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if x1 <= limit {
                area += (x1 - x0) * (y0 + y1) / 2.0;
            } else if x0 < limit {
                let y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0);
                area += (limit - x0) * (y0 + y_at) / 2.0;
            }
        }
        area / limit
    }

    /// Flattens per-image maps and masks the way `eval` does and computes AUPRO.
    fn fast_aupro(maps: &[Vec<f32>], masks: &[Vec<bool>], width: usize) -> f64 {
        let scores: Vec<f32> = maps.iter().flatten().copied().collect();
        let mut regions = Vec::new();
        let mut sizes = Vec::new();
        for mask in masks {
            let (labels, n) = label_regions(mask, width);
            let base = sizes.len() as u32;
            sizes.extend(vec![0u32; n as usize]);
            for &l in &labels {
                if l > 0 {
                    sizes[(base + l - 1) as usize] += 1;
                }
            }
            regions.extend(labels.iter().map(|&l| if l == 0 { 0 } else { base + l }));
        }
        let order = descending_order(&scores);
        let curve = pro_curve(&scores, &order, &regions, &sizes, |_| true).expect("regions");
        aupro(&curve, AUPRO_FPR_LIMIT)
    }

    /// Random blobs: a few filled rectangles and single pixels per image, some touching diagonally.
    fn random_mask(rng: &mut SplitMix, width: usize, height: usize) -> Vec<bool> {
        let mut mask = vec![false; width * height];
        for _ in 0..1 + (rng.unit() * 4.0) as usize {
            let (x0, y0) = (
                (rng.unit() * width as f32) as usize,
                (rng.unit() * height as f32) as usize,
            );
            let (w, h) = (
                1 + (rng.unit() * 5.0) as usize,
                1 + (rng.unit() * 4.0) as usize,
            );
            for y in y0..(y0 + h).min(height) {
                for x in x0..(x0 + w).min(width) {
                    mask[y * width + x] = true;
                }
            }
        }
        mask
    }

    #[test]
    fn label_regions_joins_diagonal_neighbours_only() {
        #[rustfmt::skip]
        let mask = [
            true,  false, false, true,
            false, true,  false, false,
            false, false, false, true,
        ];
        let (labels, n) = label_regions(&mask, 4);
        assert_eq!(n, 3);
        assert_eq!(labels, vec![1, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3]);
        let mut rng = SplitMix::new(3);
        for _ in 0..20 {
            let mask = random_mask(&mut rng, 13, 9);
            let (_, n) = label_regions(&mask, 13);
            assert_eq!(n as usize, slow_regions(&mask, 13).len());
        }
    }

    #[test]
    fn aupro_matches_the_slow_mvtec_procedure() {
        let mut rng = SplitMix::new(11);
        let (width, height) = (16, 12);
        for trial in 0..8 {
            let n_images = 2 + trial % 3;
            let mut masks: Vec<Vec<bool>> = (0..n_images)
                .map(|_| random_mask(&mut rng, width, height))
                .collect();
            // One good image (no region) in every set.
            masks.push(vec![false; width * height]);
            let maps: Vec<Vec<f32>> = masks
                .iter()
                .map(|mask| {
                    mask.iter()
                        .map(|&m| {
                            // Quantised, so ties between normal and defect pixels are common.
                            let noise = (rng.unit() * 10.0).floor() / 10.0;
                            noise + if m { 0.3 } else { 0.0 }
                        })
                        .collect()
                })
                .collect();
            let fast = fast_aupro(&maps, &masks, width);
            let slow = slow_aupro(&maps, &masks, width, AUPRO_FPR_LIMIT);
            assert!(
                (fast - slow).abs() < 1e-4,
                "trial {trial}: {fast} vs {slow}"
            );
            assert!(fast > 0.0 && fast < 1.0, "trial {trial}: {fast}");
        }
    }

    #[test]
    fn aupro_known_answers() {
        let width = 8;
        let mut mask = vec![false; 64];
        for i in [9, 10, 17, 18, 45, 46, 47] {
            mask[i] = true;
        }
        let masks = vec![mask.clone(), vec![false; 64]];
        let perfect: Vec<Vec<f32>> = masks
            .iter()
            .map(|m| m.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect())
            .collect();
        assert!((fast_aupro(&perfect, &masks, width) - 1.0).abs() < 1e-12);
        let inverted: Vec<Vec<f32>> = perfect
            .iter()
            .map(|m| m.iter().map(|v| 1.0 - v).collect())
            .collect();
        assert!(fast_aupro(&inverted, &masks, width).abs() < 1e-12);
        let constant = vec![vec![0.5f32; 64]; 2];
        assert!((fast_aupro(&constant, &masks, width) - AUPRO_FPR_LIMIT / 2.0).abs() < 1e-12);
        // Finds one region of two fully at FPR 0 and the other never: PRO 0.5 until FPR 1.
        let half: Vec<Vec<f32>> = masks
            .iter()
            .map(|m| {
                m.iter()
                    .enumerate()
                    .map(|(i, &v)| if v && i < 20 { 1.0 } else { 0.0 })
                    .collect()
            })
            .collect();
        let half_score = fast_aupro(&half, &masks, width);
        assert!(half_score > 0.5 && half_score < 0.6, "{half_score}");
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
