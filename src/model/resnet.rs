//! ResNet-18 in torchvision's layout (parameter names match its state dict), truncated after
//! `layer3`. Owns the architecture and forward pass; weights come from a user-supplied `.pth`.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;

use super::features::Pyramid;

/// Channels of layer1..layer3 (strides 4, 8, 16).
pub const TAP_CHANNELS: [usize; 3] = [64, 128, 256];

fn conv(
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new([input, output], [kernel, kernel])
        .with_stride([stride, stride])
        .with_bias(false)
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init(device)
}

fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).init(device)
}

fn relu(x: Tensor<4>) -> Tensor<4> {
    burn::tensor::activation::relu(x)
}

/// The 1×1 projection on a block's shortcut (torchvision `downsample.0` / `downsample.1`).
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

/// torchvision `BasicBlock`.
#[derive(Module, Debug)]
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub downsample: Option<Downsample>,
    pub stride: usize,
}

impl BasicBlock {
    fn new(input: usize, output: usize, stride: usize, device: &Device) -> Self {
        let downsample = (stride != 1 || input != output).then(|| Downsample {
            conv: conv(input, output, 1, stride, 0, device),
            bn: batch_norm(output, device),
        });
        Self {
            conv1: conv(input, output, 3, stride, 1, device),
            bn1: batch_norm(output, device),
            conv2: conv(output, output, 3, 1, 1, device),
            bn2: batch_norm(output, device),
            downsample,
            stride,
        }
    }

    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = relu(self.bn1.forward(self.conv1.forward(input.clone())));
        let x = self.bn2.forward(self.conv2.forward(x));
        let shortcut = match &self.downsample {
            Some(down) => down.bn.forward(down.conv.forward(input)),
            None => input,
        };
        relu(x + shortcut)
    }
}

/// ResNet-18 up to `layer3`.
#[derive(Module, Debug)]
pub struct ResNet18 {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub maxpool: MaxPool2d,
    pub layer1: Vec<BasicBlock>,
    pub layer2: Vec<BasicBlock>,
    pub layer3: Vec<BasicBlock>,
}

impl ResNet18 {
    /// The feature extractor, randomly initialised.
    pub fn features(device: &Device) -> Self {
        let layer = |input: usize, output: usize, stride: usize| {
            vec![
                BasicBlock::new(input, output, stride, device),
                BasicBlock::new(output, output, 1, device),
            ]
        };
        Self {
            conv1: conv(3, 64, 7, 2, 3, device),
            bn1: batch_norm(64, device),
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layer1: layer(64, 64, 1),
            layer2: layer(64, 128, 2),
            layer3: layer(128, 256, 2),
        }
    }

    /// layer1, layer2 and layer3 outputs (strides 4, 8, 16).
    pub fn pyramid(&self, image: Tensor<4>) -> Pyramid {
        let x = relu(self.bn1.forward(self.conv1.forward(image)));
        let x = self.maxpool.forward(x);
        let run = |blocks: &[BasicBlock], x: Tensor<4>| {
            blocks.iter().fold(x, |x, block| block.forward(x))
        };
        let stride4 = run(&self.layer1, x);
        let stride8 = run(&self.layer2, stride4.clone());
        let stride16 = run(&self.layer3, stride8.clone());
        Pyramid([stride4, stride8, stride16])
    }
}
