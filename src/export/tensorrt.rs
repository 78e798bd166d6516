//! `stpm export --format tensorrt`: builds a bundle's TensorRT engine ahead of time, through ONNX
//! Runtime's TensorRT execution provider, into the engine cache `<bundle>/trt/` that
//! `stpm run`, `bench` and `eval` on `tensorrt` then load instead of building it at start. FP16
//! builds from `model.onnx`; INT8 from a Q/DQ graph TensorRT accepts (symmetric int8 activations,
//! float biases), quantised here on the bundle's good images when the bundle has none.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::int8::{Int8Error, Int8Options, Int8Outcome, export_int8};
use super::quantize::ActivationType;
use crate::bundle::{Bundle, BundleError, Precision};
use crate::engine::{
    Engine, EngineError, EngineOptions, ExecutionProvider, ProviderRequest, resolve_provider,
};

/// Folder of the engine and timing caches inside a bundle (the TensorRT provider's cache path).
pub const CACHE_DIR: &str = "trt";

#[derive(Debug, thiserror::Error)]
pub enum TensorRtError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Int8(#[from] Int8Error),
    #[error(
        "TensorRT builds INT8 engines from symmetric int8 activations only; drop --activations {0} (the TensorRT export uses int8-symmetric)"
    )]
    Activations(&'static str),
    #[error(
        "a TensorRT engine needs a `--features gpu` build, an NVIDIA GPU with its driver and ONNX Runtime with TensorRT: {0}"
    )]
    Unavailable(String),
    #[error("cannot list the engine cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Engine precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRtPrecision {
    /// `model.onnx` with FP16 kernels allowed.
    Fp16,
    /// The bundle's TensorRT INT8 graph (int8 where its Q/DQ pairs say, FP16 elsewhere).
    Int8,
}

/// What the export did.
#[derive(Debug)]
pub struct TensorRtOutcome {
    /// The INT8 graph quantised for this engine (`None`: FP16, or the bundle already had one).
    pub quantised: Option<Int8Outcome>,
    /// The graph the engine was built from.
    pub model: PathBuf,
    pub cache_dir: PathBuf,
    /// Files in the cache after the build (engines, profiles, timing cache).
    pub cache_files: Vec<PathBuf>,
    /// Session start and first inference, where TensorRT builds (or loads) the engine.
    pub build_seconds: f64,
    /// Why the session runs where it does (the engine's own description).
    pub reason: String,
}

/// Checks up front that this build and machine can run TensorRT at all, so that an INT8 export does
/// not calibrate for a minute before failing.
pub fn check_available() -> Result<(), TensorRtError> {
    match resolve_provider(ProviderRequest::TensorRt) {
        Ok(_) => Ok(()),
        Err(EngineError::ProviderUnavailable { reason, .. }) => Err(TensorRtError::Unavailable(
            reason.trim_end_matches("; use cpu or auto").to_string(),
        )),
        Err(other) => Err(other.into()),
    }
}

/// Builds (or refreshes) the bundle's TensorRT engine for `precision`, optimised for `batch`
/// images per call (it takes 1 to [`crate::engine::batch::MAX_BATCH`] either way); `int8` sets
/// the calibration of a new INT8 graph (its `activations` must be the default or
/// `int8-symmetric`).
pub fn export_tensorrt(
    dir: &Path,
    precision: TensorRtPrecision,
    int8: &Int8Options,
    batch: usize,
) -> Result<TensorRtOutcome, TensorRtError> {
    if int8.activations == ActivationType::Int8 {
        return Err(TensorRtError::Activations(int8.activations.name()));
    }
    check_available()?;
    let mut bundle = Bundle::open(dir)?;
    let mut quantised = None;
    if precision == TensorRtPrecision::Int8 {
        // A current INT8 graph of TensorRT's kind is used as it is (checked once); any other is
        // quantised again.
        bundle = match bundle.with_precision(Precision::Int8) {
            Ok(current) if current.int8_is_for_tensorrt() => current,
            _ => {
                let options = Int8Options {
                    activations: ActivationType::Int8Symmetric,
                    out: None,
                    ..int8.clone()
                };
                quantised = Some(export_int8(dir, &options)?);
                Bundle::open_as(dir, Precision::Int8)?
            }
        };
    }
    let options = EngineOptions {
        provider: ProviderRequest::TensorRt,
        batch,
        ..EngineOptions::default()
    };
    let started = Instant::now();
    let mut engine = Engine::for_bundle(&bundle, options)?;
    if engine.provider() != ExecutionProvider::TensorRt {
        return Err(EngineError::ProviderUnavailable {
            requested: ProviderRequest::TensorRt,
            reason: format!("the session opened on {} instead", engine.provider()),
        }
        .into());
    }
    let [h, w] = bundle.manifest.model.input_size;
    // TensorRT builds the engine (for the session's profile of 1 to MAX_BATCH images) by the
    // first call at the latest.
    engine.run(&vec![0.0; 3 * h * w], 1)?;
    let build_seconds = started.elapsed().as_secs_f64();
    let cache_dir = dir.join(CACHE_DIR);
    let mut cache_files: Vec<PathBuf> = std::fs::read_dir(&cache_dir)
        .map_err(|source| TensorRtError::Cache {
            path: cache_dir.clone(),
            source,
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    cache_files.sort();
    Ok(TensorRtOutcome {
        quantised,
        model: bundle.model_path(),
        cache_dir,
        cache_files,
        build_seconds,
        reason: engine.provider_choice().reason.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_int8_activations_are_refused_before_any_work() {
        let options = Int8Options {
            activations: ActivationType::Int8,
            ..Int8Options::default()
        };
        let error = export_tensorrt(
            Path::new("/nonexistent/bundle"),
            TensorRtPrecision::Int8,
            &options,
            1,
        )
        .expect_err("int8 asymmetric activations");
        assert!(
            matches!(error, TensorRtError::Activations("int8")),
            "{error}"
        );
    }

    #[test]
    fn without_a_gpu_the_export_says_what_is_missing() {
        if crate::engine::resolve_provider(ProviderRequest::TensorRt).is_ok() {
            println!(
                "not checked: this machine has a GPU driver, so there is no missing-GPU message"
            );
            return;
        }
        let error = export_tensorrt(
            Path::new("/nonexistent/bundle"),
            TensorRtPrecision::Fp16,
            &Int8Options::default(),
            1,
        )
        .expect_err("no GPU");
        let text = error.to_string();
        assert!(matches!(error, TensorRtError::Unavailable(_)), "{text}");
        assert!(!text.contains("use cpu or auto"), "{text}");
        assert!(
            text.contains("gpu") || text.contains("driver") || text.contains("CUDA"),
            "{text}"
        );
    }
}
