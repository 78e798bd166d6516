//! stpm-stream: STPM anomaly detection for factory-line video. The model side (`model`, `train`,
//! `export`) produces a bundle that the runtime side (`engine`, and later the live pipeline) runs.

pub mod alerts;
pub mod bench;
pub mod bundle;
pub mod calibrate;
pub mod dataset;
pub mod devset;
pub mod engine;
pub mod eval;
pub mod export;
pub mod files;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod infer;
pub mod model;
pub mod onnx;
pub mod overlay;
pub mod paths;
pub mod pipeline;
pub mod preprocess;
pub mod process;
pub mod rng;
pub mod store;
pub mod threshold;
pub mod train;
