//! Writes float32 2-D arrays in NumPy's `.npy` format, version 1.0 (little-endian, C order), so
//! anyone can load saved anomaly maps with `numpy.load`.

use std::io::Write;
use std::path::Path;

/// The file's bytes: magic, version 1.0, header dict padded to a multiple of 64 bytes, data.
pub fn npy_bytes(data: &[f32], shape: [usize; 2]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        shape[0], shape[1]
    );
    // magic (6) + version (2) + header length (2) + header + '\n' ≡ 0 (mod 64)
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for value in data {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Writes `data` (row-major, `shape` = [rows, cols]) to `path`.
pub fn write_npy(path: &Path, data: &[f32], shape: [usize; 2]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(&npy_bytes(data, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_data_round_trips() {
        let data = [0.5f32, -1.25, 3.0, 1e-7, 7.0, 8.5];
        let bytes = npy_bytes(&data, [2, 3]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("ascii header");
        assert!(header.contains("'descr': '<f4'") && header.contains("'shape': (2, 3)"));
        assert!(header.ends_with('\n'));
        let values: Vec<f32> = bytes[10 + header_len..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(values, data);
    }
}
