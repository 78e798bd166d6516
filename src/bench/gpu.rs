//! `stpm bench` on a GPU provider (the `gpu` feature): the path a GPU deployment runs, timed per
//! inference call at the bench's batch size: each frame copied into pinned memory and uploaded, the
//! preprocessing kernel writing the batch tensor on the device, the engine reading it there (no
//! host round trip), the anomaly maps and scores back on the host.

use std::time::{Duration, Instant};

use cudarc::driver::DevicePtr;

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
    /// Largest difference between this path's anomaly maps and the host path's (CPU preprocessing,
    /// host input tensor) for the same frames, a different one in each place of the batch, run in
    /// a call of the same size on the same session: the two paths must agree place by place (a
    /// frame in the wrong place, or at a wrong offset, shows here).
    pub max_abs_diff_vs_host_path: f32,
    /// Largest difference between a place's map and its frame's map run alone (host path, batch
    /// 1), relative to that map's largest value: what the batch size alone changes (the GPU
    /// libraries pick their kernels per input shape, and their rounding differs).
    pub max_rel_diff_vs_batch_1: f32,
    /// Inference alone (the tensor already on the device), mean ms per call: calls of `batch`
    /// images, and calls alternating between 1 and `batch` images (what the provider pays for a
    /// new input shape). Both 0 at batch 1.
    pub fixed_shape_ms: f64,
    pub changing_shape_ms: f64,
}

/// Calls of each kind [`GpuPath::changing_shape_ms`] is timed over.
const SHAPE_CALLS: usize = 8;

/// Times the GPU path for frames of `frame`'s size as RGB (the host stages' 640×480 frame first,
/// then conveyor frames of that size) and 1080p NV12 conveyor frames (what hardware decoders hand
/// over), `frames` calls of `batch` images each after 3 warm-up calls; then checks each place of
/// the batch against the host path and times calls whose size changes.
pub(super) fn measure(
    engine: &mut Engine,
    frame: &RgbFrame,
    norm: &Normalisation,
    batch: usize,
    frames: usize,
) -> Result<Vec<GpuPath>, BenchError> {
    let gpu = GpuContext::try_new().and_then(|gpu| Preprocessor::new(&gpu))?;
    let size = engine.input_size();
    let image_len = 3 * size[0] * size[1];
    // A different scene in each place of the batch (the belt moves between them).
    let scenes = |width: usize, height: usize, first: Option<&RgbFrame>| -> Vec<RgbFrame> {
        let mut conveyor = Conveyor::new(width, height, 1);
        (0..batch)
            .map(|index| match (index, first) {
                (0, Some(frame)) => frame.clone(),
                _ => conveyor.frame(60 + 7 * index as u64).frame,
            })
            .collect()
    };
    let mut paths = Vec::new();
    for (rgb, format) in [
        (
            scenes(frame.width, frame.height, Some(frame)),
            PixelFormat::Rgb,
        ),
        (scenes(1920, 1080, None), PixelFormat::Nv12),
    ] {
        let encoded: Vec<_> = rgb.iter().map(|f| raw::encode(f, format, 64)).collect();
        let raw_frames = rgb
            .iter()
            .zip(&encoded)
            .map(|(f, (layout, data))| RawFrame::new(format, f.width, f.height, *layout, data))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BenchError::Gpu(e.to_string()))?;
        let mut staging = Staging::default();
        let mut call = |staging: &mut Staging| -> Result<Vec<f32>, BenchError> {
            for (index, raw_frame) in raw_frames.iter().enumerate() {
                gpu.run_at(staging, raw_frame, size, norm, Slot { index, batch })?;
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

        // The host path: the same frames preprocessed on the CPU, one call of the same size.
        let mut host_input = vec![0.0; image_len * batch];
        for (raw_frame, image) in raw_frames
            .iter()
            .zip(host_input.chunks_exact_mut(image_len))
        {
            raw::raw_to_chw(raw_frame, size, norm, image);
        }
        let host = engine.run(&host_input, batch)?.maps;
        if host.len() != maps.len() || maps.is_empty() {
            return Err(BenchError::Gpu(format!(
                "the GPU path gave {} map values, the host path {}",
                maps.len(),
                host.len()
            )));
        }
        let max_abs_diff_vs_host_path = max_abs_diff(&maps, &host);
        let per_map = maps.len() / batch;
        let mut max_rel_diff_vs_batch_1 = 0.0f32;
        for (image, map) in host_input
            .chunks_exact(image_len)
            .zip(maps.chunks_exact(per_map))
        {
            let alone = engine.run(image, 1)?.maps;
            let scale = alone.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
            max_rel_diff_vs_batch_1 =
                max_rel_diff_vs_batch_1.max(max_abs_diff(map, &alone) / scale);
        }

        // Inference alone on the tensor of the last call: `batch` images each time, then 1 and
        // `batch` in turn.
        let (mut fixed_shape_ms, mut changing_shape_ms) = (0.0, 0.0);
        if batch > 1 {
            let input = staging
                .output()
                .ok_or_else(|| BenchError::Gpu("no tensor after preprocessing".into()))?;
            gpu.stream()
                .synchronize()
                .map_err(|e| BenchError::Gpu(e.to_string()))?;
            let (pointer, _record) = input.device_ptr(gpu.stream());
            // The per-image runs above left the engine at batch 1: one untimed call at `batch`.
            // SAFETY: `input` holds `batch` finished images (the stream was synchronised) and
            // outlives this call.
            unsafe { engine.run_device_at(pointer, batch * image_len, batch) }?;
            let mut mean_ms = |sizes: &dyn Fn(usize) -> usize| -> Result<f64, BenchError> {
                let tick = Instant::now();
                for call in 0..SHAPE_CALLS {
                    let n = sizes(call);
                    // SAFETY: `input` holds `batch` ≥ n finished images (the stream was
                    // synchronised) and outlives these calls.
                    unsafe { engine.run_device_at(pointer, n * image_len, n) }?;
                }
                Ok(tick.elapsed().as_secs_f64() * 1e3 / SHAPE_CALLS as f64)
            };
            fixed_shape_ms = mean_ms(&|_| batch)?;
            changing_shape_ms = mean_ms(&|call| if call % 2 == 0 { 1 } else { batch })?;
        }
        paths.push(GpuPath {
            frame: format!("{format} {}x{}", rgb[0].width, rgb[0].height),
            fps,
            call: StageStats::of(&mut samples),
            max_abs_diff_vs_host_path,
            max_rel_diff_vs_batch_1,
            fixed_shape_ms,
            changing_shape_ms,
        });
    }
    Ok(paths)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}
