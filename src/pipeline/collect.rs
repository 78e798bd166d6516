//! `stpm collect`: good training frames from a camera of a pipeline file. Saves the camera's raw
//! frames (no overlay) as PNG files in an MVTec-layout `train/good` folder, at most one per
//! `every` seconds of stream time, skipping near-duplicates (a stopped belt) and, when the
//! pipeline's model can be loaded, every frame it scores as an anomaly and every frame within
//! `margin` seconds of an alert (`[alerts] k` of the last `m` frames anomalous, as `stpm run`
//! starts an event), so that defects do not become "good". `collect.json` says where each frame
//! came from.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::config::{PipelineConfig, SourceUri};
use super::queue::{FrameQueue, Item};
use super::source::{self, Captured, SourceSpec};
use crate::bundle::{Bundle, Precision};
use crate::engine::{Engine, EngineOptions};
use crate::preprocess::{self, RgbFrame};

/// What to collect.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Frames to save.
    pub frames: usize,
    /// Stream seconds at least between two saved frames.
    pub every: f64,
    /// A frame whose mean absolute difference from the last saved one (on a small grey
    /// thumbnail, in 0..1) is below this is a near-duplicate.
    pub min_change: f32,
    /// Stream seconds before and after an alert in which nothing is saved.
    pub margin: f64,
    /// A frame scoring above this (normalised) is an anomaly (`[alerts] on_threshold`).
    pub on_threshold: f32,
    /// An alert is `k` of the last `m` frames scored as anomalies (`[alerts] k`, `m`).
    pub k: usize,
    pub m: usize,
    /// Score frames with the pipeline's model (when it loads).
    pub use_model: bool,
}

impl Default for CollectOptions {
    fn default() -> Self {
        Self {
            frames: 150,
            every: 0.5,
            min_change: 0.02,
            margin: 1.0,
            on_threshold: 0.5,
            k: 3,
            m: 5,
            use_model: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("the pipeline has no camera `{camera}` (it has: {known})")]
    NoCamera { camera: String, known: String },
    #[error("camera `{camera}`: {message}")]
    Source { camera: String, message: String },
    #[error("model {path}: {message} (--no-model collects without screening frames)")]
    Model { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// One saved frame, as `collect.json` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SavedFrame {
    /// The file, relative to the output folder.
    pub file: String,
    /// The frame's stream time (seconds; the camera's own clock for files and the conveyor).
    pub stream_seconds: f64,
    /// The model's normalised score (none without a model).
    pub score: Option<f32>,
    /// The event whose peak frame it is (frames of events an operator marked "not a defect").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

/// What one collection did (also `collect.json`'s entry for it).
#[derive(Debug, Clone, Serialize)]
pub struct Collected {
    pub camera: String,
    pub source: String,
    /// The model id (first 12 hex digits of its manifest's sha256) that screened the frames.
    pub model: Option<String>,
    pub saved: Vec<SavedFrame>,
    /// Frames seen, and why the others were not saved.
    pub seen: u64,
    pub too_soon: u64,
    pub duplicates: u64,
    /// Frames scored as anomalies, in an alert or within `margin` of one.
    pub near_anomalies: u64,
    /// The source ended before enough frames were saved.
    pub ended_early: bool,
}

impl Collected {
    /// Nothing collected yet from `camera` (`source`), screened by `model`.
    pub fn start(camera: &str, source: &str, model: Option<String>) -> Self {
        Self {
            camera: camera.into(),
            source: source.into(),
            model,
            saved: Vec::new(),
            seen: 0,
            too_soon: 0,
            duplicates: 0,
            near_anomalies: 0,
            ended_early: false,
        }
    }
}

/// A frame waiting for `margin` seconds of stream time without an anomaly before it is saved.
struct Pending {
    frame: RgbFrame,
    stream_seconds: f64,
    score: Option<f32>,
}

/// The model that screens frames.
struct Screen {
    engine: Engine,
    bundle: Bundle,
}

impl Screen {
    fn score(&mut self, frame: &RgbFrame) -> Result<f32, String> {
        let manifest = &self.bundle.manifest;
        let input = preprocess::to_chw(frame, manifest.model.input_size, &manifest.normalisation);
        let scored = self.engine.run(&input, 1).map_err(|e| e.to_string())?;
        Ok(self.bundle.calibration().normalise(scored.scores[0]))
    }
}

/// Grey thumbnail (32×24) of a frame, for the near-duplicate test.
fn thumbnail(frame: &RgbFrame) -> Vec<f32> {
    const W: usize = 32;
    const H: usize = 24;
    let mut out = Vec::with_capacity(W * H);
    for ty in 0..H {
        for tx in 0..W {
            let x = (tx * frame.width + frame.width / (2 * W)) / W;
            let y = (ty * frame.height + frame.height / (2 * H)) / H;
            let i = (y.min(frame.height - 1) * frame.width + x.min(frame.width - 1)) * 3;
            let p = &frame.pixels[i..i + 3];
            out.push((p[0] as f32 + p[1] as f32 + p[2] as f32) / (3.0 * 255.0));
        }
    }
    out
}

fn mean_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len().max(1) as f32
}

/// Collects `options.frames` frames of `camera` into `out/train/good` (stopping early on
/// `stop` or at the end of a file) and adds the run to `out/collect.json`.
pub fn collect(
    config: &PipelineConfig,
    camera: &str,
    out: &Path,
    options: &CollectOptions,
    stop: Arc<AtomicBool>,
) -> Result<Collected, CollectError> {
    let Some(camera_config) = config.camera.iter().find(|c| c.name == camera) else {
        return Err(CollectError::NoCamera {
            camera: camera.into(),
            known: config
                .camera
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let source_error = |message: String| CollectError::Source {
        camera: camera.into(),
        message,
    };
    let uri = SourceUri::parse(&camera_config.source).map_err(|e| source_error(e.to_string()))?;
    let mut screen = if options.use_model {
        let path = &config.model.bundle;
        let model_error = |message: String| CollectError::Model {
            path: path.clone(),
            message,
        };
        let bundle =
            Bundle::open_as(path, Precision::Fp32).map_err(|e| model_error(e.to_string()))?;
        let engine = Engine::for_bundle(&bundle, EngineOptions::default())
            .map_err(|e| model_error(e.to_string()))?;
        Some(Screen { engine, bundle })
    } else {
        None
    };
    let folder = good_folder(out)?;
    let queue = Arc::new(FrameQueue::new(2));
    let spec = SourceSpec::for_camera(camera_config, uri);
    let capture_stop = Arc::new(AtomicBool::new(false));
    let capture = source::spawn(spec, Arc::clone(&queue), Arc::clone(&capture_stop))
        .map_err(|e| source_error(e.to_string()))?;
    let mut report = Collected::start(
        camera,
        &camera_config.source,
        screen
            .as_ref()
            .map(|_| super::model::id_on_disk(&config.model.bundle)),
    );
    let result = gather(&queue, &mut screen, &folder, options, &stop, &mut report);
    capture_stop.store(true, Ordering::Relaxed);
    while queue.pop(Duration::from_millis(10)).is_some() {}
    let _ = capture.join();
    result?;
    write_log(out, &report)?;
    Ok(report)
}

/// The frame loop of [`collect`].
fn gather(
    queue: &FrameQueue<Captured>,
    screen: &mut Option<Screen>,
    folder: &Path,
    options: &CollectOptions,
    stop: &AtomicBool,
    report: &mut Collected,
) -> Result<(), CollectError> {
    let mut collector = Collector::new(folder, options.clone(), screen.is_some(), report.clone());
    while !collector.done() && !stop.load(Ordering::Relaxed) {
        let Some(item) = queue.pop(Duration::from_millis(200)) else {
            continue;
        };
        let captured = match item {
            Item::Frame(captured) => captured,
            Item::Offline(why) => {
                log::warn!("[{}] offline: {why}", report.camera);
                continue;
            }
            Item::Online => continue,
            Item::End => {
                collector.report.ended_early = true;
                break;
            }
        };
        let score = match screen.as_mut() {
            Some(screen) => {
                Some(
                    screen
                        .score(&captured.frame)
                        .map_err(|message| CollectError::Model {
                            path: screen.bundle.dir.clone(),
                            message,
                        })?,
                )
            }
            None => None,
        };
        collector.offer(&captured.frame, captured.pts.as_secs_f64(), score)?;
    }
    *report = collector.report;
    Ok(())
}

/// The screening and saving of one collection, frame by frame: what `stpm collect` runs on its
/// own capture, and what a running pipeline's worker runs on its analysed frames.
pub struct Collector {
    folder: PathBuf,
    options: CollectOptions,
    /// Frames come with scores: wait `margin` before saving, screen out anomalies.
    screened: bool,
    pending: VecDeque<Pending>,
    last_kept: Option<(f64, Vec<f32>)>,
    last_alert: Option<f64>,
    recent: VecDeque<bool>,
    next_index: u64,
    /// What it did so far.
    pub report: Collected,
}

impl Collector {
    /// Saves into `folder` (created by the caller) with `options`; `report` names the camera,
    /// source and model, its counts start at zero.
    pub fn new(folder: &Path, options: CollectOptions, screened: bool, report: Collected) -> Self {
        Self {
            next_index: next_free_index(folder, &report.camera),
            folder: folder.to_path_buf(),
            options,
            screened,
            pending: VecDeque::new(),
            last_kept: None,
            last_alert: None,
            recent: VecDeque::new(),
            report,
        }
    }

    /// Enough frames saved.
    pub fn done(&self) -> bool {
        self.report.saved.len() >= self.options.frames
    }

    /// One frame at stream time `t` (seconds) with its normalised score (`None`: unscreened).
    pub fn offer(
        &mut self,
        frame: &RgbFrame,
        t: f64,
        score: Option<f32>,
    ) -> Result<(), CollectError> {
        if self.done() {
            return Ok(());
        }
        self.report.seen += 1;
        // What has waited `margin` seconds without an alert is saved first, whatever this frame is.
        self.save_settled(t)?;
        if self.done() {
            return Ok(());
        }
        let options = &self.options;
        let anomalous = score.is_some_and(|s| s > options.on_threshold);
        self.recent.push_back(anomalous);
        if self.recent.len() > options.m.max(1) {
            self.recent.pop_front();
        }
        if self.recent.iter().filter(|&&a| a).count() >= options.k.max(1) {
            // An alert: what waits within the margin before it goes, and so does what follows.
            let before = self.pending.len();
            self.pending
                .retain(|p| t - p.stream_seconds > options.margin);
            self.report.near_anomalies += (before - self.pending.len()) as u64;
            self.last_alert = Some(t);
        }
        if anomalous || self.last_alert.is_some_and(|a| t - a <= options.margin) {
            self.report.near_anomalies += 1;
            return Ok(());
        }
        if self
            .last_kept
            .as_ref()
            .is_some_and(|(kept, _)| t - kept < options.every)
        {
            self.report.too_soon += 1;
            return Ok(());
        }
        let thumb = thumbnail(frame);
        if self
            .last_kept
            .as_ref()
            .is_some_and(|(_, kept)| mean_abs_difference(kept, &thumb) < options.min_change)
        {
            self.report.duplicates += 1;
            return Ok(());
        }
        self.last_kept = Some((t, thumb));
        self.pending.push_back(Pending {
            frame: frame.clone(),
            stream_seconds: t,
            score,
        });
        self.save_settled(t)
    }

    /// Saves the waiting frames that are more than `margin` seconds older than `t` (unscreened
    /// frames do not wait).
    fn save_settled(&mut self, t: f64) -> Result<(), CollectError> {
        while let Some(first) = self.pending.front() {
            let settled = !self.screened || t - first.stream_seconds > self.options.margin;
            if !settled || self.done() {
                break;
            }
            if let Some(first) = self.pending.pop_front() {
                let saved = save(&self.folder, &self.report.camera, self.next_index, first)?;
                self.next_index += 1;
                self.report.saved.push(saved);
                let count = self.report.saved.len();
                if count.is_multiple_of(10) || count == self.options.frames {
                    log::info!(
                        "[{}] {count} of {} frames saved",
                        self.report.camera,
                        self.options.frames
                    );
                }
            }
        }
        Ok(())
    }
}

/// The first index `n` for which `<camera>-<n>.png` is not in `folder` after every existing one.
fn next_free_index(folder: &Path, camera: &str) -> u64 {
    let prefix = format!("{camera}-");
    std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_prefix(&prefix)?
                .strip_suffix(".png")?
                .parse::<u64>()
                .ok()
        })
        // An index this large was not written by a collection (it would overflow the count).
        .filter(|&n| n <= u64::MAX / 2)
        .max()
        .map_or(0, |n| n + 1)
}

fn save(
    folder: &Path,
    camera: &str,
    index: u64,
    pending: Pending,
) -> Result<SavedFrame, CollectError> {
    let name = format!("{camera}-{index:06}.png");
    let path = folder.join(&name);
    let frame = &pending.frame;
    crate::overlay::save_png(&path, &frame.pixels, frame.width, frame.height).map_err(|e| {
        CollectError::Write {
            path: path.clone(),
            message: e.to_string(),
        }
    })?;
    Ok(SavedFrame {
        file: format!("train/good/{name}"),
        stream_seconds: pending.stream_seconds,
        score: pending.score,
        event: None,
    })
}

/// `out/train/good`, created if missing: where collected frames go.
fn good_folder(out: &Path) -> Result<PathBuf, CollectError> {
    let folder = out.join("train").join("good");
    std::fs::create_dir_all(&folder).map_err(|e| CollectError::Write {
        path: folder.clone(),
        message: e.to_string(),
    })?;
    Ok(folder)
}

/// Adds the clean peak frames (no overlay) of `events`, which an operator marked "not a defect",
/// to the collection in `out` (`train/good/<camera>-event-<id>.jpg`, listed in `collect.json` as
/// a run of its own); frames already there are skipped. Returns that run.
pub fn add_reviewed(
    out: &Path,
    camera: &str,
    model: Option<String>,
    events: &[crate::store::StoredEvent],
) -> Result<Collected, CollectError> {
    let folder = good_folder(out)?;
    let mut report = Collected::start(camera, "events marked not a defect", model);
    for event in events {
        report.seen += 1;
        let Some(clean) = event.clean_path.as_ref().filter(|path| path.is_file()) else {
            continue;
        };
        let id: String = event
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = format!("{camera}-event-{id}.jpg");
        let path = folder.join(&name);
        if path.exists() {
            report.duplicates += 1;
            continue;
        }
        std::fs::copy(clean, &path).map_err(|e| CollectError::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
        report.saved.push(SavedFrame {
            file: format!("train/good/{name}"),
            stream_seconds: 0.0,
            score: Some(event.score),
            event: Some(event.id.clone()),
        });
    }
    if !report.saved.is_empty() {
        write_log(out, &report)?;
    }
    Ok(report)
}

/// Appends a run to `out/collect.json` (`{"runs": [...]}`), written through a temporary file.
pub fn write_log(out: &Path, report: &Collected) -> Result<(), CollectError> {
    let path = out.join("collect.json");
    let write_error = |message: String| CollectError::Write {
        path: path.clone(),
        message,
    };
    let fresh = || serde_json::json!({ "runs": [] });
    let mut log: serde_json::Value = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh(),
        Err(e) => return Err(write_error(format!("cannot read it: {e}"))),
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .filter(|v| v.get("runs").is_some_and(|r| r.is_array()))
        {
            Some(log) => log,
            None => {
                // Hand-edited or damaged: kept beside the new log, not overwritten.
                let seconds = super::unix_now() as u64;
                let aside = out.join(format!("collect.json.bad-{seconds}"));
                std::fs::rename(&path, &aside)
                    .map_err(|e| write_error(format!("cannot move it aside: {e}")))?;
                log::warn!(
                    "{} was not a collection log ({{\"runs\": [...]}}); kept as {} and started anew",
                    path.display(),
                    aside.display()
                );
                fresh()
            }
        },
    };
    let run = serde_json::to_value(report).map_err(|e| write_error(e.to_string()))?;
    if let Some(runs) = log.get_mut("runs").and_then(|r| r.as_array_mut()) {
        runs.push(run);
    }
    let text = serde_json::to_string_pretty(&log).map_err(|e| write_error(e.to_string()))?;
    crate::files::write_whole(&path, text).map_err(|e| write_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_marked_not_a_defect_are_added_once_each() {
        let dir = tempfile::tempdir().expect("dir");
        let clean = dir.path().join("clean.jpg");
        std::fs::write(&clean, b"jpeg bytes").expect("clean");
        let event = |id: &str, clean_path: Option<PathBuf>| crate::store::StoredEvent {
            id: id.into(),
            camera: "line1".into(),
            start_time: 1.0,
            end_time: Some(2.0),
            end_reason: None,
            score: 0.7,
            raw_score: None,
            boxes: None,
            zone: None,
            model: "m".into(),
            snapshot_path: None,
            clean_path,
            clip_path: None,
            clip_start: None,
            media_gone: false,
            verdict: crate::store::Verdict::NotADefect,
            verdict_by: None,
            verdict_at: None,
        };
        let out = dir.path().join("collection");
        let events = [
            event("line1-1-0", Some(clean.clone())),
            event("line1/../2", Some(clean.clone())),
            // Retention deleted its pictures: nothing to add.
            event("line1-3-0", None),
        ];
        let first = add_reviewed(&out, "line1", Some("abc".into()), &events).expect("added");
        assert_eq!((first.saved.len(), first.seen), (2, 3));
        let saved: Vec<&str> = first.saved.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(
            saved,
            [
                "train/good/line1-event-line1-1-0.jpg",
                "train/good/line1-event-line1____2.jpg"
            ]
        );
        assert_eq!(
            std::fs::read(out.join(saved[0])).expect("copied"),
            b"jpeg bytes"
        );
        let again = add_reviewed(&out, "line1", None, &events).expect("again");
        assert_eq!((again.saved.len(), again.duplicates), (0, 2));
        let log: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("collect.json")).expect("log"))
                .expect("JSON");
        assert_eq!(log["runs"].as_array().map(Vec::len), Some(1));
        assert_eq!(log["runs"][0]["saved"][0]["event"], "line1-1-0");
    }

    #[test]
    fn thumbnails_tell_a_moved_belt_from_a_stopped_one() {
        let frame = |shift: usize| RgbFrame {
            width: 64,
            height: 48,
            pixels: (0..64 * 48)
                .flat_map(|i| {
                    let v = if (((i % 64) + shift) / 8).is_multiple_of(2) {
                        200
                    } else {
                        20
                    };
                    [v, v, v]
                })
                .collect(),
        };
        let still = mean_abs_difference(&thumbnail(&frame(0)), &thumbnail(&frame(0)));
        let moved = mean_abs_difference(&thumbnail(&frame(0)), &thumbnail(&frame(4)));
        assert_eq!(still, 0.0);
        assert!(moved > 0.1, "{moved}");
    }

    #[test]
    fn numbering_continues_after_the_files_already_there() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(next_free_index(dir.path(), "line1"), 0);
        for name in [
            "line1-000003.png",
            "line1-000010.png",
            "other-000099.png",
            "x.txt",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("file");
        }
        assert_eq!(next_free_index(dir.path(), "line1"), 11);
        std::fs::write(dir.path().join("line1-18446744073709551615.png"), b"").expect("file");
        assert_eq!(next_free_index(dir.path(), "line1"), 11);
    }

    #[test]
    fn a_damaged_collection_log_is_kept_aside_not_overwritten() {
        let dir = tempfile::tempdir().expect("dir");
        let log_path = dir.path().join("collect.json");
        std::fs::write(&log_path, b"{\"runs\": [{\"camera\": \"line1\"},]}").expect("log");
        let report = Collected {
            camera: "line1".into(),
            source: "test://conveyor".into(),
            model: None,
            saved: Vec::new(),
            seen: 4,
            too_soon: 0,
            duplicates: 0,
            near_anomalies: 0,
            ended_early: false,
        };
        write_log(dir.path(), &report).expect("written");
        let log: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&log_path).expect("log")).expect("JSON");
        assert_eq!(log["runs"].as_array().map(Vec::len), Some(1));
        assert_eq!(log["runs"][0]["seen"], 4);
        let kept: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("collect.json.bad-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(
            std::fs::read(dir.path().join(&kept[0])).expect("kept"),
            b"{\"runs\": [{\"camera\": \"line1\"},]}"
        );
        // A second run appends to the new log.
        write_log(dir.path(), &report).expect("appended");
        let log: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&log_path).expect("log")).expect("JSON");
        assert_eq!(log["runs"].as_array().map(Vec::len), Some(2));
    }
}
