//! Collecting good training frames from a running pipeline (`POST /api/cameras/{camera}/collect`):
//! each camera's slot, to which its worker offers the raw frames with their scores while a
//! collection runs, and the thread that screens and saves them (`super::collect::Collector`) into
//! `<storage>/collect/<camera>/train/good`, never on the frame path.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use serde::Serialize;

use super::collect::{CollectOptions, Collected, Collector};
use crate::preprocess::RgbFrame;

/// Frames waiting for the collection thread; more are not offered (the worker never waits).
const WAITING: usize = 2;

/// How far a collection is, as the API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// The output folder (`stpm train --data` takes it).
    pub folder: PathBuf,
    pub wanted: usize,
    pub saved: usize,
    pub seen: u64,
    pub too_soon: u64,
    pub duplicates: u64,
    pub near_anomalies: u64,
    /// Finished: enough frames, or the run stopped, or an error.
    pub done: bool,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("camera {0} is already collecting")]
    Busy(String),
    #[error("cannot create {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the collection thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Added(super::collect::CollectError),
}

struct Job {
    frames: Option<mpsc::SyncSender<(RgbFrame, f64, Option<f32>)>>,
    progress: Arc<Mutex<Progress>>,
    thread: Option<JoinHandle<()>>,
}

/// One camera's collection slot.
pub struct CollectSlot {
    camera: String,
    source: String,
    /// `<storage>/collect/<camera>`.
    folder: PathBuf,
    /// The camera's alert rule (`on_threshold`, `k` of `m`), as a reload last set it; a
    /// collection screens with the rule of its start.
    alerts: Mutex<crate::alerts::AlertConfig>,
    job: Mutex<Option<Job>>,
    /// Held while frames of events marked "not a defect" are added.
    adding: Mutex<()>,
}

impl CollectSlot {
    pub fn new(
        camera: &str,
        source: &str,
        folder: PathBuf,
        alerts: crate::alerts::AlertConfig,
    ) -> Self {
        Self {
            camera: camera.into(),
            source: source.into(),
            folder,
            alerts: Mutex::new(alerts),
            job: Mutex::new(None),
            adding: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Job>> {
        self.job.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts collecting `frames` frames, at most one per `every` seconds (a finished collection
    /// is replaced; a running one is not); `model` is the id of the live model that screens them.
    pub fn start(&self, frames: usize, every: f64, model: &str) -> Result<Progress, StartError> {
        let mut job = self.lock();
        if job
            .as_ref()
            .is_some_and(|j| !j.progress.lock().is_ok_and(|p| p.done))
        {
            return Err(StartError::Busy(self.camera.clone()));
        }
        let good = self.folder.join("train").join("good");
        std::fs::create_dir_all(&good).map_err(|source| StartError::Folder {
            path: good.clone(),
            source,
        })?;
        let alerts = self
            .alerts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let options = CollectOptions {
            frames,
            every,
            on_threshold: alerts.on_threshold,
            k: alerts.k,
            m: alerts.m,
            ..CollectOptions::default()
        };
        let report = Collected::start(&self.camera, &self.source, Some(model.to_string()));
        let progress = Arc::new(Mutex::new(Progress {
            folder: self.folder.clone(),
            wanted: frames,
            ..Progress::default()
        }));
        let (sender, receiver) = mpsc::sync_channel(WAITING);
        let mut collector = Collector::new(&good, options, true, report);
        let shared = Arc::clone(&progress);
        let folder = self.folder.clone();
        let camera = self.camera.clone();
        let thread = std::thread::Builder::new()
            .name(format!("collect-{camera}"))
            .spawn(move || {
                let mut error = None;
                for (frame, t, score) in receiver {
                    if let Err(e) = collector.offer(&frame, t, score) {
                        error = Some(e.to_string());
                        break;
                    }
                    update(&shared, &collector.report, false, None);
                    if collector.done() {
                        break;
                    }
                }
                collector.report.ended_early = !collector.done();
                if let Err(e) = super::collect::write_log(&folder, &collector.report) {
                    error.get_or_insert(e.to_string());
                }
                log::info!(
                    "[{camera}] collection done: {} frame(s) in {}",
                    collector.report.saved.len(),
                    folder.display()
                );
                update(&shared, &collector.report, true, error);
            })
            .map_err(StartError::Thread)?;
        log::info!(
            "[{}] collecting {frames} good frames into {}",
            self.camera,
            self.folder.display()
        );
        let first = progress.lock().map(|p| p.clone()).unwrap_or_default();
        if let Some(old) = job.replace(Job {
            frames: Some(sender),
            progress,
            thread: Some(thread),
        }) {
            finish(old);
        }
        Ok(first)
    }

    /// Adds the peak frames of this camera's `events` marked "not a defect" to its collection
    /// (see [`super::collect::add_reviewed`]); refused while a collection runs.
    pub fn add_reviewed(
        &self,
        events: &[crate::store::StoredEvent],
        model: &str,
    ) -> Result<Collected, StartError> {
        // One at a time, and not while frames are collected (both write collect.json); the
        // copying runs without the job's lock, which the progress endpoint takes.
        let Ok(_adding) = self.adding.try_lock() else {
            return Err(StartError::Busy(self.camera.clone()));
        };
        if self
            .lock()
            .as_ref()
            .is_some_and(|j| !j.progress.lock().is_ok_and(|p| p.done))
        {
            return Err(StartError::Busy(self.camera.clone()));
        }
        let added = super::collect::add_reviewed(
            &self.folder,
            &self.camera,
            Some(model.to_string()),
            events,
        )
        .map_err(StartError::Added)?;
        log::info!(
            "[{}] {} frame(s) of events marked not a defect added to {}",
            self.camera,
            added.saved.len(),
            self.folder.display()
        );
        Ok(added)
    }

    /// The camera's alert rule after a reload (SIGHUP), for the next collection.
    pub fn set_alerts(&self, alerts: &crate::alerts::AlertConfig) {
        *self.alerts.lock().unwrap_or_else(PoisonError::into_inner) = alerts.clone();
    }

    /// The latest collection's progress, if one was started.
    pub fn progress(&self) -> Option<Progress> {
        let job = self.lock();
        let progress = job.as_ref()?.progress.lock().ok()?.clone();
        Some(progress)
    }

    /// Offers one analysed frame (its raw pixels, stream time, normalised score) to a running
    /// collection; never waits.
    pub fn offer(&self, frame: &RgbFrame, t: f64, score: f32) {
        // The sender only under the lock: the frame is copied outside it.
        let Some(sender) = self.lock().as_ref().and_then(|job| job.frames.clone()) else {
            return;
        };
        if let Err(mpsc::TrySendError::Disconnected(_)) =
            sender.try_send((frame.clone(), t, Some(score)))
        {
            // The collection finished: no more frames.
            if let Some(job) = self.lock().as_mut() {
                job.frames = None;
            }
        }
    }

    /// Ends a running collection (the run stops) and waits for its thread; its progress stays
    /// readable.
    pub fn stop(&self) {
        let (frames, thread) = {
            let mut job = self.lock();
            match job.as_mut() {
                Some(job) => (job.frames.take(), job.thread.take()),
                None => return,
            }
        };
        drop(frames);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

fn finish(mut job: Job) {
    job.frames = None;
    if let Some(thread) = job.thread.take() {
        let _ = thread.join();
    }
}

fn update(progress: &Mutex<Progress>, report: &Collected, done: bool, error: Option<String>) {
    if let Ok(mut progress) = progress.lock() {
        progress.saved = report.saved.len();
        progress.seen = report.seen;
        progress.too_soon = report.too_soon;
        progress.duplicates = report.duplicates;
        progress.near_anomalies = report.near_anomalies;
        progress.done = done;
        if error.is_some() {
            progress.error = error;
        }
    }
}
