//! Subcommand definitions and dispatch, the one logger and the Ctrl-C handling. Each command's
//! arguments and report live in its own file here; the work lives in the library modules they call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};

mod bench;
mod calibrate;
mod collect;
mod demo;
mod devset;
mod eval;
mod export;
mod infer;
mod run;
mod train;

use bench::BenchArgs;
use calibrate::CalibrateArgs;
use collect::CollectArgs;
use demo::DemoArgs;
use devset::DevsetArgs;
use eval::EvalArgs;
use export::ExportArgs;
use infer::InferArgs;
use run::RunArgs;
use train::TrainArgs;

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
    /// Save good training frames from a camera of a pipeline file (train/good, collect.json).
    Collect(CollectArgs),
    /// Convert a bundle's model for faster inference: INT8 ONNX, or a TensorRT engine (FP16/INT8).
    Export(ExportArgs),
    /// Run a live pipeline: capture, inference, overlay, recordings, alerts.
    Run(RunArgs),
    /// Measure throughput and latency of a bundle (or of a whole pipeline on a file) against a plain ONNX Runtime session.
    Bench(BenchArgs),
    /// Write a synthetic MVTec-layout category (textures with scratches and stains) for demos and tests.
    Devset(DevsetArgs),
    /// The demo: train a small model on generated conveyor frames (first time only), then run the demo pipeline.
    Demo(DemoArgs),
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
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Infer(args) => infer::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Collect(args) => collect::run(args),
        Command::Export(args) => export::run(args),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Devset(args) => devset::run(args),
        Command::Demo(args) => demo::run(args),
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
