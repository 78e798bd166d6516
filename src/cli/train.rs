//! `stpm train`: its arguments and the run that reports the bundle written.

use std::path::PathBuf;

use anyhow::Context;
use stpm::model::{BackboneKind, Fusion};
use stpm::train::{Augment, LrSchedule, TeacherWeights, TrainConfig};

use super::stop_on_interrupt;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// An MVTec category folder (its train/good is used) or any folder of images.
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the bundle (e.g. engines/<name>).
    #[arg(long)]
    pub out: PathBuf,
    /// Teacher (and student) architecture.
    #[arg(long, value_enum, default_value_t = BackboneKind::EfficientNetLite0)]
    pub backbone: BackboneKind,
    /// Teacher weights (.pth state dict). Default for efficientnet-lite0: engines/teachers/efficientnet-lite0.pth.
    #[arg(long, conflicts_with = "random_teacher")]
    pub teacher_weights: Option<PathBuf>,
    /// Use a randomly initialised teacher (for testing the machinery only: the maps mean nothing).
    #[arg(long, hide = true)]
    pub random_teacher: bool,
    /// Passes over the training images.
    #[arg(long, default_value_t = 12)]
    pub epochs: usize,
    /// Most SGD steps in all (0: no cap). 11–17 minutes on 2 cores at the defaults: a folder
    /// whose epochs would take more trains each epoch on a random share of its images.
    #[arg(long, default_value_t = stpm::train::DEFAULT_MAX_STEPS)]
    pub max_steps: usize,
    /// Most training images (0: all): a larger folder gives this many, evenly spaced in name
    /// order (training keeps every image and its teacher features in memory, about 1.8 MB each).
    #[arg(long, default_value_t = stpm::train::DEFAULT_MAX_IMAGES)]
    pub max_images: usize,
    /// Images per SGD step (the paper uses 32; 8 gives more steps in the same time).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Square input size in pixels (a multiple of 16).
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// SGD learning rate (momentum 0.9, weight decay 1e-4, as the STPM paper).
    #[arg(long, default_value_t = 0.4)]
    pub learning_rate: f64,
    /// How the learning rate moves over the steps: cosine (from --learning-rate down to 0 at the
    /// last step), or constant (the paper).
    #[arg(long, value_enum, default_value_t = LrSchedule::Cosine)]
    pub lr_schedule: LrSchedule,
    /// Stop after this many epochs without a better held-out loss (0: run all epochs).
    #[arg(long, default_value_t = 0)]
    pub patience: usize,
    /// How per-scale maps are combined.
    #[arg(long, value_enum, default_value_t = Fusion::Whitened)]
    pub fusion: Fusion,
    /// Gaussian blur of the anomaly map, σ in pixels (0: none).
    #[arg(long, default_value_t = 4.0)]
    pub blur_sigma: f32,
    /// Also learn from mirror images of the training images (flips: left-right, top-bottom and
    /// both; one drawn per image and epoch, so training takes as long). For textures and parts
    /// whose mirror image is normal too; not where orientation is what a defect changes.
    #[arg(long, value_enum, default_value_t = Augment::None)]
    pub augment: Augment,
    /// Weight of the defect head in the anomaly map: a small classifier on the teacher's features,
    /// trained after the student on the training images with synthetic defects pasted in (stains,
    /// foreign texture, blur, thin lines). 0 leaves it out (the map is STPM's alone).
    #[arg(long, default_value_t = stpm::model::head::DEFAULT_HEAD_WEIGHT)]
    pub head_weight: f32,
    /// Reuse the student of this bundle instead of training one: the map's statistics, the defect
    /// head and the threshold are made again around it (for a bundle trained without the head, or
    /// with other map settings). Its seed is used, so its held-out images stay held out; --data
    /// must be the folder it was trained on.
    #[arg(long, value_name = "BUNDLE")]
    pub reuse_student: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Keep a JSON account of the progress in this file (phase, epoch, step, loss, ETA), rewritten
    /// about once a second: for a program that supervises the training (`stpm run`'s `POST
    /// /api/train` uses it).
    #[arg(long)]
    pub progress_file: Option<PathBuf>,
}

pub(super) fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut config = TrainConfig::new(args.data, args.out);
    config.backbone = args.backbone;
    config.teacher = match (args.teacher_weights, args.random_teacher) {
        (_, true) => TeacherWeights::Random,
        (Some(path), false) => TeacherWeights::File(path),
        (None, false) => config.teacher,
    };
    config.epochs = args.epochs;
    config.max_steps = args.max_steps;
    config.max_images = args.max_images;
    config.batch_size = args.batch_size;
    config.image_size = args.image_size;
    config.learning_rate = args.learning_rate;
    config.lr_schedule = args.lr_schedule;
    config.patience = args.patience;
    config.fusion = args.fusion;
    config.blur_sigma = args.blur_sigma;
    config.augment = args.augment;
    config.head_weight = args.head_weight;
    config.reuse_student = args.reuse_student;
    config.seed = args.seed;
    config.progress = !args.quiet;
    config.progress_file = args.progress_file;

    let stop = stop_on_interrupt(
        "\ninterrupted: finishing the current step and saving the best checkpoint (Ctrl-C again to abort)",
    )?;

    let outcome = stpm::train::train(&config, stop).context("training failed")?;
    let manifest = &outcome.bundle.manifest;
    let summary = &manifest.training;
    println!(
        "bundle written to {} ({} train / {} held-out images, best epoch {} of {}, {:.1} s{})",
        outcome.bundle.dir.display(),
        summary.n_train,
        summary.n_holdout,
        summary.best_epoch,
        summary.epochs_run,
        summary.seconds,
        if summary.interrupted {
            ", interrupted"
        } else {
            ""
        }
    );
    println!(
        "calibration: raw threshold {:.6} (= 0.5 normalised; {}), typical good image {:.3}",
        manifest.calibration.threshold,
        manifest.calibration.method,
        manifest.calibration.good_median
    );
    Ok(())
}
