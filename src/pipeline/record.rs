//! Recordings: annotated RGB frames → appsrc → H.264 (the `encoder` module's choice) → Matroska file. Matroska
//! stays playable up to the last written cluster if the process dies; on a clean stop the recorder
//! sends EOS and waits for the muxer to finish the file.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use crate::pipeline::encoder::{Encoder, KEY_INTERVAL};
use crate::pipeline::metrics::{CameraMetrics, Stage};

/// Frames handed to the encoder and not out of it yet: (pushed, arrived at the appsink).
type InFlight = Arc<Mutex<VecDeque<(Instant, Instant)>>>;

/// An open recording of one camera.
pub struct Recorder {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    path: PathBuf,
    size: (usize, usize),
    last_pts: Option<Duration>,
    frame_duration: Duration,
    /// Frames in the encoder, when its output is timed.
    in_flight: Option<InFlight>,
}

impl Recorder {
    /// Starts writing `path` with `encoder` for frames of `size` (width, height) at about `fps`
    /// frames/s. With `timing`, each frame's encode time and end-to-end latency (from its arrival
    /// at the appsink) are recorded there when the encoder puts it out.
    pub fn create(
        path: &Path,
        size: (usize, usize),
        fps: f64,
        encoder: &Encoder,
        timing: Option<Arc<CameraMetrics>>,
    ) -> Result<Self, String> {
        gst::init().map_err(|e| format!("GStreamer failed to initialise: {e}"))?;
        let fps = if fps.is_finite() && fps > 0.0 {
            fps
        } else {
            25.0
        };
        let description = format!(
            "appsrc name=src format=time ! {} ! h264parse ! matroskamux ! filesink name=sink",
            encoder.chain(KEY_INTERVAL)
        );
        let pipeline = gst::parse::launch(&description)
            .map_err(|e| {
                format!(
                    "cannot build the recorder with {} (are gstreamer1.0-plugins-good and -bad installed?): {e}",
                    encoder.element()
                )
            })?
            .downcast::<gst::Pipeline>()
            .map_err(|_| "the recorder description is not a pipeline".to_string())?;
        let appsrc = pipeline
            .by_name("src")
            .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
            .ok_or_else(|| "appsrc missing".to_string())?;
        let sink = pipeline
            .by_name("sink")
            .ok_or_else(|| "filesink missing".to_string())?;
        sink.set_property("location", path.to_string_lossy().as_ref());
        let rate = gst::Fraction::approximate_f64(fps).unwrap_or(gst::Fraction::new(25, 1));
        let caps = gst::Caps::builder("video/x-raw")
            .field("format", "RGB")
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
            .map_err(|e| format!("cannot start the recorder for {}: {e}", path.display()))?;
        Ok(Self {
            pipeline,
            appsrc,
            path: path.to_path_buf(),
            size,
            last_pts: None,
            frame_duration: Duration::from_secs_f64(1.0 / fps),
            in_flight,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one frame (interleaved RGB of the recorder's size) at stream time `pts`, which
    /// reached the appsink at `arrived`. Frames of another size or with a timestamp not after the
    /// previous one are skipped.
    pub fn push(&mut self, pixels: &[u8], pts: Duration, arrived: Instant) -> Result<(), String> {
        if pixels.len() != self.size.0 * self.size.1 * 3 {
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
            .map(|_| ())
            .map_err(|e| format!("recording {} failed: {e:?}", self.path.display()))
    }

    /// Sends EOS and waits (up to `timeout`) until the file is complete.
    pub fn finish(self, timeout: Duration) -> Result<PathBuf, String> {
        let _ = self.appsrc.end_of_stream();
        let mut result = Err(format!(
            "recording {} did not finish within {:.0} s",
            self.path.display(),
            timeout.as_secs_f64()
        ));
        if let Some(bus) = self.pipeline.bus() {
            let deadline = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < deadline {
                let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
                    continue;
                };
                match message.view() {
                    gst::MessageView::Eos(_) => {
                        result = Ok(self.path.clone());
                        break;
                    }
                    gst::MessageView::Error(err) => {
                        result = Err(format!(
                            "recording {}: {}",
                            self.path.display(),
                            err.error()
                        ));
                        break;
                    }
                    _ => {}
                }
            }
        }
        let _ = self.pipeline.set_state(gst::State::Null);
        result
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
