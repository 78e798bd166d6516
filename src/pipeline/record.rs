//! Recordings: annotated frames (I420, or RGB at odd sizes) → appsrc → H.264 (the `encoder`
//! module's choice) → Matroska, one file per run or one per segment (splitmuxsink). Matroska stays
//! playable up to the last written cluster if the process dies, and a finished segment is
//! complete; on a clean stop the recorder sends EOS and waits for the muxer to finish the (last)
//! file.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use crate::pipeline::encoder::{Encoder, KEY_INTERVAL, key_interval_within};
use crate::pipeline::metrics::{CameraMetrics, Stage};
use crate::pipeline::yuv::PixelFormat;

/// Why a recording could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("GStreamer failed to initialise: {0}")]
    Init(String),
    #[error(
        "cannot build the recorder with {encoder} (are gstreamer1.0-plugins-good and -bad installed?): {message}"
    )]
    Build { encoder: String, message: String },
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
    /// `<dir>/<camera>-<started>-%05d.mkv`.
    pub fn for_camera(dir: &Path, camera: &str, started: u64, segment_seconds: f64) -> Self {
        let stem = dir.join(format!("{camera}-{started}"));
        match Duration::try_from_secs_f64(segment_seconds) {
            Ok(length) if !length.is_zero() => Self::Segments {
                // splitmuxsink formats the location printf-style: a `%` of the folder is doubled.
                pattern: format!("{}-%05d.mkv", stem.to_string_lossy().replace('%', "%%")),
                length,
            },
            // A length past Duration's range is no segmenting in practice either.
            _ => Self::File(dir.join(format!("{camera}-{started}.mkv"))),
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

/// Frames handed to the encoder and not out of it yet: (pushed, arrived at the appsink).
type InFlight = Arc<Mutex<VecDeque<(Instant, Instant)>>>;

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
    size: (usize, usize),
    format: PixelFormat,
    last_pts: Option<Duration>,
    frame_duration: Duration,
    /// Frames in the encoder, when its output is timed.
    in_flight: Option<InFlight>,
}

impl Recorder {
    /// Starts writing `destination` with `encoder` for frames of `size` (width, height) at about
    /// `fps` frames/s. With `timing`, each frame's encode time and end-to-end latency (from its
    /// arrival at the appsink) are recorded there when the encoder puts it out.
    pub fn create(
        destination: &Destination,
        size: (usize, usize),
        format: PixelFormat,
        fps: f64,
        encoder: &Encoder,
        timing: Option<Arc<CameraMetrics>>,
    ) -> Result<Self, RecordError> {
        gst::init().map_err(|e| RecordError::Init(e.to_string()))?;
        let fps = if fps.is_finite() && fps > 0.0 {
            fps
        } else {
            25.0
        };
        let description = format!(
            "appsrc name=src format=time ! {} ! h264parse ! {}",
            encoder.chain(destination.key_interval(fps)),
            destination.sink()
        );
        let build_error = |message: String| RecordError::Build {
            encoder: encoder.element().to_string(),
            message,
        };
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
        let rate = gst::Fraction::approximate_f64(fps).unwrap_or(gst::Fraction::new(25, 1));
        let caps = gst::Caps::builder("video/x-raw")
            .field("format", format.caps_name())
            .field("width", size.0 as i32)
            .field("height", size.1 as i32)
            .field("framerate", rate)
            .build();
        appsrc.set_caps(Some(&caps));
        appsrc.set_format(gst::Format::Time);
        let in_flight = match (timing, pipeline.by_name("encoder")) {
            (Some(metrics), Some(encoder)) => Some(time_encoder(&encoder, metrics)),
            _ => None,
        };
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
            size,
            format,
            last_pts: None,
            frame_duration: Duration::from_secs_f64(1.0 / fps),
            in_flight,
        })
    }

    /// Appends one frame (of the recorder's format and size) at stream time `pts`, which reached
    /// the appsink at `arrived`. Frames of another format or size, or with a timestamp not after
    /// the previous one, are skipped.
    pub fn push(
        &mut self,
        pixels: &[u8],
        pts: Duration,
        arrived: Instant,
    ) -> Result<(), RecordError> {
        if pixels.len() != self.format.frame_len(self.size.0, self.size.1) {
            return Ok(());
        }
        if self.last_pts.is_some_and(|last| pts <= last) {
            return Ok(());
        }
        self.last_pts = Some(pts);
        let pts_ns = pts.as_nanos() as u64;
        if let Some(in_flight) = &self.in_flight
            && let Ok(mut in_flight) = in_flight.lock()
        {
            in_flight.push_back((Instant::now(), arrived));
        }
        let mut buffer = gst::Buffer::from_slice(pixels.to_vec());
        if let Some(buffer) = buffer.get_mut() {
            buffer.set_pts(gst::ClockTime::from_nseconds(pts_ns));
            buffer.set_duration(gst::ClockTime::from_nseconds(
                self.frame_duration.as_nanos() as u64,
            ));
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

/// Times frames out of `encoder`: encode = since the recorder took the frame, end to end = since it
/// reached the appsink. Frames are matched by order (x264's timestamps are shifted by 1000 hours
/// to leave room for decoding times), which holds for encoders that put out one frame per frame,
/// in order: x264 tuned for zero latency, openh264 without frame skipping (a skipped frame would
/// shift every later time by one frame), nvh264enc with zerolatency and no B-frames.
/// nvv4l2h264enc is assumed to behave alike (not checked on a Jetson).
fn time_encoder(encoder: &gst::Element, metrics: Arc<CameraMetrics>) -> InFlight {
    let in_flight: InFlight = Arc::default();
    let Some(pad) = encoder.static_pad("src") else {
        return in_flight;
    };
    let pending = Arc::clone(&in_flight);
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        let now = Instant::now();
        if let Some((pushed, arrived)) = pending.lock().ok().and_then(|mut p| p.pop_front()) {
            metrics.stage(Stage::Encode, now - pushed);
            metrics.stage(Stage::EndToEnd, now - arrived);
            metrics.frame_out(now);
        }
        gst::PadProbeReturn::Ok
    });
    in_flight
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::encoder::{EncoderKind, EncoderRequest};

    #[test]
    fn destinations_name_files_and_segments() {
        let dir = Path::new("/rec/100%");
        assert_eq!(
            Destination::for_camera(dir, "line1", 1700000000, 0.0),
            Destination::File(PathBuf::from("/rec/100%/line1-1700000000.mkv"))
        );
        let segments = Destination::for_camera(dir, "line1", 1700000000, 0.5);
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
        // Past Duration's range: one file.
        assert!(matches!(
            Destination::for_camera(dir, "a", 1, 1e300),
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
        let dir = tempfile::tempdir().expect("dir");
        let destination = Destination::for_camera(dir.path(), "line1", 1, 0.5);
        let encoder = Encoder::resolve(EncoderRequest::Only(EncoderKind::X264)).expect("x264");
        let mut recorder = Recorder::create(
            &destination,
            (64, 48),
            PixelFormat::I420,
            12.0,
            &encoder,
            None,
        )
        .expect("recorder");
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
