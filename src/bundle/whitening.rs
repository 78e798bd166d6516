//! A bundle's whitening file (`[model.whitening]`): the `whitened` fusion's per-scale mean and
//! matrix as safetensors, written by training and read, checked, by every command that scores.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::BundleError;
use super::tensors::{F32Tensors, write_f32};
use crate::model::features::{ScaleWhitening, Whitening};

/// `[model.whitening]`: where the `whitened` fusion's per-scale μ and W are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WhiteningSection {
    /// File name inside the bundle (safetensors: `mean.<scale>` [C] and `matrix.<scale>` [C, C]).
    pub file: String,
    /// sha256 of that file, checked when it is read.
    pub sha256: String,
}

/// Writes a whitening as safetensors (f32, `mean.<scale>` and `matrix.<scale>`); returns the bytes.
pub fn write_whitening(whitening: &Whitening, path: &Path) -> Result<Vec<u8>, BundleError> {
    let mut tensors = Vec::new();
    for (scale, w) in whitening.0.iter().enumerate() {
        let c = w.channels();
        tensors.push((format!("mean.{scale}"), vec![c], w.mean.as_slice()));
        tensors.push((format!("matrix.{scale}"), vec![c, c], w.matrix.as_slice()));
    }
    write_f32(path, &tensors, |message| BundleError::Whitening {
        path: path.to_path_buf(),
        message,
    })
}

/// Reads a file written by [`write_whitening`], checking names, types and shapes.
pub fn read_whitening(bytes: &[u8], path: &Path) -> Result<Whitening, BundleError> {
    let invalid = |message: String| BundleError::Whitening {
        path: path.to_path_buf(),
        message,
    };
    let tensors = F32Tensors::parse(bytes).map_err(invalid)?;
    let mut scales = Vec::with_capacity(3);
    for scale in 0..3 {
        let mean = tensors
            .read(&format!("mean.{scale}"), None)
            .map_err(invalid)?;
        let c = mean.len();
        let matrix = tensors
            .read(&format!("matrix.{scale}"), Some(&[c, c]))
            .map_err(invalid)?;
        scales.push(ScaleWhitening { mean, matrix });
    }
    let scales: [ScaleWhitening; 3] = scales
        .try_into()
        .map_err(|_| invalid("expected three scales".to_string()))?;
    Ok(Whitening(scales))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::WHITENING_FILE;

    #[test]
    fn whitening_file_round_trips_and_reports_what_is_wrong() {
        let scale = |c: usize, offset: f32| ScaleWhitening {
            mean: (0..c).map(|i| offset + i as f32).collect(),
            matrix: (0..c * c).map(|i| offset - i as f32 * 0.5).collect(),
        };
        let whitening = Whitening([scale(2, 1.0), scale(3, -2.0), scale(1, 0.25)]);
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(WHITENING_FILE);
        let bytes = write_whitening(&whitening, &path).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
        assert_eq!(read_whitening(&bytes, &path).expect("read back"), whitening);

        let error = read_whitening(b"not safetensors", &path).expect_err("garbage");
        assert!(
            error.to_string().contains("not a valid whitening file"),
            "{error}"
        );
        // Only the first two scales.
        let mut views = Vec::new();
        let mut buffers = Vec::new();
        for (index, w) in whitening.0.iter().enumerate().take(2) {
            let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            buffers.push((format!("mean.{index}"), vec![w.channels()], bytes(&w.mean)));
            buffers.push((
                format!("matrix.{index}"),
                vec![w.channels(), w.channels()],
                bytes(&w.matrix),
            ));
        }
        for (name, shape, data) in &buffers {
            views.push((
                name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .expect("view"),
            ));
        }
        let partial = safetensors::serialize(views, None).expect("serialise");
        let error = read_whitening(&partial, &path).expect_err("scale 2 missing");
        assert!(error.to_string().contains("`mean.2` is missing"), "{error}");
    }
}
