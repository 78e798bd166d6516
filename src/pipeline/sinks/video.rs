//! A camera's video: annotated frames → I420 (`yuv`) → one H.264 encode (the `encoder` module's
//! element) → the encoded stream, fanned out to the [`VideoSink`]s that want it now (the recording,
//! the RTSP feed). Frames are encoded only while one of them wants video, once however many do:
//! before, the recording and RTSP each ran their own encoder on the same frame.
//!
//! A video sink that starts wanting video mid-stream (an RTSP client connects, a recording starts
//! again after an error) waits for a key frame, and the encoder is asked for one at once instead
//! of at the next regular one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::encoder::{Encoder, KEY_INTERVAL};
use super::yuv::{self, PixelFormat};
use super::{Annotated, Sink, SinkError, SinkReport};
use crate::pipeline::metrics::{CameraMetrics, Stage};

/// Frames after a key-frame request before asking again, while a sink still waits for one.
const KEY_REQUEST_EVERY: u32 = 10;

/// Raw frames waiting for the encoder, at most: a frame that finds the queue full waits up to
/// [`QUEUE_WAIT`] for room (the encoder starting up, a burst), then is not encoded (the encoder
/// cannot keep up), so memory and latency stay bounded.
const QUEUED_FRAMES: u64 = 30;
const QUEUE_WAIT: Duration = Duration::from_millis(500);

/// After an encode failed to start or broke, how long before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// One encoded frame (an H.264 access unit, byte-stream, with SPS/PPS before key frames).
#[derive(Debug, Clone)]
pub struct Unit {
    /// The encoded bytes; its timestamps are the encoder's (shifted), use [`Unit::pts`].
    pub buffer: gst::Buffer,
    /// `video/x-h264` caps of the stream (size, rate, profile), for the sink's appsrc.
    pub caps: gst::Caps,
    /// Stream time of the frame it encodes.
    pub pts: Duration,
    /// A key frame: decoding can start here.
    pub key: bool,
}

/// An output of the encoded video. Called on the encoder's streaming thread: [`VideoSink::unit`]
/// must hand the unit on and return (an appsrc push), never wait.
pub trait VideoSink: Send + Sync {
    /// Whether it takes the encoded stream now (a recording always; RTSP while a client watches).
    fn wants(&self) -> bool;

    /// Whether it wants video but cannot start before a key frame.
    fn waiting_for_key(&self) -> bool;

    /// The most frames it can take between key frames at `fps` (segments are cut at key frames).
    fn key_interval(&self, _fps: f64) -> u32 {
        KEY_INTERVAL
    }

    /// One encoded frame, in order, only while it [`wants`](VideoSink::wants) video.
    fn unit(&self, unit: &Unit);

    /// Problems since the last call (a recording that failed and starts over).
    fn take_errors(&self) -> Vec<SinkError> {
        Vec::new()
    }

    /// After the last unit: completes what is open (waiting at most `timeout`).
    fn finish(&self, _timeout: Duration) -> SinkReport {
        SinkReport::default()
    }
}

/// Why the encode could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("GStreamer failed to initialise: {0}")]
    Init(String),
    #[error(
        "cannot build the {encoder} encode (is gstreamer1.0-plugins-bad installed, for h264parse?): {message}"
    )]
    Build { encoder: String, message: String },
    #[error("camera {camera}: the {encoder} encode failed: {message}")]
    Failed {
        camera: String,
        encoder: String,
        message: String,
    },
    #[error("camera {camera}: the {encoder} encode did not finish within {seconds:.0} s")]
    Unfinished {
        camera: String,
        encoder: String,
        seconds: f64,
    },
}

/// Frames handed to the encoder and not out of it yet: (pushed, arrived at the appsink).
type InFlight = Arc<Mutex<VecDeque<(Instant, Instant)>>>;

/// The encode while it runs.
struct Running {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    encoder: gst::Element,
    format: PixelFormat,
    size: (usize, usize),
    frame_duration: Duration,
    last_pts: Option<Duration>,
    in_flight: Option<InFlight>,
    /// Frames pushed since the last key frame was asked for (or the encode started).
    since_key_request: u32,
}

/// One camera's encode and its video sinks.
pub struct Video {
    camera: String,
    encoder: Encoder,
    sinks: Arc<[Arc<dyn VideoSink>]>,
    metrics: Option<Arc<CameraMetrics>>,
    running: Option<Running>,
    /// Errors not reported yet (one per `frame` call).
    pending: VecDeque<SinkError>,
    /// No new encode before this (the last one failed).
    retry_at: Option<Instant>,
    /// Frames not encoded because the encoder was behind, since the last report.
    skipped: u64,
}

impl Video {
    /// The video of `camera`, encoded with `encoder` for `sinks`. With `metrics`, every frame's
    /// encode time and end-to-end latency (appsink to encoded frame) are recorded there.
    pub fn new(
        camera: &str,
        encoder: Encoder,
        sinks: Vec<Arc<dyn VideoSink>>,
        metrics: Option<Arc<CameraMetrics>>,
    ) -> Self {
        Self {
            camera: camera.to_string(),
            encoder,
            sinks: sinks.into(),
            metrics,
            running: None,
            pending: VecDeque::new(),
            retry_at: None,
            skipped: 0,
        }
    }

    /// Starts the encode for frames of `format` and `size` at about `fps`.
    fn start(
        &self,
        format: PixelFormat,
        size: (usize, usize),
        fps: f64,
    ) -> Result<Running, VideoError> {
        gst::init().map_err(|e| VideoError::Init(e.to_string()))?;
        // A source's rate can be anything (a file's header): outside 0.1 to 1000 frames/s, 25.
        let fps = if (0.1..=1000.0).contains(&fps) {
            fps
        } else {
            25.0
        };
        let key_interval = self
            .sinks
            .iter()
            .map(|sink| sink.key_interval(fps))
            .min()
            .unwrap_or(KEY_INTERVAL);
        // SPS/PPS before every key frame: a recording segment or an RTSP client starts there.
        let description = format!(
            "appsrc name=src format=time ! {} ! h264parse config-interval=-1 ! \
             video/x-h264,stream-format=byte-stream,alignment=au ! \
             appsink name=sink sync=false enable-last-sample=false",
            self.encoder.chain(key_interval)
        );
        let build_error = |message: String| VideoError::Build {
            encoder: self.encoder.element().to_string(),
            message,
        };
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| build_error(e.to_string()))?
            .downcast::<gst::Pipeline>()
            .map_err(|_| build_error("the encode description is not a pipeline".into()))?;
        let appsrc = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or_else(|| build_error("appsrc missing".into()))?;
        let appsink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or_else(|| build_error("appsink missing".into()))?;
        let encoder = pipeline
            .by_name("encoder")
            .ok_or_else(|| build_error("the encoder element is missing".into()))?;
        let rate = gst::Fraction::approximate_f64(fps).unwrap_or(gst::Fraction::new(25, 1));
        appsrc.set_caps(Some(
            &gst::Caps::builder("video/x-raw")
                .field("format", format.caps_name())
                .field("width", size.0 as i32)
                .field("height", size.1 as i32)
                .field("framerate", rate)
                .build(),
        ));
        appsrc.set_format(gst::Format::Time);
        let sinks = Arc::clone(&self.sinks);
        appsink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |appsink| {
                    let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    if let Some(unit) = unit_of(&sample) {
                        for sink in sinks.iter().filter(|sink| sink.wants()) {
                            sink.unit(&unit);
                        }
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let in_flight = self
            .metrics
            .as_ref()
            .map(|metrics| time_encoder(&encoder, Arc::clone(metrics)));
        if let Err(e) = pipeline.set_state(gst::State::Playing) {
            let _ = pipeline.set_state(gst::State::Null);
            return Err(self.failed(e.to_string()));
        }
        log::info!(
            "[{}] encoding the annotated video ({}, {}×{}, a key frame at least every {key_interval} frames)",
            self.camera,
            self.encoder.element(),
            size.0,
            size.1
        );
        Ok(Running {
            pipeline,
            appsrc,
            encoder,
            format,
            size,
            frame_duration: Duration::from_secs_f64(1.0 / fps),
            last_pts: None,
            in_flight,
            since_key_request: 0,
        })
    }

    fn failed(&self, message: String) -> VideoError {
        VideoError::Failed {
            camera: self.camera.clone(),
            encoder: self.encoder.element().to_string(),
            message,
        }
    }

    /// Encodes one frame for the sinks that want it. An encode that failed is dropped and tried
    /// again after [`RETRY_AFTER`]; frames of a new size end the running encode (its frames
    /// reach the sinks) and start another.
    fn encode(&mut self, frame: &Annotated<'_>) -> Result<(), VideoError> {
        let out = yuv::for_encoder(frame.rgb, frame.width, frame.height);
        let size = (out.width, out.height);
        if let Some(running) = &self.running
            && (running.format, running.size) != (out.format, size)
        {
            log::info!(
                "[{}] frames changed from {}×{} to {}×{}: the video starts a new encode",
                self.camera,
                running.size.0,
                running.size.1,
                size.0,
                size.1
            );
            self.stop_encode(Duration::from_secs(5))?;
        }
        if self.running.is_none() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return Ok(());
            }
            match self.start(out.format, size, frame.fps) {
                Ok(running) => {
                    self.running = Some(running);
                    self.retry_at = None;
                }
                Err(error) => {
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                    return Err(error);
                }
            }
        }
        let waiting = self.sinks.iter().any(|s| s.wants() && s.waiting_for_key());
        let Some(running) = self.running.as_mut() else {
            return Ok(());
        };
        if running.last_pts.is_some_and(|last| frame.pts <= last) {
            return Ok(());
        }
        let waited = Instant::now();
        while running.appsrc.current_level_buffers() >= QUEUED_FRAMES
            && waited.elapsed() < QUEUE_WAIT
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if running.appsrc.current_level_buffers() >= QUEUED_FRAMES {
            self.skipped += 1;
            if self.skipped.is_power_of_two() {
                log::warn!(
                    "[{}] the {} encoder is behind: {} frame(s) not encoded so far",
                    self.camera,
                    self.encoder.element(),
                    self.skipped
                );
            }
            return Ok(());
        }
        running.last_pts = Some(frame.pts);
        running.since_key_request += 1;
        if waiting && running.since_key_request > KEY_REQUEST_EVERY {
            running.since_key_request = 0;
            let request = gstreamer_video::UpstreamForceKeyUnitEvent::builder()
                .all_headers(true)
                .build();
            if let Some(pad) = running.encoder.static_pad("src") {
                pad.send_event(request);
            }
        }
        if let Some(in_flight) = &running.in_flight
            && let Ok(mut in_flight) = in_flight.lock()
        {
            in_flight.push_back((Instant::now(), frame.arrived));
        }
        let mut buffer = gst::Buffer::from_slice(out.data);
        if let Some(buffer) = buffer.get_mut() {
            buffer.set_pts(gst::ClockTime::from_nseconds(frame.pts.as_nanos() as u64));
            buffer.set_duration(gst::ClockTime::from_nseconds(
                running.frame_duration.as_nanos() as u64,
            ));
        }
        let pushed = running.appsrc.push_buffer(buffer);
        let mut error = pushed.err().map(|e| format!("{e:?}"));
        while let Some(message) = running.pipeline.bus().and_then(|bus| bus.pop()) {
            if let gst::MessageView::Error(err) = message.view() {
                error.get_or_insert_with(|| err.error().to_string());
            }
        }
        match error {
            Some(message) => {
                if let Some(running) = self.running.take() {
                    let _ = running.pipeline.set_state(gst::State::Null);
                }
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                Err(self.failed(message))
            }
            None => Ok(()),
        }
    }

    /// Ends the running encode: every frame pushed comes out to the sinks (waiting at most
    /// `timeout`), then the pipeline stops.
    fn stop_encode(&mut self, timeout: Duration) -> Result<(), VideoError> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let drained = drain(&running.pipeline, &running.appsrc, timeout);
        let _ = running.pipeline.set_state(gst::State::Null);
        drained.map_err(|error| match error {
            Drained::Failed(message) => self.failed(message),
            Drained::Timeout => VideoError::Unfinished {
                camera: self.camera.clone(),
                encoder: self.encoder.element().to_string(),
                seconds: timeout.as_secs_f64(),
            },
        })
    }
}

impl Sink for Video {
    fn frame(&mut self, frame: &Annotated<'_>) -> Result<(), SinkError> {
        if self.sinks.iter().any(|sink| sink.wants())
            && let Err(error) = self.encode(frame)
        {
            self.pending.push_back(error.into());
        }
        for sink in self.sinks.iter() {
            self.pending.extend(sink.take_errors());
        }
        match self.pending.pop_front() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Ends the encode (every frame pushed comes out to the sinks), then finishes the sinks.
    fn finish(mut self: Box<Self>, timeout: Duration) -> SinkReport {
        let mut report = SinkReport {
            files: Vec::new(),
            errors: self.pending.drain(..).collect(),
        };
        if let Err(error) = self.stop_encode(timeout) {
            report.errors.push(error.into());
        }
        for sink in self.sinks.iter() {
            report.errors.extend(sink.take_errors());
            let finished = sink.finish(timeout);
            report.files.extend(finished.files);
            report.errors.extend(finished.errors);
        }
        report
    }
}

impl Drop for Video {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.pipeline.set_state(gst::State::Null);
        }
    }
}

/// How waiting for a pipeline's end of stream went wrong.
pub(super) enum Drained {
    Failed(String),
    Timeout,
}

/// Sends EOS into `appsrc` and waits (at most `timeout`) until `pipeline` has handled its last
/// buffer (every frame out of the encoder, or a muxer's file written).
pub(super) fn drain(
    pipeline: &gst::Pipeline,
    appsrc: &gst_app::AppSrc,
    timeout: Duration,
) -> Result<(), Drained> {
    let _ = appsrc.end_of_stream();
    let Some(bus) = pipeline.bus() else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Drained::Timeout);
        }
        let Some(message) = bus.timed_pop(gst::ClockTime::from_nseconds(left.as_nanos() as u64))
        else {
            continue;
        };
        match message.view() {
            gst::MessageView::Eos(_) => return Ok(()),
            gst::MessageView::Error(err) => return Err(Drained::Failed(err.error().to_string())),
            _ => {}
        }
    }
}

/// The unit of an encoded sample: its stream time is the buffer's running time (encoders shift
/// their output timestamps, x264 by 1000 hours, and say so in the segment). A sample without one
/// is dropped: its raw timestamp would put every later frame behind it.
fn unit_of(sample: &gst::Sample) -> Option<Unit> {
    let buffer = sample.buffer_owned()?;
    let caps = sample.caps_owned()?;
    let pts = buffer.pts()?;
    let running = sample
        .segment()
        .and_then(|segment| segment.downcast_ref::<gst::ClockTime>())
        .and_then(|segment| segment.to_running_time(pts))?;
    Some(Unit {
        key: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
        buffer,
        caps,
        pts: Duration::from_nanos(running.nseconds()),
    })
}

/// Times frames out of `encoder`: encode = since the frame was pushed, end to end = since it
/// reached the appsink. Frames are matched by order, which holds for encoders that put out one
/// frame per frame, in order: x264 tuned for zero latency, openh264 without frame skipping (a
/// skipped frame would shift every later time by one frame), nvh264enc with zerolatency and no
/// B-frames. nvv4l2h264enc is assumed to behave alike (not checked on a Jetson).
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
    use crate::pipeline::sinks::encoder::{EncoderKind, EncoderRequest};

    /// Collects what it is given while `wanting`; waits for a key frame after each start.
    #[derive(Default)]
    struct Collect {
        wanting: Mutex<bool>,
        keyed: Mutex<bool>,
        units: Mutex<Vec<(Duration, bool, usize)>>,
    }

    impl VideoSink for Collect {
        fn wants(&self) -> bool {
            self.wanting.lock().is_ok_and(|w| *w)
        }
        fn waiting_for_key(&self) -> bool {
            self.keyed.lock().is_ok_and(|k| !*k)
        }
        fn key_interval(&self, _fps: f64) -> u32 {
            8
        }
        fn unit(&self, unit: &Unit) {
            if let (Ok(mut keyed), Ok(mut units)) = (self.keyed.lock(), self.units.lock()) {
                *keyed |= unit.key;
                if *keyed {
                    units.push((unit.pts, unit.key, unit.buffer.size()));
                }
            }
        }
    }

    impl Collect {
        fn want(&self, wanting: bool) {
            if let (Ok(mut w), Ok(mut k)) = (self.wanting.lock(), self.keyed.lock()) {
                *w = wanting;
                *k = false;
            }
        }
        fn taken(&self) -> Vec<(Duration, bool, usize)> {
            self.units.lock().map(|u| u.clone()).unwrap_or_default()
        }
    }

    fn frame(rgb: &[u8], index: u32) -> Annotated<'_> {
        Annotated {
            rgb,
            width: 64,
            height: 48,
            pts: Duration::from_millis(100) * index,
            arrived: Instant::now(),
            fps: 10.0,
        }
    }

    #[test]
    fn one_encode_feeds_every_sink_and_a_late_sink_starts_on_a_requested_key_frame() {
        let encoder = Encoder::resolve(EncoderRequest::Only(EncoderKind::X264)).expect("x264");
        let early = Arc::new(Collect::default());
        let late = Arc::new(Collect::default());
        early.want(true);
        let mut video = Box::new(Video::new(
            "line1",
            encoder,
            vec![early.clone() as Arc<dyn VideoSink>, late.clone()],
            None,
        ));
        let mut rgb = vec![0u8; 64 * 48 * 3];
        for index in 0..40u32 {
            // A changing picture, so that frames are not all skipped as identical.
            rgb.iter_mut().enumerate().for_each(|(i, v)| {
                *v = ((i as u32 + index * 7) % 251) as u8;
            });
            if index == 13 {
                late.want(true);
            }
            video.frame(&frame(&rgb, index)).expect("frame");
        }
        let report = video.finish(Duration::from_secs(10));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let early = early.taken();
        assert_eq!(early.len(), 40, "every frame encoded once");
        let times: Vec<Duration> = early.iter().map(|u| u.0).collect();
        let expected: Vec<Duration> = (0..40).map(|i| Duration::from_millis(100) * i).collect();
        assert_eq!(times, expected, "stream times survive the encoder's shift");
        // Regular key frames at most 8 apart (the sink's interval), the first one first.
        assert!(early[0].1);
        let keys: Vec<usize> = (0..40).filter(|&i| early[i].1).collect();
        assert!(keys.windows(2).all(|w| w[1] - w[0] <= 8), "{keys:?}");
        // The late sink started on a key frame asked for when it joined, not 8 frames later.
        let late = late.taken();
        assert!(late[0].1, "starts on a key frame");
        let joined = late[0].0;
        assert!(
            joined <= Duration::from_millis(1500),
            "joined at frame 13, first key frame at {joined:?}"
        );
        assert_eq!(late.last().map(|u| u.0), Some(Duration::from_millis(3900)));
        // Both got the same stream from that point on.
        let from = early
            .iter()
            .position(|u| u.0 == joined)
            .expect("same frame");
        assert_eq!(early[from..], late[..]);
    }

    #[test]
    fn a_new_frame_size_starts_a_new_encode_on_a_key_frame() {
        let encoder = Encoder::resolve(EncoderRequest::Only(EncoderKind::X264)).expect("x264");
        let sink = Arc::new(Collect::default());
        sink.want(true);
        let mut video = Box::new(Video::new(
            "line1",
            encoder,
            vec![sink.clone() as Arc<dyn VideoSink>],
            None,
        ));
        let big = vec![100u8; 64 * 48 * 3];
        let small = vec![150u8; 32 * 24 * 3];
        for index in 0..12u32 {
            let mut frame = frame(&big, index);
            if index >= 6 {
                frame = Annotated {
                    rgb: &small,
                    width: 32,
                    height: 24,
                    ..frame
                };
            }
            video.frame(&frame).expect("frame");
        }
        let report = video.finish(Duration::from_secs(10));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let taken = sink.taken();
        assert_eq!(taken.len(), 12, "every frame of both sizes: {taken:?}");
        assert!(
            taken[0].1 && taken[6].1,
            "each encode starts on a key frame"
        );
    }

    #[test]
    fn nothing_is_encoded_while_no_sink_wants_video() {
        let encoder = Encoder::resolve(EncoderRequest::Only(EncoderKind::X264)).expect("x264");
        let idle = Arc::new(Collect::default());
        let mut video = Box::new(Video::new(
            "line1",
            encoder,
            vec![idle.clone() as Arc<dyn VideoSink>],
            None,
        ));
        let rgb = vec![90u8; 64 * 48 * 3];
        for index in 0..5 {
            video.frame(&frame(&rgb, index)).expect("frame");
        }
        assert!(video.running.is_none(), "no encode started");
        let report = video.finish(Duration::from_secs(5));
        assert!(report.errors.is_empty() && report.files.is_empty());
        assert!(idle.taken().is_empty());
    }
}
