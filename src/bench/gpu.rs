//! `stpm bench` on a GPU provider (the `gpu` feature): the path a GPU deployment runs, timed per
//! inference call at the bench's batch size: each frame copied into pinned memory and uploaded, the
//! preprocessing kernel writing the batch tensor on the device, the engine reading it there (no
//! host round trip), the anomaly maps and scores back on the host.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BenchError, StageStats};
use crate::engine::Engine;
use crate::gpu::{GpuContext, Preprocessor, Slot, Staging};
use crate::pipeline::conveyor::Conveyor;
use crate::preprocess::raw::{self, PixelFormat, RawFrame};
use crate::preprocess::{Normalisation, RgbFrame};

/// One frame format through the GPU path.
#[derive(Debug, Clone, Serialize)]
pub struct GpuPath {
    /// The camera frame fed in, e.g. "NV12 1920x1080".
    pub frame: String,
    /// Images per second (upload + preprocessing + inference + results to the host).
    pub fps: f64,
    /// Latency of one call of `batch` images.
    pub call: StageStats,
    /// Largest difference between this path's anomaly map and the host path's (CPU preprocessing,
    /// host input tensor) on the same session and frame: the two paths must agree.
    pub max_abs_diff_vs_host_path: f32,
}

/// Times the GPU path for `frame` as RGB (the host stages' 640×480 frame) and a 1080p NV12 frame of
/// the same scene (what hardware decoders hand over), `frames` calls of `batch` images each after 3 warm-up calls.
pub(super) fn measure(
    engine: &mut Engine,
    frame: &RgbFrame,
    norm: &Normalisation,
    batch: usize,
    frames: usize,
) -> Result<Vec<GpuPath>, BenchError> {
    let gpu = GpuContext::try_new().and_then(|gpu| Preprocessor::new(&gpu))?;
    let size = engine.input_size();
    let full_hd = Conveyor::new(1920, 1080, 1).frame(60).frame;
    let mut paths = Vec::new();
    for (rgb, format) in [(frame, PixelFormat::Rgb), (&full_hd, PixelFormat::Nv12)] {
        let (layout, data) = raw::encode(rgb, format, 64);
        let raw_frame = RawFrame::new(format, rgb.width, rgb.height, layout, &data)
            .map_err(|e| BenchError::Gpu(e.to_string()))?;
        let mut staging = Staging::default();
        let mut call = |staging: &mut Staging| -> Result<Vec<f32>, BenchError> {
            for index in 0..batch {
                gpu.run_at(staging, &raw_frame, size, norm, Slot { index, batch })?;
            }
            let input = staging
                .output()
                .ok_or_else(|| BenchError::Gpu("no tensor after preprocessing".into()))?;
            Ok(engine.run_device(input, gpu.stream(), batch)?.maps)
        };
        for _ in 0..3 {
            call(&mut staging)?;
        }
        let mut samples: Vec<Duration> = Vec::with_capacity(frames);
        let start = Instant::now();
        let mut maps = Vec::new();
        for _ in 0..frames {
            let tick = Instant::now();
            maps = call(&mut staging)?;
            samples.push(tick.elapsed());
        }
        let fps = (frames * batch) as f64 / start.elapsed().as_secs_f64().max(1e-9);
        let mut host_input = vec![0.0; 3 * size[0] * size[1]];
        raw::raw_to_chw(&raw_frame, size, norm, &mut host_input);
        let host = engine.run(&host_input, 1)?.maps;
        let max_abs_diff_vs_host_path = maps
            .iter()
            .zip(&host)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        paths.push(GpuPath {
            frame: format!("{format} {}x{}", rgb.width, rgb.height),
            fps,
            call: StageStats::of(&mut samples),
            max_abs_diff_vs_host_path,
        });
    }
    Ok(paths)
}
