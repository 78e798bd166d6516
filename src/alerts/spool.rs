//! The durable on-disk FIFO of outgoing alert messages, so none is lost while the broker is away.
//! Owns the files of the spool folder; knows nothing of MQTT connections.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::tracker::{AlertEvent, EventKind};

/// First line of every spool file; bump the number if the layout changes.
const MAGIC: &str = "stpm-spool 1";
const EXTENSION: &str = ".msg";
const TEMP_EXTENSION: &str = ".msg.tmp";
/// Sequence numbers are zero-padded to this width so file names sort in order.
const SEQ_DIGITS: usize = 20;

/// What a spooled message is, which decides what the bound drops first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    New,
    /// Superseded by later messages of the same event: dropped first when the spool is full.
    Update,
    End,
    /// Anything else (state, snapshot).
    Other,
}

impl EntryKind {
    fn as_str(self) -> &'static str {
        match self {
            EntryKind::New => "new",
            EntryKind::Update => "update",
            EntryKind::End => "end",
            EntryKind::Other => "other",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::New, Self::Update, Self::End, Self::Other]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

impl From<EventKind> for EntryKind {
    fn from(kind: EventKind) -> Self {
        match kind {
            EventKind::New => EntryKind::New,
            EventKind::Update => EntryKind::Update,
            EventKind::End => EntryKind::End,
        }
    }
}

/// One message waiting for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolEntry {
    /// Increases with every push, across restarts.
    pub seq: u64,
    pub kind: EntryKind,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A file in the spool folder that was left alone (or, for an interrupted write, removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolWarning {
    pub path: PathBuf,
    pub problem: String,
}

impl fmt::Display for SpoolWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

/// What a push did: the new entry's sequence number and the entries dropped to stay in bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub seq: u64,
    pub dropped: Vec<SpoolEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot create spool folder {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot list spool folder {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("cannot write spool file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot remove spool file {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error(
        "cannot spool a message to {dir} for topic {topic:?}: a topic must be non-empty, without newline or NUL"
    )]
    Topic { dir: PathBuf, topic: String },
    #[error("cannot encode alert event {id} for the spool in {dir}: {source}")]
    Encode {
        dir: PathBuf,
        id: String,
        source: serde_json::Error,
    },
}

/// A bounded FIFO of messages, one file each, named by sequence number.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_events: usize,
    /// Oldest first; mirrors the files on disk.
    entries: VecDeque<SpoolEntry>,
    next_seq: u64,
    dropped: u64,
    warnings: Vec<SpoolWarning>,
    /// Files of messages that have left the spool but could not be deleted (a read-only
    /// remount), oldest first: deletion is tried again at the next push or ack.
    undeleted: VecDeque<u64>,
}

/// Most undeleted files remembered for another try; older ones wait for the next `open`.
const UNDELETED_KEPT: usize = 4096;

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and picks up the entries a previous run left,
    /// in order. Files it does not recognise are skipped and reported in `warnings()`.
    pub fn open(dir: impl Into<PathBuf>, max_events: usize) -> Result<Self, SpoolError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| SpoolError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let listing = fs::read_dir(&dir).map_err(|source| SpoolError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        let mut entries = Vec::new();
        let mut warnings = Vec::new();
        let mut next_seq = 0;
        for item in listing {
            let item = item.map_err(|source| SpoolError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let path = item.path();
            let mut warn = |problem: &str| {
                warnings.push(SpoolWarning {
                    path: path.clone(),
                    problem: problem.to_string(),
                })
            };
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                warn("not a spool file (name is not UTF-8); skipped");
                continue;
            };
            // The instance lock of the folder (`stpm run` holds one), not a message.
            if name.ends_with(".lock") {
                continue;
            }
            if let Some(seq) = parse_name(name, TEMP_EXTENSION) {
                next_seq = next_seq.max(seq.saturating_add(1));
                // A push that never returned: its caller still holds the message.
                let problem = match fs::remove_file(&path) {
                    Ok(()) => "incomplete write from an earlier run; removed".to_string(),
                    Err(error) => {
                        format!("incomplete write from an earlier run; cannot remove: {error}")
                    }
                };
                warn(&problem);
                continue;
            }
            let Some(seq) = parse_name(name, EXTENSION) else {
                warn("not a spool file; skipped");
                continue;
            };
            next_seq = next_seq.max(seq.saturating_add(1));
            match fs::read(&path) {
                Ok(bytes) => match parse_entry(seq, bytes) {
                    Ok(entry) => entries.push(entry),
                    Err(problem) => warn(&format!("corrupt spool file ({problem}); skipped")),
                },
                Err(error) => warn(&format!("cannot read: {error}; skipped")),
            }
        }
        entries.sort_by_key(|entry| entry.seq);
        Ok(Self {
            dir,
            max_events: max_events.max(1),
            entries: entries.into(),
            next_seq,
            dropped: 0,
            warnings,
            undeleted: VecDeque::new(),
        })
    }

    /// Stores a message durably (temp file, fsync, rename, fsync of the folder), then drops the
    /// oldest older `update` entries, or failing those the oldest entries, beyond `max_events`.
    pub fn push(
        &mut self,
        topic: &str,
        kind: EntryKind,
        payload: &[u8],
    ) -> Result<Pushed, SpoolError> {
        if topic.is_empty() || topic.contains(['\n', '\0']) {
            return Err(SpoolError::Topic {
                dir: self.dir.clone(),
                topic: topic.to_string(),
            });
        }
        self.retry_undeleted();
        let seq = self.next_seq;
        let path = self.path(seq);
        let temp = self.dir.join(format!("{seq:0SEQ_DIGITS$}{TEMP_EXTENSION}"));
        let write = |target: &Path| -> io::Result<()> {
            let mut file = File::create(target)?;
            write!(file, "{MAGIC}\n{}\n{topic}\n", kind.as_str())?;
            file.write_all(payload)?;
            file.sync_all()
        };
        let stored = write(&temp)
            .and_then(|()| fs::rename(&temp, &path))
            .and_then(|()| sync_dir(&self.dir));
        if let Err(source) = stored {
            let _ = fs::remove_file(&temp);
            return Err(SpoolError::Write { path, source });
        }
        self.next_seq += 1;
        self.entries.push_back(SpoolEntry {
            seq,
            kind,
            topic: topic.to_string(),
            payload: payload.to_vec(),
        });
        let mut dropped = Vec::new();
        while self.entries.len() > self.max_events {
            let older = self.entries.len() - 1;
            let victim = self
                .entries
                .iter()
                .take(older)
                .position(|entry| entry.kind == EntryKind::Update)
                .unwrap_or(0);
            let Some(entry) = self.entries.remove(victim) else {
                break;
            };
            // The new message is stored: a file that stays is only tried again later.
            let _ = self.forget_file(entry.seq);
            self.dropped += 1;
            dropped.push(entry);
        }
        Ok(Pushed { seq, dropped })
    }

    /// Spools an alert event as its event JSON (docs/alerts.md).
    pub fn push_event(&mut self, topic: &str, event: &AlertEvent) -> Result<Pushed, SpoolError> {
        let payload = serde_json::to_vec(event).map_err(|source| SpoolError::Encode {
            dir: self.dir.clone(),
            id: event.id.clone(),
            source,
        })?;
        self.push(topic, event.kind.into(), &payload)
    }

    /// Messages waiting for the broker, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &SpoolEntry> {
        self.entries.iter()
    }

    /// The broker has the message: forget it. False when `seq` was not (or no longer) spooled.
    /// An error still forgets the message (it is not sent again in this run); only its file
    /// stays, to be deleted at a later push or ack, or sent once more after a restart.
    pub fn ack(&mut self, seq: u64) -> Result<bool, SpoolError> {
        self.retry_undeleted();
        let Ok(index) = self.entries.binary_search_by_key(&seq, |entry| entry.seq) else {
            return Ok(false);
        };
        self.entries.remove(index);
        self.forget_file(seq)?;
        Ok(true)
    }

    /// Files of messages that left the spool and could not be deleted yet.
    pub fn undeleted(&self) -> usize {
        self.undeleted.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries dropped to stay within `max_events` since this spool was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Files skipped (or cleaned up) by `open`, for the log.
    pub fn warnings(&self) -> &[SpoolWarning] {
        &self.warnings
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:0SEQ_DIGITS$}{EXTENSION}"))
    }

    /// A crash after this leaves the file behind: at worst the message is sent twice, which QoS 1
    /// consumers already handle, so no folder fsync here.
    fn remove_file(&self, seq: u64) -> Result<(), SpoolError> {
        let path = self.path(seq);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SpoolError::Remove { path, source }),
        }
    }

    /// Deletes the file of a message no longer in `entries`, or remembers it for another try.
    fn forget_file(&mut self, seq: u64) -> Result<(), SpoolError> {
        let removed = self.remove_file(seq);
        if removed.is_err() {
            self.undeleted.push_back(seq);
            if self.undeleted.len() > UNDELETED_KEPT {
                self.undeleted.pop_front();
            }
        }
        removed
    }

    /// Tries the oldest undeleted file, and the rest once that one goes.
    fn retry_undeleted(&mut self) {
        while let Some(&seq) = self.undeleted.front() {
            if self.remove_file(seq).is_err() {
                return;
            }
            self.undeleted.pop_front();
        }
    }
}

/// The sequence number of `<20 digits><extension>`.
fn parse_name(name: &str, extension: &str) -> Option<u64> {
    let digits = name.strip_suffix(extension)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // A spool never counts this far (one message a microsecond for 290,000 years); a larger
    // number was written by something else, and counting on from it would overflow.
    digits.parse().ok().filter(|&seq| seq <= u64::MAX / 2)
}

/// `MAGIC\n<kind>\n<topic>\n<payload>`.
fn parse_entry(seq: u64, bytes: Vec<u8>) -> Result<SpoolEntry, String> {
    let mut rest = bytes.as_slice();
    let mut line = || -> Result<&str, String> {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("header cut short")?;
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| "header is not UTF-8")?;
        rest = &rest[end + 1..];
        Ok(text)
    };
    let magic = line()?;
    if magic != MAGIC {
        return Err(format!("starts with {magic:?}, expected {MAGIC:?}"));
    }
    let kind_text = line()?;
    let kind = EntryKind::parse(kind_text).ok_or(format!("unknown kind {kind_text:?}"))?;
    let topic = line()?.to_string();
    if topic.is_empty() {
        return Err("empty topic".to_string());
    }
    Ok(SpoolEntry {
        seq,
        kind,
        topic,
        payload: rest.to_vec(),
    })
}

/// Makes a rename durable: the folder's own entry list must reach the disk too.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_number_near_the_end_of_u64_is_not_a_spool_file() {
        let name = |seq: u64| format!("{seq:0SEQ_DIGITS$}{EXTENSION}");
        assert_eq!(parse_name(&name(41), EXTENSION), Some(41));
        assert_eq!(
            parse_name(&name(u64::MAX / 2), EXTENSION),
            Some(u64::MAX / 2)
        );
        assert_eq!(parse_name(&name(u64::MAX), EXTENSION), None);
        assert_eq!(parse_name("00000000000000000041.txt", EXTENSION), None);
    }

    fn summary(spool: &Spool) -> Vec<(u64, EntryKind, String, String)> {
        spool
            .pending()
            .map(|entry| {
                (
                    entry.seq,
                    entry.kind,
                    entry.topic.clone(),
                    String::from_utf8(entry.payload.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn entry(seq: u64, kind: EntryKind, payload: &str) -> (u64, EntryKind, String, String) {
        (seq, kind, "stpm/line1/events".into(), payload.into())
    }

    #[test]
    fn order_survives_reopen_and_ack_removes() {
        let folder = tempfile::tempdir().unwrap();
        let dir = folder.path().join("spool");
        let mut spool = Spool::open(&dir, 100).unwrap();
        assert!(spool.is_empty());
        let topic = "stpm/line1/events";
        for (kind, payload) in [
            (EntryKind::New, "a"),
            (EntryKind::Update, "b\nwith newline"),
            (EntryKind::End, ""),
        ] {
            spool.push(topic, kind, payload.as_bytes()).unwrap();
        }
        drop(spool);

        let mut spool = Spool::open(&dir, 100).unwrap();
        assert!(spool.warnings().is_empty(), "{:?}", spool.warnings());
        assert_eq!(
            summary(&spool),
            vec![
                entry(0, EntryKind::New, "a"),
                entry(1, EntryKind::Update, "b\nwith newline"),
                entry(2, EntryKind::End, ""),
            ]
        );
        assert!(spool.ack(1).unwrap());
        assert!(!spool.ack(1).unwrap());
        assert!(!dir.join("00000000000000000001.msg").exists());
        assert_eq!(spool.push(topic, EntryKind::New, b"d").unwrap().seq, 3);
        drop(spool);

        let spool = Spool::open(&dir, 100).unwrap();
        let seqs: Vec<u64> = spool.pending().map(|entry| entry.seq).collect();
        assert_eq!(seqs, [0, 2, 3]);
    }

    #[test]
    fn bound_drops_updates_first_then_oldest() {
        let folder = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(folder.path(), 3).unwrap();
        let topic = "stpm/line1/events";
        let mut push = |kind, payload: &str| {
            let pushed = spool.push(topic, kind, payload.as_bytes()).unwrap();
            let dropped: Vec<u64> = pushed.dropped.iter().map(|entry| entry.seq).collect();
            (pushed.seq, dropped)
        };
        assert_eq!(push(EntryKind::New, "n0"), (0, vec![]));
        assert_eq!(push(EntryKind::Update, "u1"), (1, vec![]));
        assert_eq!(push(EntryKind::Update, "u2"), (2, vec![]));
        assert_eq!(push(EntryKind::End, "e3"), (3, vec![1]));
        assert_eq!(push(EntryKind::New, "n4"), (4, vec![2]));
        // No update left among the older entries: the oldest of any kind goes.
        assert_eq!(push(EntryKind::Update, "u5"), (5, vec![0]));
        assert_eq!(spool.dropped(), 3);
        assert_eq!(
            summary(&spool),
            vec![
                entry(3, EntryKind::End, "e3"),
                entry(4, EntryKind::New, "n4"),
                entry(5, EntryKind::Update, "u5"),
            ]
        );
        let mut files: Vec<String> = fs::read_dir(folder.path())
            .unwrap()
            .map(|item| item.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "00000000000000000003.msg",
                "00000000000000000004.msg",
                "00000000000000000005.msg"
            ]
        );
    }

    #[test]
    fn garbage_files_skipped_with_warnings() {
        let folder = tempfile::tempdir().unwrap();
        let dir = folder.path();
        let mut spool = Spool::open(dir, 10).unwrap();
        spool.push("t/a", EntryKind::New, b"good").unwrap();
        drop(spool);
        fs::write(dir.join("README.txt"), "hello").unwrap();
        fs::write(dir.join("00000000000000000007.msg"), b"\xff\xfe not ours").unwrap();
        fs::write(
            dir.join("00000000000000000008.msg"),
            "stpm-spool 1\nbogus\nt/a\n{}",
        )
        .unwrap();
        fs::write(dir.join("00000000000000000009.msg.tmp"), "stpm-spool 1\nne").unwrap();
        fs::create_dir(dir.join("00000000000000000010.msg")).unwrap();

        let mut spool = Spool::open(dir, 10).unwrap();
        let mut warnings: Vec<String> = spool
            .warnings()
            .iter()
            .map(|warning| {
                assert!(warning.path.starts_with(dir));
                let name = warning.path.file_name().unwrap().to_str().unwrap();
                format!("{name}: {}", warning.problem)
            })
            .collect();
        warnings.sort();
        assert_eq!(warnings.len(), 5, "{warnings:#?}");
        assert!(warnings[0].starts_with("00000000000000000007.msg: corrupt spool file"));
        assert!(warnings[1].contains("unknown kind \"bogus\""));
        assert!(warnings[2].ends_with("incomplete write from an earlier run; removed"));
        assert!(warnings[3].starts_with("00000000000000000010.msg: cannot read"));
        assert_eq!(warnings[4], "README.txt: not a spool file; skipped");
        assert!(!dir.join("00000000000000000009.msg.tmp").exists());
        assert_eq!(summary(&spool).len(), 1);
        // New entries never reuse a number seen on disk.
        assert_eq!(spool.push("t/a", EntryKind::End, b"").unwrap().seq, 11);
        assert!(dir.join("README.txt").exists());
    }

    #[test]
    fn event_spooled_as_its_json() {
        let folder = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(folder.path(), 10).unwrap();
        let event = AlertEvent {
            kind: EventKind::Update,
            top_score: 0.8,
            model: "brick-v1".into(),
            ..AlertEvent::sample("line1-1700000000000-0", "line1", 1_700_000_000.0, 0.7)
        };
        spool.push_event("stpm/line1/events", &event).unwrap();
        let entry = spool.pending().next().unwrap();
        assert_eq!(entry.kind, EntryKind::Update);
        assert_eq!(entry.topic, "stpm/line1/events");
        let parsed: AlertEvent = serde_json::from_slice(&entry.payload).unwrap();
        assert_eq!(parsed, event);
    }

    #[test]
    fn a_file_that_cannot_be_deleted_does_not_keep_its_message() {
        let folder = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(folder.path(), 2).unwrap();
        let topic = "stpm/line1/events";
        for payload in ["a", "b"] {
            spool
                .push(topic, EntryKind::New, payload.as_bytes())
                .unwrap();
        }
        // A folder in place of a message's file cannot be removed as a file, even by root.
        let dir = folder.path().to_path_buf();
        let jam = |seq: u64| {
            let path = dir.join(format!("{seq:0SEQ_DIGITS$}{EXTENSION}"));
            fs::remove_file(&path).unwrap();
            fs::create_dir(&path).unwrap();
            fs::write(path.join("keep"), "").unwrap();
            path
        };
        let first = jam(0);
        let error = spool.ack(0).unwrap_err();
        assert!(matches!(error, SpoolError::Remove { .. }), "{error}");
        assert_eq!(spool.undeleted(), 1);
        assert_eq!(summary(&spool), vec![entry(1, EntryKind::New, "b")]);
        // Dropped by the bound with its file stuck: the new message is still stored.
        let second = jam(1);
        spool.push(topic, EntryKind::New, b"c").unwrap();
        let pushed = spool.push(topic, EntryKind::New, b"d").unwrap();
        assert_eq!(pushed.dropped.len(), 1);
        assert_eq!(pushed.dropped[0].seq, 1);
        assert_eq!(spool.undeleted(), 2);
        assert_eq!(
            summary(&spool),
            vec![entry(2, EntryKind::New, "c"), entry(3, EntryKind::New, "d")]
        );
        // Once the files can go, the next change deletes them.
        fs::remove_dir_all(&first).unwrap();
        fs::remove_dir_all(&second).unwrap();
        fs::write(&first, "x").unwrap();
        fs::write(&second, "x").unwrap();
        assert!(spool.ack(2).unwrap());
        assert_eq!(spool.undeleted(), 0);
        assert!(!first.exists() && !second.exists());
    }

    #[test]
    fn bad_topic_and_unwritable_folder_are_errors() {
        let folder = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(folder.path(), 10).unwrap();
        let error = spool.push("a\nb", EntryKind::Other, b"").unwrap_err();
        assert!(matches!(error, SpoolError::Topic { .. }), "{error}");
        fs::write(folder.path().join("file"), "").unwrap();
        let error = Spool::open(folder.path().join("file"), 10).unwrap_err();
        assert!(error.to_string().contains("file"), "{error}");
        assert!(spool.is_empty());
    }
}
