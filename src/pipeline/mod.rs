//! `stpm run`: the live pipeline. Per camera, a capture thread (GStreamer or the generated
//! conveyor) feeds a bounded queue; a worker preprocesses, runs the shared engine, draws the
//! overlay, feeds the alert tracker and writes the outputs. GStreamer types stay in `source` and
//! `record`; this module passes plain frames and owns start-up, shutdown and the run summary.

pub mod config;
pub mod conveyor;
pub mod http;
pub mod live;
pub mod metrics;
pub mod queue;
pub mod record;
pub mod rtsp;
pub mod source;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::alerts::{AlertEvent, AlertTracker, ZoneMask};
use crate::bundle::{Bundle, BundleError, Manifest};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::overlay;
use crate::preprocess;
use config::{CameraConfig, PipelineConfig, RecordConfig, SourceUri};
use live::{CameraOutputs, LiveError, LiveOutputs};
use metrics::CameraState;
use queue::{FrameQueue, Item};
use record::Recorder;
use source::{Captured, SourceSpec};

/// Frames waiting per camera before the oldest is dropped.
const QUEUE_FRAMES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(
        "model.provider = `{0}` is not available in this build: GPU providers arrive with the `gpu` feature; use `cpu` or `auto`"
    )]
    Provider(String),
    #[error("cannot start a thread for camera {camera}: {source}")]
    Spawn {
        camera: String,
        source: std::io::Error,
    },
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
    /// Total engine time of analysed frames.
    pub inference: Duration,
    /// The recording, when enabled and finished.
    pub recording: Option<PathBuf>,
    /// Problems that did not stop the run (recording failures).
    pub errors: Vec<String>,
}

/// The outcome of `run`.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub provider: String,
    pub cameras: Vec<CameraStats>,
}

/// Which execution provider serves `requested` in this build (and why, for the start-up log).
pub fn resolve_provider(requested: &str) -> Result<(&'static str, &'static str), PipelineError> {
    match requested {
        "cpu" => Ok(("cpu", "requested")),
        "auto" => Ok(("cpu", "auto: no GPU provider in this build")),
        other => Err(PipelineError::Provider(other.to_string())),
    }
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
    let (provider, why) = resolve_provider(&config.model.provider)?;
    let mut live = LiveOutputs::start(config, provider)?;
    let bundle = Bundle::open(&config.model.bundle)?;
    let manifest = Arc::new(bundle.manifest.clone());
    let engine = Engine::open(
        &bundle.model_path(),
        manifest.model.input_size,
        EngineOptions {
            threads: config.model.threads,
        },
    )?;
    eprintln!(
        "engine: ONNX Runtime, provider {provider} ({why}); model {} ({}, {}×{})",
        config.model.bundle.display(),
        manifest.model.backbone,
        manifest.model.input_size[1],
        manifest.model.input_size[0]
    );
    if config.output.record.enabled {
        std::fs::create_dir_all(&config.output.record.dir).map_err(|source| {
            PipelineError::RecordDir {
                path: config.output.record.dir.clone(),
                source,
            }
        })?;
    }
    let engine = Arc::new(Mutex::new(engine));
    let model_name = config
        .model
        .bundle
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut workers = Vec::new();
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
        let queue = Arc::new(FrameQueue::new(QUEUE_FRAMES));
        let spec = SourceSpec {
            camera: camera.name.clone(),
            uri,
            looping: camera.looping,
            realtime: camera.realtime,
        };
        captures
            .push(source::spawn(spec, Arc::clone(&queue), Arc::clone(&stop)).map_err(spawn_error)?);
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
            engine: Arc::clone(&engine),
            record: config.output.record.clone(),
            queue,
            live: live.camera(index, &camera.name),
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
    // Workers end only after their capture sent End, so these joins are immediate.
    for handle in captures {
        let _ = handle.join();
    }
    live.stop();
    Ok(RunSummary {
        provider: provider.to_string(),
        cameras,
    })
}

/// One camera's processing loop.
struct Worker {
    camera: CameraConfig,
    tracker: AlertTracker,
    zones: ZoneMask,
    manifest: Arc<Manifest>,
    engine: Arc<Mutex<Engine>>,
    record: RecordConfig,
    queue: Arc<FrameQueue<Captured>>,
    /// Metrics and the RTSP feed.
    live: CameraOutputs,
}

/// What the worker keeps between frames.
struct WorkerState {
    stats: CameraStats,
    recorder: Option<Recorder>,
    last_analysed: Option<Duration>,
    last_score: f32,
    /// Unix time of stream time zero (alert timestamps are stream-based).
    epoch: f64,
    last_t: f64,
    last_report: Instant,
    analysed_since_report: u64,
}

impl Worker {
    fn run(mut self) -> CameraStats {
        let mut state = WorkerState {
            stats: CameraStats {
                camera: self.camera.name.clone(),
                ..Default::default()
            },
            recorder: None,
            last_analysed: None,
            last_score: 0.0,
            epoch: unix_now(),
            last_t: unix_now(),
            last_report: Instant::now(),
            analysed_since_report: 0,
        };
        loop {
            match self.queue.pop(Duration::from_millis(200)) {
                None => {}
                Some(Item::Online) => self.live.metrics.set_state(CameraState::Online),
                Some(Item::End) => break,
                Some(Item::Offline(why)) => {
                    self.live.metrics.set_state(CameraState::Offline);
                    state.stats.offline += 1;
                    let events = self.tracker.camera_offline(state.last_t);
                    self.emit(&mut state, events);
                    eprintln!("[{}] offline: {why}", self.camera.name);
                }
                Some(Item::Frame(captured)) => self.process(&mut state, captured),
            }
            self.live.metrics.set_dropped(self.queue.dropped());
            self.report_progress(&mut state);
        }
        self.live.metrics.set_state(CameraState::Ended);
        let events = self.tracker.shutdown(state.last_t);
        self.emit(&mut state, events);
        state.stats.dropped = self.queue.dropped();
        if let Some(recorder) = state.recorder.take() {
            match recorder.finish(Duration::from_secs(10)) {
                Ok(path) => state.stats.recording = Some(path),
                Err(message) => state.stats.errors.push(message),
            }
        }
        state.stats
    }

    fn report_progress(&self, state: &mut WorkerState) {
        let elapsed = state.last_report.elapsed();
        if elapsed >= Duration::from_secs(5) {
            eprintln!(
                "[{}] {} frames, {:.1} analysed/s, {} dropped, last score {:.2}",
                self.camera.name,
                state.stats.frames,
                state.analysed_since_report as f64 / elapsed.as_secs_f64(),
                self.queue.dropped(),
                state.last_score
            );
            state.last_report = Instant::now();
            state.analysed_since_report = 0;
        }
    }

    fn emit(&self, state: &mut WorkerState, events: Vec<AlertEvent>) {
        for event in events {
            state.stats.alerts += 1;
            match serde_json::to_string(&event) {
                Ok(json) => println!("alert {json}"),
                Err(e) => eprintln!("[{}] cannot encode an alert: {e}", self.camera.name),
            }
        }
    }

    fn process(&mut self, state: &mut WorkerState, captured: Captured) {
        state.stats.frames += 1;
        self.live.metrics.frame();
        let frame = &captured.frame;
        let t = state.epoch + captured.pts.as_secs_f64();
        state.last_t = t;
        let interval =
            (self.camera.max_fps > 0.0).then(|| Duration::from_secs_f64(1.0 / self.camera.max_fps));
        let due = match (interval, state.last_analysed) {
            (Some(interval), Some(last)) => captured.pts >= last + interval,
            _ => true,
        };
        let pixels = if due {
            match self.analyse(state, &captured, t) {
                Ok(pixels) => pixels,
                Err(message) => {
                    state.stats.errors.push(message);
                    frame.pixels.clone()
                }
            }
        } else {
            let mut pixels = frame.pixels.clone();
            overlay::draw_caption(
                &mut pixels,
                frame.width,
                frame.height,
                &format!("score {:.2} (not analysed)", state.last_score),
            );
            pixels
        };
        if self.record.enabled {
            self.write_recording(state, &captured, &pixels);
        }
        if let Some(rtsp) = &self.live.rtsp {
            rtsp.push(&pixels, frame.width, frame.height, captured.fps);
        }
    }

    /// Runs the engine on one frame, updates the alert tracker, returns the annotated pixels.
    fn analyse(
        &mut self,
        state: &mut WorkerState,
        captured: &Captured,
        t: f64,
    ) -> Result<Vec<u8>, String> {
        let frame = &captured.frame;
        let size = self.manifest.model.input_size;
        let input = preprocess::to_chw(frame, size, &self.manifest.normalisation);
        let tick = Instant::now();
        let scored = {
            let mut engine = self
                .engine
                .lock()
                .map_err(|_| "the engine lock is poisoned".to_string())?;
            engine.run(&input, 1).map_err(|e| e.to_string())?
        };
        let inference = tick.elapsed();
        state.stats.inference += inference;
        self.live.metrics.analysed(inference);
        state.stats.analysed += 1;
        state.analysed_since_report += 1;
        state.last_analysed = Some(captured.pts);
        let calibration = &self.manifest.calibration;
        let raw_score = scored.scores.first().copied().unwrap_or(0.0);
        state.last_score = calibration.normalise(raw_score);
        let normalised: Vec<f32> = scored
            .maps
            .iter()
            .map(|&v| calibration.normalise(v))
            .collect();
        if let Ok(summary) = self.zones.summarise(&normalised, 0.5) {
            let events = self.tracker.observe(t, &summary);
            self.emit(state, events);
        }
        let raw_map = preprocess::resize_plane(&scored.maps, size, [frame.height, frame.width]);
        Ok(overlay::annotate(
            frame,
            &raw_map,
            None,
            calibration,
            raw_score,
        ))
    }

    fn write_recording(&self, state: &mut WorkerState, captured: &Captured, pixels: &[u8]) {
        let frame = &captured.frame;
        if state.recorder.is_none() {
            let path = self
                .record
                .dir
                .join(format!("{}-{}.mkv", self.camera.name, state.epoch as u64));
            match Recorder::create(&path, (frame.width, frame.height), captured.fps) {
                Ok(recorder) => {
                    eprintln!("[{}] recording to {}", self.camera.name, path.display());
                    state.recorder = Some(recorder);
                }
                Err(message) => {
                    state.stats.errors.push(message);
                    return;
                }
            }
        }
        if let Some(recorder) = state.recorder.as_mut()
            && let Err(message) = recorder.push(pixels, captured.pts)
        {
            state.stats.errors.push(message);
            state.recorder = None;
        }
    }
}
