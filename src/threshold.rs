//! The alert threshold from good images' raw scores: the default tail fit (a Gumbel law at a
//! target false-alarm rate), a plain quantile, and the normalisation they imply. Pure functions;
//! `stpm train`, `stpm calibrate` and the INT8 export choose which images to score.

use crate::bundle::Calibration;

/// Fewest good images whose tail [`calibration_from_scores`] fits; with fewer it takes their maximum.
pub const MIN_TAIL_FIT_IMAGES: usize = 20;

/// The false-alarm rate of the fitted law that the default threshold sits at. Real score tails are
/// heavier than the law fitted to their median and 90th percentile, so it aims low: on four dev-set
/// categories and Magnetic Tile, 0.2 % let fewer good test images alert than the highest
/// held-out score did (33 of 120 against 38) and caught 26 of 392 tile defects against 6, where
/// 1 % let 55 of 120 alert (docs/results.md).
pub const TARGET_FALSE_ALARM_RATE: f64 = 0.002;

/// The default rule of `stpm train` and `stpm calibrate`: a Gumbel distribution (the law of a
/// maximum, which an image score is: the maximum of its anomaly map) fitted to the good images'
/// scores by their median and 90th percentile, and the threshold at its
/// [`TARGET_FALSE_ALARM_RATE`] upper quantile. Unlike the maximum, one unusual good image does not
/// lift it over every defect, and with a few dozen images it still sits above their typical
/// maximum. With fewer than [`MIN_TAIL_FIT_IMAGES`] scores it is their maximum.
pub fn calibration_from_scores(scores: &[f32], source: &str) -> Calibration {
    let sorted = sorted_finite(scores);
    match gumbel_fit(&sorted, TARGET_FALSE_ALARM_RATE) {
        Some(threshold) => calibration_at(
            &sorted,
            threshold,
            quantile(&sorted, 0.5).unwrap_or(threshold),
            format!(
                "Gumbel fit to {source}, at its {} % tail",
                TARGET_FALSE_ALARM_RATE * 100.0
            ),
        ),
        None => at_nearest_rank(&sorted, 1.0, format!("max of {source}")),
    }
}

fn sorted_finite(scores: &[f32]) -> Vec<f32> {
    let mut sorted: Vec<f32> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    sorted
}

/// The `q` quantile of sorted values, interpolated linearly between ranks.
fn quantile(sorted: &[f32], q: f64) -> Option<f32> {
    let last = sorted.len().checked_sub(1)?;
    let position = q.clamp(0.0, 1.0) * last as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(last);
    let weight = position - below as f64;
    Some((f64::from(sorted[below]) * (1.0 - weight) + f64::from(sorted[above]) * weight) as f32)
}

/// The upper `rate` quantile of a Gumbel law matched to the scores' median and 90th percentile,
/// or `None` with too few finite scores or no spread between those two.
pub fn gumbel_threshold(scores: &[f32], rate: f64) -> Option<f32> {
    gumbel_fit(&sorted_finite(scores), rate)
}

/// [`gumbel_threshold`] of finite scores already sorted.
fn gumbel_fit(sorted: &[f32], rate: f64) -> Option<f32> {
    if sorted.len() < MIN_TAIL_FIT_IMAGES || !(rate > 0.0 && rate < 1.0) {
        return None;
    }
    let median = f64::from(quantile(sorted, 0.5)?);
    let q90 = f64::from(quantile(sorted, 0.9)?);
    // Gumbel(μ, β): the quantile at p is μ − β ln(−ln p).
    let reduced = |p: f64| -(-p.ln()).ln();
    let beta = (q90 - median) / (reduced(0.9) - reduced(0.5));
    if !(beta.is_finite() && beta > 0.0) {
        return None;
    }
    let location = median - beta * reduced(0.5);
    let threshold = location + beta * reduced(1.0 - rate);
    threshold.is_finite().then_some(threshold as f32)
}

/// Threshold = the `quantile` of the good images' finite scores (nearest rank; 1.0 is their
/// maximum), floor = their minimum; `method` says where they came from.
pub fn calibration_at_quantile(scores: &[f32], quantile: f64, method: String) -> Calibration {
    at_nearest_rank(&sorted_finite(scores), quantile, method)
}

/// [`calibration_at_quantile`] of finite scores already sorted.
fn at_nearest_rank(sorted: &[f32], quantile: f64, method: String) -> Calibration {
    let rank = (quantile.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    let threshold = sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or(0.0);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    calibration_at(sorted, threshold, median, method)
}

/// The calibration of `threshold` over sorted good scores: floor = their minimum (at most the
/// threshold), `good_median` = `median` normalised.
fn calibration_at(sorted: &[f32], threshold: f32, median: f32, method: String) -> Calibration {
    let mut calibration = Calibration {
        threshold,
        floor: sorted.first().copied().unwrap_or(0.0).min(threshold),
        method,
        n_images: sorted.len(),
        good_median: 0.0,
    };
    calibration.good_median = calibration.normalise(median);
    calibration
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_maps_to_half_and_good_scores_sit_below() {
        // Five scores are too few for a tail fit: the maximum.
        let calibration = calibration_from_scores(&[0.2, 0.25, 0.3, 0.4, 0.6], "five");
        assert_eq!(calibration.threshold, 0.6);
        assert_eq!(calibration.method, "max of five");
        assert!((calibration.normalise(0.6) - 0.5).abs() < 1e-6);
        assert_eq!(calibration.normalise(0.2), 0.0);
        assert_eq!(calibration.normalise(10.0), 1.0);
        assert!(calibration.good_median < 0.5, "{}", calibration.good_median);
        assert!(
            (calibration.normalise(1.0) - 1.0).abs() < 1e-6,
            "twice the span above floor is 1.0"
        );
    }

    /// Gumbel(μ = 10, β = 2) quantiles at evenly spaced probabilities: an ideal sample.
    fn gumbel_sample(n: usize) -> Vec<f32> {
        (1..=n)
            .map(|i| {
                let p = i as f64 / (n + 1) as f64;
                (10.0 - 2.0 * (-p.ln()).ln()) as f32
            })
            .collect()
    }

    #[test]
    fn the_tail_fit_recovers_a_gumbel_law_and_ignores_one_outlier() {
        let sample = gumbel_sample(199);
        // The 1 % upper quantile of Gumbel(10, 2): 10 − 2 ln(−ln 0.99) = 19.2.
        let expected = 10.0 - 2.0 * (-(0.99f64).ln()).ln();
        let threshold = f64::from(gumbel_threshold(&sample, 0.01).expect("fit"));
        // (The sample's interpolated 90th percentile sits a little low: 19.0, not 19.2. Its
        // maximum, 20.6, is far off.)
        assert!(
            (threshold - expected).abs() < 0.3,
            "{threshold} vs {expected}"
        );
        // One good image far out moves the maximum, not the fit (at the default rate).
        let mut with_outlier = sample.clone();
        with_outlier[0] = 1000.0;
        let calibration = calibration_from_scores(&with_outlier, "held-out good images");
        let at_default = 10.0 - 2.0 * (-(1.0 - TARGET_FALSE_ALARM_RATE).ln()).ln();
        assert!(
            (f64::from(calibration.threshold) - at_default).abs() < 0.5,
            "{} vs {at_default}",
            calibration.threshold
        );
        assert!(
            calibration
                .method
                .starts_with("Gumbel fit to held-out good images")
        );
        assert!((calibration.normalise(calibration.threshold) - 0.5).abs() < 1e-6);
        assert!(calibration.good_median < 0.5);
        // Thirty scores: above their own maximum (the rate is below 1/30).
        let thirty = gumbel_sample(30);
        let top = thirty.iter().copied().fold(f32::MIN, f32::max);
        assert!(gumbel_threshold(&thirty, 0.01).expect("fit") > top);
    }

    #[test]
    fn the_tail_fit_falls_back_to_the_maximum() {
        let constant = vec![3.0; 40];
        assert_eq!(gumbel_threshold(&constant, 0.01), None);
        assert_eq!(calibration_from_scores(&constant, "x").threshold, 3.0);
        assert_eq!(gumbel_threshold(&gumbel_sample(19), 0.01), None);
        assert_eq!(gumbel_threshold(&gumbel_sample(40), 0.0), None);
        let mut with_nan = gumbel_sample(19);
        with_nan.push(f32::NAN);
        assert_eq!(gumbel_threshold(&with_nan, 0.01), None);
    }

    #[test]
    fn quantile_threshold_is_the_nearest_rank() {
        let scores: Vec<f32> = (1..=20).rev().map(|i| i as f32).collect();
        let at = |q: f64| calibration_at_quantile(&scores, q, String::new());
        assert_eq!(at(1.0).threshold, 20.0);
        assert_eq!(at(0.95).threshold, 19.0);
        assert_eq!(at(0.5).threshold, 10.0);
        assert_eq!(at(0.01).threshold, 1.0);
        assert_eq!(at(0.5).floor, 1.0);
        assert_eq!(at(0.5).n_images, 20);
        let with_nan = calibration_at_quantile(&[f32::NAN, 2.0, 1.0], 1.0, String::new());
        assert_eq!((with_nan.threshold, with_nan.n_images), (2.0, 2));
    }
}
