//! The run's retention thread: a sweep of snapshots, clips and recordings (`store::retention`) at
//! start and every minute, reported in the metrics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::pipeline::config::PipelineConfig;
use crate::pipeline::metrics::Metrics;
use crate::store::EventStore;
use crate::store::retention::{self, Limits};

/// Time between sweeps.
const EVERY: Duration = Duration::from_secs(60);

/// The running thread; [`Retention::stop`] ends it.
pub struct Retention {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Retention {
    /// Starts sweeping what `config` keeps, when `[storage]` sets a limit; `None` otherwise.
    pub fn start(config: &PipelineConfig, metrics: Arc<Metrics>) -> Option<Self> {
        let limits = config.storage.limits();
        if limits.max_bytes == 0 && limits.keep_days <= 0.0 {
            return None;
        }
        let recordings = config
            .output
            .record
            .enabled
            .then(|| config.output.record.dir.clone());
        let folders = retention::folders(&config.storage.path, recordings.as_deref());
        let storage = config.storage.path.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || run(&storage, &folders, limits, &metrics, &flag))
            .map_err(|e| log::warn!("storage: cannot start retention: {e}"))
            .ok()?;
        log::info!(
            "storage: retention keeps {} and {} (snapshots, clips{})",
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
            if recordings.is_some() {
                ", recordings"
            } else {
                ""
            }
        );
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(storage: &Path, folders: &[PathBuf], limits: Limits, metrics: &Metrics, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let store = EventStore::open(storage);
        if let Err(e) = &store {
            log::warn!("storage: retention cannot open the store: {e}");
        }
        match retention::sweep(folders, limits, SystemTime::now(), store.as_ref().ok()) {
            Ok(swept) => {
                if !swept.deleted.is_empty() {
                    log::info!(
                        "storage: retention deleted {} file(s), the oldest {}",
                        swept.deleted.len(),
                        swept.deleted[0].display()
                    );
                }
                metrics.storage_swept(swept.bytes, swept.deleted.len() as u64);
            }
            Err(e) => log::warn!("storage: retention: {e}"),
        }
        drop(store);
        let mut waited = Duration::ZERO;
        while waited < EVERY && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            waited += Duration::from_millis(200);
        }
    }
}
