//! Reading pretrained teacher weights from PyTorch `.pth` files into our backbones, and reporting
//! exactly which parameters were missing, unexpected or mis-shaped. Nothing here trains.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use burn::store::{ApplyError, ModuleSnapshot, ModuleStore, PytorchStore, SafetensorsStore};

use super::backbone::{Backbone, BackboneKind};
use super::efficientnet::EfficientNetLite;
use super::resnet::ResNet18;

/// What went wrong reading a weights file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot read {path} as a PyTorch state dict: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}")]
    Save { path: PathBuf, message: String },
    #[error("{path} does not fit a {kind} network:{}", describe_mismatch(.missing, .unexpected, .misshaped))]
    Mismatch {
        path: PathBuf,
        kind: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
        misshaped: Vec<String>,
    },
}

fn describe_mismatch(missing: &[String], unexpected: &[String], misshaped: &[String]) -> String {
    let mut text = String::new();
    for (title, names) in [
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ] {
        if !names.is_empty() {
            text.push_str(&format!(
                "\n  {} {} key(s): {}",
                names.len(),
                title,
                names.join(", ")
            ));
        }
    }
    text
}

/// Parameters present in a full-network checkpoint that a truncated backbone does not use.
fn unused_by_design(kind: BackboneKind, key: &str, with_head: bool) -> bool {
    if key.ends_with("num_batches_tracked") {
        return true;
    }
    match kind {
        BackboneKind::EfficientNetLite0 => {
            if with_head {
                return false;
            }
            let block = key
                .strip_prefix("blocks.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|index| index.parse::<usize>().ok());
            matches!(block, Some(index) if index > super::efficientnet::TAP_BLOCKS[2])
                || key.starts_with("conv_head.")
                || key.starts_with("bn1.")
                || key.starts_with("fc.")
        }
        BackboneKind::ResNet18 => key.starts_with("layer4.") || key.starts_with("fc."),
    }
}

/// A parameter path of ours as the key the PyTorch checkpoint uses, so messages name what the user
/// can find in their file (`blocks.0.bn1.gamma` → `_blocks.0._bn1.weight`).
pub fn pytorch_name(kind: BackboneKind, path: &str) -> String {
    let segments: Vec<&str> = path.split('.').collect();
    let last = segments.len().saturating_sub(1);
    let mapped: Vec<String> = segments
        .iter()
        .enumerate()
        .map(|(i, segment)| {
            let segment = match (i == last, *segment) {
                (true, "gamma") => "weight",
                (true, "beta") => "bias",
                (_, "conv") if i > 0 && segments[i - 1] == "downsample" => "0",
                (_, "bn") if i > 0 && segments[i - 1] == "downsample" => "1",
                (_, other) => other,
            };
            let is_module = i != last && segment.parse::<usize>().is_err();
            if kind == BackboneKind::EfficientNetLite0 && is_module {
                format!("_{segment}")
            } else {
                segment.to_string()
            }
        })
        .collect();
    mapped.join(".")
}

/// The file's own spelling of `remapped` keys (only computed when there is something to report).
fn original_names(path: &Path, remaps: &[(&str, &str)], remapped: Vec<String>) -> Vec<String> {
    if remapped.is_empty() {
        return remapped;
    }
    let Ok(keys) = PytorchStore::from_file(path).keys() else {
        return remapped;
    };
    let patterns: Vec<(regex::Regex, &str)> = remaps
        .iter()
        .filter_map(|(from, to)| regex::Regex::new(from).ok().map(|re| (re, *to)))
        .collect();
    let remap = |key: &str| {
        patterns.iter().fold(key.to_string(), |name, (re, to)| {
            re.replace_all(&name, *to).into_owned()
        })
    };
    remapped
        .into_iter()
        .map(|name| {
            keys.iter()
                .find(|key| remap(key) == name)
                .cloned()
                .unwrap_or(name)
        })
        .collect()
}

/// Loads `path` into `module`, remapping PyTorch names with `remaps` (regex, replacement) first.
fn load_into<M: Module + ModuleSnapshot>(
    mut module: M,
    path: &Path,
    kind: BackboneKind,
    with_head: bool,
    remaps: &[(&str, &str)],
) -> Result<M, WeightsError> {
    if !path.is_file() {
        return Err(WeightsError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let mut store = PytorchStore::from_file(path)
        .allow_partial(true)
        .validate(false)
        .map_indices_contiguous(false);
    for (from, to) in remaps {
        store = store.with_key_remapping(*from, *to);
    }
    let result = module
        .load_from(&mut store)
        .map_err(|error| WeightsError::Unreadable {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;

    let missing: Vec<String> = result
        .missing
        .iter()
        .map(|(name, _)| pytorch_name(kind, name))
        .collect();
    let unexpected: Vec<String> = result
        .unused
        .iter()
        .filter(|name| !unused_by_design(kind, name, with_head))
        .cloned()
        .collect();
    let unexpected = original_names(path, remaps, unexpected);
    let misshaped: Vec<String> = result
        .errors
        .iter()
        .map(|error| match error {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => {
                format!(
                    "{path} (expected {:?}, found {:?})",
                    expected.as_slice(),
                    found.as_slice()
                )
            }
            other => other.to_string(),
        })
        .collect();
    if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
        Ok(module)
    } else {
        Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            kind: kind.name().to_string(),
            missing,
            unexpected,
            misshaped,
        })
    }
}

/// PyTorch names of `efficientnet-lite-pytorch` carry a leading underscore (`_blocks.0._bn1`).
const LITE_REMAPS: [(&str, &str); 2] = [(r"^_", ""), (r"\._", ".")];
/// torchvision's shortcut is an `nn.Sequential` (`downsample.0`, `downsample.1`).
const RESNET_REMAPS: [(&str, &str); 2] = [
    (r"\.downsample\.0\.", ".downsample.conv."),
    (r"\.downsample\.1\.", ".downsample.bn."),
];

/// A pretrained feature extractor of `kind` from a `.pth` state dict.
pub fn load_backbone(
    kind: BackboneKind,
    path: &Path,
    device: &Device,
) -> Result<Backbone, WeightsError> {
    Ok(match kind {
        BackboneKind::EfficientNetLite0 => Backbone::EfficientNetLite0(load_into(
            EfficientNetLite::features(device),
            path,
            kind,
            false,
            &LITE_REMAPS,
        )?),
        BackboneKind::ResNet18 => Backbone::ResNet18(load_into(
            ResNet18::features(device),
            path,
            kind,
            false,
            &RESNET_REMAPS,
        )?),
    })
}

/// The complete EfficientNet-Lite0 ImageNet classifier from a `.pth` state dict.
pub fn load_lite0_classifier(
    path: &Path,
    device: &Device,
) -> Result<EfficientNetLite, WeightsError> {
    load_into(
        EfficientNetLite::classifier(device),
        path,
        BackboneKind::EfficientNetLite0,
        true,
        &LITE_REMAPS,
    )
}

/// Writes a backbone's parameters and BatchNorm statistics as safetensors.
pub fn save_safetensors(backbone: &Backbone, path: &Path) -> Result<(), WeightsError> {
    let mut store = SafetensorsStore::from_file(path).overwrite(true);
    backbone
        .save_into(&mut store)
        .map_err(|e| WeightsError::Save {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Reads a backbone written by [`save_safetensors`] (a bundle's student or random teacher).
pub fn load_safetensors(
    kind: BackboneKind,
    path: &Path,
    device: &Device,
) -> Result<Backbone, WeightsError> {
    if !path.is_file() {
        return Err(WeightsError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let mut backbone = kind.init(device);
    let mut store = SafetensorsStore::from_file(path)
        .allow_partial(true)
        .validate(false);
    let result = backbone
        .load_from(&mut store)
        .map_err(|e| WeightsError::Unreadable {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if result.missing.is_empty() && result.errors.is_empty() && result.unused.is_empty() {
        return Ok(backbone);
    }
    Err(WeightsError::Mismatch {
        path: path.to_path_buf(),
        kind: kind.name().to_string(),
        missing: result
            .missing
            .iter()
            .map(|(name, _)| name.clone())
            .collect(),
        unexpected: result.unused.clone(),
        misshaped: result.errors.iter().map(|e| e.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_use_the_checkpoint_names() {
        let lite = BackboneKind::EfficientNetLite0;
        assert_eq!(
            pytorch_name(lite, "blocks.0.bn1.gamma"),
            "_blocks.0._bn1.weight"
        );
        assert_eq!(pytorch_name(lite, "conv_stem.weight"), "_conv_stem.weight");
        assert_eq!(pytorch_name(lite, "bn0.running_var"), "_bn0.running_var");
        let resnet = BackboneKind::ResNet18;
        assert_eq!(
            pytorch_name(resnet, "layer2.0.downsample.bn.beta"),
            "layer2.0.downsample.1.bias"
        );
        assert_eq!(
            pytorch_name(resnet, "layer2.0.downsample.conv.weight"),
            "layer2.0.downsample.0.weight"
        );
        assert_eq!(
            pytorch_name(resnet, "layer1.1.bn2.running_mean"),
            "layer1.1.bn2.running_mean"
        );
    }
}
