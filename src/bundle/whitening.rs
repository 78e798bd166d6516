//! A bundle's whitening file (`[model.whitening]`): the `whitened` fusion's per-scale mean and
//! matrix as safetensors, written by training and read, checked, by every command that scores.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::BundleError;
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
    let bytes_of =
        |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut buffers = Vec::new();
    for (scale, w) in whitening.0.iter().enumerate() {
        let c = w.channels();
        buffers.push((format!("mean.{scale}"), vec![c], bytes_of(&w.mean)));
        buffers.push((format!("matrix.{scale}"), vec![c, c], bytes_of(&w.matrix)));
    }
    let invalid = |message: String| BundleError::Whitening {
        path: path.to_path_buf(),
        message,
    };
    let views = buffers
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| invalid(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(path, &bytes).map_err(|source| BundleError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

/// Reads a file written by [`write_whitening`], checking names, types and shapes.
pub fn read_whitening(bytes: &[u8], path: &Path) -> Result<Whitening, BundleError> {
    let invalid = |message: String| BundleError::Whitening {
        path: path.to_path_buf(),
        message,
    };
    let tensors =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
    let read = |name: &str, shape: Option<&[usize]>| -> Result<Vec<f32>, BundleError> {
        let view = tensors
            .tensor(name)
            .map_err(|_| invalid(format!("tensor `{name}` is missing")))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(invalid(format!("`{name}` is {:?}, not F32", view.dtype())));
        }
        if let Some(shape) = shape
            && view.shape() != shape
        {
            return Err(invalid(format!(
                "`{name}` has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let mut scales = Vec::with_capacity(3);
    for scale in 0..3 {
        let mean = read(&format!("mean.{scale}"), None)?;
        let c = mean.len();
        let matrix = read(&format!("matrix.{scale}"), Some(&[c, c]))?;
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
