//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// A path inside the repository.
pub fn repo(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The EfficientNet-Lite0 ImageNet weights installed by scripts/setup.sh (required, never skipped).
pub fn lite0_weights() -> PathBuf {
    let path = repo(stpm::train::DEFAULT_TEACHER);
    assert!(
        path.is_file(),
        "{} is missing: run `bash scripts/setup.sh` first",
        path.display()
    );
    path
}

/// Largest |a - b| and largest |b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    (diff, scale)
}
