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

impl Pyramid {
    /// Channels of each scale.
    pub fn channels(&self) -> [usize; 3] {
        std::array::from_fn(|scale| self.0[scale].dims()[1])
    }
}

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
    /// and teacher feature norms (the magnitude that L2 normalisation discards).
    Standardised,
    /// As standardised, but each scale's distance is the Mahalanobis distance of the residual
    /// t̂ − ŝ under its mean and covariance over the held-out good images (kept in the bundle's
    /// whitening.safetensors), so that channels in which student and teacher always disagree a
    /// little count less than those in which they never do. The default.
    #[default]
    Whitened,
}

impl Fusion {
    /// The manifest's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Product => "product",
            Self::Sum => "sum",
            Self::Standardised => "standardised",
            Self::Whitened => "whitened",
        }
    }

    /// Whether the map standardises its terms with [`MapStats`] measured at training.
    pub fn standardises(self) -> bool {
        matches!(self, Self::Standardised | Self::Whitened)
    }
}

/// Number of raw terms [`Fusion::Standardised`] and [`Fusion::Whitened`] combine: distances at
/// strides 4, 8, 16 and the stride-4 log-magnitude term.
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
    residual(teacher, student)
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

/// t̂ − ŝ: the L2-normalised residual whose squared length is twice the scale distance.
pub fn residual(teacher: Tensor<4>, student: Tensor<4>) -> Tensor<4> {
    l2_normalize(teacher) - l2_normalize(student)
}

/// Least shrinkage of a residual covariance towards its mean variance times the identity
/// (Σ + λ·tr Σ/C·I), so that it stays well conditioned when channels are nearly collinear. With
/// fewer than 100 positions per channel, λ = C / positions instead: a handful of held-out images
/// must not make directions they happen not to span look infinitely anomalous.
pub const WHITENING_SHRINKAGE: f64 = 0.01;

/// One scale's whitening: the mean μ of the residual t̂ − ŝ over held-out good positions and the
/// lower-triangular W = L⁻¹ of the Cholesky factor of its (shrunk) covariance Σ = LLᵀ, so that
/// ‖W(r − μ)‖² = (r − μ)ᵀ Σ⁻¹ (r − μ).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleWhitening {
    pub mean: Vec<f32>,
    /// Row-major C×C.
    pub matrix: Vec<f32>,
}

impl ScaleWhitening {
    /// μ = 0, W = I: the whitened distance is ‖r‖² (twice the scale distance).
    pub fn identity(channels: usize) -> Self {
        let mut matrix = vec![0.0; channels * channels];
        for c in 0..channels {
            matrix[c * channels + c] = 1.0;
        }
        Self {
            mean: vec![0.0; channels],
            matrix,
        }
    }

    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// −Wμ: the bias of the 1×1 convolution that computes W(r − μ).
    pub fn bias(&self) -> Vec<f32> {
        let c = self.channels();
        (0..c)
            .map(|row| {
                -(0..c)
                    .map(|col| f64::from(self.matrix[row * c + col]) * f64::from(self.mean[col]))
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

/// The whitening of the three scales of [`Fusion::Whitened`].
#[derive(Debug, Clone, PartialEq)]
pub struct Whitening(pub [ScaleWhitening; 3]);

/// (r − μ)ᵀ Σ⁻¹ (r − μ) of the residual at every position: [N, 1, h, w].
pub fn whitened_distance(
    teacher: Tensor<4>,
    student: Tensor<4>,
    whitening: &ScaleWhitening,
) -> Tensor<4> {
    let r = residual(teacher, student);
    let device = r.device();
    let c = whitening.channels();
    let weight = Tensor::<4>::from_data(
        TensorData::new(whitening.matrix.clone(), [c, c, 1, 1]),
        &device,
    );
    let bias = Tensor::<1>::from_data(TensorData::new(whitening.bias(), [c]), &device);
    let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    conv2d(r, weight, Some(bias), options).square().sum_dim(1)
}

/// Running first and second moments of one scale's residual, per channel pair (f64).
#[derive(Debug, Clone, Default)]
struct Moments {
    count: f64,
    sum: Vec<f64>,
    /// Lower triangle of Σ r rᵀ, row-major C×C.
    outer: Vec<f64>,
}

impl Moments {
    /// Adds every position of an [N, C, h, w] residual.
    fn add(&mut self, residual: Tensor<4>) {
        let [n, c, h, w] = residual.dims();
        self.add_values(&crate::model::to_vec(residual), n, c, h * w);
    }

    /// Adds every position of `n` residuals of `c` channels of `plane` positions each (NCHW).
    fn add_values(&mut self, values: &[f32], n: usize, c: usize, plane: usize) {
        if self.sum.len() != c {
            *self = Self {
                count: 0.0,
                sum: vec![0.0; c],
                outer: vec![0.0; c * c],
            };
        }
        for image in values.chunks_exact(c * plane).take(n) {
            for i in 0..c {
                let a = &image[i * plane..(i + 1) * plane];
                self.sum[i] += a.iter().map(|&v| f64::from(v)).sum::<f64>();
                for j in 0..=i {
                    let b = &image[j * plane..(j + 1) * plane];
                    self.outer[i * c + j] += a
                        .iter()
                        .zip(b)
                        .map(|(&x, &y)| f64::from(x) * f64::from(y))
                        .sum::<f64>();
                }
            }
            self.count += plane as f64;
        }
    }

    /// μ and W = L⁻¹ for the shrunk covariance; the identity when nothing (or only a constant)
    /// was observed.
    fn finish(&self) -> ScaleWhitening {
        let c = self.sum.len();
        if self.count == 0.0 {
            return ScaleWhitening::identity(c);
        }
        let mean: Vec<f64> = self.sum.iter().map(|s| s / self.count).collect();
        let mut cov = vec![0.0f64; c * c];
        for i in 0..c {
            for j in 0..=i {
                let v = self.outer[i * c + j] / self.count - mean[i] * mean[j];
                cov[i * c + j] = v;
                cov[j * c + i] = v;
            }
        }
        let trace: f64 = (0..c).map(|i| cov[i * c + i]).sum();
        let shrinkage = WHITENING_SHRINKAGE.max(c as f64 / self.count);
        let ridge = shrinkage * trace / c as f64;
        let inverse = (ridge.is_finite() && ridge > 1e-30)
            .then(|| {
                for i in 0..c {
                    cov[i * c + i] += ridge;
                }
                cholesky_inverse(&cov, c)
            })
            .flatten();
        ScaleWhitening {
            mean: mean.iter().map(|&m| m as f32).collect(),
            matrix: match inverse {
                Some(inverse) => inverse.iter().map(|&v| v as f32).collect(),
                None => ScaleWhitening::identity(c).matrix,
            },
        }
    }
}

/// L⁻¹ for the Cholesky factor L of a symmetric positive definite row-major `n`×`n` matrix
/// (None when it is not positive definite).
fn cholesky_inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                let d = a[i * n + i] - dot;
                if d.is_nan() || d <= 0.0 {
                    return None;
                }
                l[i * n + i] = d.sqrt();
            } else {
                l[i * n + j] = (a[i * n + j] - dot) / l[j * n + j];
            }
        }
    }
    // Forward substitution, column by column of the identity.
    let mut inverse = vec![0.0f64; n * n];
    for col in 0..n {
        for i in col..n {
            let target = if i == col { 1.0 } else { 0.0 };
            let dot: f64 = (col..i).map(|k| l[i * n + k] * inverse[k * n + col]).sum();
            inverse[i * n + col] = (target - dot) / l[i * n + i];
        }
    }
    Some(inverse)
}

/// Running moments of the three scales' residuals over batches of held-out good images.
#[derive(Debug, Clone, Default)]
pub struct WhiteningAccumulator {
    scales: [Moments; 3],
}

impl WhiteningAccumulator {
    pub fn add(&mut self, teacher: &Pyramid, student: &Pyramid) {
        for ((moments, t), s) in self.scales.iter_mut().zip(&teacher.0).zip(&student.0) {
            moments.add(residual(t.clone(), s.clone()));
        }
    }

    /// Adds one image's residual t̂ − ŝ of `scale` as a graph computes it: `channels` × positions,
    /// flattened NCHW (batch 1). Values that are not a whole number of positions are ignored.
    pub fn add_residual(&mut self, scale: usize, values: &[f32], channels: usize) {
        if let Some(moments) = self.scales.get_mut(scale)
            && channels > 0
            && values.len().is_multiple_of(channels)
        {
            moments.add_values(values, 1, channels, values.len() / channels);
        }
    }

    pub fn finish(&self) -> Whitening {
        Whitening(std::array::from_fn(|scale| self.scales[scale].finish()))
    }
}

/// The low-resolution terms [`Fusion::Standardised`] combines (no whitening) or
/// [`Fusion::Whitened`] (with it), before standardisation.
pub fn standardised_terms(
    teacher: &Pyramid,
    student: &Pyramid,
    whitening: Option<&Whitening>,
) -> [Tensor<4>; STANDARDISED_TERMS] {
    let [t0, t1, t2] = teacher.0.clone();
    let [s0, s1, s2] = student.0.clone();
    let magnitude = magnitude_distance(t0.clone(), s0.clone());
    match whitening {
        None => [
            scale_distance(t0, s0),
            scale_distance(t1, s1),
            scale_distance(t2, s2),
            magnitude,
        ],
        Some(Whitening([w0, w1, w2])) => [
            whitened_distance(t0, s0, w0),
            whitened_distance(t1, s1, w1),
            whitened_distance(t2, s2, w2),
            magnitude,
        ],
    }
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

/// Bilinear (half-pixel, as PyTorch's align_corners=False) resize of [N, C, h, w] maps (none when
/// they already have `size`).
pub fn upsample(map: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    let [_, _, h, w] = map.dims();
    if [h, w] == size {
        return map;
    }
    let options = InterpolateOptions {
        mode: InterpolateMode::Bilinear,
        align_corners: false,
        output_size: Some(size),
        scale_factor: None,
    };
    burn::tensor::module::interpolate(map, options)
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
    fn cholesky_inverse_whitens_its_matrix() {
        // A = B Bᵀ + I is symmetric positive definite; W = L⁻¹ must give W A Wᵀ = I.
        let n = 5;
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let w = cholesky_inverse(&a, n).expect("positive definite");
        for i in 0..n {
            for j in 0..n {
                if j > i {
                    assert_eq!(w[i * n + j], 0.0, "lower triangular");
                }
                let waw: f64 = (0..n)
                    .flat_map(|k| (0..n).map(move |l| (k, l)))
                    .map(|(k, l)| w[i * n + k] * a[k * n + l] * w[j * n + l])
                    .sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((waw - expected).abs() < 1e-9, "({i},{j}): {waw}");
            }
        }
        let mut not_pd = a.clone();
        not_pd[0] = -1.0;
        assert!(cholesky_inverse(&not_pd, n).is_none());
    }

    #[test]
    fn residuals_from_a_graph_accumulate_like_the_training_tensors() {
        let mut rng = crate::rng::SplitMix::new(9);
        let mut values = |n: usize| (0..n).map(|_| rng.range(-1.0, 1.0)).collect::<Vec<f32>>();
        let scales = [(3, 16), (4, 4), (2, 1)];
        let images: Vec<Vec<Vec<f32>>> = (0..2)
            .map(|_| scales.iter().map(|&(c, plane)| values(c * plane)).collect())
            .collect();
        let mut from_tensors: [Moments; 3] = Default::default();
        let mut from_values = WhiteningAccumulator::default();
        for image in &images {
            for (scale, (&(c, plane), residual)) in scales.iter().zip(image).enumerate() {
                let side = (plane as f64).sqrt() as usize;
                from_tensors[scale].add(tensor(residual.clone(), [1, c, side, side]));
                from_values.add_residual(scale, residual, c);
            }
        }
        // A length that is not a whole number of positions is ignored.
        from_values.add_residual(0, &[1.0, 2.0], 3);
        let expected = Whitening(std::array::from_fn(|scale| from_tensors[scale].finish()));
        assert_eq!(from_values.finish(), expected);
        assert_ne!(expected.0[0], ScaleWhitening::identity(3));
    }

    #[test]
    fn whitening_centres_and_decorrelates_the_residual() {
        // Two strongly correlated channels with different means and spreads over 2 images of 8×8.
        let (c, plane) = (2, 64);
        let mut values = Vec::new();
        let mut rng = crate::rng::SplitMix::new(5);
        let mut samples = Vec::new();
        for _ in 0..2 {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for _ in 0..plane {
                let u = rng.range(-1.0, 1.0);
                let v = rng.range(-1.0, 1.0);
                x.push(0.3 + 2.0 * u);
                y.push(-0.1 + 1.5 * u + v);
            }
            for p in 0..plane {
                samples.push([x[p], y[p]]);
            }
            values.extend(x);
            values.extend(y);
        }
        let mut moments = Moments::default();
        moments.add(tensor(values, [2, c, 8, 8]));
        let w = moments.finish();
        assert!((w.mean[0] - mean_of(&samples, 0)).abs() < 1e-5);
        let bias = w.bias();
        let whitened: Vec<[f64; 2]> = samples
            .iter()
            .map(|s| {
                let f = |row: usize| {
                    (0..c)
                        .map(|k| f64::from(w.matrix[row * c + k]) * f64::from(s[k]))
                        .sum::<f64>()
                        + f64::from(bias[row])
                };
                [f(0), f(1)]
            })
            .collect();
        let n = whitened.len() as f64;
        let mean = |k: usize| whitened.iter().map(|v| v[k]).sum::<f64>() / n;
        let cov = |a: usize, b: usize| whitened.iter().map(|v| v[a] * v[b]).sum::<f64>() / n;
        assert!(mean(0).abs() < 1e-5 && mean(1).abs() < 1e-5, "centred");
        // Shrinkage (λ = 2/128 of the mean variance) keeps the variances just under 1.
        for k in 0..c {
            assert!(
                (0.9..=1.0).contains(&cov(k, k)),
                "variance {k}: {}",
                cov(k, k)
            );
        }
        assert!(cov(0, 1).abs() < 0.05, "decorrelated: {}", cov(0, 1));
        // The raw channels were correlated; the whitening is not the identity.
        assert!(w.matrix[c] != 0.0);
        // Nothing observed: the identity.
        let nothing = Moments {
            count: 0.0,
            sum: vec![0.0; 3],
            outer: vec![0.0; 9],
        };
        assert_eq!(nothing.finish(), ScaleWhitening::identity(3));
    }

    fn mean_of(samples: &[[f32; 2]], k: usize) -> f32 {
        samples.iter().map(|s| s[k]).sum::<f32>() / samples.len() as f32
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
