//! The run's live model: which bundle scores the frames and on which sessions, and swapping it
//! for another bundle while the cameras run (`POST /api/model`, SIGHUP, `[model] watch`). A new
//! bundle is opened, hash-checked and warmed up off the frame path, then checked against the
//! running one (provider, input size, normalisation, sessions); only then do the analysers move
//! to it, each between two frames. A refused bundle leaves the running model as it was.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, TryLockError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::background::Background;
use super::metrics::Metrics;
use crate::bundle::{Manifest, Precision};
use crate::engine::ExecutionProvider;
use crate::engine::batch::SharedSession;
use crate::engine::select::{ModelConfig, SelectError, Sessions};

/// How often `[model] watch` reads the bundle's manifest.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The id of a model: the first 12 hex digits of the sha256 of its manifest (`stpm.toml`, which
/// names the graph's own hash and holds the thresholds).
pub fn id_of(manifest_sha256: &str) -> String {
    manifest_sha256.chars().take(12).collect()
}

/// The id of the bundle in `dir` as it is on disk now, or `unknown` when its manifest cannot be
/// read.
pub fn id_on_disk(dir: &Path) -> String {
    crate::bundle::sha256_file(&dir.join(crate::bundle::MANIFEST_FILE))
        .map(|hash| id_of(&hash))
        .unwrap_or_else(|_| "unknown".into())
}

/// `a` and `b` name the same folder (written alike, or resolving to the same place).
pub fn same_folder(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// A model as the run scores with it.
#[derive(Debug)]
pub struct Model {
    /// See [`id_of`]; events, MQTT messages, `/api/cameras` and `/metrics` name the model by it.
    pub id: String,
    /// The bundle folder's name.
    pub name: String,
    pub bundle: PathBuf,
    /// The graph that runs.
    pub precision: Precision,
    /// The manifest with the calibration of that graph.
    pub manifest: Arc<Manifest>,
    /// 0 for the model the run started with, then one more for each swap.
    pub generation: u64,
}

/// What `/api/cameras`, `/metrics` and the swap answer say about the live model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub id: String,
    /// The bundle folder's name.
    pub name: String,
    pub bundle: PathBuf,
    pub precision: String,
}

impl Model {
    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            bundle: self.bundle.clone(),
            precision: self.precision.name().to_string(),
        }
    }
}

/// The live model and its sessions (one per analyser number).
pub struct Live {
    pub model: Arc<Model>,
    pub sessions: Vec<Arc<SharedSession>>,
}

/// Why a bundle was not swapped in (the running model stays).
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("another model is being loaded; try again once it is live")]
    Busy,
    #[error("{0}: no such bundle folder")]
    Missing(PathBuf),
    #[error("{0}")]
    Open(#[from] SelectError),
    #[error(
        "{bundle}: opens on the {new} provider, the live model runs on {live} (restart stpm run to change providers)"
    )]
    Provider {
        bundle: PathBuf,
        new: ExecutionProvider,
        live: ExecutionProvider,
    },
    #[error(
        "{bundle}: input size {new:?}, the live model's is {live:?} (the cameras' zones and buffers are sized for it; restart stpm run to change it)"
    )]
    InputSize {
        bundle: PathBuf,
        new: [usize; 2],
        live: [usize; 2],
    },
    #[error(
        "{bundle}: its teacher normalises images differently from the live model's (another backbone?); restart stpm run to change it"
    )]
    Normalisation { bundle: PathBuf },
    #[error("{bundle}: opened {new} session(s), the run has {live}")]
    Sessions {
        bundle: PathBuf,
        new: usize,
        live: usize,
    },
}

impl SwapError {
    /// True when the bundle itself was refused; false for "try again later" (another swap
    /// loading, sessions that could not be opened: memory, a driver).
    pub fn refused(&self) -> bool {
        !matches!(
            self,
            SwapError::Busy | SwapError::Open(SelectError::Engine(_))
        )
    }
}

/// What a swap did.
#[derive(Debug, Clone, Serialize)]
pub struct Swapped {
    /// The model live now.
    pub model: ModelInfo,
    /// The model it replaced (the same when `unchanged`).
    pub previous: ModelInfo,
    /// The bundle on disk is the live one: nothing was loaded.
    pub unchanged: bool,
    /// Opening, checking and warming up the new sessions.
    pub load_seconds: f64,
}

/// What the HTTP API asks of the live model.
pub trait ModelControl: Send + Sync {
    /// The model scoring the frames now.
    fn live_model(&self) -> ModelInfo;
    /// Loads `bundle` and makes it live, or says why not (blocking: seconds).
    fn swap(&self, bundle: &Path) -> Result<Swapped, SwapError>;
}

/// The run's live model; analysers read it before each frame, a swap replaces it.
pub struct ModelSlot {
    live: RwLock<Arc<Live>>,
    /// Counts swaps: an analyser re-reads `live` when it changed.
    generation: AtomicU64,
    /// Held while a bundle loads: one swap at a time.
    loading: Mutex<()>,
    /// The run's `[model]` (a swap opens the new bundle with the same settings).
    config: ModelConfig,
    provider: ExecutionProvider,
    metrics: OnceLock<Arc<Metrics>>,
}

impl ModelSlot {
    /// The slot of a run whose sessions `sessions` opened for `config`.
    pub fn new(config: &ModelConfig, sessions: Sessions) -> Self {
        let provider = sessions.provider;
        Self {
            live: RwLock::new(Arc::new(live_of(sessions, 0, config))),
            generation: AtomicU64::new(0),
            loading: Mutex::new(()),
            config: config.clone(),
            provider,
            metrics: OnceLock::new(),
        }
    }

    /// Where the live model is reported (`stpm_model_info`, `stpm_engine_info`).
    pub fn report_to(&self, metrics: Arc<Metrics>) {
        let info = self.live().model.info();
        metrics.set_model(&info.id, &info.name, &info.precision);
        let _ = self.metrics.set(metrics);
    }

    /// The live model and sessions, and the generation they belong to.
    pub fn current(&self) -> (u64, Arc<Live>) {
        let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
        (self.generation.load(Ordering::Acquire), Arc::clone(&live))
    }

    pub fn live(&self) -> Arc<Live> {
        self.current().1
    }

    /// Changes with every swap.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// `[model] precision = "int8"`: every bundle swapped in needs its INT8 graph.
    pub fn precision_required(&self) -> bool {
        self.config.precision == crate::bundle::PrecisionChoice::Int8
    }

    fn install(&self, live: Live) {
        let mut slot = self.live.write().unwrap_or_else(PoisonError::into_inner);
        *slot = Arc::new(live);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Checks the manifest of `bundle` against the live model's (before any session is opened).
    fn check_manifest(bundle: &Path, new: &Manifest, live: &Live) -> Result<(), SwapError> {
        let bundle = bundle.to_path_buf();
        let old = &live.model.manifest;
        if new.model.input_size != old.model.input_size {
            return Err(SwapError::InputSize {
                bundle,
                new: new.model.input_size,
                live: old.model.input_size,
            });
        }
        if new.normalisation != old.normalisation {
            return Err(SwapError::Normalisation { bundle });
        }
        Ok(())
    }

    /// Checks `sessions` (opened from `bundle`) against the live model.
    fn check_sessions(
        &self,
        bundle: &Path,
        sessions: &Sessions,
        live: &Live,
    ) -> Result<(), SwapError> {
        let bundle = bundle.to_path_buf();
        if sessions.provider != self.provider {
            return Err(SwapError::Provider {
                bundle,
                new: sessions.provider,
                live: self.provider,
            });
        }
        Self::check_manifest(&bundle, &sessions.manifest, live)?;
        if sessions.engines.len() != live.sessions.len() {
            return Err(SwapError::Sessions {
                bundle,
                new: sessions.engines.len(),
                live: live.sessions.len(),
            });
        }
        Ok(())
    }
}

impl ModelControl for ModelSlot {
    fn live_model(&self) -> ModelInfo {
        self.live().model.info()
    }

    fn swap(&self, bundle: &Path) -> Result<Swapped, SwapError> {
        // A load that panicked leaves the lock poisoned; it guards no data, so the next load goes on.
        let _loading = match self.loading.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(SwapError::Busy),
        };
        let started = Instant::now();
        let live = self.live();
        let previous = live.model.info();
        if !bundle.is_dir() {
            return Err(SwapError::Missing(bundle.to_path_buf()));
        }
        if same_folder(bundle, &live.model.bundle) && id_on_disk(bundle) == live.model.id {
            return Ok(Swapped {
                model: previous.clone(),
                previous,
                unchanged: true,
                load_seconds: 0.0,
            });
        }
        log::info!(
            "model: loading {} to replace {} ({}) …",
            bundle.display(),
            previous.name,
            previous.id
        );
        let config = ModelConfig {
            bundle: bundle.to_path_buf(),
            ..self.config.clone()
        };
        // The manifest and the graph's hash first: a bundle refused on them loads nothing.
        let checked = crate::bundle::Bundle::open(bundle).map_err(SelectError::from)?;
        Self::check_manifest(bundle, &checked.manifest, &live)?;
        let sessions = Sessions::open(&config)?;
        self.check_sessions(bundle, &sessions, &live)?;
        let new = live_of(sessions, self.generation() + 1, &self.config);
        let model = Arc::clone(&new.model);
        let load_seconds = started.elapsed().as_secs_f64();
        self.install(new);
        let info = model.info();
        if let Some(metrics) = self.metrics.get() {
            metrics.set_model(&info.id, &info.name, &info.precision);
        }
        log::info!(
            "model: {} ({}, {}, threshold {:.4} raw) is live, replacing {} ({}); loaded in {:.2} s",
            info.name,
            info.id,
            info.precision,
            model.manifest.calibration.threshold,
            previous.name,
            previous.id,
            load_seconds
        );
        Ok(Swapped {
            model: info,
            previous,
            unchanged: false,
            load_seconds,
        })
    }
}

/// The model and shared sessions of `sessions` (opened for `config`), the `generation`-th model
/// of the run.
fn live_of(sessions: Sessions, generation: u64, config: &ModelConfig) -> Live {
    let (batch, wait) = (sessions.batch, Duration::from_millis(config.batch_wait_ms));
    Live {
        model: Arc::new(model_of(&sessions, generation)),
        sessions: sessions
            .engines
            .into_iter()
            .map(|engine| Arc::new(SharedSession::new(engine, batch, wait)))
            .collect(),
    }
}

fn model_of(sessions: &Sessions, generation: u64) -> Model {
    let bundle = &sessions.bundle;
    Model {
        id: id_of(&bundle.manifest_sha256),
        name: bundle
            .dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| bundle.dir.display().to_string()),
        bundle: bundle.dir.clone(),
        precision: bundle.precision,
        manifest: Arc::clone(&sessions.manifest),
        generation,
    }
}

/// The name, size and modification time of every file directly in a bundle folder: what tells
/// `[model] watch` that a refused bundle has changed since.
#[derive(Debug, PartialEq, Eq)]
struct FolderStamp(Vec<(std::ffi::OsString, u64, Option<std::time::SystemTime>)>);

impl FolderStamp {
    fn of(dir: &Path) -> Self {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let meta = entry.metadata().ok()?;
                meta.is_file()
                    .then(|| (entry.file_name(), meta.len(), meta.modified().ok()))
            })
            .collect();
        files.sort();
        Self(files)
    }
}

/// `[model] watch`: swaps the bundle in again whenever its manifest changes on disk (a new
/// `stpm train` or `stpm calibrate` into the live bundle's folder).
pub struct Watch(Background);

impl Watch {
    pub fn start(slot: Arc<ModelSlot>) -> std::io::Result<Self> {
        Background::spawn("model-watch", move |stop| {
            // A bundle refused once is not tried again until one of its files changes once more
            // (a copy that wrote the manifest before the graph is tried again when the graph
            // arrives); one that failed for another reason (memory, a driver) is tried again
            // after a minute.
            let mut refused: Option<(FolderStamp, Option<Instant>)> = None;
            let mut next = Instant::now() + WATCH_INTERVAL;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if Instant::now() < next {
                    continue;
                }
                next = Instant::now() + WATCH_INTERVAL;
                let live = slot.live();
                let on_disk = id_on_disk(&live.model.bundle);
                if on_disk == live.model.id || on_disk == "unknown" {
                    continue;
                }
                // Only a manifest that differs from the live model's is worth listing the folder.
                let stamp = FolderStamp::of(&live.model.bundle);
                let waiting = refused.as_ref().is_some_and(|(refused, retry)| {
                    refused == &stamp && retry.is_none_or(|at| Instant::now() < at)
                });
                if waiting {
                    continue;
                }
                let bundle = live.model.bundle.clone();
                drop(live);
                log::info!("model: {} changed on disk (model.watch)", bundle.display());
                match slot.swap(&bundle) {
                    Ok(_) => refused = None,
                    Err(SwapError::Busy) => {}
                    Err(e) => {
                        let retry =
                            (!e.refused()).then(|| Instant::now() + Duration::from_secs(60));
                        log::warn!(
                            "model: not swapped in, the live model stays{}: {e}",
                            if retry.is_some() {
                                " (tried again in a minute)"
                            } else {
                                ""
                            }
                        );
                        refused = Some((stamp, retry));
                    }
                }
            }
        })
        .map(Self)
    }

    pub fn stop(self) {
        self.0.stop();
    }
}
