//! `stpm bench`: throughput and latency of a bundle on this machine, stage by stage (preprocess,
//! inference, overlay) on a synthetic 640×480 frame, against a plain ONNX Runtime session with
//! default options on the same `model.onnx` (the way an exported model is usually run), so every
//! report carries our/baseline as a ratio. Measures; never changes the bundle. `pipeline`: the
//! same questions asked of the whole `stpm run` path on a file.

pub mod pipeline;
mod rtsp_client;
mod source;

#[cfg(feature = "gpu")]
mod gpu;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bundle::{Bundle, BundleError, Precision};
use crate::engine::{Engine, EngineError, EngineOptions, ExecutionProvider, ProviderRequest};
use crate::overlay;
use crate::pipeline::conveyor::Conveyor;
use crate::preprocess;
use crate::process::{cpu_seconds, peak_rss_mb};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("GPU path: {0}")]
    Gpu(String),
    #[error(transparent)]
    Config(#[from] crate::pipeline::config::ConfigError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("{0}")]
    Source(String),
    #[error("the benchmarked pipeline failed: {0}")]
    Run(String),
    #[error("cannot create the bench's scratch folder {path}: {source}")]
    Scratch {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

#[cfg(feature = "gpu")]
impl From<crate::gpu::GpuError> for BenchError {
    fn from(error: crate::gpu::GpuError) -> Self {
        BenchError::Gpu(error.to_string())
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Timed batches per engine and round (after warm-up).
    pub frames: usize,
    /// Images per inference call.
    pub batch: usize,
    /// Intra-op threads of each of our sessions (0 = the cores shared out between the sessions).
    pub threads: usize,
    /// Our sessions, each called from its own thread at once (frame-level parallelism, as
    /// `[model] sessions` in a pipeline); the baseline stays one plain session.
    pub sessions: usize,
    /// `auto`, `cpu`, `cuda` or `tensorrt`.
    pub provider: String,
    /// The graph our session runs; the baseline always runs the fp32 `model.onnx`.
    pub precision: Precision,
}

/// Latency distribution of one stage, in milliseconds per call.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageStats {
    /// Samples (calls or frames).
    pub count: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

impl StageStats {
    fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| {
            let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(index).copied().map_or(0.0, ms)
        };
        let mean = samples.iter().map(|&d| ms(d)).sum::<f64>() / samples.len().max(1) as f64;
        Self {
            count: samples.len(),
            p50_ms: at(0.5),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            mean_ms: mean,
        }
    }
}

/// The result; `--json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// The graph our session ran: `fp32` (model.onnx) or `int8`.
    pub precision: Precision,
    pub input_size: [usize; 2],
    /// The execution provider our session ran on (what ONNX Runtime registered).
    pub provider: ExecutionProvider,
    /// Why that provider (e.g. what `auto` found missing).
    pub provider_reason: String,
    pub batch: usize,
    /// Intra-op threads of each of our sessions (0: ONNX Runtime's choice).
    pub threads: usize,
    /// Our sessions running at once, one calling thread each.
    pub sessions: usize,
    pub frames: usize,
    /// Our engine: images per second (median over rounds), all sessions together.
    pub fps: f64,
    /// Our engine: latency of one inference call.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Plain ONNX Runtime session with default options on the fp32 model.onnx, same inputs.
    pub baseline_fps: f64,
    pub baseline_p50_ms: f64,
    /// `fps / baseline_fps`.
    pub ratio_vs_baseline: f64,
    /// Per stage on a 640×480 frame: preprocess (resize + normalise), inference, overlay (OpenCV),
    /// and their sum.
    pub stages: std::collections::BTreeMap<String, StageStats>,
    /// Process CPU time / wall time during the timed runs (2.0 = both cores of this machine busy).
    pub cpu_utilisation: f64,
    /// Peak resident memory of the process (VmHWM).
    pub peak_rss_mb: f64,
    /// On a GPU provider: frames preprocessed on the GPU and read by the engine on the device.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpu_path: Vec<GpuPathReport>,
    /// Operators of our graph after ONNX Runtime's CPU optimisations (e.g. QLinearConv: INT8
    /// kernels; DequantizeLinear left over: fp32 work). Empty on GPU providers.
    pub optimised_ops: std::collections::BTreeMap<String, usize>,
}

#[cfg(feature = "gpu")]
pub use gpu::GpuPath as GpuPathReport;

/// Without the `gpu` feature there is no GPU path to report.
#[cfg(not(feature = "gpu"))]
#[derive(Debug, Clone, Serialize)]
pub struct GpuPathReport {}

/// Untimed calls before each timed series.
const WARM_UP_CALLS: usize = 3;

/// Times `frames` calls of `engine` on `input` (after 3 warm-up calls).
fn time_engine(
    engine: &mut Engine,
    input: &[f32],
    batch: usize,
    frames: usize,
) -> Result<(f64, Vec<Duration>), EngineError> {
    for _ in 0..WARM_UP_CALLS {
        engine.run(input, batch)?;
    }
    let mut samples = Vec::with_capacity(frames);
    let start = Instant::now();
    for _ in 0..frames {
        let tick = Instant::now();
        engine.run(input, batch)?;
        samples.push(tick.elapsed());
    }
    let fps = (frames * batch) as f64 / start.elapsed().as_secs_f64().max(1e-9);
    Ok((fps, samples))
}

/// Times `frames` calls on each of `engines` at once, one thread each; images/s of them together
/// and every call's latency.
fn time_engines(
    engines: &mut [Engine],
    input: &[f32],
    batch: usize,
    frames: usize,
) -> Result<(f64, Vec<Duration>), BenchError> {
    if let [engine] = engines {
        return Ok(time_engine(engine, input, batch, frames)?);
    }
    let start = Instant::now();
    let results: Vec<Result<(f64, Vec<Duration>), BenchError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = engines
            .iter_mut()
            .map(|engine| scope.spawn(move || time_engine(engine, input, batch, frames)))
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .map_err(|_| BenchError::Run("a bench thread panicked".into()))
                    .and_then(|timed| Ok(timed?))
            })
            .collect()
    });
    let wall = start.elapsed().as_secs_f64().max(1e-9);
    let mut samples = Vec::with_capacity(frames * engines.len());
    for result in results {
        samples.extend(result?.1);
    }
    // Each thread's warm-up overlaps the others' timed calls, so the wall clock covers them all.
    let calls = (samples.len() + WARM_UP_CALLS * engines.len()) as f64;
    Ok((calls * batch as f64 / wall, samples))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the benchmark: three rounds alternating our session and the plain one, then the stages.
pub fn bench(model: &Path, options: &BenchOptions) -> Result<BenchReport, BenchError> {
    if options.frames == 0 {
        return Err(BenchError::Zero("--frames"));
    }
    if options.batch == 0 {
        return Err(BenchError::Zero("--batch"));
    }
    if options.sessions == 0 {
        return Err(BenchError::Zero("--sessions"));
    }
    let request: ProviderRequest = options.provider.parse()?;
    crate::engine::resolve_provider(request)?;
    let bundle = Bundle::open_as(model, options.precision)?;
    let manifest = &bundle.manifest;
    let size = manifest.model.input_size;
    let threads = crate::engine::threads_per_session(options.threads, options.sessions);
    let mut engines = (0..options.sessions)
        .map(|_| {
            Engine::for_bundle(
                &bundle,
                EngineOptions {
                    threads,
                    provider: request,
                    batch: options.batch,
                    ..EngineOptions::default()
                },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let provider = engines[0].provider_choice().clone();
    // The baseline runs on the provider ours got, so the ratio measures our session settings.
    let mut plain = Engine::open(
        &bundle.fp32_model_path(),
        size,
        EngineOptions {
            threads: 0,
            plain: true,
            sleep_when_idle: false,
            provider: ProviderRequest::exactly(provider.provider),
            int8: false,
            int8_tensorrt: false,
            batch: options.batch,
        },
    )?;
    let frame = Conveyor::new(640, 480, 1).frame(60).frame;
    let one = preprocess::to_chw(&frame, size, &manifest.normalisation);
    let input: Vec<f32> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * options.batch)
        .collect();

    let cpu_start = cpu_seconds();
    let wall_start = Instant::now();
    let (mut our_fps, mut base_fps) = (Vec::new(), Vec::new());
    let (mut our_samples, mut base_samples) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (fps, samples) = time_engines(&mut engines, &input, options.batch, options.frames)?;
        our_fps.push(fps);
        our_samples.extend(samples);
        let (fps, samples) = time_engine(&mut plain, &input, options.batch, options.frames)?;
        base_fps.push(fps);
        base_samples.extend(samples);
    }
    let cpu_utilisation = match (cpu_start, cpu_seconds()) {
        (Some(a), Some(b)) => (b - a) / wall_start.elapsed().as_secs_f64().max(1e-9),
        _ => 0.0,
    };

    let ours = &mut engines[0];
    // Stages on one frame (batch 1), as the live pipeline runs them (one session).
    let (mut pre, mut infer, mut draw, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..options.frames {
        let t0 = Instant::now();
        let tensor = preprocess::to_chw(&frame, size, &manifest.normalisation);
        let t1 = Instant::now();
        let scored = ours.run(&tensor, 1)?;
        let t2 = Instant::now();
        let caption = overlay::live::Caption {
            camera: "bench",
            fps: 0.0,
        };
        let raw_score = scored.scores.first().copied().unwrap_or(0.0);
        overlay::annotate_live(
            &frame,
            &scored.maps,
            size,
            bundle.calibration(),
            raw_score,
            &caption,
        );
        let t3 = Instant::now();
        pre.push(t1 - t0);
        infer.push(t2 - t1);
        draw.push(t3 - t2);
        total.push(t3 - t0);
    }
    let stages = [
        ("preprocess", &mut pre),
        ("inference", &mut infer),
        ("overlay", &mut draw),
        ("end_to_end", &mut total),
    ]
    .into_iter()
    .map(|(name, samples)| (name.to_string(), StageStats::of(samples)))
    .collect();

    #[cfg(feature = "gpu")]
    let gpu_path = if provider.provider == ExecutionProvider::Cpu {
        Vec::new()
    } else {
        gpu::measure(
            ours,
            &frame,
            &manifest.normalisation,
            options.batch,
            options.frames,
        )?
    };
    #[cfg(not(feature = "gpu"))]
    let gpu_path = Vec::new();

    let ours_stats = StageStats::of(&mut our_samples);
    let base_stats = StageStats::of(&mut base_samples);
    let fps = median(&mut our_fps);
    let baseline_fps = median(&mut base_fps);
    Ok(BenchReport {
        model: model.display().to_string(),
        precision: options.precision,
        input_size: size,
        provider: provider.provider,
        provider_reason: provider.reason,
        batch: options.batch,
        threads,
        sessions: options.sessions,
        frames: options.frames,
        fps,
        p50_ms: ours_stats.p50_ms,
        p95_ms: ours_stats.p95_ms,
        p99_ms: ours_stats.p99_ms,
        baseline_fps,
        baseline_p50_ms: base_stats.p50_ms,
        ratio_vs_baseline: fps / baseline_fps.max(1e-9),
        stages,
        cpu_utilisation,
        peak_rss_mb: peak_rss_mb(),
        gpu_path,
        optimised_ops: if provider.provider == ExecutionProvider::Cpu {
            crate::engine::optimised_ops(&bundle.model_path(), bundle.precision == Precision::Int8)?
        } else {
            Default::default()
        },
    })
}

/// The human-readable report.
pub fn summary(report: &BenchReport) -> String {
    let mut text = format!(
        "model {} ({}, {}×{}), provider {} ({}), batch {}, {} session(s) × {} threads\n\
         engine   {:>8.1} images/s  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms\n\
         baseline {:>8.1} images/s  p50 {:.2} ms  (plain ONNX Runtime session, default options, fp32 model.onnx)\n\
         ratio vs baseline {:.3}\n",
        report.model,
        report.precision,
        report.input_size[1],
        report.input_size[0],
        report.provider,
        report.provider_reason,
        report.batch,
        report.sessions,
        report.threads,
        report.fps,
        report.p50_ms,
        report.p95_ms,
        report.p99_ms,
        report.baseline_fps,
        report.baseline_p50_ms,
        report.ratio_vs_baseline
    );
    text.push_str("stage (640×480 frame, batch 1)   p50 ms   p95 ms   p99 ms\n");
    for (name, s) in &report.stages {
        text.push_str(&format!(
            "{name:<32} {:>7.2}  {:>7.2}  {:>7.2}\n",
            s.p50_ms, s.p95_ms, s.p99_ms
        ));
    }
    #[cfg(feature = "gpu")]
    for path in &report.gpu_path {
        text.push_str(&format!(
            "GPU path, {} frames (upload + GPU preprocess + inference on the device), batch {}: \
             {:.1} images/s, p50 {:.2} ms/call, maps differ from the host path's by ≤ {:.1e} \
             (from batch 1 by ≤ {:.1e} relative); inference {:.2} ms/call, {:.2} ms when the \
             size alternates with 1\n",
            path.frame,
            report.batch,
            path.fps,
            path.call.p50_ms,
            path.max_abs_diff_vs_host_path,
            path.max_rel_diff_vs_batch_1,
            path.fixed_shape_ms,
            path.changing_shape_ms
        ));
    }
    text.push_str(&format!(
        "CPU utilisation {:.2} cores · peak RSS {:.0} MiB\n",
        report.cpu_utilisation, report.peak_rss_mb
    ));
    if !report.optimised_ops.is_empty() {
        let ops: Vec<String> = report
            .optimised_ops
            .iter()
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        text.push_str(&format!(
            "operators after ONNX Runtime optimisation: {}\n",
            ops.join(", ")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let stats = StageStats::of(&mut samples);
        assert_eq!(stats.p50_ms, 51.0);
        assert_eq!(stats.p95_ms, 95.0);
        assert_eq!(stats.p99_ms, 99.0);
        assert!((stats.mean_ms - 50.5).abs() < 1e-9);
    }
}
