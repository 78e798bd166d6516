//! Retention: keeps the data folder and the recordings within an age limit, a disk budget and a
//! free-space floor, deleting the oldest files first; events keep their rows, with the deleted
//! media's paths cleared and `media_gone` set.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::EventStore;

/// Files modified this recently are left alone (a recording or clip may still be written).
pub const IN_USE: Duration = Duration::from_secs(60);

/// What to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Bytes at most over all swept folders (0: no budget).
    pub max_bytes: u64,
    /// Days at most (0: no age limit).
    pub keep_days: f64,
    /// Bytes to keep free on each filesystem that holds swept files (0: no floor).
    pub min_free: u64,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.max_bytes > 0 || self.keep_days > 0.0 || self.min_free > 0
    }
}

/// What one sweep found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sweep {
    /// Bytes of the files kept.
    pub bytes: u64,
    pub deleted: Vec<PathBuf>,
    /// Deleted files whose events were not marked (`media_gone`): the store failed on the first
    /// of them and was not asked again in this sweep, since freeing a full disk matters more than
    /// a stale link.
    pub unmarked: usize,
    /// Free bytes of a filesystem still under `min_free` after the sweep (nothing left that it
    /// may delete there), with a folder on it.
    pub short: Option<(PathBuf, u64)>,
}

/// A media file found by [`files`].
struct Media {
    path: PathBuf,
    size: u64,
    modified: SystemTime,
    /// The filesystem's device id.
    device: u64,
    /// A `.part` file (a clip, a snapshot being written): deleted only once abandoned.
    part: bool,
}

/// A `.part` file under `snapshots/` or `clips/` not modified for this long was left by a run
/// that stopped or failed while writing it (a clip is at most an hour long, but the muxer may
/// leave its `.part` untouched until the end, and a camera may stall mid-clip): it is deleted
/// whatever the limits.
const ABANDONED: Duration = Duration::from_secs(24 * 3600);

/// The files retention may delete: snapshots, clips and recordings (and, under `snapshots/` and
/// `clips/`, `.part` files once [`ABANDONED`]). Anything else (a database, a spool, a bundle in a
/// folder that was pointed here by mistake, a `.part` still being written) is never touched.
const MEDIA: [&str; 3] = ["jpg", "mp4", "mkv"];

/// A folder retention sweeps, and which of its files it may delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swept {
    /// Every media file under it, in subfolders too: the data folder's `snapshots/` and `clips/`,
    /// which only stpm writes.
    Media(PathBuf),
    /// Only the recordings stpm names (`<camera>-<start>[-rN][-NNNNN].mkv`, see
    /// [`is_recording_name`]) directly in it: `[output.record] dir` may be a folder shared with
    /// other files (the data folder with its training collections, a media folder).
    Recordings(PathBuf),
}

impl Swept {
    pub fn path(&self) -> &Path {
        match self {
            Swept::Media(path) | Swept::Recordings(path) => path,
        }
    }
}

/// Whether `name` is one the recorder gives its files: `<camera>-<unix seconds>.mkv`, with
/// `-r<n>` after a restart and `-<segment>` when segmented (camera names are letters, digits, `-`
/// and `_`).
pub fn is_recording_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".mkv") else {
        return false;
    };
    if !stem
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return false;
    }
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    let restart = |part: &str| part.strip_prefix('r').is_some_and(digits);
    let parts: Vec<&str> = stem.split('-').collect();
    let tail_fits = |tail: &[&str]| match tail {
        [] => true,
        [one] => restart(one) || digits(one),
        [r, segment] => restart(r) && digits(segment),
        _ => false,
    };
    (1..parts.len())
        .any(|i| digits(parts[i]) && !parts[..i].join("-").is_empty() && tail_fits(&parts[i + 1..]))
}

/// The files of `folders` retention may delete, with size, modification time and device.
fn files(folders: &[Swept]) -> Vec<Media> {
    let mut found = Vec::new();
    let mut pending = folders.to_vec();
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(folder.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let path = entry.path();
            let extension = path.extension().and_then(|e| e.to_str());
            let part = matches!(folder, Swept::Media(_)) && extension == Some("part");
            let wanted = || match folder {
                Swept::Media(_) => part || extension.is_some_and(|e| MEDIA.contains(&e)),
                Swept::Recordings(_) => is_recording_name(&entry.file_name().to_string_lossy()),
            };
            if meta.is_dir() {
                if let Swept::Media(_) = folder {
                    pending.push(Swept::Media(path));
                }
            } else if meta.is_file() && wanted() {
                found.push(Media {
                    path,
                    size: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    device: meta.dev(),
                    part,
                });
            }
        }
    }
    found
}

/// Deletes what is older than `limits.keep_days`, then the oldest files until the rest fits
/// `limits.max_bytes` and every filesystem holding them has `limits.min_free` bytes free, never
/// a file modified within [`IN_USE`] of `now`. Deleted media of events are marked in `store`; when
/// the store fails, the sweep goes on without it and counts the rest in [`Sweep::unmarked`].
pub fn sweep(
    folders: &[Swept],
    limits: Limits,
    now: SystemTime,
    store: Option<&EventStore>,
) -> Sweep {
    let mut all = files(folders);
    all.sort_by_key(|media| media.modified);
    let age = |modified: SystemTime| now.duration_since(modified).unwrap_or(Duration::ZERO);
    let too_old = |modified: SystemTime| {
        limits.keep_days > 0.0 && age(modified).as_secs_f64() > limits.keep_days * 86_400.0
    };
    // Free bytes per filesystem, measured once at its first file and counted up as files go.
    let mut free: HashMap<u64, (PathBuf, Option<u64>)> = HashMap::new();
    if limits.min_free > 0 {
        for media in &all {
            free.entry(media.device).or_insert_with(|| {
                let folder = media.path.parent().unwrap_or(Path::new(".")).to_path_buf();
                let bytes = super::disk::free_bytes(&folder)
                    .map_err(|e| log::warn!("storage: free space of {}: {e}", folder.display()))
                    .ok();
                (folder, bytes)
            });
        }
    }
    let mut total: u64 = all.iter().map(|media| media.size).sum();
    let mut report = Sweep::default();
    for media in all {
        let over_budget = limits.max_bytes > 0 && total > limits.max_bytes;
        let short = free
            .get(&media.device)
            .and_then(|(_, bytes)| *bytes)
            .is_some_and(|bytes| bytes < limits.min_free);
        let due = if media.part {
            age(media.modified) >= ABANDONED
        } else {
            (too_old(media.modified) || over_budget || short) && age(media.modified) >= IN_USE
        };
        if !due {
            continue;
        }
        // Written again since the listing (a snapshot replaced at a new peak): keep it.
        let now_modified = std::fs::metadata(&media.path).and_then(|m| m.modified());
        if now_modified.is_ok_and(|m| age(m) < IN_USE) {
            continue;
        }
        if let Err(e) = std::fs::remove_file(&media.path) {
            log::warn!("storage: cannot delete {}: {e}", media.path.display());
            continue;
        }
        total = total.saturating_sub(media.size);
        if let Some((_, Some(bytes))) = free.get_mut(&media.device) {
            *bytes = bytes.saturating_add(media.size);
        }
        // After the store's first failure the rest of this sweep leaves it alone (each try may
        // wait out its busy timeout), so a full disk is still freed quickly.
        if let Some(store) = store {
            if report.unmarked > 0 {
                report.unmarked += 1;
            } else if let Err(e) = store.media_deleted(&media.path) {
                log::warn!(
                    "storage: deleted {} but cannot mark its event (media_gone): {e}",
                    media.path.display()
                );
                report.unmarked = 1;
            }
        }
        report.deleted.push(media.path);
    }
    report.bytes = total;
    report.short = free
        .into_values()
        .filter_map(|(folder, bytes)| Some((folder, bytes?)))
        .find(|(_, bytes)| *bytes < limits.min_free);
    report
}

/// Bytes of `text`: a number with an optional unit, `B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`,
/// `TB`/`TiB` (`500MB`, `20 GiB`); `0` means no budget.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" => 1024.0,
        "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tb" => 1e12,
        "tib" => 1024.0_f64.powi(4),
        _ => return None,
    };
    let bytes = number * scale;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

/// The folders a run's retention sweeps: the data folder's snapshots and clips, and the
/// recordings when they are on.
pub fn folders(storage: &Path, recordings: Option<&Path>) -> Vec<Swept> {
    let mut folders = vec![
        Swept::Media(storage.join("snapshots")),
        Swept::Media(storage.join("clips")),
    ];
    folders.extend(recordings.map(|dir| Swept::Recordings(dir.to_path_buf())));
    folders
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertEvent;
    use crate::store::Peak;

    /// Writes `bytes` to `path` and dates it `age` seconds before `now`.
    fn aged_file(path: &Path, bytes: &[u8], now: SystemTime, age: u64) {
        std::fs::write(path, bytes).expect("file");
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(now - Duration::from_secs(age)))
            .expect("mtime");
    }

    #[test]
    fn recordings_are_told_by_their_names() {
        for name in [
            "line1-1700000000.mkv",
            "line1-1700000000-r2.mkv",
            "line1-1700000000-00003.mkv",
            "line1-1700000000-r2-00003.mkv",
            "belt-2_left-1700000000.mkv",
            "--1700000000.mkv",
            "line1-0.mkv",
        ] {
            assert!(is_recording_name(name), "{name}");
        }
        for name in [
            "line1.mkv",
            "line1-1700000000.mp4",
            "-1700000000.mkv",
            "line1-1700000000-x.mkv",
            "line 1-1700000000.mkv",
            "line1-r2.mkv",
        ] {
            assert!(!is_recording_name(name), "{name}");
        }
    }

    #[test]
    fn a_recordings_folder_shared_with_the_data_folder_loses_only_recordings() {
        let dir = tempfile::tempdir().expect("dir");
        let now = SystemTime::now();
        let day = 86_400;
        let collected = dir.path().join("collect/line1/train/good");
        let snapshots = dir.path().join("snapshots/line1");
        for folder in [&collected, &snapshots] {
            std::fs::create_dir_all(folder).expect("folder");
        }
        let kept = [
            collected.join("line1-event-a-1.jpg"),
            dir.path().join("holiday.mkv"),
            dir.path().join("collect/line1-7.mkv"),
        ];
        let gone = [
            dir.path().join("line1-1700000000.mkv"),
            snapshots.join("ev-1.jpg"),
        ];
        for path in kept.iter().chain(&gone) {
            aged_file(path, b"media", now, 40 * day);
        }
        let limits = Limits {
            max_bytes: 0,
            keep_days: 30.0,
            min_free: 0,
        };
        let swept = sweep(&folders(dir.path(), Some(dir.path())), limits, now, None);
        let mut deleted = swept.deleted.clone();
        deleted.sort();
        let mut expected = gone.to_vec();
        expected.sort();
        assert_eq!(deleted, expected);
        for path in &kept {
            assert!(path.exists(), "{} was deleted", path.display());
        }
    }

    /// A clip's `.part` left by a run that failed or stopped while writing it goes after
    /// [`ABANDONED`], whatever the limits; a fresher one stays even when space is short.
    #[test]
    fn abandoned_part_files_go_and_fresh_ones_stay() {
        let dir = tempfile::tempdir().expect("dir");
        let now = SystemTime::now();
        let clips = dir.path().join("clips/line1");
        std::fs::create_dir_all(&clips).expect("folder");
        let abandoned = clips.join("ev-1.mp4.part");
        let writing = clips.join("ev-2.mp4.part");
        let elsewhere = dir.path().join("line1-1700000000.mkv.part");
        aged_file(&abandoned, b"half a clip", now, 25 * 3600);
        aged_file(&writing, b"a clip being written", now, 3 * 3600);
        aged_file(&elsewhere, b"not ours", now, 30 * 86_400);
        let limits = Limits {
            max_bytes: 1,
            keep_days: 0.0,
            min_free: 0,
        };
        let swept = sweep(&folders(dir.path(), Some(dir.path())), limits, now, None);
        assert_eq!(swept.deleted, vec![abandoned.clone()]);
        assert!(!abandoned.exists());
        assert!(writing.exists() && elsewhere.exists());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("20 GiB"), Some(20 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("1.5kb"), Some(1500));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size("MB"), None);
    }

    /// Sparse files of 100 MB each (no blocks used): the floor counts what a deletion frees by
    /// the file's length, so a floor 150 MB above the free space measured now takes the two
    /// oldest, whatever else the disk holds.
    #[test]
    fn a_free_space_floor_deletes_the_oldest_until_it_is_met() {
        let dir = tempfile::tempdir().expect("dir");
        let now = SystemTime::now();
        let recordings = dir.path().join("recordings");
        std::fs::create_dir_all(&recordings).expect("dir");
        let mut paths = Vec::new();
        for (index, age) in [4 * 3600, 3 * 3600, 2 * 3600, 3600].into_iter().enumerate() {
            let path = recordings.join(format!("line1-{index}.mkv"));
            let file = std::fs::File::create(&path).expect("file");
            file.set_len(100 << 20).expect("length");
            file.set_modified(now - Duration::from_secs(age))
                .expect("mtime");
            paths.push(path);
        }
        let free = super::super::disk::free_bytes(&recordings).expect("statvfs");
        let limits = Limits {
            max_bytes: 0,
            keep_days: 0.0,
            min_free: free + (150 << 20),
        };
        let folders = folders(dir.path(), Some(&recordings));
        let swept = sweep(&folders, limits, now, None);
        assert_eq!(swept.deleted, paths[..2]);
        assert!(swept.short.is_none(), "{:?}", swept.short);
        // A floor no deletion can reach: everything old goes and the sweep says it fell short.
        let limits = Limits {
            min_free: u64::MAX / 2,
            ..limits
        };
        let swept = sweep(&folders, limits, now, None);
        assert_eq!(swept.deleted, paths[2..]);
        let (folder, _) = swept.short.expect("still short");
        assert_eq!(folder, recordings);
    }

    #[test]
    fn the_oldest_go_first_and_the_store_says_so() {
        let dir = tempfile::tempdir().expect("dir");
        let store = EventStore::open(dir.path()).expect("store");
        let now = SystemTime::now();
        let snapshots = dir.path().join("snapshots/line1");
        std::fs::create_dir_all(&snapshots).expect("dir");
        // Four 100-byte files, 4, 3, 2 hours and 10 s old.
        let mut paths = Vec::new();
        for (index, age) in [4 * 3600, 3 * 3600, 2 * 3600, 10].into_iter().enumerate() {
            let path = snapshots.join(format!("e{index}.jpg"));
            aged_file(&path, &[0u8; 100], now, age);
            let event = AlertEvent {
                snapshot: true,
                ..AlertEvent::sample(&format!("e{index}"), "line1", index as f64, 0.9)
            };
            let peak = Peak {
                raw_score: None,
                snapshot_path: Some(path.clone()),
                clean_path: None,
            };
            store.record(&event, "m", Some(&peak), 1.0).expect("event");
            paths.push(path);
        }
        // Not media: never deleted, whatever the budget.
        let other = snapshots.join("notes.txt");
        aged_file(&other, &[0u8; 1000], now, 9 * 3600);
        let folders = folders(dir.path(), None);
        // A budget of 250 bytes: the two oldest go.
        let limits = Limits {
            max_bytes: 250,
            keep_days: 0.0,
            min_free: 0,
        };
        let swept = sweep(&folders, limits, now, Some(&store));
        assert_eq!(swept.deleted, paths[..2]);
        assert_eq!(swept.bytes, 200);
        assert!(!paths[0].exists() && paths[2].exists());
        let gone = store.get("e0").expect("get").expect("row");
        assert!(gone.media_gone && gone.snapshot_path.is_none(), "{gone:?}");
        let kept = store.get("e2").expect("get").expect("row");
        assert!(!kept.media_gone && kept.snapshot_path.is_some());
        // An age limit of 1.5 h takes the 2-hour-old one; the 10-s-old one is in use, even over
        // a budget of 1 byte.
        let limits = Limits {
            max_bytes: 1,
            keep_days: 1.5 / 24.0,
            min_free: 0,
        };
        let swept = sweep(&folders, limits, now, Some(&store));
        assert_eq!(swept.deleted, paths[2..3]);
        assert_eq!(swept.bytes, 100);
        assert!(paths[3].exists() && other.exists());
        assert_eq!(swept.unmarked, 0);
    }

    /// A store that cannot mark deleted media (here its table is gone) does not stop the sweep:
    /// every file over the budget still goes, and the failures are counted.
    #[test]
    fn a_failing_store_does_not_stop_the_sweep() {
        let dir = tempfile::tempdir().expect("dir");
        let store = EventStore::open(dir.path()).expect("store");
        let now = SystemTime::now();
        let clips = dir.path().join("clips/line1");
        std::fs::create_dir_all(&clips).expect("dir");
        let mut paths = Vec::new();
        for (index, age) in [3 * 3600, 2 * 3600, 3600].into_iter().enumerate() {
            let path = clips.join(format!("c{index}.mp4"));
            aged_file(&path, &[0u8; 100], now, age);
            paths.push(path);
        }
        rusqlite::Connection::open(dir.path().join(super::super::DATABASE))
            .and_then(|db| db.execute_batch("DROP TABLE events"))
            .expect("drop the table");
        let limits = Limits {
            max_bytes: 100,
            keep_days: 0.0,
            min_free: 0,
        };
        let swept = sweep(&folders(dir.path(), None), limits, now, Some(&store));
        assert_eq!(swept.deleted, paths[..2]);
        assert_eq!(swept.unmarked, 2);
        assert!(!paths[1].exists() && paths[2].exists());
    }
}
