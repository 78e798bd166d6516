//! Detection metrics computed in O(n log n) time and O(n) memory: ROC AUC by ranks (ties count ½)
//! and the best F1 over thresholds. Pure functions on scores and labels.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devset::SplitMix;

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
}
