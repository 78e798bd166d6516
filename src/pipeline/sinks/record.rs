//! `[output.record]`: the camera's encoded video (`video`) → h264parse → Matroska, one file per
//! run or one per segment (splitmuxsink). Matroska stays playable up to the last written cluster
//! if the process dies, and a finished segment is complete; on a clean stop the recorder sends
//! EOS and waits for the muxer to finish the (last) file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use serde::Deserialize;

use super::encoder::{KEY_INTERVAL, key_interval_within};
use super::video::{Unit, VideoSink};
use super::{SinkError, SinkReport};

/// `[output.record]`: annotated recordings, one Matroska file per camera and run, or one per
/// segment (readable even after a crash: Matroska needs no index written at the end).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    /// Write recordings.
    #[serde(default)]
    pub enabled: bool,
    /// Folder for `<camera>-<unix seconds>.mkv`, or `<camera>-<unix seconds>-<00000…>.mkv` with
    /// segments.
    #[serde(default = "default_record_dir")]
    pub dir: PathBuf,
    /// 0: one file per camera and run. More: a new file at least every this many seconds
    /// (fractions allowed), each closed and complete when the next starts.
    #[serde(default)]
    pub segment_seconds: f64,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: default_record_dir(),
            segment_seconds: 0.0,
        }
    }
}

fn default_record_dir() -> PathBuf {
    "recordings".into()
}

/// Why a recording could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("GStreamer failed to initialise: {0}")]
    Init(String),
    #[error(
        "cannot build the recorder (are gstreamer1.0-plugins-good and -bad installed?): {message}"
    )]
    Build { message: String },
    #[error("cannot start the recorder for {destination}: {message}")]
    Start {
        destination: String,
        message: String,
    },
    #[error("recording {destination} failed: {message}")]
    Failed {
        destination: String,
        message: String,
    },
    #[error("recording {destination} did not finish within {seconds:.0} s")]
    Unfinished { destination: String, seconds: f64 },
}

/// Where a recording goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    /// One Matroska file.
    File(PathBuf),
    /// Matroska files of at most `length` each (unless one GOP is longer), named by splitmuxsink's
    /// `location` pattern: `%05d` numbers them from 00000.
    Segments { pattern: String, length: Duration },
}

impl Destination {
    /// `<dir>/<camera>-<started>.mkv`, or with `segment_seconds` > 0
    /// `<dir>/<camera>-<started>-%05d.mkv`; the `restart`-th recording after the first (one
    /// started again after a failure or a new frame size) adds `-r<restart>` to the stem.
    pub fn for_camera(
        dir: &Path,
        camera: &str,
        started: u64,
        restart: u32,
        segment_seconds: f64,
    ) -> Self {
        let name = match restart {
            0 => format!("{camera}-{started}"),
            n => format!("{camera}-{started}-r{n}"),
        };
        let stem = dir.join(&name);
        match Duration::try_from_secs_f64(segment_seconds) {
            Ok(length) if !length.is_zero() => Self::Segments {
                // splitmuxsink formats the location printf-style: a `%` of the folder is doubled.
                pattern: format!("{}-%05d.mkv", stem.to_string_lossy().replace('%', "%%")),
                length,
            },
            // A length past Duration's range is no segmenting in practice either.
            _ => Self::File(dir.join(format!("{name}.mkv"))),
        }
    }

    /// What the sink's `location` property gets.
    fn location(&self) -> String {
        match self {
            Self::File(path) => path.to_string_lossy().into_owned(),
            Self::Segments { pattern, .. } => pattern.clone(),
        }
    }

    /// Frames between key frames: splitmuxsink cuts only before a key frame, so a segment of N
    /// frames needs one at least every N frames (counted in frames at the source's rate: frames
    /// dropped before the recorder stretch a segment in time, not in frames).
    fn key_interval(&self, fps: f64) -> u32 {
        match self {
            Self::File(_) => KEY_INTERVAL,
            Self::Segments { length, .. } => key_interval_within(length.as_secs_f64(), fps),
        }
    }

    /// The muxer and file sink, named `sink` (its `location` is set apart: a path is no
    /// description text).
    fn sink(&self) -> String {
        match self {
            Self::File(_) => "matroskamux ! filesink name=sink".into(),
            // No send-keyframe-requests: a requested key frame lands a frame late when the encoder
            // is ahead of the muxer, which beside the regular ones made 1-frame segments (6, 1,
            // 6, 1, … frames instead of 6, 6, … at 0.5 s and 12 fps); `key_interval` aligns instead.
            Self::Segments { length, .. } => format!(
                "splitmuxsink name=sink muxer-factory=matroskamux max-size-time={}",
                u64::try_from(length.as_nanos()).unwrap_or(u64::MAX)
            ),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Segments { pattern, length } => {
                write!(f, "{pattern} (segments of {} s)", length.as_secs_f64())
            }
        }
    }
}

/// How long after the last segment closed, with none opened since, a segmented recording counts
/// as finished without its EOS (see [`Recorder::segments_settled`]).
const SEGMENT_SETTLE: Duration = Duration::from_secs(1);

/// Encoded bytes waiting in a recorder's appsrc beyond which frames are left out (a disk too
/// slow to keep up) until the queue is below it again and a key frame comes.
const MAX_QUEUED_BYTES: u64 = 32 << 20;

/// An open recording of one camera.
pub struct Recorder {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    destination: Destination,
    /// Segments splitmuxsink has closed so far.
    closed: Vec<PathBuf>,
    /// Whether a segment is open, and when the last one closed.
    segment_open: bool,
    last_closed: Option<Instant>,
    caps: gst::Caps,
    last_pts: Option<Duration>,
    /// Frames are left out until the next key frame (the queue was full).
    skipping: bool,
    /// Frames left out so far.
    skipped: u64,
}

impl Recorder {
    /// Starts writing `destination` with the encoded stream of `caps` (`video/x-h264`).
    pub fn create(destination: &Destination, caps: &gst::Caps) -> Result<Self, RecordError> {
        gst::init().map_err(|e| RecordError::Init(e.to_string()))?;
        let description = format!(
            "appsrc name=src format=time ! h264parse ! {}",
            destination.sink()
        );
        let build_error = |message: String| RecordError::Build { message };
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| build_error(e.to_string()))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| build_error("the recorder description is not a pipeline".into()))?;
        let appsrc = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or_else(|| build_error("appsrc missing".into()))?;
        let sink = pipeline
            .by_name("sink")
            .ok_or_else(|| build_error("the recorder's sink is missing".into()))?;
        sink.set_property("location", destination.location());
        appsrc.set_caps(Some(caps));
        appsrc.set_format(gst::Format::Time);
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| RecordError::Start {
                destination: destination.to_string(),
                message: e.to_string(),
            })?;
        Ok(Self {
            pipeline,
            appsrc,
            destination: destination.clone(),
            closed: Vec::new(),
            segment_open: false,
            last_closed: None,
            caps: caps.clone(),
            last_pts: None,
            skipping: false,
            skipped: 0,
        })
    }

    /// Appends one encoded frame. Frames with a timestamp not after the previous one are skipped;
    /// so are frames while the queue to the file holds more than [`MAX_QUEUED_BYTES`] (memory
    /// stays bounded when the disk cannot keep up), up to the next key frame after it drained,
    /// so that the file stays decodable.
    pub fn push(&mut self, unit: &Unit) -> Result<(), RecordError> {
        if self.last_pts.is_some_and(|last| unit.pts <= last) {
            return Ok(());
        }
        let full = self.appsrc.current_level_bytes() >= MAX_QUEUED_BYTES;
        if full || (self.skipping && !unit.key) {
            if !self.skipping {
                log::warn!(
                    "recording {}: the disk is not keeping up ({} MB queued); frames are left out \
                     up to the next key frame after the queue drains",
                    self.destination,
                    MAX_QUEUED_BYTES >> 20
                );
            }
            self.skipping = true;
            self.skipped += 1;
            return Ok(());
        }
        self.skipping = false;
        self.last_pts = Some(unit.pts);
        if unit.caps != self.caps {
            self.appsrc.set_caps(Some(&unit.caps));
            self.caps = unit.caps.clone();
        }
        // A new buffer sharing the encoded bytes, stamped with the frame's stream time (no
        // reordering: decoding time = presentation time).
        let mut buffer = unit.buffer.copy();
        let pts = gst::ClockTime::from_nseconds(unit.pts.as_nanos() as u64);
        if let Some(buffer) = buffer.get_mut() {
            buffer.set_pts(pts);
            buffer.set_dts(pts);
        }
        self.appsrc
            .push_buffer(buffer)
            .map_err(|e| RecordError::Failed {
                destination: self.destination.to_string(),
                message: format!("{e:?}"),
            })?;
        // Read as it goes: closed segments, and an error (a file that cannot be opened) now.
        while let Some(message) = self.pipeline.bus().and_then(|bus| bus.pop()) {
            self.note(&message)?;
        }
        Ok(())
    }

    /// Follows splitmuxsink's segments (opened, closed: its path kept); an error message becomes
    /// the error.
    fn note(&mut self, message: &gst::Message) -> Result<(), RecordError> {
        match message.view() {
            gst::MessageView::Error(err) => Err(RecordError::Failed {
                destination: self.destination.to_string(),
                message: err.error().to_string(),
            }),
            gst::MessageView::Element(element) => {
                let Some(structure) = element.structure() else {
                    return Ok(());
                };
                match structure.name().as_str() {
                    "splitmuxsink-fragment-opened" => self.segment_open = true,
                    "splitmuxsink-fragment-closed" => {
                        self.segment_open = false;
                        self.last_closed = Some(Instant::now());
                        if let Ok(location) = structure.get::<String>("location") {
                            self.closed.push(PathBuf::from(location));
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The files written, once the pipeline has ended.
    fn files(&mut self) -> Vec<PathBuf> {
        match &self.destination {
            Destination::File(path) => vec![path.clone()],
            Destination::Segments { .. } => std::mem::take(&mut self.closed),
        }
    }

    /// Whether at `now`, EOS having been sent at `eos_sent`, the last segment has closed and
    /// nothing opened for [`SEGMENT_SETTLE`]. GStreamer 1.22.0's splitmuxsink sometimes drops the
    /// final EOS as if it ended a segment ("Caught EOS at end of fragment, dropping") after
    /// closing the last file completely, and the pipeline never posts EOS: up to half of 16 runs
    /// of `gst-launch-1.0 videotestsrc num-buffers=24 ! … ! x264enc key-int-max=6 ! h264parse !
    /// splitmuxsink max-size-time=500000000` hung so here (none of 12 `stpm run`s did).
    fn segments_settled(&self, eos_sent: Instant, now: Instant) -> bool {
        let quiet_since = |t: Instant| now.saturating_duration_since(t) >= SEGMENT_SETTLE;
        matches!(self.destination, Destination::Segments { .. })
            && !self.segment_open
            && quiet_since(eos_sent)
            && self.last_closed.is_some_and(quiet_since)
    }

    /// Sends EOS and waits (up to `timeout`) until the file, or the last segment, is complete;
    /// returns the files written.
    pub fn finish(mut self, timeout: Duration) -> Result<Vec<PathBuf>, RecordError> {
        if self.skipped > 0 {
            log::warn!(
                "recording {}: {} frame(s) were left out while the disk did not keep up",
                self.destination,
                self.skipped
            );
        }
        let _ = self.appsrc.end_of_stream();
        let eos_sent = Instant::now();
        let mut result = Err(RecordError::Unfinished {
            destination: self.destination.to_string(),
            seconds: timeout.as_secs_f64(),
        });
        if let Some(bus) = self.pipeline.bus() {
            while eos_sent.elapsed() < timeout {
                if self.segments_settled(eos_sent, Instant::now()) {
                    result = Ok(self.files());
                    break;
                }
                let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
                    continue;
                };
                if let gst::MessageView::Eos(_) = message.view() {
                    result = Ok(self.files());
                    break;
                }
                if let Err(message) = self.note(&message) {
                    result = Err(message);
                    break;
                }
            }
        }
        let _ = self.pipeline.set_state(gst::State::Null);
        result
    }
}

impl Drop for Recorder {
    /// A recorder dropped unfinished (its push failed) stops its pipeline; GStreamer warns about
    /// disposing a playing one.
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Whether two `video/x-h264` caps have the same width and height.
fn same_size(a: &gst::Caps, b: &gst::Caps) -> bool {
    let size = |caps: &gst::Caps| {
        caps.structure(0).map(|s| {
            (
                s.get::<i32>("width").unwrap_or(0),
                s.get::<i32>("height").unwrap_or(0),
            )
        })
    };
    size(a) == size(b)
}

/// After a recorder could not start or failed, how long before the next try; doubled at each
/// failure in a row (a disk that stays full), up to [`RETRY_AT_MOST`].
const RETRY_AFTER: Duration = Duration::from_secs(10);
const RETRY_AT_MOST: Duration = Duration::from_secs(600);
/// A recorder that ran this long without failing ends a run of failures.
const RECOVERED_AFTER: Duration = Duration::from_secs(60);

/// The pause before the next recorder after `failures` failures in a row (1 or more).
fn retry_delay(failures: u32) -> Duration {
    RETRY_AFTER
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_AT_MOST)
}

/// Where a recording's files go.
enum Naming {
    /// `<dir>/<camera>-<stream time 0 in unix seconds>.mkv` (or its segments): the file's
    /// timestamps are stream time, so name + timestamp is the wall-clock time of a frame.
    Camera {
        dir: PathBuf,
        camera: String,
        started: u64,
        segment_seconds: f64,
    },
    /// Always this destination.
    Fixed(Destination),
}

/// The recording sink of one camera: a [`Recorder`] started on the first key frame, and again
/// (under a new name) after one failed.
pub struct Recording {
    naming: Naming,
    state: Mutex<RecordingState>,
}

#[derive(Default)]
struct RecordingState {
    recorder: Option<Recorder>,
    files: Vec<PathBuf>,
    errors: Vec<RecordError>,
    /// No new recorder before this (one failed to start).
    retry_at: Option<Instant>,
    /// Recorders started so far.
    started: u32,
    /// Recorders that failed in a row, and when the current one started.
    failures: u32,
    since: Option<Instant>,
}

impl Recording {
    /// `camera`'s recording as `config` says (the caller checks `config.enabled`), of a stream
    /// whose time 0 was unix second `started`.
    pub fn new(camera: &str, config: &RecordConfig, started: u64) -> Self {
        Self {
            naming: Naming::Camera {
                dir: config.dir.clone(),
                camera: camera.to_string(),
                started,
                segment_seconds: config.segment_seconds,
            },
            state: Mutex::default(),
        }
    }

    /// A recording to `destination`.
    pub fn to(destination: Destination) -> Self {
        Self {
            naming: Naming::Fixed(destination),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn destination(&self, state: &mut RecordingState) -> Destination {
        let restart = state.started;
        state.started += 1;
        match &self.naming {
            Naming::Fixed(destination) => destination.clone(),
            Naming::Camera {
                dir,
                camera,
                started,
                segment_seconds,
            } => Destination::for_camera(dir, camera, *started, restart, *segment_seconds),
        }
    }
}

impl VideoSink for Recording {
    fn wants(&self) -> bool {
        true
    }

    fn waiting_for_key(&self) -> bool {
        let state = self.lock();
        state.recorder.is_none() && state.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    fn key_interval(&self, fps: f64) -> u32 {
        match &self.naming {
            Naming::Fixed(destination) => destination.key_interval(fps),
            Naming::Camera {
                segment_seconds, ..
            } => {
                Destination::for_camera(Path::new(""), "", 0, 0, *segment_seconds).key_interval(fps)
            }
        }
    }

    fn unit(&self, unit: &Unit) {
        let mut state = self.lock();
        // A new frame size (the encode started again) starts a new file at its first key frame.
        if unit.key
            && let Some(recorder) = state.recorder.take_if(|r| !same_size(&r.caps, &unit.caps))
        {
            match recorder.finish(Duration::from_secs(5)) {
                Ok(files) => state.files.extend(files),
                Err(error) => state.errors.push(error),
            }
        }
        if state.recorder.is_none() {
            if !unit.key || state.retry_at.is_some_and(|at| Instant::now() < at) {
                return;
            }
            let destination = self.destination(&mut state);
            match Recorder::create(&destination, &unit.caps) {
                Ok(recorder) => {
                    match &self.naming {
                        Naming::Camera { camera, .. } => {
                            log::info!("[{camera}] recording to {destination}")
                        }
                        Naming::Fixed(_) => log::debug!("recording to {destination}"),
                    }
                    state.recorder = Some(recorder);
                    state.retry_at = None;
                    state.since = Some(Instant::now());
                }
                Err(error) => {
                    state.errors.push(error);
                    state.failures += 1;
                    state.retry_at = Some(Instant::now() + retry_delay(state.failures));
                    return;
                }
            }
        }
        let pushed = state.recorder.as_mut().map(|recorder| recorder.push(unit));
        match pushed {
            Some(Err(error)) => {
                state.errors.push(error);
                // The next file after a pause: a full disk would fail a new one at every key
                // frame, and leave an empty file each time.
                state.failures += 1;
                state.retry_at = Some(Instant::now() + retry_delay(state.failures));
                if let Some(mut recorder) = state.recorder.take() {
                    let files = recorder.files();
                    for file in files {
                        if std::fs::metadata(&file).is_ok_and(|meta| meta.len() == 0) {
                            let _ = std::fs::remove_file(&file);
                        } else {
                            state.files.push(file);
                        }
                    }
                }
            }
            Some(Ok(()))
                if state
                    .since
                    .is_some_and(|at| at.elapsed() >= RECOVERED_AFTER) =>
            {
                state.failures = 0;
            }
            _ => {}
        }
    }

    fn take_errors(&self) -> Vec<SinkError> {
        let mut state = self.lock();
        state.errors.drain(..).map(SinkError::from).collect()
    }

    fn finish(&self, timeout: Duration) -> SinkReport {
        let mut state = self.lock();
        if let Some(recorder) = state.recorder.take() {
            match recorder.finish(timeout) {
                Ok(files) => state.files.extend(files),
                Err(error) => state.errors.push(error),
            }
        }
        SinkReport {
            files: std::mem::take(&mut state.files),
            errors: state.errors.drain(..).map(SinkError::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that stays full is tried again after 10 s, then twice as long at each failure in a
    /// row, never more than ten minutes apart.
    #[test]
    fn failed_recorders_are_retried_ever_less_often() {
        let seconds: Vec<u64> = [1, 2, 3, 4, 6, 7, 40, u32::MAX]
            .map(|failures| retry_delay(failures).as_secs())
            .to_vec();
        assert_eq!(seconds, [10, 20, 40, 80, 320, 600, 600, 600]);
    }

    #[test]
    fn destinations_name_files_and_segments() {
        let dir = Path::new("/rec/100%");
        assert_eq!(
            Destination::for_camera(dir, "line1", 1700000000, 0, 0.0),
            Destination::File(PathBuf::from("/rec/100%/line1-1700000000.mkv"))
        );
        let segments = Destination::for_camera(dir, "line1", 1700000000, 0, 0.5);
        assert_eq!(
            segments,
            Destination::Segments {
                pattern: "/rec/100%%/line1-1700000000-%05d.mkv".into(),
                length: Duration::from_millis(500),
            }
        );
        assert_eq!(segments.key_interval(12.0), 6);
        assert!(segments.sink().ends_with("max-size-time=500000000"));
        assert_eq!(
            segments.to_string(),
            "/rec/100%%/line1-1700000000-%05d.mkv (segments of 0.5 s)"
        );
        assert_eq!(
            Destination::for_camera(dir, "line1", 1700000000, 2, 0.0),
            Destination::File(PathBuf::from("/rec/100%/line1-1700000000-r2.mkv"))
        );
        // Past Duration's range: one file.
        assert!(matches!(
            Destination::for_camera(dir, "a", 1, 0, 1e300),
            Destination::File(_)
        ));
    }

    /// A splitmuxsink message as the bus carries it.
    fn fragment(name: &str, location: &str) -> gst::Message {
        gst::message::Element::new(
            gst::Structure::builder(name)
                .field("location", location)
                .build(),
        )
    }

    #[test]
    fn a_segmented_recording_settles_after_its_last_segment_closed() {
        gst::init().expect("gst init");
        let dir = tempfile::tempdir().expect("dir");
        let destination = Destination::for_camera(dir.path(), "line1", 1, 0, 0.5);
        let caps = gst::Caps::builder("video/x-h264")
            .field("stream-format", "byte-stream")
            .field("alignment", "au")
            .build();
        let mut recorder = Recorder::create(&destination, &caps).expect("recorder");
        let eos_sent = Instant::now();
        let later = eos_sent + SEGMENT_SETTLE * 2;
        assert!(
            !recorder.segments_settled(eos_sent, later),
            "nothing closed"
        );
        for message in [
            fragment("splitmuxsink-fragment-opened", "a-00000.mkv"),
            fragment("splitmuxsink-fragment-closed", "a-00000.mkv"),
        ] {
            recorder.note(&message).expect("no error");
        }
        assert!(recorder.segments_settled(eos_sent, later));
        assert!(!recorder.segments_settled(eos_sent, eos_sent + SEGMENT_SETTLE / 2));
        recorder
            .note(&fragment("splitmuxsink-fragment-opened", "a-00001.mkv"))
            .expect("no error");
        assert!(
            !recorder.segments_settled(eos_sent, later),
            "a segment is open"
        );
        assert_eq!(recorder.files(), [PathBuf::from("a-00000.mkv")]);
    }
}
