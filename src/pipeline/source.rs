//! Capture: one thread per camera turns its source (a GStreamer pipeline ending in an appsink, or
//! the generated conveyor) into RGB frames on the camera's [`FrameQueue`]. Owns reconnecting with
//! capped exponential backoff, looping files and the end-of-stream marker, and which decoder runs
//! (NVIDIA's NVDEC where preferred and registered, the CPU's otherwise or after NVDEC failed);
//! never runs inference.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use crate::pipeline::config::SourceUri;
use crate::pipeline::conveyor::Conveyor;
use crate::pipeline::queue::{FrameQueue, Item};
use crate::preprocess::RgbFrame;

/// A captured frame with its stream time (monotonic per camera, also across file loops).
#[derive(Debug)]
pub struct Captured {
    pub frame: RgbFrame,
    pub pts: Duration,
    /// Nominal frame rate of the source (0 when unknown).
    pub fps: f64,
    /// When the frame reached the appsink (or was generated): where end-to-end latency starts.
    pub arrived: Instant,
    /// Decoder and colour conversion time of this frame (GStreamer sources with a decoder).
    pub decode: Option<Duration>,
}

/// How a camera's frames reach its queue.
pub struct SourceSpec {
    pub camera: String,
    pub uri: SourceUri,
    pub looping: bool,
    /// Play at the source's rate (drop when behind) instead of as fast as inference allows.
    pub realtime: bool,
    /// A live source with no frame for this long has stalled: offline, reconnect (`None`: never).
    pub stall: Option<Duration>,
}

impl SourceSpec {
    /// The capture of `camera` (its source already parsed into `uri`), as its `[[camera]]`
    /// table says: looping, realtime, the stall watchdog.
    pub fn for_camera(camera: &crate::pipeline::config::CameraConfig, uri: SourceUri) -> Self {
        Self {
            camera: camera.name.clone(),
            uri,
            looping: camera.looping,
            realtime: camera.realtime,
            stall: (camera.stall_seconds > 0.0)
                .then(|| Duration::from_secs_f64(camera.stall_seconds)),
        }
    }

    fn is_live(&self) -> bool {
        matches!(self.uri, SourceUri::Rtsp(_) | SourceUri::V4l2(_))
    }
}

/// Starts the capture thread of one camera.
pub fn spawn(
    spec: SourceSpec,
    queue: Arc<FrameQueue<Captured>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("capture-{}", spec.camera))
        .spawn(move || {
            match spec.uri.clone() {
                SourceUri::Conveyor {
                    frames,
                    fps,
                    seed,
                    size,
                } => run_conveyor(&spec, frames, fps, seed, size, &queue, &stop),
                _ => run_gstreamer(&spec, &queue, &stop),
            }
            queue.push_drop_oldest(Item::End);
        })
}

fn push(spec: &SourceSpec, queue: &FrameQueue<Captured>, stop: &AtomicBool, item: Captured) {
    if spec.realtime || spec.is_live() {
        queue.push_drop_oldest(Item::Frame(item));
    } else {
        queue.push_wait(Item::Frame(item), &|| stop.load(Ordering::Relaxed));
    }
}

fn run_conveyor(
    spec: &SourceSpec,
    frames: Option<u64>,
    fps: f64,
    seed: u64,
    (w, h): (usize, usize),
    queue: &FrameQueue<Captured>,
    stop: &AtomicBool,
) {
    let mut conveyor = Conveyor::new(w, h, seed);
    let period = Duration::from_secs_f64(1.0 / fps.max(0.1));
    let start = Instant::now();
    let mut index = 0u64;
    while !stop.load(Ordering::Relaxed) && frames.is_none_or(|n| index < n) {
        let generated = conveyor.frame(index);
        let pts = period.mul_f64(index as f64);
        if spec.realtime
            && let Some(wait) = pts.checked_sub(start.elapsed())
        {
            std::thread::sleep(wait);
        }
        push(
            spec,
            queue,
            stop,
            Captured {
                frame: generated.frame,
                pts,
                fps,
                arrived: Instant::now(),
                decode: None,
            },
        );
        index += 1;
    }
}

/// Whether `factory` is one of NVIDIA's video decoders (gst-plugins-bad's nvcodec registers them,
/// e.g. `nvh264dec`, `nvh265dec` or `nvh264device1dec` on a second GPU, only where an NVIDIA GPU and
/// its driver's NVDEC library are found).
fn is_nvdec(factory: &gst::ElementFactory) -> bool {
    factory
        .plugin_name()
        .is_some_and(|plugin| plugin == "nvcodec")
        && is_video_decoder(factory)
}

fn is_video_decoder(factory: &gst::ElementFactory) -> bool {
    factory.klass().contains("Decoder") && factory.klass().contains("Video")
}

/// Makes `decodebin` try NVIDIA's decoders before the CPU's (`avdec_*`, primary rank, which wins
/// a tie by name) for the rest of the process, the parser-based ones before the stateless
/// (`…sldec`); returns those this machine registers (none without an NVIDIA GPU and driver or
/// without the nvcodec plugin).
pub fn prefer_nvdec() -> Vec<String> {
    if gst::init().is_err() {
        return Vec::new();
    }
    let mut names: Vec<String> = gst::Registry::get()
        .features_by_plugin("nvcodec")
        .into_iter()
        .filter_map(|feature| feature.downcast::<gst::ElementFactory>().ok())
        .filter(is_nvdec)
        .map(|factory| {
            let stateless = factory.name().ends_with("sldec");
            factory.set_rank(gst::Rank::PRIMARY + if stateless { 1 } else { 2 });
            factory.name().to_string()
        })
        .collect();
    names.sort();
    names
}

/// Makes `decodebin` pass over the factories `skip` picks (NVIDIA's decoders after they failed, so
/// that the CPU's decode).
fn skip_factories(decodebin: &gst::Element, skip: fn(&gst::ElementFactory) -> bool) {
    // decodebin's "autoplug-select" answers with this enum: 0 tries the factory, 2 skips it.
    let Some(answers) = gst::glib::Type::from_name("GstAutoplugSelectResult")
        .and_then(gst::glib::EnumClass::with_type)
    else {
        log::warn!("decodebin has no autoplug-select answers: no decoder can be left out");
        return;
    };
    decodebin.connect("autoplug-select", false, move |values| {
        let skipped = values
            .get(3)
            .and_then(|v| v.get::<gst::ElementFactory>().ok())
            .is_some_and(|factory| skip(&factory));
        answers.to_value(if skipped { 2 } else { 0 })
    });
}

/// The GStreamer description of a source up to (excluding) the appsink.
fn source_description(uri: &SourceUri) -> String {
    let head = match uri {
        SourceUri::File(_) => "filesrc name=src ! decodebin name=decode",
        SourceUri::Rtsp(_) => "rtspsrc name=src latency=200 ! decodebin name=decode",
        SourceUri::V4l2(_) => "v4l2src name=src ! decodebin name=decode",
        SourceUri::Conveyor { .. } => "videotestsrc name=src",
    };
    format!("{head} ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink max-buffers=2")
}

/// The largest frame a camera may send (8K UHD, 7680×4320): more is a misconfigured or hostile
/// source, and would take the memory of several frames in every queue.
pub const MAX_FRAME_PIXELS: usize = 7680 * 4320;

/// The size of a sample's frames when it is above [`MAX_FRAME_PIXELS`].
fn oversized(sample: &gst::Sample) -> Option<(u32, u32)> {
    let info = gst_video::VideoInfo::from_caps(sample.caps()?).ok()?;
    let (w, h) = (info.width(), info.height());
    (w as usize * h as usize > MAX_FRAME_PIXELS).then_some((w, h))
}

/// Copies a mapped RGB video frame (rows may be padded) into a tight [`RgbFrame`].
fn copy_frame(sample: &gst::Sample) -> Option<(RgbFrame, Duration, f64)> {
    let buffer = sample.buffer()?;
    let info = gst_video::VideoInfo::from_caps(sample.caps()?).ok()?;
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).ok()?;
    let (w, h) = (info.width() as usize, info.height() as usize);
    let stride = frame.plane_stride()[0] as usize;
    let data = frame.plane_data(0).ok()?;
    let mut pixels = Vec::with_capacity(w * h * 3);
    for row in 0..h {
        pixels.extend_from_slice(data.get(row * stride..row * stride + w * 3)?);
    }
    let fps = info.fps();
    let fps = if fps.denom() > 0 {
        fps.numer() as f64 / fps.denom() as f64
    } else {
        0.0
    };
    let pts = buffer
        .pts()
        .map_or(Duration::ZERO, |t| Duration::from_nanos(t.nseconds()));
    Some((
        RgbFrame {
            width: w,
            height: h,
            pixels,
        },
        pts,
        fps,
    ))
}

/// Why a source pipeline could not be built or started (the camera retries live sources).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("GStreamer failed to initialise: {0}")]
    Init(String),
    #[error("cannot build the source pipeline: {0}")]
    Build(String),
    #[error("the source description is not a pipeline")]
    NotAPipeline,
    #[error("the source pipeline has no {0}")]
    Missing(&'static str),
    #[error("cannot start: {0}")]
    Start(String),
}

/// How a camera's video is decoded, kept across its source's restarts.
#[derive(Default)]
struct Decoding {
    /// NVIDIA's decoders failed once: decodebin passes over them.
    cpu_only: bool,
    /// Frames up to this stream time were delivered before a restart (a file played again).
    resume_after: Option<Duration>,
    /// The decoder the camera last said it decodes with (said again only when it changes).
    said: Arc<std::sync::Mutex<Option<String>>>,
}

/// What ended one run of a GStreamer source pipeline.
enum Ending {
    /// End of stream (file finished).
    Eos,
    /// An error message from the pipeline (or a stall, or a file that gave no frame), and whether
    /// an NVIDIA decoder was decoding: the camera then tries the CPU's.
    Error(String, bool),
    /// `stop` was set.
    Stopped,
}

fn run_gstreamer(spec: &SourceSpec, queue: &Arc<FrameQueue<Captured>>, stop: &Arc<AtomicBool>) {
    let mut backoff = Duration::from_millis(500);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    // Stream time continues across file loops and reconnects; a live camera's is the wall time
    // since the source started, so a camera that connects late or comes back after a gap has
    // frames (and alerts) at the times they were seen.
    let offset = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let last_pts = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let wall = spec.is_live().then(Instant::now);
    let mut decoding = Decoding::default();
    loop {
        let started = Instant::now();
        let ending = match play_once(spec, queue, stop, &offset, &last_pts, wall, &decoding) {
            Ok(ending) => ending,
            Err(error) => Ending::Error(error.to_string(), false),
        };
        match ending {
            Ending::Stopped => return,
            Ending::Error(message, true) if !decoding.cpu_only => {
                log::warn!(
                    "[{}] the NVIDIA decoder failed ({message}); decoding on the CPU from now on",
                    spec.camera
                );
                decoding.cpu_only = true;
                if spec.is_live() {
                    if let (Ok(mut offset), Ok(last)) = (offset.lock(), last_pts.lock()) {
                        *offset = *last + Duration::from_millis(40);
                    }
                } else {
                    // A file plays again from its start: the frames already delivered are skipped.
                    decoding.resume_after = last_pts.lock().ok().map(|last| *last);
                }
                continue;
            }
            Ending::Eos if spec.looping && !spec.is_live() => {
                if let (Ok(mut offset), Ok(last)) = (offset.lock(), last_pts.lock()) {
                    *offset = *last + Duration::from_millis(40);
                }
                continue;
            }
            Ending::Eos if !spec.is_live() => {
                log::info!("[{}] end of file", spec.camera);
                return;
            }
            Ending::Eos | Ending::Error(..) if !spec.is_live() => {
                if let Ending::Error(message, _) = ending {
                    log::warn!("[{}] source failed: {message}", spec.camera);
                }
                return;
            }
            Ending::Eos | Ending::Error(..) => {
                let why = match ending {
                    Ending::Error(message, _) => message,
                    _ => "end of stream".into(),
                };
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(500);
                }
                log::warn!(
                    "[{}] offline ({why}); reconnecting in {:.1} s",
                    spec.camera,
                    backoff.as_secs_f64()
                );
                queue.push_drop_oldest(Item::Offline(why));
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                if let (Ok(mut offset), Ok(last)) = (offset.lock(), last_pts.lock()) {
                    *offset = *last + Duration::from_millis(40);
                }
            }
        }
    }
}

/// What [`time_decoder`] learns of the video decoder `decodebin` plugged.
#[derive(Default)]
struct DecoderWatch {
    /// When the latest compressed frame (or the end of stream, which drains the decoder) entered
    /// it.
    input: std::sync::Mutex<Option<Instant>>,
    /// Its factory's name, e.g. `avdec_h264` or `nvh264dec`, and whether it is NVIDIA's.
    factory: std::sync::Mutex<Option<(String, bool)>>,
}

impl DecoderWatch {
    /// "avdec_h264 (CPU)", "nvh264dec (NVDEC)", or None before a decoder was plugged.
    fn describe(&self) -> Option<String> {
        let (name, nvidia) = self.factory.lock().ok()?.clone()?;
        Some(format!("{name} ({})", if nvidia { "NVDEC" } else { "CPU" }))
    }

    /// An NVIDIA decoder was plugged.
    fn nvidia(&self) -> bool {
        self.factory
            .lock()
            .is_ok_and(|factory| factory.as_ref().is_some_and(|(_, nvidia)| *nvidia))
    }
}

/// Watches the video decoder that `decodebin` plugs into `pipeline`: its factory, and when the
/// latest compressed frame entered it. The decoder, colour conversion and appsink run on one
/// streaming thread, so at the appsink the time since then is what decoding that frame took,
/// without waiting downstream.
fn time_decoder(pipeline: &gst::Pipeline) -> Arc<DecoderWatch> {
    let watch = Arc::new(DecoderWatch::default());
    let seen = Arc::clone(&watch);
    pipeline.connect_deep_element_added(move |_, _, element| {
        let Some(factory) = element.factory().filter(is_video_decoder) else {
            return;
        };
        let Some(pad) = element.static_pad("sink") else {
            return;
        };
        if let Ok(mut seen) = seen.factory.lock() {
            *seen = Some((factory.name().to_string(), is_nvdec(&factory)));
        }
        let seen = Arc::clone(&seen);
        pad.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
            move |_, info| {
                let starts_work = match &info.data {
                    Some(gst::PadProbeData::Buffer(_)) => true,
                    Some(gst::PadProbeData::Event(event)) => event.type_() == gst::EventType::Eos,
                    _ => false,
                };
                if starts_work && let Ok(mut input) = seen.input.lock() {
                    *input = Some(Instant::now());
                }
                gst::PadProbeReturn::Ok
            },
        );
    });
    watch
}

/// Builds, plays and tears down the source pipeline once, decoding as `decoding` says.
fn play_once(
    spec: &SourceSpec,
    queue: &Arc<FrameQueue<Captured>>,
    stop: &Arc<AtomicBool>,
    offset: &Arc<std::sync::Mutex<Duration>>,
    last_pts: &Arc<std::sync::Mutex<Duration>>,
    wall: Option<Instant>,
    decoding: &Decoding,
) -> Result<Ending, SourceError> {
    gst::init().map_err(|e| SourceError::Init(e.to_string()))?;
    let pipeline = gst::parse::launch(&source_description(&spec.uri))
        .map_err(|e| SourceError::Build(e.to_string()))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| SourceError::NotAPipeline)?;
    let src = pipeline
        .by_name("src")
        .ok_or(SourceError::Missing("source element"))?;
    match &spec.uri {
        SourceUri::File(path) => src.set_property("location", path.to_string_lossy().as_ref()),
        SourceUri::Rtsp(url) => src.set_property("location", url.as_str()),
        SourceUri::V4l2(device) => src.set_property("device", device.to_string_lossy().as_ref()),
        SourceUri::Conveyor { .. } => {}
    }
    if decoding.cpu_only
        && let Some(decodebin) = pipeline.by_name("decode")
    {
        skip_factories(&decodebin, is_nvdec);
    }
    let decoder = time_decoder(&pipeline);
    let sink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or(SourceError::Missing("appsink"))?;
    sink.set_sync(spec.realtime && !spec.is_live());
    let online = Arc::new(AtomicBool::new(false));
    // When the latest frame arrived (the start, before the first): the stall watchdog's clock.
    let last_frame = Arc::new(std::sync::Mutex::new(Instant::now()));
    {
        let last_frame = Arc::clone(&last_frame);
        let queue = Arc::clone(queue);
        let stop = Arc::clone(stop);
        let offset = Arc::clone(offset);
        let last_pts = Arc::clone(last_pts);
        let online = Arc::clone(&online);
        let realtime = spec.realtime || spec.is_live();
        let camera = spec.camera.clone();
        let decoder = Arc::clone(&decoder);
        let said = Arc::clone(&decoding.said);
        let resume_after = decoding.resume_after;
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let arrived = Instant::now();
                    if let Ok(mut last) = last_frame.lock() {
                        *last = arrived;
                    }
                    let decode = decoder
                        .input
                        .lock()
                        .ok()
                        .and_then(|input| input.map(|t| arrived.saturating_duration_since(t)));
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    if let Some((w, h)) = oversized(&sample) {
                        gst::element_error!(
                            sink,
                            gst::StreamError::Format,
                            ("frames of {w}×{h} are larger than the 7680×4320 stpm accepts")
                        );
                        return Err(gst::FlowError::Error);
                    }
                    let Some((frame, pts, fps)) = copy_frame(&sample) else {
                        return Ok(gst::FlowSuccess::Ok);
                    };
                    if let Some(since) = wall
                        && !online.load(Ordering::Relaxed)
                        && let (Ok(mut offset), Ok(last)) = (offset.lock(), last_pts.lock())
                    {
                        // This play's first frame: placed at the wall time since the source
                        // started (after the last frame before a gap).
                        let now = since.elapsed().max(*last + Duration::from_millis(40));
                        *offset = now.saturating_sub(pts);
                    }
                    let pts = pts + offset.lock().map(|o| *o).unwrap_or_default();
                    if resume_after.is_some_and(|resume| pts <= resume) {
                        return Ok(gst::FlowSuccess::Ok);
                    }
                    if let Ok(mut last) = last_pts.lock() {
                        *last = (*last).max(pts);
                    }
                    if !online.swap(true, Ordering::Relaxed) {
                        queue.push_drop_oldest(Item::Online);
                        // Said with the first frame, and again only when it changes.
                        if let Some(decoder) = decoder.describe()
                            && let Ok(mut said) = said.lock()
                            && said.as_deref() != Some(decoder.as_str())
                        {
                            log::info!("[{camera}] decoding with {decoder}");
                            *said = Some(decoder);
                        }
                    }
                    let item = Item::Frame(Captured {
                        frame,
                        pts,
                        fps,
                        arrived,
                        decode,
                    });
                    if realtime {
                        queue.push_drop_oldest(item);
                    } else if !queue.push_wait(item, &|| stop.load(Ordering::Relaxed)) {
                        return Err(gst::FlowError::Flushing);
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
    }
    let bus = pipeline.bus().ok_or(SourceError::Missing("bus"))?;
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        // The element that refused says why on the bus (e.g. v4l2src: "Cannot identify device").
        let why = bus
            .iter_filtered(&[gst::MessageType::Error])
            .find_map(|message| match message.view() {
                gst::MessageView::Error(err) => Some(err.error().to_string()),
                _ => None,
            });
        let _ = pipeline.set_state(gst::State::Null);
        return Err(SourceError::Start(why.unwrap_or_else(|| e.to_string())));
    }
    // An NVIDIA decoder that gave no frame yet is blamed for how this play ends: NVDEC's decode
    // failures reach the bus as errors of the elements before it (a demuxer, the RTSP source),
    // its decode errors are only warnings (a file then ends without a frame); after frames, a
    // lost connection is likelier.
    let nvdec_gave_nothing = || decoder.nvidia() && !online.load(Ordering::Relaxed);
    let ending = loop {
        if stop.load(Ordering::Relaxed) {
            break Ending::Stopped;
        }
        // A live camera that keeps its connection open but sends nothing (frozen, paused, a
        // dead encoder) would otherwise stay "online" for ever.
        if let Some(stall) = spec.stall.filter(|_| spec.is_live())
            && last_frame.lock().is_ok_and(|last| last.elapsed() > stall)
        {
            break Ending::Error(
                format!(
                    "no frame for {} s (camera.stall_seconds): the camera stalled",
                    stall.as_secs_f64()
                ),
                nvdec_gave_nothing(),
            );
        }
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        match message.view() {
            gst::MessageView::Eos(_) if nvdec_gave_nothing() => {
                break Ending::Error("the NVIDIA decoder gave no frame".into(), true);
            }
            gst::MessageView::Eos(_) => break Ending::Eos,
            gst::MessageView::Error(err) => {
                let nvdec = nvdec_gave_nothing()
                    || err
                        .src()
                        .and_then(|s| s.downcast_ref::<gst::Element>())
                        .and_then(|element| element.factory())
                        .is_some_and(|factory| is_nvdec(&factory));
                break Ending::Error(
                    format!(
                        "{} ({})",
                        err.error(),
                        err.src()
                            .map(|s| s.path_string().to_string())
                            .unwrap_or_default()
                    ),
                    nvdec,
                );
            }
            _ => {}
        }
    };
    let _ = pipeline.set_state(gst::State::Null);
    Ok(ending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_decoders_are_told_from_the_cpus() {
        gst::init().expect("gst init");
        // The CPU's decoders and nvcodec's other elements are not NVIDIA decoders.
        for name in ["avdec_h264", "avdec_h265", "videoconvert", "x264enc"] {
            if let Some(factory) = gst::ElementFactory::find(name) {
                assert!(!is_nvdec(&factory), "{name}");
            }
        }
        // Those this machine registers (none without an NVIDIA GPU) are preferred, above the
        // CPU's, and are NVIDIA decoders.
        for name in prefer_nvdec() {
            let factory = gst::ElementFactory::find(&name).expect("registered");
            assert!(is_nvdec(&factory), "{name}");
            assert!(factory.rank() > gst::Rank::PRIMARY, "{name}");
        }
    }

    /// Frames decoded from `video` (H.264 in Matroska) through decodebin, leaving out the
    /// factories `skip` names; the error when decoding failed.
    fn decode_skipping(
        video: &std::path::Path,
        skip: fn(&gst::ElementFactory) -> bool,
    ) -> Result<usize, String> {
        let pipeline = gst::parse::launch(&format!(
            "filesrc location={} ! decodebin name=decode ! videoconvert ! appsink name=sink sync=false",
            video.display()
        ))
        .map_err(|e| e.to_string())?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "not a pipeline".to_string())?;
        let decodebin = pipeline.by_name("decode").ok_or("no decodebin")?;
        skip_factories(&decodebin, skip);
        let sink = pipeline
            .by_name("sink")
            .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
            .ok_or("no appsink")?;
        let frames = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&frames);
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    counted.fetch_add(1, Ordering::Relaxed);
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let started = pipeline.set_state(gst::State::Playing);
        let bus = pipeline.bus().ok_or("no bus")?;
        let ending = bus.timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        let _ = pipeline.set_state(gst::State::Null);
        started.map_err(|e| e.to_string())?;
        match ending.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Error(err)) => Err(err.error().to_string()),
            Some(_) => Ok(frames.load(Ordering::Relaxed)),
            None => Err("no end of stream in 30 s".into()),
        }
    }

    #[test]
    fn decodebin_passes_over_the_decoders_it_is_told_to_skip() {
        gst::init().expect("gst init");
        let dir = tempfile::tempdir().expect("dir");
        let video = dir.path().join("in.mkv");
        let writer = gst::parse::launch(&format!(
            "videotestsrc num-buffers=5 ! video/x-raw,width=64,height=48 ! x264enc ! h264parse ! \
             matroskamux ! filesink location={}",
            video.display()
        ))
        .expect("writer");
        writer.set_state(gst::State::Playing).expect("write");
        let bus = writer.bus().expect("bus");
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(30), &[gst::MessageType::Eos])
            .expect("test video written");
        let _ = writer.set_state(gst::State::Null);
        // Leaving out NVIDIA's decoders (none here) decodes as before.
        assert_eq!(decode_skipping(&video, is_nvdec), Ok(5));
        // Leaving out the CPU's H.264 decoder (the only one here) leaves nothing to decode with.
        let error = decode_skipping(&video, |factory| factory.name().starts_with("avdec_"))
            .expect_err("no H.264 decoder left");
        assert!(!error.is_empty());
    }

    #[test]
    fn descriptions_end_in_an_rgb_appsink() {
        for uri in [
            SourceUri::File("/x.mkv".into()),
            SourceUri::Rtsp("rtsp://h/x".into()),
            SourceUri::V4l2("/dev/video0".into()),
        ] {
            let text = source_description(&uri);
            assert!(text.starts_with(match uri {
                SourceUri::File(_) => "filesrc",
                SourceUri::Rtsp(_) => "rtspsrc",
                _ => "v4l2src",
            }));
            assert!(text.ends_with("video/x-raw,format=RGB ! appsink name=sink max-buffers=2"));
        }
    }
}
