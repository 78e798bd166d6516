//! Which ONNX Runtime execution provider a session runs on, and why: the one place that turns the
//! user's `auto`/`cpu`/`cuda`/`tensorrt` into providers to try. ONNX Runtime falls back to the CPU
//! silently when a GPU provider fails to register; here a failed registration is always an error.

use std::fmt;
use std::str::FromStr;

use super::EngineError;

/// An execution provider a session can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
    #[serde(rename = "tensorrt")]
    TensorRt,
}

impl ExecutionProvider {
    /// The name used in config, on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::TensorRt => "tensorrt",
        }
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked for (`model.provider`, `stpm bench --provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderRequest {
    /// The best that opens: TensorRT, then CUDA, then CPU.
    Auto,
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl ProviderRequest {
    pub fn name(self) -> &'static str {
        match self {
            ProviderRequest::Auto => "auto",
            ProviderRequest::Cpu => "cpu",
            ProviderRequest::Cuda => "cuda",
            ProviderRequest::TensorRt => "tensorrt",
        }
    }

    /// The request for exactly `provider`.
    pub fn exactly(provider: ExecutionProvider) -> Self {
        match provider {
            ExecutionProvider::Cpu => ProviderRequest::Cpu,
            ExecutionProvider::Cuda => ProviderRequest::Cuda,
            ExecutionProvider::TensorRt => ProviderRequest::TensorRt,
        }
    }
}

impl fmt::Display for ProviderRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ProviderRequest {
    type Err = EngineError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(ProviderRequest::Auto),
            "cpu" => Ok(ProviderRequest::Cpu),
            "cuda" => Ok(ProviderRequest::Cuda),
            "tensorrt" => Ok(ProviderRequest::TensorRt),
            other => Err(EngineError::UnknownProvider(other.to_string())),
        }
    }
}

/// The provider a session runs on and why, e.g. `cpu` because "auto: tensorrt: no CUDA driver …".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderChoice {
    pub provider: ExecutionProvider,
    pub reason: String,
}

/// The providers to try for a request, in order, and the ones ruled out before trying (with why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPlan {
    pub candidates: Vec<ExecutionProvider>,
    pub skipped: Vec<(ExecutionProvider, String)>,
}

/// Why a GPU provider cannot run here before any session is tried, or `None` when it may.
#[cfg(not(feature = "gpu"))]
fn gpu_unavailable() -> Option<String> {
    Some("GPU providers need the `gpu` feature (cargo build --release --features gpu)".into())
}

#[cfg(feature = "gpu")]
fn gpu_unavailable() -> Option<String> {
    crate::gpu::driver_missing()
}

/// Decides which providers to try for `request`; an explicit GPU request that cannot run here is
/// an error naming what is missing. Touches no CUDA library beyond checking that the driver exists.
pub fn resolve_provider(request: ProviderRequest) -> Result<ProviderPlan, EngineError> {
    let gpu = [ExecutionProvider::TensorRt, ExecutionProvider::Cuda];
    let plan = match (request, gpu_unavailable()) {
        (ProviderRequest::Cpu, _) => ProviderPlan {
            candidates: vec![ExecutionProvider::Cpu],
            skipped: Vec::new(),
        },
        (ProviderRequest::Auto, None) => ProviderPlan {
            candidates: vec![
                ExecutionProvider::TensorRt,
                ExecutionProvider::Cuda,
                ExecutionProvider::Cpu,
            ],
            skipped: Vec::new(),
        },
        (ProviderRequest::Auto, Some(why)) => ProviderPlan {
            candidates: vec![ExecutionProvider::Cpu],
            skipped: gpu.iter().map(|&p| (p, why.clone())).collect(),
        },
        (ProviderRequest::Cuda | ProviderRequest::TensorRt, Some(why)) => {
            return Err(EngineError::ProviderUnavailable {
                requested: request,
                reason: format!("{why}; use cpu or auto"),
            });
        }
        (ProviderRequest::Cuda, None) => ProviderPlan {
            candidates: vec![ExecutionProvider::Cuda],
            skipped: Vec::new(),
        },
        (ProviderRequest::TensorRt, None) => ProviderPlan {
            candidates: vec![ExecutionProvider::TensorRt],
            skipped: Vec::new(),
        },
    };
    Ok(plan)
}

/// "tensorrt: why; cuda: why" (the same reason given once for all).
pub(super) fn skipped_text(skipped: &[(ExecutionProvider, String)]) -> String {
    let mut parts: Vec<(Vec<&str>, &str)> = Vec::new();
    for (provider, why) in skipped {
        match parts.iter_mut().find(|(_, reason)| *reason == why.as_str()) {
            Some((names, _)) => names.push(provider.name()),
            None => parts.push((vec![provider.name()], why)),
        }
    }
    parts
        .iter()
        .map(|(names, why)| format!("{}: {why}", names.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The start-up log's reason for running on `chosen`.
pub(super) fn describe(
    request: ProviderRequest,
    chosen: ExecutionProvider,
    skipped: &[(ExecutionProvider, String)],
    int8: bool,
) -> String {
    let mut reason = match request {
        ProviderRequest::Auto => format!("auto: {chosen} is the best provider that opened"),
        _ => "requested".to_string(),
    };
    if chosen == ExecutionProvider::TensorRt {
        reason.push_str(if int8 {
            ", INT8 (the graph's Q/DQ) and FP16, engine cache in <bundle>/trt"
        } else {
            ", FP16, engine cache in <bundle>/trt"
        });
    }
    if !skipped.is_empty() {
        reason.push_str("; not used: ");
        reason.push_str(&skipped_text(skipped));
    }
    reason
}

/// Adds `provider` (not the CPU) to `builder` so that a failed registration is an error.
#[cfg(not(feature = "gpu"))]
pub(super) fn register(
    _builder: ort::session::builder::SessionBuilder,
    provider: ExecutionProvider,
    _model: &std::path::Path,
    _size: [usize; 2],
    options: super::EngineOptions,
) -> Result<ort::session::builder::SessionBuilder, EngineError> {
    Err(EngineError::ProviderUnavailable {
        requested: options.provider,
        reason: gpu_unavailable().unwrap_or_else(|| format!("{provider} is not compiled in")),
    })
}

/// The TensorRT optimisation profile of the `image` input (`name:NxCxHxW`, min/opt/max): 1 to
/// [`super::batch::MAX_BATCH`] images, optimised for `batch`. One fixed range, so that any batch
/// a pipeline gathers runs on the engine built (and cached) once, instead of TensorRT building a
/// new one for each new batch size.
pub fn tensorrt_profile(size: [usize; 2], batch: usize) -> [String; 3] {
    let [h, w] = size;
    let max = super::batch::MAX_BATCH;
    let shape = |n: usize| format!("{}:{n}x3x{h}x{w}", crate::onnx::INPUT_NAME);
    [shape(1), shape(batch.clamp(1, max)), shape(max)]
}

/// Adds `provider` to `builder` with `error_on_failure`: TensorRT (FP16, and INT8 for an INT8
/// graph's Q/DQ pairs; engine and timing cache in `<bundle>/trt/`) with CUDA behind it for the nodes
/// TensorRT does not take, or CUDA alone.
#[cfg(feature = "gpu")]
pub(super) fn register(
    builder: ort::session::builder::SessionBuilder,
    provider: ExecutionProvider,
    model: &std::path::Path,
    size: [usize; 2],
    options: super::EngineOptions,
) -> Result<ort::session::builder::SessionBuilder, EngineError> {
    use ort::ep::{self, ExecutionProvider as _};

    let unavailable = |reason: String| EngineError::ProviderUnavailable {
        requested: options.provider,
        reason,
    };
    let compiled_in = |name: &str, available: ort::Result<bool>| match available {
        Ok(true) => Ok(()),
        Ok(false) => Err(unavailable(format!(
            "the ONNX Runtime library has no {name} (it is the CPU build; use the library of \
             the onnxruntime-gpu wheel, via {})",
            super::ORT_LIB_ENV
        ))),
        Err(e) => Err(unavailable(e.to_string())),
    };
    compiled_in("CUDAExecutionProvider", ep::CUDA::is_available())?;
    // Full float32 convolutions, not TensorFloat-32 (ONNX Runtime's default): the model is trained
    // and its threshold calibrated in float32, and with TF32 the map depended on the batch size
    // (cuDNN picks kernels per shape). A plain session keeps ONNX Runtime's default, so `stpm
    // bench`'s ratio against it shows what this costs.
    let cuda = if options.plain {
        ep::CUDA::default()
    } else {
        ep::CUDA::default().with_tf32(false)
    };
    let cuda = cuda.build().error_on_failure();
    let providers = match provider {
        ExecutionProvider::TensorRt => {
            compiled_in("TensorrtExecutionProvider", ep::TensorRT::is_available())?;
            let cache = model
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("trt");
            std::fs::create_dir_all(&cache).map_err(|e| {
                unavailable(format!(
                    "cannot create the engine cache {}: {e}",
                    cache.display()
                ))
            })?;
            let cache = cache.display().to_string();
            let [min, opt, max] = tensorrt_profile(size, options.batch);
            let tensorrt = ep::TensorRT::default()
                .with_profile_min_shapes(min)
                .with_profile_opt_shapes(opt)
                .with_profile_max_shapes(max)
                .with_device_id(0)
                .with_fp16(true)
                .with_int8(options.int8)
                .with_engine_cache(true)
                .with_engine_cache_path(&cache)
                .with_timing_cache(true)
                .with_timing_cache_path(&cache)
                .build()
                .error_on_failure();
            vec![tensorrt, cuda]
        }
        ExecutionProvider::Cuda => vec![cuda],
        ExecutionProvider::Cpu => return Ok(builder),
    };
    builder
        .with_execution_providers(providers)
        .map_err(|e| unavailable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_unknown_names_list_the_choices() {
        for name in ["auto", "cpu", "cuda", "tensorrt"] {
            let request: ProviderRequest = name.parse().expect("known provider");
            assert_eq!(request.name(), name);
        }
        let message = "gpu"
            .parse::<ProviderRequest>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("`gpu`") && message.contains("auto, cpu, cuda or tensorrt"));
        assert_eq!(
            serde_json::to_value(ExecutionProvider::TensorRt).ok(),
            Some(serde_json::json!("tensorrt"))
        );
    }

    #[test]
    fn the_tensorrt_profile_spans_one_to_the_largest_batch() {
        assert_eq!(
            tensorrt_profile([256, 320], 4),
            [
                "image:1x3x256x320".to_string(),
                "image:4x3x256x320".to_string(),
                "image:32x3x256x320".to_string()
            ]
        );
        assert_eq!(tensorrt_profile([8, 8], 0)[1], "image:1x3x8x8");
        assert_eq!(tensorrt_profile([8, 8], 99)[1], "image:32x3x8x8");
    }

    #[test]
    fn cpu_is_always_possible() {
        let plan = resolve_provider(ProviderRequest::Cpu).expect("cpu");
        assert_eq!(plan.candidates, vec![ExecutionProvider::Cpu]);
        assert!(plan.skipped.is_empty());
    }

    #[test]
    fn auto_ends_on_the_cpu_and_explicit_gpu_fails_loudly_without_a_gpu() {
        let auto = resolve_provider(ProviderRequest::Auto).expect("auto never fails to plan");
        assert_eq!(auto.candidates.last(), Some(&ExecutionProvider::Cpu));
        match gpu_unavailable() {
            Some(why) => {
                eprintln!("no GPU provider possible here ({why}): checking the CPU-only answers");
                assert_eq!(auto.candidates, vec![ExecutionProvider::Cpu]);
                let reason = describe(
                    ProviderRequest::Auto,
                    ExecutionProvider::Cpu,
                    &auto.skipped,
                    false,
                );
                assert!(reason.contains("tensorrt, cuda: "), "{reason}");
                for request in [ProviderRequest::Cuda, ProviderRequest::TensorRt] {
                    let message = resolve_provider(request)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    assert!(
                        message.contains(&format!("`{request}` is not available")),
                        "{message}"
                    );
                    assert!(message.contains(&why), "{message}");
                }
            }
            None => {
                assert_eq!(
                    auto.candidates,
                    vec![
                        ExecutionProvider::TensorRt,
                        ExecutionProvider::Cuda,
                        ExecutionProvider::Cpu
                    ]
                );
                let plan = resolve_provider(ProviderRequest::TensorRt).expect("driver present");
                assert_eq!(plan.candidates, vec![ExecutionProvider::TensorRt]);
            }
        }
    }

    #[test]
    fn reasons_group_providers_that_failed_the_same_way() {
        let skipped = vec![
            (ExecutionProvider::TensorRt, "no driver".to_string()),
            (ExecutionProvider::Cuda, "no driver".to_string()),
        ];
        assert_eq!(skipped_text(&skipped), "tensorrt, cuda: no driver");
        let reason = describe(
            ProviderRequest::Auto,
            ExecutionProvider::Cpu,
            &skipped,
            false,
        );
        assert_eq!(
            reason,
            "auto: cpu is the best provider that opened; not used: tensorrt, cuda: no driver"
        );
        assert_eq!(
            describe(ProviderRequest::Cpu, ExecutionProvider::Cpu, &[], false),
            "requested"
        );
        let fp16 = describe(
            ProviderRequest::Auto,
            ExecutionProvider::TensorRt,
            &[],
            false,
        );
        assert!(
            fp16.contains(", FP16, engine cache") && !fp16.contains("INT8"),
            "{fp16}"
        );
        let int8 = describe(
            ProviderRequest::TensorRt,
            ExecutionProvider::TensorRt,
            &[],
            true,
        );
        assert!(int8.starts_with("requested, INT8"), "{int8}");
    }
}
