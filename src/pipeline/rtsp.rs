//! `[output.rtsp]`: one gst-rtsp-server whose glib main loop runs on its own thread; per camera a
//! shared media factory at `/<camera>` (appsrc → the `encoder` module's H.264 → RTP). Workers hand
//! annotated frames (I420, or RGB at odd sizes) to [`RtspOutput::push`], which never blocks and
//! does nothing while no client watches.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_rtsp_server as rtsp_server;
use gstreamer_rtsp_server::prelude::*;

use crate::pipeline::config::RtspConfig;
use crate::pipeline::encoder::{Encoder, KEY_INTERVAL};
use crate::pipeline::yuv::{OutputFrame, PixelFormat};

/// The media of one mount point. `config-interval=1` repeats SPS/PPS so a client joining a shared
/// stream decodes from the next key frame (at most [`KEY_INTERVAL`] frames away).
fn launch(encoder: &Encoder) -> String {
    format!(
        "( appsrc name=src is-live=true format=time do-timestamp=false ! {} \
         ! rtph264pay name=pay0 pt=96 config-interval=1 )",
        encoder.chain(KEY_INTERVAL)
    )
}

/// Frames waiting in a media's appsrc before the oldest is dropped (the encoder is behind).
const APPSRC_FRAMES: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RtspError {
    #[error("GStreamer failed to initialise: {0}")]
    Init(String),
    #[error(
        "output.rtsp: cannot listen on {bind}:{port} ({message}); pick another output.rtsp.port or stop what uses it"
    )]
    Bind {
        bind: String,
        port: u16,
        message: String,
    },
    #[error("output.rtsp: the RTSP server has no mount points")]
    MountPoints,
    #[error("cannot start the RTSP thread: {0}")]
    Thread(std::io::Error),
}

/// The size and rate of the frames a camera pushes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Format {
    pixel: PixelFormat,
    width: usize,
    height: usize,
    fps: f64,
}

impl Format {
    fn caps(self) -> gst::Caps {
        let fps = if self.fps.is_finite() && self.fps > 0.0 {
            self.fps
        } else {
            25.0
        };
        gst::Caps::builder("video/x-raw")
            .field("format", self.pixel.caps_name())
            .field("width", self.width as i32)
            .field("height", self.height as i32)
            .field(
                "framerate",
                gst::Fraction::approximate_f64(fps).unwrap_or(gst::Fraction::new(25, 1)),
            )
            .build()
    }
}

/// The appsrc of a media that clients are watching.
struct LiveMedia {
    appsrc: gst_app::AppSrc,
    /// Buffer times count from here: the media's running time starts when it plays, just after.
    configured: Instant,
    format: Option<Format>,
    last_pts: Option<Duration>,
}

/// What a camera's worker and its media factory share.
#[derive(Default)]
struct Slot {
    live: Option<LiveMedia>,
    /// The latest frame format, for caps of a media configured before its next frame.
    format: Option<Format>,
}

/// One camera's RTSP feed.
pub struct RtspOutput {
    slot: Arc<Mutex<Slot>>,
}

impl RtspOutput {
    /// Offers one annotated frame to the camera's clients: a copy when someone watches, nothing
    /// otherwise; never waits (a full appsrc drops its oldest).
    pub fn push(&self, frame: &OutputFrame, fps: f64) {
        let (width, height) = (frame.width, frame.height);
        if width == 0 || height == 0 || frame.data.len() != frame.format.frame_len(width, height) {
            return;
        }
        let Ok(mut slot) = self.slot.lock() else {
            return;
        };
        let format = Format {
            pixel: frame.format,
            width,
            height,
            fps,
        };
        slot.format = Some(format);
        let Some(live) = slot.live.as_mut() else {
            return;
        };
        if live.format != Some(format) {
            live.appsrc.set_caps(Some(&format.caps()));
            live.format = Some(format);
        }
        let pts = live.configured.elapsed();
        if live.last_pts.is_some_and(|last| pts <= last) {
            return;
        }
        live.last_pts = Some(pts);
        let mut buffer = gst::Buffer::from_slice(frame.data.clone());
        if let Some(buffer) = buffer.get_mut() {
            buffer.set_pts(gst::ClockTime::from_nseconds(pts.as_nanos() as u64));
        }
        // Flushing (a paused or closing media) is not an error of ours: the frame is just not
        // needed; `unprepared` clears the slot when the media goes away.
        let _ = live.appsrc.push_buffer(buffer);
    }

    /// Whether a client's media takes frames now.
    pub fn is_watched(&self) -> bool {
        self.slot.lock().is_ok_and(|slot| slot.live.is_some())
    }
}

/// The running server; [`RtspServer::stop`] disconnects clients and ends its thread.
pub struct RtspServer {
    server: rtsp_server::RTSPServer,
    source: glib::Source,
    main_loop: glib::MainLoop,
    thread: Option<std::thread::JoinHandle<()>>,
    port: u16,
}

impl RtspServer {
    /// Listens on `config.bind`:`config.port` (a taken port fails here) and mounts each camera at
    /// `/<camera>`, encoded with `encoder`; returns the feeds in the order of `cameras`.
    pub fn start(
        config: &RtspConfig,
        cameras: &[String],
        encoder: &Encoder,
    ) -> Result<(Self, Vec<RtspOutput>), RtspError> {
        gst::init().map_err(|e| RtspError::Init(e.to_string()))?;
        let server = rtsp_server::RTSPServer::new();
        server.set_address(&config.bind);
        server.set_service(&config.port.to_string());
        let mounts = server.mount_points().ok_or(RtspError::MountPoints)?;
        let launch = launch(encoder);
        let mut outputs = Vec::new();
        for camera in cameras {
            let slot = Arc::new(Mutex::new(Slot::default()));
            let factory = rtsp_server::RTSPMediaFactory::new();
            factory.set_launch(&launch);
            factory.set_shared(true);
            let configure_slot = Arc::clone(&slot);
            let name = camera.clone();
            factory.connect_media_configure(move |_, media| {
                attach_media(&name, media, &configure_slot);
            });
            mounts.add_factory(&format!("/{camera}"), factory);
            outputs.push(RtspOutput { slot });
        }
        let bind_error = |message: String| RtspError::Bind {
            bind: config.bind.clone(),
            port: config.port,
            message,
        };
        let source = server
            .create_source(None::<&gstreamer_rtsp_server::gio::Cancellable>)
            .map_err(|e| bind_error(e.to_string()))?;
        let context = glib::MainContext::new();
        source.attach(Some(&context));
        let port = u16::try_from(server.bound_port())
            .map_err(|_| bind_error("no port was bound".into()))?;
        let main_loop = glib::MainLoop::new(Some(&context), false);
        let thread = {
            let main_loop = main_loop.clone();
            std::thread::Builder::new()
                .name("rtsp".into())
                .spawn(move || main_loop.run())
                .map_err(RtspError::Thread)?
        };
        Ok((
            Self {
                server,
                source,
                main_loop,
                thread: Some(thread),
                port,
            },
            outputs,
        ))
    }

    /// The port it listens on (the real one when the configuration said 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Disconnects every client, stops listening and ends the main loop thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.server
            .client_filter(Some(&mut |_, _| rtsp_server::RTSPFilterResult::Remove));
        self.source.destroy();
        // A quit() that comes before the thread has entered run() is lost (a run that ends at
        // once): quit from inside the loop instead.
        let main_loop = self.main_loop.clone();
        glib::idle_source_new(Some("stpm-rtsp-stop"), glib::Priority::DEFAULT, move || {
            main_loop.quit();
            glib::ControlFlow::Break
        })
        .attach(Some(&self.main_loop.context()));
        let _ = thread.join();
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A client asked for a camera whose media was not running: take the new media's appsrc.
fn attach_media(camera: &str, media: &rtsp_server::RTSPMedia, slot: &Arc<Mutex<Slot>>) {
    let appsrc = media
        .element()
        .downcast::<gst::Bin>()
        .ok()
        .and_then(|bin| bin.by_name("src"))
        .and_then(|element| element.downcast::<gst_app::AppSrc>().ok());
    let Some(appsrc) = appsrc else {
        log::warn!("[{camera}] RTSP: the media has no appsrc named src");
        return;
    };
    appsrc.set_format(gst::Format::Time);
    appsrc.set_block(false);
    appsrc.set_max_bytes(0);
    appsrc.set_max_buffers(APPSRC_FRAMES);
    appsrc.set_leaky_type(gst_app::AppLeakyType::Downstream);
    let Ok(mut guard) = slot.lock() else {
        return;
    };
    let format = guard.format;
    if let Some(format) = format {
        appsrc.set_caps(Some(&format.caps()));
    }
    guard.live = Some(LiveMedia {
        appsrc: appsrc.clone(),
        configured: Instant::now(),
        format,
        last_pts: None,
    });
    drop(guard);
    log::info!("[{camera}] RTSP: streaming to clients");
    let unprepared_slot = Arc::clone(slot);
    let name = camera.to_string();
    media.connect_unprepared(move |_| {
        if let Ok(mut slot) = unprepared_slot.lock()
            && slot.live.as_ref().is_some_and(|live| live.appsrc == appsrc)
        {
            slot.live = None;
            log::info!("[{name}] RTSP: no client left");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwatched_feeds_take_nothing_and_a_taken_port_fails() {
        let config = RtspConfig {
            enabled: true,
            bind: "127.0.0.1".into(),
            port: 0,
        };
        let encoder = Encoder::resolve(crate::pipeline::encoder::EncoderRequest::Auto)
            .expect("an H.264 encoder");
        let (server, outputs) =
            RtspServer::start(&config, &["line1".into(), "line2".into()], &encoder).expect("start");
        assert_ne!(server.port(), 0);
        assert_eq!(outputs.len(), 2);
        let frame = crate::pipeline::yuv::for_encoder(vec![128u8; 8 * 6 * 3], 8, 6);
        outputs[0].push(&frame, 15.0);
        // A frame of the wrong length is ignored, not a panic.
        let mut short = frame.clone();
        short.data.pop();
        outputs[1].push(&short, 15.0);
        assert!(!outputs[0].is_watched() && !outputs[1].is_watched());
        assert_eq!(
            outputs[0].slot.lock().ok().and_then(|slot| slot.format),
            Some(Format {
                pixel: PixelFormat::I420,
                width: 8,
                height: 6,
                fps: 15.0
            })
        );
        let taken = RtspConfig {
            port: server.port(),
            ..config
        };
        let message = RtspServer::start(&taken, &["line1".into()], &encoder)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("cannot listen on 127.0.0.1:{}", server.port())),
            "{message}"
        );
        server.stop();
    }
}
