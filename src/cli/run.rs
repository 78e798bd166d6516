//! `stpm run`: its arguments and the per-camera summary printed at the end.

use std::path::PathBuf;

use anyhow::{Context, bail};

use super::stop_on_interrupt;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Pipeline file, e.g. pipelines/demo.toml.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Override one key, e.g. `--set model.provider=cpu` (repeatable; after STPM__… variables).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run only this share of the file's cameras: INDEX/COUNT, e.g. 1/3 (camera k of the file
    /// belongs to shard k mod COUNT), so COUNT processes on one file split its cameras.
    #[arg(long, value_name = "INDEX/COUNT")]
    pub shard: Option<stpm::pipeline::shard::Shard>,
}

pub(super) fn run(args: RunArgs) -> anyhow::Result<()> {
    let file = stpm::pipeline::config::PipelineFile {
        path: args.pipeline.clone(),
        sets: args.sets.clone(),
        shard: args.shard,
    };
    let config = file.load()?;
    if let Some(shard) = args.shard {
        let names: Vec<&str> = config.camera.iter().map(|c| c.name.as_str()).collect();
        log::info!("shard {shard}: cameras {}", names.join(", "));
    }
    let stop =
        stop_on_interrupt("\nstopping: finishing recordings and pending alerts (again to abort)")?;
    let options = stpm::pipeline::RunOptions {
        reload_from: Some(file),
        ..Default::default()
    };
    let summary =
        stpm::pipeline::run_with(&config, stop, options).context("the pipeline failed")?;
    let mut failed = false;
    for camera in &summary.cameras {
        let mean_ms = if camera.analysed > 0 {
            camera.inference.as_secs_f64() * 1e3 / camera.analysed as f64
        } else {
            0.0
        };
        println!(
            "camera {}: {} frames, {} analysed, {} dropped, {} offline, {} alert messages ({} new {}), inference {:.1} ms/frame ({}){}",
            camera.camera,
            camera.frames,
            camera.analysed,
            camera.dropped,
            camera.offline,
            camera.alerts,
            camera.new_alerts,
            if camera.new_alerts == 1 {
                "event"
            } else {
                "events"
            },
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
        if camera.more_errors > 0 {
            eprintln!(
                "camera {}: and {} more problems (not kept)",
                camera.camera, camera.more_errors
            );
        }
    }
    if failed {
        bail!("the pipeline finished with errors (see above)");
    }
    Ok(())
}
