//! `stpm bench`: its arguments and the report (engine, or a whole pipeline on a file).

use std::path::PathBuf;

use anyhow::{Context, bail};
use stpm::bundle::Precision;

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
    /// Without it, a camera that does not read a file is measured on a generated conveyor file
    /// (its test://conveyor?size=WxH, else 640×480).
    #[arg(long, requires = "pipeline")]
    pub source: Option<String>,
    /// With --pipeline: override one key, as `stpm run --set` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "pipeline")]
    pub sets: Vec<String>,
    /// With --pipeline: play the file at its frame rate, like a camera (latency at a camera's pace;
    /// frames/s is then the file's rate) instead of as fast as the pipeline goes.
    #[arg(long, requires = "pipeline")]
    pub realtime: bool,
    /// With --pipeline: serve the camera over RTSP too, on a free local port, to a client of the
    /// bench's own (what a watched stream costs beside the recording).
    #[arg(long, requires = "pipeline")]
    pub rtsp_client: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(args: BenchArgs) -> anyhow::Result<()> {
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
            rtsp_client: args.rtsp_client,
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
