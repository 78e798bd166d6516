//! `stpm train`: distils a student from defect-free images (cached frozen-teacher features, SGD on
//! the STPM loss, checkpoint chosen on held-out good images), then exports, calibrates and writes
//! the bundle. Owns the training loop; the maths lives in `model`, the file format in `bundle`.

mod head;
mod holdout;
mod prepare;
pub mod progress;
mod synth;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::bundle::{self, Bundle, Manifest, ModelSection, TrainingSummary};
use crate::dataset::{self, DEFAULT_HOLDOUT_FRACTION, shuffle};
use crate::model::features::{
    self, MapStats, MapStatsAccumulator, Pyramid, Whitening, WhiteningAccumulator,
};
use crate::model::head::DEFAULT_HEAD_WEIGHT;
use crate::model::map::{self, MapOptions};
use crate::model::weights::{self, WeightsError};
use crate::model::{Backbone, BackboneKind, Fusion};
use crate::onnx;
use crate::preprocess;
use crate::rng::SplitMix;
use prepare::Prepared;

/// Where `scripts/setup.sh` installs the default teacher's weights.
pub const DEFAULT_TEACHER: &str = "engines/teachers/efficientnet-lite0.pth";

/// Where the teacher's weights come from.
#[derive(Debug, Clone)]
pub enum TeacherWeights {
    /// A PyTorch state dict.
    File(PathBuf),
    /// Random initialisation: only for testing the machinery (the maps mean nothing).
    Random,
}

/// Everything `stpm train` needs to know.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub out: PathBuf,
    pub backbone: BackboneKind,
    pub teacher: TeacherWeights,
    pub epochs: usize,
    /// Most SGD steps in all (0: no cap): when `epochs` full passes would take more, each epoch
    /// trains on a random share of the images so the run stays within this budget.
    pub max_steps: usize,
    /// Most images taken from the training folder (0: all): a larger folder (frames collected
    /// from a line for days) gives this many, evenly spaced in name order, so memory and the
    /// teacher's pass stay bounded.
    pub max_images: usize,
    pub batch_size: usize,
    pub image_size: usize,
    pub learning_rate: f64,
    /// How the learning rate moves over the run's steps.
    pub lr_schedule: LrSchedule,
    pub momentum: f64,
    pub weight_decay: f64,
    pub holdout_fraction: f64,
    /// Stop when the held-out loss has not improved for this many epochs (0: never).
    pub patience: usize,
    pub fusion: Fusion,
    /// Gaussian blur (σ in pixels) of the anomaly map inside the graph; 0 disables it.
    pub blur_sigma: f32,
    /// Resolution of the fusion and blur, as a stride of the input (`map::FUSION_STRIDE`
    /// by default; 1 rebuilds the full-resolution graph of older bundles).
    pub fusion_stride: usize,
    /// Mirror images of the training images the student also learns from.
    pub augment: Augment,
    /// Weight of the defect head's standardised logit in the map (0: no head; only with the
    /// standardising fusions).
    pub head_weight: f32,
    /// Take the student of this bundle instead of training one (its seed, so its held-out images
    /// stay held out): rebuilds the map, head and threshold around it.
    pub reuse_student: Option<PathBuf>,
    pub seed: u64,
    pub progress: bool,
    /// Where to keep a JSON account of the progress (`progress::TrainProgress`), for a supervisor.
    pub progress_file: Option<PathBuf>,
}

/// Training-image augmentation. With `Flips` every training image also comes mirrored left-right,
/// top-bottom and both (teacher features cached for each); each epoch draws one of the four per
/// image, so an epoch takes as many steps as without. Held-out images are never augmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Augment {
    #[default]
    None,
    Flips,
}

impl Augment {
    /// The name `--augment` takes and the manifest records.
    pub fn name(self) -> &'static str {
        match self {
            Augment::None => "none",
            Augment::Flips => "flips",
        }
    }
}

/// The option value whose manifest name (`name`) is `recorded`; the default for a name this stpm
/// does not know.
fn by_name<T: clap::ValueEnum + Copy + Default>(recorded: &str, name: fn(T) -> &'static str) -> T {
    T::value_variants()
        .iter()
        .copied()
        .find(|value| name(*value) == recorded)
        .unwrap_or_default()
}

/// The learning rate over a run's SGD steps: `Cosine` (the default) starts at `--learning-rate`
/// and falls along half a cosine to 0 at the last planned step; `Constant` keeps it (the paper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LrSchedule {
    Constant,
    #[default]
    Cosine,
}

impl LrSchedule {
    /// The name `--lr-schedule` takes and the manifest records.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
        }
    }

    /// The learning rate of step `step` (0-based) of `total`, from the base rate `base`.
    pub fn rate(self, base: f64, step: usize, total: usize) -> f64 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Cosine => {
                let done = step as f64 / total.max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * done.min(1.0)).cos())
            }
        }
    }
}

/// Default step budget: 400 steps of 8 images at 256² take 11–17 minutes on 2 cores (1.7–2.6 s a
/// step), so a large folder trains in about that time (a 150-image folder needs 180 steps for its
/// 12 epochs).
pub const DEFAULT_MAX_STEPS: usize = 400;

/// Default cap on the training folder's images: training holds every image and its teacher
/// features in memory (about 1.8 MB an image at 256², so about 2.8 GB in all at this cap), and the
/// step budget shows each of 1,000 images only a few times anyway (400 steps of 8).
pub const DEFAULT_MAX_IMAGES: usize = 1000;

/// Most held-out images the per-epoch checkpoint loss is measured on (all of them still
/// calibrate the threshold and fit the map's statistics).
const CHECKPOINT_IMAGES: usize = 64;

impl TrainConfig {
    /// The paper's SGD (lr 0.4, momentum 0.9, weight decay 1e-4) with batch 8 instead of 32, 12
    /// epochs and the rate falling on a cosine: a 150-image category then trains in under 10
    /// minutes on 2 cores, and the smaller batch gives 4× the SGD steps in that budget.
    pub fn new(data: PathBuf, out: PathBuf) -> Self {
        Self {
            data,
            out,
            backbone: BackboneKind::EfficientNetLite0,
            teacher: TeacherWeights::File(PathBuf::from(DEFAULT_TEACHER)),
            epochs: 12,
            max_steps: DEFAULT_MAX_STEPS,
            max_images: DEFAULT_MAX_IMAGES,
            batch_size: 8,
            image_size: 256,
            learning_rate: 0.4,
            lr_schedule: LrSchedule::Cosine,
            momentum: 0.9,
            weight_decay: 1e-4,
            holdout_fraction: DEFAULT_HOLDOUT_FRACTION,
            patience: 0,
            fusion: Fusion::Whitened,
            blur_sigma: 4.0,
            fusion_stride: map::FUSION_STRIDE,
            augment: Augment::None,
            head_weight: DEFAULT_HEAD_WEIGHT,
            reuse_student: None,
            seed: 0,
            progress: true,
            progress_file: None,
        }
    }

    /// Whether training adds the defect head: a positive weight and a fusion that standardises
    /// its terms (the head's logit is standardised to join them).
    pub fn uses_head(&self) -> bool {
        self.head_weight > 0.0 && self.fusion.standardises()
    }

    /// How the exported graph turns per-scale distances into the anomaly map.
    pub fn map_options(&self) -> MapOptions {
        MapOptions {
            fusion: self.fusion,
            blur_sigma: self.blur_sigma,
            stats: MapStats::default(),
            whitening: None,
            fusion_stride: self.fusion_stride,
            head: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    #[error(transparent)]
    Image(#[from] preprocess::PreprocessError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("default teacher weights not found (searched: {}); run scripts/setup.sh or pass --teacher-weights", .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NoDefaultTeacher(Vec<PathBuf>),
    #[error(
        "{backbone} has no bundled weights: pass --teacher-weights <torchvision state dict .pth>"
    )]
    TeacherRequired { backbone: BackboneKind },
    #[error("need at least 2 good images (1 to train, 1 held out); {folder} has {found}")]
    TooFewImages { folder: PathBuf, found: usize },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("cannot write {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Export(#[from] onnx::OnnxError),
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

/// The result of a finished (or interrupted) run.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub bundle: Bundle,
    pub holdout_scores: Vec<f32>,
}

fn validate(config: &TrainConfig) -> Result<(), TrainError> {
    let mut problems = Vec::new();
    if config.image_size == 0 || !config.image_size.is_multiple_of(16) {
        problems.push(format!(
            "--image-size must be a positive multiple of 16 (got {})",
            config.image_size
        ));
    }
    if config.batch_size == 0 {
        problems.push("--batch-size must be at least 1".to_string());
    }
    if config.max_images == 1 {
        problems.push(
            "--max-images must be at least 2 (one image to train on, one held out), or 0 for all"
                .to_string(),
        );
    }
    if !(0.0..=64.0).contains(&config.blur_sigma) {
        problems.push(format!(
            "--blur-sigma must be in [0, 64] pixels (got {})",
            config.blur_sigma
        ));
    }
    if config.epochs == 0 {
        problems.push("--epochs must be at least 1".to_string());
    }
    if !map::FUSION_STRIDES.contains(&config.fusion_stride) {
        problems.push(format!(
            "fusion stride must be one of {:?} (got {})",
            map::FUSION_STRIDES,
            config.fusion_stride
        ));
    }
    if !(0.0..1.0).contains(&config.holdout_fraction) {
        problems.push(format!(
            "holdout fraction must be in [0, 1) (got {})",
            config.holdout_fraction
        ));
    }
    if !(0.0..=16.0).contains(&config.head_weight) {
        problems.push(format!(
            "--head-weight must be in [0, 16] (got {})",
            config.head_weight
        ));
    }
    if config.learning_rate.is_nan() || config.learning_rate <= 0.0 {
        problems.push(format!(
            "--learning-rate must be positive (got {})",
            config.learning_rate
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Invalid(problems.join("; ")))
    }
}

/// Mean and standard deviation of the standardising fusions' terms over the held-out pyramids
/// (whitened with `whitening` when given).
fn term_stats(pyramids: &[(Pyramid, Pyramid)], whitening: Option<&Whitening>) -> MapStats {
    let mut stats = MapStatsAccumulator::default();
    for (teacher, student) in pyramids {
        stats.add(features::standardised_terms(teacher, student, whitening));
    }
    stats.finish()
}

/// The `whitened` fusion's per-scale residual mean and covariance over the held-out pyramids.
fn residual_whitening(pyramids: &[(Pyramid, Pyramid)]) -> Whitening {
    let mut moments = WhiteningAccumulator::default();
    for (teacher, student) in pyramids {
        moments.add(teacher, student);
    }
    moments.finish()
}

/// The checkpoint kept: the epoch with the lowest held-out loss.
struct Fitted {
    student: Backbone,
    /// Mean training loss and held-out loss of each completed epoch.
    epoch_losses: Vec<f32>,
    epoch_holdout_losses: Vec<f32>,
    best_epoch: usize,
    best_loss: f32,
    epochs_run: usize,
    steps_per_epoch: usize,
    interrupted: bool,
}

fn progress_bar(config: &TrainConfig, steps: usize) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} train [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Prints a line above the progress bar (also when stderr is no terminal and the bar is hidden).
fn report(progress: &ProgressBar, config: &TrainConfig, line: String) {
    if config.progress {
        progress.suspend(|| log::info!("{line}"));
    }
}

/// How many steps each epoch takes: all of the training images' batches, or, when `epochs` full
/// passes would exceed the step budget, a random share of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub epochs: usize,
    /// Batches in one full pass over the training images.
    pub batches_per_pass: usize,
    /// Batches each epoch trains on (`batches_per_pass` unless capped).
    pub steps_per_epoch: usize,
}

impl Schedule {
    pub fn new(train_images: usize, batch_size: usize, epochs: usize, max_steps: usize) -> Self {
        let batches_per_pass = train_images.div_ceil(batch_size.max(1)).max(1);
        let epochs = epochs.max(1);
        let steps_per_epoch = if max_steps == 0 || epochs * batches_per_pass <= max_steps {
            batches_per_pass
        } else {
            (max_steps / epochs).clamp(1, batches_per_pass)
        };
        Self {
            epochs,
            batches_per_pass,
            steps_per_epoch,
        }
    }

    /// Whether each epoch sees only part of the images.
    pub fn capped(&self) -> bool {
        self.steps_per_epoch < self.batches_per_pass
    }

    pub fn total_steps(&self) -> usize {
        self.epochs * self.steps_per_epoch
    }
}

/// The SGD loop on the cached teacher features.
fn fit(
    config: &TrainConfig,
    data: &Prepared,
    stop: &AtomicBool,
    report_to: &mut progress::ProgressFile,
) -> Fitted {
    let size = config.image_size;
    let train_device = data.device.clone().autodiff();
    let mut student = config.backbone.init_seeded(&train_device, config.seed);
    let mut optimizer = SgdConfig::new()
        .with_momentum(Some(MomentumConfig {
            momentum: config.momentum,
            dampening: 0.0,
            nesterov: false,
        }))
        .with_weight_decay(Some(WeightDecayConfig {
            penalty: config.weight_decay as f32,
        }))
        .init();

    let schedule = Schedule::new(
        data.train_idx.len(),
        config.batch_size,
        config.epochs,
        config.max_steps,
    );
    let batches_per_epoch = schedule.steps_per_epoch;
    if config.progress {
        let plan = if schedule.capped() {
            format!(
                "{} epochs of all {} images would take {} steps, over the {}-step budget (--max-steps): each epoch trains on a random {} of them",
                schedule.epochs,
                data.train_idx.len(),
                schedule.epochs * schedule.batches_per_pass,
                config.max_steps,
                (schedule.steps_per_epoch * config.batch_size).min(data.train_idx.len()),
            )
        } else {
            format!("each epoch trains on all {} images", data.train_idx.len())
        };
        log::info!(
            "training {} steps of {} images: {} epochs × {} steps ({plan})",
            schedule.total_steps(),
            config.batch_size,
            schedule.epochs,
            schedule.steps_per_epoch,
        );
    }
    let progress = progress_bar(config, schedule.total_steps());
    report_to.phase("training");
    let mut steps_done = 0;
    let mut rng = SplitMix::new(config.seed.wrapping_add(1));
    let mut best: Option<(usize, f32, Backbone)> = None;
    let mut epochs_run = 0;
    let mut since_best = 0;
    let (mut epoch_losses, mut epoch_holdout_losses) = (Vec::new(), Vec::new());
    'epochs: for epoch in 1..=config.epochs {
        let mut order = data.train_idx.clone();
        shuffle(&mut order, &mut rng);
        order.truncate(batches_per_epoch * config.batch_size);
        for index in &mut order {
            *index = data.draw_variant(*index, &mut rng);
        }
        let mut epoch_loss = 0.0;
        for (step, chunk) in order.chunks(config.batch_size).enumerate() {
            if stop.load(Ordering::SeqCst) {
                break 'epochs;
            }
            let teacher_batch = data.cache.batch(chunk, &train_device);
            let student_batch = student.pyramid(data.images.batch(chunk, size, &train_device));
            let loss = features::loss(&teacher_batch, &student_batch);
            let loss_value = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &student);
            let rate =
                config
                    .lr_schedule
                    .rate(config.learning_rate, steps_done, schedule.total_steps());
            student = optimizer.step(rate, student, grads);
            epoch_loss += loss_value;
            let mean_loss = epoch_loss / (step + 1) as f32;
            progress.set_message(format!(
                "epoch {epoch}/{} loss {mean_loss:.4}",
                config.epochs
            ));
            progress.inc(1);
            steps_done += 1;
            report_to.step(
                epoch,
                config.epochs,
                steps_done,
                schedule.total_steps(),
                mean_loss,
            );
        }
        epochs_run = epoch;
        let snapshot = student.valid();
        let score = data.holdout_loss(&snapshot, config);
        epoch_losses.push(epoch_loss / batches_per_epoch as f32);
        epoch_holdout_losses.push(score);
        if best
            .as_ref()
            .is_none_or(|(_, best_loss, _)| score < *best_loss)
        {
            best = Some((epoch, score, snapshot));
            since_best = 0;
        } else {
            since_best += 1;
        }
        report(
            &progress,
            config,
            format!(
                "epoch {epoch:>3}: loss {:.5}  held-out loss {score:.5}{}",
                epoch_loss / batches_per_epoch as f32,
                if since_best == 0 { "  (best)" } else { "" }
            ),
        );
        if config.patience > 0 && since_best >= config.patience {
            report(
                &progress,
                config,
                format!(
                    "no improvement for {} epochs: stopping early",
                    config.patience
                ),
            );
            break;
        }
    }
    progress.finish_and_clear();
    let interrupted = stop.load(Ordering::SeqCst);
    let (best_epoch, best_loss, student) = best.unwrap_or_else(|| {
        // Interrupted inside the first epoch: the current weights are still a usable student.
        let snapshot = student.valid();
        (0, data.holdout_loss(&snapshot, config), snapshot)
    });
    Fitted {
        student,
        epoch_losses,
        epoch_holdout_losses,
        best_epoch,
        best_loss,
        epochs_run,
        steps_per_epoch: batches_per_epoch,
        interrupted,
    }
}

/// The settings a reused student was trained with that the rest of training must share: backbone,
/// image size and seed (the held-out split).
fn adopt_student_settings(
    config: &TrainConfig,
    source: &Bundle,
) -> Result<TrainConfig, TrainError> {
    let model = &source.manifest.model;
    if model.input_size != [config.image_size, config.image_size] {
        return Err(TrainError::Invalid(format!(
            "the student of {} takes {}×{} images; --image-size is {}",
            source.dir.display(),
            model.input_size[0],
            model.input_size[1],
            config.image_size
        )));
    }
    let training = &source.manifest.training;
    let mut adopted = config.clone();
    adopted.backbone = model.backbone;
    adopted.seed = training.seed;
    // The record of the student's own training, not of this run's command line.
    adopted.batch_size = training.batch_size;
    adopted.learning_rate = training.learning_rate;
    adopted.lr_schedule = by_name(&training.lr_schedule, LrSchedule::name);
    adopted.max_steps = training.max_steps;
    adopted.max_images = training.max_images;
    adopted.augment = by_name(&training.augment, Augment::name);
    if config.progress {
        log::info!(
            "reusing the student of {} (seed {}, its held-out images stay held out)",
            source.dir.display(),
            adopted.seed
        );
    }
    Ok(adopted)
}

/// A bundle's student with its training record, in place of [`fit`]: refused when this run's
/// teacher or images are not those it was trained with (its held-out images would not be).
fn reuse_student(source: &Bundle, data: &Prepared) -> Result<Fitted, TrainError> {
    let training = &source.manifest.training;
    let mismatch = |what: String| {
        TrainError::Invalid(format!("--reuse-student {}: {what}", source.dir.display()))
    };
    if data.teacher_hash != training.teacher_weights_sha256 {
        return Err(mismatch(format!(
            "its student learnt from teacher {} (sha256 {}); this run's teacher is {} (sha256 {})",
            training.teacher_weights,
            training.teacher_weights_sha256,
            data.teacher_path.display(),
            data.teacher_hash
        )));
    }
    if !training.matches_split(
        data.train_idx.len(),
        data.holdout_idx.len(),
        data.images_found,
    ) {
        return Err(mismatch(format!(
            "it was trained on {} + {} held-out images of {}{}; {} has {} + {}{} (give --data the folder it was trained on)",
            training.n_train,
            training.n_holdout,
            training.data,
            if training.images_found > 0 {
                format!(" ({} found)", training.images_found)
            } else {
                String::new()
            },
            data.folder.display(),
            data.train_idx.len(),
            data.holdout_idx.len(),
            if data.images_found > data.train_idx.len() + data.holdout_idx.len() {
                format!(" ({} found)", data.images_found)
            } else {
                String::new()
            }
        )));
    }
    let recorded = std::fs::canonicalize(&training.data).ok();
    if recorded.is_some() && recorded != std::fs::canonicalize(&data.folder).ok() {
        log::warn!(
            "--reuse-student: the student was trained on {}, this run reads {}",
            training.data,
            data.folder.display()
        );
    }
    let student = weights::load_safetensors(
        source.manifest.model.backbone,
        &source.dir.join(bundle::STUDENT_FILE),
        &data.device,
    )?;
    Ok(Fitted {
        student,
        epoch_losses: training.epoch_losses.clone(),
        epoch_holdout_losses: training.epoch_holdout_losses.clone(),
        best_epoch: training.best_epoch,
        best_loss: training.best_holdout_loss,
        epochs_run: training.epochs_run,
        steps_per_epoch: training.steps_per_epoch,
        interrupted: training.interrupted,
    })
}

/// Files are written under a staging folder and moved into place manifest-last, so an aborted
/// run never leaves a bundle whose parts disagree.
fn write_bundle(
    config: &TrainConfig,
    data: &Prepared,
    fitted: &Fitted,
    with_head: bool,
    started: Instant,
) -> Result<(Bundle, Vec<f32>), TrainError> {
    let size = config.image_size;
    let staging = config.out.join(".staging");
    std::fs::create_dir_all(&staging).map_err(|source| TrainError::CreateDir {
        path: staging.clone(),
        source,
    })?;
    let metadata = [
        ("stpm.backbone", config.backbone.name().to_string()),
        ("stpm.fusion", config.fusion.name().to_string()),
        ("stpm.blur_sigma", config.blur_sigma.to_string()),
        ("stpm.fusion_stride", config.fusion_stride.to_string()),
    ];
    let mut map_options = config.map_options();
    let mut map_stats = None;
    if config.fusion.standardises() {
        let pyramids = data.holdout_pyramids(&fitted.student, config);
        map_options.whitening =
            (config.fusion == Fusion::Whitened).then(|| residual_whitening(&pyramids));
        let stats = term_stats(&pyramids, map_options.whitening.as_ref());
        map_options.stats = stats;
        map_stats = Some(stats);
        if with_head {
            map_options.head = Some(head::train_head(data, config, &map_options, &pyramids)?);
        }
    }
    let onnx = onnx::stpm_model(
        &data.teacher,
        &fitted.student,
        [size, size],
        &map_options,
        &metadata,
    )?;
    let bytes = onnx::write_model(&onnx, &staging.join(bundle::MODEL_FILE))?;
    let mut files = vec![bundle::MODEL_FILE, bundle::STUDENT_FILE];
    let whitening = match &map_options.whitening {
        Some(whitening) => {
            let path = staging.join(bundle::WHITENING_FILE);
            let whitening_bytes = bundle::write_whitening(whitening, &path)?;
            files.push(bundle::WHITENING_FILE);
            Some(bundle::WhiteningSection {
                file: bundle::WHITENING_FILE.to_string(),
                sha256: bundle::sha256_hex(&whitening_bytes),
            })
        }
        None => None,
    };
    let head = match &map_options.head {
        Some(defect_head) => {
            let head_bytes = bundle::write_head(defect_head, &staging.join(bundle::HEAD_FILE))?;
            files.push(bundle::HEAD_FILE);
            Some(bundle::HeadSection {
                file: bundle::HEAD_FILE.to_string(),
                sha256: bundle::sha256_hex(&head_bytes),
                logit_mean: defect_head.logit_mean,
                logit_std: defect_head.logit_std,
                weight: defect_head.weight,
            })
        }
        None => None,
    };
    weights::save_safetensors(&fitted.student, &staging.join(bundle::STUDENT_FILE))?;
    let teacher_weights = match &config.teacher {
        // A random teacher cannot be re-created from a file the user has: keep its weights.
        TeacherWeights::Random => {
            weights::save_safetensors(&data.teacher, &staging.join(bundle::TEACHER_FILE))?;
            files.push(bundle::TEACHER_FILE);
            bundle::TEACHER_FILE.to_string()
        }
        TeacherWeights::File(_) => data.teacher_path.display().to_string(),
    };

    let (calibration, holdout_scores) = holdout::from_holdout(
        &staging.join(bundle::MODEL_FILE),
        &data.images,
        &data.holdout_idx,
        size,
    )?;
    let manifest = Manifest {
        format_version: bundle::FORMAT_VERSION,
        model: ModelSection {
            backbone: config.backbone,
            layers: config
                .backbone
                .layer_names()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            input_size: [size, size],
            fusion: config.fusion,
            blur_sigma: config.blur_sigma,
            map_stats,
            whitening,
            head,
            fusion_stride: map_options.fusion_stride,
            onnx: bundle::MODEL_FILE.to_string(),
            onnx_sha256: bundle::sha256_hex(&bytes),
        },
        normalisation: data.norm,
        calibration,
        training: TrainingSummary {
            data: data.folder.display().to_string(),
            n_train: data.train_idx.len(),
            n_holdout: data.holdout_idx.len(),
            epochs_run: fitted.epochs_run,
            epoch_losses: fitted.epoch_losses.clone(),
            epoch_holdout_losses: fitted.epoch_holdout_losses.clone(),
            best_epoch: fitted.best_epoch,
            best_holdout_loss: fitted.best_loss,
            batch_size: config.batch_size,
            learning_rate: config.learning_rate,
            lr_schedule: config.lr_schedule.name().to_string(),
            seed: config.seed,
            // Up to the manifest: the defect head and the threshold included.
            seconds: started.elapsed().as_secs_f64(),
            interrupted: fitted.interrupted,
            teacher_weights,
            teacher_weights_sha256: data.teacher_hash.clone(),
            augment: config.augment.name().to_string(),
            holdout_scores: holdout_scores.clone(),
            steps_per_epoch: fitted.steps_per_epoch,
            max_steps: config.max_steps,
            images_found: data.images_found,
            max_images: config.max_images,
        },
        int8: None,
    };
    // Every byte is written before the bundle already in `out` is touched (a full disk stops the
    // run here, leaving it whole); then renames only, which need no space. The old manifest goes
    // first: until the new one lands, the folder is visibly not a bundle.
    Bundle::write_manifest(&staging, &manifest)?;
    let manifest_path = config.out.join(bundle::MANIFEST_FILE);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).map_err(|source| TrainError::CreateDir {
            path: manifest_path.clone(),
            source,
        })?;
    }
    for file in files.into_iter().chain([bundle::MANIFEST_FILE]) {
        let (from, to) = (staging.join(file), config.out.join(file));
        std::fs::rename(&from, &to).map_err(|source| TrainError::CreateDir { path: to, source })?;
    }
    let _ = std::fs::remove_dir(&staging);
    Ok((Bundle::open(&config.out)?, holdout_scores))
}

/// Trains a student and writes a complete bundle to `config.out`. `stop` ends training early
/// (Ctrl-C); the best checkpoint so far is still exported.
pub fn train(config: &TrainConfig, stop: Arc<AtomicBool>) -> Result<TrainOutcome, TrainError> {
    validate(config)?;
    let started = Instant::now();
    let mut report_to = progress::ProgressFile::new(config.progress_file.as_deref());
    report_to.phase("preparing");
    let reused = match &config.reuse_student {
        Some(dir) => Some(Bundle::open(dir)?),
        None => None,
    };
    let adopted;
    let config = match &reused {
        Some(source) => {
            adopted = adopt_student_settings(config, source)?;
            &adopted
        }
        None => config,
    };
    let data = Prepared::load(config)?;
    let fitted = match &reused {
        Some(source) => reuse_student(source, &data)?,
        None => fit(config, &data, &stop, &mut report_to),
    };
    report_to.phase("writing");
    if config.head_weight > 0.0 && !config.fusion.standardises() && config.progress {
        log::warn!(
            "--fusion {} does not standardise its terms: no defect head (only whitened and standardised take one)",
            config.fusion.name()
        );
    }
    let with_head = config.uses_head() && !stop.load(Ordering::SeqCst);
    let (bundle, holdout_scores) = write_bundle(config, &data, &fitted, with_head, started)
        .inspect_err(|_| {
            // A write that failed (a full disk) leaves no staging files behind.
            let _ = std::fs::remove_dir_all(config.out.join(".staging"));
        })?;
    report_to.phase("done");
    Ok(TrainOutcome {
        bundle,
        holdout_scores,
    })
}

#[cfg(test)]
mod tests {
    use super::prepare::{ImageSet, turn};
    use super::*;

    #[test]
    fn flips_mirror_every_channel_and_compose_to_a_half_turn() {
        // Two channels of a 2×2 image: a b / c d and 10 a, ….
        let image: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
        let mut set = ImageSet {
            pixels: vec![image],
        };
        let [h, v, both] = set.add_flips(0, 2);
        assert_eq!([h, v, both], [1, 2, 3]);
        assert_eq!(set.pixels[h], [2.0, 1.0, 4.0, 3.0, 20.0, 10.0, 40.0, 30.0]);
        assert_eq!(set.pixels[v], [3.0, 4.0, 1.0, 2.0, 30.0, 40.0, 10.0, 20.0]);
        assert_eq!(
            set.pixels[both],
            [4.0, 3.0, 2.0, 1.0, 40.0, 30.0, 20.0, 10.0]
        );
        assert_eq!(set.pixels[0], [1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn turning_four_quarters_or_mirroring_twice_is_the_identity() {
        let size = 5;
        let img: Vec<f32> = (0..3 * size * size).map(|i| i as f32).collect();
        let mut once = img.clone();
        for _ in 0..4 {
            once = turn(&once, size, 1, false);
        }
        assert_eq!(once, img);
        assert_ne!(turn(&img, size, 1, false), img);
        assert_eq!(turn(&turn(&img, size, 0, true), size, 0, true), img);
    }

    #[test]
    fn the_step_budget_caps_large_folders_only() {
        // 120 images: 15 batches of 8, 12 epochs = 180 steps, under the budget: unchanged.
        let small = Schedule::new(120, 8, 12, DEFAULT_MAX_STEPS);
        assert_eq!((small.steps_per_epoch, small.total_steps()), (15, 180));
        assert!(!small.capped());
        // 610 images: 77 batches, 12 epochs = 924 steps: capped to 33 per epoch (396 in all).
        let large = Schedule::new(610, 8, 12, DEFAULT_MAX_STEPS);
        assert_eq!(large.batches_per_pass, 77);
        assert_eq!((large.steps_per_epoch, large.total_steps()), (33, 396));
        assert!(large.capped() && large.total_steps() <= DEFAULT_MAX_STEPS);
        // 0 lifts the cap; a budget under one step per epoch still takes one.
        assert_eq!(Schedule::new(610, 8, 12, 0).total_steps(), 924);
        assert_eq!(Schedule::new(610, 8, 12, 5).steps_per_epoch, 1);
    }

    #[test]
    fn the_cosine_schedule_falls_from_the_base_rate_to_zero() {
        let cosine = LrSchedule::Cosine;
        assert_eq!(cosine.rate(0.4, 0, 180), 0.4);
        assert!((cosine.rate(0.4, 90, 180) - 0.2).abs() < 1e-12);
        let last = cosine.rate(0.4, 179, 180);
        assert!(last > 0.0 && last < 1e-4, "{last}");
        let rates: Vec<f64> = (0..180).map(|step| cosine.rate(0.4, step, 180)).collect();
        assert!(rates.windows(2).all(|w| w[1] < w[0]));
        // Past the planned steps (never in a run) it stays at 0, not rising again.
        assert_eq!(cosine.rate(0.4, 200, 180), 0.0);
        assert_eq!(LrSchedule::Constant.rate(0.4, 179, 180), 0.4);
    }
}
