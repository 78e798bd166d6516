//! `stpm collect`: its arguments and the summary of what was saved.

use std::path::PathBuf;

use anyhow::Context;
use stpm::pipeline::collect::CollectOptions;

use super::stop_on_interrupt;

#[derive(Debug, clap::Args)]
pub struct CollectArgs {
    /// Pipeline file whose camera (and model, to screen out anomalies) is used.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// The camera's `name` in the pipeline file.
    #[arg(long)]
    pub camera: String,
    /// Output folder: frames go to <out>/train/good, their origin to <out>/collect.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Frames to save.
    #[arg(long, default_value_t = 150)]
    pub frames: usize,
    /// At least this many seconds of the camera's time between two saved frames.
    #[arg(long, default_value_t = 0.5)]
    pub every: f64,
    /// Frames differing from the last saved one by less than this (mean absolute difference of
    /// a small grey thumbnail, 0..1) are skipped as near-duplicates (a stopped belt).
    #[arg(long, default_value_t = 0.02)]
    pub min_change: f32,
    /// Seconds before and after an alert (the pipeline's `[alerts] k` of `m` frames scored as
    /// anomalies) in which nothing is saved; frames scored as anomalies are never saved.
    #[arg(long, default_value_t = 1.0)]
    pub margin: f64,
    /// Save frames without screening them with the pipeline's model (a line with no model yet).
    #[arg(long)]
    pub no_model: bool,
    /// Override one key of the pipeline file, as `stpm run --set`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
}

pub(super) fn run(args: CollectArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.frames > 0, "--frames must be at least 1");
    anyhow::ensure!(
        args.every.is_finite() && args.every >= 0.0,
        "--every must be 0 or more seconds"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.min_change),
        "--min-change must be between 0 and 1"
    );
    anyhow::ensure!(
        args.margin.is_finite() && args.margin >= 0.0,
        "--margin must be 0 or more seconds"
    );
    let config = stpm::pipeline::config::PipelineConfig::load(&args.pipeline, &args.sets)?;
    let stop = stop_on_interrupt("\nstopping: keeping the frames saved so far (again to abort)")?;
    // The camera's own alert rule, as `stpm run` applies it.
    let alerts = config
        .camera
        .iter()
        .find(|c| c.name == args.camera)
        .map_or_else(
            || config.alerts.clone(),
            |c| c.alerts.resolve(&config.alerts),
        );
    let options = CollectOptions {
        frames: args.frames,
        every: args.every,
        min_change: args.min_change,
        margin: args.margin,
        on_threshold: alerts.on_threshold,
        k: alerts.k,
        m: alerts.m,
        use_model: !args.no_model,
    };
    let report = stpm::pipeline::collect::collect(&config, &args.camera, &args.out, &options, stop)
        .context("collecting frames failed")?;
    println!(
        "{} of {} frames saved to {} ({} seen: {} too soon, {} near-duplicates, {} near an anomaly{})",
        report.saved.len(),
        args.frames,
        args.out.join("train/good").display(),
        report.seen,
        report.too_soon,
        report.duplicates,
        report.near_anomalies,
        match &report.model {
            Some(model) => format!("; screened by model {model}"),
            None => String::new(),
        }
    );
    anyhow::ensure!(
        !report.ended_early || !report.saved.is_empty(),
        "camera {} ended before any frame could be saved",
        args.camera
    );
    if report.ended_early {
        log::warn!(
            "camera {} ended after {} of {} frames",
            args.camera,
            report.saved.len(),
            args.frames
        );
    }
    Ok(())
}
