//! `stpm demo`: the main job on embedded defaults, from any empty folder (a container's first
//! start included): on the first run it writes conveyor training frames, trains the small demo
//! model, evaluates it and exports its INT8 graph; then it runs the demo pipeline (embedded, or
//! `--pipeline`) until Ctrl-C or `--frames`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::run::{RunArgs, run as run_pipeline};

/// The commented demo pipeline, as in the repository's `pipelines/demo.toml`.
const DEMO_PIPELINE: &str = include_str!("../../pipelines/demo.toml");

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Pipeline to run (default: the embedded demo pipeline, written to engines/demo-run.toml).
    /// Its `[model] bundle` is trained when it has no model yet.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Stop after this many frames of the generated conveyor (embedded pipeline only).
    #[arg(long)]
    pub frames: Option<u64>,
    /// Train the demo model again even when its bundle exists.
    #[arg(long)]
    pub retrain: bool,
    /// Override one key of the pipeline, e.g. `--set mqtt.host=mosquitto` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
}

pub(super) fn run(args: DemoArgs) -> anyhow::Result<()> {
    let pipeline = match &args.pipeline {
        Some(path) => {
            if args.frames.is_some() {
                bail!("--frames applies to the embedded demo pipeline; leave out --pipeline");
            }
            path.clone()
        }
        None => write_embedded(args.frames)?,
    };
    let config = stpm::pipeline::config::PipelineConfig::load(&pipeline, &args.sets)?;
    let bundle = config.model.bundle.clone();
    if args.retrain || !bundle.join(stpm::bundle::MANIFEST_FILE).is_file() {
        train_demo_model(&bundle)?;
    } else {
        log::info!(
            "demo: model {} is there (--retrain trains it again)",
            bundle.display()
        );
    }
    print_where_to_look(&config);
    run_pipeline(RunArgs {
        pipeline,
        sets: args.sets,
        shard: None,
    })
}

/// Writes the embedded pipeline to `engines/demo-run.toml`, its conveyor limited to `frames`.
fn write_embedded(frames: Option<u64>) -> anyhow::Result<PathBuf> {
    let text = match frames {
        Some(n) => DEMO_PIPELINE.replace(
            "test://conveyor\"",
            &format!("test://conveyor?frames={n}\""),
        ),
        None => DEMO_PIPELINE.to_owned(),
    };
    let path = PathBuf::from("engines/demo-run.toml");
    std::fs::create_dir_all("engines").context("cannot create engines/")?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// devset (once) → train → eval → INT8 export, each as this binary's own command.
fn train_demo_model(bundle: &Path) -> anyhow::Result<()> {
    let parent = bundle.parent().unwrap_or(Path::new("."));
    let data = parent.join("demo-conveyor");
    let report = parent.join("demo-report");
    log::info!(
        "demo: training the demo model into {} (a few minutes on 2 cores)",
        bundle.display()
    );
    if !data.join("train").join("good").is_dir() {
        stpm(&[
            "devset",
            "--conveyor",
            "--out",
            &text(&data)?,
            "--size",
            "256",
            "--train",
            "40",
            "--test-good",
            "10",
            "--test-per-defect",
            "5",
            "--seed",
            "1",
        ])?;
    }
    let bundle = text(bundle)?;
    stpm(&[
        "train",
        "--data",
        &text(&data)?,
        "--out",
        &bundle,
        "--epochs",
        "4",
        "--seed",
        "1",
    ])?;
    stpm(&[
        "eval",
        "--model",
        &bundle,
        "--data",
        &text(&data)?,
        "--out",
        &text(&report)?,
    ])?;
    // The INT8 graph (a few seconds): `precision = "auto"` runs it on the CPU.
    stpm(&[
        "export",
        "--model",
        &bundle,
        "--precision",
        "int8",
        "--quiet",
    ])
}

fn text(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Runs `stpm <args>` (this executable) and insists it succeeded.
fn stpm(args: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the stpm executable")?;
    let status = Command::new(exe)
        .args(args)
        .status()
        .with_context(|| format!("cannot start stpm {}", args[0]))?;
    if !status.success() {
        bail!("demo: stpm {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// How to watch the stream and the alerts (the run itself names the console, metrics and health
/// addresses when it starts).
fn print_where_to_look(config: &stpm::pipeline::config::PipelineConfig) {
    let camera = config.camera.first().map_or("line1", |c| c.name.as_str());
    let rtsp = &config.output.rtsp;
    if rtsp.enabled {
        log::info!(
            "  watch:   gst-launch-1.0 rtspsrc location=rtsp://{}:{}/{camera} latency=0 ! decodebin ! autovideosink",
            rtsp.bind,
            rtsp.port
        );
    }
    if let Some(mqtt) = &config.mqtt {
        log::info!(
            "  alerts:  mosquitto_sub -h {} -p {} -t '{}/#' -v",
            mqtt.host,
            mqtt.port,
            mqtt.prefix
        );
    }
}
