//! `stpm run`: the live pipeline. Per camera, a capture thread (GStreamer or the generated
//! conveyor) feeds a bounded queue; an analyser (`analyse`) preprocesses and runs the shared
//! engine; a worker draws the overlay, feeds the alert tracker and writes the outputs, one frame
//! behind the analyser. GStreamer types stay in `source`, `record`, `rtsp` and
//! `encoder`; this module passes plain frames and owns start-up, shutdown and the run summary.

pub mod analyse;
pub mod config;
pub mod conveyor;
pub mod encoder;
#[cfg(feature = "gpu")]
mod gpu;
pub mod http;
pub mod metrics;
pub mod queue;
pub mod record;
pub mod rtsp;
pub mod servers;
pub mod source;
pub mod yuv;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::alerts::{
    AlertEvent, AlertTracker, CameraStatus, MqttSetupError, PublisherHandle, Spool, SpoolError,
    ZoneMask,
};
use crate::bundle::{Bundle, BundleError, Manifest};
use crate::engine::batch::SharedSession;
use crate::engine::{
    Engine, EngineError, EngineOptions, ExecutionProvider, ProviderRequest, Scores,
};
use crate::overlay;
use crate::preprocess::{self, RgbFrame};
use analyse::{Analysed, Analyser, Intake};
use config::{CameraConfig, PipelineConfig, RecordConfig, SourceUri};
use encoder::{Encoder, EncoderError};
use metrics::{CameraState, Stage};
use queue::{FrameQueue, Item};
use record::{Destination, Recorder};
use servers::{CameraOutputs, LiveError, LiveOutputs};
use source::{Captured, SourceSpec};
use yuv::OutputFrame;

/// Frames waiting per camera before the oldest is dropped (live and real-time sources).
const QUEUE_FRAMES: usize = 2;
/// Frames waiting per camera whose source waits for room instead (files and the conveyor with
/// `realtime = false`): one frame decoded ahead keeps the worker busy, more only add latency.
const OFFLINE_QUEUE_FRAMES: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("cannot start a thread for camera {camera}: {source}")]
    Spawn {
        camera: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Mqtt(#[from] MqttSetupError),
    #[error("cannot start the MQTT runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot create the recording folder {path}: {source}")]
    RecordDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What one camera did during the run.
#[derive(Debug, Clone, Default)]
pub struct CameraStats {
    pub camera: String,
    /// Frames the worker received.
    pub frames: u64,
    /// Frames that went through the engine.
    pub analysed: u64,
    /// Frames dropped in the queue because the worker was behind.
    pub dropped: u64,
    /// Times the source went offline.
    pub offline: u64,
    /// Alert events (new, update, end) emitted.
    pub alerts: u64,
    /// Analysed frames that shared their inference call with other cameras' frames
    /// (`model.batch`).
    pub batched: u64,
    /// Total engine time of analysed frames (each frame counts its call's time).
    pub inference: Duration,
    /// The recording's files (one, or its segments), when enabled and finished.
    pub recordings: Vec<PathBuf>,
    /// Problems that did not stop the run (recording failures).
    pub errors: Vec<String>,
    /// Every frame's stage durations, when [`RunOptions::keep_samples`] asked for them.
    pub samples: Option<metrics::StageSamples>,
    /// End-to-end latency (appsink to encoded frame) p50/p95/p99 in seconds over the last
    /// [`metrics::RECENT_FRAMES`] recorded frames; `None` when nothing was encoded.
    pub end_to_end: Option<[f64; 3]>,
}

/// How `run` reports, beyond what the pipeline file says.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Keep every frame's stage durations (for `stpm bench`) in [`CameraStats::samples`].
    pub keep_samples: bool,
    /// Print alert events as `alert {…}` lines on stdout (`stpm bench` keeps stdout for its report).
    pub print_alerts: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            keep_samples: false,
            print_alerts: true,
        }
    }
}

/// The outcome of `run`.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The execution provider the engine ran on.
    pub provider: ExecutionProvider,
    /// Why that provider (what `auto` found missing, for example).
    pub provider_reason: String,
    pub cameras: Vec<CameraStats>,
}

/// JPEG (quality 85) of an RGB frame, for snapshots.
fn jpeg(pixels: &[u8], width: usize, height: usize) -> Result<Vec<u8>, image::ImageError> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 85).encode(
        pixels,
        width as u32,
        height as u32,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(bytes)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Runs every camera until all have ended (non-looping files) or `stop` is set; recordings are
/// finished before it returns.
pub fn run(config: &PipelineConfig, stop: Arc<AtomicBool>) -> Result<RunSummary, PipelineError> {
    run_with(config, stop, RunOptions::default())
}

/// [`run`] with reporting options.
pub fn run_with(
    config: &PipelineConfig,
    stop: Arc<AtomicBool>,
    options: RunOptions,
) -> Result<RunSummary, PipelineError> {
    // Fails fast (before the bundle is read) on a provider this build or machine cannot run.
    let request: ProviderRequest = config.model.provider.parse()?;
    let plan = crate::engine::resolve_provider(request)?;
    let cpu_only = plan.candidates == [ExecutionProvider::Cpu];
    let encoder = output_encoder(config)?;
    let (mut bundle, mut precision_reason) =
        Bundle::open_choosing(&config.model.bundle, config.model.precision, cpu_only)?;
    // Sessions share out the cores only on the CPU, so size the first one for that when known.
    let first_sessions = config.model.sessions_on(cpu_only);
    let mut engine = Engine::for_bundle(&bundle, engine_options(config, request, first_sessions))?;
    let provider = engine.provider();
    let provider_reason = engine.provider_choice().reason.clone();
    let mut reopen = false;
    if !cpu_only && provider == ExecutionProvider::Cpu {
        // `auto` fell back to the CPU: `precision = "auto"` now chooses for the CPU.
        let (chosen, reason) = bundle.clone().choosing(config.model.precision, true)?;
        reopen = chosen.precision != bundle.precision;
        (bundle, precision_reason) = (chosen, reason);
    }
    // The workers read the calibration of the graph that runs.
    let mut manifest = bundle.manifest.clone();
    manifest.calibration = bundle.calibration().clone();
    let manifest = Arc::new(manifest);
    let on_cpu = provider == ExecutionProvider::Cpu;
    if !on_cpu && config.model.sessions > 1 {
        log::warn!(
            "model.sessions = {}: the {provider} provider runs one session (frame-level parallelism is for the CPU)",
            config.model.sessions
        );
    }
    let sessions = config.model.sessions_on(on_cpu);
    let mut engines = Vec::with_capacity(sessions);
    if sessions != first_sessions || reopen {
        // `auto` fell back to the CPU: re-open with the cores shared out between the sessions
        // (and the graph `precision = "auto"` chose for the CPU).
        engine = Engine::for_bundle(&bundle, engine_options(config, request, sessions))?;
    }
    engines.push(engine);
    for _ in 1..sessions {
        engines.push(Engine::for_bundle(
            &bundle,
            engine_options(config, request, sessions),
        )?);
    }
    let batch = config.model.batch_on(on_cpu, config.camera.len());
    for engine in &mut engines {
        warm_up(engine, &manifest, batch)?;
    }
    log::info!(
        "engine: ONNX Runtime, provider {provider} ({}); model {} ({}, {} ({precision_reason}), {}×{}); {}{}",
        provider_reason,
        config.model.bundle.display(),
        manifest.model.backbone,
        bundle.precision,
        manifest.model.input_size[1],
        manifest.model.input_size[0],
        match crate::engine::threads_per_session(config.model.threads, sessions) {
            0 => format!("{sessions} session(s), intra-op threads: one per core"),
            threads => format!("{sessions} session(s) × {threads} intra-op thread(s)"),
        },
        match batch {
            1 => String::new(),
            n => format!(
                "; batches of up to {n} frames across cameras (waiting at most {} ms)",
                config.model.batch_wait_ms
            ),
        }
    );
    // Which threshold alerts, and where it came from (`stpm train`'s held-out images or
    // `stpm calibrate`'s images of the line).
    log::info!(
        "threshold: raw {:.4} = 0.5 normalised ({}, {} images)",
        manifest.calibration.threshold,
        manifest.calibration.method,
        manifest.calibration.n_images
    );
    let mut live = LiveOutputs::start(
        config,
        &provider.to_string(),
        bundle.precision.name(),
        encoder.as_ref(),
    )?;
    if config.output.record.enabled {
        std::fs::create_dir_all(&config.output.record.dir).map_err(|source| {
            PipelineError::RecordDir {
                path: config.output.record.dir.clone(),
                source,
            }
        })?;
    }
    let mqtt = match &config.mqtt {
        Some(mqtt) => {
            let (runtime, handle) = start_publisher(mqtt, config)?;
            live.metrics.set_publisher(handle.clone());
            Some((runtime, handle))
        }
        None => {
            log::info!("alerts: no [mqtt] section, events are printed only");
            None
        }
    };
    let wait = Duration::from_millis(config.model.batch_wait_ms);
    let engines: Vec<Arc<SharedSession>> = engines
        .into_iter()
        .map(|engine| Arc::new(SharedSession::new(engine, batch, wait)))
        .collect();
    let model_name = config
        .model
        .bundle
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut workers = Vec::new();
    let mut analysers = Vec::new();
    let mut captures = Vec::new();
    for (index, camera) in config.camera.iter().enumerate() {
        let spawn_error = |source| PipelineError::Spawn {
            camera: camera.name.clone(),
            source,
        };
        let uri = SourceUri::parse(&camera.source).map_err(|message| PipelineError::Spawn {
            camera: camera.name.clone(),
            source: std::io::Error::other(message),
        })?;
        let live_source = matches!(uri, SourceUri::Rtsp(_) | SourceUri::V4l2(_));
        let queue = Arc::new(FrameQueue::new(if camera.realtime || live_source {
            QUEUE_FRAMES
        } else {
            OFFLINE_QUEUE_FRAMES
        }));
        let spec = SourceSpec {
            camera: camera.name.clone(),
            uri,
            looping: camera.looping,
            realtime: camera.realtime,
        };
        captures
            .push(source::spawn(spec, Arc::clone(&queue), Arc::clone(&stop)).map_err(spawn_error)?);
        // One frame between analyser and worker: the next frame is scored while this one is drawn.
        let frames = Arc::new(FrameQueue::new(1));
        let camera_outputs = live.camera(index, &camera.name);
        if options.keep_samples {
            camera_outputs.metrics.keep_samples();
        }
        // On a GPU provider the analyser preprocesses on the GPU and the worker blends there, each
        // with its own kernels and buffers (the frame is uploaded by both).
        #[cfg(feature = "gpu")]
        let (gpu_analyse, gpu_overlay) = (
            gpu::GpuStage::for_camera(provider, &camera.name, "preprocessing"),
            gpu::GpuStage::for_camera(provider, &camera.name, "overlay"),
        );
        let intake = Arc::new(Intake::new(
            Arc::clone(&queue),
            Arc::clone(&frames),
            camera.max_fps,
        ));
        #[cfg(feature = "gpu")]
        let mut gpu_analyse = gpu_analyse;
        for (number, engine) in engines.iter().enumerate() {
            let analyser = Analyser {
                manifest: Arc::clone(&manifest),
                engine: Arc::clone(engine),
                intake: Arc::clone(&intake),
                metrics: Arc::clone(&camera_outputs.metrics),
                input: Vec::new(),
                // GPU providers run one session, so one analyser per camera.
                #[cfg(feature = "gpu")]
                gpu: gpu_analyse.take(),
            };
            analysers.push(
                std::thread::Builder::new()
                    .name(format!("analyse{number}-{}", camera.name))
                    .spawn(move || analyser.run())
                    .map_err(spawn_error)?,
            );
        }
        let worker = Worker {
            camera: camera.clone(),
            tracker: AlertTracker::new(
                camera.name.clone(),
                model_name.clone(),
                camera.alerts.resolve(&config.alerts),
            ),
            zones: ZoneMask::new(
                manifest.model.input_size[1],
                manifest.model.input_size[0],
                &camera.alerts.roi,
                &camera.alerts.ignore,
            ),
            manifest: Arc::clone(&manifest),
            record: config.output.record.clone(),
            encoder: encoder.clone(),
            frames,
            queue,
            publisher: mqtt.as_ref().map(|(_, handle)| handle.clone()),
            live: camera_outputs,
            print_alerts: options.print_alerts,
            #[cfg(feature = "gpu")]
            gpu: gpu_overlay,
        };
        workers.push(
            std::thread::Builder::new()
                .name(format!("worker-{}", camera.name))
                .spawn(move || worker.run())
                .map_err(spawn_error)?,
        );
    }
    let mut cameras = Vec::new();
    for handle in workers {
        match handle.join() {
            Ok(stats) => cameras.push(stats),
            Err(_) => cameras.push(CameraStats {
                errors: vec!["worker thread panicked".into()],
                ..Default::default()
            }),
        }
    }
    // Workers end only after their analyser and capture sent End, so these joins are immediate.
    for handle in analysers.into_iter().chain(captures) {
        let _ = handle.join();
    }
    if let Some((runtime, publisher)) = mqtt {
        stop_publisher(&publisher);
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
    live.stop();
    Ok(RunSummary {
        provider,
        provider_reason,
        cameras,
    })
}

/// The encoder of the enabled video outputs (`None` when neither recordings nor RTSP are on),
/// announced once.
fn output_encoder(config: &PipelineConfig) -> Result<Option<Encoder>, EncoderError> {
    let output = &config.output;
    if !output.record.enabled && !output.rtsp.enabled {
        return Ok(None);
    }
    let encoder = Encoder::resolve(output.encoder.parse()?)?;
    log::info!("encoder: {} ({})", encoder.element(), encoder.reason());
    Ok(Some(encoder))
}

/// The settings of one of a run's `sessions` sessions: `[model]`'s threads (0: the cores shared
/// out between the sessions), and intra-op threads that sleep between calls, since decoding,
/// drawing and encoding share the cores.
pub fn engine_options(
    config: &PipelineConfig,
    request: ProviderRequest,
    sessions: usize,
) -> EngineOptions {
    EngineOptions {
        threads: crate::engine::threads_per_session(config.model.threads, sessions),
        provider: request,
        sleep_when_idle: true,
        // What TensorRT optimises for, should the session be on a GPU.
        batch: config.model.batch_on(false, config.camera.len()),
        ..EngineOptions::default()
    }
}

/// One call on a mid-grey frame (and one of a full batch, when batching), so that ONNX Runtime's
/// first-call set-up does not land on the first camera frames.
fn warm_up(engine: &mut Engine, manifest: &Manifest, batch: usize) -> Result<(), EngineError> {
    let [h, w] = manifest.model.input_size;
    let grey = preprocess::RgbFrame {
        width: w,
        height: h,
        pixels: vec![128; w * h * 3],
    };
    let input = preprocess::to_chw(&grey, [h, w], &manifest.normalisation);
    engine.run(&input, 1)?;
    if batch > 1 {
        engine.run(&input.repeat(batch), batch)?;
    }
    Ok(())
}

/// Starts the MQTT publisher on its own small tokio runtime, with the spool of `[alerts]`.
fn start_publisher(
    mqtt: &crate::alerts::MqttConfig,
    config: &PipelineConfig,
) -> Result<(tokio::runtime::Runtime, PublisherHandle), PipelineError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mqtt")
        .enable_all()
        .build()
        .map_err(PipelineError::Runtime)?;
    let spool = Spool::open(&config.alerts.spool_dir, config.alerts.spool_max_events)?;
    let pending = spool.len();
    let (handle, _task) = mqtt.clone().build(spool, runtime.handle())?;
    match handle.wait_connected(Duration::from_secs(3)) {
        Ok(()) => log::info!(
            "alerts: MQTT {} connected, topics {}/…{}",
            mqtt.broker(),
            mqtt.prefix,
            if pending > 0 {
                format!(", {pending} spooled event(s) from an earlier run being sent")
            } else {
                String::new()
            }
        ),
        Err(e) => log::warn!(
            "alerts: MQTT {} not reachable yet ({e}); events are spooled in {} and sent when it is",
            mqtt.broker(),
            config.alerts.spool_dir.display()
        ),
    }
    Ok((runtime, handle))
}

/// Gives spooled events a few seconds to reach the broker, then publishes `offline` and stops.
fn stop_publisher(publisher: &PublisherHandle) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let status = publisher.status();
        if status.events_pending == 0 || !status.connected {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = publisher.status().events_pending;
    if left > 0 {
        log::warn!("alerts: {left} event(s) stay in the spool for the next run");
    }
    let _ = publisher.shutdown(Duration::from_secs(3));
}

/// One camera's drawing, alerting and output loop.
struct Worker {
    camera: CameraConfig,
    tracker: AlertTracker,
    zones: ZoneMask,
    manifest: Arc<Manifest>,
    record: RecordConfig,
    /// The H.264 encoder, when recordings or RTSP are enabled.
    encoder: Option<Encoder>,
    /// Frames from the camera's analyser, scored or passed through.
    frames: Arc<FrameQueue<Analysed>>,
    /// The capture queue (for its count of dropped frames).
    queue: Arc<FrameQueue<Captured>>,
    /// MQTT publisher, when `[mqtt]` is configured.
    publisher: Option<PublisherHandle>,
    /// Metrics and the RTSP feed.
    live: CameraOutputs,
    /// Print alert events on stdout.
    print_alerts: bool,
    /// The overlay on the GPU, when the engine runs there.
    #[cfg(feature = "gpu")]
    gpu: Option<gpu::GpuStage>,
}

/// What the worker keeps between frames.
struct WorkerState {
    stats: CameraStats,
    recorder: Option<Recorder>,
    last_score: f32,
    /// Unix time of stream time zero (alert timestamps are stream-based).
    epoch: f64,
    last_t: f64,
    last_report: Instant,
    analysed_since_report: u64,
    /// Analysed frames per second over the last progress interval.
    fps: f32,
    /// The status last published on the state topic.
    published_status: Option<CameraStatus>,
}

impl Worker {
    fn run(mut self) -> CameraStats {
        let mut state = WorkerState {
            stats: CameraStats {
                camera: self.camera.name.clone(),
                ..Default::default()
            },
            recorder: None,
            last_score: 0.0,
            epoch: unix_now(),
            last_t: unix_now(),
            last_report: Instant::now(),
            analysed_since_report: 0,
            fps: 0.0,
            published_status: None,
        };
        log::info!(
            "[{}] stream time 0 = unix {:.3} (alert times are this plus the frame's timestamp)",
            self.camera.name,
            state.epoch
        );
        loop {
            match self.frames.pop(Duration::from_millis(200)) {
                // The analyser hands on the end marker before it stops; gone without it, it failed.
                None if Arc::strong_count(&self.frames) == 1 => {
                    state
                        .stats
                        .errors
                        .push("the analyser thread stopped".into());
                    break;
                }
                None => {}
                Some(Item::Online) => self.live.metrics.set_state(CameraState::Online),
                Some(Item::End) => break,
                Some(Item::Offline(why)) => {
                    self.live.metrics.set_state(CameraState::Offline);
                    state.stats.offline += 1;
                    let events = self.tracker.camera_offline(state.last_t);
                    self.emit(&mut state, events, None);
                    self.publish_state(&state);
                    log::warn!("[{}] offline: {why}", self.camera.name);
                }
                Some(Item::Frame(analysed)) => self.process(&mut state, analysed),
            }
            self.live.metrics.set_dropped(self.queue.dropped());
            self.report_progress(&mut state);
        }
        self.live.metrics.set_state(CameraState::Ended);
        let events = self.tracker.shutdown(state.last_t);
        self.emit(&mut state, events, None);
        state.stats.dropped = self.queue.dropped();
        if let Some(recorder) = state.recorder.take() {
            match recorder.finish(Duration::from_secs(10)) {
                Ok(files) => state.stats.recordings = files,
                Err(message) => state.stats.errors.push(message),
            }
        }
        // After the recorder has finished, every encoded frame has been timed.
        state.stats.samples = self.live.metrics.take_samples();
        state.stats.end_to_end = self.live.metrics.recent_quantiles(Stage::EndToEnd);
        state.stats
    }

    /// Publishes the retained camera state (ok / anomaly / offline, fps, score).
    fn publish_state(&self, state: &WorkerState) {
        if let Some(publisher) = &self.publisher {
            let camera_state = self.tracker.state(state.fps);
            if let Err(e) = publisher.state(&self.camera.name, &camera_state) {
                log::warn!("[{}] state not published: {e}", self.camera.name);
            }
        }
    }

    fn report_progress(&self, state: &mut WorkerState) {
        let elapsed = state.last_report.elapsed();
        if elapsed >= Duration::from_secs(5) {
            log::info!(
                "[{}] {} frames, {:.1} analysed/s, {} dropped, last score {:.2}",
                self.camera.name,
                state.stats.frames,
                state.analysed_since_report as f64 / elapsed.as_secs_f64(),
                self.queue.dropped(),
                state.last_score
            );
            state.fps = state.analysed_since_report as f32 / elapsed.as_secs_f32();
            state.last_report = Instant::now();
            state.analysed_since_report = 0;
            self.publish_state(state);
        }
    }

    /// Prints and publishes `events`; `annotated` (RGB pixels, width, height) becomes the snapshot
    /// of events that reached a new top score.
    fn emit(
        &self,
        state: &mut WorkerState,
        events: Vec<AlertEvent>,
        annotated: Option<(&[u8], usize, usize)>,
    ) {
        self.live.metrics.set_suppressed(self.tracker.suppressed());
        for event in events {
            state.stats.alerts += 1;
            self.live.metrics.alert();
            match serde_json::to_string(&event) {
                Ok(json) if self.print_alerts => println!("alert {json}"),
                Ok(_) => {}
                Err(e) => log::warn!("[{}] cannot encode an alert: {e}", self.camera.name),
            }
            let Some(publisher) = &self.publisher else {
                continue;
            };
            if let Err(e) = publisher.event(&event) {
                log::warn!("[{}] alert not spooled: {e}", self.camera.name);
                state.stats.errors.push(format!("alert not spooled: {e}"));
            }
            if let (true, Some((pixels, width, height))) = (event.snapshot, annotated) {
                match jpeg(pixels, width, height) {
                    Ok(bytes) => {
                        if let Err(e) = publisher.snapshot(&self.camera.name, bytes) {
                            log::warn!("[{}] snapshot not published: {e}", self.camera.name);
                        }
                    }
                    Err(e) => log::warn!("[{}] cannot encode a snapshot: {e}", self.camera.name),
                }
            }
        }
        let status = self.tracker.status();
        if state.published_status != Some(status) {
            state.published_status = Some(status);
            self.publish_state(state);
        }
    }

    fn process(&mut self, state: &mut WorkerState, analysed: Analysed) {
        let Analysed {
            captured,
            scores,
            inference,
            batch,
        } = analysed;
        state.stats.frames += 1;
        self.live.metrics.frame();
        let frame = &captured.frame;
        let t = state.epoch + captured.pts.as_secs_f64();
        state.last_t = t;
        let due = scores.is_some();
        let pixels = match scores {
            Some(Ok(scored)) => {
                state.stats.inference += inference;
                if batch > 1 {
                    state.stats.batched += 1;
                }
                self.annotate(state, &captured, &scored, t)
            }
            Some(Err(message)) => {
                state.stats.errors.push(message);
                frame.pixels.clone()
            }
            None => {
                let mut pixels = frame.pixels.clone();
                overlay::draw_caption(
                    &mut pixels,
                    frame.width,
                    frame.height,
                    &format!("score {:.2} (not analysed)", state.last_score),
                );
                pixels
            }
        };
        let outputs = Instant::now();
        let recording = self.encoder.as_ref().filter(|_| self.record.enabled);
        let rtsp = self.live.rtsp.as_ref().filter(|rtsp| rtsp.is_watched());
        if recording.is_some() || rtsp.is_some() {
            // One conversion for both encoders (each would otherwise run videoconvert from RGB).
            let out = yuv::for_encoder(pixels, frame.width, frame.height);
            if let Some(encoder) = recording {
                self.write_recording(state, &captured, &out, encoder);
            }
            if let Some(rtsp) = rtsp {
                rtsp.push(&out, captured.fps);
            }
        }
        if due {
            self.live.metrics.stage(Stage::Output, outputs.elapsed());
        }
    }

    /// Draws the engine's result on one frame and updates the alert tracker; returns the
    /// annotated pixels.
    fn annotate(
        &mut self,
        state: &mut WorkerState,
        captured: &Captured,
        scored: &Scores,
        t: f64,
    ) -> Vec<u8> {
        let frame = &captured.frame;
        let size = self.manifest.model.input_size;
        let overlay_started = Instant::now();
        state.stats.analysed += 1;
        state.analysed_since_report += 1;
        let manifest = Arc::clone(&self.manifest);
        let calibration = &manifest.calibration;
        let raw_score = scored.scores.first().copied().unwrap_or(0.0);
        state.last_score = calibration.normalise(raw_score);
        let normalised: Vec<f32> = scored
            .maps
            .iter()
            .map(|&v| calibration.normalise(v))
            .collect();
        let events = match self.zones.summarise(&normalised, 0.5) {
            Ok(summary) => self.tracker.observe(t, &summary),
            Err(_) => Vec::new(),
        };
        let camera = self.camera.name.clone();
        let caption = overlay::live::Caption {
            camera: &camera,
            fps: state.fps,
        };
        let pixels = match self.overlay_on_gpu(frame, &scored.maps, raw_score, &caption) {
            Some(pixels) => pixels,
            None => {
                let (pixels, error) = overlay::annotate_live(
                    frame,
                    &scored.maps,
                    size,
                    calibration,
                    raw_score,
                    &caption,
                );
                if let Some(e) = error {
                    log::warn!("[{}] {e}", self.camera.name);
                }
                pixels
            }
        };
        self.emit(state, events, Some((&pixels, frame.width, frame.height)));
        self.live
            .metrics
            .stage(Stage::Overlay, overlay_started.elapsed());
        pixels
    }

    /// The annotated frame from the GPU overlay (heatmap and mask on the GPU, outlines, boxes and
    /// caption here), or `None` for the host overlay.
    #[cfg(feature = "gpu")]
    fn overlay_on_gpu(
        &mut self,
        frame: &RgbFrame,
        map: &[f32],
        raw_score: f32,
        caption: &overlay::live::Caption,
    ) -> Option<Vec<u8>> {
        let stage = self.gpu.as_mut()?;
        let calibration = &self.manifest.calibration;
        let heat = stage
            .heat(frame, map, self.manifest.model.input_size, calibration)
            .map_err(|e| e.to_string())
            .and_then(|heat| {
                overlay::live::decorate_rgb(
                    &heat.pixels,
                    &heat.mask,
                    frame.width,
                    frame.height,
                    calibration,
                    raw_score,
                    caption,
                )
                .map_err(|e| e.to_string())
            });
        match heat {
            Ok((pixels, _boxes)) => Some(pixels),
            Err(e) => {
                log::warn!(
                    "[{}] GPU overlay failed ({e}); this camera continues on the CPU",
                    self.camera.name
                );
                self.gpu = None;
                None
            }
        }
    }

    #[cfg(not(feature = "gpu"))]
    fn overlay_on_gpu(
        &mut self,
        _frame: &RgbFrame,
        _map: &[f32],
        _raw_score: f32,
        _caption: &overlay::live::Caption,
    ) -> Option<Vec<u8>> {
        None
    }

    fn write_recording(
        &self,
        state: &mut WorkerState,
        captured: &Captured,
        out: &OutputFrame,
        encoder: &Encoder,
    ) {
        if state.recorder.is_none() {
            let destination = Destination::for_camera(
                &self.record.dir,
                &self.camera.name,
                state.epoch as u64,
                self.record.segment_seconds,
            );
            let timing = Some(Arc::clone(&self.live.metrics));
            let size = (out.width, out.height);
            match Recorder::create(
                &destination,
                size,
                out.format,
                captured.fps,
                encoder,
                timing,
            ) {
                Ok(recorder) => {
                    log::info!("[{}] recording to {destination}", self.camera.name);
                    state.recorder = Some(recorder);
                }
                Err(message) => {
                    state.stats.errors.push(message);
                    return;
                }
            }
        }
        if let Some(recorder) = state.recorder.as_mut()
            && let Err(message) = recorder.push(&out.data, captured.pts, captured.arrived)
        {
            state.stats.errors.push(message);
            state.recorder = None;
        }
    }
}
