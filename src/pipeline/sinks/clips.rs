//! `[clips]`: one MP4 per alert event, from `pre_seconds` before its first anomalous frame to
//! `post_seconds` after it ended (at most `max_seconds`), cut from the camera's encoded stream
//! (`video`; no encoder of its own). A ring of the last seconds of encoded frames gives the
//! pre-roll: a clip starts at the key frame at or before `start − pre_seconds`. Finished clips
//! (`<storage>/clips/<camera>/<event id>.mp4`, `moov` first so browsers play them at once) are
//! recorded in the event store.
//!
//! Two halves share the state: [`ClipAlerts`] (a [`Sink`]: opens a clip on `new`, sets its end on
//! `end`) and [`ClipFeed`] (a [`VideoSink`]: keeps the ring, feeds open clips, closes them).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use serde::Deserialize;

use super::events::ClipLog;
use super::video::{Drained, Unit, VideoSink, drain};
use super::{Picture, Sink, SinkError, SinkReport};
use crate::alerts::{AlertEvent, EventKind};

/// Seconds of encoded frames the ring keeps beyond `pre_seconds`: an event's `new` comes after its
/// start (the debounce), and the clip starts at a key frame before that.
const RING_MARGIN: f64 = 10.0;

/// `[clips]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipsConfig {
    /// Write a clip of every alert event (needs `[storage]`).
    #[serde(default)]
    pub enabled: bool,
    /// Seconds before the event's first anomalous frame.
    #[serde(default = "default_margin")]
    pub pre_seconds: f64,
    /// Seconds after the event ended.
    #[serde(default = "default_margin")]
    pub post_seconds: f64,
    /// Longest clip; an event that lasts longer has its first `max_seconds` (with pre-roll).
    #[serde(default = "default_max")]
    pub max_seconds: f64,
}

impl Default for ClipsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            pre_seconds: default_margin(),
            post_seconds: default_margin(),
            max_seconds: default_max(),
        }
    }
}

fn default_margin() -> f64 {
    3.0
}

fn default_max() -> f64 {
    60.0
}

impl ClipsConfig {
    /// Problems of the section, each naming its key under `section` (`clips`,
    /// `camera[0].clips`).
    pub fn problems(&self, section: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("pre_seconds", self.pre_seconds),
            ("post_seconds", self.post_seconds),
        ] {
            if !(value.is_finite() && (0.0..=600.0).contains(&value)) {
                problems.push(format!("{section}.{key} = {value}: use 0 to 600 seconds"));
            }
        }
        if !(self.max_seconds.is_finite() && self.max_seconds >= 1.0 && self.max_seconds <= 3600.0)
        {
            problems.push(format!(
                "{section}.max_seconds = {}: use 1 to 3600 seconds",
                self.max_seconds
            ));
        }
        problems
    }
}

/// `[camera.clips]`: a camera's own clip settings; what is not given comes from `[clips]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraClipOverrides {
    pub enabled: Option<bool>,
    pub pre_seconds: Option<f64>,
    pub post_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
}

impl CameraClipOverrides {
    /// The camera's clip settings: these overrides on top of `base`.
    pub fn resolve(&self, base: &ClipsConfig) -> ClipsConfig {
        ClipsConfig {
            enabled: self.enabled.unwrap_or(base.enabled),
            pre_seconds: self.pre_seconds.unwrap_or(base.pre_seconds),
            post_seconds: self.post_seconds.unwrap_or(base.post_seconds),
            max_seconds: self.max_seconds.unwrap_or(base.max_seconds),
        }
    }
}

/// A clip being written.
struct OpenClip {
    id: String,
    path: PathBuf,
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    /// Stream time of its first frame (a key frame); its own timestamps count from there.
    first_pts: Duration,
    last_pts: Option<Duration>,
    /// Stream time after which it closes (the event's end + post), once known.
    end_pts: Option<Duration>,
}

struct ClipState {
    camera: String,
    config: ClipsConfig,
    /// Unix time of stream time 0.
    epoch: f64,
    log: ClipLog,
    ring: VecDeque<Unit>,
    open: Vec<OpenClip>,
    /// Events that started before the encoder's first key frame (the run's first frames): their
    /// clips open with it; the stream time of their end + post once known.
    waiting: Vec<(AlertEvent, Option<Duration>)>,
    /// Clips being finished (EOS, `moov` written) on threads of their own.
    closing: Vec<JoinHandle<()>>,
}

/// Creates the two halves of one camera's clips.
pub fn clips(
    camera: &str,
    config: &ClipsConfig,
    epoch: f64,
    log: ClipLog,
) -> (ClipAlerts, ClipFeed) {
    let state = Arc::new(Mutex::new(ClipState {
        camera: camera.to_string(),
        config: config.clone(),
        epoch,
        log,
        ring: VecDeque::new(),
        open: Vec::new(),
        waiting: Vec::new(),
        closing: Vec::new(),
    }));
    (
        ClipAlerts {
            state: Arc::clone(&state),
        },
        ClipFeed { state },
    )
}

fn lock(state: &Mutex<ClipState>) -> MutexGuard<'_, ClipState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stream time of unix time `t` (0 before the stream started).
fn stream_time(epoch: f64, t: f64) -> Duration {
    Duration::try_from_secs_f64(t - epoch).unwrap_or(Duration::ZERO)
}

impl ClipState {
    /// Opens the clip of `event`, starting with the ring's frames from the key frame at or
    /// before its start − `pre_seconds` (the ring's first key frame when it does not reach back
    /// that far).
    fn open(&mut self, event: &AlertEvent) -> Result<(), ClipError> {
        let from = stream_time(self.epoch, event.start_time - self.config.pre_seconds);
        let keys = || self.ring.iter().enumerate().filter(|(_, u)| u.key);
        let start = keys()
            .rfind(|(_, u)| u.pts <= from)
            .or_else(|| keys().next())
            .map(|(index, _)| index);
        let Some(start) = start else {
            return Err(ClipError::NoVideo {
                id: event.id.clone(),
            });
        };
        let first = &self.ring[start];
        let path = self
            .log
            .folder
            .join(&self.camera)
            .join(format!("{}.mp4", event.id));
        let mut clip = OpenClip::create(&event.id, path, first)?;
        for unit in self.ring.range(start..) {
            clip.push(unit)?;
        }
        self.open.push(clip);
        Ok(())
    }

    /// Closes `clip` on a thread of its own; the store learns of it when it is complete.
    fn close(&mut self, clip: OpenClip) {
        self.closing.retain(|thread| !thread.is_finished());
        let log = self.log.clone();
        let camera = self.camera.clone();
        let start = self.epoch + clip.first_pts.as_secs_f64();
        let thread = std::thread::Builder::new()
            .name("clip".into())
            .spawn(move || match clip.finish(Duration::from_secs(10)) {
                Ok(()) => {
                    log::info!("[{camera}] clip {}", clip.path.display());
                    log.done(&clip.id, &clip.path, start);
                }
                Err(error) => log::warn!("[{camera}] {error}"),
            });
        match thread {
            Ok(thread) => self.closing.push(thread),
            Err(e) => log::warn!("[{}] cannot finish a clip: {e}", self.camera),
        }
    }
}

/// Why a clip could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("event {id}: no encoded video yet, so no clip")]
    NoVideo { id: String },
    #[error("clip {path}: {message}")]
    Write { path: PathBuf, message: String },
}

impl OpenClip {
    fn create(id: &str, path: PathBuf, first: &Unit) -> Result<Self, ClipError> {
        let error = |message: String| ClipError::Write {
            path: path.clone(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| error(e.to_string()))?;
        }
        gst::init().map_err(|e| error(e.to_string()))?;
        let pipeline = gst::parse::launch(
            "appsrc name=src format=time ! h264parse ! mp4mux name=mux faststart=true ! \
             filesink name=sink",
        )
        .map_err(|e| error(format!("cannot build the clip writer: {e}")))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| error("the clip writer is not a pipeline".into()))?;
        let appsrc = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or_else(|| error("appsrc missing".into()))?;
        let sink = pipeline
            .by_name("sink")
            .ok_or_else(|| error("filesink missing".into()))?;
        // Written as `.part` files beside the clip (the muxer's data, and the file it rewrites
        // with the index first at the end), renamed when complete: retention never takes a clip
        // being written, and the data counts where the clips are.
        sink.set_property("location", part(&path, "part").to_string_lossy().as_ref());
        if let Some(mux) = pipeline.by_name("mux") {
            mux.set_property(
                "faststart-file",
                part(&path, "data.part").to_string_lossy().as_ref(),
            );
        }
        appsrc.set_caps(Some(&first.caps));
        appsrc.set_format(gst::Format::Time);
        if let Err(e) = pipeline.set_state(gst::State::Playing) {
            let _ = pipeline.set_state(gst::State::Null);
            return Err(error(e.to_string()));
        }
        Ok(Self {
            id: id.to_string(),
            path,
            pipeline,
            appsrc,
            first_pts: first.pts,
            last_pts: None,
            end_pts: None,
        })
    }

    /// Appends one encoded frame, its time counted from the clip's first frame.
    fn push(&mut self, unit: &Unit) -> Result<(), ClipError> {
        if unit.pts < self.first_pts || self.last_pts.is_some_and(|last| unit.pts <= last) {
            return Ok(());
        }
        self.last_pts = Some(unit.pts);
        let mut buffer = unit.buffer.copy();
        let pts = gst::ClockTime::from_nseconds((unit.pts - self.first_pts).as_nanos() as u64);
        if let Some(buffer) = buffer.get_mut() {
            buffer.set_pts(pts);
            buffer.set_dts(pts);
        }
        self.appsrc
            .push_buffer(buffer)
            .map(|_| ())
            .map_err(|e| ClipError::Write {
                path: self.path.clone(),
                message: format!("{e:?}"),
            })
    }

    /// Whether the clip is complete after a frame at `pts` (its end, or its longest length).
    fn done_at(&self, pts: Duration, max_seconds: f64) -> bool {
        self.end_pts.is_some_and(|end| pts >= end)
            || (pts.saturating_sub(self.first_pts)).as_secs_f64() >= max_seconds
    }

    /// Ends the file: EOS, then waits for the muxer to write it.
    fn finish(&self, timeout: Duration) -> Result<(), ClipError> {
        let result = drain(&self.pipeline, &self.appsrc, timeout).map_err(|error| {
            let message = match error {
                Drained::Failed(message) => message,
                Drained::Timeout => format!("not finished within {} s", timeout.as_secs()),
            };
            ClipError::Write {
                path: self.path.clone(),
                message,
            }
        });
        let _ = self.pipeline.set_state(gst::State::Null);
        let _ = std::fs::remove_file(part(&self.path, "data.part"));
        result?;
        std::fs::rename(part(&self.path, "part"), &self.path).map_err(|e| ClipError::Write {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }
}

impl Drop for OpenClip {
    /// A clip dropped unfinished (a push failed, or `finish` failed) stops its pipeline and
    /// deletes its partial files, which would otherwise hold the space retention frees; after a
    /// finished clip's rename there are none.
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
        for suffix in ["part", "data.part"] {
            let _ = std::fs::remove_file(part(&self.path, suffix));
        }
    }
}

/// `<clip>.<suffix>`, e.g. `<id>.mp4.part`.
fn part(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// The alert half: opens and ends clips.
pub struct ClipAlerts {
    state: Arc<Mutex<ClipState>>,
}

impl Sink for ClipAlerts {
    fn alert(
        &mut self,
        event: &AlertEvent,
        _picture: Option<&Picture<'_>>,
    ) -> Result<(), SinkError> {
        let mut state = lock(&self.state);
        match event.kind {
            EventKind::New => match state.open(event) {
                // No video yet (the encoder is starting): the clip opens with its first key frame.
                Err(ClipError::NoVideo { .. }) => state.waiting.push((event.clone(), None)),
                Err(error) => log::warn!("[{}] {error}", state.camera),
                Ok(()) => {}
            },
            EventKind::End => {
                let end = stream_time(
                    state.epoch,
                    event.end_time.unwrap_or(event.start_time) + state.config.post_seconds,
                );
                if let Some(clip) = state.open.iter_mut().find(|clip| clip.id == event.id) {
                    clip.end_pts = Some(end);
                }
                if let Some((_, waiting_end)) = state
                    .waiting
                    .iter_mut()
                    .find(|(waiting, _)| waiting.id == event.id)
                {
                    *waiting_end = Some(end);
                }
            }
            EventKind::Update => {}
        }
        Ok(())
    }
}

/// The video half: keeps the ring, feeds and closes clips.
pub struct ClipFeed {
    state: Arc<Mutex<ClipState>>,
}

impl VideoSink for ClipFeed {
    /// Always: the pre-roll needs the stream before an event starts.
    fn wants(&self) -> bool {
        true
    }

    fn waiting_for_key(&self) -> bool {
        false
    }

    fn unit(&self, unit: &Unit) {
        let mut state = lock(&self.state);
        state.ring.push_back(unit.clone());
        // Keep from the last key frame at or before (now − pre − margin).
        let keep = unit.pts.saturating_sub(Duration::from_secs_f64(
            state.config.pre_seconds + RING_MARGIN,
        ));
        while let Some(next_key) = state
            .ring
            .iter()
            .skip(1)
            .position(|u| u.key && u.pts <= keep)
        {
            state.ring.drain(..=next_key);
        }
        if unit.key {
            for (event, end) in std::mem::take(&mut state.waiting) {
                match state.open(&event) {
                    Ok(()) => {
                        if let Some(clip) = state.open.last_mut() {
                            clip.end_pts = end;
                        }
                    }
                    Err(error) => log::warn!("[{}] {error}", state.camera),
                }
            }
        }
        let max_seconds = state.config.max_seconds;
        let mut index = 0;
        while index < state.open.len() {
            let pushed = state.open[index].push(unit);
            if let Err(error) = &pushed {
                log::warn!("[{}] {error}", state.camera);
            }
            if pushed.is_err() || state.open[index].done_at(unit.pts, max_seconds) {
                let clip = state.open.remove(index);
                state.close(clip);
            } else {
                index += 1;
            }
        }
    }

    /// Closes the clips still open and waits for every clip to be written.
    fn finish(&self, _timeout: Duration) -> SinkReport {
        let mut state = lock(&self.state);
        for (event, _) in std::mem::take(&mut state.waiting) {
            log::warn!("[{}] {}", state.camera, ClipError::NoVideo { id: event.id });
        }
        for clip in std::mem::take(&mut state.open) {
            state.close(clip);
        }
        let closing = std::mem::take(&mut state.closing);
        drop(state);
        for thread in closing {
            let _ = thread.join();
        }
        SinkReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::EndReason;
    use crate::pipeline::sinks::Annotated;
    use crate::pipeline::sinks::encoder::{Encoder, EncoderKind, EncoderRequest};
    use crate::pipeline::sinks::events::{EventWriter, StorageConfig};
    use crate::pipeline::sinks::video::Video;
    use std::time::Instant;

    const EPOCH: f64 = 1000.0;

    fn event(kind: EventKind, end: Option<f64>) -> AlertEvent {
        AlertEvent {
            kind,
            end_time: end,
            end_reason: end.map(|_| EndReason::Cleared),
            ..AlertEvent::sample("line1-1005000-1", "line1", EPOCH + 5.0, 0.9)
        }
    }

    /// Grey level of frame `index` (each frame its own).
    fn grey(index: u32) -> u8 {
        (index * 2 % 250) as u8
    }

    /// Frames (first frame's mean grey, count) of an MP4.
    fn decode(path: &std::path::Path) -> (f64, usize) {
        let pipeline = gst::parse::launch(&format!(
            "filesrc location={} ! qtdemux ! h264parse ! avdec_h264 ! videoconvert ! \
             video/x-raw,format=GRAY8 ! appsink name=sink sync=false",
            path.display()
        ))
        .expect("decoder")
        .downcast::<gst::Pipeline>()
        .expect("pipeline");
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .expect("appsink");
        pipeline.set_state(gst::State::Playing).expect("play");
        let (mut first, mut frames) = (None, 0);
        while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(10)) {
            frames += 1;
            if first.is_none()
                && let Some(map) = sample.buffer().and_then(|b| b.map_readable().ok())
            {
                let bytes = map.as_slice();
                first = Some(bytes.iter().map(|&v| f64::from(v)).sum::<f64>() / bytes.len() as f64);
            }
        }
        let _ = pipeline.set_state(gst::State::Null);
        (first.unwrap_or(-1.0), frames)
    }

    /// 10 frames/s, key frames every 30 (at 0, 3, 6, 9 s); an event from 5 s to 7 s with 1 s of
    /// pre- and post-roll: the clip starts at the key frame at 3 s (the last one at or before
    /// 4 s) and ends at 8 s, so it holds the event's first anomalous frame (5 s).
    #[test]
    fn a_clip_runs_from_the_key_frame_before_the_pre_roll_to_the_post_roll() {
        // The event starts at frame 56; the key frame at or before 5.6 s − 1 s is frame 30.
        let (first, frames) = clip_of_an_event_from(56);
        // I420 is limited range: grey g is luma 16 + g·219/255.
        assert!(
            (first - luma(grey(30))).abs() < 1.5,
            "starts at frame 30 (luma {:.1}), not {first:.1}",
            luma(grey(30))
        );
        assert!((49..=52).contains(&frames), "3 s to 8 s: {frames} frames");
    }

    #[test]
    fn an_event_before_the_first_encoded_frame_gets_a_clip_from_it() {
        // `new` before any frame reached the encoder (the run's first frames): the clip opens
        // with the first key frame, frame 0, and runs to the end + post-roll (8 s).
        let (first, frames) = clip_of_an_event_from(0);
        assert!(
            (first - luma(grey(0))).abs() < 1.5,
            "starts at frame 0 (luma {:.1}), not {first:.1}",
            luma(grey(0))
        );
        assert!((78..=82).contains(&frames), "0 s to 8 s: {frames} frames");
    }

    /// I420 is limited range: grey g is luma 16 + g·219/255.
    fn luma(g: u8) -> f64 {
        16.0 + f64::from(g) * 219.0 / 255.0
    }

    /// 100 frames at 10 frames/s (each its own grey level, a key frame every 3 s) with an event
    /// announced after frame `new_at` (its start time is 5 s) that ends at 7 s, with 1 s of pre-
    /// and post-roll: the clip's first frame's luma and its frame count.
    fn clip_of_an_event_from(new_at: u32) -> (f64, usize) {
        let dir = tempfile::tempdir().expect("dir");
        let storage = StorageConfig {
            path: dir.path().to_path_buf(),
            ..StorageConfig::default()
        };
        let writer = EventWriter::start(&storage, None).expect("writer");
        let config = ClipsConfig {
            enabled: true,
            pre_seconds: 1.0,
            post_seconds: 1.0,
            max_seconds: 60.0,
        };
        let (mut alerts, feed) = clips("line1", &config, EPOCH, writer.clip_log().expect("log"));
        let encoder = Encoder::resolve(EncoderRequest::Only(EncoderKind::X264)).expect("x264");
        let mut video = Box::new(Video::new(
            "line1",
            encoder,
            vec![Arc::new(feed) as Arc<dyn VideoSink>],
            None,
        ));
        let mut feed_frames = |from: u32, to: u32| {
            for index in from..to {
                let rgb = vec![grey(index); 64 * 48 * 3];
                let frame = Annotated {
                    rgb: &rgb,
                    width: 64,
                    height: 48,
                    pts: Duration::from_millis(100) * index,
                    arrived: Instant::now(),
                    fps: 10.0,
                };
                video.frame(&frame).expect("frame");
            }
            // The encoder runs on its own thread: let it catch up.
            std::thread::sleep(Duration::from_millis(300));
        };
        feed_frames(0, new_at);
        alerts
            .alert(&event(EventKind::New, None), None)
            .expect("new");
        feed_frames(new_at, 72);
        alerts
            .alert(&event(EventKind::End, Some(EPOCH + 7.0)), None)
            .expect("end");
        feed_frames(72, 100);
        let report = video.finish(Duration::from_secs(10));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // The writer ends once every sender is gone (in a run, with the workers' sinks).
        drop(alerts);
        writer.finish();
        decode(&dir.path().join("clips/line1/line1-1005000-1.mp4"))
    }
}
