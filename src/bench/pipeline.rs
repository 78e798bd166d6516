//! `stpm bench --pipeline`: the real `stpm run` path (decode → preprocess → inference → overlay →
//! encode) on a file source, timed frame by frame by the pipeline's own stage timings, against the
//! engine-only throughput of a plain ONNX Runtime session on the same model in the same run. Runs
//! the pipeline self-contained: no HTTP or MQTT; the recording goes to a temporary folder; RTSP
//! only with `--rtsp-client`, served on a free local port to a client of the bench's own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::rtsp_client::{RtspWatcher, free_port};
use super::source::choose_source;
use super::{BenchError, StageStats, time_engines};
use crate::bundle::{Bundle, Precision, PrecisionChoice};
use crate::engine::{Engine, EngineOptions, ExecutionProvider, ProviderRequest};
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::conveyor::Conveyor;
use crate::pipeline::metrics::{Stage, StageSamples};
use crate::pipeline::{RunOptions, run_with};
use crate::preprocess;
use crate::process::{cpu_seconds, peak_rss_mb};

/// What `ratio_vs_baseline` means here, printed with it.
pub const RATIO_MEANING: &str = "end-to-end pipeline frames/s (decode to encoded frame) / engine-only images/s of a plain ONNX Runtime session on the bundle's fp32 model.onnx (target >= 0.85)";

/// The `stages` entry of end to end less the queue wait.
const PROCESSING: &str = "processing";

/// What to measure.
#[derive(Debug, Clone)]
pub struct PipelineBenchOptions {
    /// The pipeline file; its first camera is measured.
    pub pipeline: PathBuf,
    /// `section.key=value` overrides, as `stpm run --set`.
    pub sets: Vec<String>,
    /// Bundle instead of the file's `model.bundle`.
    pub model: Option<PathBuf>,
    /// `file:///…` instead of the camera's source.
    pub source: Option<String>,
    /// Frames of the generated file (when the camera has no file source) and timed calls of each
    /// engine-only round.
    pub frames: usize,
    /// `model.threads` override.
    pub threads: Option<usize>,
    /// `model.provider` override.
    pub provider: Option<String>,
    /// Play the file at its frame rate, like a camera, instead of as fast as the pipeline goes:
    /// latency at a camera's pace rather than under full load (throughput is then the file's rate).
    pub realtime: bool,
    /// Serve the camera over RTSP as well, to a client that connects as soon as it can (the cost
    /// of a watched stream beside the recording).
    pub rtsp_client: bool,
}

/// The result; `--json` prints it as one object. Same top-level keys as the engine-only report.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineBenchReport {
    /// `pipeline`.
    pub mode: &'static str,
    pub model: String,
    pub input_size: [usize; 2],
    pub pipeline: String,
    pub camera: String,
    /// The file measured (`file:///…`).
    pub source: String,
    /// True when the camera had no file source and a conveyor file was generated (at its
    /// `test://conveyor` size, else 640×480).
    pub source_generated: bool,
    /// True when the file played at its frame rate (`--realtime`), false when as fast as possible.
    pub realtime: bool,
    /// The execution provider the pipeline's engine ran on.
    pub provider: ExecutionProvider,
    pub provider_reason: String,
    /// The bundle's graph the pipeline and the `engine_fps` rounds ran (`model.precision`; the
    /// baseline always runs the fp32 `model.onnx`), and why (what `auto` chose).
    pub precision: Precision,
    pub precision_reason: String,
    /// `model.threads` of the run (0 = one per core, shared out between the sessions).
    pub threads: usize,
    /// Sessions of the run (`model.sessions`, 0 resolved; analysers per camera, each on its own
    /// session).
    pub sessions: usize,
    /// Frames that reached the worker, went through the engine, came out of the encoder, were
    /// dropped (always 0: the bench decodes no faster than the pipeline takes frames).
    pub frames: u64,
    pub frames_analysed: u64,
    pub frames_encoded: usize,
    pub frames_dropped: u64,
    /// Encoded frames per second, from the first frame at the appsink to the last encoded one.
    pub fps: f64,
    /// End-to-end latency: frame at the appsink → encoded frame out.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Engine only: a plain ONNX Runtime session (default options) on the same model, median of a
    /// round before and a round after the pipeline.
    pub baseline_fps: f64,
    pub baseline_p50_ms: f64,
    /// `fps / baseline_fps`; see `ratio_meaning`.
    pub ratio_vs_baseline: f64,
    pub ratio_meaning: &'static str,
    /// The plain session's images/s before and after the pipeline (their spread shows how much the
    /// machine's load changed meanwhile).
    pub baseline_rounds_fps: [f64; 2],
    /// Engine only with the pipeline's own session settings (`model.threads`, intra-op threads
    /// that sleep between calls), rounds before and after: `fps / engine_fps` is what the stages
    /// around inference cost, apart from session settings.
    pub engine_fps: f64,
    pub engine_p50_ms: f64,
    pub ratio_vs_engine: f64,
    /// `p95_ms / baseline_p50_ms` (target ≤ 2).
    pub p95_vs_engine_median: f64,
    /// The same for `processing` (end to end less the wait in the queue, which in a run as fast
    /// as possible is the previous frame's processing time).
    pub processing_p95_vs_engine_median: f64,
    /// Per stage (decode, queue, preprocess, inference, overlay, output, encode, end_to_end).
    pub stages: BTreeMap<String, StageStats>,
    /// Process CPU time / wall time over the measured span (2.0 = two cores busy).
    pub cpu_utilisation: f64,
    pub cpu_percent_of_one_core: f64,
    pub cpu_percent_of_all_cores: f64,
    pub cores: usize,
    /// Peak resident memory of the process during the pipeline run (VmHWM, reset before it).
    pub peak_rss_mb: f64,
    /// With `--rtsp-client`: the encoded frames its client received.
    pub rtsp_client_frames: Option<u64>,
    /// The measured span (first frame in → last frame out), seconds.
    pub seconds: f64,
}

/// A folder removed when the bench ends (recordings, spool, the generated source).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<Self, BenchError> {
        let path = std::env::temp_dir().join(format!("stpm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| BenchError::Scratch {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Process CPU seconds sampled every 20 ms on a thread, to read CPU use over a span known only
/// afterwards (first frame in → last frame out).
struct CpuSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, f64)>>,
}

impl CpuSampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(cpu) = cpu_seconds() {
                    samples.push((Instant::now(), cpu));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<(Instant, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// CPU seconds used between `from` and `to`, from the samples nearest to them.
fn cpu_between(samples: &[(Instant, f64)], from: Instant, to: Instant) -> Option<f64> {
    let nearest = |at: Instant| {
        samples
            .iter()
            .min_by_key(|(t, _)| if *t > at { *t - at } else { at - *t })
            .map(|&(t, cpu)| (t, cpu))
    };
    let ((t0, c0), (t1, c1)) = (nearest(from)?, nearest(to)?);
    (t1 > t0).then(|| (c1 - c0) * (to - from).as_secs_f64() / (t1 - t0).as_secs_f64())
}

/// Resets the peak RSS (VmHWM) of this process, so the next reading covers what follows.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// An engine-only round: `sessions` fresh sessions with `options`, 3 warm-up calls, `frames` timed
/// calls on each, the sessions at once from threads of their own (images/s of them all).
fn engine_round(
    bundle: &Bundle,
    options: EngineOptions,
    sessions: usize,
    frames: usize,
) -> Result<(f64, Vec<Duration>), BenchError> {
    let manifest = &bundle.manifest;
    let size = manifest.model.input_size;
    // The plain baseline always runs the fp32 graph; ours runs the pipeline's (fp32 or INT8).
    let model = if options.plain {
        bundle.fp32_model_path()
    } else {
        bundle.model_path()
    };
    let options = EngineOptions {
        int8: !options.plain && bundle.precision == crate::bundle::Precision::Int8,
        ..options
    };
    let mut engines = (0..sessions.max(1))
        .map(|_| Engine::open(&model, size, options))
        .collect::<Result<Vec<_>, _>>()?;
    let frame = Conveyor::new(640, 480, 1).frame(60).frame;
    let input = preprocess::to_chw(&frame, size, &manifest.normalisation);
    time_engines(&mut engines, &input, 1, frames)
}

/// Runs the benchmark: engine-only rounds (plain session, then the pipeline's session settings),
/// the pipeline on the file, the engine-only rounds again in reverse order.
pub fn bench_pipeline(options: &PipelineBenchOptions) -> Result<PipelineBenchReport, BenchError> {
    if options.frames == 0 {
        return Err(BenchError::Zero("--frames"));
    }
    let mut config = PipelineConfig::load(&options.pipeline, &options.sets)?;
    if let Some(model) = &options.model {
        config.model.bundle = model.clone();
    }
    if let Some(threads) = options.threads {
        config.model.threads = threads;
    }
    if let Some(provider) = &options.provider {
        config.model.provider = provider.clone();
    }
    if config.camera.len() > 1 {
        log::info!(
            "bench: measuring the first camera ({}) only",
            config.camera[0].name
        );
        config.camera.truncate(1);
    }
    let scratch = ScratchDir::create()?;
    let (video, generated) = choose_source(
        &config,
        options.source.as_deref(),
        options.frames,
        &scratch.0,
    )?;
    let source = format!("file://{}", video.display());
    // Self-contained and (unless `realtime`) unthrottled: every frame analysed and encoded, nothing
    // served.
    let camera = &mut config.camera[0];
    camera.source = source.clone();
    camera.realtime = options.realtime;
    camera.looping = false;
    camera.max_fps = 0.0;
    config.output.rtsp.enabled = options.rtsp_client;
    config.output.rtsp.bind = "127.0.0.1".into();
    config.output.rtsp.port = free_port()?;
    config.output.record.enabled = true;
    config.output.record.dir = scratch.0.join("recordings");
    config.http.enabled = false;
    config.mqtt = None;
    config.alerts.spool_dir = scratch.0.join("spool");
    config.storage.path = scratch.0.join("data");

    let request: ProviderRequest = config.model.provider.parse()?;
    let cpu_only = crate::engine::resolve_provider(request)?.candidates == [ExecutionProvider::Cpu];
    let (bundle, precision_reason) =
        Bundle::open_choosing(&config.model.bundle, config.model.precision, cpu_only)?;
    // The run takes the graph the engine rounds measure.
    config.model.precision = match bundle.precision {
        Precision::Fp32 => PrecisionChoice::Fp32,
        Precision::Int8 => PrecisionChoice::Int8,
    };
    // The pipeline's sessions run at once on the CPU (one per analyser thread).
    let our_sessions = config.model.sessions_on(cpu_only);
    let plain = EngineOptions {
        threads: 0,
        plain: true,
        sleep_when_idle: false,
        provider: request,
        int8: false,
        int8_tensorrt: false,
        batch: 1,
    };
    let ours = crate::engine::select::session_options(&config.model, request, our_sessions);
    let (plain_before, mut plain_samples) = engine_round(&bundle, plain, 1, options.frames)?;
    let (ours_before, mut our_samples) = engine_round(&bundle, ours, our_sessions, options.frames)?;

    reset_peak_rss();
    let watcher = options.rtsp_client.then(|| {
        RtspWatcher::start(format!(
            "rtsp://127.0.0.1:{}/{}",
            config.output.rtsp.port, config.camera[0].name
        ))
    });
    let sampler = CpuSampler::start();
    let summary = run_with(
        &config,
        Arc::new(AtomicBool::new(false)),
        RunOptions {
            keep_samples: true,
            print_alerts: false,
            reload_from: None,
        },
    )?;
    let cpu_samples = sampler.finish();
    let peak_rss_mb = peak_rss_mb();
    let rtsp_client_frames = watcher.map(RtspWatcher::finish);

    let (ours_after, after) = engine_round(&bundle, ours, our_sessions, options.frames)?;
    our_samples.extend(after);
    let (plain_after, after) = engine_round(&bundle, plain, 1, options.frames)?;
    plain_samples.extend(after);

    let camera = summary.cameras.into_iter().next().unwrap_or_default();
    if let Some(error) = camera.errors.first() {
        return Err(BenchError::Run(error.clone()));
    }
    let samples = camera.samples.unwrap_or_default();
    let encoded = samples.of(Stage::EndToEnd).len();
    let (seconds, cpu) = match (samples.first_in, samples.last_out) {
        (Some(first), Some(last)) if last > first => (
            (last - first).as_secs_f64(),
            cpu_between(&cpu_samples, first, last),
        ),
        _ => return Err(BenchError::Run("no frame came out of the encoder".into())),
    };
    let cpu_utilisation = cpu.map_or(0.0, |cpu| cpu / seconds);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let stages = stage_stats(&samples);
    let end_to_end = stages.get("end_to_end").cloned().unwrap_or_default();
    let fps = encoded as f64 / seconds;
    let baseline_fps = (plain_before + plain_after) / 2.0;
    let baseline = StageStats::of(&mut plain_samples);
    let engine_fps = (ours_before + ours_after) / 2.0;
    let engine = StageStats::of(&mut our_samples);
    Ok(PipelineBenchReport {
        mode: "pipeline",
        model: config.model.bundle.display().to_string(),
        input_size: bundle.manifest.model.input_size,
        pipeline: options.pipeline.display().to_string(),
        camera: camera.camera,
        source,
        source_generated: generated,
        realtime: options.realtime,
        provider: summary.provider,
        provider_reason: summary.provider_reason,
        precision: bundle.precision,
        precision_reason,
        threads: config.model.threads,
        sessions: our_sessions,
        frames: camera.frames,
        frames_analysed: camera.analysed,
        frames_encoded: encoded,
        frames_dropped: camera.dropped,
        fps,
        p50_ms: end_to_end.p50_ms,
        p95_ms: end_to_end.p95_ms,
        p99_ms: end_to_end.p99_ms,
        baseline_fps,
        baseline_p50_ms: baseline.p50_ms,
        ratio_vs_baseline: fps / baseline_fps.max(1e-9),
        ratio_meaning: RATIO_MEANING,
        baseline_rounds_fps: [plain_before, plain_after],
        engine_fps,
        engine_p50_ms: engine.p50_ms,
        ratio_vs_engine: fps / engine_fps.max(1e-9),
        p95_vs_engine_median: end_to_end.p95_ms / baseline.p50_ms.max(1e-9),
        processing_p95_vs_engine_median: stages
            .get(PROCESSING)
            .map_or(0.0, |s| s.p95_ms / baseline.p50_ms.max(1e-9)),
        stages,
        cpu_utilisation,
        cpu_percent_of_one_core: cpu_utilisation * 100.0,
        cpu_percent_of_all_cores: cpu_utilisation * 100.0 / cores as f64,
        cores,
        peak_rss_mb,
        rtsp_client_frames,
        seconds,
    })
}

/// Percentiles of every stage that has samples, and of `processing`: end to end less the time the
/// frame waited in the queue (frame by frame; both are recorded for every frame, in order).
fn stage_stats(samples: &StageSamples) -> BTreeMap<String, StageStats> {
    let mut stats: BTreeMap<String, StageStats> = Stage::ALL
        .iter()
        .filter(|&&stage| !samples.of(stage).is_empty())
        .map(|&stage| {
            let mut durations = samples.of(stage).to_vec();
            (stage.name().to_string(), StageStats::of(&mut durations))
        })
        .collect();
    let (queue, end_to_end) = (samples.of(Stage::Queue), samples.of(Stage::EndToEnd));
    if queue.len() == end_to_end.len() && !queue.is_empty() {
        let mut processing: Vec<Duration> = end_to_end
            .iter()
            .zip(queue)
            .map(|(&total, &waited)| total.saturating_sub(waited))
            .collect();
        stats.insert(PROCESSING.into(), StageStats::of(&mut processing));
    }
    stats
}

/// The human-readable report.
pub fn summary(report: &PipelineBenchReport) -> String {
    let mut text = format!(
        "pipeline {} (camera {}), source {}{}{}\n\
         model {} ({}×{}, {} ({})), provider {}, threads {}, sessions {}\n\
         frames {} in, {} analysed, {} encoded, {} dropped in {:.1} s\n\
         end to end {:>7.1} frames/s  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  (appsink → encoded frame)\n\
         engine only {:>6.1} images/s  p50 {:.2} ms  (plain ONNX Runtime session, default options; rounds {:.1}, {:.1})\n\
         ratio vs baseline {:.3}: {}\n\
         engine only {:>6.1} images/s  p50 {:.2} ms  (the pipeline's graph and session settings): ratio {:.3}\n\
         p95 end to end / engine median {:.2} (target ≤ 2); without the queue wait {:.2}\n",
        report.pipeline,
        report.camera,
        report.source,
        if report.source_generated {
            " (generated)"
        } else {
            ""
        },
        if report.realtime {
            ", played at its frame rate"
        } else {
            ", as fast as possible"
        },
        report.model,
        report.input_size[1],
        report.input_size[0],
        report.precision,
        report.precision_reason,
        report.provider,
        report.threads,
        report.sessions,
        report.frames,
        report.frames_analysed,
        report.frames_encoded,
        report.frames_dropped,
        report.seconds,
        report.fps,
        report.p50_ms,
        report.p95_ms,
        report.p99_ms,
        report.baseline_fps,
        report.baseline_p50_ms,
        report.baseline_rounds_fps[0],
        report.baseline_rounds_fps[1],
        report.ratio_vs_baseline,
        report.ratio_meaning,
        report.engine_fps,
        report.engine_p50_ms,
        report.ratio_vs_engine,
        report.p95_vs_engine_median,
        report.processing_p95_vs_engine_median,
    );
    text.push_str("stage          p50 ms   p95 ms   p99 ms  mean ms\n");
    let names = Stage::ALL.iter().map(|s| s.name()).chain([PROCESSING]);
    for name in names {
        if let Some(s) = report.stages.get(name) {
            text.push_str(&format!(
                "{:<12} {:>8.2} {:>8.2} {:>8.2} {:>8.2}\n",
                name, s.p50_ms, s.p95_ms, s.p99_ms, s.mean_ms
            ));
        }
    }
    text.push_str(&format!(
        "CPU {:.0} % of one core, {:.0} % of all {} cores · peak RSS {:.0} MiB\n",
        report.cpu_percent_of_one_core,
        report.cpu_percent_of_all_cores,
        report.cores,
        report.peak_rss_mb
    ));
    if let Some(frames) = report.rtsp_client_frames {
        text.push_str(&format!("RTSP client: {frames} encoded frames received\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_between_scales_to_the_span() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // One core busy: 1 s of CPU per second.
        let samples: Vec<(Instant, f64)> =
            (0..=10).map(|i| (at(i * 100), i as f64 * 0.1)).collect();
        let cpu = cpu_between(&samples, at(200), at(700)).unwrap_or(0.0);
        assert!((cpu - 0.5).abs() < 1e-9, "{cpu}");
        assert_eq!(cpu_between(&samples[..1], at(0), at(100)), None);
    }
}
