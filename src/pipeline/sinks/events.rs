//! `[storage]`: every alert transition into the event store (`store`, SQLite under
//! `storage.path`), and at each new peak the annotated frame and the clean frame (no overlay, for
//! training) as JPEG files under `<path>/snapshots/<camera>/`. One writer thread, shared by the
//! cameras, does the encoding and the disk and database work; a camera's sink only hands it on,
//! and never waits for it: a store that is locked or slow costs event rows (counted), not frames.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::snapshot::{SnapshotError, jpeg};
use super::{Picture, Sink, SinkError};
use crate::alerts::{AlertEvent, EventKind};
use crate::store::{Changes, EventStore, Peak, StoreError, StoreFile, StoreStatus};

/// Jobs waiting for the writer; past it a camera's event change is not stored (counted), so the
/// camera never waits for the store.
const QUEUE: usize = 64;

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Keep events (and their snapshots) in `path`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The data folder: `events.db`, `snapshots/`, `clips/`.
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Disk budget of snapshots, clips and recordings together (`500MB`, `20GB`; `0`: none).
    #[serde(default = "default_max_size")]
    pub max_size: String,
    /// Age limit of the same files, in days (0: none).
    #[serde(default = "default_keep_days")]
    pub keep_days: f64,
    /// Free space to keep on the disks of the data folder, the recordings and the spool: below
    /// it the oldest snapshots, clips and recordings go (`1GB`; `0`: no floor).
    #[serde(default = "default_min_free")]
    pub min_free: String,
}

impl StorageConfig {
    /// Problems of the section, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if crate::store::retention::parse_size(&self.max_size).is_none() {
            problems.push(format!(
                "storage.max_size = `{}`: use a size such as 500MB or 20GB, or 0 for no budget",
                self.max_size
            ));
        }
        if crate::store::retention::parse_size(&self.min_free).is_none() {
            problems.push(format!(
                "storage.min_free = `{}`: use a size such as 1GB, or 0 for no free-space floor",
                self.min_free
            ));
        }
        if !(self.keep_days.is_finite() && self.keep_days >= 0.0) {
            problems.push(format!(
                "storage.keep_days = {}: use a number of days, or 0 to keep files whatever their age",
                self.keep_days
            ));
        }
        problems
    }

    /// The retention limits (after `problems` found none).
    pub fn limits(&self) -> crate::store::retention::Limits {
        crate::store::retention::Limits {
            max_bytes: crate::store::retention::parse_size(&self.max_size).unwrap_or(0),
            keep_days: self.keep_days,
            min_free: crate::store::retention::parse_size(&self.min_free).unwrap_or(0),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_path(),
            max_size: default_max_size(),
            keep_days: default_keep_days(),
            min_free: default_min_free(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_path() -> PathBuf {
    "data".into()
}

fn default_max_size() -> String {
    "0".into()
}

fn default_keep_days() -> f64 {
    30.0
}

fn default_min_free() -> String {
    "1GB".into()
}

/// What the cameras hand the writer.
enum Job {
    Event(Box<EventJob>),
    /// An event's clip is complete at `path`; its first frame is from unix time `start`.
    Clip {
        id: String,
        path: PathBuf,
        start: f64,
    },
}

struct EventJob {
    event: AlertEvent,
    /// The model that scored it (the bundle's manifest hash, 12 hex digits).
    model: String,
    /// At a new peak: the annotated and clean frames and the raw score.
    peak: Option<PeakFrames>,
}

struct PeakFrames {
    annotated: Vec<u8>,
    clean: Vec<u8>,
    width: usize,
    height: usize,
    raw_score: f32,
}

/// The run's event writer: the store and its thread.
pub struct EventWriter {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    folder: PathBuf,
    status: Arc<StoreStatus>,
}

/// Records finished clips in the store.
#[derive(Clone)]
pub struct ClipLog {
    jobs: mpsc::SyncSender<Job>,
    /// `<storage>/clips`.
    pub folder: PathBuf,
}

impl ClipLog {
    /// The clip of event `id` is complete at `path`; its first frame is from unix time `start`.
    pub fn done(&self, id: &str, path: &Path, start: f64) {
        let job = Job::Clip {
            id: id.to_string(),
            path: path.to_path_buf(),
            start,
        };
        if self.jobs.send(job).is_err() {
            log::warn!(
                "storage: the writer has stopped; clip {} is not recorded",
                path.display()
            );
        }
    }
}

impl EventWriter {
    /// Opens the store in `config.path`, ends the events an earlier run left open, and starts
    /// the writer. Each row names the model of its event; the id of each row written goes to
    /// `changes` (the console's live event list).
    /// A damaged store (not a database, truncated) is moved aside and a new one started, so one
    /// bad file does not keep the detector from starting.
    pub fn start(config: &StorageConfig, changes: Option<Changes>) -> Result<Self, StoreError> {
        let (store, dangling) = open_mending(&config.path, |store| store.end_dangling())?;
        if dangling > 0 {
            log::warn!(
                "storage: {dangling} event(s) left open by an earlier run ended as `interrupted`"
            );
        }
        log::info!(
            "storage: events in {}, snapshots in {}",
            config.path.join(crate::store::DATABASE).display(),
            config.path.join("snapshots").display()
        );
        let (jobs, queue) = mpsc::sync_channel(QUEUE);
        let folder = config.path.clone();
        let status = Arc::new(StoreStatus::default());
        let writer = Writer::new(store, folder, changes, Arc::clone(&status));
        let thread = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || writer.run(&queue))
            .map_err(|source| StoreError::File {
                action: "start the event writer for",
                path: config.path.clone(),
                source,
            })?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            folder: config.path.clone(),
            status,
        })
    }

    /// How the writer keeps up (for `/metrics` and `/health`).
    pub fn status(&self) -> Arc<StoreStatus> {
        Arc::clone(&self.status)
    }

    /// `camera`'s sink.
    pub fn sink(&self, camera: &str) -> Option<EventLog> {
        Some(EventLog {
            camera: camera.to_string(),
            jobs: self.jobs.clone()?,
            status: Arc::clone(&self.status),
            behind: 0,
            held: VecDeque::new(),
        })
    }

    /// Where finished clips are reported, and the folder they go in.
    pub fn clip_log(&self) -> Option<ClipLog> {
        Some(ClipLog {
            jobs: self.jobs.clone()?,
            folder: self.folder.join("clips"),
        })
    }

    /// Waits until every job handed on has been written (the cameras' sinks are gone by then).
    pub fn finish(mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens the store in `folder` and runs `first` on it. A damaged store (not a database,
/// truncated) is moved aside and a new one started, so one bad file does not stop the events.
fn open_mending<T>(
    folder: &Path,
    first: impl Fn(&EventStore) -> Result<T, StoreError>,
) -> Result<(EventStore, T), StoreError> {
    let open = || -> Result<(EventStore, T), StoreError> {
        let mut store = EventStore::open(folder)?;
        let value = first(&store)?;
        if let Err(error) = store.watch() {
            log::warn!("storage: {error}; a store overwritten in place will not be noticed");
        }
        Ok((store, value))
    };
    match open() {
        Err(error) if error.damaged() => {
            let aside = crate::store::set_aside(folder, crate::pipeline::unix_now() as u64)?;
            log::warn!(
                "storage: {error}; the damaged file is kept as {} and a new event store started",
                aside.display()
            );
            open()
        }
        result => result,
    }
}

/// Rows the store refused (a full disk) wait in memory, in order, at most this many; the oldest
/// go first beyond it.
const BACKLOG: usize = 1000;
/// How often the backlog is tried again while no new job arrives.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// A row for the store, its pictures already written.
enum Row {
    Event {
        event: Box<AlertEvent>,
        model: String,
        peak: Option<Peak>,
    },
    Clip {
        id: String,
        path: PathBuf,
        start: f64,
    },
}

impl Row {
    fn id(&self) -> &str {
        match self {
            Row::Event { event, .. } => &event.id,
            Row::Clip { id, .. } => id,
        }
    }

    /// The row in a log line: the event, or the clip of an event.
    fn what(&self) -> String {
        match self {
            Row::Event { event, .. } => format!("event {}", event.id),
            Row::Clip { id, path, .. } => format!("clip {} of event {id}", path.display()),
        }
    }

    fn store(&self, store: &EventStore) -> Result<(), StoreError> {
        match self {
            Row::Event { event, model, peak } => {
                store.record(event, model, peak.as_ref(), crate::pipeline::unix_now())
            }
            Row::Clip { id, path, start } => store.set_clip(id, path, *start),
        }
    }
}

/// The writer thread's state: rows the store could not take yet are kept and retried, so a
/// full disk delays events in the store instead of losing them.
struct Writer {
    /// None while a new store could not be opened in place of one deleted, replaced or damaged
    /// (tried again like a refusing store).
    store: Option<EventStore>,
    folder: PathBuf,
    changes: Option<Changes>,
    status: Arc<StoreStatus>,
    backlog: VecDeque<Row>,
    /// Rows dropped from a full backlog.
    dropped: u64,
    /// Rows the store refused for good (`StoreError::refused_for_good`), dropped.
    refused: u64,
    /// The store refused the backlog's first row (said once, until it takes it).
    refusing: bool,
    /// When the store was last tried while it was refusing: it is tried again every
    /// [`RETRY_EVERY`], not at every job (each try may wait out the store's busy timeout).
    tried: Instant,
}

impl Writer {
    fn new(
        store: EventStore,
        folder: PathBuf,
        changes: Option<Changes>,
        status: Arc<StoreStatus>,
    ) -> Self {
        Self {
            store: Some(store),
            folder,
            changes,
            status,
            backlog: VecDeque::new(),
            dropped: 0,
            refused: 0,
            refusing: false,
            tried: Instant::now(),
        }
    }

    /// Writes jobs until every sender is gone, then what it can of the backlog.
    fn run(mut self, queue: &mpsc::Receiver<Job>) {
        loop {
            // Woken at least every RETRY_EVERY: to retry the backlog, and to notice a store
            // deleted or replaced while idle.
            let job = match queue.recv_timeout(RETRY_EVERY) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            // A burst is taken whole (up to a queue's worth, so writing and the 2 s looks go on
            // however fast jobs come), and the log emptied once after it, not after each row.
            let burst = job
                .into_iter()
                .chain(std::iter::from_fn(|| queue.try_recv().ok()))
                .take(QUEUE);
            for job in burst {
                let row = self.prepare(job);
                if self.backlog.len() == BACKLOG {
                    self.backlog.pop_front();
                    self.dropped += 1;
                    self.status.unstored.fetch_add(1, Ordering::Relaxed);
                }
                self.backlog.push_back(row);
            }
            if !self.refusing || self.tried.elapsed() >= RETRY_EVERY {
                self.drain();
            }
            self.status
                .backlog
                .store(self.backlog.len() as u64, Ordering::Relaxed);
        }
        self.drain();
        self.status
            .backlog
            .store(self.backlog.len() as u64, Ordering::Relaxed);
        if !self.backlog.is_empty() || self.dropped > 0 || self.refused > 0 {
            let mut why = Vec::new();
            if !self.backlog.is_empty() {
                why.push(format!("{} still refused at the end", self.backlog.len()));
            }
            if self.dropped > 0 {
                why.push(format!("{} dropped from a full backlog", self.dropped));
            }
            if self.refused > 0 {
                why.push(format!("{} refused for good", self.refused));
            }
            log::warn!(
                "storage: {} event change(s) could not be stored ({})",
                self.backlog.len() as u64 + self.dropped + self.refused,
                why.join(", ")
            );
        }
    }

    /// Stores the backlog in order, up to the first row the store cannot take now; a row it
    /// refuses for good (a constraint, e.g. a NaN score) is dropped with a warning instead of
    /// holding up the rows behind it.
    fn drain(&mut self) {
        let written = self.store_backlog();
        if let Some(store) = &self.store
            && store.log_len() > 0
            && store.file_now() == StoreFile::Same
        {
            // An empty write-ahead log between writes (this writer's, the API's verdicts,
            // retention's marks): a file put in the store's place (a restored backup) and opened
            // by a reader before the writer notices cannot be handed old rows. A reader that holds
            // it up only means it is tried again at the next wake-up.
            let _ = store.empty_log();
        }
        // Told after the log is emptied: a listener's read cannot hold up the emptying.
        if let Some(changes) = &self.changes {
            for id in written {
                // No listener is no error.
                let _ = changes.send(id);
            }
        }
    }

    /// [`Writer::drain`]'s writing: the ids of the rows written.
    fn store_backlog(&mut self) -> Vec<String> {
        let mut written = Vec::new();
        if !self.check_file() {
            return written;
        }
        let mut mended = false;
        while let Some(row) = self.backlog.front() {
            let Some(store) = &self.store else {
                self.refuse("no event store is open");
                return written;
            };
            if let Err(error) = row.store(store) {
                if error.damaged() && !mended {
                    // Cut or overwritten while the run went on: kept aside, a new one opened.
                    mended = true;
                    self.store = None;
                    self.set_aside_and_reopen(&error.to_string());
                    continue;
                }
                if error.refused_for_good() {
                    log::warn!("storage: {} is not stored: {error}", row.what());
                    self.refused += 1;
                    self.status.unstored.fetch_add(1, Ordering::Relaxed);
                    self.backlog.pop_front();
                    continue;
                }
                self.refuse(&error.to_string());
                return written;
            }
            written.push(row.id().to_string());
            self.backlog.pop_front();
        }
        if self.refusing && self.store.is_some() {
            log::info!(
                "storage: the event store takes writes again ({} event change(s) kept in memory are stored now)",
                written.len()
            );
            self.refusing = false;
            self.status.failing.store(false, Ordering::Relaxed);
        }
        written
    }

    /// The store cannot take the backlog's first row now: said once per outage (the first
    /// refusal, then the recovery), tried again after [`RETRY_EVERY`].
    fn refuse(&mut self, why: &str) {
        if !self.refusing {
            log::warn!("storage: {why}; event changes are kept in memory until it can be written");
            self.refusing = true;
            self.status.failing.store(true, Ordering::Relaxed);
        }
        self.tried = Instant::now();
    }

    /// A store whose file was deleted, replaced, or overwritten or cut in place while the run
    /// went on is closed and a new one opened at its path; rows would otherwise go where no one
    /// reads them (SQLite itself does not notice). The log of a deleted or replaced one is
    /// emptied into the file it had open first, so a replacing file is not handed its rows; a
    /// damaged one is kept aside. False when no store can be written now (refused; tried again
    /// after [`RETRY_EVERY`]).
    fn check_file(&mut self) -> bool {
        let Some(store) = &self.store else {
            self.reopen("no event store is open");
            return self.store.is_some();
        };
        let now = store.file_now();
        let path = self.folder.join(crate::store::DATABASE);
        let what = match now {
            StoreFile::Same => return true,
            StoreFile::Deleted => "was deleted",
            StoreFile::Replaced => "was replaced",
            StoreFile::Damaged => {
                self.store = None;
                self.set_aside_and_reopen(&format!(
                    "{} was overwritten or cut short",
                    path.display()
                ));
                return self.store.is_some();
            }
        };
        let emptied = store.empty_log();
        if now == StoreFile::Replaced && !matches!(emptied, Ok(true)) {
            // Opening the new file beside this log would write its rows into it.
            let why = match emptied {
                Err(error) => error.to_string(),
                Ok(_) => "another connection is reading it".into(),
            };
            self.refuse(&format!(
                "{} {what}, and the old store's log cannot be emptied yet ({why})",
                path.display()
            ));
            return false;
        }
        self.store = None;
        self.reopen(&format!("{} {what} while the run went on", path.display()));
        self.store.is_some()
    }

    /// The store's file turned out damaged at a write: it is kept aside (SQLite may still read
    /// it there) and a new store opened.
    fn set_aside_and_reopen(&mut self, error: &str) {
        match crate::store::set_aside(&self.folder, crate::pipeline::unix_now() as u64) {
            Ok(aside) => self.reopen(&format!(
                "{error} while the run went on; the damaged file is kept as {}",
                aside.display()
            )),
            Err(moving) => self.refuse(&format!("{error}, and {moving}")),
        }
    }

    /// Opens a new store in the folder (a damaged file there is kept aside first); on failure
    /// the backlog waits and this is tried again.
    fn reopen(&mut self, why: &str) {
        match open_mending(&self.folder, |_| Ok(())) {
            Ok((store, ())) => {
                log::warn!("storage: {why}; the events from now on go to a new store there");
                self.store = Some(store);
            }
            Err(error) => self.refuse(&format!("{why}, and a new store: {error}")),
        }
    }

    /// Writes the job's pictures (at a new peak; one that cannot be written is left out of the
    /// row, with a warning) and returns its row.
    fn prepare(&self, job: Job) -> Row {
        match job {
            Job::Clip { id, path, start } => Row::Clip { id, path, start },
            Job::Event(job) => {
                let EventJob { event, model, peak } = *job;
                let peak = peak.map(|frames| match self.snapshots(&event, &frames) {
                    Ok(peak) => peak,
                    Err(error) => {
                        log::warn!("storage: snapshot of {}: {error}", event.id);
                        Peak {
                            raw_score: Some(frames.raw_score),
                            ..Peak::default()
                        }
                    }
                });
                Row::Event {
                    event: Box::new(event),
                    model,
                    peak,
                }
            }
        }
    }

    /// Writes the annotated and the clean peak frame as JPEG files.
    fn snapshots(&self, event: &AlertEvent, frames: &PeakFrames) -> Result<Peak, WriteError> {
        let dir = self.folder.join("snapshots").join(&event.camera);
        let annotated = dir.join(format!("{}.jpg", event.id));
        let clean = dir.join(format!("{}-clean.jpg", event.id));
        for (path, rgb) in [(&annotated, &frames.annotated), (&clean, &frames.clean)] {
            let bytes = jpeg(&Picture {
                rgb,
                clean: rgb,
                width: frames.width,
                height: frames.height,
                raw_score: frames.raw_score,
            })?;
            write_file(path, &bytes)?;
        }
        Ok(Peak {
            raw_score: Some(frames.raw_score),
            snapshot_path: Some(annotated),
            clean_path: Some(clean),
        })
    }
}

/// Why a snapshot was not written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot write {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Writes `bytes` to `path` through a temporary file, so a reader never sees half a JPEG.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let error = |source| WriteError::File {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    crate::files::write_whole(path, bytes).map_err(error)
}

/// One camera's events into the store.
pub struct EventLog {
    camera: String,
    jobs: mpsc::SyncSender<Job>,
    status: Arc<StoreStatus>,
    /// This camera's event changes not handed on because the writer was too far behind.
    behind: u64,
    /// Ends of events the writer had no room for: handed on before the camera's next change, or
    /// when the camera stops (an event whose `end` never reached the store would stay open there).
    held: VecDeque<Job>,
}

/// Ends a camera holds for a writer that is behind, at most; the oldest is dropped beyond it.
const HELD_ENDS: usize = 1024;

impl EventLog {
    /// Hands on the held ends, in order, while the writer has room.
    fn hand_on_held(&mut self) -> Result<(), SinkError> {
        while let Some(job) = self.held.pop_front() {
            match self.jobs.try_send(job) {
                Ok(()) => {}
                Err(mpsc::TrySendError::Full(job)) => {
                    self.held.push_front(job);
                    break;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(SinkError::Stored(self.camera.clone()));
                }
            }
        }
        Ok(())
    }
}

impl Drop for EventLog {
    /// The camera stopped: its held ends are handed on, waiting for the writer if need be.
    fn drop(&mut self) {
        for job in self.held.drain(..) {
            if self.jobs.send(job).is_err() {
                break;
            }
        }
    }
}

impl Sink for EventLog {
    fn alert(
        &mut self,
        event: &AlertEvent,
        picture: Option<&Picture<'_>>,
    ) -> Result<(), SinkError> {
        let peak = picture
            .filter(|_| event.snapshot)
            .map(|picture| PeakFrames {
                annotated: picture.rgb.to_vec(),
                clean: picture.clean.to_vec(),
                width: picture.width,
                height: picture.height,
                raw_score: picture.raw_score,
            });
        let job = Job::Event(Box::new(EventJob {
            event: event.clone(),
            model: event.model.clone(),
            peak,
        }));
        self.hand_on_held()?;
        let sent = if self.held.is_empty() {
            self.jobs.try_send(job)
        } else {
            Err(mpsc::TrySendError::Full(job))
        };
        match sent {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(job)) if event.kind == EventKind::End => {
                if self.held.len() == HELD_ENDS {
                    self.held.pop_front();
                    self.status.unstored.fetch_add(1, Ordering::Relaxed);
                }
                self.held.push_back(job);
                Ok(())
            }
            Err(mpsc::TrySendError::Full(_)) => {
                // The camera goes on; the store gets this change's successors (a row is
                // created by whichever of an event's changes arrives first).
                self.behind += 1;
                self.status.unstored.fetch_add(1, Ordering::Relaxed);
                if self.behind.is_power_of_two() {
                    log::warn!(
                        "storage: the event writer is {QUEUE} changes behind (a slow or locked \
                         store); {} event change(s) of camera {} not stored so far \
                         (stpm_event_store_unstored)",
                        self.behind,
                        self.camera
                    );
                }
                Ok(())
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(SinkError::Stored(self.camera.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, score: f32) -> Row {
        Row::Event {
            event: Box::new(AlertEvent::sample(id, "line1", 1.0, score)),
            model: "m".into(),
            peak: None,
        }
    }

    /// `[storage]` with its data folder in `dir`.
    fn storage_in(dir: &Path) -> StorageConfig {
        StorageConfig {
            path: dir.to_path_buf(),
            ..StorageConfig::default()
        }
    }

    /// A store whose write lock another process holds makes no camera wait: each change is handed
    /// on at once or counted as not stored, the status says the store is failing, and once the
    /// lock is gone what was handed on is stored.
    #[test]
    fn a_locked_store_does_not_hold_up_the_cameras() {
        let dir = tempfile::tempdir().expect("dir");
        let config = storage_in(dir.path());
        let writer = EventWriter::start(&config, None).expect("writer");
        let status = writer.status();
        let lock = rusqlite::Connection::open(dir.path().join(crate::store::DATABASE)).expect("db");
        lock.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        let mut sink = writer.sink("line1").expect("sink");
        let changes = 300;
        let (done, handed) = mpsc::channel();
        let ended = 10;
        let camera = std::thread::spawn(move || {
            for i in 0..changes {
                let event = AlertEvent::sample(&format!("e{i}"), "line1", 1.0, 0.8);
                sink.alert(&event, None).expect("handed on");
            }
            // Ends are held, not dropped: an event whose end is lost would stay open.
            for i in 0..ended {
                let mut event = AlertEvent::sample(&format!("e{i}"), "line1", 1.0, 0.8);
                event.kind = EventKind::End;
                event.end_time = Some(2.0);
                sink.alert(&event, None).expect("handed on");
            }
            let _ = done.send(());
        });
        // Generous: a camera that waits for the store waits for this thread to unlock it.
        let handed = handed.recv_timeout(Duration::from_secs(60)).is_ok();
        let mut failing = false;
        for _ in 0..300 {
            failing = status.failing.load(Ordering::Relaxed);
            if failing || !handed {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        lock.execute_batch("ROLLBACK").expect("unlock");
        camera.join().expect("camera");
        assert!(handed, "the camera waited for the locked store");
        assert!(failing, "the status never said the store refuses writes");
        let unstored = status.unstored.load(Ordering::Relaxed);
        assert!(unstored > 0 && unstored < changes, "{unstored}");
        writer.finish();
        let stored: u64 = lock
            .query_row("SELECT COUNT(*) FROM events", [], |row| row.get(0))
            .expect("count");
        assert_eq!(stored + unstored, changes);
        let open: u64 = lock
            .query_row(
                "SELECT COUNT(*) FROM events WHERE id IN \
                 ('e0','e1','e2','e3','e4','e5','e6','e7','e8','e9') AND end_time IS NULL",
                [],
                |row| row.get(0),
            )
            .expect("count");
        assert_eq!((ended, open), (10, 0), "ends were lost");
        assert!(!status.failing.load(Ordering::Relaxed));
        assert_eq!(status.backlog.load(Ordering::Relaxed), 0);
    }

    /// A store that is not a database, or a truncated one, is kept aside and a new one starts in
    /// its place; a sound one is kept with its rows.
    #[test]
    fn a_damaged_store_is_set_aside_and_a_new_one_started() {
        let dir = tempfile::tempdir().expect("dir");
        let config = storage_in(dir.path());
        let database = dir.path().join(crate::store::DATABASE);
        let store = EventStore::open(dir.path()).expect("store");
        for i in 0..200 {
            let event = AlertEvent::sample(&format!("e{i}"), "line1", 1.0, 0.8);
            store.record(&event, "m", None, 1.0).expect("record");
        }
        drop(store);
        let sound = std::fs::read(&database).expect("database");
        let asides = |dir: &Path| {
            std::fs::read_dir(dir)
                .expect("folder")
                .filter_map(|entry| entry.ok())
                .filter(|entry| {
                    entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with("events.db.bad-")
                })
                .count()
        };
        // Sound: opened as it is.
        EventWriter::start(&config, None).expect("writer").finish();
        assert_eq!(asides(dir.path()), 0);
        assert!(
            EventStore::open(dir.path())
                .expect("store")
                .get("e199")
                .expect("get")
                .is_some()
        );
        for damaged in [
            b"not a database at all, just some bytes".repeat(200),
            sound[..sound.len().min(12288)].to_vec(),
        ] {
            std::fs::write(&database, &damaged).expect("damage");
            let writer = EventWriter::start(&config, None).expect("a new store");
            let mut sink = writer.sink("line1").expect("sink");
            sink.alert(&AlertEvent::sample("new", "line1", 2.0, 0.9), None)
                .expect("handed on");
            drop(sink);
            writer.finish();
            let store = EventStore::open(dir.path()).expect("store");
            assert!(store.get("new").expect("get").is_some());
            assert!(store.get("e199").expect("get").is_none());
            assert_eq!(asides(dir.path()), 1, "the damaged file is kept");
            for entry in std::fs::read_dir(dir.path()).expect("folder").flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("events.db.bad-")
                {
                    std::fs::remove_file(entry.path()).expect("clean up");
                }
            }
        }
    }

    /// A writer on `dir` with camera line1's sink, and the ids of the rows it writes.
    fn watched_writer(
        dir: &Path,
    ) -> (
        EventWriter,
        EventLog,
        tokio::sync::broadcast::Receiver<String>,
    ) {
        let (changes, changed) = tokio::sync::broadcast::channel(1024);
        let writer = EventWriter::start(&storage_in(dir), Some(changes)).expect("writer");
        let sink = writer.sink("line1").expect("sink");
        (writer, sink, changed)
    }

    /// Hands event `id` to the writer.
    fn hand(sink: &mut EventLog, id: &str) {
        sink.alert(&AlertEvent::sample(id, "line1", 1.0, 0.8), None)
            .expect("handed on");
    }

    /// Whether the writer wrote row `id` within `within`.
    fn written(
        changed: &mut tokio::sync::broadcast::Receiver<String>,
        id: &str,
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match changed.try_recv() {
                Ok(row) if row == id => return true,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        false
    }

    /// Hands event `id` to the writer and waits until it is written.
    fn stored(
        sink: &mut EventLog,
        changed: &mut tokio::sync::broadcast::Receiver<String>,
        id: &str,
    ) {
        hand(sink, id);
        assert!(written(changed, id, Duration::from_secs(20)), "{id}");
    }

    /// Moves the store at `database` into a new folder (returned) and puts in its place a
    /// backup, closed, that holds event `restored`.
    fn restore_backup_over(database: &Path) -> tempfile::TempDir {
        let backup = tempfile::tempdir().expect("backup");
        EventStore::open(backup.path())
            .expect("backup store")
            .record(
                &AlertEvent::sample("restored", "line1", 1.0, 0.8),
                "m",
                None,
                1.0,
            )
            .expect("record");
        let moved = tempfile::tempdir().expect("moved");
        std::fs::rename(database, moved.path().join(crate::store::DATABASE)).expect("move");
        std::fs::rename(backup.path().join(crate::store::DATABASE), database).expect("restore");
        moved
    }

    /// Whether the store in `folder` holds event `id`.
    fn has(folder: &Path, id: &str) -> bool {
        EventStore::open(folder)
            .expect("store")
            .get(id)
            .expect("get")
            .is_some()
    }

    /// The writer's looks at the store file (every wake-up) keep SQLite's lock on it: on Linux,
    /// closing any handle on a file drops every lock the process holds on it, and without its
    /// lock another program's connection takes itself for the last one and deletes the live
    /// write-ahead log.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_keeps_sqlites_lock_on_the_store() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("dir");
        let (writer, mut sink, mut changed) = watched_writer(dir.path());
        for id in ["first", "second"] {
            stored(&mut sink, &mut changed, id);
        }
        // Past a wake-up with nothing to do, too.
        std::thread::sleep(RETRY_EVERY + Duration::from_millis(500));
        let inode = std::fs::metadata(dir.path().join(crate::store::DATABASE))
            .expect("database")
            .ino();
        let locks = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
        let pid = std::process::id().to_string();
        let held = locks.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 5
                && fields[4] == pid
                && fields[5].rsplit(':').next() == Some(inode.to_string().as_str())
        });
        assert!(held, "no lock of this process on inode {inode}:\n{locks}");
        drop(sink);
        writer.finish();
    }

    /// A store deleted, or replaced by another file (a restored backup), while the run goes on:
    /// the next rows go to a new store at the path, the replacing file keeps its own rows and
    /// gets none of the old store's (SQLite would hand a new file the old write-ahead log found
    /// at its path), and the moved-away file gets the rows its log held.
    #[test]
    fn a_store_deleted_or_replaced_while_running_is_opened_anew() {
        let dir = tempfile::tempdir().expect("dir");
        let (writer, mut sink, mut changed) = watched_writer(dir.path());
        let database = dir.path().join(crate::store::DATABASE);
        let mut store_row = |id: &str| stored(&mut sink, &mut changed, id);
        store_row("before-delete");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", database.display()));
        }
        store_row("after-delete");
        assert!(
            has(dir.path(), "after-delete"),
            "written into the deleted file"
        );

        store_row("before-replace");
        let moved = restore_backup_over(&database);
        store_row("after-replace");
        assert!(
            has(dir.path(), "after-replace"),
            "written into the moved file"
        );
        assert!(
            has(dir.path(), "restored"),
            "the restored file lost its rows"
        );
        assert!(
            !has(dir.path(), "before-replace"),
            "the old store's log went into the restored file"
        );
        assert!(
            has(moved.path(), "before-replace"),
            "the moved file did not get its log"
        );
        drop(sink);
        writer.finish();
    }

    /// A restored file found while another connection still reads the old one: the old store's
    /// log cannot be emptied yet, so nothing is written (into either file) until it can; then
    /// the waiting row goes to the restored file and the old rows to the moved one.
    #[test]
    fn a_replaced_store_waits_for_the_old_log_to_empty() {
        let dir = tempfile::tempdir().expect("dir");
        let (writer, mut sink, mut changed) = watched_writer(dir.path());
        let database = dir.path().join(crate::store::DATABASE);
        // A reader of the old file keeps the writer's log from being emptied.
        let reader = rusqlite::Connection::open(&database).expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let _: i64 = reader
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .expect("read");
        stored(&mut sink, &mut changed, "before");
        let moved = restore_backup_over(&database);
        hand(&mut sink, "after");
        assert!(
            !written(&mut changed, "after", Duration::from_secs(3)),
            "written while the old log could not be emptied"
        );
        drop(reader);
        assert!(written(&mut changed, "after", Duration::from_secs(20)));
        assert!(has(dir.path(), "after") && has(dir.path(), "restored"));
        assert!(
            !has(dir.path(), "before"),
            "the old log went into the restored file"
        );
        assert!(has(moved.path(), "before") && !has(moved.path(), "after"));
        drop(sink);
        writer.finish();
    }

    /// A store overwritten or cut short in place while the run goes on (SQLite's own writes
    /// would not notice) is found damaged before the next write: kept aside, and the row goes to
    /// a new store.
    #[test]
    fn a_store_damaged_while_running_is_set_aside() {
        let dir = tempfile::tempdir().expect("dir");
        let (writer, mut sink, mut changed) = watched_writer(dir.path());
        let mut store_row = |id: &str| stored(&mut sink, &mut changed, id);
        let database = dir.path().join(crate::store::DATABASE);
        let cut = |database: &Path| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(database)
                .expect("database");
            file.set_len(8192).expect("cut short");
        };
        let overwrite = |database: &Path| {
            std::fs::write(database, b"overwritten by mistake".repeat(1000)).expect("overwrite");
        };
        // Each in place: the same file, so not "replaced".
        for (round, damage) in [&overwrite as &dyn Fn(&Path), &cut].into_iter().enumerate() {
            for i in 0..200 {
                store_row(&format!("r{round}-e{i}"));
            }
            damage(&database);
            store_row(&format!("r{round}-after"));
            let store = EventStore::open(dir.path()).expect("store");
            assert!(
                store
                    .get(&format!("r{round}-after"))
                    .expect("get")
                    .is_some()
            );
            assert!(store.get(&format!("r{round}-e0")).expect("get").is_none());
        }
        let aside = std::fs::read_dir(dir.path())
            .expect("folder")
            .flatten()
            .filter(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.starts_with("events.db.bad-")
                    && !name.ends_with("-wal")
                    && !name.ends_with("-shm")
            })
            .count();
        assert_eq!(aside, 2, "each damaged file is kept aside");
        drop(sink);
        writer.finish();
    }

    /// A row the database refuses for good (a NaN score breaks `score NOT NULL`) is dropped;
    /// the rows behind it are stored at once instead of waiting behind it.
    #[test]
    fn a_row_refused_for_good_does_not_hold_up_the_rest() {
        let dir = tempfile::tempdir().expect("dir");
        let store = EventStore::open(dir.path()).expect("store");
        let mut writer = Writer::new(
            store,
            dir.path().to_path_buf(),
            None,
            Arc::new(StoreStatus::default()),
        );
        writer
            .backlog
            .extend([event("bad", f32::NAN), event("good", 0.8)]);
        writer.drain();
        assert!(writer.backlog.is_empty());
        assert!(!writer.refusing);
        assert_eq!(writer.refused, 1);
        let check = EventStore::open(dir.path()).expect("store");
        assert!(check.get("bad").expect("get").is_none());
        let good = check.get("good").expect("get").expect("stored");
        assert!((good.score - 0.8).abs() < 1e-6, "{good:?}");
    }
}
