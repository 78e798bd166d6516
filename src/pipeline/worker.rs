//! One camera's worker: takes the analyser's frames in order, draws the overlay, summarises the
//! alert zones and feeds the tracker, publishes events, state and snapshots, and writes the
//! annotated frame to the recording and the RTSP feed. Never runs the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::analyse::Analysed;
use super::config::{CameraConfig, RecordConfig};
use super::encoder::Encoder;
#[cfg(feature = "gpu")]
use super::gpu;
use super::metrics::{CameraState, Stage};
use super::queue::{FrameQueue, Item};
use super::record::{Destination, Recorder};
use super::servers::CameraOutputs;
use super::source::Captured;
use super::yuv::{self, OutputFrame};
use super::{CameraStats, jpeg, unix_now};
use crate::alerts::{AlertEvent, AlertTracker, CameraStatus, PublisherHandle, ZoneMask};
use crate::bundle::Manifest;
use crate::engine::Scores;
use crate::overlay;
use crate::preprocess::RgbFrame;

/// One camera's drawing, alerting and output loop.
pub(super) struct Worker {
    pub(super) camera: CameraConfig,
    pub(super) tracker: AlertTracker,
    pub(super) zones: ZoneMask,
    pub(super) manifest: Arc<Manifest>,
    pub(super) record: RecordConfig,
    /// The H.264 encoder, when recordings or RTSP are enabled.
    pub(super) encoder: Option<Encoder>,
    /// Frames from the camera's analyser, scored or passed through.
    pub(super) frames: Arc<FrameQueue<Analysed>>,
    /// The capture queue (for its count of dropped frames).
    pub(super) queue: Arc<FrameQueue<Captured>>,
    /// MQTT publisher, when `[mqtt]` is configured.
    pub(super) publisher: Option<PublisherHandle>,
    /// Metrics and the RTSP feed.
    pub(super) live: CameraOutputs,
    /// Print alert events on stdout.
    pub(super) print_alerts: bool,
    /// The overlay on the GPU, when the engine runs there.
    #[cfg(feature = "gpu")]
    pub(super) gpu: Option<gpu::GpuStage>,
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
    pub(super) fn run(mut self) -> CameraStats {
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
                Err(error) => state.stats.errors.push(error.to_string()),
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
                Err(error) => {
                    state.stats.errors.push(error.to_string());
                    return;
                }
            }
        }
        if let Some(recorder) = state.recorder.as_mut()
            && let Err(error) = recorder.push(&out.data, captured.pts, captured.arrived)
        {
            state.stats.errors.push(error.to_string());
            state.recorder = None;
        }
    }
}
