//! `stpm export`: its arguments (INT8 ONNX or a TensorRT engine) and their reports.

use std::path::PathBuf;

use anyhow::{Context, bail};
use stpm::export::quantize::ActivationType;

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

pub(super) fn run(args: ExportArgs) -> anyhow::Result<()> {
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
