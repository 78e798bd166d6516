//! `stpm infer`: scores individual images (files or folders) with a bundle and writes heatmap
//! overlays. Uses the same engine and preprocessing as evaluation and the live pipeline.

use std::path::{Path, PathBuf};

use crate::bundle::{Bundle, BundleError, Precision};
use crate::dataset::{self, DatasetError};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::overlay;
use crate::preprocess::{self, PreprocessError, RgbFrame};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{path} is neither an image file nor a folder")]
    NotAnImage { path: PathBuf },
    #[error(transparent)]
    Image(#[from] PreprocessError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// The result for one image.
#[derive(Debug, Clone)]
pub struct ImageResult {
    pub path: PathBuf,
    pub raw_score: f32,
    /// Calibrated: 0.5 is the alert threshold.
    pub score: f32,
    pub overlay: PathBuf,
}

/// Expands folders into their images (sorted, hidden files left out); files are kept as given.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, InferError> {
    let mut images = Vec::new();
    for input in inputs {
        if input.is_dir() {
            images.extend(dataset::images_in(input)?);
        } else if input.is_file() && dataset::has_image_extension(input) {
            images.push(input.clone());
        } else if !input.exists() {
            return Err(InferError::Dataset(dataset::DatasetError::Missing {
                path: input.clone(),
            }));
        } else {
            return Err(InferError::NotAnImage {
                path: input.clone(),
            });
        }
    }
    Ok(images)
}

/// Scores `images` with the bundle's `precision` graph and writes `<out>/<stem>_overlay.png` for each.
pub fn infer(
    model: &Path,
    precision: Precision,
    images: &[PathBuf],
    out: &Path,
) -> Result<Vec<ImageResult>, InferError> {
    let bundle = Bundle::open_as(model, precision)?;
    let calibration = bundle.calibration();
    let manifest = &bundle.manifest;
    let size = manifest.model.input_size;
    let mut engine = Engine::for_bundle(&bundle, EngineOptions::default())?;
    std::fs::create_dir_all(out).map_err(|e| InferError::Write {
        path: out.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut results = Vec::with_capacity(images.len());
    for (index, path) in images.iter().enumerate() {
        let frame = RgbFrame::open(path)?;
        let input = preprocess::to_chw(&frame, size, &manifest.normalisation);
        let scored = engine.run(&input, 1)?;
        let raw_score = scored.scores[0];
        let raw_map = preprocess::resize_plane(&scored.maps, size, [frame.height, frame.width]);
        let pixels = overlay::annotate(&frame, &raw_map, None, calibration, raw_score);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("{index}"));
        let overlay_path = out.join(format!("{index:04}_{stem}_overlay.png"));
        overlay::save_png(&overlay_path, &pixels, frame.width, frame.height).map_err(|e| {
            InferError::Write {
                path: overlay_path.clone(),
                message: e.to_string(),
            }
        })?;
        results.push(ImageResult {
            path: path.clone(),
            raw_score,
            score: calibration.normalise(raw_score),
            overlay: overlay_path,
        });
    }
    Ok(results)
}
