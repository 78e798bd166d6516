//! `stpm eval`: scores a bundle on an MVTec-layout category through the runtime engine and writes
//! `report.json`, `scores.csv`, overlays, ROC/PRO plots and optionally the raw maps. Owns the
//! evaluation protocol; the metric maths is in `detection` (image level) and `pixels`.

pub mod detection;
pub mod npy;
pub mod pixels;
pub mod plots;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use pixels::{AUPRO_FPR_LIMIT, PixelTable};
use serde::Serialize;

use crate::bundle::{Bundle, BundleError, Calibration, Precision};
use crate::dataset::{self, LayoutError};
use crate::engine::{Engine, EngineError, EngineOptions, ExecutionProvider, ProviderRequest};
use crate::overlay;
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
    #[error(
        "the model's anomaly map of {path} is not finite (NaN or infinite): the bundle's graph or weights are broken; train or export it again"
    )]
    NotFinite { path: PathBuf },
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
    pub aupro: Option<f64>,
    pub n: usize,
    /// Images of this type at or above the bundle's calibrated threshold (they would alert).
    pub caught: usize,
}

/// What the bundle's calibrated threshold does on the test set: the images that would alert.
#[derive(Debug, Clone, Serialize)]
pub struct ThresholdOutcome {
    /// Good images at or above the threshold (false alarms).
    pub good_flagged: usize,
    pub good: usize,
    /// Defective images at or above the threshold.
    pub defects_caught: usize,
    pub defects: usize,
}

/// Recall at a fixed false-alarm rate on the good test images: an operating point an operator
/// could choose instead of the bundle's threshold.
#[derive(Debug, Clone, Serialize)]
pub struct FprOutcome {
    /// The largest share of good images allowed to alert.
    pub fpr: f64,
    /// Raw threshold of that point (an image alerts above it).
    pub threshold: f32,
    pub good_flagged: usize,
    pub good: usize,
    pub defects_caught: usize,
    pub defects: usize,
    /// `defects_caught / defects` (None without defective images).
    pub recall: Option<f64>,
}

/// The false-alarm rates `stpm eval` reports recall at.
pub const REPORTED_FPRS: [f64; 2] = [0.01, 0.05];

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    /// The graph evaluated: `fp32` (model.onnx) or `int8`.
    pub precision: Precision,
    pub data: String,
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    /// Area under the per-region overlap curve up to FPR 0.3, divided by 0.3 (MVTec protocol).
    pub aupro: Option<f64>,
    pub f1_max: Option<f64>,
    /// The bundle's calibrated raw threshold (normalised 0.5).
    pub threshold: f32,
    /// Alerts at `threshold`: false alarms on good images and defects caught.
    pub at_threshold: ThresholdOutcome,
    /// Recall at 1 % and 5 % false alarms on the good test images (thresholds from the test set
    /// itself: what the model could reach, not what its calibration does).
    pub at_fpr: Vec<FprOutcome>,
    pub n_good: usize,
    pub n_defect: usize,
    /// The execution provider the bundle ran on.
    pub provider: ExecutionProvider,
    /// Test images per second through preprocessing and inference.
    pub images_per_second: f64,
    /// Seconds spent on the pixel metrics (each image's pixels sorted into the table, then the
    /// merged sweep), excluding inference.
    pub metrics_seconds: f64,
    pub per_defect_type: BTreeMap<String, TypeReport>,
}

/// What `evaluate` writes besides `report.json`.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// Write each raw map at mask resolution to `maps/<type>/<stem>.npy`.
    pub save_maps: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Execution provider to run the bundle on.
    pub provider: ProviderRequest,
    /// Which of the bundle's graphs runs.
    pub precision: Precision,
}

/// One test image's outcome.
struct Scored {
    defect_type: String,
    /// The image's file name.
    name: String,
    score: f32,
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// `scores.csv`: one line per test image with its raw and normalised score and whether it would
/// alert at the bundle's threshold.
fn write_scores(
    path: &Path,
    scored: &[Scored],
    calibration: &Calibration,
) -> Result<(), EvalError> {
    let mut text = String::from("defect_type,image,raw_score,score,alert\n");
    for s in scored {
        text.push_str(&format!(
            "{},{},{},{:.4},{}\n",
            csv_field(&s.defect_type),
            csv_field(&s.name),
            s.score,
            calibration.normalise(s.score),
            u8::from(s.score >= calibration.threshold)
        ));
    }
    std::fs::write(path, text).map_err(write_error(path))
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn read_mask(path: &Path) -> Result<(Vec<bool>, [usize; 2]), EvalError> {
    let mask = crate::preprocess::decode_file(path)
        .map_err(|source| EvalError::Mask {
            path: path.to_path_buf(),
            source,
        })?
        // 16 bits, so that a 16-bit label mask of 0 and 1 keeps its 1s (8-bit levels v become
        // 257·v: the same rule below).
        .to_luma16();
    let size = [mask.height() as usize, mask.width() as usize];
    Ok((binarise_mask(mask.as_raw()), size))
}

/// A defect where a mask's grey level is above half its range (masks of 0 and 255, anti-aliased
/// edges in between), or, in a mask whose levels all stay at or below half (label images of 0 and
/// 1 or of small class numbers), anywhere above 0. A near-black noisy mask (a JPEG's) then counts
/// its noise as defect.
fn binarise_mask(levels: &[u16]) -> Vec<bool> {
    const HALF: u16 = u16::MAX / 2;
    let threshold = if levels.iter().any(|&v| v > HALF) {
        HALF
    } else {
        0
    };
    levels.iter().map(|&v| v > threshold).collect()
}

/// Nearest-neighbour resize of a boolean mask from `from` = [h, w] to `to`.
fn resize_mask(mask: &[bool], from: [usize; 2], to: [usize; 2]) -> Vec<bool> {
    if from == to {
        return mask.to_vec();
    }
    let mut out = Vec::with_capacity(to[0] * to[1]);
    for y in 0..to[0] {
        let sy = (y * from[0] / to[0]).min(from[0] - 1);
        for x in 0..to[1] {
            let sx = (x * from[1] / to[1]).min(from[1] - 1);
            out.push(mask[sy * from[1] + sx]);
        }
    }
    out
}

/// Whether two [height, width] sizes have the same aspect ratio within 1 % (a mask at half or
/// twice its image's size is fine; one of another shape is a data error).
fn same_shape(a: [usize; 2], b: [usize; 2]) -> bool {
    let ratio = |[h, w]: [usize; 2]| w as f64 / h.max(1) as f64;
    (ratio(a) / ratio(b) - 1.0).abs() <= 0.01
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The name of an image's overlay and map files: its stem, or where another image of its type
/// already took that (`000.png` beside `000.bmp`, or names outside UTF-8 that read alike) its whole
/// file name with `_` for the dots, then a number.
fn output_name(
    path: &Path,
    defect_type: &str,
    taken: &mut std::collections::HashSet<(String, String)>,
) -> String {
    let stem = file_stem(path);
    let whole = path
        .file_name()
        .map(|name| name.to_string_lossy().replace('.', "_"))
        .unwrap_or_default();
    // The numbered names never run out, so the search always ends with one.
    [stem, whole.clone()]
        .into_iter()
        .chain((2..).map(|n| format!("{whole}-{n}")))
        .find(|name| taken.insert((defect_type.to_string(), name.clone())))
        .unwrap_or_default()
}

/// Scores every test image of `data` with the bundle at `model`; writes `out/report.json`,
/// `out/overlays/<type>/<stem>.png`, `out/roc.png`, `out/pro.png` and, with `save_maps`,
/// `out/maps/<type>/<stem>.npy`.
pub fn evaluate(
    model: &Path,
    data: &Path,
    out: &Path,
    options: &EvalOptions,
) -> Result<Report, EvalError> {
    let bundle = Bundle::open_as(model, options.precision)?;
    let manifest = &bundle.manifest;
    let size = manifest.model.input_size;
    let norm: Normalisation = manifest.normalisation;
    let calibration = bundle.calibration();
    let images = dataset::test_set(data)?;
    let engine_options = EngineOptions {
        provider: options.provider,
        ..EngineOptions::default()
    };
    let mut engine = Engine::for_bundle(&bundle, engine_options)?;

    let mut type_names: Vec<String> = Vec::new();
    for image in &images {
        if !type_names.contains(&image.defect_type) {
            type_names.push(image.defect_type.clone());
        }
    }
    for test in &images {
        let dir = out.join("overlays").join(&test.defect_type);
        std::fs::create_dir_all(&dir).map_err(write_error(&dir))?;
        if options.save_maps {
            let dir = out.join("maps").join(&test.defect_type);
            std::fs::create_dir_all(&dir).map_err(write_error(&dir))?;
        }
    }

    let bar = if options.progress {
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
    let mut names_taken = std::collections::HashSet::new();
    let mut table = PixelTable::default();
    let mut table_seconds = 0.0;
    for test in &images {
        let frame = RgbFrame::open(&test.path)?;
        let frame_size = [frame.height, frame.width];
        let tick = Instant::now();
        let input = preprocess::to_chw(&frame, size, &norm);
        let result = engine.run(&input, 1)?;
        inference_seconds += tick.elapsed().as_secs_f64();
        if !result.scores[0].is_finite() || result.maps.iter().any(|v| !v.is_finite()) {
            return Err(EvalError::NotFinite {
                path: test.path.clone(),
            });
        }
        let (truth, mask_size) = match &test.mask {
            Some(mask) => read_mask(mask)?,
            None => (vec![false; frame.width * frame.height], frame_size),
        };
        if !same_shape(mask_size, frame_size) {
            log::warn!(
                "{}: its mask {} is {}×{} for a {}×{} image; stretched to fit (a rotated or \
                 swapped mask?)",
                test.path.display(),
                test.mask.as_deref().unwrap_or(Path::new("")).display(),
                mask_size[1],
                mask_size[0],
                frame_size[1],
                frame_size[0]
            );
        }
        let stem = output_name(&test.path, &test.defect_type, &mut names_taken);

        let raw_at_frame = preprocess::resize_plane(&result.maps, size, frame_size);
        let truth_at_frame = resize_mask(&truth, mask_size, frame_size);
        let pixels = overlay::annotate(
            &frame,
            &raw_at_frame,
            Some(&truth_at_frame),
            calibration,
            result.scores[0],
        );
        let overlay_path = out
            .join("overlays")
            .join(&test.defect_type)
            .join(format!("{stem}.png"));
        overlay::save_png(&overlay_path, &pixels, frame.width, frame.height).map_err(|e| {
            EvalError::Write {
                path: overlay_path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;

        let map = preprocess::resize_plane(&result.maps, size, mask_size);
        if options.save_maps {
            let path = out
                .join("maps")
                .join(&test.defect_type)
                .join(format!("{stem}.npy"));
            npy::write_npy(&path, &map, mask_size).map_err(write_error(&path))?;
        }
        let type_index = type_names
            .iter()
            .position(|t| *t == test.defect_type)
            .unwrap_or(0) as u16;
        let tick = Instant::now();
        table.add_image(&map, &truth, mask_size[1], type_index);
        table_seconds += tick.elapsed().as_secs_f64();
        scored.push(Scored {
            defect_type: test.defect_type.clone(),
            name: test
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            score: result.scores[0],
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let tick = Instant::now();
    let good_index = type_names
        .iter()
        .position(|t| t == "good")
        .map(|g| g as u16);
    let pixel = table.metrics(good_index, type_names.len());
    drop(table);
    let image_roc = |members: &dyn Fn(&Scored) -> bool| {
        let chosen: Vec<&Scored> = scored.iter().filter(|s| members(s)).collect();
        let scores: Vec<f32> = chosen.iter().map(|s| s.score).collect();
        let labels: Vec<bool> = chosen.iter().map(|s| s.defect_type != "good").collect();
        (scores, labels)
    };

    let (scores, labels) = image_roc(&|_| true);
    let image_auroc = detection::auroc(&scores, &labels);
    let n_good = scored.iter().filter(|s| s.defect_type == "good").count();
    // Without good images every threshold has precision 1: an F1 of 1 that says nothing.
    let f1_max = (n_good > 0)
        .then(|| detection::f1_max(&scores, &labels).map(|(f1, _)| f1))
        .flatten();
    if n_good == 0 {
        log::warn!(
            "{}: test/good holds no images: image AUROC, F1 and the false-alarm rates need good \
             images (n/a); each defect type's pixel metrics are measured on its own images",
            data.display()
        );
    }
    let image_curve = detection::roc_curve(&scores, &labels).map(|(_, curve)| curve);
    let pixel_auroc = pixel.all.auroc;
    let aupro = pixel.all.aupro;

    let alerting = |members: &dyn Fn(&Scored) -> bool| {
        scored
            .iter()
            .filter(|s| members(s) && s.score >= calibration.threshold)
            .count()
    };
    let mut per_defect_type = BTreeMap::new();
    for (index, defect_type) in type_names.iter().enumerate() {
        if defect_type == "good" {
            continue;
        }
        let (scores, labels) =
            image_roc(&|s: &Scored| s.defect_type == "good" || s.defect_type == *defect_type);
        let type_pixels = pixel.groups.get(index);
        per_defect_type.insert(
            defect_type.clone(),
            TypeReport {
                image_auroc: detection::auroc(&scores, &labels),
                pixel_auroc: type_pixels.and_then(|p| p.auroc),
                aupro: type_pixels.and_then(|p| p.aupro),
                n: labels.iter().filter(|&&l| l).count(),
                caught: alerting(&|s: &Scored| s.defect_type == *defect_type),
            },
        );
    }
    let metrics_seconds = table_seconds + tick.elapsed().as_secs_f64();

    let at_threshold = ThresholdOutcome {
        good_flagged: alerting(&|s: &Scored| s.defect_type == "good"),
        good: n_good,
        defects_caught: alerting(&|s: &Scored| s.defect_type != "good"),
        defects: scored.len() - n_good,
    };
    let good_scores: Vec<f32> = scored
        .iter()
        .filter(|s| s.defect_type == "good")
        .map(|s| s.score)
        .collect();
    let defect_scores: Vec<f32> = scored
        .iter()
        .filter(|s| s.defect_type != "good")
        .map(|s| s.score)
        .collect();
    let at_fpr = REPORTED_FPRS
        .iter()
        .filter_map(|&fpr| {
            let (threshold, good_flagged, defects_caught) =
                detection::at_false_alarm_rate(&good_scores, &defect_scores, fpr)?;
            Some(FprOutcome {
                fpr,
                threshold,
                good_flagged,
                good: good_scores.len(),
                defects_caught,
                defects: defect_scores.len(),
                recall: (!defect_scores.is_empty())
                    .then(|| defects_caught as f64 / defect_scores.len() as f64),
            })
        })
        .collect();
    let report = Report {
        model: model.display().to_string(),
        precision: options.precision,
        data: data.display().to_string(),
        image_auroc,
        pixel_auroc,
        aupro,
        f1_max,
        threshold: calibration.threshold,
        at_threshold,
        at_fpr,
        n_good,
        n_defect: scored.len() - n_good,
        provider: engine.provider_choice().provider,
        images_per_second: scored.len() as f64 / inference_seconds.max(1e-9),
        metrics_seconds,
        per_defect_type,
    };
    std::fs::create_dir_all(out).map_err(write_error(out))?;
    let path = out.join("report.json");
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    std::fs::write(&path, json).map_err(write_error(&path))?;
    write_scores(&out.join("scores.csv"), &scored, calibration)?;
    write_plots(
        out,
        &report,
        image_curve.as_ref(),
        pixel.all.roc.as_ref(),
        pixel.all.pro.as_ref(),
    )?;
    Ok(report)
}

/// `roc.png` (image and pixel ROC) and `pro.png` (PRO up to the AUPRO limit).
fn write_plots(
    out: &Path,
    report: &Report,
    image_curve: Option<&detection::Curve>,
    pixel_roc: Option<&detection::Curve>,
    pro: Option<&detection::Curve>,
) -> Result<(), EvalError> {
    use plotters::style::{BLUE, RED};
    let plot_error = |path: PathBuf| {
        move |error: plots::PlotError| EvalError::Write {
            path,
            source: std::io::Error::other(error),
        }
    };
    let mut roc_series = Vec::new();
    if let (Some(curve), Some(auroc)) = (image_curve, report.image_auroc) {
        roc_series.push(plots::Series {
            label: format!("image AUROC {auroc:.3}"),
            curve,
            colour: RED,
        });
    }
    if let (Some(curve), Some(auroc)) = (pixel_roc, report.pixel_auroc) {
        roc_series.push(plots::Series {
            label: format!("pixel AUROC {auroc:.3}"),
            curve,
            colour: BLUE,
        });
    }
    let path = out.join("roc.png");
    plots::line_chart(&path, "ROC", "true positive rate", 1.0, &roc_series, true)
        .map_err(plot_error(path.clone()))?;

    let mut pro_series = Vec::new();
    if let (Some(curve), Some(aupro)) = (pro, report.aupro) {
        pro_series.push(plots::Series {
            label: format!("AUPRO@0.3 {aupro:.3}"),
            curve,
            colour: BLUE,
        });
    }
    let path = out.join("pro.png");
    plots::line_chart(
        &path,
        "Per-region overlap",
        "PRO (mean region coverage)",
        AUPRO_FPR_LIMIT,
        &pro_series,
        false,
    )
    .map_err(plot_error(path.clone()))
}

fn fmt_metric(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

/// A short human-readable table of `report`.
pub fn summary_table(report: &Report) -> String {
    let mut text = format!(
        "{:<16} {:>12} {:>12} {:>10} {:>6}\n",
        "defect type", "image AUROC", "pixel AUROC", "AUPRO@0.3", "n"
    );
    for (name, t) in &report.per_defect_type {
        text.push_str(&format!(
            "{name:<16} {:>12} {:>12} {:>10} {:>6}\n",
            fmt_metric(t.image_auroc),
            fmt_metric(t.pixel_auroc),
            fmt_metric(t.aupro),
            t.n
        ));
    }
    text.push_str(&format!(
        "{:<16} {:>12} {:>12} {:>10} {:>6}\nF1-max {} · {} good + {} defect images · {:.1} images/s (preprocess + inference, {}) · pixel metrics {:.2} s\n",
        "all",
        fmt_metric(report.image_auroc),
        fmt_metric(report.pixel_auroc),
        fmt_metric(report.aupro),
        report.n_good + report.n_defect,
        fmt_metric(report.f1_max),
        report.n_good,
        report.n_defect,
        report.images_per_second,
        report.provider,
        report.metrics_seconds
    ));
    let t = &report.at_threshold;
    text.push_str(&format!(
        "at the bundle's threshold (raw {:.4}): {}/{} good images would alert, {}/{} defective images caught (per image: scores.csv)\n",
        report.threshold, t.good_flagged, t.good, t.defects_caught, t.defects
    ));
    for point in &report.at_fpr {
        text.push_str(&format!(
            "at {:.0} % false alarms (raw {:.4}): {}/{} good images would alert, {}/{} defective images caught (recall {})\n",
            point.fpr * 100.0,
            point.threshold,
            point.good_flagged,
            point.good,
            point.defects_caught,
            point.defects,
            fmt_metric(point.recall)
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::{binarise_mask, csv_field};

    #[test]
    fn masks_of_255_and_label_masks_of_1_both_mark_their_defects() {
        // 8-bit levels as `read_mask` gives them (v · 257). 0/255 with an anti-aliased edge: above
        // half.
        let eight =
            |levels: &[u16]| binarise_mask(&levels.iter().map(|v| v * 257).collect::<Vec<_>>());
        assert_eq!(
            eight(&[0, 100, 127, 128, 255]),
            vec![false, false, false, true, true]
        );
        // 0/1 (or class numbers), 8- or 16-bit: anything above 0.
        assert_eq!(eight(&[0, 1, 0, 3]), vec![false, true, false, true]);
        assert_eq!(binarise_mask(&[0, 1, 0, 3]), vec![false, true, false, true]);
        assert_eq!(binarise_mask(&[0, 0]), vec![false, false]);
        // 16-bit 0/65535.
        assert_eq!(binarise_mask(&[0, 65535, 30000]), vec![false, true, false]);
    }

    #[test]
    fn images_of_one_stem_get_outputs_of_their_own() {
        let mut taken = std::collections::HashSet::new();
        let mut name = |path: &str, kind: &str| {
            super::output_name(std::path::Path::new(path), kind, &mut taken)
        };
        assert_eq!(name("test/crack/000.png", "crack"), "000");
        assert_eq!(name("test/crack/000.bmp", "crack"), "000_bmp");
        assert_eq!(name("test/good/000.png", "good"), "000");
        assert_eq!(name("test/crack/000_bmp.png", "crack"), "000_bmp_png");
        assert_eq!(name("elsewhere/000.bmp", "crack"), "000_bmp-2");
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_need_it() {
        assert_eq!(csv_field("000.png"), "000.png");
        assert_eq!(csv_field("a,b.png"), "\"a,b.png\"");
        assert_eq!(csv_field("say \"hi\".png"), "\"say \"\"hi\"\".png\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
