//! The model bundle on disk (docs/model.md): `model.onnx`, the `stpm.toml` manifest and the student's
//! weights. Owns reading, writing and validating the manifest; not training or inference.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::features::MapStats;
use crate::model::map::{FUSION_STRIDES, MapOptions};
use crate::model::{BackboneKind, Fusion};
use crate::preprocess::Normalisation;

mod head;
mod tensors;
mod whitening;
pub use head::{HeadSection, read_head, write_head};
pub use whitening::{WhiteningSection, read_whitening, write_whitening};

/// Bumped whenever the bundle layout or the manifest's meaning changes.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "stpm.toml";
pub const MODEL_FILE: &str = "model.onnx";
pub const STUDENT_FILE: &str = "student.safetensors";
/// The INT8 (QDQ) variant written by `stpm export --precision int8`.
pub const INT8_MODEL_FILE: &str = "model.int8.onnx";
/// `[int8] activations` of an INT8 graph TensorRT can build (`--activations int8-symmetric`; the
/// name `ActivationType::Int8Symmetric` writes there).
pub const TENSORRT_INT8_ACTIVATIONS: &str = "int8-symmetric";
/// Only for randomly initialised teachers (tests); pretrained ones are referenced by path and hash.
pub const TEACHER_FILE: &str = "teacher.safetensors";
/// The residual whitening of the `whitened` fusion (also baked into `model.onnx`).
pub const WHITENING_FILE: &str = "whitening.safetensors";
/// The defect head's weights (also baked into `model.onnx`).
pub const HEAD_FILE: &str = "head.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(
        "{dir} is not a model bundle: {MANIFEST_FILE} is missing (train one with `stpm train`)"
    )]
    NoManifest { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} has no INT8 model: run `stpm export --model {dir} --precision int8` first")]
    NoInt8 { dir: PathBuf },
    #[error(
        "the INT8 model of {dir} was made from another model.onnx (sha256 {found}, now {expected}): export it again with `stpm export --model {dir} --precision int8`"
    )]
    StaleInt8 {
        dir: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path} is not a valid manifest: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} is not a valid whitening file: {message}")]
    Whitening { path: PathBuf, message: String },
    #[error("{path} is not a valid defect-head file: {message}")]
    Head { path: PathBuf, message: String },
    #[error(
        "{path} has format version {found}; this stpm reads version {FORMAT_VERSION} (retrain or use a matching stpm)"
    )]
    Version { path: PathBuf, found: i64 },
    #[error(
        "{path} does not match its manifest: sha256 {found}, manifest says {expected} (the file was changed or replaced after training)"
    )]
    Hash {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

/// The architecture and I/O contract of `model.onnx`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Backbone of teacher and student.
    pub backbone: BackboneKind,
    /// Tapped layers (strides 4, 8, 16).
    pub layers: Vec<String>,
    /// Input [height, width] the graph expects.
    pub input_size: [usize; 2],
    /// How the per-scale maps are combined.
    pub fusion: Fusion,
    /// σ in pixels of the Gaussian blur of the fused map (0: none).
    #[serde(default)]
    pub blur_sigma: f32,
    /// Per-term mean and standard deviation over held-out good images (`standardised` and
    /// `whitened` fusions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_stats: Option<MapStats>,
    /// The residual whitening (`whitened` fusion only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitening: Option<WhiteningSection>,
    /// The defect head trained on synthetic defects, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadSection>,
    /// The map is fused and blurred at 1/`fusion_stride` of the input size, then upsampled (1 for
    /// bundles made before this was recorded).
    #[serde(default = "full_resolution")]
    pub fusion_stride: usize,
    /// File name of the graph inside the bundle.
    pub onnx: String,
    /// sha256 of the graph file, checked on load.
    pub onnx_sha256: String,
}

fn full_resolution() -> usize {
    1
}

impl ModelSection {
    /// How the graph turns the pyramids into the map, without the whitening (which lives in its
    /// own file: [`Bundle::map_options`] reads it).
    pub fn map_options(&self) -> MapOptions {
        MapOptions {
            fusion: self.fusion,
            blur_sigma: self.blur_sigma,
            stats: self.map_stats.unwrap_or_default(),
            whitening: None,
            fusion_stride: self.fusion_stride,
            head: None,
        }
    }
}

/// Raw score → normalised score: `threshold` maps to 0.5, `floor` to 0; clamped to [0, 1].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Raw image score at the alert threshold (normalised 0.5).
    pub threshold: f32,
    /// Raw score mapped to normalised 0 (the lowest held-out good score).
    pub floor: f32,
    /// How the threshold was chosen.
    pub method: String,
    /// Held-out good images it was computed from.
    pub n_images: usize,
    /// Median normalised score of those images (how far below 0.5 a typical good part sits).
    pub good_median: f32,
}

impl Calibration {
    /// Maps a raw score (or map pixel) to [0, 1] with the threshold at 0.5.
    pub fn normalise(&self, raw: f32) -> f32 {
        let span = (self.threshold - self.floor).max(f32::EPSILON);
        (0.5 + 0.5 * (raw - self.threshold) / span).clamp(0.0, 1.0)
    }
}

/// What the student was trained on and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSummary {
    pub data: String,
    pub n_train: usize,
    pub n_holdout: usize,
    pub epochs_run: usize,
    /// Mean training loss of each epoch.
    #[serde(default)]
    pub epoch_losses: Vec<f32>,
    /// Held-out STPM loss after each epoch (the checkpoint criterion).
    #[serde(default)]
    pub epoch_holdout_losses: Vec<f32>,
    pub best_epoch: usize,
    pub best_holdout_loss: f32,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// How the learning rate moved over the steps (`stpm train --lr-schedule`): "constant" (also
    /// bundles written before the option) or "cosine".
    #[serde(default = "constant_schedule")]
    pub lr_schedule: String,
    pub seed: u64,
    pub seconds: f64,
    pub interrupted: bool,
    /// Teacher weights: the `.pth` used, or `teacher.safetensors` inside the bundle.
    #[serde(default)]
    pub teacher_weights: String,
    /// sha256 of the teacher weights file ("random" for a randomly initialised teacher).
    pub teacher_weights_sha256: String,
    /// Training-image augmentation (`stpm train --augment`): "none" or "flips".
    #[serde(default = "no_augmentation")]
    pub augment: String,
    /// Raw scores of the held-out good images through the exported graph, in the split's order:
    /// what the threshold was fitted on (kept so another rule can be applied without rescoring).
    #[serde(default)]
    pub holdout_scores: Vec<f32>,
    /// SGD steps each epoch took (fewer than a full pass when the step budget capped the run;
    /// 0 in bundles written before the budget existed).
    #[serde(default)]
    pub steps_per_epoch: usize,
    /// The step budget (`stpm train --max-steps`; 0: none).
    #[serde(default)]
    pub max_steps: usize,
    /// Images the training folder held (more than `n_train + n_holdout` when `max_images` took a
    /// share; 0 in bundles written before the cap existed).
    #[serde(default)]
    pub images_found: usize,
    /// The image cap (`stpm train --max-images`; 0: none, as in bundles written before it).
    #[serde(default)]
    pub max_images: usize,
}

impl TrainingSummary {
    /// Whether a training folder that gives `n_train` + `n_holdout` images of `found` is the one
    /// recorded here (bundles written before the image cap record no folder size, 0: the split's
    /// counts alone must agree).
    pub fn matches_split(&self, n_train: usize, n_holdout: usize, found: usize) -> bool {
        (n_train, n_holdout) == (self.n_train, self.n_holdout)
            && (self.images_found == 0 || self.images_found == found)
    }
}

fn no_augmentation() -> String {
    "none".into()
}

fn constant_schedule() -> String {
    "constant".into()
}

/// `[int8]`: the INT8 (QDQ) variant of `model.onnx`, written by `stpm export --precision int8`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Int8Section {
    /// File name of the INT8 graph inside the bundle.
    pub onnx: String,
    /// sha256 of that file, checked when it is chosen.
    pub onnx_sha256: String,
    /// sha256 of the fp32 `model.onnx` it was quantised from (a retrained model invalidates it).
    pub source_sha256: String,
    /// Weight quantisation, e.g. "int8 symmetric per output channel".
    pub weights: String,
    /// Activation type ("uint8" or "int8"), per tensor.
    pub activations: String,
    /// How activation ranges were chosen, e.g. "min/max".
    pub ranges: String,
    /// How the `whitened` map's residual whitening of this graph was fitted (empty: the fp32
    /// graph's, as INT8 exports before it was fitted again did).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub whitening: String,
    /// Folder of the calibration images.
    pub calibration_data: String,
    /// Number of calibration images the ranges come from.
    pub calibration_images: usize,
    /// Threshold and floor for this graph's scores (held-out good images through the INT8 graph
    /// when the training split can be reproduced, else a copy of `[calibration]`).
    pub calibration: Calibration,
}

/// Which graph of a bundle runs: `model.onnx` (fp32) or its INT8 variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

/// `[model] precision` of a pipeline: one of the bundle's graphs, or `auto` (see
/// [`Bundle::open_choosing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    #[default]
    Auto,
    Fp32,
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `stpm.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub model: ModelSection,
    pub normalisation: Normalisation,
    pub calibration: Calibration,
    pub training: TrainingSummary,
    /// The INT8 variant, once exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8: Option<Int8Section>,
}

impl Manifest {
    /// The INT8 graph is TensorRT's kind (symmetric int8 activations), which ONNX Runtime's CPU
    /// provider does not run.
    pub fn int8_is_for_tensorrt(&self) -> bool {
        self.int8
            .as_ref()
            .is_some_and(|int8| int8.activations.starts_with(TENSORRT_INT8_ACTIVATIONS))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let bytes = std::fs::read(path).map_err(|source| BundleError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(sha256_hex(&bytes))
}

/// The bytes of a bundle file whose sha256 must be `expected` (a [`BundleError::Hash`] otherwise).
fn read_verified(path: &Path, expected: &str) -> Result<Vec<u8>, BundleError> {
    let bytes = std::fs::read(path).map_err(|source| BundleError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let found = sha256_hex(&bytes);
    if found != expected {
        return Err(BundleError::Hash {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(bytes)
}

/// A bundle directory whose manifest has been read and whose graph hash has been checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The graph `model_path` and `calibration` refer to.
    pub precision: Precision,
    /// sha256 of `stpm.toml` as read (it names the graph's own hash, so it identifies the model
    /// and its calibration).
    pub manifest_sha256: String,
}

/// What makes a calibration unusable for scoring, if anything: its threshold and floor must be
/// finite.
fn unusable_calibration(section: &str, calibration: &Calibration) -> Option<String> {
    (!calibration.threshold.is_finite() || !calibration.floor.is_finite()).then(|| {
        format!(
            "{section} threshold = {}, floor = {} (both must be finite numbers: set them from \
             good images with `stpm calibrate`, or train the bundle again)",
            calibration.threshold, calibration.floor
        )
    })
}

/// What makes a manifest's numbers unusable for scoring the fp32 graph, if anything: its
/// calibration (unless `calibration` is false: it is about to be replaced), and the input
/// normalisation's mean finite and its std finite and positive. The INT8 graph's calibration is
/// checked when that graph is chosen.
fn unusable_numbers(manifest: &Manifest, calibration: bool) -> Option<String> {
    if calibration
        && let Some(message) = unusable_calibration("[calibration]", &manifest.calibration)
    {
        return Some(message);
    }
    let Normalisation { mean, std } = &manifest.normalisation;
    if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Some(format!(
            "[normalisation] mean = {mean:?}, std = {std:?} (finite numbers, each std above 0)"
        ));
    }
    None
}

/// The largest input side a bundle may declare (pixels).
pub const MAX_INPUT_SIDE: usize = 4096;

impl Bundle {
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        Self::open_checking(dir, true)
    }

    /// Opens the bundle for `stpm calibrate`, which replaces its thresholds: as [`Bundle::open`],
    /// but a non-finite threshold or floor is no reason to refuse it (it is what calibrating
    /// repairs).
    pub fn open_to_recalibrate(dir: &Path) -> Result<Self, BundleError> {
        Self::open_checking(dir, false)
    }

    fn open_checking(dir: &Path, calibration: bool) -> Result<Self, BundleError> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Err(BundleError::NoManifest {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        // Check the version first, so an old or new layout gets the precise message.
        let version = toml::from_str::<toml::Table>(&text)
            .ok()
            .and_then(|table| table.get("format_version").and_then(|v| v.as_integer()));
        if let Some(found) = version
            && found != FORMAT_VERSION as i64
        {
            return Err(BundleError::Version { path, found });
        }
        let manifest: Manifest = toml::from_str(&text).map_err(|e| BundleError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // Sizes buffers and the graph's input: a hand-edited or damaged manifest must not ask for
        // gigabytes (or zero-sized maps).
        let [height, width] = manifest.model.input_size;
        if !(16..=MAX_INPUT_SIDE).contains(&height)
            || !(16..=MAX_INPUT_SIDE).contains(&width)
            || height % 16 != 0
            || width % 16 != 0
        {
            return Err(BundleError::Parse {
                path,
                message: format!(
                    "[model] input_size = [{height}, {width}] (each side a multiple of 16 from 16 to {MAX_INPUT_SIDE})"
                ),
            });
        }
        if !FUSION_STRIDES.contains(&manifest.model.fusion_stride) {
            return Err(BundleError::Parse {
                path,
                message: format!(
                    "[model] fusion_stride = {} (must be one of {FUSION_STRIDES:?})",
                    manifest.model.fusion_stride
                ),
            });
        }
        // A non-finite threshold or a zero spread would turn every score into NaN: a camera that
        // never alerts and looks healthy.
        if let Some(message) = unusable_numbers(&manifest, calibration) {
            return Err(BundleError::Parse { path, message });
        }
        read_verified(&dir.join(&manifest.model.onnx), &manifest.model.onnx_sha256)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            precision: Precision::Fp32,
            manifest_sha256: sha256_hex(text.as_bytes()),
        })
    }

    /// Opens the bundle with `precision` chosen (see [`Bundle::with_precision`]).
    pub fn open_as(dir: &Path, precision: Precision) -> Result<Self, BundleError> {
        Self::open(dir)?.with_precision(precision)
    }

    /// This bundle with `precision` chosen: for INT8, checks that the variant exists, was made
    /// from this `model.onnx` and matches its hash (without re-reading the manifest or `model.onnx`).
    pub fn with_precision(mut self, precision: Precision) -> Result<Self, BundleError> {
        if precision == Precision::Int8 {
            self.check_int8(true)?;
        }
        self.precision = precision;
        Ok(self)
    }

    /// This bundle's INT8 graph chosen for `stpm calibrate`, which replaces its thresholds: as
    /// [`Bundle::with_precision`], but a non-finite INT8 threshold or floor is no reason to refuse.
    pub fn int8_to_recalibrate(mut self) -> Result<Self, BundleError> {
        self.check_int8(false)?;
        self.precision = Precision::Int8;
        Ok(self)
    }

    /// Opens the bundle for a pipeline's `[model] precision` (see [`Bundle::choosing`]).
    pub fn open_choosing(
        dir: &Path,
        choice: PrecisionChoice,
        on_cpu: bool,
    ) -> Result<(Self, String), BundleError> {
        Self::open(dir)?.choosing(choice, on_cpu)
    }

    /// This bundle with the graph a pipeline's `[model] precision` chooses, and why: `auto` takes
    /// the INT8 graph when the engine runs on the CPU and the bundle has a current one of the CPU's
    /// kind (uint8 or int8 activations; the symmetric one made for TensorRT ran at 0.5× fp32 on the
    /// CPU), the fp32 `model.onnx` otherwise (an INT8 graph that cannot be used is named in the
    /// reason).
    pub fn choosing(
        mut self,
        choice: PrecisionChoice,
        on_cpu: bool,
    ) -> Result<(Self, String), BundleError> {
        let (precision, reason) = match choice {
            PrecisionChoice::Fp32 => (Precision::Fp32, "requested".to_string()),
            PrecisionChoice::Int8 => {
                self.check_int8(true)?;
                (Precision::Int8, "requested".to_string())
            }
            PrecisionChoice::Auto if !on_cpu => (
                Precision::Fp32,
                "auto: the fp32 model.onnx on a GPU provider".to_string(),
            ),
            PrecisionChoice::Auto => match self.check_int8(true) {
                Ok(()) if self.int8_is_for_tensorrt() => (
                    Precision::Fp32,
                    format!(
                        "auto: the bundle's INT8 graph is TensorRT's kind (int8-symmetric activations), slower than fp32 on the CPU; `stpm export --model {} --precision int8` makes the CPU's",
                        self.dir.display()
                    ),
                ),
                Ok(()) => (
                    Precision::Int8,
                    "auto: the bundle's INT8 graph, on the CPU".to_string(),
                ),
                Err(BundleError::NoInt8 { .. }) => (
                    Precision::Fp32,
                    format!(
                        "auto: the bundle has no INT8 graph; `stpm export --model {} --precision int8` makes one, faster on the CPU",
                        self.dir.display()
                    ),
                ),
                Err(e) => (
                    Precision::Fp32,
                    format!("auto: the INT8 graph is not used: {e}"),
                ),
            },
        };
        self.precision = precision;
        Ok((self, reason))
    }

    /// Whether the INT8 variant exists, was made from this `model.onnx` and matches its hash.
    /// With `calibration`, its threshold and floor must be finite too.
    fn check_int8(&self, calibration: bool) -> Result<(), BundleError> {
        let int8 = self
            .manifest
            .int8
            .as_ref()
            .ok_or_else(|| BundleError::NoInt8 {
                dir: self.dir.clone(),
            })?;
        if int8.source_sha256 != self.manifest.model.onnx_sha256 {
            return Err(BundleError::StaleInt8 {
                dir: self.dir.clone(),
                expected: self.manifest.model.onnx_sha256.clone(),
                found: int8.source_sha256.clone(),
            });
        }
        if calibration
            && let Some(message) = unusable_calibration("[int8.calibration]", &int8.calibration)
        {
            return Err(BundleError::Parse {
                path: self.dir.join(MANIFEST_FILE),
                message,
            });
        }
        read_verified(&self.dir.join(&int8.onnx), &int8.onnx_sha256).map(|_| ())
    }

    /// Whether the bundle's INT8 graph is TensorRT's kind (symmetric int8 activations, from `stpm
    /// export --format tensorrt --precision int8`), which TensorRT can build an engine from.
    pub fn int8_is_for_tensorrt(&self) -> bool {
        self.manifest.int8_is_for_tensorrt()
    }

    /// The graph of the chosen precision.
    pub fn model_path(&self) -> PathBuf {
        match (&self.manifest.int8, self.precision) {
            (Some(int8), Precision::Int8) => self.dir.join(&int8.onnx),
            _ => self.dir.join(&self.manifest.model.onnx),
        }
    }

    /// How the graph turns the pyramids into the map (to rebuild it, or to check it), with the
    /// whitening and the defect head read from their files (hash checked) when the manifest names them.
    pub fn map_options(&self) -> Result<MapOptions, BundleError> {
        let mut options = self.manifest.model.map_options();
        if let Some(section) = &self.manifest.model.whitening {
            let path = self.dir.join(&section.file);
            let bytes = read_verified(&path, &section.sha256)?;
            options.whitening = Some(read_whitening(&bytes, &path)?);
        }
        if let Some(section) = &self.manifest.model.head {
            let path = self.dir.join(&section.file);
            let bytes = read_verified(&path, &section.sha256)?;
            let head = read_head(&bytes, &path, section)?;
            let expected =
                crate::model::head::input_channels(self.manifest.model.backbone.tap_channels());
            if head.inputs != expected {
                return Err(BundleError::Head {
                    path,
                    message: format!(
                        "the head takes {} input channels; a {} teacher gives {expected}",
                        head.inputs, self.manifest.model.backbone
                    ),
                });
            }
            options.head = Some(head);
        }
        Ok(options)
    }

    /// The fp32 `model.onnx`, whatever the chosen precision (the baseline of `stpm bench`).
    pub fn fp32_model_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.model.onnx)
    }

    /// Score calibration of the chosen graph.
    pub fn calibration(&self) -> &Calibration {
        match (&self.manifest.int8, self.precision) {
            (Some(int8), Precision::Int8) => &int8.calibration,
            _ => &self.manifest.calibration,
        }
    }

    pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), BundleError> {
        let path = dir.join(MANIFEST_FILE);
        let text = toml::to_string_pretty(manifest).map_err(|e| BundleError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let header = "# stpm model bundle manifest (written by `stpm train`, `stpm export` and `stpm calibrate`; each model file is checked against its sha256)\n";
        // An interrupted write leaves the old manifest, never half of the new one.
        crate::files::write_whole(&path, format!("{header}{text}"))
            .map_err(|source| BundleError::Write { path, source })
    }
}
