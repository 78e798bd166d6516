//! `stpm eval`: scores a bundle on an MVTec-layout category through the runtime engine and writes
//! `report.json`. Owns the evaluation protocol; the metric maths is in `metrics`.

pub mod metrics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::bundle::{Bundle, BundleError};
use crate::dataset::{self, LayoutError};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::preprocess::{self, Normalisation, PreprocessError, RgbFrame};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Image(#[from] PreprocessError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot read mask {path}: {source}")]
    Mask {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Metrics of one defect type (against all good images).
#[derive(Debug, Clone, Serialize)]
pub struct TypeReport {
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub n: usize,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub data: String,
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub f1_max: Option<f64>,
    /// The bundle's calibrated raw threshold (normalised 0.5).
    pub threshold: f32,
    pub n_good: usize,
    pub n_defect: usize,
    pub images_per_second: f64,
    pub per_defect_type: BTreeMap<String, TypeReport>,
}

/// Image scores and pixel maps at mask resolution, per test image.
struct Scored {
    defect_type: String,
    score: f32,
    pixels: Vec<f32>,
    truth: Vec<bool>,
}

fn read_mask(path: &Path) -> Result<(Vec<bool>, [usize; 2]), EvalError> {
    let mask = image::open(path)
        .map_err(|source| EvalError::Mask {
            path: path.to_path_buf(),
            source,
        })?
        .to_luma8();
    let size = [mask.height() as usize, mask.width() as usize];
    Ok((mask.pixels().map(|p| p.0[0] > 127).collect(), size))
}

/// Scores every test image of `data` with the bundle at `model` and writes `out/report.json`.
pub fn evaluate(
    model: &Path,
    data: &Path,
    out: &Path,
    progress: bool,
) -> Result<Report, EvalError> {
    let bundle = Bundle::open(model)?;
    let manifest = &bundle.manifest;
    let size = manifest.model.input_size;
    let norm: Normalisation = manifest.normalisation;
    let images = dataset::test_set(data)?;
    let mut engine = Engine::open(&bundle.model_path(), size, EngineOptions::default())?;

    let bar = if progress {
        ProgressBar::new(images.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} eval [{bar:30}] {pos}/{len} images {elapsed_precise} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut inference_seconds = 0.0;
    let mut scored = Vec::with_capacity(images.len());
    for test in &images {
        let frame = RgbFrame::open(&test.path)?;
        let tick = Instant::now();
        let input = preprocess::to_chw(&frame, size, &norm);
        let result = engine.run(&input, 1)?;
        inference_seconds += tick.elapsed().as_secs_f64();
        let (truth, mask_size) = match &test.mask {
            Some(mask) => read_mask(mask)?,
            None => (
                vec![false; frame.width * frame.height],
                [frame.height, frame.width],
            ),
        };
        let pixels = preprocess::resize_plane(&result.maps, size, mask_size);
        scored.push(Scored {
            defect_type: test.defect_type.clone(),
            score: result.scores[0],
            pixels,
            truth,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let image_metrics = |members: &dyn Fn(&Scored) -> bool| {
        let chosen: Vec<&Scored> = scored.iter().filter(|s| members(s)).collect();
        let scores: Vec<f32> = chosen.iter().map(|s| s.score).collect();
        let labels: Vec<bool> = chosen.iter().map(|s| s.defect_type != "good").collect();
        let pixel_scores: Vec<f32> = chosen
            .iter()
            .flat_map(|s| s.pixels.iter().copied())
            .collect();
        let pixel_labels: Vec<bool> = chosen
            .iter()
            .flat_map(|s| s.truth.iter().copied())
            .collect();
        (
            metrics::auroc(&scores, &labels),
            metrics::auroc(&pixel_scores, &pixel_labels),
            metrics::f1_max(&scores, &labels).map(|(f1, _)| f1),
            chosen.len(),
        )
    };
    let (image_auroc, pixel_auroc, f1_max, _) = image_metrics(&|_| true);
    let mut per_defect_type = BTreeMap::new();
    let types: Vec<String> = {
        let mut t: Vec<String> = scored
            .iter()
            .map(|s| s.defect_type.clone())
            .filter(|t| t != "good")
            .collect();
        t.dedup();
        t
    };
    for defect_type in types {
        let (image_auroc, pixel_auroc, _, _) =
            image_metrics(&|s: &Scored| s.defect_type == "good" || s.defect_type == defect_type);
        let n = scored
            .iter()
            .filter(|s| s.defect_type == defect_type)
            .count();
        per_defect_type.insert(
            defect_type,
            TypeReport {
                image_auroc,
                pixel_auroc,
                n,
            },
        );
    }
    let n_good = scored.iter().filter(|s| s.defect_type == "good").count();
    let report = Report {
        model: model.display().to_string(),
        data: data.display().to_string(),
        image_auroc,
        pixel_auroc,
        f1_max,
        threshold: manifest.calibration.threshold,
        n_good,
        n_defect: scored.len() - n_good,
        images_per_second: scored.len() as f64 / inference_seconds.max(1e-9),
        per_defect_type,
    };
    std::fs::create_dir_all(out).map_err(|source| EvalError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let path = out.join("report.json");
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    std::fs::write(&path, json).map_err(|source| EvalError::Write { path, source })?;
    Ok(report)
}

fn fmt_metric(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

/// A short human-readable table of `report`.
pub fn summary_table(report: &Report) -> String {
    let mut text = format!(
        "{:<16} {:>12} {:>12} {:>6}\n",
        "defect type", "image AUROC", "pixel AUROC", "n"
    );
    for (name, t) in &report.per_defect_type {
        text.push_str(&format!(
            "{name:<16} {:>12} {:>12} {:>6}\n",
            fmt_metric(t.image_auroc),
            fmt_metric(t.pixel_auroc),
            t.n
        ));
    }
    text.push_str(&format!(
        "{:<16} {:>12} {:>12} {:>6}\nF1-max {} · {} good + {} defect images · {:.1} images/s (preprocess + inference)\n",
        "all",
        fmt_metric(report.image_auroc),
        fmt_metric(report.pixel_auroc),
        report.n_good + report.n_defect,
        fmt_metric(report.f1_max),
        report.n_good,
        report.n_defect,
        report.images_per_second
    ));
    text
}
