//! `stpm run`: the live pipeline, sources → analysis → sinks. Per camera, a capture thread
//! (`source`: GStreamer or the generated conveyor) feeds a bounded queue; an analyser (`analyse`)
//! preprocesses and runs the shared engine; a worker (`worker`) draws the overlay, feeds the alert
//! tracker and hands frames, alerts and state to the camera's outputs (`sinks`), one frame behind
//! the analyser. This module only wires them: start-up (engines, servers, publisher, each
//! camera's sinks, threads), shutdown and the run summary.

pub mod analyse;
pub mod auth;
mod background;
pub mod collect;
pub mod collecting;
pub mod config;
pub mod conveyor;
#[cfg(feature = "gpu")]
mod gpu;
pub mod http;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod reload;
pub mod retention;
pub mod servers;
pub mod shard;
pub mod sinks;
pub mod source;
pub mod training;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::alerts::{AlertTracker, MqttSetupError, PublisherHandle, Spool, SpoolError, ZoneMask};
use crate::bundle::BundleError;
use crate::engine::select::{SelectError, Sessions};
use crate::engine::{EngineError, ExecutionProvider};
use analyse::{Analyser, Intake};
use config::{CameraConfig, PipelineConfig, SourceUri};
use queue::FrameQueue;
use servers::{CameraOutputs, LiveError, LiveOutputs};
use sinks::Sink;
use sinks::clips::clips;
use sinks::console::Console;
use sinks::encoder::{Encoder, EncoderError};
use sinks::events::EventWriter;
use sinks::mqtt::MqttAlerts;
use sinks::record::Recording;
use sinks::snapshot::Snapshots;
use sinks::video::{Video, VideoSink};
use source::SourceSpec;
use worker::Worker;

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
    Sessions(#[from] SelectError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("camera {camera}: {source}")]
    Source {
        camera: String,
        source: config::SourceUriError,
    },
    #[error("cannot start a thread for camera {camera}: {source}")]
    Spawn {
        camera: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Mqtt(#[from] MqttSetupError),
    #[error("storage.path: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot start the MQTT runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Lock(#[from] crate::store::lock::LockError),
    #[error("cannot create the recording folder {path}: {source}")]
    RecordDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Problems kept word for word per camera for the run's summary.
pub const MAX_ERRORS: usize = 50;

impl CameraStats {
    /// Keeps `error` for the summary, or counts it past [`MAX_ERRORS`].
    pub fn note_error(&mut self, error: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(error);
        } else {
            self.more_errors += 1;
        }
    }
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
    /// Alert messages (new, update, end) emitted.
    pub alerts: u64,
    /// Of those, `new` ones: the anomalies reported.
    pub new_alerts: u64,
    /// Analysed frames that shared their inference call with other cameras' frames
    /// (`model.batch`).
    pub batched: u64,
    /// Total engine time of analysed frames (each frame counts its call's time).
    pub inference: Duration,
    /// The recording's files (one, or its segments), when enabled and finished.
    pub recordings: Vec<PathBuf>,
    /// Problems that did not stop the run (recording failures), the first [`MAX_ERRORS`].
    pub errors: Vec<String>,
    /// Problems after the first [`MAX_ERRORS`], counted only (a camera failing every frame for
    /// months must not grow without bound).
    pub more_errors: u64,
    /// Every frame's stage durations, when [`RunOptions::keep_samples`] asked for them.
    pub samples: Option<metrics::StageSamples>,
    /// End-to-end latency (appsink to encoded frame) p50/p95/p99 in seconds over the last
    /// [`metrics::RECENT_FRAMES`] recorded frames; `None` when nothing was encoded.
    pub end_to_end: Option<[f64; 3]>,
}

/// How `run` reports, beyond what the pipeline file says.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Keep every frame's stage durations (for `stpm bench`) in [`CameraStats::samples`].
    pub keep_samples: bool,
    /// Print alert events as `alert {…}` lines on stdout (`stpm bench` keeps stdout for its report).
    pub print_alerts: bool,
    /// The pipeline file, `--set` overrides and shard it was loaded with: SIGHUP reads it again
    /// and applies the cameras' alert settings (`None`: SIGHUP is not caught).
    pub reload_from: Option<config::PipelineFile>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            keep_samples: false,
            print_alerts: true,
            reload_from: None,
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
    // First, so a second instance on the same folders fails at once.
    let _locks = lock_folders(config)?;
    if options.reload_from.is_some() {
        // Before the slow start (the model), so an early SIGHUP does not end the run.
        reload::catch_hangup();
    }
    let encoder = output_encoder(config)?;
    let opened = Sessions::open(&config.model)?;
    let (provider, batch, sessions) = (opened.provider, opened.batch, opened.engines.len());
    let provider_reason = opened.provider_reason.clone();
    let precision_reason = opened.precision_reason.clone();
    let models = Arc::new(model::ModelSlot::new(&config.model, opened));
    let first = Arc::clone(&models.live().model);
    let manifest = &first.manifest;
    log::info!(
        "engine: ONNX Runtime, provider {provider} ({}); model {} (id {}, {}, {} ({precision_reason}), {}×{}); {}{}",
        provider_reason,
        config.model.bundle.display(),
        first.id,
        manifest.model.backbone,
        first.precision,
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
    if provider != ExecutionProvider::Cpu {
        announce_decoders(config);
    }
    let mut live = LiveOutputs::start(
        config,
        &provider.to_string(),
        Arc::clone(&models),
        encoder.as_ref(),
    )?;
    models.report_to(Arc::clone(&live.metrics));
    if config.output.record.enabled {
        std::fs::create_dir_all(&config.output.record.dir).map_err(|source| {
            PipelineError::RecordDir {
                path: config.output.record.dir.clone(),
                source,
            }
        })?;
    }
    // The store first: the events API, already served, answers from it (the publisher may
    // wait a few seconds for its broker).
    let events = if config.storage.enabled {
        let writer = EventWriter::start(&config.storage, Some(live.changes()))?;
        live.metrics.set_event_store(writer.status());
        Some(writer)
    } else {
        log::info!("storage: off (storage.enabled = false), events are not kept");
        None
    };
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
    live.metrics
        .set_disk_folders(retention::written_folders(config));
    let retention = retention::Retention::start(config, Arc::clone(&live.metrics));
    let shared = SharedOutputs {
        config,
        events: events.as_ref(),
        encoder: encoder.as_ref(),
        publisher: mqtt.as_ref().map(|(_, handle)| handle),
        print_alerts: options.print_alerts,
    };
    let mut workers = Vec::new();
    let mut analysers = Vec::new();
    let mut captures = Vec::new();
    let mut inboxes = Vec::new();
    for (index, camera) in config.camera.iter().enumerate() {
        let spawn_error = |source| PipelineError::Spawn {
            camera: camera.name.clone(),
            source,
        };
        let uri = SourceUri::parse(&camera.source).map_err(|source| PipelineError::Source {
            camera: camera.name.clone(),
            source,
        })?;
        let live_source = matches!(uri, SourceUri::Rtsp(_) | SourceUri::V4l2(_));
        let queue = Arc::new(FrameQueue::new(if camera.realtime || live_source {
            QUEUE_FRAMES
        } else {
            OFFLINE_QUEUE_FRAMES
        }));
        let spec = SourceSpec::for_camera(camera, uri);
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
        for number in 0..sessions {
            let analyser = Analyser {
                models: Arc::clone(&models),
                number,
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
        let epoch = unix_now();
        let worker = Worker {
            camera: camera.clone(),
            tracker: AlertTracker::new(
                camera.name.clone(),
                first.id.clone(),
                camera.alerts.resolve(&config.alerts),
            ),
            zones: ZoneMask::new(
                manifest.model.input_size[1],
                manifest.model.input_size[0],
                &camera.alerts.roi,
                &camera.alerts.ignore,
            ),
            model: Arc::clone(&first),
            frames,
            queue,
            epoch,
            metrics: Arc::clone(&camera_outputs.metrics),
            collect: camera_outputs.collect.clone(),
            sinks: camera_sinks(camera, epoch, camera_outputs, &shared),
            settings: {
                let inbox = reload::Inbox::default();
                inboxes.push((camera.name.clone(), Arc::clone(&inbox)));
                inbox
            },
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
    let reloader = match options.reload_from {
        Some(file) => reload::Reloader::start(
            file,
            config.clone(),
            inboxes,
            Arc::clone(&models),
            live.auth(),
        )
        .map_err(|e| log::warn!("reload: cannot watch for SIGHUP: {e}"))
        .ok(),
        None => None,
    };
    let watch = if config.model.watch {
        log::info!(
            "model: watching {} (model.watch): a changed stpm.toml is swapped in",
            config.model.bundle.display()
        );
        model::Watch::start(Arc::clone(&models))
            .map_err(|e| log::warn!("model: cannot watch the bundle: {e}"))
            .ok()
    } else {
        None
    };
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
    if let Some(reloader) = reloader {
        reloader.stop();
    }
    if let Some(watch) = watch {
        watch.stop();
    }
    if let Some(events) = events {
        events.finish();
    }
    if let Some(retention) = retention {
        retention.stop();
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

/// Locks the run's data folders: the event store's (`[storage] path`) and, with `[mqtt]`, the
/// spool's when it is elsewhere. Held until the run returns.
fn lock_folders(
    config: &PipelineConfig,
) -> Result<Vec<crate::store::lock::FolderLock>, PipelineError> {
    use crate::store::lock::FolderLock;
    let mut locks: Vec<FolderLock> = Vec::new();
    if config.storage.enabled {
        locks.push(FolderLock::acquire(&config.storage.path, "storage.path")?);
    }
    if config.mqtt.is_some() {
        let spool = &config.alerts.spool_dir;
        std::fs::create_dir_all(spool).map_err(|source| crate::store::lock::LockError::Io {
            key: "alerts.spool_dir".into(),
            folder: spool.clone(),
            source,
        })?;
        let canonical = |path: &std::path::Path| path.canonicalize().ok();
        let inside = locks.iter().any(|lock| {
            canonical(spool)
                .zip(canonical(lock.folder()))
                .is_some_and(|(spool, data)| spool.starts_with(data))
        });
        if !inside {
            locks.push(FolderLock::acquire(spool, "alerts.spool_dir")?);
        }
    }
    Ok(locks)
}

/// What every camera's sinks share.
struct SharedOutputs<'a> {
    config: &'a PipelineConfig,
    /// The event store's writer, when `[storage]` is on.
    events: Option<&'a EventWriter>,
    /// The H.264 encoder, when recordings or RTSP are on.
    encoder: Option<&'a Encoder>,
    publisher: Option<&'a PublisherHandle>,
    print_alerts: bool,
}

/// The outputs of one camera (its stream time 0 was unix time `epoch`), in the order the worker
/// calls them: stdout, MQTT events and snapshots, the event store, clips, then the video (one encode for the
/// recording and the RTSP feed).
fn camera_sinks(
    config: &CameraConfig,
    epoch: f64,
    own: CameraOutputs,
    shared: &SharedOutputs,
) -> Vec<Box<dyn Sink>> {
    let camera = config.name.as_str();
    let started = epoch as u64;
    let clip_config = config.clips.resolve(&shared.config.clips);
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if shared.print_alerts {
        sinks.push(Box::new(Console));
    }
    if let Some(publisher) = shared.publisher {
        let served = (shared.events.is_some() && shared.config.http.enabled).then_some(
            crate::pipeline::sinks::mqtt::Served {
                clips: clip_config.enabled,
            },
        );
        sinks.push(Box::new(MqttAlerts::new(camera, publisher.clone(), served)));
        sinks.push(Box::new(Snapshots::new(camera, publisher.clone())));
    }
    if let Some(log) = shared.events.and_then(|writer| writer.sink(camera)) {
        sinks.push(Box::new(log));
    }
    let mut video: Vec<Arc<dyn VideoSink>> = Vec::new();
    let clip_log = shared.events.and_then(EventWriter::clip_log);
    if let (true, Some(log)) = (clip_config.enabled, clip_log) {
        let (alerts, feed) = clips(camera, &clip_config, epoch, log);
        sinks.push(Box::new(alerts));
        video.push(Arc::new(feed));
    }
    let record = &shared.config.output.record;
    if record.enabled {
        video.push(Arc::new(Recording::new(camera, record, started)));
    }
    if let Some(feed) = own.rtsp {
        video.push(Arc::new(feed));
    }
    if let Some(view) = own.live {
        view.set_epoch(epoch);
        video.push(view);
    }
    if let (Some(encoder), false) = (shared.encoder, video.is_empty()) {
        sinks.push(Box::new(Video::new(
            camera,
            encoder.clone(),
            video,
            Some(own.metrics),
        )));
    }
    sinks
}

/// The encoder of the enabled video outputs (`None` when recordings, RTSP, clips and the
/// console's live view are off), announced once. Without one, a run whose only video output is
/// the live view goes on without it.
fn output_encoder(config: &PipelineConfig) -> Result<Option<Encoder>, EncoderError> {
    let output = &config.output;
    let files_or_rtsp = output.record.enabled || output.rtsp.enabled || config.any_clips();
    let live = config.http.enabled && config.http.live;
    if !files_or_rtsp && !live {
        return Ok(None);
    }
    let encoder = match Encoder::resolve(output.encoder.parse()?) {
        Ok(encoder) => encoder,
        Err(e) if !files_or_rtsp => {
            log::warn!("http: the console has no live view: {e}");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    log::info!("encoder: {} ({})", encoder.element(), encoder.reason());
    Ok(Some(encoder))
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

/// With the engine on a GPU: NVIDIA's decoders (NVDEC) first for cameras whose video is decoded
/// (files, RTSP, V4L2), and the start line says whether there are any; each camera's line says
/// which decoder ran once its first frame is in.
fn announce_decoders(config: &PipelineConfig) {
    let decoded = config.camera.iter().any(|camera| {
        matches!(
            SourceUri::parse(&camera.source),
            Ok(SourceUri::File(_) | SourceUri::Rtsp(_) | SourceUri::V4l2(_))
        )
    });
    if !decoded {
        return;
    }
    match source::prefer_nvdec().as_slice() {
        [] => log::info!(
            "decode: on the CPU (no NVIDIA decoder registered: gst-plugins-bad's nvcodec registers \
             them where an NVIDIA GPU and its driver's NVDEC library are found)"
        ),
        nvdec => log::info!(
            "decode: NVIDIA's NVDEC first ({}), the CPU's decoders where it cannot or fails",
            nvdec.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_camera_keeps_its_first_problems_and_counts_the_rest() {
        let mut stats = CameraStats::default();
        for frame in 0..MAX_ERRORS + 1000 {
            stats.note_error(format!("frame {frame}: inference failed"));
        }
        assert_eq!(stats.errors.len(), MAX_ERRORS);
        assert_eq!(stats.errors[0], "frame 0: inference failed");
        assert_eq!(stats.more_errors, 1000);
    }
}
