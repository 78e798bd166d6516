//! Subcommand definitions and dispatch. Each subcommand's arguments live here; the work lives in
//! the library modules they call.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use stpm::bundle::Precision;
use stpm::export::quantize::ActivationType;
use stpm::model::{BackboneKind, Fusion};
use stpm::train::{Augment, TeacherWeights, TrainConfig};

#[derive(Debug, Parser)]
#[command(
    name = "stpm",
    version,
    about = "Student-teacher anomaly detection for factory-line cameras"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Distil a student from defect-free images into a model bundle.
    Train(TrainArgs),
    /// Score a bundle on an MVTec-layout folder (image/pixel AUROC, AUPRO, F1-max, overlays, plots).
    Eval(EvalArgs),
    /// Score images with a bundle and write heatmap overlays.
    Infer(InferArgs),
    /// Set a bundle's alert threshold from good images of the deployment (its own camera and parts).
    Calibrate(CalibrateArgs),
    /// Convert a bundle's model for faster inference: INT8 ONNX, or a TensorRT engine (FP16/INT8).
    Export(ExportArgs),
    /// Run a live pipeline: capture, inference, overlay, recordings, alerts.
    Run(RunArgs),
    /// Measure throughput and latency of a bundle (or of a whole pipeline on a file) against a plain ONNX Runtime session.
    Bench(BenchArgs),
    /// Write a synthetic MVTec-layout category (textures with scratches and stains) for demos and tests.
    Devset(DevsetArgs),
}

/// What `stpm export` produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// An ONNX graph for ONNX Runtime, stored in the bundle.
    Onnx,
    /// A TensorRT engine in the bundle's engine cache (`--features gpu` build, NVIDIA GPU, TensorRT).
    Tensorrt,
}

/// Numeric precision of an exported model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportPrecision {
    /// Half precision (TensorRT only).
    Fp16,
    /// 8-bit integers: QDQ-quantised backbones, fp32 scoring.
    Int8,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Onnx)]
    pub format: ExportFormat,
    /// Precision of the exported model.
    #[arg(long, value_enum)]
    pub precision: ExportPrecision,
    /// Good images for the INT8 activation ranges: an MVTec category (its train/good) or a folder.
    /// Default: the training data recorded in the bundle's manifest.
    #[arg(long)]
    pub calib_data: Option<PathBuf>,
    /// Number of calibration images (spread evenly over the folder).
    #[arg(long, default_value_t = stpm::export::int8::DEFAULT_CALIBRATION_IMAGES)]
    pub calib_images: usize,
    /// Integer type of the quantised activations (int8-symmetric: TensorRT's kind, which
    /// `--format tensorrt --precision int8` always makes).
    #[arg(long, value_enum, default_value_t = ActivationType::Uint8)]
    pub activations: ActivationType,
    /// `--format tensorrt`: the images per call the engine is optimised for (a pipeline's
    /// `model.batch`; 1 by default); it runs 1 to 32 either way.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Output file. Default: <bundle>/model.int8.onnx, recorded in the manifest so that
    /// `--precision int8` (eval, infer, bench) and `[model] precision` (run) find it; a file outside
    /// the bundle is only written.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

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
    /// Most SGD steps in all (0: no cap). About 10 minutes on 2 cores at the defaults: a folder
    /// whose epochs would take more trains each epoch on a random share of its images.
    #[arg(long, default_value_t = stpm::train::DEFAULT_MAX_STEPS)]
    pub max_steps: usize,
    /// Images per SGD step (the paper uses 32; 8 gives more steps in the same time).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Square input size in pixels (a multiple of 16).
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// SGD learning rate (momentum 0.9, weight decay 1e-4, as the STPM paper).
    #[arg(long, default_value_t = 0.4)]
    pub learning_rate: f64,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model bundle directory (with --pipeline: instead of the file's model.bundle).
    #[arg(long, required_unless_present = "pipeline")]
    pub model: Option<PathBuf>,
    /// Timed inference calls per engine and round (3 rounds, after 3 warm-up calls); with
    /// --pipeline also the length of the generated file.
    #[arg(long, default_value_t = 60)]
    pub frames: usize,
    /// Images per inference call.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// ONNX Runtime intra-op threads of our session (0 = one per core; with --pipeline: the file's
    /// model.threads unless given).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Engine-only: this many of our sessions run at once, each called from its own thread
    /// (frame-level parallelism; threads default to the cores shared out between them). The
    /// baseline stays one plain session.
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Execution provider: auto, cpu, cuda, tensorrt (with --pipeline: the file's model.provider
    /// unless given).
    #[arg(long)]
    pub provider: Option<String>,
    /// Which of the bundle's graphs our session runs (int8: after `stpm export --precision
    /// int8`); the baseline always runs the fp32 model.onnx. With --pipeline: the file's
    /// model.precision.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Measure the real `stpm run` path of this pipeline file's first camera on a file source.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// With --pipeline: measure this file (file:///abs/path.mkv) instead of the camera's source.
    /// Without it, a camera that does not read a file is measured on a generated 640×480 file.
    #[arg(long, requires = "pipeline")]
    pub source: Option<String>,
    /// With --pipeline: override one key, as `stpm run --set` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "pipeline")]
    pub sets: Vec<String>,
    /// With --pipeline: play the file at its frame rate, like a camera (latency at a camera's pace;
    /// frames/s is then the file's rate) instead of as fast as the pipeline goes.
    #[arg(long, requires = "pipeline")]
    pub realtime: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Pipeline file, e.g. pipelines/demo.toml.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Override one key, e.g. `--set model.provider=cpu` (repeatable; after STPM__… variables).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// MVTec-layout category (test/good, test/<type>, ground_truth/<type>/<stem>_mask.png).
    #[arg(long)]
    pub data: PathBuf,
    /// Report directory: report.json, roc.png, pro.png, overlays/<type>/<stem>.png.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write each raw anomaly map at mask resolution to maps/<type>/<stem>.npy (float32).
    #[arg(long)]
    pub save_maps: bool,
    /// Execution provider: auto, cpu, cuda, tensorrt.
    #[arg(long, default_value = "auto")]
    pub provider: String,
    /// Which of the bundle's graphs to evaluate (int8: after `stpm export --precision int8`).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// Model bundle directory (its stpm.toml is updated).
    #[arg(long)]
    pub model: PathBuf,
    /// Good (defect-free) image files and/or folders of them, as the line's camera sees them.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The threshold is this quantile of their scores (1.0: the highest, so none of them alerts).
    /// Default: as `stpm train`, a Gumbel law fitted to their scores' median and 90th percentile,
    /// at 1 % false alarms (the highest score with fewer than 20 images).
    #[arg(long)]
    pub quantile: Option<f64>,
    /// Print the new thresholds without writing them.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Image files and/or folders of images.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Where to write the overlays.
    #[arg(long)]
    pub out: PathBuf,
    /// Which of the bundle's graphs to run (int8: after `stpm export --precision int8`).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
}

#[derive(Debug, clap::Args)]
pub struct DevsetArgs {
    /// Folder to write the category into (MVTec layout).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    #[arg(long, default_value_t = 60)]
    pub train: usize,
    #[arg(long, default_value_t = 20)]
    pub test_good: usize,
    #[arg(long, default_value_t = 10)]
    pub test_per_defect: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Frames of the `test://conveyor` scene (height = --size, 4:3) instead of texture crops: the
    /// training data for a model that runs on the demo pipeline.
    #[arg(long)]
    pub conveyor: bool,
}

/// The one logger: every library record (`log` crate) on stderr, set up once here. Information
/// (start lines, summaries) is printed as it is; warnings and errors carry `warning: ` / `error: `.
/// `STPM_LOG` (error, warn, info, debug, trace) sets how much; the default is info.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        match record.level() {
            log::Level::Info => eprintln!("{}", record.args()),
            log::Level::Warn => eprintln!("warning: {}", record.args()),
            log::Level::Error => eprintln!("error: {}", record.args()),
            level => eprintln!("{}: {}", level.as_str().to_lowercase(), record.args()),
        }
    }

    fn flush(&self) {}
}

/// `STPM_LOG`'s level, or info when it is unset or not a level name.
fn log_level() -> log::LevelFilter {
    std::env::var("STPM_LOG")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(log::LevelFilter::Info)
}

static LOGGER: StderrLog = StderrLog;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log_level());
    }
    match cli.command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Infer(args) => infer(args),
        Command::Calibrate(args) => calibrate(args),
        Command::Export(args) => export(args),
        Command::Run(args) => run_pipeline(args),
        Command::Bench(args) => bench(args),
        Command::Devset(args) => devset(args),
    }
}

/// A flag that the first Ctrl-C or SIGTERM sets (saying `message`); a second one exits at once
/// with status 130.
fn stop_on_interrupt(message: &'static str) -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let handler_flag = Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("{message}");
    })
    .context("cannot install the Ctrl-C/SIGTERM handler")?;
    Ok(stop)
}

fn run_pipeline(args: RunArgs) -> anyhow::Result<()> {
    let config = stpm::pipeline::config::PipelineConfig::load(&args.pipeline, &args.sets)?;
    let stop =
        stop_on_interrupt("\nstopping: finishing recordings and pending alerts (again to abort)")?;
    let summary = stpm::pipeline::run(&config, stop).context("the pipeline failed")?;
    let mut failed = false;
    for camera in &summary.cameras {
        let mean_ms = if camera.analysed > 0 {
            camera.inference.as_secs_f64() * 1e3 / camera.analysed as f64
        } else {
            0.0
        };
        println!(
            "camera {}: {} frames, {} analysed, {} dropped, {} offline, {} alert events, inference {:.1} ms/frame ({}){}",
            camera.camera,
            camera.frames,
            camera.analysed,
            camera.dropped,
            camera.offline,
            camera.alerts,
            mean_ms,
            summary.provider,
            match camera.batched {
                0 => String::new(),
                n => format!(", {n} in batches with other cameras' frames"),
            }
        );
        if let Some([p50, p95, _]) = camera.end_to_end {
            println!(
                "camera {}: end to end (appsink to encoded frame) p50 {:.1} ms, p95 {:.1} ms (last {} encoded frames at most)",
                camera.camera,
                p50 * 1e3,
                p95 * 1e3,
                stpm::pipeline::metrics::RECENT_FRAMES
            );
        }
        match camera.recordings.as_slice() {
            [] => {}
            [file] => println!("camera {}: recording {}", camera.camera, file.display()),
            [first, .., last] => println!(
                "camera {}: {} recording segments, {} … {}",
                camera.camera,
                camera.recordings.len(),
                first.display(),
                last.display()
            ),
        }
        for error in &camera.errors {
            eprintln!("camera {}: {error}", camera.camera);
            failed = true;
        }
    }
    if failed {
        bail!("the pipeline finished with errors (see above)");
    }
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(pipeline) = args.pipeline {
        if args.batch != 1 {
            bail!(
                "--batch applies to the engine-only bench; the pipeline analyses one frame at a time"
            );
        }
        if args.sessions != 1 {
            bail!(
                "--sessions applies to the engine-only bench; for the pipeline use --set model.sessions={}",
                args.sessions
            );
        }
        let options = stpm::bench::pipeline::PipelineBenchOptions {
            pipeline,
            sets: args.sets,
            model: args.model,
            source: args.source,
            frames: args.frames,
            threads: args.threads,
            provider: args.provider,
            realtime: args.realtime,
        };
        let report =
            stpm::bench::pipeline::bench_pipeline(&options).context("pipeline benchmark failed")?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", stpm::bench::pipeline::summary(&report));
        }
        return Ok(());
    }
    let Some(model) = args.model else {
        bail!("--model is required without --pipeline");
    };
    let options = stpm::bench::BenchOptions {
        frames: args.frames,
        batch: args.batch,
        threads: args.threads.unwrap_or(0),
        sessions: args.sessions,
        provider: args.provider.unwrap_or_else(|| "auto".into()),
        precision: args.precision,
    };
    let report = stpm::bench::bench(&model, &options).context("benchmark failed")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", stpm::bench::summary(&report));
    }
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let options = stpm::export::int8::Int8Options {
        calibration_data: args.calib_data.clone(),
        calibration_images: args.calib_images,
        out: args.out.clone(),
        activations: args.activations,
        progress: !args.quiet,
    };
    if args.format == ExportFormat::Onnx && args.batch != 1 {
        bail!(
            "--batch is for `--format tensorrt` (the batch a TensorRT engine is tuned for); an ONNX model takes any batch"
        );
    }
    match (args.format, args.precision) {
        (ExportFormat::Tensorrt, precision) => return export_tensorrt(&args, precision, options),
        (ExportFormat::Onnx, ExportPrecision::Fp16) => bail!(
            "`--precision fp16` is for `--format tensorrt` (a TensorRT engine); for ONNX Runtime use `--precision int8` (the bundle's model.onnx is the fp32 model)"
        ),
        (ExportFormat::Onnx, ExportPrecision::Int8) => {}
    }
    let outcome = stpm::export::int8::export_int8(&args.model, &options)
        .with_context(|| format!("INT8 export of {} failed", args.model.display()))?;
    println!(
        "INT8 model written to {} ({})",
        outcome.path.display(),
        int8_contents(&outcome, args.activations)
    );
    if let Some(n) = outcome.rewhitened_on {
        println!("residual whitening fitted again on {n} images through the INT8 graph");
    }
    match outcome.recalibrated_on {
        Some(n) => println!(
            "calibration: raw threshold {:.6} from {n} held-out good images through the INT8 graph",
            outcome.calibration.threshold
        ),
        None => println!(
            "calibration: the training split could not be reproduced from these images; the INT8 graph uses the fp32 threshold {:.6} and whitening",
            outcome.calibration.threshold
        ),
    }
    if outcome.registered {
        println!(
            "recorded in {}: use it with `--precision int8` (eval, infer, bench) or `[model] precision = \"int8\"` (run)",
            args.model.join(stpm::bundle::MANIFEST_FILE).display()
        );
    } else {
        println!("not inside the bundle, so not recorded in its manifest");
    }
    Ok(())
}

/// What an INT8 export quantised and from what, for its summary line.
fn int8_contents(outcome: &stpm::export::int8::Int8Outcome, activations: ActivationType) -> String {
    format!(
        "{} convolutions int8 per channel, {} activations {} per tensor from {} images of {}",
        outcome.quantised_convs,
        outcome.quantised_tensors,
        activations.name(),
        outcome.calibration_images,
        outcome.calibration_data.display()
    )
}

fn export_tensorrt(
    args: &ExportArgs,
    precision: ExportPrecision,
    options: stpm::export::int8::Int8Options,
) -> anyhow::Result<()> {
    use stpm::export::tensorrt::{self, TensorRtPrecision};
    if args.out.is_some() {
        bail!(
            "--out is for `--format onnx`: a TensorRT engine goes to the bundle's engine cache ({}/{})",
            args.model.display(),
            tensorrt::CACHE_DIR
        );
    }
    let precision = match precision {
        ExportPrecision::Fp16 => TensorRtPrecision::Fp16,
        ExportPrecision::Int8 => TensorRtPrecision::Int8,
    };
    if !(1..=stpm::engine::batch::MAX_BATCH).contains(&args.batch) {
        bail!(
            "--batch {}: use 1 to {}",
            args.batch,
            stpm::engine::batch::MAX_BATCH
        );
    }
    let outcome = tensorrt::export_tensorrt(&args.model, precision, &options, args.batch)
        .with_context(|| format!("TensorRT export of {} failed", args.model.display()))?;
    if let Some(int8) = &outcome.quantised {
        println!(
            "INT8 graph for TensorRT written to {} ({}); it is now the bundle's INT8 graph",
            int8.path.display(),
            int8_contents(int8, ActivationType::Int8Symmetric)
        );
    }
    println!(
        "TensorRT engine for {} built or loaded in {:.1} s ({}); cache {}:",
        outcome.model.display(),
        outcome.build_seconds,
        outcome.reason,
        outcome.cache_dir.display()
    );
    for file in &outcome.cache_files {
        println!("  {}", file.display());
    }
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let mut config = TrainConfig::new(args.data, args.out);
    config.backbone = args.backbone;
    config.teacher = match (args.teacher_weights, args.random_teacher) {
        (_, true) => TeacherWeights::Random,
        (Some(path), false) => TeacherWeights::File(path),
        (None, false) => config.teacher,
    };
    config.epochs = args.epochs;
    config.max_steps = args.max_steps;
    config.batch_size = args.batch_size;
    config.image_size = args.image_size;
    config.learning_rate = args.learning_rate;
    config.patience = args.patience;
    config.fusion = args.fusion;
    config.blur_sigma = args.blur_sigma;
    config.augment = args.augment;
    config.seed = args.seed;
    config.progress = !args.quiet;

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

fn devset(args: DevsetArgs) -> anyhow::Result<()> {
    let spec = stpm::devset::DevsetSpec {
        size: args.size,
        train: args.train,
        test_good: args.test_good,
        test_per_defect: args.test_per_defect,
        seed: args.seed,
    };
    if args.conveyor {
        stpm::pipeline::conveyor::write_conveyor_category(&args.out, &spec)
    } else {
        stpm::devset::write_category(&args.out, &spec)
    }
    .context("cannot write the data set")?;
    println!("synthetic category written to {}", args.out.display());
    Ok(())
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let options = stpm::eval::EvalOptions {
        save_maps: args.save_maps,
        progress: !args.quiet,
        provider: args.provider.parse().context("--provider")?,
        precision: args.precision,
    };
    let report = stpm::eval::evaluate(&args.model, &args.data, &args.out, &options)
        .context("evaluation failed")?;
    print!("{}", stpm::eval::summary_table(&report));
    println!(
        "report written to {}",
        args.out.join("report.json").display()
    );
    Ok(())
}

/// Fewer good images than this make a noisy maximum; `stpm calibrate` says so.
const FEW_CALIBRATION_IMAGES: usize = 20;

fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let images = stpm::infer::expand_inputs(&args.inputs)?;
    if images.is_empty() {
        bail!("no images found in {:?}", args.inputs);
    }
    if images.len() < FEW_CALIBRATION_IMAGES {
        eprintln!(
            "warning: {} good images only; a threshold from fewer than {FEW_CALIBRATION_IMAGES} is noisy",
            images.len()
        );
    }
    let options = stpm::calibrate::CalibrateOptions {
        quantile: args.quantile,
        dry_run: args.dry_run,
        progress: !args.quiet,
    };
    let outcome =
        stpm::calibrate::calibrate(&args.model, &images, &options).context("calibration failed")?;
    for graph in &outcome.graphs {
        println!(
            "{}: threshold {:.4} -> {:.4} (floor {:.4} -> {:.4}); of these {} good images, at or above the threshold: {} before, {} after",
            graph.precision.name(),
            graph.before.threshold,
            graph.after.threshold,
            graph.before.floor,
            graph.after.floor,
            graph.scores.len(),
            graph.alerting_before,
            graph.alerting_after
        );
    }
    if let Some(why) = &outcome.int8_skipped {
        println!("int8: not calibrated ({why})");
    }
    if outcome.written {
        println!(
            "written to {}",
            args.model.join(stpm::bundle::MANIFEST_FILE).display()
        );
    } else {
        println!("dry run: the bundle is unchanged");
    }
    Ok(())
}

fn infer(args: InferArgs) -> anyhow::Result<()> {
    let images = stpm::infer::expand_inputs(&args.inputs)?;
    if images.is_empty() {
        bail!("no images found in {:?}", args.inputs);
    }
    let results = stpm::infer::infer(&args.model, args.precision, &images, &args.out)
        .context("inference failed")?;
    println!("{:>10} {:>8}  image", "raw", "score");
    for result in &results {
        let flag = if result.score >= 0.5 { "  ANOMALY" } else { "" };
        println!(
            "{:>10.6} {:>8.3}  {}{flag}",
            result.raw_score,
            result.score,
            result.path.display()
        );
    }
    println!("overlays written to {}", args.out.display());
    Ok(())
}
