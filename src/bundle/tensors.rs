//! Named f32 tensors in a safetensors file: what the bundle's side files (whitening, defect head)
//! are made of. Writing, and reading with name, type and shape checks; the caller says what the
//! file is in its errors.

use std::path::Path;

use super::BundleError;

/// Serialises `(name, shape, values)` tensors to `path`; returns the bytes written. `invalid` turns
/// a message into the caller's error.
pub(super) fn write_f32(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    invalid: impl Fn(String) -> BundleError,
) -> Result<Vec<u8>, BundleError> {
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
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

/// A parsed safetensors file whose tensors are read as f32.
pub(super) struct F32Tensors<'a>(safetensors::SafeTensors<'a>);

impl<'a> F32Tensors<'a> {
    pub(super) fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        safetensors::SafeTensors::deserialize(bytes)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// Tensor `name` as f32 values; its shape must be `shape` when given.
    pub(super) fn read(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>, String> {
        let view = self
            .0
            .tensor(name)
            .map_err(|_| format!("tensor `{name}` is missing"))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(format!("`{name}` is {:?}, not F32", view.dtype()));
        }
        if let Some(shape) = shape
            && view.shape() != shape
        {
            return Err(format!(
                "`{name}` has shape {:?}, expected {shape:?}",
                view.shape()
            ));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
