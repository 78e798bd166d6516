//! EfficientNet-Lite0 in the layout of PyPI `efficientnet-lite-pytorch` (same parameter names, so its
//! `.pth` loads by name). Owns the architecture and its forward pass; not the weight loading.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use super::features::Pyramid;

/// BatchNorm epsilon of the TensorFlow-converted Lite weights.
const BN_EPS: f64 = 1e-3;
/// Running-statistics momentum for training. Upstream uses 0.01 (TensorFlow's 0.99 decay), fine
/// for its hundreds of thousands of steps; a student trained for a few hundred steps kept running
/// statistics near their initial values with it, and its held-out loss in inference mode was twice
/// its training loss. PyTorch's default 0.1 (as the STPM reference ResNet) fixes that. Inference and
/// the frozen teacher do not depend on it.
const BN_MOMENTUM: f64 = 0.1;
const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;
const NUM_CLASSES: usize = 1000;

/// One stage of MBConv blocks: (repeats, kernel, stride, expand ratio, in channels, out channels).
#[derive(Debug, Clone, Copy)]
pub struct StageSpec {
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub input: usize,
    pub output: usize,
}

/// The seven stages of EfficientNet-Lite0 (`efficientnet_lite_builder.py`, no squeeze-excitation).
pub const LITE0_STAGES: [StageSpec; 7] = [
    StageSpec {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand: 1,
        input: 32,
        output: 16,
    },
    StageSpec {
        repeats: 2,
        kernel: 3,
        stride: 2,
        expand: 6,
        input: 16,
        output: 24,
    },
    StageSpec {
        repeats: 2,
        kernel: 5,
        stride: 2,
        expand: 6,
        input: 24,
        output: 40,
    },
    StageSpec {
        repeats: 3,
        kernel: 3,
        stride: 2,
        expand: 6,
        input: 40,
        output: 80,
    },
    StageSpec {
        repeats: 3,
        kernel: 5,
        stride: 1,
        expand: 6,
        input: 80,
        output: 112,
    },
    StageSpec {
        repeats: 4,
        kernel: 5,
        stride: 2,
        expand: 6,
        input: 112,
        output: 192,
    },
    StageSpec {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand: 6,
        input: 192,
        output: 320,
    },
];

/// Stages kept by the feature extractor: up to and including the stride-16 stage (112 channels).
pub const FEATURE_STAGES: usize = 5;

/// Block indices whose outputs are the stride-4, -8 and -16 feature maps.
pub const TAP_BLOCKS: [usize; 3] = [2, 4, 10];

/// Channels of the three tapped feature maps.
pub const TAP_CHANNELS: [usize; 3] = [24, 40, 112];

/// TensorFlow "SAME" padding as (top, left, bottom, right) for an input whose size is a multiple of
/// the stride: stride-2 layers pad one more pixel at the bottom/right than at the top/left.
pub fn same_padding(kernel: usize, stride: usize) -> [usize; 4] {
    let total = if stride == 1 {
        kernel - 1
    } else {
        kernel.saturating_sub(stride)
    };
    let before = total / 2;
    let after = total - before;
    [before, before, after, after]
}

fn conv(
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    let [top, left, bottom, right] = same_padding(kernel, stride);
    Conv2dConfig::new([input, output], [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_bias(false)
        .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
        .init(device)
}

fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels)
        .with_epsilon(BN_EPS)
        .with_momentum(BN_MOMENTUM)
        .init(device)
}

/// ReLU6, the Lite activation (chosen upstream for easier quantisation). `relu` is a native op
/// with a one-pass backward; a two-sided `clamp` decomposes into two compares and two masked fills
/// each way.
pub fn relu6(x: Tensor<4>) -> Tensor<4> {
    burn::tensor::activation::relu(x).clamp_max(6.0)
}

/// Mobile inverted bottleneck block without squeeze-excitation.
#[derive(Module, Debug)]
pub struct MbConv {
    pub expand_conv: Option<Conv2d>,
    pub bn0: Option<BatchNorm>,
    pub depthwise_conv: Conv2d,
    pub bn1: BatchNorm,
    pub project_conv: Conv2d,
    pub bn2: BatchNorm,
    pub kernel: usize,
    pub stride: usize,
    pub residual: bool,
}

impl MbConv {
    fn new(
        input: usize,
        output: usize,
        kernel: usize,
        stride: usize,
        expand: usize,
        device: &Device,
    ) -> Self {
        let hidden = input * expand;
        let (expand_conv, bn0) = if expand == 1 {
            (None, None)
        } else {
            (
                Some(conv(input, hidden, 1, 1, 1, device)),
                Some(batch_norm(hidden, device)),
            )
        };
        Self {
            expand_conv,
            bn0,
            depthwise_conv: conv(hidden, hidden, kernel, stride, hidden, device),
            bn1: batch_norm(hidden, device),
            project_conv: conv(hidden, output, 1, 1, 1, device),
            bn2: batch_norm(output, device),
            kernel,
            stride,
            residual: stride == 1 && input == output,
        }
    }

    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let (Some(expand_conv), Some(bn0)) = (&self.expand_conv, &self.bn0) {
            x = relu6(bn0.forward(expand_conv.forward(x)));
        }
        x = relu6(self.bn1.forward(self.depthwise_conv.forward(x)));
        x = self.bn2.forward(self.project_conv.forward(x));
        if self.residual { x + input } else { x }
    }
}

/// EfficientNet-Lite0, either truncated after the stride-16 stage (feature extractor) or complete
/// with its ImageNet classifier head.
#[derive(Module, Debug)]
pub struct EfficientNetLite {
    pub conv_stem: Conv2d,
    pub bn0: BatchNorm,
    pub blocks: Vec<MbConv>,
    pub conv_head: Option<Conv2d>,
    pub bn1: Option<BatchNorm>,
    pub fc: Option<Linear>,
}

impl EfficientNetLite {
    /// The feature extractor: stem and stages 1–5 (randomly initialised).
    pub fn features(device: &Device) -> Self {
        Self::build(FEATURE_STAGES, false, device)
    }

    /// The whole ImageNet classifier (randomly initialised).
    pub fn classifier(device: &Device) -> Self {
        Self::build(LITE0_STAGES.len(), true, device)
    }

    fn build(stages: usize, with_head: bool, device: &Device) -> Self {
        let mut blocks = Vec::new();
        for stage in &LITE0_STAGES[..stages] {
            for repeat in 0..stage.repeats {
                let (input, stride) = if repeat == 0 {
                    (stage.input, stage.stride)
                } else {
                    (stage.output, 1)
                };
                blocks.push(MbConv::new(
                    input,
                    stage.output,
                    stage.kernel,
                    stride,
                    stage.expand,
                    device,
                ));
            }
        }
        let last = LITE0_STAGES[stages - 1].output;
        Self {
            conv_stem: conv(3, STEM_CHANNELS, 3, 2, 1, device),
            bn0: batch_norm(STEM_CHANNELS, device),
            blocks,
            conv_head: with_head.then(|| conv(last, HEAD_CHANNELS, 1, 1, 1, device)),
            bn1: with_head.then(|| batch_norm(HEAD_CHANNELS, device)),
            fc: with_head.then(|| LinearConfig::new(HEAD_CHANNELS, NUM_CLASSES).init(device)),
        }
    }

    fn stem(&self, image: Tensor<4>) -> Tensor<4> {
        relu6(self.bn0.forward(self.conv_stem.forward(image)))
    }

    /// The stride-4/8/16 feature maps (24, 40 and 112 channels).
    pub fn pyramid(&self, image: Tensor<4>) -> Pyramid {
        let run = |range: std::ops::RangeInclusive<usize>, x: Tensor<4>| {
            self.blocks[range]
                .iter()
                .fold(x, |x, block| block.forward(x))
        };
        let stride4 = run(0..=TAP_BLOCKS[0], self.stem(image));
        let stride8 = run(TAP_BLOCKS[0] + 1..=TAP_BLOCKS[1], stride4.clone());
        let stride16 = run(TAP_BLOCKS[1] + 1..=TAP_BLOCKS[2], stride8.clone());
        Pyramid([stride4, stride8, stride16])
    }

    /// ImageNet logits [N, 1000]; `None` when this network was built without its head.
    pub fn logits(&self, image: Tensor<4>) -> Option<Tensor<2>> {
        let (conv_head, bn1, fc) = (
            self.conv_head.as_ref()?,
            self.bn1.as_ref()?,
            self.fc.as_ref()?,
        );
        let mut x = self.stem(image);
        for block in &self.blocks {
            x = block.forward(x);
        }
        let x = relu6(bn1.forward(conv_head.forward(x)));
        let [n, c, _, _] = x.dims();
        let pooled = burn::tensor::module::adaptive_avg_pool2d(x, [1, 1]).reshape([n, c]);
        Some(fc.forward(pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorflow_same_padding() {
        // Stride 2 pads one more at the end (as the PyTorch port's static padding for even sizes).
        assert_eq!(same_padding(3, 2), [0, 0, 1, 1]);
        assert_eq!(same_padding(5, 2), [1, 1, 2, 2]);
        assert_eq!(same_padding(3, 1), [1, 1, 1, 1]);
        assert_eq!(same_padding(5, 1), [2, 2, 2, 2]);
        assert_eq!(same_padding(1, 1), [0, 0, 0, 0]);
    }

    #[test]
    fn feature_extractor_has_eleven_blocks_and_trainable_statistics() {
        let net = EfficientNetLite::features(&crate::model::compute_device());
        assert_eq!(net.blocks.len(), TAP_BLOCKS[2] + 1);
        assert!(net.conv_head.is_none() && net.fc.is_none());
        // A short distillation needs running statistics that follow the batches (see BN_MOMENTUM).
        assert_eq!(net.blocks[4].bn1.momentum, 0.1);
        assert_eq!(net.blocks[4].bn1.epsilon, 1e-3);
        let residual: Vec<usize> = (0..net.blocks.len())
            .filter(|&i| net.blocks[i].residual)
            .collect();
        assert_eq!(residual, vec![2, 4, 6, 7, 9, 10]);
    }
}
