//! Live counters of a running pipeline, written by the camera workers (atomics and short locks, no
//! I/O) and read by the HTTP endpoints: `/metrics` in the OpenMetrics text format (encoded by
//! `prometheus-client` from the collector in `exposition`, which reads the counters at each
//! scrape) and `/health`.

mod exposition;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the inference histogram buckets; `+Inf` is implied.
const INFERENCE_BUCKETS: [f64; 10] = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// Upper bounds (seconds) of the per-stage histogram buckets (stages take 0.1–50 ms).
const STAGE_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
];

/// Frames per camera and stage that the `stpm_stage_recent_seconds` quantiles are taken over.
pub const RECENT_FRAMES: usize = 1000;

/// The quantiles `stpm_stage_recent_seconds` reports.
pub const RECENT_QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

/// The stages of a frame that `stpm_stage_seconds` times, in the order a frame meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// From the compressed frame entering the decoder to the RGB frame at the appsink (decoder and
    /// colour conversion; GStreamer sources only).
    Decode,
    /// From the appsink to the worker: the copy out of the GStreamer buffer and the wait in the
    /// camera's frame queue.
    Queue,
    /// Resize and normalise into the model's input tensor.
    Preprocess,
    /// The engine call.
    Inference,
    /// Heatmap, contours, caption; alert tracking and publishing.
    Overlay,
    /// Handing the annotated frame to the recorder and the RTSP feed.
    Output,
    /// From the recorder's input to the H.264 frame out of its encoder (colour conversion, x264).
    Encode,
    /// From the frame at the appsink to the H.264 frame out of the recorder's encoder.
    EndToEnd,
}

impl Stage {
    pub const ALL: [Stage; 8] = [
        Stage::Decode,
        Stage::Queue,
        Stage::Preprocess,
        Stage::Inference,
        Stage::Overlay,
        Stage::Output,
        Stage::Encode,
        Stage::EndToEnd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Queue => "queue",
            Stage::Preprocess => "preprocess",
            Stage::Inference => "inference",
            Stage::Overlay => "overlay",
            Stage::Output => "output",
            Stage::Encode => "encode",
            Stage::EndToEnd => "end_to_end",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|&s| s == self).unwrap_or(0)
    }
}

/// Every frame's duration in every stage, kept only when asked for (`stpm bench`): percentiles
/// read off histogram buckets are too coarse to compare two runs.
#[derive(Debug, Clone, Default)]
pub struct StageSamples {
    per_stage: Vec<Vec<Duration>>,
    /// When the first frame reached the appsink.
    pub first_in: Option<Instant>,
    /// When the last frame left the recorder's encoder.
    pub last_out: Option<Instant>,
}

impl StageSamples {
    /// The durations recorded for `stage`, in the order they were observed.
    pub fn of(&self, stage: Stage) -> &[Duration] {
        self.per_stage
            .get(stage.index())
            .map_or(&[], |samples| samples.as_slice())
    }

    fn push(&mut self, stage: Stage, took: Duration) {
        if self.per_stage.len() < Stage::ALL.len() {
            self.per_stage.resize(Stage::ALL.len(), Vec::new());
        }
        self.per_stage[stage.index()].push(took);
    }
}

/// The window over which `stpm_fps` counts analysed frames.
const FPS_WINDOW: Duration = Duration::from_secs(5);

/// Where a camera's source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraState {
    /// No frame yet.
    Starting,
    Online,
    /// Reconnecting after an error or the end of a live stream.
    Offline,
    /// Finished for good (a file that ended, or shutdown).
    Ended,
}

impl CameraState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Ended => "ended",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Online,
            2 => Self::Offline,
            3 => Self::Ended,
            _ => Self::Starting,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Starting => 0,
            Self::Online => 1,
            Self::Offline => 2,
            Self::Ended => 3,
        }
    }
}

/// One camera's counters.
#[derive(Debug)]
pub struct CameraMetrics {
    pub camera: String,
    frames: AtomicU64,
    analysed: AtomicU64,
    /// Analysed frames that shared their inference call with other cameras' frames.
    batched: AtomicU64,
    dropped: AtomicU64,
    state: AtomicU8,
    /// When `state` last changed.
    state_since: Mutex<Instant>,
    alerts: AtomicU64,
    suppressed: AtomicU64,
    /// The latest analysed frame's normalised score (f32 bits).
    last_score: AtomicU32,
    inference: Histogram,
    stages: Vec<Histogram>,
    /// The last [`RECENT_FRAMES`] durations (seconds) of each stage, for exact quantiles.
    recent_stages: Mutex<Vec<VecDeque<f64>>>,
    /// Raw stage durations, when [`CameraMetrics::keep_samples`] asked for them.
    samples: Mutex<Option<StageSamples>>,
    /// When recent frames were analysed (at most `FPS_WINDOW` old).
    recent: Mutex<VecDeque<Instant>>,
}

impl CameraMetrics {
    pub fn new(camera: &str) -> Self {
        Self {
            camera: camera.to_string(),
            frames: AtomicU64::new(0),
            analysed: AtomicU64::new(0),
            batched: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            state: AtomicU8::new(CameraState::Starting.to_u8()),
            state_since: Mutex::new(Instant::now()),
            alerts: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            last_score: AtomicU32::new(0),
            inference: Histogram::new(INFERENCE_BUCKETS),
            stages: Stage::ALL
                .iter()
                .map(|_| Histogram::new(STAGE_BUCKETS))
                .collect(),
            recent_stages: Mutex::new(vec![VecDeque::new(); Stage::ALL.len()]),
            samples: Mutex::new(None),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// A frame reached the worker (which also means the source is online).
    pub fn frame(&self) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.set_state(CameraState::Online);
    }

    /// A frame went through the engine in `inference`, in a call of `batch` images (other
    /// cameras' frames beside it when more than 1).
    pub fn analysed(&self, inference: Duration, batch: usize) {
        self.analysed.fetch_add(1, Ordering::Relaxed);
        if batch > 1 {
            self.batched.fetch_add(1, Ordering::Relaxed);
        }
        self.inference.observe(inference.as_secs_f64());
        let now = Instant::now();
        if let Ok(mut recent) = self.recent.lock() {
            recent.push_back(now);
            trim(&mut recent, now);
        }
    }

    /// One frame spent `took` in `stage`.
    pub fn stage(&self, stage: Stage, took: Duration) {
        if let Some(histogram) = self.stages.get(stage.index()) {
            histogram.observe(took.as_secs_f64());
        }
        if let Ok(mut recent) = self.recent_stages.lock()
            && let Some(window) = recent.get_mut(stage.index())
        {
            if window.len() == RECENT_FRAMES {
                window.pop_front();
            }
            window.push_back(took.as_secs_f64());
        }
        if let Ok(mut samples) = self.samples.lock()
            && let Some(samples) = samples.as_mut()
        {
            samples.push(stage, took);
        }
    }

    /// A frame arrived at the appsink at `at` (the first one starts the span of the run that frames
    /// per second are measured over).
    pub fn frame_in(&self, at: Instant) {
        if let Ok(mut samples) = self.samples.lock()
            && let Some(samples) = samples.as_mut()
        {
            samples.first_in.get_or_insert(at);
        }
    }

    /// A frame left the recorder's encoder at `at`.
    pub fn frame_out(&self, at: Instant) {
        if let Ok(mut samples) = self.samples.lock()
            && let Some(samples) = samples.as_mut()
        {
            samples.last_out = Some(at);
        }
    }

    /// [`RECENT_QUANTILES`] of `stage` over its last [`RECENT_FRAMES`] frames, in seconds
    /// (nearest rank); `None` before the first frame.
    pub fn recent_quantiles(&self, stage: Stage) -> Option<[f64; 3]> {
        let recent = self.recent_stages.lock().ok()?;
        let mut sorted: Vec<f64> = recent.get(stage.index())?.iter().copied().collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        Some(RECENT_QUANTILES.map(|q| {
            let rank = (q * sorted.len() as f64).ceil() as usize;
            sorted[rank.clamp(1, sorted.len()) - 1]
        }))
    }

    /// Keep every stage duration from now on (memory grows with the run: for benchmarks).
    pub fn keep_samples(&self) {
        if let Ok(mut samples) = self.samples.lock() {
            samples.get_or_insert_with(StageSamples::default);
        }
    }

    /// The raw durations kept since [`CameraMetrics::keep_samples`], if it was called.
    pub fn take_samples(&self) -> Option<StageSamples> {
        self.samples.lock().ok().and_then(|mut s| s.take())
    }

    /// An alert event (new, update or end) was emitted.
    pub fn alert(&self) {
        self.alerts.fetch_add(1, Ordering::Relaxed);
    }

    /// The tracker's count of events held back by the hourly cap (it only grows).
    pub fn set_suppressed(&self, suppressed: u64) {
        self.suppressed.store(suppressed, Ordering::Relaxed);
    }

    /// The queue's drop count so far (it only grows).
    pub fn set_dropped(&self, dropped: u64) {
        self.dropped.store(dropped, Ordering::Relaxed);
    }

    pub fn set_state(&self, state: CameraState) {
        let before = self.state.swap(state.to_u8(), Ordering::Relaxed);
        if before != state.to_u8()
            && let Ok(mut since) = self.state_since.lock()
        {
            *since = Instant::now();
        }
    }

    /// How long the camera has been in its state.
    pub fn state_age(&self) -> Duration {
        self.state_since
            .lock()
            .map(|since| since.elapsed())
            .unwrap_or_default()
    }

    /// The latest analysed frame's normalised score.
    pub fn set_score(&self, score: f32) {
        self.last_score.store(score.to_bits(), Ordering::Relaxed);
    }

    pub fn score(&self) -> f32 {
        f32::from_bits(self.last_score.load(Ordering::Relaxed))
    }

    pub fn state(&self) -> CameraState {
        CameraState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Analysed frames per second over the last few seconds (less since the start).
    fn fps(&self, started: Instant) -> f64 {
        let now = Instant::now();
        let Ok(mut recent) = self.recent.lock() else {
            return 0.0;
        };
        trim(&mut recent, now);
        let window = now.duration_since(started).min(FPS_WINDOW).as_secs_f64();
        if window > 0.0 {
            recent.len() as f64 / window
        } else {
            0.0
        }
    }
}

fn trim(recent: &mut VecDeque<Instant>, now: Instant) {
    while recent
        .front()
        .is_some_and(|&t| now.duration_since(t) > FPS_WINDOW)
    {
        recent.pop_front();
    }
}

/// Every camera's counters and the engine in use.
#[derive(Debug)]
pub struct Metrics {
    state: Arc<Exported>,
    /// Holds the collector that reads `state` at each scrape.
    registry: Registry,
}

/// What `/metrics` reports.
#[derive(Debug)]
struct Exported {
    provider: String,
    /// The bundle's graph that runs (`fp32` or `int8`; a model swap may change it).
    precision: Mutex<String>,
    /// The live model's id and bundle name, once the run reports it.
    model: Mutex<Option<(String, String)>>,
    /// Models swapped in since the start.
    model_swaps: AtomicU64,
    started: Instant,
    cameras: Vec<Arc<CameraMetrics>>,
    /// The MQTT publisher, when `[mqtt]` is configured (its link and spool counters).
    publisher: OnceLock<crate::alerts::PublisherHandle>,
    /// The H.264 encoder element, when recordings or RTSP are enabled.
    encoder: OnceLock<String>,
    /// Retention's latest sweep, once one ran: bytes kept and files deleted so far.
    storage: OnceLock<()>,
    storage_bytes: AtomicU64,
    storage_deleted: AtomicU64,
    /// The folders the run writes to, by name, whose disks' free space is reported.
    disk_folders: OnceLock<Vec<(&'static str, PathBuf)>>,
    /// The event writer's status, when `[storage]` is on.
    event_store: OnceLock<Arc<crate::store::StoreStatus>>,
}

impl Metrics {
    pub fn new(provider: &str, precision: &str, cameras: &[String]) -> Self {
        let state = Arc::new(Exported {
            provider: provider.to_string(),
            precision: Mutex::new(precision.to_string()),
            model: Mutex::new(None),
            model_swaps: AtomicU64::new(0),
            started: Instant::now(),
            cameras: cameras
                .iter()
                .map(|name| Arc::new(CameraMetrics::new(name)))
                .collect(),
            publisher: OnceLock::new(),
            encoder: OnceLock::new(),
            storage: OnceLock::new(),
            storage_bytes: AtomicU64::new(0),
            storage_deleted: AtomicU64::new(0),
            disk_folders: OnceLock::new(),
            event_store: OnceLock::new(),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Arc::clone(&state)));
        Self { state, registry }
    }

    /// The live model (`id`, bundle `name`, the graph's `precision`): at the start, and after
    /// each swap (counted).
    pub fn set_model(&self, id: &str, name: &str, precision: &str) {
        let mut model = self
            .state
            .model
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if model.replace((id.to_string(), name.to_string())).is_some() {
            self.state.model_swaps.fetch_add(1, Ordering::Relaxed);
        }
        *self
            .state
            .precision
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = precision.to_string();
    }

    /// Exports the H.264 encoder element of the video outputs.
    pub fn set_encoder(&self, element: &str) {
        let _ = self.state.encoder.set(element.to_string());
    }

    /// Exports the publisher's counters from now on.
    pub fn set_publisher(&self, publisher: crate::alerts::PublisherHandle) {
        let _ = self.state.publisher.set(publisher);
    }

    /// Exports the event writer's status from now on (metrics and `/health`).
    pub fn set_event_store(&self, status: Arc<crate::store::StoreStatus>) {
        let _ = self.state.event_store.set(status);
    }

    /// Reports the free space of the disks holding `folders` (name, folder) from now on.
    pub fn set_disk_folders(&self, folders: Vec<(&'static str, PathBuf)>) {
        let _ = self.state.disk_folders.set(folders);
    }

    /// A retention sweep kept `bytes` and deleted `deleted` files.
    pub fn storage_swept(&self, bytes: u64, deleted: u64) {
        let _ = self.state.storage.set(());
        self.state.storage_bytes.store(bytes, Ordering::Relaxed);
        self.state
            .storage_deleted
            .fetch_add(deleted, Ordering::Relaxed);
    }

    /// The counters of `camera` (shared with its worker).
    pub fn camera(&self, camera: &str) -> Option<Arc<CameraMetrics>> {
        self.state
            .cameras
            .iter()
            .find(|c| c.camera == camera)
            .cloned()
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            log::warn!("/metrics: cannot encode the metrics: {e}");
        }
        text
    }

    /// Every camera's name, state, analysed frames per second and latest score.
    pub fn cameras(&self) -> Vec<(String, CameraState, f64, f32)> {
        self.state
            .cameras
            .iter()
            .map(|c| {
                (
                    c.camera.clone(),
                    c.state(),
                    c.fps(self.state.started),
                    c.score(),
                )
            })
            .collect()
    }

    /// Healthy when every camera is online or has ended, or has been offline for at most
    /// `grace` (a reconnect); the JSON lists each camera's state and for how long, and names
    /// the cameras that make it unhealthy.
    pub fn health(&self, grace: Duration) -> (bool, String) {
        let states: Vec<(String, CameraState, Duration)> = self
            .state
            .cameras
            .iter()
            .map(|c| (c.camera.clone(), c.state(), c.state_age()))
            .collect();
        let failing: Vec<&str> = states
            .iter()
            .filter(|(_, state, age)| match state {
                CameraState::Online | CameraState::Ended => false,
                CameraState::Offline => *age > grace,
                CameraState::Starting => true,
            })
            .map(|(camera, _, _)| camera.as_str())
            .collect();
        let healthy = failing.is_empty();
        let cameras: Vec<serde_json::Value> = states
            .iter()
            .map(|(camera, state, age)| {
                serde_json::json!({
                    "camera": camera,
                    "state": state.name(),
                    "seconds": (age.as_secs_f64() * 10.0).round() / 10.0,
                })
            })
            .collect();
        let mut body = serde_json::json!({
            "status": if healthy { "ok" } else { "unhealthy" },
            "unhealthy": failing,
            "cameras": cameras,
        });
        // Said, not counted against health: restarting the process does not mend a full disk or
        // a lock held elsewhere, and the cameras and alerts go on without the store.
        if let Some(store) = self.state.event_store.get() {
            body["storage"] = serde_json::json!({
                "failing": store.failing.load(Ordering::Relaxed),
                "backlog": store.backlog.load(Ordering::Relaxed),
                "unstored": store.unstored.load(Ordering::Relaxed),
            });
        }
        (healthy, body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event writer's status is exported and told in `/health`, whose verdict stays the
    /// cameras'.
    #[test]
    fn the_event_stores_trouble_is_exported_and_told_in_health() {
        let metrics = Metrics::new("cpu", "fp32", &[]);
        assert!(!metrics.render().contains("stpm_event_store"));
        let status = Arc::new(crate::store::StoreStatus::default());
        metrics.set_event_store(Arc::clone(&status));
        status.failing.store(true, Ordering::Relaxed);
        status.backlog.store(7, Ordering::Relaxed);
        status.unstored.store(3, Ordering::Relaxed);
        let text = metrics.render();
        for line in [
            "stpm_event_store_failing 1",
            "stpm_event_store_backlog 7",
            "stpm_event_store_unstored_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
        let (healthy, body) = metrics.health(Duration::ZERO);
        assert!(healthy, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            body["storage"],
            serde_json::json!({"failing": true, "backlog": 7, "unstored": 3})
        );
    }

    #[test]
    fn quotes_backslashes_and_line_breaks_in_label_values_are_escaped() {
        let metrics = Metrics::new("cpu", "fp32", &[]);
        metrics.set_model("3f9a0c1b2d4e", "odd \"name\"\\x\ny", "fp32");
        let dir = tempfile::tempdir().expect("dir");
        let odd = dir.path().join("a\"b\\c\nd");
        std::fs::create_dir(&odd).expect("folder");
        metrics.set_disk_folders(vec![("storage", odd)]);
        let text = metrics.render();
        assert!(text.contains(r#"bundle="odd \"name\"\\x\ny""#), "{text}");
        assert!(text.contains(r#"a\"b\\c\nd""#), "{text}");
        // Every sample is still one line: name{labels} value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                line.ends_with('}') || line.split(' ').count() >= 2,
                "broken line: {line:?}"
            );
            assert_eq!(
                line.matches('{').count(),
                line.matches('}').count(),
                "{line:?}"
            );
        }
    }

    #[test]
    fn recent_quantiles_are_exact_over_the_last_frames() {
        let metrics = Metrics::new("cpu", "int8", &["line1".into()]);
        let line1 = metrics.camera("line1").expect("line1");
        assert_eq!(line1.recent_quantiles(Stage::EndToEnd), None);
        // 2000 frames: the first 1000 at 1 s fall out of the window; then 1..=1000 ms.
        for _ in 0..RECENT_FRAMES {
            line1.stage(Stage::EndToEnd, Duration::from_secs(1));
        }
        for ms in 1..=RECENT_FRAMES as u64 {
            line1.stage(Stage::EndToEnd, Duration::from_millis(ms));
        }
        let [p50, p95, p99] = line1.recent_quantiles(Stage::EndToEnd).expect("quantiles");
        assert!((p50 - 0.5).abs() < 1e-9 && (p95 - 0.95).abs() < 1e-9 && (p99 - 0.99).abs() < 1e-9);
        let text = metrics.render();
        for expected in [
            "# TYPE stpm_stage_recent_seconds gauge\n",
            "stpm_stage_recent_seconds{camera=\"line1\",stage=\"end_to_end\",quantile=\"0.95\"} 0.95\n",
            "# TYPE process_cpu_seconds counter\n",
            "# TYPE process_resident_memory_bytes gauge\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Stages without frames have no quantiles.
        assert!(!text.contains("stage=\"decode\",quantile"));
    }

    #[test]
    fn counters_histogram_and_health_render() {
        let metrics = Metrics::new("cpu", "int8", &["line1".into(), "line2".into()]);
        let line1 = metrics.camera("line1").expect("line1");
        let line2 = metrics.camera("line2").expect("line2");
        for _ in 0..3 {
            line1.frame();
        }
        line1.analysed(Duration::from_millis(3), 1);
        line1.analysed(Duration::from_millis(30), 1);
        line1.analysed(Duration::from_secs(9), 1);
        line1.set_dropped(2);
        line1.stage(Stage::Preprocess, Duration::from_micros(700));
        line1.stage(Stage::Overlay, Duration::from_millis(3));
        line1.alert();
        line1.alert();
        line1.set_suppressed(4);
        let text = metrics.render();
        for expected in [
            "stpm_engine_info{provider=\"cpu\",precision=\"int8\"} 1\n",
            "# TYPE stpm_frames counter\n",
            "stpm_frames_total{camera=\"line1\"} 3\n",
            "stpm_frames_total{camera=\"line2\"} 0\n",
            "stpm_frames_analysed_total{camera=\"line1\"} 3\n",
            "stpm_frames_dropped_total{camera=\"line1\"} 2\n",
            "stpm_camera_online{camera=\"line1\"} 1\n",
            "stpm_camera_online{camera=\"line2\"} 0\n",
            "# TYPE stpm_inference_seconds histogram\n",
            "stpm_inference_seconds_bucket{le=\"0.005\",camera=\"line1\"} 1\n",
            "stpm_inference_seconds_bucket{le=\"0.02\",camera=\"line1\"} 1\n",
            "stpm_inference_seconds_bucket{le=\"0.05\",camera=\"line1\"} 2\n",
            "stpm_inference_seconds_bucket{le=\"5.0\",camera=\"line1\"} 2\n",
            "stpm_inference_seconds_bucket{le=\"+Inf\",camera=\"line1\"} 3\n",
            "stpm_inference_seconds_count{camera=\"line1\"} 3\n",
            "stpm_inference_seconds_count{camera=\"line2\"} 0\n",
            "stpm_alert_events_total{camera=\"line1\"} 2\n",
            "# TYPE stpm_stage_seconds histogram\n",
            "stpm_stage_seconds_bucket{le=\"0.0005\",camera=\"line1\",stage=\"preprocess\"} 0\n",
            "stpm_stage_seconds_bucket{le=\"0.001\",camera=\"line1\",stage=\"preprocess\"} 1\n",
            "stpm_stage_seconds_count{camera=\"line1\",stage=\"overlay\"} 1\n",
            "stpm_stage_seconds_count{camera=\"line1\",stage=\"output\"} 0\n",
            "stpm_alerts_suppressed_total{camera=\"line1\"} 4\n",
            "stpm_alert_events_total{camera=\"line2\"} 0\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Each family's header comes right before its samples.
        let header = text.find("# TYPE stpm_fps gauge").expect("fps header");
        let sample = text.find("stpm_fps{camera=\"line1\"}").expect("fps sample");
        assert!(header < sample);
        assert!(metrics.camera("line3").is_none());
        assert!(text.ends_with("# EOF\n"), "{text}");
        // Without [mqtt] there is no publisher to report on, without video outputs no encoder.
        assert!(!text.contains("stpm_mqtt_connected"));
        assert!(!text.contains("stpm_encoder_info"));
        metrics.set_encoder("x264enc");
        assert!(
            metrics
                .render()
                .contains("# TYPE stpm_encoder info\nstpm_encoder_info{encoder=\"x264enc\"} 1\n")
        );

        let none = Duration::ZERO;
        let (healthy, body) = metrics.health(none);
        assert!(!healthy, "line2 is still starting: {body}");
        assert!(
            body.contains(r#""camera":"line2""#)
                && body.contains(r#""state":"starting""#)
                && body.contains(r#""unhealthy":["line2"]"#),
            "{body}"
        );
        line2.set_state(CameraState::Ended);
        assert!(metrics.health(none).0);
        line1.set_state(CameraState::Offline);
        std::thread::sleep(Duration::from_millis(20));
        let (healthy, body) = metrics.health(none);
        assert!(!healthy);
        assert!(
            body.contains(r#""state":"offline""#) && body.contains(r#""unhealthy":["line1"]"#),
            "{body}"
        );
        // Offline for less than the grace: still healthy (a reconnect); longer: not.
        assert!(metrics.health(Duration::from_secs(60)).0);
        if let Ok(mut since) = line1.state_since.lock() {
            *since = Instant::now() - Duration::from_secs(61);
        }
        assert!(!metrics.health(Duration::from_secs(60)).0);
    }

    #[test]
    fn fps_counts_the_recent_window_only() {
        let metrics = Metrics::new("cpu", "int8", &["a".into()]);
        let camera = metrics.camera("a").expect("a");
        let long_ago = Instant::now() - Duration::from_secs(60);
        for _ in 0..10 {
            camera.analysed(Duration::from_millis(1), 1);
        }
        // Ten frames within a 5 s window (the run started a minute ago).
        assert!((camera.fps(long_ago) - 2.0).abs() < 1e-9);
        if let Ok(mut recent) = camera.recent.lock() {
            recent.iter_mut().for_each(|t| *t = long_ago);
        }
        assert_eq!(camera.fps(long_ago), 0.0);
    }
}
