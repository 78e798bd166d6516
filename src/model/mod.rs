//! The STPM model: backbones (teacher and student share one architecture), loading pretrained
//! weights, the feature-matching loss, the defect head and the anomaly map. No I/O beyond reading
//! weights.

pub mod backbone;
pub mod efficientnet;
pub mod features;
pub mod head;
pub mod map;
pub mod resnet;
pub mod weights;

pub use backbone::{Backbone, BackboneKind};
pub use features::{Fusion, Pyramid};

use burn::prelude::{Device, Tensor};

/// The one place that picks burn's compute device (CPU `flex` today; a GPU device later).
pub fn compute_device() -> Device {
    Device::flex()
}

/// Copies a tensor's values to the host as f32 (empty if the backend cannot convert them).
pub fn to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}
