//! The outputs of a run. A camera's worker hands every annotated frame, every alert transition and
//! every change of the camera's state to its [`Sink`]s, one file per output: the MQTT alerts
//! (`mqtt`), their JPEG snapshots (`snapshot`), the event store with its snapshots on disk
//! (`events`), the `alert {…}` lines on stdout (`console`) and the video (`video`), which
//! encodes the annotated frames once per camera and fans the H.264 stream out to its own outputs:
//! the recording (`record`), the RTSP feed (`rtsp`), the event clips (`clips`) and the console's
//! live view (`live`). A new output is a new file here and one line where `pipeline` builds a
//! camera's sinks.

pub mod clips;
pub mod console;
pub mod encoder;
pub mod events;
pub mod live;
pub mod mqtt;
pub mod record;
pub mod rtsp;
pub mod snapshot;
pub mod video;
pub mod yuv;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::alerts::{AlertEvent, CameraState, PublishError};

/// One annotated frame (interleaved RGB) as the sinks get it.
#[derive(Debug, Clone, Copy)]
pub struct Annotated<'a> {
    pub rgb: &'a [u8],
    pub width: usize,
    pub height: usize,
    /// Stream time of the frame.
    pub pts: Duration,
    /// When the frame reached the capture's appsink (for the end-to-end latency).
    pub arrived: Instant,
    /// The source's frame rate.
    pub fps: f64,
}

/// The frame an alert was raised on (interleaved RGB).
#[derive(Debug, Clone, Copy)]
pub struct Picture<'a> {
    /// With the overlay.
    pub rgb: &'a [u8],
    /// Without it, as the camera saw it.
    pub clean: &'a [u8],
    pub width: usize,
    pub height: usize,
    /// The model's raw image score of this frame.
    pub raw_score: f32,
}

/// Why an output did not take something; the run goes on.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error(transparent)]
    Video(#[from] video::VideoError),
    #[error("alert not spooled: {0}")]
    Alert(PublishError),
    #[error("snapshot not published: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("state not published: {0}")]
    State(PublishError),
    #[error("cannot encode an alert: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("camera {0}: the event store's writer has stopped; the event is not stored")]
    Stored(String),
}

/// What an output left behind when the run ended.
#[derive(Debug, Default)]
pub struct SinkReport {
    /// Files it wrote (recordings).
    pub files: Vec<PathBuf>,
    pub errors: Vec<SinkError>,
}

/// One output of a camera. The worker calls it from its own thread, in order; a call must not wait
/// on the network or a slow disk (hand the work on instead), since the next frame is due.
pub trait Sink: Send {
    /// Every frame, after the overlay (also frames that were not analysed).
    fn frame(&mut self, _frame: &Annotated<'_>) -> Result<(), SinkError> {
        Ok(())
    }

    /// One alert transition (new, update, end); `picture` is the frame it was raised on, when
    /// there is one (not for ends at shutdown or when the camera went offline).
    fn alert(
        &mut self,
        _event: &AlertEvent,
        _picture: Option<&Picture<'_>>,
    ) -> Result<(), SinkError> {
        Ok(())
    }

    /// The camera's state (ok / anomaly / offline, fps, score): when its status changes and every
    /// few seconds.
    fn state(&mut self, _state: &CameraState) -> Result<(), SinkError> {
        Ok(())
    }

    /// After the camera's last frame: completes what is open (waiting at most `timeout`).
    fn finish(self: Box<Self>, _timeout: Duration) -> SinkReport {
        SinkReport::default()
    }
}
