//! What `stpm bench --pipeline` measures on: the camera's file, `--source`, or a conveyor file it
//! writes the way recordings are written (at the camera's `test://conveyor?size=…`, else 640×480).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::BenchError;
use crate::pipeline::config::{PipelineConfig, SourceUri};
use crate::pipeline::conveyor::{self, Conveyor};
use crate::pipeline::sinks::encoder::Encoder;
use crate::pipeline::sinks::record::{Destination, Recording};
use crate::pipeline::sinks::video::{Video, VideoSink};
use crate::pipeline::sinks::{Annotated, Sink};

/// Frame rate of the generated conveyor file: a typical line camera's (the bench decodes it as fast
/// as it can unless `realtime`).
const GENERATED_FPS: f64 = 25.0;

/// Where the measured frames come from: the camera's file, `--source` (`source`), or a generated
/// file of `frames` frames.
pub(super) fn choose_source(
    config: &PipelineConfig,
    source: Option<&str>,
    frames: usize,
    scratch: &Path,
) -> Result<(PathBuf, bool), BenchError> {
    let camera = &config.camera[0];
    if let Some(uri) = source {
        return match SourceUri::parse(uri) {
            Ok(SourceUri::File(path)) if path.is_file() => Ok((path, false)),
            Ok(SourceUri::File(path)) => Err(BenchError::Source(format!(
                "--source {uri}: {} does not exist",
                path.display()
            ))),
            Ok(_) => Err(BenchError::Source(format!(
                "--source {uri}: the bench measures a file source (file:///abs/path.mkv|.mp4); leave --source out to measure a generated conveyor file (the camera's test://conveyor size, else 640×480)"
            ))),
            Err(message) => Err(BenchError::Source(format!("--source: {message}"))),
        };
    }
    let size = match SourceUri::parse(&camera.source) {
        Ok(SourceUri::File(path)) => return Ok((path, false)),
        Ok(SourceUri::Conveyor { size, .. }) => size,
        _ => conveyor::CONVEYOR_SIZE,
    };
    let (width, height) = size;
    let path = scratch.join(format!("conveyor-{width}x{height}.mkv"));
    log::info!(
        "bench: camera {} reads {}, not a file; measuring a generated {width}×{height} conveyor file of {} frames instead (choose a file with --source file:///…)",
        camera.name,
        camera.source,
        frames
    );
    let encoder = config
        .output
        .encoder
        .parse()
        .and_then(Encoder::resolve)
        .map_err(|e| BenchError::Source(e.to_string()))?;
    write_conveyor(&path, frames as u64, GENERATED_FPS, size, &encoder)?;
    Ok((path, true))
}

/// Writes `frames` frames of the conveyor (`width`×`height`, seed 1) at `fps` as an H.264
/// Matroska file with `encoder`, the way recordings are written.
fn write_conveyor(
    path: &Path,
    frames: u64,
    fps: f64,
    (width, height): (usize, usize),
    encoder: &Encoder,
) -> Result<(), BenchError> {
    let mut conveyor = Conveyor::new(width, height, 1);
    let recording: Arc<dyn VideoSink> =
        Arc::new(Recording::to(Destination::File(path.to_path_buf())));
    let mut video = Box::new(Video::new("bench", encoder.clone(), vec![recording], None));
    let period = Duration::from_secs_f64(1.0 / fps.max(0.1));
    let error =
        |message: String| BenchError::Source(format!("writing {}: {message}", path.display()));
    for index in 0..frames {
        let generated = conveyor.frame(index);
        let frame = Annotated {
            rgb: &generated.frame.pixels,
            width,
            height,
            pts: period.mul_f64(index as f64),
            arrived: Instant::now(),
            fps,
        };
        video.frame(&frame).map_err(|e| error(e.to_string()))?;
    }
    let report = video.finish(Duration::from_secs(60));
    if let Some(problem) = report.errors.first() {
        return Err(error(problem.to_string()));
    }
    if report.files.is_empty() {
        return Err(error("no frames were written".into()));
    }
    Ok(())
}
