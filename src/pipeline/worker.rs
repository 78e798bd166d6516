//! One camera's worker: takes the analyser's frames in order, draws the overlay, summarises the
//! alert zones and feeds the tracker, and hands the annotated frame, the alert transitions and the
//! camera's state to its sinks (`sinks`). Never runs the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::CameraStats;
use super::analyse::Analysed;
use super::config::CameraConfig;
#[cfg(feature = "gpu")]
use super::gpu;
use super::metrics::{CameraMetrics, CameraState, Stage};
use super::queue::{FrameQueue, Item};
use super::sinks::{Annotated, Picture, Sink, SinkError};
use super::source::Captured;
use crate::alerts::{AlertEvent, AlertTracker, CameraStatus, EventKind, ZoneMask};
use crate::engine::Scores;
use crate::overlay;
use crate::pipeline::model::Model;
use crate::preprocess::RgbFrame;

/// One camera's drawing, alerting and output loop.
pub(super) struct Worker {
    pub(super) camera: CameraConfig,
    pub(super) tracker: AlertTracker,
    pub(super) zones: ZoneMask,
    /// The model that scored the latest analysed frame (its calibration normalises the maps).
    pub(super) model: Arc<Model>,
    /// Frames from the camera's analyser, scored or passed through.
    pub(super) frames: Arc<FrameQueue<Analysed>>,
    /// The capture queue (for its count of dropped frames).
    pub(super) queue: Arc<FrameQueue<Captured>>,
    pub(super) metrics: Arc<CameraMetrics>,
    /// Unix time of stream time zero (alert timestamps and recording names are based on it).
    pub(super) epoch: f64,
    /// The camera's outputs.
    pub(super) sinks: Vec<Box<dyn Sink>>,
    /// New alert settings from a reload (SIGHUP), applied before the next frame.
    pub(super) settings: super::reload::Inbox,
    /// Where analysed frames go while a collection for training runs.
    pub(super) collect: Option<Arc<super::collecting::CollectSlot>>,
    /// The overlay on the GPU, when the engine runs there.
    #[cfg(feature = "gpu")]
    pub(super) gpu: Option<gpu::GpuStage>,
}

/// What the worker keeps between frames.
struct WorkerState {
    stats: CameraStats,
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
    /// Whether a map that did not fit the zone mask was reported (once per camera).
    map_size_reported: bool,
}

impl Worker {
    pub(super) fn run(mut self) -> CameraStats {
        let mut state = WorkerState {
            stats: CameraStats {
                camera: self.camera.name.clone(),
                ..Default::default()
            },
            last_score: 0.0,
            epoch: self.epoch,
            last_t: self.epoch,
            last_report: Instant::now(),
            analysed_since_report: 0,
            fps: 0.0,
            published_status: None,
            map_size_reported: false,
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
                Some(Item::Online) => self.metrics.set_state(CameraState::Online),
                Some(Item::End) => break,
                Some(Item::Offline(why)) => {
                    self.metrics.set_state(CameraState::Offline);
                    state.stats.offline += 1;
                    let events = self.tracker.camera_offline(state.last_t);
                    self.emit(&mut state, events, None);
                    self.publish_state(&state);
                    log::warn!("[{}] offline: {why}", self.camera.name);
                }
                Some(Item::Frame(analysed)) => self.process(&mut state, analysed),
            }
            self.metrics.set_dropped(self.queue.dropped());
            self.report_progress(&mut state);
        }
        self.metrics.set_state(CameraState::Ended);
        if let Some(slot) = &self.collect {
            slot.stop();
        }
        let events = self.tracker.shutdown(state.last_t);
        self.emit(&mut state, events, None);
        state.stats.dropped = self.queue.dropped();
        for sink in std::mem::take(&mut self.sinks) {
            let report = sink.finish(Duration::from_secs(10));
            state.stats.recordings.extend(report.files);
            for error in report.errors {
                self.failed(&mut state, error);
            }
        }
        // After the video has finished, every encoded frame has been timed.
        state.stats.samples = self.metrics.take_samples();
        state.stats.end_to_end = self.metrics.recent_quantiles(Stage::EndToEnd);
        state.stats
    }

    /// Hands the camera state (ok / anomaly / offline, fps, score) to the sinks.
    fn publish_state(&mut self, state: &WorkerState) {
        let camera_state = self.tracker.state(state.fps);
        for sink in &mut self.sinks {
            if let Err(e) = sink.state(&camera_state) {
                log::warn!("[{}] {e}", self.camera.name);
            }
        }
    }

    /// A sink's problem: logged, and kept for the run summary.
    fn failed(&self, state: &mut WorkerState, error: SinkError) {
        log::warn!("[{}] {error}", self.camera.name);
        state.stats.note_error(error.to_string());
    }

    fn report_progress(&mut self, state: &mut WorkerState) {
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

    /// Hands `events` to the sinks; `picture` is the annotated frame they were raised on.
    fn emit(
        &mut self,
        state: &mut WorkerState,
        events: Vec<AlertEvent>,
        picture: Option<&Picture<'_>>,
    ) {
        self.metrics.set_suppressed(self.tracker.suppressed());
        for event in events {
            state.stats.alerts += 1;
            if event.kind == EventKind::New {
                state.stats.new_alerts += 1;
            }
            self.metrics.alert();
            let mut errors = Vec::new();
            for sink in &mut self.sinks {
                if let Err(error) = sink.alert(&event, picture) {
                    errors.push(error);
                }
            }
            for error in errors {
                self.failed(state, error);
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
            model,
            inference,
            batch,
        } = analysed;
        // Events name the newest model that scored a frame: with several sessions, a frame the
        // previous model scored can still follow the first of the new one.
        let model = model.unwrap_or_else(|| Arc::clone(&self.model));
        if model.generation > self.model.generation {
            self.tracker.set_model(&model.id);
            self.model = Arc::clone(&model);
        }
        state.stats.frames += 1;
        self.metrics.frame();
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
                let pixels = self.annotate(state, &captured, &scored, t, &model);
                if let Some(slot) = &self.collect {
                    slot.offer(frame, captured.pts.as_secs_f64(), state.last_score);
                }
                pixels
            }
            Some(Err(error)) => {
                state.stats.note_error(error.to_string());
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
        let annotated = Annotated {
            rgb: &pixels,
            width: frame.width,
            height: frame.height,
            pts: captured.pts,
            arrived: captured.arrived,
            fps: captured.fps,
        };
        let mut errors = Vec::new();
        for sink in &mut self.sinks {
            if let Err(error) = sink.frame(&annotated) {
                errors.push(error);
            }
        }
        for error in errors {
            self.failed(state, error);
        }
        if due {
            self.metrics.stage(Stage::Output, outputs.elapsed());
        }
    }

    /// Draws the engine's result on one frame (scored by `model`, whose calibration normalises
    /// it) and updates the alert tracker; returns the annotated pixels.
    fn annotate(
        &mut self,
        state: &mut WorkerState,
        captured: &Captured,
        scored: &Scores,
        t: f64,
        model: &Model,
    ) -> Vec<u8> {
        if let Some(settings) = super::reload::take(&self.settings) {
            if let Some(slot) = &self.collect {
                slot.set_alerts(&settings.alerts);
            }
            self.tracker.set_config(settings.alerts);
            self.zones = ZoneMask::new(
                self.zones.width(),
                self.zones.height(),
                &settings.roi,
                &settings.ignore,
            );
            log::info!("[{}] alert settings reloaded", self.camera.name);
        }
        let frame = &captured.frame;
        let size = model.manifest.model.input_size;
        let overlay_started = Instant::now();
        state.stats.analysed += 1;
        state.analysed_since_report += 1;
        let calibration = &model.manifest.calibration;
        let raw_score = scored.scores.first().copied().unwrap_or(0.0);
        state.last_score = calibration.normalise(raw_score);
        self.metrics.set_score(state.last_score);
        let normalised: Vec<f32> = scored
            .maps
            .iter()
            .map(|&v| calibration.normalise(v))
            .collect();
        let events = match self.zones.summarise(&normalised, 0.5) {
            Ok(summary) => self.tracker.observe(t, &summary),
            Err(e) => {
                // The engine checks the map's size, so this is a bug, not a bad bundle: say so
                // once rather than alerting on nothing in silence.
                if !state.map_size_reported {
                    log::error!("[{}] no alerts from this frame on: {e}", self.camera.name);
                    state.map_size_reported = true;
                }
                Vec::new()
            }
        };
        let camera = self.camera.name.clone();
        let caption = overlay::live::Caption {
            camera: &camera,
            fps: state.fps,
        };
        let pixels = match self.overlay_on_gpu(frame, &scored.maps, raw_score, &caption, model) {
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
        let picture = Picture {
            rgb: &pixels,
            clean: &frame.pixels,
            width: frame.width,
            height: frame.height,
            raw_score,
        };
        self.emit(state, events, Some(&picture));
        self.metrics
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
        model: &Model,
    ) -> Option<Vec<u8>> {
        let stage = self.gpu.as_mut()?;
        let manifest = &model.manifest;
        let calibration = &manifest.calibration;
        let heat = stage
            .heat(frame, map, manifest.model.input_size, calibration)
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
        _model: &Model,
    ) -> Option<Vec<u8>> {
        None
    }
}
