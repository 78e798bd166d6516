//! The H.264 encoder of recordings and RTSP streams (`[output] encoder`): which GStreamer element
//! runs, with which low-latency settings (only those the installed element has), and why it was
//! chosen. It builds pipeline description fragments; the pipelines themselves are `record`'s and
//! `rtsp`'s.

use std::fmt;
use std::str::FromStr;

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;

/// Frames between key frames when nothing asks for fewer: an RTSP client joining a stream decodes
/// from the next key frame, at most this far away.
pub const KEY_INTERVAL: u32 = 30;

/// An H.264 encoder element we know how to set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// NVIDIA desktop and server GPUs (gst-plugins-bad's nvcodec).
    Nvh264,
    /// NVIDIA Jetson (its own V4L2 encoder; frames reach it in NVMM memory through nvvidconv).
    Nvv4l2,
    /// x264 on the CPU (gst-plugins-ugly).
    X264,
    /// Cisco's openh264 on the CPU (gst-plugins-bad).
    Openh264,
}

/// One low-latency setting: a property and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Setting {
    property: &'static str,
    value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Fixed(&'static str),
    /// The key-frame interval in frames (the recorder shortens it to fit a segment).
    KeyInterval,
}

const fn fixed(property: &'static str, value: &'static str) -> Setting {
    Setting {
        property,
        value: Value::Fixed(value),
    }
}

const fn key_interval(property: &'static str) -> Setting {
    Setting {
        property,
        value: Value::KeyInterval,
    }
}

/// x264 tuned for zero latency: no B-frames or lookahead, one frame out per frame in.
const X264: &[Setting] = &[
    fixed("tune", "zerolatency"),
    fixed("speed-preset", "ultrafast"),
    key_interval("key-int-max"),
];

/// openh264 never reorders. Its default 128 kbit/s smears a 640×480 picture, so it gets x264enc's
/// default bitrate; frame skipping stays off because a skipped frame puts out no buffer, which
/// would shift the recorder's one-out-per-one-in encode timing.
const OPENH264: &[Setting] = &[
    fixed("complexity", "low"),
    fixed("rate-control", "bitrate"),
    fixed("bitrate", "2048000"),
    fixed("enable-frame-skip", "false"),
    key_interval("gop-size"),
];

/// GStreamer 1.22's nvh264enc (GstNvBaseEnc): the low-latency preset, no reordering delay, no
/// B-frames (`bframes` exists only where the GPU supports them).
const NVH264: &[Setting] = &[
    fixed("preset", "low-latency-hq"),
    fixed("zerolatency", "true"),
    fixed("bframes", "0"),
    key_interval("gop-size"),
];

/// Jetson's nvv4l2h264enc: every I-frame an IDR frame (its idrinterval defaults to 256), SPS/PPS
/// before each, clocks at maximum.
const NVV4L2: &[Setting] = &[
    fixed("preset-level", "UltraFastPreset"),
    fixed("maxperf-enable", "true"),
    fixed("insert-sps-pps", "true"),
    key_interval("iframeinterval"),
    key_interval("idrinterval"),
];

impl EncoderKind {
    /// `auto`'s order: the GPU encoders first (they leave the cores to inference), then x264,
    /// then openh264.
    pub const AUTO_ORDER: [Self; 4] = [Self::Nvh264, Self::Nvv4l2, Self::X264, Self::Openh264];

    /// The `output.encoder` value.
    pub fn key(self) -> &'static str {
        match self {
            Self::Nvh264 => "nvh264",
            Self::Nvv4l2 => "nvv4l2",
            Self::X264 => "x264",
            Self::Openh264 => "openh264",
        }
    }

    /// The GStreamer element that encodes.
    pub fn element(self) -> &'static str {
        match self {
            Self::Nvh264 => "nvh264enc",
            Self::Nvv4l2 => "nvv4l2h264enc",
            Self::X264 => "x264enc",
            Self::Openh264 => "openh264enc",
        }
    }

    /// Every element the chain needs.
    fn elements(self) -> &'static [&'static str] {
        match self {
            Self::Nvh264 => &["nvh264enc"],
            Self::Nvv4l2 => &["nvv4l2h264enc", "nvvidconv"],
            Self::X264 => &["x264enc"],
            Self::Openh264 => &["openh264enc"],
        }
    }

    /// What sits between I420 frames in system memory and the encoder.
    fn upload(self) -> &'static str {
        match self {
            Self::Nvv4l2 => "nvvidconv ! video/x-raw(memory:NVMM),format=I420 ! ",
            _ => "",
        }
    }

    fn settings(self) -> &'static [Setting] {
        match self {
            Self::Nvh264 => NVH264,
            Self::Nvv4l2 => NVV4L2,
            Self::X264 => X264,
            Self::Openh264 => OPENH264,
        }
    }

    /// Where the element comes from, for the error when it is missing.
    fn install_hint(self) -> &'static str {
        match self {
            Self::Nvh264 => {
                "gstreamer1.0-plugins-bad's nvcodec registers it only where an NVIDIA GPU and driver are found"
            }
            Self::Nvv4l2 => "it comes with NVIDIA Jetson's GStreamer plugins, with nvvidconv",
            Self::X264 => "install gstreamer1.0-plugins-ugly",
            Self::Openh264 => "install gstreamer1.0-plugins-bad with libopenh264",
        }
    }
}

impl fmt::Display for EncoderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// What `output.encoder` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderRequest {
    /// The first installed of [`EncoderKind::AUTO_ORDER`].
    Auto,
    /// This one, or fail the start.
    Only(EncoderKind),
}

impl FromStr for EncoderRequest {
    type Err = EncoderError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "auto" {
            return Ok(Self::Auto);
        }
        EncoderKind::AUTO_ORDER
            .into_iter()
            .find(|kind| kind.key() == text)
            .map(Self::Only)
            .ok_or_else(|| EncoderError::Unknown(text.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("output.encoder = `{0}`: use auto, nvh264, nvv4l2, x264 or openh264")]
    Unknown(String),
    #[error(
        "output.encoder = `{requested}`: {missing} is not available here ({hint}); H.264 encoders found: {installed}"
    )]
    Missing {
        requested: EncoderKind,
        missing: String,
        hint: &'static str,
        installed: String,
    },
    #[error(
        "output.encoder = `auto`: no H.264 encoder found (tried {tried}); install gstreamer1.0-plugins-ugly for x264enc"
    )]
    NoneInstalled { tried: String },
    #[error("GStreamer failed to initialise: {0}")]
    Init(String),
}

/// The encoder `auto` or the configuration chose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderChoice {
    pub kind: EncoderKind,
    /// E.g. `auto; nvh264enc, nvv4l2h264enc not available`.
    pub reason: String,
}

/// The elements of `kind` that `installed` does not know.
fn missing(kind: EncoderKind, installed: &impl Fn(&str) -> bool) -> Vec<&'static str> {
    kind.elements()
        .iter()
        .copied()
        .filter(|element| !installed(element))
        .collect()
}

/// Picks the encoder for `request` given which elements are `installed`.
pub fn choose(
    request: EncoderRequest,
    installed: impl Fn(&str) -> bool,
) -> Result<EncoderChoice, EncoderError> {
    let usable = |kind: EncoderKind| missing(kind, &installed).is_empty();
    match request {
        EncoderRequest::Only(kind) => {
            let lacking = missing(kind, &installed);
            if lacking.is_empty() {
                return Ok(EncoderChoice {
                    kind,
                    reason: format!("output.encoder = {kind}"),
                });
            }
            let found: Vec<&str> = EncoderKind::AUTO_ORDER
                .into_iter()
                .filter(|&other| usable(other))
                .map(EncoderKind::element)
                .collect();
            Err(EncoderError::Missing {
                requested: kind,
                missing: lacking.join(" and "),
                hint: kind.install_hint(),
                installed: if found.is_empty() {
                    "none".into()
                } else {
                    format!("{} (or use auto)", found.join(", "))
                },
            })
        }
        EncoderRequest::Auto => {
            let Some(position) = EncoderKind::AUTO_ORDER.iter().position(|&k| usable(k)) else {
                return Err(EncoderError::NoneInstalled {
                    tried: EncoderKind::AUTO_ORDER.map(EncoderKind::element).join(", "),
                });
            };
            let kind = EncoderKind::AUTO_ORDER[position];
            let passed_over: Vec<&str> = EncoderKind::AUTO_ORDER[..position]
                .iter()
                .map(|k| k.element())
                .collect();
            let reason = if passed_over.is_empty() {
                "auto".to_string()
            } else {
                format!("auto; {} not available", passed_over.join(", "))
            };
            Ok(EncoderChoice { kind, reason })
        }
    }
}

/// An installed encoder with the settings its element accepts.
#[derive(Debug, Clone)]
pub struct Encoder {
    kind: EncoderKind,
    settings: Vec<Setting>,
    reason: String,
}

impl Encoder {
    /// Chooses among the elements this GStreamer has and keeps the settings the chosen element
    /// accepts (a property this version lacks is left out and named in the reason).
    pub fn resolve(request: EncoderRequest) -> Result<Self, EncoderError> {
        gst::init().map_err(|e| EncoderError::Init(e.to_string()))?;
        let choice = choose(request, |element| {
            gst::ElementFactory::find(element).is_some()
        })?;
        let (settings, rejected) = accepted(choice.kind.element(), choice.kind.settings());
        let mut reason = choice.reason;
        if !rejected.is_empty() {
            reason.push_str(&format!(
                "; this version does not take {}",
                rejected.join(", ")
            ));
        }
        Ok(Self {
            kind: choice.kind,
            settings,
            reason,
        })
    }

    pub fn kind(&self) -> EncoderKind {
        self.kind
    }

    /// The element's name, e.g. `x264enc`.
    pub fn element(&self) -> &'static str {
        self.kind.element()
    }

    /// Why this encoder, e.g. `auto; nvh264enc, nvv4l2h264enc not available`.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Description from raw video to H.264: `videoconvert ! … ! <element> name=encoder …`, a key
    /// frame at least every `key_interval` frames. The element is named `encoder` for the
    /// recorder's timing probe.
    pub fn chain(&self, key_interval: u32) -> String {
        let mut chain = format!(
            "videoconvert ! video/x-raw,format=I420 ! {}{} name=encoder",
            self.kind.upload(),
            self.kind.element()
        );
        for setting in &self.settings {
            chain.push_str(&format!(
                " {}={}",
                setting.property,
                setting.value.text(key_interval)
            ));
        }
        chain
    }
}

impl Value {
    fn text(self, key_interval: u32) -> String {
        match self {
            Value::Fixed(value) => value.to_string(),
            Value::KeyInterval => key_interval.max(1).to_string(),
        }
    }
}

/// `settings` split into those `element` has a property for and accepts the value of, and the
/// rest as `property=value` texts.
fn accepted(element: &str, settings: &[Setting]) -> (Vec<Setting>, Vec<String>) {
    let class = gst::ElementFactory::find(element)
        .and_then(|factory| factory.load().ok())
        .and_then(|factory| glib::object::ObjectClass::from_type(factory.element_type()));
    let mut kept = Vec::new();
    let mut rejected = Vec::new();
    for setting in settings {
        let value = setting.value.text(KEY_INTERVAL);
        let takes = class
            .as_ref()
            .and_then(|class| class.find_property(setting.property))
            .is_some_and(|pspec| glib::Value::deserialize_with_pspec(&value, &pspec).is_ok());
        if takes {
            kept.push(*setting);
        } else {
            rejected.push(format!("{}={value}", setting.property));
        }
    }
    (kept, rejected)
}

/// The key-frame interval of a recording cut into `segment_seconds` pieces at `fps`: at most
/// [`KEY_INTERVAL`], and an equal share of one segment's frames, so that whole GOPs fill a segment
/// (2 s at 25 fps: 25, not 30, which would cut after 30 frames, 1.2 s).
pub fn key_interval_within(segment_seconds: f64, fps: f64) -> u32 {
    let frames = (segment_seconds * fps).floor();
    if !(frames.is_finite() && frames >= 1.0) {
        return 1;
    }
    let frames = frames as u64;
    let gops = frames.div_ceil(u64::from(KEY_INTERVAL));
    u32::try_from(frames / gops).unwrap_or(KEY_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(elements: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |element| elements.contains(&element)
    }

    /// The error's message, or "" for a success.
    fn error_text<T>(result: Result<T, EncoderError>) -> String {
        result.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn auto_takes_the_first_installed_in_order_and_says_what_it_passed_over() {
        let choice = choose(EncoderRequest::Auto, only(&["x264enc", "openh264enc"])).expect("x264");
        assert_eq!(choice.kind, EncoderKind::X264);
        assert_eq!(
            choice.reason,
            "auto; nvh264enc, nvv4l2h264enc not available"
        );
        let choice = choose(
            EncoderRequest::Auto,
            only(&["nvh264enc", "x264enc", "openh264enc"]),
        )
        .expect("nvh264");
        assert_eq!(
            (choice.kind, choice.reason.as_str()),
            (EncoderKind::Nvh264, "auto")
        );
        // Jetson's encoder without nvvidconv cannot take our frames.
        let choice = choose(
            EncoderRequest::Auto,
            only(&["nvv4l2h264enc", "openh264enc"]),
        )
        .expect("openh264");
        assert_eq!(choice.kind, EncoderKind::Openh264);
        let choice = choose(
            EncoderRequest::Auto,
            only(&["nvv4l2h264enc", "nvvidconv", "x264enc"]),
        )
        .expect("nvv4l2");
        assert_eq!(choice.kind, EncoderKind::Nvv4l2);
        assert_eq!(choice.reason, "auto; nvh264enc not available");
        let message = error_text(choose(EncoderRequest::Auto, only(&[])));
        assert!(
            message.contains("output.encoder = `auto`: no H.264 encoder found")
                && message.contains("openh264enc"),
            "{message}"
        );
    }

    #[test]
    fn an_explicit_encoder_that_is_missing_names_the_key_and_what_is_installed() {
        let installed = only(&["x264enc", "openh264enc"]);
        let choice = choose("openh264".parse().expect("openh264"), &installed).expect("present");
        assert_eq!(choice.kind, EncoderKind::Openh264);
        assert_eq!(choice.reason, "output.encoder = openh264");
        let message = error_text(choose("nvh264".parse().expect("nvh264"), &installed));
        assert!(
            message.starts_with("output.encoder = `nvh264`: nvh264enc is not available")
                && message.ends_with("H.264 encoders found: x264enc, openh264enc (or use auto)"),
            "{message}"
        );
        let message = error_text(choose(
            "nvv4l2".parse().expect("nvv4l2"),
            only(&["nvv4l2h264enc"]),
        ));
        assert!(
            message.contains("nvvidconv is not available") && message.ends_with("found: none"),
            "{message}"
        );
        let message = error_text("x265".parse::<EncoderRequest>());
        assert_eq!(
            message,
            "output.encoder = `x265`: use auto, nvh264, nvv4l2, x264 or openh264"
        );
    }

    #[test]
    fn segments_get_a_key_frame_at_least_once_per_segment() {
        assert_eq!(key_interval_within(1.0, 12.0), 12);
        assert_eq!(key_interval_within(60.0, 25.0), KEY_INTERVAL);
        assert_eq!(key_interval_within(2.0, 25.0), 25);
        assert_eq!(key_interval_within(10.0, 29.97), 29);
        assert_eq!(key_interval_within(0.5, 15.0), 7);
        assert_eq!(key_interval_within(1e12, 30.0), KEY_INTERVAL);
        assert_eq!(key_interval_within(0.01, 15.0), 1);
        assert_eq!(key_interval_within(1.0, f64::NAN), 1);
    }

    /// Runs `frames` test frames through the encoder's chain and counts the H.264 frames out.
    fn encode(encoder: &Encoder, frames: u32) -> usize {
        let pipeline = gst::parse::launch(&format!(
            "videotestsrc num-buffers={frames} ! video/x-raw,width=64,height=48,framerate=10/1 ! {} ! \
             h264parse ! appsink name=sink sync=false",
            encoder.chain(5)
        ))
        .expect("chain parses")
        .downcast::<gst::Pipeline>()
        .expect("pipeline");
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gstreamer_app::AppSink>().ok())
            .expect("appsink");
        pipeline.set_state(gst::State::Playing).expect("play");
        let mut out = 0;
        while sink.pull_sample().is_ok() {
            out += 1;
        }
        let _ = pipeline.set_state(gst::State::Null);
        out
    }

    #[test]
    fn the_cpu_encoders_run_with_all_their_settings() {
        for (request, element) in [("x264", "x264enc"), ("openh264", "openh264enc")] {
            let encoder = Encoder::resolve(request.parse().expect("request")).expect(element);
            assert_eq!(encoder.element(), element);
            // Every setting of the table exists in GStreamer 1.22.
            assert_eq!(
                encoder.reason(),
                format!("output.encoder = {request}"),
                "{element}"
            );
            assert_eq!(encode(&encoder, 12), 12, "{element}");
        }
        let x264 = Encoder::resolve(EncoderRequest::Only(EncoderKind::X264)).expect("x264");
        assert_eq!(
            x264.chain(30),
            "videoconvert ! video/x-raw,format=I420 ! x264enc name=encoder tune=zerolatency \
             speed-preset=ultrafast key-int-max=30"
        );
    }

    #[test]
    fn settings_the_element_lacks_or_refuses_are_left_out() {
        gst::init().expect("gst init");
        let settings = [
            fixed("tune", "zerolatency"),
            fixed("no-such-property", "1"),
            fixed("speed-preset", "warp-speed"),
            key_interval("key-int-max"),
        ];
        let (kept, rejected) = accepted("x264enc", &settings);
        assert_eq!(kept, [settings[0], settings[3]]);
        assert_eq!(rejected, ["no-such-property=1", "speed-preset=warp-speed"]);
    }
}
