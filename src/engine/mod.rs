//! Running a bundle's `model.onnx`: finding and loading the ONNX Runtime library, creating sessions,
//! and turning input batches into anomaly maps and scores. The one inference path every command uses.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use crate::export::{INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT};

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
    /// A session exactly as ONNX Runtime's defaults make it (no settings of ours): the baseline
    /// `stpm bench` compares against, the way an exported model is usually run.
    pub plain: bool,
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
}

impl Engine {
    /// Opens `model` (an STPM graph for `size` = [H, W] inputs).
    pub fn open(
        model: &Path,
        size: [usize; 2],
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let env = environment()?;
        let open_error = |message: String| EngineError::Open {
            path: model.to_path_buf(),
            message,
        };
        let mut builder = Session::builder(env).map_err(|e| open_error(e.to_string()))?;
        if !options.plain {
            builder = builder
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| open_error(e.to_string()))?;
        }
        if options.threads > 0 && !options.plain {
            builder = builder
                .with_intra_threads(options.threads)
                .map_err(|e| open_error(e.to_string()))?;
        }
        let session = builder
            .commit_from_file(model)
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Self { session, size })
    }

    pub fn input_size(&self) -> [usize; 2] {
        self.size
    }

    /// Runs a batch of `n` preprocessed images (NCHW, contiguous).
    pub fn run(&mut self, batch: &[f32], n: usize) -> Result<Scores, EngineError> {
        let [h, w] = self.size;
        let expected = n * 3 * h * w;
        if batch.len() != expected || n == 0 {
            return Err(EngineError::InputSize {
                got: batch.len(),
                expected,
                n,
                h,
                w,
            });
        }
        let input = TensorRef::from_array_view(([n, 3, h, w], batch))
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![INPUT_NAME => input])
            .map_err(|e| EngineError::Run(e.to_string()))?;
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
}
