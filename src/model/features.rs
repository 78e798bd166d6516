//! The STPM feature-matching maths: channel-wise L2 normalisation, per-scale squared distance, the
//! training loss and the fused anomaly map. Shared by training and by the export parity checks.

use burn::prelude::*;
use burn::tensor::module::conv2d;
use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
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

/// How the per-scale distances become one anomaly map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapOptions {
    pub fusion: Fusion,
    /// Standard deviation in pixels of the Gaussian blur applied to the fused map (0: none).
    pub blur_sigma: f32,
}

/// Normalised 1-D Gaussian taps for `sigma`, radius ⌈3σ⌉ (empty for σ ≤ 0).
pub fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return Vec::new();
    }
    let radius = (3.0 * sigma).ceil() as i32;
    let taps: Vec<f32> = (-radius..=radius)
        .map(|i| (-((i * i) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = taps.iter().sum();
    taps.into_iter().map(|t| t / total).collect()
}

/// Separable Gaussian blur of [N, 1, H, W] maps with zero padding (as the exported graph's Conv).
pub fn gaussian_blur(map: Tensor<4>, sigma: f32) -> Tensor<4> {
    let taps = gaussian_kernel(sigma);
    if taps.is_empty() {
        return map;
    }
    let k = taps.len();
    let radius = k / 2;
    let device = map.device();
    let vertical = Tensor::<4>::from_data(TensorData::new(taps.clone(), [1, 1, k, 1]), &device);
    let horizontal = Tensor::<4>::from_data(TensorData::new(taps, [1, 1, 1, k]), &device);
    let pad_v = ConvOptions::new([1, 1], [radius, 0], [1, 1], 1);
    let pad_h = ConvOptions::new([1, 1], [0, radius], [1, 1], 1);
    let blurred = conv2d(map, vertical, None, pad_v);
    conv2d(blurred, horizontal, None, pad_h)
}

/// The anomaly map [N, 1, H, W]: per-scale distances upsampled to `size`, fused, and blurred.
pub fn anomaly_map(
    teacher: &Pyramid,
    student: &Pyramid,
    size: [usize; 2],
    options: MapOptions,
) -> Tensor<4> {
    let fused = fuse(teacher, student, size, options.fusion);
    gaussian_blur(fused, options.blur_sigma)
}

fn fuse(teacher: &Pyramid, student: &Pyramid, size: [usize; 2], fusion: Fusion) -> Tensor<4> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_kernel_is_normalised_symmetric_and_sized() {
        let taps = gaussian_kernel(4.0);
        assert_eq!(taps.len(), 25);
        assert!((taps.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(taps[0], taps[24]);
        assert!(taps[12] > taps[11]);
        assert!(gaussian_kernel(0.0).is_empty());
    }

    #[test]
    fn blur_spreads_a_point_and_keeps_its_mass_away_from_borders() {
        let device = crate::model::compute_device();
        let mut values = vec![0.0f32; 32 * 32];
        values[16 * 32 + 16] = 1.0;
        let map = Tensor::<4>::from_data(TensorData::new(values, [1, 1, 32, 32]), &device);
        let blurred = crate::model::to_vec(gaussian_blur(map, 1.5));
        let total: f32 = blurred.iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "mass {total}");
        let centre = blurred[16 * 32 + 16];
        assert!(
            centre < 0.1 && centre > blurred[16 * 32 + 18],
            "centre {centre}"
        );
    }
}
