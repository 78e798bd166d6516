//! `stpm bench --pipeline --rtsp-client`: a client of the bench's own for the pipeline's RTSP
//! server, so that a run measures what a watched stream costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::BenchError;

/// A local port nothing listens on right now.
pub(super) fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|e| BenchError::Run(format!("no free port for the RTSP server: {e}")))
}

/// `--rtsp-client`: a GStreamer RTSP client (TCP, depayloaded, not decoded: a viewer decodes on
/// its own machine) that connects as soon as the server answers and counts the frames it gets.
pub(super) struct RtspWatcher {
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RtspWatcher {
    pub(super) fn start(url: String) -> Self {
        // The thread parses a pipeline description; that needs GStreamer initialised.
        let initialised = gstreamer::init().is_ok();
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, frames) = (Arc::clone(&stop), Arc::clone(&frames));
            std::thread::Builder::new()
                .name("bench-rtsp".into())
                .spawn(move || {
                    while initialised && !stop.load(Ordering::Relaxed) {
                        watch_once(&url, &stop, &frames);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
                .ok()
        };
        Self {
            stop,
            frames,
            thread,
        }
    }

    pub(super) fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.frames.load(Ordering::Relaxed)
    }
}

/// One connection: counts frames until the stream ends or fails, or `stop`.
fn watch_once(url: &str, stop: &AtomicBool, frames: &AtomicU64) {
    use gstreamer as gst;
    use gstreamer::prelude::*;
    let description = format!(
        "rtspsrc location={url} protocols=tcp latency=0 ! rtph264depay ! \
         appsink name=sink sync=false"
    );
    let Ok(pipeline) = gst::parse::launch(&description) else {
        return;
    };
    let Some(sink) = pipeline
        .downcast_ref::<gst::Bin>()
        .and_then(|bin| bin.by_name("sink"))
        .and_then(|e| e.downcast::<gstreamer_app::AppSink>().ok())
    else {
        return;
    };
    if pipeline.set_state(gst::State::Playing).is_err() {
        return;
    }
    let bus = pipeline.bus();
    while !stop.load(Ordering::Relaxed) {
        if sink
            .try_pull_sample(gst::ClockTime::from_mseconds(100))
            .is_some()
        {
            frames.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let failed = bus
            .as_ref()
            .and_then(|bus| bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Eos]));
        if failed.is_some() || sink.is_eos() {
            break;
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
}
