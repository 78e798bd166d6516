//! The held-out images' raw scores through the exported graph itself (the same engine the runtime
//! uses), and the threshold `crate::threshold` fits to them.

use std::path::Path;

use super::TrainError;
use super::prepare::ImageSet;
use crate::bundle::Calibration;
use crate::engine::{Engine, EngineOptions};
use crate::threshold::calibration_from_scores;

/// Threshold from the held-out good images' scores ([`calibration_from_scores`]; thresholds come
/// from good images only).
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
    Ok((
        calibration_from_scores(&scores, "held-out good images"),
        scores,
    ))
}
