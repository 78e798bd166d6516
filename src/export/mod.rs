//! `stpm export`: a bundle's INT8 graph (calibrated quantisation, `int8`, `quantize`) and its
//! ahead-of-time TensorRT engine (`tensorrt`). Above the engine, which it runs to calibrate; the
//! graph it rewrites comes from `crate::onnx`.

pub mod int8;
pub mod quantize;
pub mod tensorrt;
