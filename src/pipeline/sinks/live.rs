//! The browser console's live view of one camera: each viewer (a WebSocket of `[http]`) gets the
//! camera's one H.264 encode (`video`) remuxed as fragmented MP4 (appsrc → h264parse → mp4mux in
//! fragments → appsink), which Media Source Extensions play. A viewer costs a remux, never an
//! encoder; it starts at a key frame, asked for at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use serde::Serialize;
use tokio::sync::mpsc;

use super::video::{Unit, VideoSink};
use super::{SinkError, SinkReport};

/// Longest fragment in ms: the muxer hands a fragment on once it holds this much video, so this
/// (plus a frame) is what the remux adds to the latency.
const FRAGMENT_MS: u32 = 100;

/// Messages waiting for a viewer's socket, at most. A viewer that falls this far behind (a slow
/// network) is dropped, and the page connects again from the next key frame.
const QUEUED_MESSAGES: usize = 256;

/// Encoded frames waiting in a viewer's remux, at most (2 s at 15 frames/s): a remux that far
/// behind (a starved CPU) drops its viewer, like a slow socket.
const QUEUED_FRAMES: u64 = 30;

/// Viewers of one camera, at most (each is a remux and a socket).
pub const MAX_VIEWERS: usize = 16;

/// What the viewer's socket sends, in order.
#[derive(Debug)]
pub enum LiveMessage {
    /// First: the stream's codec and size, and the unix time of its first frame.
    Hello(Hello),
    /// Then: fragmented MP4, in order (init segment, then fragments).
    Media(Vec<u8>),
}

/// The stream a viewer is about to get (sent as JSON text before the first media bytes).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hello {
    /// The MSE codec string of the H.264 stream, e.g. `avc1.42c01f`.
    pub codec: String,
    pub width: i32,
    pub height: i32,
    /// Unix time of the first frame; the frame shown at media time `t` was captured at
    /// `start + t` (the media starts at 0).
    pub start: f64,
}

/// Why a viewer cannot join.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("camera {camera} already has {MAX_VIEWERS} live viewers")]
    Full { camera: String },
    #[error("camera {camera} has ended")]
    Ended { camera: String },
    #[error("camera {camera}: cannot start the live view's remux")]
    Build {
        camera: String,
        #[source]
        source: RemuxError,
    },
}

/// Why a viewer's remux could not start.
#[derive(Debug, thiserror::Error)]
pub enum RemuxError {
    #[error("GStreamer failed to initialise: {0}")]
    Init(#[source] gst::glib::Error),
    #[error("cannot build it (is gstreamer1.0-plugins-good installed, for mp4mux?): {0}")]
    Launch(#[source] gst::glib::Error),
    #[error("its {0} is missing")]
    Missing(&'static str),
    #[error("it does not start: {0}")]
    Start(#[source] gst::StateChangeError),
}

/// One viewer: its remux pipeline and where its bytes go; the remux stops when it is dropped.
struct Viewer {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    to_socket: mpsc::Sender<LiveMessage>,
    /// Set by the remux's output when the socket is gone or too far behind.
    gone: Arc<AtomicBool>,
    /// Stream time of the first frame it got (its media time 0); `None` before a key frame.
    first_pts: Option<std::time::Duration>,
    last_pts: Option<std::time::Duration>,
}

impl Viewer {
    fn open(&self) -> bool {
        !self.to_socket.is_closed() && !self.gone.load(Ordering::Relaxed)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// One camera's live view: the viewers watching it now. A [`VideoSink`] of the camera's encode.
pub struct LiveView {
    camera: String,
    /// Unix time of the camera's stream time 0 (set when its worker starts).
    epoch: Mutex<f64>,
    viewers: Mutex<Vec<Viewer>>,
    /// The camera's video has finished: no more viewers.
    finished: AtomicBool,
}

/// A viewer's end of the stream: dropping it leaves (the remux stops with the next frame).
pub struct LiveStream {
    pub messages: mpsc::Receiver<LiveMessage>,
}

impl LiveView {
    pub fn new(camera: &str) -> Arc<Self> {
        Arc::new(Self {
            camera: camera.to_string(),
            epoch: Mutex::new(0.0),
            viewers: Mutex::new(Vec::new()),
            finished: AtomicBool::new(false),
        })
    }

    /// The unix time of the camera's stream time 0.
    pub fn set_epoch(&self, epoch: f64) {
        *self.epoch.lock().unwrap_or_else(PoisonError::into_inner) = epoch;
    }

    /// A new viewer: its remux starts now and gets video from the next key frame.
    pub fn join(&self) -> Result<LiveStream, LiveError> {
        let full = || LiveError::Full {
            camera: self.camera.clone(),
        };
        let ended = || LiveError::Ended {
            camera: self.camera.clone(),
        };
        if self.finished.load(Ordering::Relaxed) {
            return Err(ended());
        }
        {
            let mut viewers = self.viewers.lock().unwrap_or_else(PoisonError::into_inner);
            drop_closed(&mut viewers);
            if viewers.len() >= MAX_VIEWERS {
                return Err(full());
            }
        }
        // Built and started without the lock, which the encoder's thread takes for every frame.
        let (to_socket, messages) = mpsc::channel(QUEUED_MESSAGES);
        let gone = Arc::new(AtomicBool::new(false));
        let (pipeline, appsrc) =
            remux(to_socket.clone(), Arc::clone(&gone)).map_err(|source| LiveError::Build {
                camera: self.camera.clone(),
                source,
            })?;
        let viewer = Viewer {
            pipeline,
            appsrc,
            to_socket,
            gone,
            first_pts: None,
            last_pts: None,
        };
        let mut viewers = self.viewers.lock().unwrap_or_else(PoisonError::into_inner);
        if self.finished.load(Ordering::Relaxed) {
            return Err(ended());
        }
        if viewers.len() >= MAX_VIEWERS {
            return Err(full());
        }
        viewers.push(viewer);
        Ok(LiveStream { messages })
    }
}

/// Forgets (and so stops) the viewers whose socket is gone.
fn drop_closed(viewers: &mut Vec<Viewer>) {
    viewers.retain(Viewer::open);
}

/// Builds and starts a viewer's remux; its output goes to `to_socket` as [`LiveMessage::Media`],
/// and `gone` is set when the socket is closed or too far behind.
fn remux(
    to_socket: mpsc::Sender<LiveMessage>,
    gone: Arc<AtomicBool>,
) -> Result<(gst::Pipeline, gst_app::AppSrc), RemuxError> {
    gst::init().map_err(RemuxError::Init)?;
    let pipeline = gst::parse::launch(&format!(
        "appsrc name=src format=time is-live=true do-timestamp=false ! h264parse \
         ! mp4mux fragment-duration={FRAGMENT_MS} streamable=true ! appsink name=sink sync=false"
    ))
    .map_err(RemuxError::Launch)?
    .downcast::<gst::Pipeline>()
    .map_err(|_| RemuxError::Missing("pipeline"))?;
    let appsrc = pipeline
        .by_name("src")
        .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
        .ok_or(RemuxError::Missing("appsrc"))?;
    let appsink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or(RemuxError::Missing("appsink"))?;
    appsrc.set_format(gst::Format::Time);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |appsink| {
                let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let Some(buffer) = sample.buffer() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let bytes = buffer
                    .map_readable()
                    .map_err(|_| gst::FlowError::Error)?
                    .to_vec();
                // A full queue (the viewer is too slow) or a closed socket ends this remux; the
                // view drops it with the next frame, which closes the socket.
                to_socket
                    .try_send(LiveMessage::Media(bytes))
                    .map(|()| gst::FlowSuccess::Ok)
                    .map_err(|_| {
                        gone.store(true, Ordering::Relaxed);
                        gst::FlowError::Eos
                    })
            })
            .build(),
    );
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        let _ = pipeline.set_state(gst::State::Null);
        return Err(RemuxError::Start(e));
    }
    Ok((pipeline, appsrc))
}

impl VideoSink for LiveView {
    fn wants(&self) -> bool {
        let mut viewers = self.viewers.lock().unwrap_or_else(PoisonError::into_inner);
        drop_closed(&mut viewers);
        !viewers.is_empty()
    }

    fn waiting_for_key(&self) -> bool {
        self.viewers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|viewer| viewer.first_pts.is_none())
    }

    fn unit(&self, unit: &Unit) {
        let epoch = *self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        let mut viewers = self.viewers.lock().unwrap_or_else(PoisonError::into_inner);
        viewers.retain_mut(|viewer| push(viewer, unit, epoch));
    }

    fn take_errors(&self) -> Vec<SinkError> {
        Vec::new()
    }

    fn finish(&self, _timeout: std::time::Duration) -> SinkReport {
        self.finished.store(true, Ordering::Relaxed);
        // Dropping a viewer stops its remux and closes its socket.
        self.viewers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        SinkReport::default()
    }
}

/// Hands one frame to a viewer; false when the viewer is gone or cannot go on.
fn push(viewer: &mut Viewer, unit: &Unit, epoch: f64) -> bool {
    if !viewer.open() || viewer.appsrc.current_level_buffers() >= QUEUED_FRAMES {
        return false;
    }
    let first = match viewer.first_pts {
        Some(first) => first,
        None if unit.key => {
            let Some(hello) = hello(unit, epoch) else {
                return true;
            };
            if viewer
                .to_socket
                .try_send(LiveMessage::Hello(hello))
                .is_err()
            {
                return false;
            }
            viewer.appsrc.set_caps(Some(&unit.caps));
            viewer.first_pts = Some(unit.pts);
            unit.pts
        }
        None => return true,
    };
    if unit.pts < first || viewer.last_pts.is_some_and(|last| unit.pts <= last) {
        return true;
    }
    viewer.last_pts = Some(unit.pts);
    let mut buffer = unit.buffer.copy();
    if let Some(buffer) = buffer.get_mut() {
        let pts = gst::ClockTime::from_nseconds((unit.pts - first).as_nanos() as u64);
        buffer.set_pts(pts);
        buffer.set_dts(pts);
    }
    viewer.appsrc.push_buffer(buffer).is_ok()
}

/// The hello of a stream that starts with this key frame; `None` without an SPS in it.
fn hello(unit: &Unit, epoch: f64) -> Option<Hello> {
    let map = unit.buffer.map_readable().ok()?;
    let codec = codec_string(map.as_slice())?;
    let structure = unit.caps.structure(0)?;
    Some(Hello {
        codec,
        width: structure.get::<i32>("width").unwrap_or(0),
        height: structure.get::<i32>("height").unwrap_or(0),
        start: epoch + unit.pts.as_secs_f64(),
    })
}

/// The MSE codec string (`avc1.PPCCLL`: profile, constraint flags, level in hex) of the first
/// sequence parameter set in an H.264 byte-stream access unit.
pub fn codec_string(annex_b: &[u8]) -> Option<String> {
    let mut index = 0;
    while index + 3 < annex_b.len() {
        if annex_b[index..index + 3] == [0, 0, 1] {
            let nal = &annex_b[index + 3..];
            if nal.first().is_some_and(|header| header & 0x1f == 7) && nal.len() >= 4 {
                return Some(format!("avc1.{:02x}{:02x}{:02x}", nal[1], nal[2], nal[3]));
            }
            index += 3;
        } else {
            index += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codec_string_comes_from_the_first_sps() {
        // An access unit delimiter, then an SPS (High profile 0x64, flags 0, level 3.1 = 0x1f)
        // after a 4-byte start code, then a PPS.
        let unit = [
            0, 0, 0, 1, 0x09, 0xf0, 0, 0, 0, 1, 0x67, 0x64, 0x00, 0x1f, 0xac, 0, 0, 1, 0x68, 0xee,
        ];
        assert_eq!(codec_string(&unit).as_deref(), Some("avc1.64001f"));
        assert_eq!(codec_string(&[0, 0, 1, 0x65, 0x88, 0x84]), None);
        assert_eq!(codec_string(&[0, 0, 1, 0x67, 0x42]), None);
    }
}
