//! The pipeline file (`pipelines/<name>.toml`): one serde struct per section, defaults in one place,
//! loaded with the `config` crate (TOML, then `STPM__SECTION__KEY` environment variables, then
//! `--set section.key=value`). `validate` reports every problem at once, each naming its key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::shard::{Shard, ShardError};
use crate::alerts::{AlertConfig, CameraAlertOverrides, MqttConfig};
use crate::engine::batch::MAX_BATCH;
pub use crate::engine::select::{AUTO_CPU_SESSIONS, MAX_SESSIONS, ModelConfig};
pub use crate::pipeline::sinks::clips::ClipsConfig;
use crate::pipeline::sinks::encoder::EncoderRequest;
pub use crate::pipeline::sinks::events::StorageConfig;
pub use crate::pipeline::sinks::record::RecordConfig;
pub use crate::pipeline::sinks::rtsp::RtspConfig;

/// The whole pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The model bundle and where it runs.
    pub model: ModelConfig,
    /// One entry per camera (`[[camera]]`).
    #[serde(default)]
    pub camera: Vec<CameraConfig>,
    /// Annotated outputs.
    #[serde(default)]
    pub output: OutputConfig,
    /// Alert debounce and hysteresis (per-camera overrides under `[camera.alerts]`).
    #[serde(default)]
    pub alerts: AlertConfig,
    /// The MQTT broker that receives alert events; without this section events are only printed.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// `/metrics` and `/health`.
    #[serde(default)]
    pub http: HttpConfig,
    /// The event store and its snapshots.
    #[serde(default)]
    pub storage: StorageConfig,
    /// A clip of every event.
    #[serde(default)]
    pub clips: ClipsConfig,
}

/// `[[camera]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Name used in RTSP paths, recordings, metrics and alert topics (letters, digits, `-`, `_`).
    pub name: String,
    /// `rtsp://…`, `file:///abs/path.mkv|.mp4`, `v4l2:///dev/videoN` or `test://conveyor`
    /// (`test://conveyor?frames=N&fps=F&seed=S&size=WxH`).
    pub source: String,
    /// Files: start again at the end instead of ending the camera.
    #[serde(default, rename = "loop")]
    pub looping: bool,
    /// Files: play at the file's frame rate like a camera (frames are dropped when inference is
    /// behind); `false` decodes as fast as inference allows and analyses every frame.
    #[serde(default = "default_true")]
    pub realtime: bool,
    /// Inference rate cap in frames per second (0 = every frame). Frames in between are passed
    /// through to the outputs un-analysed, captioned with the last analysed score.
    #[serde(default)]
    pub max_fps: f64,
    /// Live cameras (RTSP, V4L2): no frame for this many seconds (while connected or connecting)
    /// marks the camera offline and reconnects it; 0 turns the watchdog off.
    #[serde(default = "default_stall_seconds")]
    pub stall_seconds: f64,
    /// Alert overrides and zones for this camera.
    #[serde(default)]
    pub alerts: CameraAlertOverrides,
    /// `[camera.clips]`: this camera's clip settings, over `[clips]`.
    #[serde(default)]
    pub clips: crate::pipeline::sinks::clips::CameraClipOverrides,
}

fn default_true() -> bool {
    true
}

fn default_stall_seconds() -> f64 {
    10.0
}

/// `[output]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// H.264 encoder of recordings and RTSP: `auto` (the first found of nvh264, nvv4l2, x264,
    /// openh264) or one of those, which fails the start where its element is missing. Checked
    /// only when recordings, RTSP, clips or the console's live view are on.
    #[serde(default = "default_encoder")]
    pub encoder: String,
    /// `[output.record]`
    #[serde(default)]
    pub record: RecordConfig,
    /// `[output.rtsp]`
    #[serde(default)]
    pub rtsp: RtspConfig,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            encoder: default_encoder(),
            record: RecordConfig::default(),
            rtsp: RtspConfig::default(),
        }
    }
}

fn default_encoder() -> String {
    "auto".into()
}

/// `[http]`: Prometheus `/metrics` and `/health`. Off unless asked for: a fixed default port would
/// make two pipelines on one host collide, and a port that cannot be bound stops the start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/metrics` and `/health`.
    #[serde(default)]
    pub enabled: bool,
    /// `ip:port` to listen on.
    #[serde(default = "default_http_bind")]
    pub bind: String,
    /// `[http.auth]`: required unless `bind` is a loopback address.
    #[serde(default)]
    pub auth: crate::pipeline::auth::AuthConfig,
    /// Serve each camera's live view to the console (the camera's video is encoded while someone
    /// watches).
    #[serde(default = "default_true")]
    pub live: bool,
    /// `/health` stays 200 while a camera has been offline (reconnecting) for at most this long.
    #[serde(default)]
    pub offline_grace_seconds: f64,
    /// Connections served at once; more wait until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    256
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: default_http_bind(),
            auth: Default::default(),
            live: true,
            offline_grace_seconds: 0.0,
            max_connections: default_max_connections(),
        }
    }
}

fn default_http_bind() -> String {
    "127.0.0.1:9090".into()
}

/// Why a pipeline file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load pipeline {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("`--set {0}` is not of the form section.key=value")]
    BadSet(String),
    #[error("pipeline {path} has {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// Where a run's settings come from: the pipeline file, its `--set` overrides and its `--shard`
/// (read again, the same way, on SIGHUP).
#[derive(Debug, Clone)]
pub struct PipelineFile {
    pub path: PathBuf,
    pub sets: Vec<String>,
    /// This process's share of the file's cameras (`None`: all of them).
    pub shard: Option<Shard>,
}

impl PipelineFile {
    /// [`PipelineConfig::load`], then only the shard's cameras.
    pub fn load(&self) -> Result<PipelineConfig, ConfigError> {
        let mut config = PipelineConfig::load(&self.path, &self.sets)?;
        if let Some(shard) = self.shard {
            config.camera = shard.select(std::mem::take(&mut config.camera))?;
        }
        Ok(config)
    }
}

/// Parses a camera source URI.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceUri {
    Rtsp(String),
    File(PathBuf),
    V4l2(PathBuf),
    Conveyor {
        frames: Option<u64>,
        fps: f64,
        seed: u64,
        /// Frame width and height (`size=1920x1080`; 640×480 unless given).
        size: (usize, usize),
    },
}

/// The smallest and largest conveyor frame side (`test://conveyor?size=WxH`); sides are even (the
/// encoder's I420 halves them).
const CONVEYOR_SIDES: std::ops::RangeInclusive<usize> = 64..=4096;

/// Why a camera's `source` is not one we read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceUriError {
    #[error("`{uri}`: file sources need an absolute path (file:///abs/path.mkv)")]
    RelativeFile { uri: String },
    #[error("`{uri}`: `{option}` needs a number")]
    NotANumber { uri: String, option: String },
    #[error("`{uri}`: unknown option `{key}` (frames, fps, seed, size)")]
    UnknownOption { uri: String, key: String },
    #[error("`{uri}`: `{option}`: give frames per second from 0.1 to 1000 (fps=25)")]
    BadFps { uri: String, option: String },
    #[error("`{uri}`: `{option}`: give WIDTHxHEIGHT, each even and 64 to 4096 (size=1920x1080)")]
    BadSize { uri: String, option: String },
    #[error(
        "`{uri}` is not a supported source (rtsp://…, rtsps://…, file:///abs/path, v4l2:///dev/videoN, test://conveyor)"
    )]
    Unsupported { uri: String },
}

impl SourceUri {
    /// Parses `uri`; the error says what forms are accepted.
    pub fn parse(uri: &str) -> Result<Self, SourceUriError> {
        if uri.starts_with("rtsp://") || uri.starts_with("rtsps://") {
            Ok(Self::Rtsp(uri.to_string()))
        } else if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(SourceUriError::RelativeFile { uri: uri.into() });
            }
            Ok(Self::File(PathBuf::from(path)))
        } else if let Some(path) = uri.strip_prefix("v4l2://") {
            Ok(Self::V4l2(PathBuf::from(path)))
        } else if let Some(rest) = uri.strip_prefix("test://conveyor") {
            let mut source = Self::Conveyor {
                frames: None,
                fps: 15.0,
                seed: 1,
                size: crate::pipeline::conveyor::CONVEYOR_SIZE,
            };
            let query = rest.strip_prefix('?').unwrap_or(rest);
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let Self::Conveyor {
                    frames,
                    fps,
                    seed,
                    size,
                } = &mut source
                else {
                    break;
                };
                let bad = || SourceUriError::NotANumber {
                    uri: uri.into(),
                    option: pair.into(),
                };
                match key {
                    "frames" => *frames = Some(value.parse().map_err(|_| bad())?),
                    "fps" => {
                        let parsed: f64 = value.parse().map_err(|_| bad())?;
                        if !(0.1..=1000.0).contains(&parsed) {
                            return Err(SourceUriError::BadFps {
                                uri: uri.into(),
                                option: pair.into(),
                            });
                        }
                        *fps = parsed
                    }
                    "seed" => *seed = value.parse().map_err(|_| bad())?,
                    "size" => {
                        *size = parse_size(value).ok_or_else(|| SourceUriError::BadSize {
                            uri: uri.into(),
                            option: pair.into(),
                        })?
                    }
                    _ => {
                        return Err(SourceUriError::UnknownOption {
                            uri: uri.into(),
                            key: key.into(),
                        });
                    }
                }
            }
            Ok(source)
        } else {
            Err(SourceUriError::Unsupported { uri: uri.into() })
        }
    }
}

/// `WIDTHxHEIGHT` with both sides even and within [`CONVEYOR_SIDES`].
fn parse_size(value: &str) -> Option<(usize, usize)> {
    let (width, height) = value.split_once(['x', 'X'])?;
    let (width, height) = (width.parse().ok()?, height.parse().ok()?);
    let fits = |side: usize| CONVEYOR_SIDES.contains(&side) && side.is_multiple_of(2);
    (fits(width) && fits(height)).then_some((width, height))
}

impl PipelineConfig {
    /// Loads `path`, then environment overrides (`STPM__MODEL__BUNDLE=…`), then `sets`
    /// (`model.provider=cpu`), and validates. Relative paths in the file stay relative to the
    /// working directory (the repository root in the README's commands).
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let load_error = |message: String| ConfigError::Load {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(load_error(
                "no such file (try pipelines/demo.toml)".to_string(),
            ));
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                // Values stay strings: the keys' types parse them (numbers, booleans), and a
                // password or name such as `007` or `1e3` is kept as written.
                config::Environment::with_prefix("STPM")
                    .prefix_separator("__")
                    .separator("__"),
            );
        for set in sets {
            let (key, value) = set
                .split_once('=')
                .filter(|(k, _)| k.contains('.'))
                .ok_or_else(|| ConfigError::BadSet(set.clone()))?;
            builder = builder
                .set_override(key.trim(), value.trim())
                .map_err(|e| load_error(e.to_string()))?;
        }
        let mut config: PipelineConfig = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| load_error(e.to_string()))?;
        // One instance per spool folder (`stpm run` locks it), so its path tells instances apart.
        let spool = std::path::absolute(&config.alerts.spool_dir)
            .unwrap_or_else(|_| config.alerts.spool_dir.clone());
        if let Some(mqtt) = config.mqtt.as_mut() {
            mqtt.distinguish_default_client_id(&spool);
        }
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Every problem of an otherwise well-formed file, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self
            .model
            .provider
            .parse::<crate::engine::ProviderRequest>()
            .is_err()
        {
            problems.push(format!(
                "model.provider = `{}`: use auto, cpu, cuda or tensorrt",
                self.model.provider
            ));
        }
        if self.model.sessions > MAX_SESSIONS {
            problems.push(format!(
                "model.sessions = {}: use 1 to {MAX_SESSIONS}, or 0 for {AUTO_CPU_SESSIONS} on the CPU",
                self.model.sessions
            ));
        }
        if self.model.batch > MAX_BATCH {
            problems.push(format!(
                "model.batch = {}: use 1 to {MAX_BATCH}, or 0 for auto (1)",
                self.model.batch
            ));
        }
        let max_wait = crate::engine::batch::MAX_WAIT.as_millis();
        if u128::from(self.model.batch_wait_ms) > max_wait {
            problems.push(format!(
                "model.batch_wait_ms = {}: use 0 to {max_wait}",
                self.model.batch_wait_ms
            ));
        }
        if self.camera.is_empty() {
            problems.push("no [[camera]]: add at least one".into());
        }
        for (index, camera) in self.camera.iter().enumerate() {
            let key = format!("camera[{index}]");
            if camera.name.is_empty()
                || !camera
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "{key}.name = `{}`: use letters, digits, `-` and `_`",
                    camera.name
                ));
            }
            if self.camera[..index].iter().any(|c| c.name == camera.name) {
                problems.push(format!("{key}.name = `{}` is used twice", camera.name));
            }
            match SourceUri::parse(&camera.source) {
                Err(message) => problems.push(format!("{key}.source: {message}")),
                Ok(SourceUri::File(path)) if !path.is_file() => {
                    problems.push(format!("{key}.source: {} does not exist", path.display()))
                }
                Ok(_) => {}
            }
            if !(camera.stall_seconds == 0.0 || (1.0..=3600.0).contains(&camera.stall_seconds)) {
                problems.push(format!(
                    "{key}.stall_seconds = {}: use 0 (no watchdog) or 1 to 3600",
                    camera.stall_seconds
                ));
            }
            // Below 0.001 (one frame in 1000 s) the interval overflows a duration.
            if !(camera.max_fps == 0.0 || (0.001..=10_000.0).contains(&camera.max_fps)) {
                problems.push(format!(
                    "{key}.max_fps = {}: use 0 (every frame) or 0.001 to 10000",
                    camera.max_fps
                ));
            }
            if let Err(e) = camera
                .alerts
                .validate(&self.alerts, &format!("{key}.alerts"))
            {
                problems.extend(e.problems);
            }
        }
        if let Err(e) = self.alerts.validate() {
            problems.extend(e.problems);
        }
        if let Some(Err(e)) = self.mqtt.as_ref().map(MqttConfig::validate) {
            problems.extend(e.problems);
        }
        problems.extend(self.output_problems());
        problems.extend(self.clips.problems("clips"));
        problems.extend(self.storage.problems());
        // Unless every camera turns them off itself.
        let inherited = self.camera.iter().any(|c| c.clips.enabled.is_none());
        if self.clips.enabled && !self.storage.enabled && inherited {
            problems.push(
                "clips.enabled = true needs storage.enabled = true (clips are kept with their events)"
                    .into(),
            );
        }
        for (index, camera) in self.camera.iter().enumerate() {
            let section = format!("camera[{index}].clips");
            // `[clips]`' own problems are reported once, above.
            let reported = self.clips.problems(&section);
            problems.extend(
                camera
                    .clips
                    .resolve(&self.clips)
                    .problems(&section)
                    .into_iter()
                    .filter(|p| !reported.contains(p)),
            );
            if camera.clips.enabled == Some(true) && !self.storage.enabled {
                problems.push(format!(
                    "{section}.enabled = true needs storage.enabled = true (clips are kept with their events)"
                ));
            }
        }
        problems
    }

    /// Whether any camera writes clips.
    pub fn any_clips(&self) -> bool {
        self.camera
            .iter()
            .any(|camera| camera.clips.resolve(&self.clips).enabled)
    }

    /// Problems of `[output]` and `[http]` (addresses checked only when enabled).
    fn output_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let grace = self.http.offline_grace_seconds;
        if !(0.0..=86_400.0).contains(&grace) {
            problems.push(format!(
                "http.offline_grace_seconds = {grace}: use 0 to 86400"
            ));
        }
        if !(1..=65_536).contains(&self.http.max_connections) {
            problems.push(format!(
                "http.max_connections = {}: use 1 to 65536",
                self.http.max_connections
            ));
        }
        if let Err(e) = self.output.encoder.parse::<EncoderRequest>() {
            problems.push(e.to_string());
        }
        let segment = self.output.record.segment_seconds;
        if !segment.is_finite() || segment < 0.0 {
            problems.push(format!(
                "output.record.segment_seconds = {segment}: use 0 (one file per run) or a length in seconds"
            ));
        }
        let rtsp = &self.output.rtsp;
        problems.extend(rtsp.problems());
        let rtsp_ip = rtsp.bind.parse::<IpAddr>();
        if rtsp.enabled && rtsp_ip.is_err() {
            problems.push(format!(
                "output.rtsp.bind = `{}`: use an IP address such as 127.0.0.1 or 0.0.0.0",
                rtsp.bind
            ));
        }
        let http = &self.http;
        let http_addr = http.bind.parse::<SocketAddr>();
        if http.enabled && http_addr.is_err() {
            problems.push(format!(
                "http.bind = `{}`: use ip:port such as 127.0.0.1:9090",
                http.bind
            ));
        }
        if let (true, true, Ok(ip), Ok(addr)) = (rtsp.enabled, http.enabled, rtsp_ip, http_addr)
            && rtsp.port != 0
            && addr.port() == rtsp.port
            && (ip == addr.ip() || ip.is_unspecified() || addr.ip().is_unspecified())
        {
            problems.push(format!(
                "http.bind = `{}` uses output.rtsp.port {}: pick another port for one of them",
                http.bind, rtsp.port
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("p.toml");
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn minimal_file_gets_defaults_and_sets_override() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write(
            dir.path(),
            "[model]\nbundle = \"engines/demo\"\n[[camera]]\nname = \"line1\"\nsource = \"test://conveyor?frames=5\"\n",
        );
        let config = PipelineConfig::load(&path, &["model.provider=cpu".into()]).expect("load");
        assert_eq!(config.model.provider, "cpu");
        assert_eq!((config.model.sessions, config.model.threads), (0, 0));
        assert_eq!(config.model.sessions_on(true), AUTO_CPU_SESSIONS);
        assert_eq!(config.model.sessions_on(false), 1);
        // Batches across cameras: none by default (whatever the provider or camera count), unless
        // asked.
        assert_eq!(config.model.batch, 0);
        assert_eq!(config.model.batch(), 1);
        let many = ModelConfig {
            batch: 100,
            ..config.model.clone()
        };
        assert_eq!(many.batch(), MAX_BATCH);
        let asked = ModelConfig {
            batch: 3,
            ..config.model.clone()
        };
        assert_eq!(asked.batch(), 3);
        assert_eq!(config.camera[0].max_fps, 0.0);
        assert!(config.camera[0].realtime);
        let sets = [
            "camera[0].realtime=false".into(),
            "camera[0].max_fps=2.5".into(),
            "mqtt.port=1884".into(),
            // Kept as written, though they look like numbers.
            "mqtt.password=007".into(),
            "mqtt.username=1e3".into(),
            "mqtt.client_id=0x10".into(),
        ];
        let config = PipelineConfig::load(&path, &sets).expect("load with camera sets");
        assert!(!config.camera[0].realtime);
        assert_eq!(config.camera[0].max_fps, 2.5);
        let mqtt = config.mqtt.clone().expect("[mqtt] from --set");
        assert_eq!(mqtt.port, 1884);
        assert_eq!(mqtt.password.as_deref(), Some("007"));
        assert_eq!(mqtt.username.as_deref(), Some("1e3"));
        assert_eq!(mqtt.client_id, "0x10");
        let bad = PipelineConfig::load(&path, &["mqtt.port=many".into()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(bad.contains("port"), "{bad}");
        assert!(!config.output.record.enabled);
        assert_eq!(config.output.encoder, "auto");
        assert_eq!(config.output.record.segment_seconds, 0.0);
        assert_eq!(
            SourceUri::parse(&config.camera[0].source),
            Ok(SourceUri::Conveyor {
                frames: Some(5),
                fps: 15.0,
                seed: 1,
                size: (640, 480)
            })
        );
    }

    #[test]
    fn a_conveyor_takes_its_frame_size_and_refuses_odd_ones() {
        let parsed = SourceUri::parse("test://conveyor?size=1920x1080&fps=25");
        assert_eq!(
            parsed,
            Ok(SourceUri::Conveyor {
                frames: None,
                fps: 25.0,
                seed: 1,
                size: (1920, 1080)
            })
        );
        for (good, size) in [("64x4096", (64, 4096)), ("4096X64", (4096, 64))] {
            let parsed = SourceUri::parse(&format!("test://conveyor?size={good}"));
            assert!(
                matches!(parsed, Ok(SourceUri::Conveyor { size: s, .. }) if s == size),
                "{good}: {parsed:?}"
            );
        }
        for bad in [
            "1921x1080",
            "1920",
            "1920x",
            "x1080",
            "62x64",
            "64x4098",
            "8192x64",
            "axb",
        ] {
            let uri = format!("test://conveyor?size={bad}");
            let message = SourceUri::parse(&uri).err().map(|e| e.to_string());
            assert!(
                message
                    .as_deref()
                    .is_some_and(|m| m.contains("WIDTHxHEIGHT")),
                "{uri}: {message:?}"
            );
        }
        for bad in ["0", "0.05", "-5", "NaN", "inf", "1001"] {
            let uri = format!("test://conveyor?fps={bad}");
            let message = SourceUri::parse(&uri).err().map(|e| e.to_string());
            assert!(
                message
                    .as_deref()
                    .is_some_and(|m| m.contains("0.1 to 1000")),
                "{uri}: {message:?}"
            );
        }
        assert!(SourceUri::parse("test://conveyor?fps=0.5").is_ok());
        let message = SourceUri::parse("test://conveyor?width=5")
            .err()
            .map(|e| e.to_string());
        assert!(
            message.as_deref().is_some_and(|m| m.contains("size")),
            "{message:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write(
            dir.path(),
            "[model]\nbundle = \"b\"\nprovider = \"gpu\"\nsessions = 17\nbatch = 33\nbatch_wait_ms = 5000\n\
             [[camera]]\nname = \"bad name\"\nsource = \"http://x\"\nmax_fps = -1\n\
             [[camera]]\nname = \"cam\"\nsource = \"file:///nowhere/x.mkv\"\nmax_fps = 1e-300\n\
             [alerts]\non_threshold = 0.5\noff_threshold = 0.7\n\
             [output]\nencoder = \"x265\"\n[output.record]\nsegment_seconds = -1\n",
        );
        let message = PipelineConfig::load(&path, &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for expected in [
            "model.provider",
            "model.sessions = 17: use 1 to 16, or 0 for 2 on the CPU",
            "model.batch = 33: use 1 to 32",
            "model.batch_wait_ms = 5000: use 0 to 1000",
            "camera[0].name",
            "camera[0].source",
            "camera[0].max_fps",
            "camera[1].source: /nowhere/x.mkv does not exist",
            // Would overflow the interval between analysed frames (a panic before 2026-12-05).
            "camera[1].max_fps = 0.000",
            "alerts.off_threshold",
            "output.encoder = `x265`",
            "output.record.segment_seconds = -1",
        ] {
            assert!(message.contains(expected), "missing {expected}: {message}");
        }
    }

    #[test]
    fn rtsp_and_http_outputs_are_checked_when_enabled() {
        let dir = tempfile::tempdir().expect("dir");
        let base =
            "[model]\nbundle = \"b\"\n[[camera]]\nname = \"a\"\nsource = \"test://conveyor\"\n";
        let path = write(
            dir.path(),
            &format!(
                "{base}[output.rtsp]\nenabled = true\nport = 9000\n[http]\nenabled = true\nbind = \"127.0.0.1:9000\"\n"
            ),
        );
        let message = PipelineConfig::load(&path, &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("uses output.rtsp.port 9000"), "{message}");
        let path = write(
            dir.path(),
            &format!(
                "{base}[output.rtsp]\nenabled = true\nbind = \"localhost\"\n[http]\nenabled = true\nbind = \"9090\"\n"
            ),
        );
        let message = PipelineConfig::load(&path, &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("output.rtsp.bind = `localhost`"),
            "{message}"
        );
        assert!(message.contains("http.bind = `9090`"), "{message}");
        let path = write(
            dir.path(),
            &format!("{base}[output.rtsp]\nenabled = true\n"),
        );
        let config = PipelineConfig::load(&path, &["http.enabled=true".into()]).expect("valid");
        assert_eq!(config.output.rtsp.port, 8554);
        assert_eq!(config.http.bind, "127.0.0.1:9090");
    }

    #[test]
    fn unknown_keys_and_bad_sets_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write(
            dir.path(),
            "[model]\nbundle = \"b\"\nbundel = \"typo\"\n[[camera]]\nname = \"a\"\nsource = \"test://conveyor\"\n",
        );
        let message = PipelineConfig::load(&path, &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("bundel"), "{message}");
        let path = write(
            dir.path(),
            "[model]\nbundle = \"b\"\n[[camera]]\nname = \"a\"\nsource = \"test://conveyor\"\n",
        );
        let message = PipelineConfig::load(&path, &["provider".into()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("section.key=value"), "{message}");
    }

    #[test]
    fn a_camera_overrides_clips_and_its_keys_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let cameras = "[clips]\nenabled = true\npre_seconds = 2\n\
             [[camera]]\nname = \"a\"\nsource = \"test://conveyor\"\n\
             [camera.clips]\nenabled = false\n\
             [[camera]]\nname = \"b\"\nsource = \"test://conveyor\"\n\
             [camera.clips]\npost_seconds = 1\nmax_seconds = 10\n";
        let path = write(dir.path(), &format!("[model]\nbundle = \"b\"\n{cameras}"));
        let config = PipelineConfig::load(&path, &[]).expect("load");
        let a = config.camera[0].clips.resolve(&config.clips);
        let b = config.camera[1].clips.resolve(&config.clips);
        assert!(!a.enabled);
        assert_eq!(
            (b.enabled, b.pre_seconds, b.post_seconds, b.max_seconds),
            (true, 2.0, 1.0, 10.0)
        );
        assert!(config.any_clips());
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        let problems = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            PipelineConfig::load(&path, &sets)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let message = problems(&["camera[1].clips.pre_seconds=700"]);
        assert!(
            message.contains("camera[1].clips.pre_seconds = 700"),
            "{message}"
        );
        let message = problems(&[
            "storage.enabled=false",
            "clips.enabled=false",
            "camera[1].clips.enabled=true",
        ]);
        assert!(
            message.contains("camera[1].clips.enabled = true needs storage"),
            "{message}"
        );
    }

    #[test]
    fn pipelines_on_one_host_get_their_own_default_mqtt_client_id() {
        let dir = tempfile::tempdir().expect("dir");
        let path = write(
            dir.path(),
            "[model]\nbundle = \"b\"\n[[camera]]\nname = \"a\"\nsource = \"test://conveyor\"\n[mqtt]\n",
        );
        let id = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            PipelineConfig::load(&path, &sets)
                .expect("load")
                .mqtt
                .expect("mqtt")
                .client_id
        };
        let first = id(&["alerts.spool_dir=/srv/line1/spool"]);
        let second = id(&["alerts.spool_dir=/srv/line2/spool"]);
        assert!(first.starts_with("stpm-") && first.len() > 14, "{first}");
        assert_ne!(first, second);
        assert_eq!(first, id(&["alerts.spool_dir=/srv/line1/spool"]), "stable");
        assert_eq!(id(&["mqtt.client_id=mine"]), "mine", "a given id is kept");
    }
}
