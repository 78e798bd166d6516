//! Locating files that `scripts/setup.sh` installs under the repository (ONNX Runtime, teacher
//! weights) from wherever `stpm` runs: the working directory, the executable's ancestors, the source tree.

use std::path::PathBuf;

/// Candidate locations of `relative` (e.g. `engines/runtime/libonnxruntime.so`), in search order.
pub fn install_candidates(relative: &str) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        paths.push(cwd.join(relative));
    }
    // target/release/stpm → the repository root is two levels up.
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1).take(4) {
            paths.push(ancestor.join(relative));
        }
    }
    paths.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative));
    let mut unique = Vec::new();
    for path in paths {
        if !unique.contains(&path) {
            unique.push(path);
        }
    }
    unique
}

/// The first existing candidate, or every place searched.
pub fn find_installed(relative: &str) -> Result<PathBuf, Vec<PathBuf>> {
    let candidates = install_candidates(relative);
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(candidates)
}
