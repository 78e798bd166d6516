//! Free space on the filesystem that holds a folder (`statvfs`): what retention's free-space
//! floor and the `stpm_disk_free_bytes` gauge read.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Bytes an unprivileged process may still write on the filesystem holding `path` (the
/// filesystem's available blocks). A path that does not exist yet is measured at its nearest
/// existing ancestor, where it would be created.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let mut probe = path;
    while !probe.exists() {
        probe = match probe.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if probe == Path::new(".") {
            break;
        }
    }
    let name = CString::new(probe.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `name` is a NUL-terminated path and `stats` points to writable memory of the
    // struct's size; statvfs fills it completely when it returns 0.
    let result = unsafe { libc::statvfs(name.as_ptr(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured_at_the_nearest_existing_folder() {
        let dir = tempfile::tempdir().expect("dir");
        let here = free_bytes(dir.path()).expect("statvfs");
        assert!(here > 0, "a temporary folder with no free space");
        let later = free_bytes(&dir.path().join("not/yet/made")).expect("statvfs");
        // The same filesystem: equal up to what other processes wrote in between.
        assert!(here.abs_diff(later) < 64 << 20, "{here} against {later}");
    }
}
