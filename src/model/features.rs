//! The STPM feature-matching maths: channel-wise L2 normalisation, per-scale squared distance, the
//! training loss and the fused anomaly map. Shared by training and by the export parity checks.

use burn::prelude::*;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use serde::{Deserialize, Serialize};

/// Guards the L2 normalisation against all-zero feature vectors (as `torch.nn.functional.normalize`).
pub const NORM_EPS: f64 = 1e-12;

/// Feature maps at strides 4, 8 and 16, each [N, C, H/s, W/s].
#[derive(Debug, Clone)]
pub struct Pyramid(pub [Tensor<4>; 3]);

/// How the per-scale maps are combined into one anomaly map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Product over scales (the STPM paper).
    #[default]
    Product,
    /// Sum over scales (a common variant).
    Sum,
}

/// Scales each position's feature vector to unit length.
pub fn l2_normalize(features: Tensor<4>) -> Tensor<4> {
    let norm = features
        .clone()
        .square()
        .sum_dim(1)
        .sqrt()
        .clamp_min(NORM_EPS);
    features / norm
}

/// ½‖t̂ − ŝ‖² at every position: [N, 1, h, w].
pub fn scale_distance(teacher: Tensor<4>, student: Tensor<4>) -> Tensor<4> {
    (l2_normalize(teacher) - l2_normalize(student))
        .square()
        .sum_dim(1)
        .mul_scalar(0.5)
}

/// The STPM loss: per scale the mean of ½‖t̂ − ŝ‖² over batch and positions, summed over scales.
pub fn loss(teacher: &Pyramid, student: &Pyramid) -> Tensor<1> {
    let mut total: Option<Tensor<1>> = None;
    for (t, s) in teacher.0.iter().zip(student.0.iter()) {
        let scale = scale_distance(t.clone(), s.clone()).mean();
        total = Some(match total {
            Some(sum) => sum + scale,
            None => scale,
        });
    }
    total.expect("a pyramid has three scales")
}

/// Bilinear (half-pixel, as PyTorch's align_corners=False) resize of [N, C, h, w] maps.
pub fn upsample(map: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    let options = InterpolateOptions {
        mode: InterpolateMode::Bilinear,
        align_corners: false,
        output_size: Some(size),
        scale_factor: None,
    };
    burn::tensor::module::interpolate(map, options)
}

/// The anomaly map [N, 1, H, W]: per-scale distances upsampled to `size` and fused.
pub fn anomaly_map(
    teacher: &Pyramid,
    student: &Pyramid,
    size: [usize; 2],
    fusion: Fusion,
) -> Tensor<4> {
    let mut fused: Option<Tensor<4>> = None;
    for (t, s) in teacher.0.iter().zip(student.0.iter()) {
        let map = upsample(scale_distance(t.clone(), s.clone()), size);
        fused = Some(match (fused, fusion) {
            (None, _) => map,
            (Some(acc), Fusion::Product) => acc * map,
            (Some(acc), Fusion::Sum) => acc + map,
        });
    }
    fused.expect("a pyramid has three scales")
}

/// Image score: the maximum of each map, [N].
pub fn image_score(map: Tensor<4>) -> Tensor<1> {
    let [n, _, _, _] = map.dims();
    map.reshape([n as i64, -1]).max_dim(1).reshape([n])
}
