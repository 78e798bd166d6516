//! A bundle's defect-head file (`[model.head]`): the head's weights as safetensors, its logit
//! statistics and weight in the manifest. Written by training, read (hash checked) by every command
//! that rebuilds the map.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::BundleError;
use super::tensors::{F32Tensors, write_f32};
use crate::model::head::Head;

/// `[model.head]`: where the defect head's weights are kept, and how its logit joins the map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadSection {
    /// File name inside the bundle (safetensors: `w1` [hidden, inputs], `b1` [hidden], `w2`
    /// [hidden], `b2` [1]).
    pub file: String,
    /// sha256 of that file, checked when it is read.
    pub sha256: String,
    /// The mean of the head's (blurred, upsampled) term over the held-out good images, and its
    /// divisor: that term's spread there over the STPM map's (at weight 1 both count alike).
    pub logit_mean: f32,
    pub logit_std: f32,
    /// The standardised logit's weight in the map (`stpm train --head-weight`).
    pub weight: f32,
}

/// Writes the head's weights; returns the bytes written.
pub fn write_head(head: &Head, path: &Path) -> Result<Vec<u8>, BundleError> {
    let tensors = [
        (
            "w1".to_string(),
            vec![head.hidden, head.inputs],
            head.w1.as_slice(),
        ),
        ("b1".to_string(), vec![head.hidden], head.b1.as_slice()),
        ("w2".to_string(), vec![head.hidden], head.w2.as_slice()),
        ("b2".to_string(), vec![1], std::slice::from_ref(&head.b2)),
    ];
    write_f32(path, &tensors, |message| BundleError::Head {
        path: path.to_path_buf(),
        message,
    })
}

/// Reads a file written by [`write_head`] (checking names, types and shapes) into the head that
/// `section` describes.
pub fn read_head(bytes: &[u8], path: &Path, section: &HeadSection) -> Result<Head, BundleError> {
    let invalid = |message: String| BundleError::Head {
        path: path.to_path_buf(),
        message,
    };
    let tensors = F32Tensors::parse(bytes).map_err(invalid)?;
    let b1 = tensors.read("b1", None).map_err(invalid)?;
    let hidden = b1.len();
    let w2 = tensors.read("w2", Some(&[hidden])).map_err(invalid)?;
    let w1 = tensors.read("w1", None).map_err(invalid)?;
    if hidden == 0 || w1.len() % hidden != 0 {
        return Err(invalid(format!(
            "`w1` has {} values, not a multiple of the {hidden} hidden units",
            w1.len()
        )));
    }
    let inputs = w1.len() / hidden;
    tensors
        .read("w1", Some(&[hidden, inputs]))
        .map_err(invalid)?;
    let b2 = tensors.read("b2", Some(&[1])).map_err(invalid)?;
    if !(section.logit_std.is_finite()
        && section.logit_std > 0.0
        && section.logit_mean.is_finite()
        && section.weight.is_finite())
    {
        return Err(invalid(format!(
            "the manifest's logit statistics or weight are not usable (mean {}, divisor {}, weight {})",
            section.logit_mean, section.logit_std, section.weight
        )));
    }
    Ok(Head {
        inputs,
        hidden,
        w1,
        b1,
        w2,
        b2: b2[0],
        logit_mean: section.logit_mean,
        logit_std: section.logit_std,
        weight: section.weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_file_round_trips_and_reports_what_is_wrong() {
        let head = Head {
            inputs: 3,
            hidden: 2,
            w1: vec![0.5, -1.0, 2.0, 0.25, 0.0, -0.75],
            b1: vec![0.1, -0.2],
            w2: vec![1.5, -2.5],
            b2: 0.3,
            logit_mean: -1.0,
            logit_std: 2.0,
            weight: 1.0,
        };
        let section = HeadSection {
            file: "head.safetensors".into(),
            sha256: String::new(),
            logit_mean: -1.0,
            logit_std: 2.0,
            weight: 1.0,
        };
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("head.safetensors");
        let bytes = write_head(&head, &path).expect("write");
        assert_eq!(read_head(&bytes, &path, &section).expect("read back"), head);

        let error = read_head(b"junk", &path, &section).expect_err("garbage");
        assert!(
            error.to_string().contains("not a valid defect-head file"),
            "{error}"
        );
        let no_spread = HeadSection {
            logit_std: 0.0,
            ..section.clone()
        };
        let error = read_head(&bytes, &path, &no_spread).expect_err("std 0");
        assert!(
            error.to_string().contains("logit statistics or weight"),
            "{error}"
        );
        let tensors = [
            ("w1".to_string(), vec![2, 3], head.w1.as_slice()),
            ("b1".to_string(), vec![2], head.b1.as_slice()),
            ("w2".to_string(), vec![3], &[1.0, 2.0, 3.0][..]),
            ("b2".to_string(), vec![1], &[0.0][..]),
        ];
        let bytes = write_f32(&path, &tensors, |message| BundleError::Head {
            path: path.clone(),
            message,
        })
        .expect("write");
        let error = read_head(&bytes, &path, &section).expect_err("w2 too long");
        assert!(error.to_string().contains("`w2` has shape [3]"), "{error}");
    }
}
