//! `stpm calibrate`: sets a bundle's alert threshold from good images of the deployment (the line's
//! own camera, lighting and parts), replacing the one `stpm train` took from its held-out training
//! images. Owns the scoring of those images through each of the bundle's graphs and the manifest
//! update; the threshold rule itself is `threshold::calibration_from_scores`.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::bundle::{Bundle, BundleError, Calibration, Precision};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::preprocess::{self, PreprocessError, RgbFrame};
use crate::threshold::{calibration_at_quantile, calibration_from_scores};

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Image(#[from] PreprocessError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("no good images to calibrate on")]
    NoImages,
    #[error("--quantile must be in (0, 1], got {0}")]
    Quantile(f64),
}

/// What `calibrate` changed (or, dry, would change) for one graph of the bundle.
#[derive(Debug, Clone)]
pub struct GraphCalibration {
    pub precision: Precision,
    pub before: Calibration,
    pub after: Calibration,
    /// The given images at or above the old threshold (they alerted before).
    pub alerting_before: usize,
    /// The same at the new threshold.
    pub alerting_after: usize,
    /// Every image's raw score through this graph, in the order given.
    pub scores: Vec<f32>,
}

/// The outcome for the whole bundle.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub graphs: Vec<GraphCalibration>,
    /// Why the INT8 graph kept its threshold (it is missing, stale or damaged), if the bundle has
    /// one that was not calibrated.
    pub int8_skipped: Option<String>,
    /// Whether the manifest was written.
    pub written: bool,
}

/// Options of [`calibrate`].
#[derive(Debug, Clone, Default)]
pub struct CalibrateOptions {
    /// The threshold is this quantile of the good images' scores (1.0: their maximum); `None`
    /// fits their tail as `stpm train` does (`threshold::calibration_from_scores`).
    pub quantile: Option<f64>,
    /// Compute and report, but leave the manifest as it is.
    pub dry_run: bool,
    pub progress: bool,
}

/// Scores `images` (all good) through the bundle's fp32 graph, and through its INT8 graph when it
/// has a current one, and sets each graph's threshold from its scores (the tail fit, or `quantile`).
pub fn calibrate(
    model: &Path,
    images: &[PathBuf],
    options: &CalibrateOptions,
) -> Result<Outcome, CalibrateError> {
    if images.is_empty() {
        return Err(CalibrateError::NoImages);
    }
    if let Some(q) = options.quantile.filter(|q| !(*q > 0.0 && *q <= 1.0)) {
        return Err(CalibrateError::Quantile(q));
    }
    let bundle = Bundle::open_to_recalibrate(model)?;
    let mut graphs = vec![bundle.clone()];
    let mut int8_skipped = None;
    if bundle.manifest.int8.is_some() {
        match bundle.clone().int8_to_recalibrate() {
            Ok(int8) => graphs.push(int8),
            Err(e) => int8_skipped = Some(e.to_string()),
        }
    }
    let mut engines = graphs
        .iter()
        .map(|graph| Engine::for_bundle(graph, EngineOptions::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let bar = if options.progress {
        ProgressBar::new(images.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} calibrate [{bar:30}] {pos}/{len} images")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let size = bundle.manifest.model.input_size;
    // One pass over the images, each scored by every graph: one image in memory at a time.
    let mut scores = vec![Vec::with_capacity(images.len()); graphs.len()];
    for path in images {
        let frame = RgbFrame::open(path)?;
        let input = preprocess::to_chw(&frame, size, &bundle.manifest.normalisation);
        for (engine, graph_scores) in engines.iter_mut().zip(scores.iter_mut()) {
            graph_scores.extend(engine.run(&input, 1)?.scores);
        }
        bar.inc(1);
    }
    let folders: std::collections::BTreeSet<&Path> =
        images.iter().filter_map(|p| p.parent()).collect();
    let source = match folders.iter().next() {
        Some(folder) if folders.len() == 1 => folder.display().to_string(),
        _ => format!("{} folders", folders.len()),
    };
    let mut manifest = bundle.manifest.clone();
    let mut outcomes = Vec::new();
    for (graph, scores) in graphs.iter().zip(scores) {
        let precision = graph.precision;
        let before = graph.calibration().clone();
        let after = match options.quantile {
            None => {
                calibration_from_scores(&scores, &format!("good images (stpm calibrate, {source})"))
            }
            Some(q) if q >= 1.0 => calibration_at_quantile(
                &scores,
                1.0,
                format!("max of good images (stpm calibrate, {source})"),
            ),
            Some(q) => calibration_at_quantile(
                &scores,
                q,
                format!("{q} quantile of good images (stpm calibrate, {source})"),
            ),
        };
        let alerting = |threshold: f32| scores.iter().filter(|&&s| s >= threshold).count();
        match (precision, manifest.int8.as_mut()) {
            (Precision::Int8, Some(int8)) => int8.calibration = after.clone(),
            _ => manifest.calibration = after.clone(),
        }
        outcomes.push(GraphCalibration {
            precision,
            alerting_before: alerting(before.threshold),
            alerting_after: alerting(after.threshold),
            before,
            after,
            scores,
        });
    }
    bar.finish_and_clear();
    if !options.dry_run {
        Bundle::write_manifest(model, &manifest)?;
    }
    Ok(Outcome {
        graphs: outcomes,
        int8_skipped,
        written: !options.dry_run,
    })
}
