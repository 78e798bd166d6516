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
    Product,
    /// Sum over scales (a common variant).
    Sum,
    /// Sum of four terms, each standardised with its mean and standard deviation over the held-out
    /// good images: the three scale distances and, at stride 4, the squared log-ratio of student
    /// and teacher feature norms (the magnitude that L2 normalisation discards). The default.
    #[default]
    Standardised,
}

impl Fusion {
    /// The manifest's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Product => "product",
            Self::Sum => "sum",
            Self::Standardised => "standardised",
        }
    }
}

/// Number of raw terms [`Fusion::Standardised`] combines: distances at strides 4, 8, 16 and the
/// stride-4 log-magnitude term.
pub const STANDARDISED_TERMS: usize = 4;

/// Mean and standard deviation of each standardised term over every position of the held-out good
/// images (measured at training, baked into the graph, recorded in the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapStats {
    pub mean: [f32; STANDARDISED_TERMS],
    pub std: [f32; STANDARDISED_TERMS],
}

impl Default for MapStats {
    /// The identity: terms pass unchanged.
    fn default() -> Self {
        Self {
            mean: [0.0; STANDARDISED_TERMS],
            std: [1.0; STANDARDISED_TERMS],
        }
    }
}

impl MapStats {
    /// The standard deviation a term is divided by, kept away from 0 for a constant term.
    pub fn divisor(&self, term: usize) -> f32 {
        self.std[term].max(f32::EPSILON)
    }
}

/// Running sums for [`MapStats`] over batches of low-resolution terms.
#[derive(Debug, Default, Clone)]
pub struct MapStatsAccumulator {
    sum: [f64; STANDARDISED_TERMS],
    sum_sq: [f64; STANDARDISED_TERMS],
    count: [f64; STANDARDISED_TERMS],
}

impl MapStatsAccumulator {
    /// Adds every position of one batch's terms (from [`standardised_terms`]).
    pub fn add(&mut self, terms: [Tensor<4>; STANDARDISED_TERMS]) {
        for (index, term) in terms.into_iter().enumerate() {
            for value in crate::model::to_vec(term) {
                let value = f64::from(value);
                self.sum[index] += value;
                self.sum_sq[index] += value * value;
                self.count[index] += 1.0;
            }
        }
    }

    pub fn finish(&self) -> MapStats {
        let mut stats = MapStats::default();
        for index in 0..STANDARDISED_TERMS {
            if self.count[index] == 0.0 {
                continue;
            }
            let n = self.count[index];
            let mean = self.sum[index] / n;
            let variance = (self.sum_sq[index] / n - mean * mean).max(0.0);
            stats.mean[index] = mean as f32;
            stats.std[index] = variance.sqrt() as f32;
        }
        stats
    }
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

/// Squared log-ratio of the student's and the teacher's feature norms at every position:
/// (½ ln Σs² − ½ ln Σt²)², [N, 1, h, w]. Zero when the student reproduces the teacher's magnitude.
pub fn magnitude_distance(teacher: Tensor<4>, student: Tensor<4>) -> Tensor<4> {
    let log_energy = |x: Tensor<4>| x.square().sum_dim(1).clamp_min(MAGNITUDE_EPS).log();
    (log_energy(student) - log_energy(teacher))
        .square()
        .mul_scalar(0.25)
}

/// Floor of the squared feature norm before its logarithm (all-zero feature vectors).
pub const MAGNITUDE_EPS: f64 = 1e-12;

/// The low-resolution terms [`Fusion::Standardised`] combines, before standardisation.
pub fn standardised_terms(teacher: &Pyramid, student: &Pyramid) -> [Tensor<4>; STANDARDISED_TERMS] {
    let [t0, t1, t2] = teacher.0.clone();
    let [s0, s1, s2] = student.0.clone();
    [
        scale_distance(t0.clone(), s0.clone()),
        scale_distance(t1, s1),
        scale_distance(t2, s2),
        magnitude_distance(t0, s0),
    ]
}

/// Stride of each standardised term relative to the input.
pub const STANDARDISED_STRIDES: [usize; STANDARDISED_TERMS] = [4, 8, 16, 4];

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
    /// Term statistics for [`Fusion::Standardised`] (ignored by the other fusions).
    pub stats: MapStats,
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
    let fused = match options.fusion {
        Fusion::Standardised => standardise(teacher, student, size, &options.stats),
        fusion => fuse(teacher, student, size, fusion),
    };
    gaussian_blur(fused, options.blur_sigma)
}

fn standardise(
    teacher: &Pyramid,
    student: &Pyramid,
    size: [usize; 2],
    stats: &MapStats,
) -> Tensor<4> {
    let mut fused: Option<Tensor<4>> = None;
    for (index, term) in standardised_terms(teacher, student).into_iter().enumerate() {
        let z = upsample(term, size)
            .sub_scalar(stats.mean[index])
            .div_scalar(stats.divisor(index));
        fused = Some(match fused {
            Some(acc) => acc + z,
            None => z,
        });
    }
    fused.expect("four terms")
}

fn fuse(teacher: &Pyramid, student: &Pyramid, size: [usize; 2], fusion: Fusion) -> Tensor<4> {
    let mut fused: Option<Tensor<4>> = None;
    for (t, s) in teacher.0.iter().zip(student.0.iter()) {
        let map = upsample(scale_distance(t.clone(), s.clone()), size);
        fused = Some(match (fused, fusion) {
            (None, _) => map,
            (Some(acc), Fusion::Product) => acc * map,
            (Some(acc), _) => acc + map,
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

    fn tensor(values: Vec<f32>, shape: [usize; 4]) -> Tensor<4> {
        Tensor::<4>::from_data(
            TensorData::new(values, shape),
            &crate::model::compute_device(),
        )
    }

    #[test]
    fn magnitude_term_sees_a_scaled_student_that_the_direction_term_misses() {
        let teacher: Vec<f32> = (0..2 * 3 * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let doubled: Vec<f32> = teacher.iter().map(|v| 2.0 * v).collect();
        let t = tensor(teacher.clone(), [1, 2, 3, 4]);
        let direction = crate::model::to_vec(scale_distance(
            t.clone(),
            tensor(doubled.clone(), [1, 2, 3, 4]),
        ));
        assert!(direction.iter().all(|d| d.abs() < 1e-6), "{direction:?}");
        let magnitude =
            crate::model::to_vec(magnitude_distance(t.clone(), tensor(doubled, [1, 2, 3, 4])));
        let expected = std::f32::consts::LN_2.powi(2);
        assert!(
            magnitude.iter().all(|m| (m - expected).abs() < 1e-5),
            "{magnitude:?} vs {expected}"
        );
        let same = crate::model::to_vec(magnitude_distance(t.clone(), t));
        assert!(same.iter().all(|m| m.abs() < 1e-9), "{same:?}");
    }

    #[test]
    fn term_statistics_are_mean_and_population_std_over_positions() {
        let mut acc = MapStatsAccumulator::default();
        let term = |values: Vec<f32>| tensor(values, [1, 1, 2, 2]);
        acc.add([
            term(vec![1.0, 2.0, 3.0, 4.0]),
            term(vec![5.0; 4]),
            term(vec![0.0, 0.0, 2.0, 2.0]),
            term(vec![-1.0, 1.0, -1.0, 1.0]),
        ]);
        acc.add([
            term(vec![5.0, 6.0, 7.0, 8.0]),
            term(vec![5.0; 4]),
            term(vec![0.0, 0.0, 2.0, 2.0]),
            term(vec![-1.0, 1.0, -1.0, 1.0]),
        ]);
        let stats = acc.finish();
        assert!((stats.mean[0] - 4.5).abs() < 1e-6);
        assert!((stats.std[0] - 5.25f32.sqrt()).abs() < 1e-6);
        assert_eq!((stats.mean[1], stats.std[1]), (5.0, 0.0));
        assert!(
            stats.divisor(1) > 0.0,
            "a constant term is not divided by 0"
        );
        assert_eq!((stats.mean[2], stats.std[2]), (1.0, 1.0));
        assert_eq!((stats.mean[3], stats.std[3]), (0.0, 1.0));
        assert_eq!(MapStatsAccumulator::default().finish(), MapStats::default());
    }

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
