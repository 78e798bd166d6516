//! The defect head: a small per-position classifier on the frozen teacher's features, trained on
//! good images with synthetic defects pasted in (`train::head`), whose standardised logit is added
//! to the STPM map. Owns the head's input features, its weights and its forward pass; the exported
//! graph mirrors both (`onnx`).

use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{avg_pool2d, conv2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions};

use super::features::{Pyramid, l2_normalize, upsample};

/// The head works at stride 8: stride-4 features are averaged over 2×2, stride-16 ones upsampled.
pub const HEAD_STRIDE: usize = 8;
/// Hidden units of the head's one hidden layer.
pub const DEFAULT_HIDDEN: usize = 64;
/// The weight of the head's standardised logit in the map unless `stpm train --head-weight` says
/// otherwise (0: no head).
pub const DEFAULT_HEAD_WEIGHT: f32 = 1.0;

/// Channels of the head's input: the three taps side by side.
pub fn input_channels(tap_channels: [usize; 3]) -> usize {
    tap_channels.iter().sum()
}

/// The head's input [N, C4 + C8 + C16, H/8, W/8]: each teacher tap L2-normalised per position,
/// brought to stride 8 (2×2 mean, identity, bilinear ×2), side by side, then averaged over each
/// position's 3×3 neighbourhood (inside the map only) so that a position sees a little context.
pub fn head_features(teacher: &Pyramid) -> Tensor<4> {
    let [t4, t8, t16] = teacher.0.clone();
    let [_, _, h, w] = t8.dims();
    let pooled = avg_pool2d(l2_normalize(t4), AvgPoolOptions::new([2, 2]));
    let up = upsample(l2_normalize(t16), [h, w]);
    let side_by_side = Tensor::cat(vec![pooled, l2_normalize(t8), up], 1);
    avg_pool2d(
        side_by_side,
        AvgPoolOptions::new([3, 3])
            .with_stride([1, 1])
            .with_padding([1, 1])
            .with_count_include_pad(false),
    )
}

/// A trained head: input standardisation folded into the first layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Input channels.
    pub inputs: usize,
    /// Hidden ReLU units (the averaged perceptrons' side by side).
    pub hidden: usize,
    /// First layer: weights [hidden, inputs], row-major, and biases [hidden].
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    /// Output layer: weights [hidden] and bias.
    pub w2: Vec<f32>,
    pub b2: f32,
    /// The mean of the head's (blurred, upsampled) logit over the held-out good images, and its
    /// divisor: that term's spread there over the STPM map's, so that at weight 1 both count alike.
    pub logit_mean: f32,
    pub logit_std: f32,
    /// What the standardised logit is multiplied by before it joins the map.
    pub weight: f32,
}

impl Head {
    /// The logit map [N, 1, h, w] of head features [N, inputs, h, w].
    pub fn logits(&self, features: Tensor<4>) -> Tensor<4> {
        let device = features.device();
        let w1 = Tensor::<4>::from_data(
            TensorData::new(self.w1.clone(), [self.hidden, self.inputs, 1, 1]),
            &device,
        );
        let b1 = Tensor::<1>::from_data(TensorData::new(self.b1.clone(), [self.hidden]), &device);
        let w2 = Tensor::<4>::from_data(
            TensorData::new(self.w2.clone(), [1, self.hidden, 1, 1]),
            &device,
        );
        let b2 = Tensor::<1>::from_data(TensorData::new(vec![self.b2], [1]), &device);
        let options = || ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        let hidden = relu(conv2d(features, w1, Some(b1), options()));
        conv2d(hidden, w2, Some(b2), options())
    }

    /// The head's term of the map at `size`: weight · (logit − mean) / std, bilinearly upsampled.
    pub fn term(&self, teacher: &Pyramid, size: [usize; 2]) -> Tensor<4> {
        let logits = self.logits(head_features(teacher));
        upsample(logits, size)
            .sub_scalar(self.logit_mean)
            .mul_scalar(self.weight / self.logit_std.max(f32::EPSILON))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::compute_device;
    use crate::model::to_vec;

    #[test]
    fn features_have_every_tap_at_stride_8_with_unit_length_parts() {
        let device = compute_device();
        // Each tap points one way everywhere (its own direction), so the 2×2 and 3×3 means of its
        // unit vectors are that unit vector again.
        let tap = |c: usize, s: usize| {
            let values: Vec<f32> = (0..c * s * s).map(|i| 1.0 + (i / (s * s)) as f32).collect();
            Tensor::<4>::from_data(TensorData::new(values, [1, c, s, s]), &device)
        };
        let features = head_features(&Pyramid([tap(2, 8), tap(3, 4), tap(4, 2)]));
        assert_eq!(features.dims(), [1, 9, 4, 4]);
        let values = to_vec(features);
        for position in 0..16 {
            for (start, channels) in [(0, 2), (2, 3), (5, 4)] {
                let norm: f32 = (0..channels)
                    .map(|c| values[(start + c) * 16 + position].powi(2))
                    .sum::<f32>()
                    .sqrt();
                assert!(
                    (norm - 1.0).abs() < 1e-5,
                    "position {position}: norm {norm}"
                );
            }
        }
    }

    #[test]
    fn logits_are_the_two_layer_perceptron_at_each_position() {
        let device = compute_device();
        let head = Head {
            inputs: 2,
            hidden: 2,
            w1: vec![1.0, -1.0, 0.5, 0.5],
            b1: vec![0.0, -1.0],
            w2: vec![2.0, 3.0],
            b2: 0.25,
            logit_mean: 0.0,
            logit_std: 1.0,
            weight: 1.0,
        };
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![3.0, 1.0, 2.0, 4.0], [1, 2, 1, 2]),
            &device,
        );
        // position 0: x = (3, 2): hidden relu(1) = 1, relu(2.5 - 1) = 1.5 → 2 + 4.5 + 0.25
        // position 1: x = (1, 4): hidden relu(-3) = 0, relu(2.5 - 1) = 1.5 → 4.5 + 0.25
        let got = to_vec(head.logits(x));
        assert_eq!(got, vec![6.75, 4.75]);
    }
}
