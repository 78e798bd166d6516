//! Running a bundle's `model.onnx`: finding and loading the ONNX Runtime library, creating sessions
//! on an execution provider (`provider`: the one place that decides CPU, CUDA or TensorRT), and
//! turning input batches into anomaly maps and scores. The one inference path every command uses.

pub mod batch;
pub mod provider;
pub mod select;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use crate::bundle::{Bundle, Precision};
use crate::onnx::{INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT};
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

/// ONNX Runtime graph passes turned off for INT8 graphs (see `EngineOptions::int8`).
const INT8_DISABLED_OPTIMIZERS: &str = "NchwcTransformer";

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

/// Intra-op threads for each of `sessions` sessions that run at once: `threads` when given, else
/// the cores shared out between them (at least 1 each). One session with 0 keeps ONNX Runtime's
/// own choice (one per core).
pub fn threads_per_session(threads: usize, sessions: usize) -> usize {
    if threads > 0 || sessions <= 1 {
        return threads;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / sessions).max(1)
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
    /// The model is an INT8 (QDQ) graph: ONNX Runtime's NCHWc layout pass is turned off. It speeds
    /// up fp32 backbones; in an INT8 graph only the stems and the 1-channel blur are fp32 Convs, and
    /// it pads the blur to 16 channels and reorders its output. Measured net effect on the brick
    /// bundle (1 thread, CPU time per image): 12.2 ms off, 12.5 ms on; a small gain, kept as the
    /// place for INT8-specific session settings.
    pub int8: bool,
    /// The INT8 graph is TensorRT's kind (int8 activations with zero point 0, float biases; `stpm
    /// export --format tensorrt --precision int8`). A TensorRT session on an INT8 graph of any other
    /// kind is refused (TensorRT cannot build uint8 Q/DQ pairs), so `auto` moves on to CUDA.
    pub int8_tensorrt: bool,
    /// The batch size a TensorRT engine is optimised for (0 or 1: single images); every engine
    /// takes 1 to [`batch::MAX_BATCH`] images (its optimisation profile).
    pub batch: usize,
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
            match Self::session(env, model, size, options, provider) {
                Ok(session) => {
                    let reason =
                        provider::describe(options.provider, provider, &skipped, options.int8);
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

    /// Opens the graph `bundle` was opened for (`Bundle::open_as`), with the session settings of its
    /// precision.
    pub fn for_bundle(bundle: &Bundle, options: EngineOptions) -> Result<Self, EngineError> {
        let int8 = bundle.precision == Precision::Int8;
        let options = EngineOptions {
            int8,
            int8_tensorrt: int8 && bundle.int8_is_for_tensorrt(),
            ..options
        };
        Self::open(
            &bundle.model_path(),
            bundle.manifest.model.input_size,
            options,
        )
    }

    /// One session on exactly `provider`; a GPU provider that fails to register is an error.
    fn session(
        env: &Environment,
        model: &Path,
        size: [usize; 2],
        options: EngineOptions,
        provider: ExecutionProvider,
    ) -> Result<Session, EngineError> {
        let open_error = |message: String| EngineError::Open {
            path: model.to_path_buf(),
            message,
        };
        if provider == ExecutionProvider::TensorRt && options.int8 && !options.int8_tensorrt {
            let bundle = model.parent().unwrap_or(Path::new("."));
            return Err(EngineError::ProviderUnavailable {
                requested: options.provider,
                reason: format!(
                    "the INT8 graph {} has uint8 or asymmetric activations, which TensorRT \
                     cannot build; `stpm export --model {} --format tensorrt --precision int8` \
                     makes a symmetric one",
                    model.display(),
                    bundle.display()
                ),
            });
        }
        let mut builder = Session::builder(env).map_err(|e| open_error(e.to_string()))?;
        if provider != ExecutionProvider::Cpu {
            builder = provider::register(builder, provider, model, size, options)?;
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
        if options.int8 && !options.plain {
            builder = builder
                .with_disabled_optimizers(INT8_DISABLED_OPTIMIZERS)
                .map_err(|e| open_error(e.to_string()))?;
        }
        if options.threads > 0 && !options.plain {
            builder = builder
                .with_intra_threads(options.threads)
                .map_err(|e| open_error(e.to_string()))?;
        }
        let session = builder.commit_from_file(model).map_err(|e| {
            if provider == ExecutionProvider::Cpu {
                open_error(e.to_string())
            } else {
                EngineError::ProviderUnavailable {
                    requested: options.provider,
                    reason: format!("a {provider} session on {} failed: {e}", model.display()),
                }
            }
        })?;
        check_names(&session).map_err(open_error)?;
        Ok(session)
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
        scores_of(&outputs, n, [h, w])
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

        // ONNX Runtime reads the tensor on its own stream: the preprocessing must be done first.
        stream
            .synchronize()
            .map_err(|e| EngineError::Run(format!("waiting for the preprocessing: {e}")))?;
        let (pointer, _record) = input.device_ptr(stream);
        // SAFETY: `pointer` addresses `input.len()` float32 values of device 0, owned by `input`,
        // which outlives this call; the stream that wrote them has finished.
        unsafe { self.run_device_at(pointer, input.len(), n) }
    }

    /// [`Engine::run_device`] on `len` float32 values at the device address `pointer` (the
    /// batcher's gathered batch, or one camera's own input).
    ///
    /// # Safety
    /// `pointer` must address at least `len` float32 values in device 0's memory, written by
    /// work that has finished, and stay valid and unchanged until this returns.
    #[cfg(feature = "gpu")]
    pub unsafe fn run_device_at(
        &mut self,
        pointer: u64,
        len: usize,
        n: usize,
    ) -> Result<Scores, EngineError> {
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        use ort::value::{Shape, TensorRefMut};

        if self.provider.provider == ExecutionProvider::Cpu {
            return Err(EngineError::Run(
                "a GPU-resident input needs a cuda or tensorrt session; this one runs on the cpu"
                    .into(),
            ));
        }
        let [h, w] = self.check_input(len, n)?;
        let run_error = |e: String| EngineError::Run(e);
        let info = MemoryInfo::new(
            AllocationDevice::CUDA,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(|e| run_error(e.to_string()))?;
        let dims = [n, 3, h, w].map(|d| d as i64);
        // SAFETY: the caller guarantees `pointer` addresses n·3·h·w float32 values of device 0
        // (length checked above) that stay valid for the run that reads them.
        let tensor = unsafe {
            TensorRefMut::<f32>::from_raw(info, pointer as usize as *mut _, Shape::new(dims))
        }
        .map_err(|e| run_error(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![INPUT_NAME => tensor])
            .map_err(|e| run_error(e.to_string()))?;
        scores_of(&outputs, n, [h, w])
    }
}

/// Whether a session's graph has the input and outputs of an STPM graph; the message names the
/// missing ones and what the graph has instead (a graph renamed or exported by another tool).
fn check_names(session: &Session) -> Result<(), String> {
    let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let mut missing = Vec::new();
    if !inputs.contains(&INPUT_NAME) {
        missing.push(format!("input `{INPUT_NAME}`"));
    }
    for name in [MAP_OUTPUT, SCORE_OUTPUT] {
        if !outputs.contains(&name) {
            missing.push(format!("output `{name}`"));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "not an STPM graph: no {} (its inputs: {}; outputs: {})",
        missing.join(", no "),
        inputs.join(", "),
        outputs.join(", ")
    ))
}

/// The map and scores of a run of `n` images of `[h, w]`, copied out of ONNX Runtime's outputs; a
/// graph whose map is not one value per input pixel (or not one score per image) is an error here,
/// not a wrong overlay or a zone summary that finds nothing later.
fn scores_of(
    outputs: &ort::session::SessionOutputs,
    n: usize,
    [h, w]: [usize; 2],
) -> Result<Scores, EngineError> {
    let output = |name: &str| {
        outputs
            .get(name)
            .ok_or_else(|| EngineError::Run(format!("the graph has no output `{name}`")))
    };
    let (_, maps) = output(MAP_OUTPUT)?
        .try_extract_tensor::<f32>()
        .map_err(|e| EngineError::Run(e.to_string()))?;
    let (_, scores) = output(SCORE_OUTPUT)?
        .try_extract_tensor::<f32>()
        .map_err(|e| EngineError::Run(e.to_string()))?;
    if maps.len() != n * h * w || scores.len() != n {
        return Err(EngineError::Run(format!(
            "the graph returned {} map values and {} scores for {n} images of {h}×{w}; expected \
             {} and {n} (a map the size of its input)",
            maps.len(),
            scores.len(),
            n * h * w
        )));
    }
    Ok(Scores {
        maps: maps.to_vec(),
        scores: scores.to_vec(),
    })
}

/// A CPU session on a graph held in memory that returns named intermediate tensors: how INT8
/// calibration looks inside the fp32 graph. Not an inference path (no provider choice, no scores).
pub struct Probe {
    session: Session,
    size: [usize; 2],
}

impl Probe {
    /// Opens `model` (ONNX bytes whose graph outputs include the tensors to probe).
    pub fn open(model: &[u8], size: [usize; 2], label: &Path) -> Result<Self, EngineError> {
        let open_error = |e: ort::Error| EngineError::Open {
            path: label.to_path_buf(),
            message: e.to_string(),
        };
        let env = environment()?;
        let mut builder = Session::builder(env).map_err(open_error)?;
        let session = builder.commit_from_memory(model).map_err(open_error)?;
        Ok(Self { session, size })
    }

    /// Runs one image (NCHW, batch 1) and hands each tensor of `names` to `visit` (index, values).
    pub fn run(
        &mut self,
        image: &[f32],
        names: &[String],
        mut visit: impl FnMut(usize, &[f32]),
    ) -> Result<(), EngineError> {
        let [h, w] = self.size;
        if image.len() != 3 * h * w {
            return Err(EngineError::InputSize {
                got: image.len(),
                expected: 3 * h * w,
                n: 1,
                h,
                w,
            });
        }
        let input = TensorRef::from_array_view(([1, 3, h, w], image))
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![INPUT_NAME => input])
            .map_err(|e| EngineError::Run(e.to_string()))?;
        for (index, name) in names.iter().enumerate() {
            let value = outputs
                .get(name.as_str())
                .ok_or_else(|| EngineError::Run(format!("the graph has no output `{name}`")))?;
            let (_, values) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| EngineError::Run(format!("`{name}`: {e}")))?;
            visit(index, values);
        }
        Ok(())
    }
}

/// Operator counts of `model` after ONNX Runtime's CPU graph optimisations as an `Engine` with
/// `int8` applies them (what the session really runs, e.g. whether QDQ pairs became QLinearConv).
/// For diagnostics and tests.
pub fn optimised_ops(
    model: &Path,
    int8: bool,
) -> Result<std::collections::BTreeMap<String, usize>, EngineError> {
    use prost::Message;
    let open_error = |message: String| EngineError::Open {
        path: model.to_path_buf(),
        message,
    };
    let env = environment()?;
    let dump = std::env::temp_dir().join(format!(
        "stpm-optimised-{}-{}.onnx",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut builder = Session::builder(env)
        .map_err(|e| open_error(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| open_error(e.to_string()))?
        .with_disabled_optimizers(if int8 { INT8_DISABLED_OPTIMIZERS } else { "" })
        .map_err(|e| open_error(e.to_string()))?
        .with_optimized_model_path(&dump)
        .map_err(|e| open_error(e.to_string()))?;
    let session = builder
        .commit_from_file(model)
        .map_err(|e| open_error(e.to_string()));
    let bytes = std::fs::read(&dump);
    let _ = std::fs::remove_file(&dump);
    drop(session?);
    let bytes = bytes.map_err(|e| open_error(format!("no optimised graph written: {e}")))?;
    let optimised = crate::onnx::proto::ModelProto::decode(bytes.as_slice())
        .map_err(|e| open_error(e.to_string()))?;
    let mut counts = std::collections::BTreeMap::new();
    for node in optimised.graph.iter().flat_map(|g| &g.node) {
        *counts.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    Ok(counts)
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid ONNX graph that is not an STPM one: `image` in, its maximum out as `peak`.
    fn foreign_graph(dir: &Path) -> PathBuf {
        use crate::onnx::graph::{GraphBuilder, attr_int, attr_ints, float_value_info};
        use crate::onnx::proto::{ModelProto, OperatorSetIdProto};
        let mut g = GraphBuilder::default();
        let attributes = vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 0)];
        g.node_named("ReduceMax", &[INPUT_NAME], attributes, "peak");
        let graph = g.finish(
            "other",
            vec![float_value_info(
                INPUT_NAME,
                &[None, Some(3), Some(16), Some(16)],
            )],
            vec![float_value_info("peak", &[None])],
        );
        let model = ModelProto {
            ir_version: crate::onnx::IR_VERSION,
            graph: Some(graph),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: crate::onnx::OPSET,
            }],
            ..Default::default()
        };
        let path = dir.join("model.onnx");
        crate::onnx::write_model(&model, &path).expect("written");
        path
    }

    #[test]
    fn a_graph_without_the_stpm_outputs_is_refused_when_opened() {
        let dir = tempfile::tempdir().expect("dir");
        let path = foreign_graph(dir.path());
        let options = EngineOptions {
            provider: ProviderRequest::Cpu,
            ..EngineOptions::default()
        };
        let message = Engine::open(&path, [16, 16], options)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("not an STPM graph")
                && message.contains("no output `anomaly_map`, no output `score`")
                && message.contains("outputs: peak"),
            "{message}"
        );
    }

    #[test]
    fn tensorrt_refuses_an_int8_graph_of_the_cpu_kind() {
        let env = environment().expect("ONNX Runtime");
        let options = EngineOptions {
            provider: ProviderRequest::Auto,
            int8: true,
            int8_tensorrt: false,
            ..EngineOptions::default()
        };
        let model = Path::new("/nonexistent/bundle/model.int8.onnx");
        let refused = Engine::session(env, model, [8, 8], options, ExecutionProvider::TensorRt);
        match refused {
            Err(EngineError::ProviderUnavailable { reason, .. }) => {
                assert!(
                    reason.contains("--format tensorrt --precision int8"),
                    "{reason}"
                );
                assert!(reason.contains("/nonexistent/bundle "), "{reason}");
            }
            other => panic!(
                "expected a refusal naming the export, got {:?}",
                other.err()
            ),
        }
    }
}
