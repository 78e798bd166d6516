//! The run's retention thread: a sweep of snapshots, clips and recordings (`store::retention`) at
//! start, every minute, and at once when a disk the run writes to falls below `[storage]
//! min_free`; reported in the metrics and, when a disk stays short, in the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::background::Background;
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::metrics::Metrics;
use crate::store::EventStore;
use crate::store::retention::{self, Limits};

/// Time between sweeps.
const EVERY: Duration = Duration::from_secs(60);
/// Time between free-space checks of the folders the run writes to.
const CHECK: Duration = Duration::from_secs(2);
/// Time between sweeps while a disk stays below the floor.
const SHORT_EVERY: Duration = Duration::from_secs(5);
/// Time between warnings while a disk stays below the floor.
const WARN_EVERY: Duration = Duration::from_secs(600);

/// The running thread; [`Retention::stop`] ends it.
pub struct Retention(Background);

impl Retention {
    /// Starts sweeping what `config` keeps, when `[storage]` sets a limit; `None` otherwise.
    pub fn start(config: &PipelineConfig, metrics: Arc<Metrics>) -> Option<Self> {
        let limits = config.storage.limits();
        if !limits.any() {
            return None;
        }
        let recordings = config
            .output
            .record
            .enabled
            .then(|| config.output.record.dir.clone());
        // Without `[storage]` only the recordings are this run's to sweep (the data folder may
        // be another run's, and it has no event store to mark).
        let folders = if config.storage.enabled {
            retention::folders(&config.storage.path, recordings.as_deref())
        } else {
            recordings
                .clone()
                .map(retention::Swept::Recordings)
                .into_iter()
                .collect()
        };
        if folders.is_empty() {
            return None;
        }
        let storage = config.storage.enabled.then(|| config.storage.path.clone());
        let watched = written_folders(config);
        let thread = Background::spawn("retention", move |stop| {
            let run = Run {
                storage: storage.as_deref(),
                folders: &folders,
                watched: &watched,
                limits,
                metrics: &metrics,
            };
            run.run(stop)
        })
        .map_err(|e| log::warn!("storage: cannot start retention: {e}"))
        .ok()?;
        log::info!(
            "storage: retention keeps {}, {} and {} (snapshots, clips{})",
            if limits.max_bytes > 0 {
                format!("at most {} MB", limits.max_bytes / 1_000_000)
            } else {
                "any size".into()
            },
            if limits.keep_days > 0.0 {
                format!("{} days", limits.keep_days)
            } else {
                "any age".into()
            },
            if limits.min_free > 0 {
                format!("{} MB free on their disks", limits.min_free / 1_000_000)
            } else {
                "no free-space floor".into()
            },
            if recordings.is_some() {
                ", recordings"
            } else {
                ""
            }
        );
        Some(Self(thread))
    }

    pub fn stop(self) {
        self.0.stop();
    }
}

/// The folders the run writes to, named for the `stpm_disk_free_bytes` gauge: the data folder
/// (with `[storage]`), the recordings (when on) and the alert spool.
pub fn written_folders(config: &PipelineConfig) -> Vec<(&'static str, PathBuf)> {
    let mut folders = Vec::new();
    if config.storage.enabled {
        folders.push(("data", config.storage.path.clone()));
    }
    if config.output.record.enabled {
        folders.push(("recordings", config.output.record.dir.clone()));
    }
    folders.push(("spool", config.alerts.spool_dir.clone()));
    folders
}

/// What the thread works on.
struct Run<'a> {
    /// The event store's folder, when `[storage]` is on.
    storage: Option<&'a Path>,
    folders: &'a [retention::Swept],
    watched: &'a [(&'static str, PathBuf)],
    limits: Limits,
    metrics: &'a Metrics,
}

impl Run<'_> {
    fn run(&self, stop: &AtomicBool) {
        let mut swept_at: Option<Instant> = None;
        let mut warned_at: Option<Instant> = None;
        let mut was_short = false;
        while !stop.load(Ordering::Relaxed) {
            let short = self.short();
            let since = swept_at.map(|at| at.elapsed());
            if since.is_none_or(|since| since >= EVERY || (short.is_some() && since >= SHORT_EVERY))
            {
                self.sweep();
                swept_at = Some(Instant::now());
                match self.short() {
                    Some((folder, free)) => {
                        if warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                            log::warn!(
                                "storage: {} MB free on the disk of {}, under [storage] min_free \
                                 ({} MB), and nothing older than a minute left to delete there; \
                                 alerts still reach MQTT from memory, files fail until space returns",
                                free / 1_000_000,
                                folder.display(),
                                self.limits.min_free / 1_000_000
                            );
                            warned_at = Some(Instant::now());
                        }
                        was_short = true;
                    }
                    None if was_short => {
                        log::info!("storage: free space is above [storage] min_free again");
                        was_short = false;
                        warned_at = None;
                    }
                    None => {}
                }
            }
            let mut waited = Duration::ZERO;
            while waited < CHECK && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                waited += Duration::from_millis(200);
            }
        }
    }

    /// A written folder whose disk has less than the floor free, with its free bytes.
    fn short(&self) -> Option<(PathBuf, u64)> {
        if self.limits.min_free == 0 {
            return None;
        }
        self.watched.iter().find_map(|(_, folder)| {
            let free = crate::store::disk::free_bytes(folder).ok()?;
            (free < self.limits.min_free).then(|| (folder.clone(), free))
        })
    }

    fn sweep(&self) {
        // Never made here: a reader must not put a file in place of one deleted under the
        // writer (see `EventStore::open_existing`); until the writer makes a new one, the files
        // are swept without marking their rows.
        let store = self.storage.map(EventStore::open_existing).transpose();
        match &store {
            Err(crate::store::StoreError::Missing(_)) => {}
            Err(e) => log::warn!("storage: retention cannot open the store: {e}"),
            Ok(_) => {}
        }
        let store = store.ok().flatten();
        let swept = retention::sweep(self.folders, self.limits, SystemTime::now(), store.as_ref());
        if !swept.deleted.is_empty() {
            log::info!(
                "storage: retention deleted {} file(s), the oldest {}",
                swept.deleted.len(),
                swept.deleted[0].display()
            );
        }
        if swept.unmarked > 0 {
            log::warn!(
                "storage: {} deleted file(s) still have their paths in the event store, which failed",
                swept.unmarked
            );
        }
        self.metrics
            .storage_swept(swept.bytes, swept.deleted.len() as u64);
    }
}
