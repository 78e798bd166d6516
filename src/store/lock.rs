//! The instance lock of a data folder: one `stpm run` at a time uses a folder (its event store,
//! snapshots, clips, spool), so two instances pointed at the same one fail fast instead of
//! mixing their events. An OS file lock on `<folder>/stpm.lock` (released when the process ends,
//! even by SIGKILL), whose text names the holder for the refusal message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = "stpm.lock";

/// A folder this process holds; the lock goes with the value.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    folder: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{key} = {folder}: cannot create its lock file: {source}")]
    Io {
        key: String,
        folder: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{key} = {folder} is in use by another stpm run ({holder}); give this pipeline its own {key}, or stop the other one"
    )]
    Held {
        key: String,
        folder: PathBuf,
        holder: String,
    },
}

impl FolderLock {
    /// Takes `folder` (creating it), named `key` in the configuration, or says who holds it.
    pub fn acquire(folder: &Path, key: &str) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            key: key.to_string(),
            folder: folder.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(folder).map_err(io)?;
        let path = folder.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|text| text.trim().to_string())
                    .filter(|text| !text.is_empty())
                    .unwrap_or_else(|| "a process that has not written its name yet".into());
                return Err(LockError::Held {
                    key: key.to_string(),
                    folder: folder.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let command: Vec<String> = std::env::args().map(|arg| hide_secret(&arg)).collect();
        file.set_len(0).map_err(io)?;
        write!(
            file,
            "pid {}, since unix {since}, `{}`",
            std::process::id(),
            command.join(" ")
        )
        .map_err(io)?;
        Ok(Self {
            _file: file,
            folder: folder.to_path_buf(),
        })
    }

    /// The folder it holds.
    pub fn folder(&self) -> &Path {
        &self.folder
    }
}

/// `arg` with the value of a `…password…=value` setting (`--set mqtt.password=…`) replaced: the
/// lock file names its holder's command line, and others may read it.
fn hide_secret(arg: &str) -> String {
    // ASCII lower-casing keeps byte offsets, so `at` indexes `arg` too.
    let at = arg.to_ascii_lowercase().find("password");
    match at.and_then(|at| Some(at + arg[at..].find('=')?)) {
        Some(equals) => format!("{}=<hidden>", &arg[..equals]),
        None => arg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_on_the_command_line_is_not_written() {
        assert_eq!(
            hide_secret("mqtt.password=s3cret"),
            "mqtt.password=<hidden>"
        );
        assert_eq!(hide_secret("MQTT__PASSWORD=x=y"), "MQTT__PASSWORD=<hidden>");
        assert_eq!(
            hide_secret("--set=mqtt.password=s3cret"),
            "--set=mqtt.password=<hidden>"
        );
        assert_eq!(hide_secret("--set=alerts.k=2"), "--set=alerts.k=2");
        assert_eq!(hide_secret("password_file"), "password_file");
        assert_eq!(hide_secret("--pipeline"), "--pipeline");
        assert_eq!(hide_secret("alerts.k=2"), "alerts.k=2");
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_name_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("dir");
        let folder = dir.path().join("data");
        let first = FolderLock::acquire(&folder, "storage.path").expect("first");
        assert_eq!(first.folder(), folder);
        let message = FolderLock::acquire(&folder, "storage.path")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("storage.path")
                && message.contains(&folder.display().to_string())
                && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        FolderLock::acquire(&folder, "storage.path").expect("free again");
    }
}
