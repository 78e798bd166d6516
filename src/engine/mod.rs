//! Running a bundle's `model.onnx`: finding and loading the ONNX Runtime library, creating sessions
//! on an execution provider (`provider`: the one place that decides CPU, CUDA or TensorRT), and
//! turning input batches into anomaly maps and scores. The one inference path every command uses.

pub mod provider;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use crate::export::{INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT};
pub use provider::{ExecutionProvider, ProviderChoice, ProviderRequest, resolve_provider};

/// Environment variable naming the ONNX Runtime shared library explicitly.
pub const ORT_LIB_ENV: &str = "STPM_ORT_LIB";
/// Where `scripts/setup.sh` puts the library, relative to the repository root.
pub const ORT_LIB_RELATIVE: &str = "engines/runtime/libonnxruntime.so";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime library not found (looked in: {}). Run scripts/setup.sh, or set {ORT_LIB_ENV} to libonnxruntime.so",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    RuntimeNotFound { searched: Vec<PathBuf> },
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    RuntimeLoad { path: PathBuf, message: String },
    #[error("cannot open model {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("`{0}` is not an execution provider: use auto, cpu, cuda or tensorrt")]
    UnknownProvider(String),
    #[error("provider `{requested}` is not available{}: {reason}",
        if cfg!(feature = "gpu") { "" } else { " in this build" })]
    ProviderUnavailable {
        requested: ProviderRequest,
        reason: String,
    },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("input batch has {got} values, expected {expected} for [{n}, 3, {h}, {w}]")]
    InputSize {
        got: usize,
        expected: usize,
        n: usize,
        h: usize,
        w: usize,
    },
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process and returns the shared environment.
pub fn environment() -> Result<&'static Environment, EngineError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let path = match std::env::var_os(ORT_LIB_ENV) {
            Some(explicit) => PathBuf::from(explicit),
            None => crate::paths::find_installed(ORT_LIB_RELATIVE)
                .map_err(|searched| EngineError::RuntimeNotFound { searched }.to_string())?,
        };
        let path = &path;
        let builder = ort::init_from(path).map_err(|e| {
            EngineError::RuntimeLoad {
                path: path.clone(),
                message: e.to_string(),
            }
            .to_string()
        })?;
        builder.with_name("stpm").build().map_err(|e| {
            EngineError::RuntimeLoad {
                path: path.clone(),
                message: e.to_string(),
            }
            .to_string()
        })
    });
    result.as_ref().map_err(|message| EngineError::RuntimeLoad {
        path: PathBuf::from("libonnxruntime"),
        message: message.clone(),
    })
}

/// Session settings; defaults are ONNX Runtime's own unless stated.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineOptions {
    /// Intra-op threads; 0 lets ONNX Runtime choose (one per core).
    pub threads: usize,
    /// A session with ONNX Runtime's default settings (no optimisation level or threads of ours, on
    /// the requested provider): the baseline `stpm bench` compares against, the way an exported
    /// model is usually run.
    pub plain: bool,
    /// Intra-op threads sleep between calls instead of spin-waiting for the next one (ONNX
    /// Runtime's default): for a session that shares the cores with other work, as `stpm run`'s
    /// decoding, overlay and encoding threads do.
    pub sleep_when_idle: bool,
    /// Execution provider to use. The default is `cpu`, so offline commands (train, eval, infer) give
    /// the same numbers on every machine; `stpm run` and `stpm bench` pass the user's choice.
    pub provider: ProviderRequest,
}

/// Anomaly maps [N, 1, H, W] (flattened) and image scores [N] of one batch.
#[derive(Debug, Clone)]
pub struct Scores {
    pub maps: Vec<f32>,
    pub scores: Vec<f32>,
}

/// One ONNX Runtime session on a bundle's graph.
pub struct Engine {
    session: Session,
    size: [usize; 2],
    provider: ProviderChoice,
}

impl Engine {
    /// Opens `model` (an STPM graph for `size` = [H, W] inputs) on the provider `options.provider`
    /// resolves to. An explicit GPU provider that cannot run is an error, never a silent CPU session;
    /// `auto` takes the first that opens (TensorRT, CUDA, CPU) and records why the others did not.
    pub fn open(
        model: &Path,
        size: [usize; 2],
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let env = environment()?;
        let plan = resolve_provider(options.provider)?;
        let mut skipped = plan.skipped;
        for provider in plan.candidates {
            match Self::session(env, model, options, provider) {
                Ok(session) => {
                    let reason = provider::describe(options.provider, provider, &skipped);
                    return Ok(Self {
                        session,
                        size,
                        provider: ProviderChoice { provider, reason },
                    });
                }
                // `auto` moves on to the next provider and says why; anything else is the answer.
                Err(EngineError::ProviderUnavailable { reason, .. })
                    if options.provider == ProviderRequest::Auto =>
                {
                    skipped.push((provider, reason));
                }
                Err(error) => return Err(error),
            }
        }
        Err(EngineError::ProviderUnavailable {
            requested: options.provider,
            reason: provider::skipped_text(&skipped),
        })
    }

    /// One session on exactly `provider`; a GPU provider that fails to register is an error.
    fn session(
        env: &Environment,
        model: &Path,
        options: EngineOptions,
        provider: ExecutionProvider,
    ) -> Result<Session, EngineError> {
        let open_error = |message: String| EngineError::Open {
            path: model.to_path_buf(),
            message,
        };
        let mut builder = Session::builder(env).map_err(|e| open_error(e.to_string()))?;
        if provider != ExecutionProvider::Cpu {
            builder = provider::register(builder, provider, model, options.provider)?;
        }
        if !options.plain {
            builder = builder
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| open_error(e.to_string()))?;
        }
        if options.sleep_when_idle && !options.plain {
            builder = builder
                .with_intra_op_spinning(false)
                .map_err(|e| open_error(e.to_string()))?;
        }
        if options.threads > 0 && !options.plain {
            builder = builder
                .with_intra_threads(options.threads)
                .map_err(|e| open_error(e.to_string()))?;
        }
        builder.commit_from_file(model).map_err(|e| {
            if provider == ExecutionProvider::Cpu {
                open_error(e.to_string())
            } else {
                EngineError::ProviderUnavailable {
                    requested: options.provider,
                    reason: format!("a {provider} session on {} failed: {e}", model.display()),
                }
            }
        })
    }

    pub fn input_size(&self) -> [usize; 2] {
        self.size
    }

    /// The execution provider this session runs on (what ONNX Runtime registered, not what was asked).
    pub fn provider(&self) -> ExecutionProvider {
        self.provider.provider
    }

    /// The provider and why it was chosen, for the start-up log.
    pub fn provider_choice(&self) -> &ProviderChoice {
        &self.provider
    }

    /// [H, W] when `len` values are `n` images of this session's input size, else the error.
    fn check_input(&self, len: usize, n: usize) -> Result<[usize; 2], EngineError> {
        let [h, w] = self.size;
        let expected = n * 3 * h * w;
        if len != expected || n == 0 {
            return Err(EngineError::InputSize {
                got: len,
                expected,
                n,
                h,
                w,
            });
        }
        Ok([h, w])
    }

    /// Runs a batch of `n` preprocessed images (NCHW, contiguous).
    pub fn run(&mut self, batch: &[f32], n: usize) -> Result<Scores, EngineError> {
        let [h, w] = self.check_input(batch.len(), n)?;
        let input = TensorRef::from_array_view(([n, 3, h, w], batch))
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![INPUT_NAME => input])
            .map_err(|e| EngineError::Run(e.to_string()))?;
        scores_of(&outputs)
    }

    /// Runs `n` images that are already on the GPU (`input`: NCHW float32 in device memory, as the
    /// `gpu` preprocessing writes them on `stream`): ONNX Runtime's CUDA or TensorRT provider reads
    /// them in place, with no copy through the host; the map and scores come back to the host.
    #[cfg(feature = "gpu")]
    pub fn run_device(
        &mut self,
        input: &cudarc::driver::CudaSlice<f32>,
        stream: &cudarc::driver::CudaStream,
        n: usize,
    ) -> Result<Scores, EngineError> {
        use cudarc::driver::DevicePtr;
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        use ort::value::{Shape, TensorRefMut};

        if self.provider.provider == ExecutionProvider::Cpu {
            return Err(EngineError::Run(
                "a GPU-resident input needs a cuda or tensorrt session; this one runs on the cpu"
                    .into(),
            ));
        }
        let [h, w] = self.check_input(input.len(), n)?;
        let run_error = |e: String| EngineError::Run(e);
        // ONNX Runtime reads the tensor on its own stream: the preprocessing must be done first.
        stream
            .synchronize()
            .map_err(|e| run_error(format!("waiting for the preprocessing: {e}")))?;
        let (pointer, _record) = input.device_ptr(stream);
        let info = MemoryInfo::new(
            AllocationDevice::CUDA,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| run_error(e.to_string()))?;
        let dims = [n, 3, h, w].map(|d| d as i64);
        // SAFETY: `pointer` addresses n·3·h·w float32 values of device 0 (length checked above)
        // owned by `input`, which outlives this call and so the tensor and the run that reads it.
        let tensor = unsafe {
            TensorRefMut::<f32>::from_raw(info, pointer as usize as *mut _, Shape::new(dims))
        }
        .map_err(|e| run_error(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![INPUT_NAME => tensor])
            .map_err(|e| run_error(e.to_string()))?;
        scores_of(&outputs)
    }
}

/// The map and scores of a run, copied out of ONNX Runtime's outputs.
fn scores_of(outputs: &ort::session::SessionOutputs) -> Result<Scores, EngineError> {
    let (_, maps) = outputs[MAP_OUTPUT]
        .try_extract_tensor::<f32>()
        .map_err(|e| EngineError::Run(e.to_string()))?;
    let (_, scores) = outputs[SCORE_OUTPUT]
        .try_extract_tensor::<f32>()
        .map_err(|e| EngineError::Run(e.to_string()))?;
    Ok(Scores {
        maps: maps.to_vec(),
        scores: scores.to_vec(),
    })
}
