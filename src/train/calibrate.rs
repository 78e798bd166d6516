//! Calibration: raw scores of held-out good images, through the exported graph itself (the same
//! engine the runtime uses), → the threshold that normalises to 0.5.

use std::path::Path;

use super::{ImageSet, TrainError};
use crate::bundle::Calibration;
use crate::engine::{Engine, EngineOptions};

/// Threshold = the highest held-out good score (DESIGN §5: thresholds come from good images only).
pub(super) fn from_holdout(
    model: &Path,
    images: &ImageSet,
    holdout: &[usize],
    size: usize,
) -> Result<(Calibration, Vec<f32>), TrainError> {
    let mut engine = Engine::open(model, [size, size], EngineOptions::default())?;
    let mut scores = Vec::with_capacity(holdout.len());
    for &index in holdout {
        scores.extend(engine.run(&images.pixels[index], 1)?.scores);
    }
    Ok((calibration_from_scores(&scores), scores))
}

/// The held-out rule of `stpm train`: the threshold is the highest score.
pub fn calibration_from_scores(scores: &[f32]) -> Calibration {
    calibration_at_quantile(scores, 1.0, "max of held-out good images".to_string())
}

/// Threshold = the `quantile` of the good images' finite scores (nearest rank; 1.0 is their
/// maximum), floor = their minimum; `method` says where they came from.
pub fn calibration_at_quantile(scores: &[f32], quantile: f64, method: String) -> Calibration {
    let mut sorted: Vec<f32> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let rank = (quantile.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    let threshold = sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or(0.0);
    let floor = sorted.first().copied().unwrap_or(0.0).min(threshold);
    let mut calibration = Calibration {
        threshold,
        floor,
        method,
        n_images: sorted.len(),
        good_median: 0.0,
    };
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    calibration.good_median = calibration.normalise(median);
    calibration
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_maps_to_half_and_good_scores_sit_below() {
        let calibration = calibration_from_scores(&[0.2, 0.25, 0.3, 0.4, 0.6]);
        assert_eq!(calibration.threshold, 0.6);
        assert!((calibration.normalise(0.6) - 0.5).abs() < 1e-6);
        assert_eq!(calibration.normalise(0.2), 0.0);
        assert_eq!(calibration.normalise(10.0), 1.0);
        assert!(calibration.good_median < 0.5, "{}", calibration.good_median);
        assert!(
            (calibration.normalise(1.0) - 1.0).abs() < 1e-6,
            "twice the span above floor is 1.0"
        );
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
