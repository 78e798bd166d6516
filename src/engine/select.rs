//! The run's engine sessions, decided in one place from `[model]`: the provider (`auto` may fall
//! back to the CPU), the bundle's graph for it (`precision = "auto"`), how many sessions with how
//! many threads, the batch across cameras, and a warm-up call. The pipeline and
//! `stpm bench --pipeline` ask it; it knows nothing of cameras.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::batch::MAX_BATCH;
use super::{Engine, EngineError, EngineOptions, ExecutionProvider, ProviderRequest};
use crate::bundle::{Bundle, BundleError, Manifest};
use crate::preprocess;

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// `[model]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Bundle directory written by `stpm train`, e.g. `engines/demo`.
    pub bundle: PathBuf,
    /// Execution provider: `auto`, `cpu`, `cuda` or `tensorrt`.
    #[serde(default = "default_provider")]
    pub provider: String,
    /// ONNX Runtime intra-op threads of each session; 0 = the cores shared out between the
    /// sessions (one session: one per core).
    #[serde(default)]
    pub threads: usize,
    /// Inference sessions, each with its own analyser thread per camera: with 2, a camera's next
    /// frame is scored while the previous one still is (frame-level parallelism), and two cameras
    /// are scored at once. 0 (the default) is [`AUTO_CPU_SESSIONS`] on the CPU; GPU providers
    /// use 1 (see [`ModelConfig::sessions_on`]).
    #[serde(default)]
    pub sessions: usize,
    /// Which of the bundle's graphs runs: `auto` (the INT8 graph on the CPU when the bundle has
    /// one, else fp32), `fp32` (model.onnx) or `int8` (after `stpm export --precision int8`).
    #[serde(default)]
    pub precision: crate::bundle::PrecisionChoice,
    /// Most images per inference call, gathered from the cameras' frames that wait for the same
    /// session (batched inference across cameras). 0 (the default) is 1 for now, on every provider
    /// (see [`ModelConfig::batch`]).
    #[serde(default)]
    pub batch: usize,
    /// How long the first frame of a batch waits for the frames other cameras on its session have
    /// in hand (milliseconds; cameras waiting for their next frame are not waited for); a batch
    /// goes as soon as those are in.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// `stpm run` swaps the bundle in again whenever its `stpm.toml` changes (a new `stpm train`
    /// or `stpm calibrate` into the same folder), checked every 2 s.
    #[serde(default)]
    pub watch: bool,
}

fn default_batch_wait_ms() -> u64 {
    10
}

fn default_provider() -> String {
    "auto".into()
}

/// Upper bound of `model.sessions` (each session holds its own copy of the weights).
pub const MAX_SESSIONS: usize = 16;

/// Sessions of `model.sessions = 0` on the CPU. On 2 cores, two single-threaded sessions kept
/// the cores busier than one with two threads: `stpm bench --pipeline` on the INT8 demo bundle
/// and a 640×480 file, 114–118 against 90–97 frames/s, with about the same latency at 25
/// frames/s (p95 median 19.7 against 18.7 ms over 5 runs; docs/results.md).
pub const AUTO_CPU_SESSIONS: usize = 2;

impl ModelConfig {
    /// The most images per inference call: `batch`, or 1 for 0 (auto). On the CPU a batch of N
    /// costs N times one image and only adds the wait, and on a GPU batching across cameras was
    /// measured slower than one by one (docs/results.md), so auto batches nowhere until that
    /// is fixed. An explicit value still batches.
    pub fn batch(&self) -> usize {
        match self.batch {
            0 => 1,
            n => n.min(MAX_BATCH),
        }
    }

    /// The sessions a run opens: on the CPU `sessions`, or [`AUTO_CPU_SESSIONS`] for 0; on a GPU
    /// provider one (it runs batches, not frames side by side).
    pub fn sessions_on(&self, cpu: bool) -> usize {
        match (cpu, self.sessions) {
            (false, _) => 1,
            (true, 0) => AUTO_CPU_SESSIONS,
            (true, n) => n,
        }
    }
}

/// The settings of one of a run's `sessions` sessions: `[model]`'s threads (0: the cores shared
/// out between the sessions), and intra-op threads that sleep between calls, since decoding,
/// drawing and encoding share the cores.
pub fn session_options(
    model: &ModelConfig,
    request: ProviderRequest,
    sessions: usize,
) -> EngineOptions {
    EngineOptions {
        threads: super::threads_per_session(model.threads, sessions),
        provider: request,
        sleep_when_idle: true,
        // What TensorRT optimises for, should the session be on a GPU.
        batch: model.batch(),
        ..EngineOptions::default()
    }
}

/// A run's warmed-up sessions and what was chosen, for the start line.
pub struct Sessions {
    pub bundle: Bundle,
    /// The manifest with the calibration of the graph that runs.
    pub manifest: Arc<Manifest>,
    pub engines: Vec<Engine>,
    pub provider: ExecutionProvider,
    pub provider_reason: String,
    pub precision_reason: String,
    /// Most images per call (`ModelConfig::batch`).
    pub batch: usize,
}

impl Sessions {
    /// Opens and warms up the sessions `model` asks for. Fails fast
    /// (before the bundle is read) on a provider this build or machine cannot run.
    pub fn open(model: &ModelConfig) -> Result<Self, SelectError> {
        let request: ProviderRequest = model.provider.parse()?;
        let plan = super::resolve_provider(request)?;
        let cpu_only = plan.candidates == [ExecutionProvider::Cpu];
        let (mut bundle, mut precision_reason) =
            Bundle::open_choosing(&model.bundle, model.precision, cpu_only)?;
        // Sessions share out the cores only on the CPU, so size the first one for that when known.
        let first_sessions = model.sessions_on(cpu_only);
        let options = |sessions| session_options(model, request, sessions);
        let mut engine = Engine::for_bundle(&bundle, options(first_sessions))?;
        let provider = engine.provider();
        let provider_reason = engine.provider_choice().reason.clone();
        let mut reopen = false;
        if !cpu_only && provider == ExecutionProvider::Cpu {
            // `auto` fell back to the CPU: `precision = "auto"` now chooses for the CPU.
            let (chosen, reason) = bundle.clone().choosing(model.precision, true)?;
            reopen = chosen.precision != bundle.precision;
            (bundle, precision_reason) = (chosen, reason);
        }
        // The workers read the calibration of the graph that runs.
        let mut manifest = bundle.manifest.clone();
        manifest.calibration = bundle.calibration().clone();
        let manifest = Arc::new(manifest);
        let on_cpu = provider == ExecutionProvider::Cpu;
        if !on_cpu && model.sessions > 1 {
            log::warn!(
                "model.sessions = {}: the {provider} provider runs one session (frame-level parallelism is for the CPU)",
                model.sessions
            );
        }
        let sessions = model.sessions_on(on_cpu);
        let mut engines = Vec::with_capacity(sessions);
        if sessions != first_sessions || reopen {
            // `auto` fell back to the CPU: re-open with the cores shared out between the sessions
            // (and the graph `precision = "auto"` chose for the CPU).
            engine = Engine::for_bundle(&bundle, options(sessions))?;
        }
        engines.push(engine);
        for _ in 1..sessions {
            engines.push(Engine::for_bundle(&bundle, options(sessions))?);
        }
        let batch = model.batch();
        for engine in &mut engines {
            warm_up(engine, &manifest, batch)?;
        }
        Ok(Self {
            bundle,
            manifest,
            engines,
            provider,
            provider_reason,
            precision_reason,
            batch,
        })
    }
}

/// One call on a mid-grey frame (and one of a full batch, when batching), so that ONNX Runtime's
/// first-call set-up does not land on the first camera frames.
fn warm_up(engine: &mut Engine, manifest: &Manifest, batch: usize) -> Result<(), EngineError> {
    let [h, w] = manifest.model.input_size;
    let grey = preprocess::RgbFrame {
        width: w,
        height: h,
        pixels: vec![128; w * h * 3],
    };
    let input = preprocess::to_chw(&grey, [h, w], &manifest.normalisation);
    engine.run(&input, 1)?;
    if batch > 1 {
        engine.run(&input.repeat(batch), batch)?;
    }
    Ok(())
}
