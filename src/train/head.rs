//! Trains the defect head (`model::head`) after the student: synthetic defects (`synth`) are pasted
//! into the training images, the frozen teacher's features of those and of the clean images are
//! sampled position by position, and a two-layer perceptron learns to tell defect positions from
//! good ones (weighted cross-entropy, Adam). Its logit's statistics come from the held-out images.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid};

use super::prepare::{FeatureCache, ImageSet, Prepared, TeacherRunner};
use super::synth::{block_targets, normal, paste_defect};
use super::{TrainConfig, TrainError};
use crate::model::features::Pyramid;
use crate::model::head::{DEFAULT_HIDDEN, HEAD_STRIDE, Head, head_features, input_channels};
use crate::model::map::{MapOptions, anomaly_map, finish, fusion_size};
use crate::model::to_vec;
use crate::rng::SplitMix;

/// Synthetic defects per training image, and the most in all (bounds the time on large folders).
const SYNTHETIC_PER_IMAGE: usize = 2;
const MAX_SYNTHETIC: usize = 800;
/// Good positions sampled per image (defect positions are all kept).
const GOOD_POSITIONS_PER_IMAGE: usize = 256;
/// Images whose teacher features are computed at once (bounds memory).
const CHUNK: usize = 64;
/// Perceptrons trained from different initialisations whose logits are averaged (one alone
/// varies with its initialisation: docs/results.md §1.9).
const ENSEMBLE: usize = 3;
/// Adam steps of `BATCH` positions, whatever the number of samples (passes over them repeat).
const STEPS: usize = 1000;
const BATCH: usize = 4096;
const LEARNING_RATE: f32 = 1e-3;

/// Position samples: rows of head features and their targets (1: defect).
#[derive(Default)]
struct Samples {
    rows: Vec<f32>,
    targets: Vec<f32>,
}

impl Samples {
    /// Adds positions of head features `[n, dim, h, w]` (flattened): for image `i` every position
    /// whose target is 1 and up to `GOOD_POSITIONS_PER_IMAGE` random others.
    fn add(
        &mut self,
        features: &[f32],
        dims: [usize; 4],
        targets: Option<&[Vec<f32>]>,
        rng: &mut SplitMix,
    ) {
        let [n, dim, h, w] = dims;
        let positions = h * w;
        for image in 0..n {
            let target = |p: usize| targets.map_or(0.0, |t| t[image][p]);
            let mut good: Vec<usize> = (0..positions).filter(|&p| target(p) == 0.0).collect();
            crate::dataset::shuffle(&mut good, rng);
            good.truncate(GOOD_POSITIONS_PER_IMAGE);
            let chosen = (0..positions).filter(|&p| target(p) > 0.0).chain(good);
            for p in chosen {
                let base = image * dim * positions + p;
                self.rows
                    .extend((0..dim).map(|d| features[base + d * positions]));
                self.targets.push(target(p));
            }
        }
    }
}

/// Head features of cached images `indices` of `cache`, 16 at a time, into `samples`.
fn sample_cached(
    cache: &FeatureCache,
    indices: &[usize],
    targets: Option<&[Vec<f32>]>,
    device: &Device,
    samples: &mut Samples,
    rng: &mut SplitMix,
) {
    for (chunk_no, chunk) in indices.chunks(16).enumerate() {
        let features = head_features(&cache.batch(chunk, device));
        let dims = features.dims();
        let chunk_targets = targets.map(|t| &t[chunk_no * 16..chunk_no * 16 + chunk.len()]);
        samples.add(&to_vec(features), dims, chunk_targets, rng);
    }
}

/// Trains the head on `data`'s training images and scales its logit on the held-out ones
/// (`pyramids`, with the STPM map that `options` make).
pub(super) fn train_head(
    data: &Prepared,
    config: &TrainConfig,
    options: &MapOptions,
    pyramids: &[(Pyramid, Pyramid)],
) -> Result<Head, TrainError> {
    let started = Instant::now();
    let size = config.image_size;
    let device = &data.device;
    let mut rng = SplitMix::new(config.seed ^ 0x4845_4144);
    let mut samples = Samples::default();
    sample_cached(
        &data.cache,
        &data.train_idx,
        None,
        device,
        &mut samples,
        &mut rng,
    );

    let originals = &data.train_idx;
    let others: Vec<&[f32]> = originals
        .iter()
        .map(|&i| data.images.pixels[i].as_slice())
        .collect();
    let count = (originals.len() * SYNTHETIC_PER_IMAGE).min(MAX_SYNTHETIC);
    let mut teacher = TeacherRunner::open(&data.teacher, size)?;
    let mut made = 0;
    while made < count {
        let batch = CHUNK.min(count - made);
        let mut pixels = Vec::with_capacity(batch);
        let mut targets = Vec::with_capacity(batch);
        for k in made..made + batch {
            let image = &data.images.pixels[originals[k % originals.len()]];
            let synthetic = paste_defect(image, &others, size, &data.norm, &mut rng);
            targets.push(block_targets(&synthetic.mask, size, HEAD_STRIDE));
            pixels.push(synthetic.pixels);
        }
        let cache = teacher.features(&ImageSet { pixels })?;
        let all: Vec<usize> = (0..batch).collect();
        sample_cached(&cache, &all, Some(&targets), device, &mut samples, &mut rng);
        made += batch;
    }
    let dim = input_channels(data.teacher.kind().tap_channels());
    let defects = samples.targets.iter().filter(|&&t| t > 0.0).count();
    if config.progress {
        log::info!(
            "defect head: {count} synthetic defects, {} positions ({defects} defective) sampled in {:.1} s",
            samples.targets.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let members: Vec<Head> = (0..ENSEMBLE)
        .map(|_| fit(&samples, dim, DEFAULT_HIDDEN, device, &mut rng))
        .collect();
    let mut head = average(&members);
    scale_to_map(&mut head, options, pyramids, size);
    head.weight = config.head_weight;
    if config.progress {
        log::info!(
            "defect head trained in {:.1} s (held-out logit mean {:.3}, divisor {:.3})",
            started.elapsed().as_secs_f64(),
            head.logit_mean,
            head.logit_std,
        );
    }
    Ok(head)
}

/// One perceptron whose logit is the mean of the members' (their hidden layers side by side).
fn average(members: &[Head]) -> Head {
    let k = members.len().max(1) as f32;
    let mut merged = members[0].clone();
    merged.hidden = members.iter().map(|m| m.hidden).sum();
    merged.w1 = members.iter().flat_map(|m| m.w1.iter().copied()).collect();
    merged.b1 = members.iter().flat_map(|m| m.b1.iter().copied()).collect();
    merged.w2 = members
        .iter()
        .flat_map(|m| m.w2.iter().map(|w| w / k))
        .collect();
    merged.b2 = members.iter().map(|m| m.b2).sum::<f32>() / k;
    merged
}

/// Sets the head's logit mean and divisor so that, over the held-out images, its term of the
/// final (blurred) map has mean 0 and the spread of the STPM map itself: at weight 1 the two
/// count alike.
fn scale_to_map(
    head: &mut Head,
    options: &MapOptions,
    pyramids: &[(Pyramid, Pyramid)],
    size: usize,
) {
    let mut unit = head.clone();
    (unit.logit_mean, unit.logit_std, unit.weight) = (0.0, 1.0, 1.0);
    let stpm_only = MapOptions {
        head: None,
        ..options.clone()
    };
    let size = [size, size];
    let low = fusion_size(size, options);
    let mut map = Moments::default();
    let mut term = Moments::default();
    for (teacher, student) in pyramids {
        for v in to_vec(anomaly_map(teacher, student, size, &stpm_only)) {
            map.add(v);
        }
        for v in to_vec(finish(unit.term(teacher, low), size, options)) {
            term.add(v);
        }
    }
    head.logit_mean = term.mean() as f32;
    head.logit_std = ((term.std() / map.std().max(1e-9)) as f32).max(1e-6);
}

/// Running mean and standard deviation.
#[derive(Default)]
struct Moments {
    sum: f64,
    sum_sq: f64,
    n: usize,
}

impl Moments {
    fn add(&mut self, v: f32) {
        self.sum += v as f64;
        self.sum_sq += (v as f64) * (v as f64);
        self.n += 1;
    }

    fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }

    fn std(&self) -> f64 {
        (self.sum_sq / self.n.max(1) as f64 - self.mean().powi(2))
            .max(0.0)
            .sqrt()
    }
}

/// Adam on weighted binary cross-entropy (defect positions weighted by √(good / defective)); the
/// inputs' standardisation is folded into the returned first layer.
fn fit(samples: &Samples, dim: usize, hidden: usize, device: &Device, rng: &mut SplitMix) -> Head {
    let rows = samples.targets.len();
    let (mut mean, mut std) = (vec![0.0f64; dim], vec![0.0f64; dim]);
    for row in samples.rows.chunks_exact(dim) {
        for (d, v) in row.iter().enumerate() {
            mean[d] += *v as f64;
            std[d] += (*v as f64) * (*v as f64);
        }
    }
    let n = rows.max(1) as f64;
    let mean: Vec<f32> = mean.iter().map(|s| (s / n) as f32).collect();
    let std: Vec<f32> = std
        .iter()
        .zip(&mean)
        .map(|(s, m)| ((s / n - (*m as f64).powi(2)).max(0.0).sqrt() as f32).max(1e-6))
        .collect();
    let standardised: Vec<f32> = samples
        .rows
        .iter()
        .enumerate()
        .map(|(i, v)| (v - mean[i % dim]) / std[i % dim])
        .collect();
    let defects = samples.targets.iter().filter(|&&t| t > 0.0).count().max(1);
    let defect_weight = ((rows - defects.min(rows)) as f32 / defects as f32)
        .sqrt()
        .max(1.0);

    // Parameters: w1 [dim, hidden], b1 [hidden], w2 [hidden], b2 [1], flat, with Adam moments.
    let scale1 = (2.0 / dim as f32).sqrt();
    let scale2 = (1.0 / hidden as f32).sqrt();
    let mut params: [Vec<f32>; 4] = [
        (0..dim * hidden).map(|_| normal(rng) * scale1).collect(),
        vec![0.0; hidden],
        (0..hidden).map(|_| normal(rng) * scale2).collect(),
        vec![0.0],
    ];
    let mut first: [Vec<f32>; 4] = std::array::from_fn(|k| vec![0.0; params[k].len()]);
    let mut second = first.clone();
    let mut step = 0;
    let mut order: Vec<usize> = (0..rows).collect();
    'passes: loop {
        crate::dataset::shuffle(&mut order, rng);
        for batch in order.chunks(BATCH) {
            if step == STEPS {
                break 'passes;
            }
            let b = batch.len();
            let mut x = Vec::with_capacity(b * dim);
            let mut y = Vec::with_capacity(b);
            for &r in batch {
                x.extend_from_slice(&standardised[r * dim..(r + 1) * dim]);
                y.push(samples.targets[r]);
            }
            let tensor = |values: Vec<f32>, shape: [usize; 2]| {
                Tensor::<2>::from_data(TensorData::new(values, shape), device)
            };
            let x = tensor(x, [b, dim]);
            let y = tensor(y, [b, 1]);
            let w1 = tensor(params[0].clone(), [dim, hidden]);
            let b1 = tensor(params[1].clone(), [1, hidden]);
            let w2 = tensor(params[2].clone(), [hidden, 1]);
            let h = relu(x.clone().matmul(w1) + b1);
            let z = h.clone().matmul(w2.clone()).add_scalar(params[3][0]);
            let weight = y.clone().mul_scalar(defect_weight - 1.0).add_scalar(1.0);
            let gz = (sigmoid(z) - y) * weight / b as f32;
            let gw2 = h.clone().transpose().matmul(gz.clone());
            let gb2 = gz.clone().sum();
            let gh = gz.matmul(w2.transpose()) * h.greater_elem(0.0).float();
            let gw1 = x.transpose().matmul(gh.clone());
            let gb1 = gh.sum_dim(0);
            let grads = [to_vec(gw1), to_vec(gb1), to_vec(gw2), to_vec(gb2)];
            step += 1;
            let (c1, c2) = (
                1.0 - 0.9f32.powi(step as i32),
                1.0 - 0.999f32.powi(step as i32),
            );
            for k in 0..4 {
                for (i, g) in grads[k].iter().enumerate() {
                    first[k][i] = 0.9 * first[k][i] + 0.1 * g;
                    second[k][i] = 0.999 * second[k][i] + 0.001 * g * g;
                    params[k][i] -=
                        LEARNING_RATE * (first[k][i] / c1) / ((second[k][i] / c2).sqrt() + 1e-8);
                }
            }
        }
    }
    // Fold (x − mean) / std into the first layer, stored [hidden, dim].
    let [w1, b1, w2, b2] = params;
    let mut folded_w1 = vec![0.0; hidden * dim];
    let mut folded_b1 = b1;
    for h in 0..hidden {
        for d in 0..dim {
            let w = w1[d * hidden + h] / std[d];
            folded_w1[h * dim + d] = w;
            folded_b1[h] -= w * mean[d];
        }
    }
    Head {
        inputs: dim,
        hidden,
        w1: folded_w1,
        b1: folded_b1,
        w2,
        b2: b2[0],
        logit_mean: 0.0,
        logit_std: 1.0,
        weight: 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compute_device;

    #[test]
    fn the_perceptron_learns_a_separable_rule_and_folds_its_standardisation() {
        // Defect when the first input exceeds 5 (inputs far from zero mean and unit spread, so the
        // folding matters).
        let mut rng = SplitMix::new(1);
        let mut samples = Samples::default();
        for _ in 0..3000 {
            let a = 5.0 + 2.0 * normal(&mut rng);
            let b = -20.0 + 10.0 * normal(&mut rng);
            samples.rows.extend([a, b]);
            samples.targets.push(if a > 5.5 { 1.0 } else { 0.0 });
        }
        let device = compute_device();
        let head = fit(&samples, 2, 8, &device, &mut rng);
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![3.0, 8.0, -20.0, -20.0], [1, 2, 1, 2]),
            &device,
        );
        let logits = to_vec(head.logits(x.clone()));
        assert!(logits[0] < 0.0 && logits[1] > 0.0, "{logits:?}");

        // Averaging two heads averages their logits.
        let other = fit(&samples, 2, 8, &device, &mut rng);
        let both = average(&[head.clone(), other.clone()]);
        assert_eq!(both.hidden, 16);
        let second = to_vec(other.logits(x.clone()));
        let mean = to_vec(both.logits(x));
        for i in 0..2 {
            let expected = (logits[i] + second[i]) / 2.0;
            assert!(
                (mean[i] - expected).abs() < 1e-4,
                "{} vs {expected}",
                mean[i]
            );
        }
    }
}
