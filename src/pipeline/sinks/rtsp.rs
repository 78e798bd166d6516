//! `[output.rtsp]`: one gst-rtsp-server whose glib main loop runs on its own thread; per camera a
//! shared media factory at `/<camera>` (appsrc → h264parse → RTP) fed with the camera's encoded
//! video (`video`) while a client watches. A media that starts waits for a key frame.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_rtsp_server as rtsp_server;
use gstreamer_rtsp_server::prelude::*;
use serde::Deserialize;

use super::video::{Unit, VideoSink};

/// `[output.rtsp]`: each camera's annotated frames as H.264 at `rtsp://<bind>:<port>/<camera>`;
/// encoded only while a client watches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtspConfig {
    /// Serve the annotated streams over RTSP.
    #[serde(default)]
    pub enabled: bool,
    /// IP address to listen on (`0.0.0.0` for every interface).
    #[serde(default = "default_bind")]
    pub bind: String,
    /// Port to listen on (0: any free port, printed at start).
    #[serde(default = "default_rtsp_port")]
    pub port: u16,
    /// With `password_file`: clients must sign in (RTSP Basic) as this user.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password of `username` (its first line), so the secret is neither in
    /// the configuration nor on a command line.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Clients connected at once, over every camera; one more is disconnected at once.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// How `username` signs in: `basic` (the password sent encoded) or `digest` (only a hash of
    /// it crosses the network).
    #[serde(default = "default_auth_method")]
    pub auth_method: String,
    /// With `tls_key`: serve RTSPS (RTSP over TLS) with this PEM certificate (chain).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl Default for RtspConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: default_bind(),
            port: default_rtsp_port(),
            username: None,
            password_file: None,
            max_clients: default_max_clients(),
            auth_method: default_auth_method(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

fn default_max_clients() -> usize {
    16
}

fn default_auth_method() -> String {
    "basic".into()
}

fn default_bind() -> String {
    "127.0.0.1".into()
}

fn default_rtsp_port() -> u16 {
    8554
}

/// The media of one mount point. `config-interval=1` repeats SPS/PPS, so a client that joins a
/// shared stream decodes from the next key frame.
const LAUNCH: &str = "( appsrc name=src is-live=true format=time do-timestamp=false ! h264parse \
                      ! rtph264pay name=pay0 pt=96 config-interval=1 )";

/// The role of the signed-in user (`[output.rtsp] username`).
const ROLE: &str = "viewer";

/// Encoded frames waiting in a media's appsrc, at most: when the network is behind, frames are
/// dropped up to the next key frame (what follows a dropped frame would decode with errors).
const APPSRC_FRAMES: u64 = 30;

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
    #[error("output.rtsp.password_file = {path}: {why}")]
    Password { path: PathBuf, why: String },
    #[error("output.rtsp.tls_cert = {cert}, tls_key = {key}: {why}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
}

impl RtspConfig {
    /// Problems of the section, each naming its key (only when enabled).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.enabled {
            return problems;
        }
        if !["basic", "digest"].contains(&self.auth_method.as_str()) {
            problems.push(format!(
                "output.rtsp.auth_method = `{}`: use basic or digest",
                self.auth_method
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            problems.push(
                "output.rtsp.tls_cert and output.rtsp.tls_key go together (a PEM certificate and its key)"
                    .into(),
            );
        }
        if !(1..=1000).contains(&self.max_clients) {
            problems.push(format!(
                "output.rtsp.max_clients = {}: use 1 to 1000",
                self.max_clients
            ));
        }
        match (&self.username, &self.password_file) {
            (Some(user), Some(_)) if user.is_empty() || user.contains(':') => problems.push(
                format!("output.rtsp.username = `{user}`: use a name without `:`"),
            ),
            (Some(_), None) => problems.push(
                "output.rtsp.username needs output.rtsp.password_file (a file holding the password)"
                    .into(),
            ),
            (None, Some(_)) => problems.push(
                "output.rtsp.password_file needs output.rtsp.username".into(),
            ),
            (None, None) => {
                // Anyone who reaches it could watch and start an encoder: only on loopback.
                let loopback = self
                    .bind
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    problems.push(format!(
                        "output.rtsp.bind = `{}` reaches other machines: set output.rtsp.username and output.rtsp.password_file, or bind 127.0.0.1",
                        self.bind
                    ));
                }
            }
            _ => {}
        }
        problems
    }

    /// The TLS certificate and key (`tls_cert`, `tls_key`), when both are set.
    fn certificate(&self) -> Result<Option<gstreamer_rtsp_server::gio::TlsCertificate>, RtspError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        gstreamer_rtsp_server::gio::TlsCertificate::from_files(cert, key)
            .map(Some)
            .map_err(|e| RtspError::Tls {
                cert: cert.clone(),
                key: key.clone(),
                why: e.to_string(),
            })
    }

    /// The password of `username`, read from `password_file` (its first line); `None` without
    /// authentication.
    fn credentials(&self) -> Result<Option<(String, String)>, RtspError> {
        let (Some(user), Some(path)) = (&self.username, &self.password_file) else {
            return Ok(None);
        };
        let failed = |why: String| RtspError::Password {
            path: path.clone(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
        let password = text.lines().next().unwrap_or("").to_string();
        if password.is_empty() {
            return Err(failed("its first line (the password) is empty".into()));
        }
        Ok(Some((user.clone(), password)))
    }
}

/// The appsrc of a media that clients are watching.
struct LiveMedia {
    appsrc: gst_app::AppSrc,
    /// Buffer times count from here: the media's running time starts when it plays, just after.
    configured: Instant,
    caps: Option<gst::Caps>,
    last_pts: Option<Duration>,
    /// A key frame has been pushed since the media started or last dropped a frame (before one,
    /// frames are useless to a decoder).
    keyed: bool,
    /// A client started playing: it decodes from the next key frame, wanted now.
    key_wanted: bool,
}

/// One camera's media, while clients watch: usually one (shared by its viewers); more when
/// viewers' URLs differ in what GStreamer keys a shared media by (a query, the port written in
/// the URL).
type Medias = Arc<Mutex<Vec<LiveMedia>>>;

/// One camera's RTSP feed: the media of its mount point while any is running.
pub struct RtspFeed {
    live: Medias,
}

impl VideoSink for RtspFeed {
    fn wants(&self) -> bool {
        !self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn waiting_for_key(&self) -> bool {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|live| !live.keyed || live.key_wanted)
    }

    /// Restamps the frame with each media's clock and pushes it; never waits (a full appsrc drops
    /// its oldest).
    fn unit(&self, unit: &Unit) {
        let mut medias = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        for live in medias.iter_mut() {
            live.push(unit);
        }
    }
}

impl LiveMedia {
    fn push(&mut self, unit: &Unit) {
        if !(self.keyed || unit.key) {
            return;
        }
        // A full queue would drop its oldest frame, and what follows a dropped frame decodes with
        // errors: drop this one instead and start again at a key frame.
        if self.appsrc.current_level_buffers() >= APPSRC_FRAMES && !unit.key {
            self.keyed = false;
            return;
        }
        self.keyed = true;
        self.key_wanted &= !unit.key;
        if self.caps.as_ref() != Some(&unit.caps) {
            self.appsrc.set_caps(Some(&unit.caps));
            self.caps = Some(unit.caps.clone());
        }
        let pts = self.configured.elapsed();
        if self.last_pts.is_some_and(|last| pts <= last) {
            return;
        }
        self.last_pts = Some(pts);
        let mut buffer = unit.buffer.copy();
        if let Some(buffer) = buffer.get_mut() {
            let pts = gst::ClockTime::from_nseconds(pts.as_nanos() as u64);
            buffer.set_pts(pts);
            buffer.set_dts(pts);
        }
        // Flushing (a paused or closing media) is not an error of ours: the frame is just not
        // needed; `unprepared` removes the media when it goes away.
        let _ = self.appsrc.push_buffer(buffer);
    }
}

/// The largest RTSP request body taken (viewers send none; `SET_PARAMETER` bodies are small).
const REQUEST_BODY_LIMIT: u32 = 16 * 1024;

/// How often sessions past their timeout (60 s without a keep-alive) are ended.
const SESSION_CLEANUP: Duration = Duration::from_secs(5);

/// The running server; [`RtspServer::stop`] disconnects clients and ends its thread.
pub struct RtspServer {
    server: rtsp_server::RTSPServer,
    source: glib::Source,
    /// The timer that ends expired sessions.
    cleanup: Option<glib::Source>,
    main_loop: glib::MainLoop,
    thread: Option<std::thread::JoinHandle<()>>,
    port: u16,
}

impl RtspServer {
    /// Listens on `config.bind`:`config.port` (a taken port fails here) and mounts each camera at
    /// `/<camera>`; returns the feeds in the order of `cameras`.
    pub fn start(
        config: &RtspConfig,
        cameras: &[String],
    ) -> Result<(Self, Vec<RtspFeed>), RtspError> {
        gst::init().map_err(|e| RtspError::Init(e.to_string()))?;
        let credentials = config.credentials()?;
        let server = rtsp_server::RTSPServer::new();
        server.set_address(&config.bind);
        server.set_service(&config.port.to_string());
        // A request body is read whole before anything is checked, credentials included, up to
        // this limit (GStreamer's default is 4 GiB: a stranger's `Content-Length` could take the
        // memory). Viewers send none.
        server.set_content_length_limit(REQUEST_BODY_LIMIT);
        // With credentials, only the signed-in user's role may open and build the media;
        // anyone else gets 401 and no encoder starts. With a certificate, every connection is
        // TLS (RTSPS); without credentials anyone who connects gets the role.
        let certificate = config.certificate()?;
        let auth = (credentials.is_some() || certificate.is_some()).then(|| {
            let auth = rtsp_server::RTSPAuth::new();
            let mut token = rtsp_server::RTSPToken::builder()
                .field(rtsp_server::RTSP_TOKEN_MEDIA_FACTORY_ROLE, ROLE)
                .build();
            match &credentials {
                Some((user, password)) if config.auth_method == "digest" => {
                    auth.add_digest(user, password, &token);
                    auth.set_supported_methods(rtsp_server::gst_rtsp::RTSPAuthMethod::Digest);
                }
                Some((user, password)) => {
                    auth.add_basic(&rtsp_server::RTSPAuth::make_basic(user, password), &token)
                }
                None => auth.set_default_token(Some(&mut token)),
            }
            auth.set_tls_certificate(certificate.as_ref());
            auth
        });
        server.set_auth(auth.as_ref());
        let mounts = server.mount_points().ok_or(RtspError::MountPoints)?;
        let mut outputs = Vec::new();
        let mut slots = std::collections::HashMap::new();
        for camera in cameras {
            let slot: Medias = Arc::default();
            let factory = rtsp_server::RTSPMediaFactory::new();
            factory.set_launch(LAUNCH);
            factory.set_shared(true);
            if auth.is_some() {
                factory.add_role_from_structure(
                    &gst::Structure::builder(ROLE)
                        .field(rtsp_server::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                        .field(rtsp_server::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                        .build(),
                );
            }
            let configure_slot = Arc::clone(&slot);
            let name = camera.clone();
            factory.connect_media_configure(move |_, media| {
                attach_media(&name, media, &configure_slot);
            });
            mounts.add_factory(&format!("/{camera}"), factory);
            slots.insert(camera.clone(), Arc::clone(&slot));
            outputs.push(RtspFeed { live: slot });
        }
        // A client joining a running (shared) media gets a key frame asked for, rather than waiting
        // for the next regular one.
        let slots = Arc::new(slots);
        let max_clients = config.max_clients;
        let context = glib::MainContext::new();
        let server_context = context.clone();
        server.connect_client_connected(move |server, client| {
            // The server's list does not hold the new client yet.
            let clients = server.client_filter(None).len();
            if clients >= max_clients {
                log::warn!(
                    "RTSP: {clients} clients are connected, output.rtsp.max_clients: a new one \
                     is turned away"
                );
                // Closed once the server has attached its connection (after this signal: an
                // idle source could still run before that, and then closed nothing). Answering
                // its requests with 503 from the pre-request signals instead corrupted the heap
                // now and then (a return value through those signals).
                let client = client.clone();
                glib::source::timeout_source_new(
                    Duration::from_millis(50),
                    None,
                    glib::Priority::DEFAULT,
                    move || {
                        client.close();
                        glib::ControlFlow::Break
                    },
                )
                .attach(Some(&server_context));
                return;
            }
            let slots = Arc::clone(&slots);
            client.connect_play_request(move |_, context| {
                let Some(url) = context.uri() else {
                    return;
                };
                if let Some(slot) = slots.get(mount_of(&url.request_uri())) {
                    for live in slot
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .iter_mut()
                    {
                        live.key_wanted = true;
                    }
                }
            });
        });
        let bind_error = |message: String| RtspError::Bind {
            bind: config.bind.clone(),
            port: config.port,
            message,
        };
        let source = server
            .create_source(None::<&gstreamer_rtsp_server::gio::Cancellable>)
            .map_err(|e| bind_error(e.to_string()))?;
        source.attach(Some(&context));
        // Sessions whose viewer went without a TEARDOWN (UDP viewers that lost power, say) end
        // once their timeout has passed; GStreamer leaves that to the application.
        let cleanup = server.session_pool().map(|pool| {
            let cleanup = glib::source::timeout_source_new(
                SESSION_CLEANUP,
                Some("stpm-rtsp-sessions"),
                glib::Priority::DEFAULT,
                move || {
                    let removed = pool.cleanup();
                    if removed > 0 {
                        log::info!("RTSP: {removed} session(s) of vanished viewers ended");
                    }
                    glib::ControlFlow::Continue
                },
            );
            cleanup.attach(Some(&context));
            cleanup
        });
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
                cleanup,
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
        if let Some(cleanup) = self.cleanup.take() {
            cleanup.destroy();
        }
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

/// The mount (camera) a request URI is for: the first segment of its path, so
/// `rtsp://host:8554/line1/stream=0?x` is `line1`.
fn mount_of(uri: &str) -> &str {
    let path = uri
        .split_once("://")
        .map_or(uri, |(_, rest)| rest.find('/').map_or("", |at| &rest[at..]));
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.trim_start_matches('/').split('/').next().unwrap_or("")
}

/// A client asked for a camera's media that was not running: add the new media's appsrc.
fn attach_media(camera: &str, media: &rtsp_server::RTSPMedia, slot: &Medias) {
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
    slot.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(LiveMedia {
            appsrc: appsrc.clone(),
            configured: Instant::now(),
            caps: None,
            last_pts: None,
            keyed: false,
            key_wanted: false,
        });
    log::info!("[{camera}] RTSP: streaming to clients");
    let unprepared_slot = Arc::clone(slot);
    let name = camera.to_string();
    media.connect_unprepared(move |_| {
        let mut medias = unprepared_slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = medias.len();
        medias.retain(|live| live.appsrc != appsrc);
        if medias.is_empty() && before > 0 {
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
            ..RtspConfig::default()
        };
        let (server, feeds) =
            RtspServer::start(&config, &["line1".into(), "line2".into()]).expect("start");
        assert_ne!(server.port(), 0);
        assert_eq!(feeds.len(), 2);
        assert!(!feeds[0].wants() && !feeds[1].wants());
        assert!(!feeds[0].waiting_for_key());
        // A unit for an unwatched feed goes nowhere.
        let unit = Unit {
            buffer: gst::Buffer::from_slice(vec![0u8, 0, 0, 1, 0x65]),
            caps: gst::Caps::builder("video/x-h264").build(),
            pts: Duration::ZERO,
            key: true,
        };
        feeds[0].unit(&unit);
        assert!(feeds[0].live.lock().is_ok_and(|live| live.is_empty()));
        let taken = RtspConfig {
            port: server.port(),
            ..config
        };
        let message = RtspServer::start(&taken, &["line1".into()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("cannot listen on 127.0.0.1:{}", server.port())),
            "{message}"
        );
        server.stop();
    }

    /// `OPTIONS` on a new connection: the first line of the answer, or `None` when the server
    /// closed the connection without one.
    fn options(port: u16) -> (std::net::TcpStream, Option<String>) {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let request = format!("OPTIONS rtsp://127.0.0.1:{port}/line1 RTSP/1.0\r\nCSeq: 1\r\n\r\n");
        let sent = stream.write_all(request.as_bytes());
        let mut line = String::new();
        let answer = sent
            .ok()
            .and_then(|_| {
                std::io::BufReader::new(stream.try_clone().ok()?)
                    .read_line(&mut line)
                    .ok()
            })
            .filter(|&n| n > 0)
            .map(|_| line.trim().to_string());
        (stream, answer)
    }

    #[test]
    fn clients_beyond_max_clients_are_turned_away() {
        let config = RtspConfig {
            enabled: true,
            port: 0,
            max_clients: 2,
            ..RtspConfig::default()
        };
        let (server, _feeds) = RtspServer::start(&config, &["line1".into()]).expect("start");
        let (first, answer) = options(server.port());
        assert_eq!(answer.as_deref(), Some("RTSP/1.0 200 OK"));
        let (second, answer) = options(server.port());
        assert_eq!(answer.as_deref(), Some("RTSP/1.0 200 OK"));
        // Closed at once (an OPTIONS it sent first may still be answered).
        let (third, _) = options(server.port());
        let mut rest = Vec::new();
        let read = std::io::Read::read_to_end(&mut &third, &mut rest);
        assert!(
            read.is_ok() && !String::from_utf8_lossy(&rest).contains("RTSP/1.0"),
            "a third client stayed connected: {read:?} {rest:?}"
        );
        // A place freed is a place taken.
        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // Kept: answered and still open after 300 ms (a turned-away client may be answered
        // too, but is closed within 50 ms).
        let kept = |stream: &std::net::TcpStream| {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
            let mut byte = [0u8; 1];
            std::io::Read::read(&mut &*stream, &mut byte).is_err()
        };
        let taken = loop {
            let (next, answer) = options(server.port());
            if answer.as_deref() == Some("RTSP/1.0 200 OK") && kept(&next) {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(taken, "the freed place was not given to a new client");
        drop(second);
        server.stop();
    }

    #[test]
    fn a_request_names_its_camera_by_the_first_path_segment() {
        for (uri, camera) in [
            ("rtsp://127.0.0.1:8554/line1", "line1"),
            ("rtsp://127.0.0.1:8554/line1/", "line1"),
            ("rtsp://h/line1/stream=0", "line1"),
            ("rtsp://h:1/line1?x=1", "line1"),
            ("rtsp://h:1/line1/stream=0?x=/y", "line1"),
            ("rtsp://h:1", ""),
            ("/line2", "line2"),
        ] {
            assert_eq!(mount_of(uri), camera, "{uri}");
        }
    }

    #[test]
    fn a_request_announcing_a_huge_body_is_closed_not_read() {
        use std::io::{Read, Write};
        let config = RtspConfig {
            enabled: true,
            port: 0,
            ..RtspConfig::default()
        };
        let (server, _feeds) = RtspServer::start(&config, &["line1".into()]).expect("start");
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let request = format!(
            "OPTIONS rtsp://127.0.0.1:{}/line1 RTSP/1.0\r\nCSeq: 1\r\nContent-Length: 2000000000\r\n\r\n",
            server.port()
        );
        stream.write_all(request.as_bytes()).expect("send");
        // Keep sending body bytes: a server that reads the body waits for 2 GB of them.
        let started = std::time::Instant::now();
        let chunk = vec![b'x'; 64 * 1024];
        let mut closed = false;
        for _ in 0..64 {
            if stream.write_all(&chunk).is_err() {
                closed = true;
                break;
            }
        }
        if !closed {
            let mut rest = Vec::new();
            // Closed: read ends (0 bytes or a reset) well before the read timeout.
            let read = stream.read_to_end(&mut rest);
            closed = read.is_ok() || started.elapsed() < Duration::from_secs(9);
            assert!(
                !String::from_utf8_lossy(&rest).contains("200 OK"),
                "answered as if the body were fine"
            );
        }
        assert!(closed, "the connection stayed open, reading the body");
        server.stop();
    }

    #[test]
    fn a_certificate_needs_its_key_and_a_bad_one_names_both_files() {
        let dir = tempfile::tempdir().expect("dir");
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "not a certificate").expect("write");
        let half = RtspConfig {
            enabled: true,
            tls_cert: Some(cert.clone()),
            ..RtspConfig::default()
        };
        let problems = half.problems().join("\n");
        assert!(
            problems.contains("tls_cert and output.rtsp.tls_key go together"),
            "{problems}"
        );
        let bad = RtspConfig {
            tls_key: Some(cert.clone()),
            port: 0,
            ..half
        };
        assert!(bad.problems().is_empty());
        let message = RtspServer::start(&bad, &["line1".into()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with(&format!("output.rtsp.tls_cert = {}", cert.display())),
            "{message}"
        );
    }

    #[test]
    fn credentials_come_in_pairs_and_open_binds_need_them() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("rtsp-password");
        std::fs::write(&file, "s3cret\n").expect("write");
        let config = |bind: &str, user: Option<&str>, file: Option<&std::path::Path>| RtspConfig {
            enabled: true,
            bind: bind.into(),
            port: 0,
            username: user.map(String::from),
            password_file: file.map(std::path::Path::to_path_buf),
            ..RtspConfig::default()
        };
        assert!(config("127.0.0.1", None, None).problems().is_empty());
        let open = config("0.0.0.0", None, None).problems().join("\n");
        assert!(
            open.contains("output.rtsp.bind = `0.0.0.0` reaches other machines"),
            "{open}"
        );
        let half = config("0.0.0.0", Some("anna"), None).problems().join("\n");
        assert!(half.contains("needs output.rtsp.password_file"), "{half}");
        let signed = config("0.0.0.0", Some("anna"), Some(&file));
        assert!(signed.problems().is_empty());
        assert_eq!(
            signed.credentials().expect("read"),
            Some(("anna".into(), "s3cret".into()))
        );
        let missing = config("0.0.0.0", Some("anna"), Some(&dir.path().join("nope")));
        let message = missing
            .credentials()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("output.rtsp.password_file"), "{message}");
    }
}
