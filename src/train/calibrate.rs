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

pub fn calibration_from_scores(scores: &[f32]) -> Calibration {
    let mut sorted: Vec<f32> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let threshold = sorted.last().copied().unwrap_or(0.0);
    let floor = sorted.first().copied().unwrap_or(0.0).min(threshold);
    let mut calibration = Calibration {
        threshold,
        floor,
        method: "max of held-out good images".to_string(),
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
}
