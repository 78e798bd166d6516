//! Writing a file whole: the bytes go to `<name>.part` beside it and are renamed over it, so a
//! reader, or a process that dies mid-write, leaves the old content or the new, never half of it
//! (no fsync: a power cut may still lose the new one). Knows nothing of what the bytes are.

use std::path::{Path, PathBuf};

/// The staging file of `path`: its name with `.part` added.
pub fn staged(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through [`staged`]`(path)`; a failed write leaves no staging file.
pub fn write_whole(path: &Path, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
    let part = staged(path);
    let written = std::fs::write(&part, bytes).and_then(|()| std::fs::rename(&part, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_content_replaces_the_old_and_no_staging_file_stays() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("collect.json");
        write_whole(&path, "old").expect("write");
        write_whole(&path, b"new").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(staged(&path), dir.path().join("collect.json.part"));
        assert!(!staged(&path).exists());
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_says_why() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("manifest.toml");
        write_whole(&path, "old").expect("write");
        // The staging name is taken by a folder: the write fails before the rename.
        std::fs::create_dir(staged(&path)).expect("dir");
        assert!(write_whole(&path, "new").is_err());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old");
    }

    #[test]
    fn a_failed_rename_removes_the_staging_file() {
        let dir = tempfile::tempdir().expect("dir");
        // The target is a folder with something in it: the bytes are staged, the rename fails.
        let path = dir.path().join("snapshot.jpg");
        std::fs::create_dir_all(path.join("inside")).expect("dir");
        assert!(write_whole(&path, "new").is_err());
        assert!(!staged(&path).exists());
        assert!(path.join("inside").is_dir());
    }
}
