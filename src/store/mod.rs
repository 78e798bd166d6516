//! The event store: one SQLite file (`[storage] path`/`events.db`, WAL mode, schema versions
//! applied in order through `PRAGMA user_version`) with one row per alert event, written on the
//! same transitions that publish MQTT `new` / `update` / `end`, and read by whoever lists events.

pub mod disk;
pub mod lock;
pub mod retention;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::alerts::{AlertEvent, EventKind};

/// The database file inside the storage folder.
pub const DATABASE: &str = "events.db";

/// How long a write waits for another connection's (or process's) write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the ids of changed events go (a row written, a clip added, a verdict), for whoever
/// follows the store live (the console's event list); sending with no one listening is fine.
pub type Changes = tokio::sync::broadcast::Sender<String>;

/// How the run's event writer keeps up: kept by the writer and the cameras' hand-off to it, read
/// by `/metrics` and `/health`.
#[derive(Debug, Default)]
pub struct StoreStatus {
    /// Event changes waiting in memory for the store.
    pub backlog: AtomicU64,
    /// Event changes that will not be stored: handed on while the writer was too far behind,
    /// dropped from a full backlog, or refused for good.
    pub unstored: AtomicU64,
    /// The store refuses writes now (a full disk, a write lock held elsewhere, a damaged file).
    pub failing: AtomicBool,
}

/// Schema versions, applied in order; version N is `MIGRATIONS[N - 1]`. Never edit one that has
/// shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: events.
    "CREATE TABLE events (
        id TEXT PRIMARY KEY,
        camera TEXT NOT NULL,
        start_time REAL NOT NULL,
        end_time REAL,
        end_reason TEXT,
        score REAL NOT NULL,
        raw_score REAL,
        box TEXT,
        zone TEXT,
        model TEXT NOT NULL,
        snapshot_path TEXT,
        clean_path TEXT,
        clip_path TEXT,
        media_gone INTEGER NOT NULL DEFAULT 0,
        verdict TEXT NOT NULL DEFAULT 'unreviewed',
        verdict_by TEXT,
        verdict_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX events_by_start ON events (start_time DESC);
    CREATE INDEX events_by_camera ON events (camera, start_time DESC);",
    // 2: the unix time of a clip's first frame (the event starts `start_time - clip_start` into it).
    "ALTER TABLE events ADD COLUMN clip_start REAL;",
];

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the storage folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file operation on the store other than creating its folder (`action` says which).
    #[error("cannot {action} {path}: {source}")]
    File {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "event store {path} has schema version {found}, newer than this stpm knows ({known}): use a newer stpm or another storage.path"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("no event {0}")]
    NoEvent(String),
    #[error("event store {0} is not there (the run's writer makes a new one at its next write)")]
    Missing(PathBuf),
}

impl StoreError {
    /// Whether the file is not a database, or a damaged one (truncated, overwritten): no write
    /// or read of it will pass until it is replaced.
    pub fn damaged(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(failure, _),
                ..
            } if matches!(
                failure.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            )
        )
    }

    /// Whether the database refused this write for what it holds (a constraint such as a NaN
    /// score in `score NOT NULL`, a value too big or of the wrong type): the same write will
    /// never succeed. Everything else (busy, locked, a full or failing disk, a damaged or
    /// missing file) may pass later, so the write is kept and tried again.
    pub fn refused_for_good(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(failure, _),
                ..
            } => matches!(
                failure.code,
                ConstraintViolation | TooBig | TypeMismatch | ParameterOutOfRange
            ),
            StoreError::Sqlite {
                source:
                    rusqlite::Error::ToSqlConversionFailure(_)
                    | rusqlite::Error::InvalidParameterCount(..)
                    | rusqlite::Error::InvalidParameterName(_),
                ..
            } => true,
            _ => false,
        }
    }
}

/// An operator's verdict on an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Unreviewed,
    Defect,
    NotADefect,
}

impl Verdict {
    pub fn key(self) -> &'static str {
        match self {
            Self::Unreviewed => "unreviewed",
            Self::Defect => "defect",
            Self::NotADefect => "not_a_defect",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "defect" => Self::Defect,
            "not_a_defect" => Self::NotADefect,
            _ => Self::Unreviewed,
        }
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    pub id: String,
    pub camera: String,
    pub start_time: f64,
    pub end_time: Option<f64>,
    pub end_reason: Option<String>,
    /// Peak normalised score (0.5 = the alert threshold).
    pub score: f32,
    /// The model's raw image score at the peak.
    pub raw_score: Option<f32>,
    /// The peak frame's largest box, normalised `[x, y, w, h]`.
    pub boxes: Option<[f32; 4]>,
    pub zone: Option<String>,
    /// The model that scored it (the bundle's graph hash, first 12 hex digits).
    pub model: String,
    pub snapshot_path: Option<PathBuf>,
    pub clean_path: Option<PathBuf>,
    pub clip_path: Option<PathBuf>,
    /// Unix time of the clip's first frame.
    pub clip_start: Option<f64>,
    /// Retention deleted some of its media (the paths it deleted are gone from the row).
    pub media_gone: bool,
    pub verdict: Verdict,
    pub verdict_by: Option<String>,
    pub verdict_at: Option<f64>,
}

/// What a peak frame adds to an event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peak {
    pub raw_score: Option<f32>,
    pub snapshot_path: Option<PathBuf>,
    pub clean_path: Option<PathBuf>,
}

/// A filter of [`EventStore::list`].
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub camera: Option<String>,
    pub since: Option<f64>,
    pub until: Option<f64>,
    pub min_score: Option<f32>,
    pub verdict: Option<Verdict>,
    /// Only events before this one in the list's order (`start_time`, `id`): the next page.
    pub before: Option<(f64, String)>,
    pub limit: usize,
}

/// Moves a damaged `<folder>/events.db` (and its `-wal` and `-shm` files) aside, to
/// `events.db.bad-<unix seconds>` (`-<n>` added when that name is taken; SQLite can still open it
/// there), so a new store can start in its place; returns the new name.
pub fn set_aside(folder: &Path, unix_seconds: u64) -> Result<PathBuf, StoreError> {
    let aside = (0u32..)
        .map(|n| match n {
            0 => folder.join(format!("{DATABASE}.bad-{unix_seconds}")),
            n => folder.join(format!("{DATABASE}.bad-{unix_seconds}-{n}")),
        })
        .find(|name| !name.exists())
        .unwrap_or_else(|| folder.join(format!("{DATABASE}.bad-{unix_seconds}")));
    for suffix in ["", "-wal", "-shm"] {
        let from = folder.join(format!("{DATABASE}{suffix}"));
        let mut to = aside.clone().into_os_string();
        to.push(suffix);
        let to = PathBuf::from(to);
        match std::fs::rename(&from, &to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::File {
                    action: "move aside",
                    path: from,
                    source: e,
                });
            }
            _ => {}
        }
    }
    Ok(aside)
}

/// An open event store (one connection; open one per thread).
pub struct EventStore {
    path: PathBuf,
    db: Connection,
    /// The device and inode of the file it opened (to tell it from one put in its place).
    file: Option<(u64, u64)>,
    /// The file's length when this store last emptied its log into it: the store never
    /// shrinks it, so a shorter file was cut by someone else.
    emptied_len: AtomicU64,
    /// The writer's own handle on the file ([`EventStore::watch`]), for its header and length.
    /// Kept open for the store's life: on Linux, closing any handle on the file drops every
    /// lock the process holds on it, SQLite's included. Declared after `db`, so it is closed
    /// after the connection; another connection of the process still on this file then loses
    /// its lock (only at the writer's end, or for a file being replaced or set aside).
    watched: Option<std::fs::File>,
}

/// The file at an open store's path now, against the one it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFile {
    /// The same file (or it cannot be told).
    Same,
    /// No file there: rows written now would go into a file no one can open.
    Deleted,
    /// Another file there (a restored backup, a move).
    Replaced,
    /// The same file, overwritten or cut short in place: SQLite does not notice at a write.
    Damaged,
}

/// The device and inode of `path`.
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl EventStore {
    /// Opens (creating it and the folder if needed) `<folder>/events.db` and brings its schema up
    /// to date.
    pub fn open(folder: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(folder).map_err(|source| StoreError::Folder {
            path: folder.to_path_buf(),
            source,
        })?;
        Self::open_with(folder.join(DATABASE), OpenFlags::default())
    }

    /// Opens `<folder>/events.db` only if it is there ([`StoreError::Missing`] if not): for
    /// readers beside a running writer, which must not make a file in place of one deleted while
    /// the writer still has the old one open (both would then share one write-ahead log).
    pub fn open_existing(folder: &Path) -> Result<Self, StoreError> {
        let path = folder.join(DATABASE);
        let flags = OpenFlags::default() - OpenFlags::SQLITE_OPEN_CREATE;
        match Self::open_with(path.clone(), flags) {
            Err(StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(failure, _),
                ..
            }) if failure.code == rusqlite::ErrorCode::CannotOpen && !path.exists() => {
                Err(StoreError::Missing(path))
            }
            result => result,
        }
    }

    fn open_with(path: PathBuf, flags: OpenFlags) -> Result<Self, StoreError> {
        // The file's identity is taken before and after opening: a file swapped in between is
        // opened again, so `file` is the one the connection has.
        for _ in 0..3 {
            let before = file_id(&path).ok();
            let store = Self::connect(path.clone(), flags)?;
            if before.is_none() || before == store.file {
                return Ok(store);
            }
        }
        Self::connect(path, flags)
    }

    fn connect(path: PathBuf, flags: OpenFlags) -> Result<Self, StoreError> {
        let db =
            Connection::open_with_flags(&path, flags).map_err(|source| StoreError::Sqlite {
                path: path.clone(),
                source,
            })?;
        let mut store = Self {
            path,
            db,
            file: None,
            emptied_len: AtomicU64::new(0),
            watched: None,
        };
        // Another process setting up the same new file (WAL, the schema) can make SQLite answer
        // "busy" at once, without waiting out the busy timeout: try again for a while.
        let started = std::time::Instant::now();
        loop {
            match store.configure() {
                Err(StoreError::Sqlite {
                    source: rusqlite::Error::SqliteFailure(failure, _),
                    ..
                }) if failure.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                result => {
                    result?;
                    store.file = file_id(&store.path).ok();
                    return Ok(store);
                }
            }
        }
    }

    /// Lets [`EventStore::file_now`] also tell a file overwritten or cut short in place (the
    /// run's writer; readers do not, as each would open and close the file).
    pub fn watch(&mut self) -> Result<(), StoreError> {
        let file = std::fs::File::open(&self.path).map_err(|source| StoreError::File {
            action: "open for watching",
            path: self.path.clone(),
            source,
        })?;
        if let Ok(meta) = file.metadata() {
            self.emptied_len.store(meta.len(), Ordering::Relaxed);
        }
        self.watched = Some(file);
        Ok(())
    }

    /// Whether the file at this store's path is still the one it opened.
    pub fn file_now(&self) -> StoreFile {
        let Some(opened) = self.file else {
            return StoreFile::Same;
        };
        match file_id(&self.path) {
            Ok(now) if now == opened => {}
            Ok(_) => return StoreFile::Replaced,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return StoreFile::Deleted;
            }
            Err(_) => return StoreFile::Same,
        }
        let Some(file) = &self.watched else {
            return StoreFile::Same;
        };
        // The same file: still a database of at least the length the store left it at? (An
        // fstat and 16 bytes; a 0-byte file is a database not yet written, until it was.)
        let read = (|| -> std::io::Result<bool> {
            let len = file.metadata()?.len();
            let emptied = self.emptied_len.load(Ordering::Relaxed);
            if len == 0 {
                return Ok(emptied == 0);
            }
            let mut header = [0u8; 16];
            std::os::unix::fs::FileExt::read_exact_at(file, &mut header, 0)?;
            Ok(&header == b"SQLite format 3\0" && len >= emptied)
        })();
        match read {
            Ok(true) => StoreFile::Same,
            Ok(false) => StoreFile::Damaged,
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => StoreFile::Damaged,
            Err(_) => StoreFile::Same,
        }
    }

    /// The length of the write-ahead log at this store's path (0 when there is none).
    pub fn log_len(&self) -> u64 {
        let mut log = self.path.clone().into_os_string();
        log.push("-wal");
        std::fs::metadata(log).map_or(0, |meta| meta.len())
    }

    /// Moves what the write-ahead log holds into the file this store opened (wherever it is
    /// now) and empties the log, so that a file put at its path is not handed this store's rows
    /// when it is opened next (SQLite finds a log by its path). False when another connection
    /// kept it from finishing; the log is then not empty.
    /// It does not wait for readers: a reader that holds it up makes it answer false at once.
    pub fn empty_log(&self) -> Result<bool, StoreError> {
        self.db
            .busy_timeout(Duration::ZERO)
            .map_err(self.sqlite())?;
        // (busy, frames in the log, frames moved): busy is 1 when it could not finish.
        let checkpoint = self
            .db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            });
        let waited = self.db.busy_timeout(BUSY_TIMEOUT);
        let busy = match checkpoint {
            Ok(busy) => busy,
            Err(rusqlite::Error::SqliteFailure(failure, _))
                if failure.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                1
            }
            Err(source) => return Err(self.sqlite()(source)),
        };
        waited.map_err(self.sqlite())?;
        if busy == 0
            && let Some(Ok(meta)) = self.watched.as_ref().map(std::fs::File::metadata)
        {
            self.emptied_len.store(meta.len(), Ordering::Relaxed);
        }
        Ok(busy == 0)
    }

    fn sqlite(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// WAL (readers never block the writer), a busy timeout, and the migrations.
    fn configure(&mut self) -> Result<(), StoreError> {
        let sqlite = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        self.db.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        self.db
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        // WAL with NORMAL: a committed event survives a crash of the process; a power cut may
        // lose the last transactions, never the file.
        self.db
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(sqlite)?;
        // Up to date (every open but the first): a read, no write lock.
        let current: i64 = self
            .db
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sqlite)?;
        if current == MIGRATIONS.len() as i64 {
            return Ok(());
        }
        // The version is read again and the migrations applied under one write lock (IMMEDIATE),
        // so two processes opening a new file at once do not both create the tables.
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sqlite)?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for migration in &MIGRATIONS[usize::try_from(version).unwrap_or(0)..] {
            tx.execute_batch(migration).map_err(sqlite)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)
            .map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
        Ok(())
    }

    /// The schema version of the open file.
    pub fn version(&self) -> Result<i64, StoreError> {
        self.db
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(self.sqlite())
    }

    /// Records one event message at unix time `now`: `new` inserts the row, `update` raises the
    /// peak, `end` closes it. `peak` (the frame of a new top score) sets the peak's raw score and
    /// its pictures.
    pub fn record(
        &self,
        event: &AlertEvent,
        model: &str,
        peak: Option<&Peak>,
        now: f64,
    ) -> Result<(), StoreError> {
        let top_box = event
            .boxes
            .first()
            .map(|b| serde_json::to_string(&[b.x, b.y, b.w, b.h]).unwrap_or_default());
        let end_reason = event
            .end_reason
            .and_then(|reason| serde_json::to_value(reason).ok())
            .and_then(|value| value.as_str().map(String::from));
        let path_text = |path: Option<&PathBuf>| path.map(|p| p.to_string_lossy().into_owned());
        let (raw, snapshot, clean) = match peak {
            Some(peak) => (
                peak.raw_score,
                path_text(peak.snapshot_path.as_ref()),
                path_text(peak.clean_path.as_ref()),
            ),
            None => (None, None, None),
        };
        let is_peak = peak.is_some();
        // One statement for every kind: the row is created if missing (an `update` or `end`
        // whose `new` came before a restart of the store), and the peak only ever rises.
        self.db
            .execute(
                "INSERT INTO events (id, camera, start_time, end_time, end_reason, score, raw_score,
                     box, model, snapshot_path, clean_path, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (id) DO UPDATE SET
                     end_time = COALESCE(excluded.end_time, end_time),
                     end_reason = COALESCE(excluded.end_reason, end_reason),
                     score = MAX(score, excluded.score),
                     raw_score = CASE WHEN ?13 THEN COALESCE(excluded.raw_score, raw_score)
                                      ELSE raw_score END,
                     box = CASE WHEN ?13 THEN COALESCE(excluded.box, box) ELSE box END,
                     snapshot_path = COALESCE(excluded.snapshot_path, snapshot_path),
                     clean_path = COALESCE(excluded.clean_path, clean_path),
                     updated_at = excluded.updated_at",
                params![
                    event.id,
                    event.camera,
                    event.start_time,
                    event.end_time.filter(|_| event.kind == EventKind::End),
                    end_reason,
                    event.top_score,
                    raw,
                    top_box,
                    model,
                    snapshot,
                    clean,
                    now,
                    is_peak,
                ],
            )
            .map_err(self.sqlite())?;
        Ok(())
    }

    /// Ends every event left open by a run that stopped without ending them (killed, power cut):
    /// end time = its last update, reason `interrupted`. Returns how many.
    pub fn end_dangling(&self) -> Result<usize, StoreError> {
        self.db
            .execute(
                "UPDATE events SET end_time = updated_at, end_reason = 'interrupted'
                 WHERE end_time IS NULL",
                [],
            )
            .map_err(self.sqlite())
    }

    /// Retention deleted `path`: the event that pointed at it (as snapshot, clean frame or clip)
    /// forgets the path and is marked as having lost media. Returns how many events.
    pub fn media_deleted(&self, path: &Path) -> Result<usize, StoreError> {
        let text = path.to_string_lossy();
        let mut changed = 0;
        for column in ["snapshot_path", "clean_path", "clip_path"] {
            changed += self
                .db
                .execute(
                    &format!(
                        "UPDATE events SET {column} = NULL, media_gone = 1 WHERE {column} = ?1"
                    ),
                    [text.as_ref()],
                )
                .map_err(self.sqlite())?;
        }
        Ok(changed)
    }

    /// Records the event's clip, whose first frame was captured at unix time `start`.
    pub fn set_clip(&self, id: &str, path: &Path, start: f64) -> Result<(), StoreError> {
        self.db
            .execute(
                "UPDATE events SET clip_path = ?2, clip_start = ?3 WHERE id = ?1",
                params![id, path.to_string_lossy(), start],
            )
            .map_err(self.sqlite())?;
        Ok(())
    }

    /// Sets the operator's verdict.
    pub fn set_verdict(
        &self,
        id: &str,
        verdict: Verdict,
        by: &str,
        now: f64,
    ) -> Result<(), StoreError> {
        let changed = self
            .db
            .execute(
                "UPDATE events SET verdict = ?2, verdict_by = ?3, verdict_at = ?4 WHERE id = ?1",
                params![id, verdict.key(), by, now],
            )
            .map_err(self.sqlite())?;
        if changed == 0 {
            return Err(StoreError::NoEvent(id.to_string()));
        }
        Ok(())
    }

    /// One event.
    pub fn get(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        self.db
            .query_row(
                &format!("SELECT {COLUMNS} FROM events WHERE id = ?1"),
                [id],
                row_event,
            )
            .optional()
            .map_err(self.sqlite())
    }

    /// Events matching `query`, newest first.
    pub fn list(&self, query: &Query) -> Result<Vec<StoredEvent>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM events WHERE 1 = 1");
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        let mut add = |clause: &str, value: rusqlite::types::Value| {
            values.push(value);
            sql.push_str(&format!(" AND {clause} ?{}", values.len()));
        };
        if let Some(camera) = &query.camera {
            add("camera =", camera.clone().into());
        }
        if let Some(since) = query.since {
            add("start_time >=", since.into());
        }
        if let Some(until) = query.until {
            add("start_time <", until.into());
        }
        if let Some(min) = query.min_score {
            add("score >=", f64::from(min).into());
        }
        if let Some(verdict) = query.verdict {
            add("verdict =", verdict.key().to_string().into());
        }
        if let Some((time, id)) = &query.before {
            values.push((*time).into());
            values.push(id.clone().into());
            let (t, i) = (values.len() - 1, values.len());
            sql.push_str(&format!(
                " AND (start_time < ?{t} OR (start_time = ?{t} AND id < ?{i}))"
            ));
        }
        let limit = if query.limit == 0 { 100 } else { query.limit };
        sql.push_str(&format!(" ORDER BY start_time DESC, id DESC LIMIT {limit}"));
        let mut statement = self.db.prepare(&sql).map_err(self.sqlite())?;
        let rows = statement
            .query_map(rusqlite::params_from_iter(values), row_event)
            .map_err(self.sqlite())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sqlite())
    }
}

const COLUMNS: &str = "id, camera, start_time, end_time, end_reason, score, raw_score, box, zone, \
                       model, snapshot_path, clean_path, clip_path, media_gone, verdict, \
                       verdict_by, verdict_at, clip_start";

fn row_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let path = |index: usize| -> rusqlite::Result<Option<PathBuf>> {
        Ok(row.get::<_, Option<String>>(index)?.map(PathBuf::from))
    };
    let boxes: Option<String> = row.get(7)?;
    Ok(StoredEvent {
        id: row.get(0)?,
        camera: row.get(1)?,
        start_time: row.get(2)?,
        end_time: row.get(3)?,
        end_reason: row.get(4)?,
        score: row.get::<_, f64>(5)? as f32,
        raw_score: row.get::<_, Option<f64>>(6)?.map(|v| v as f32),
        boxes: boxes.and_then(|text| serde_json::from_str(&text).ok()),
        zone: row.get(8)?,
        model: row.get(9)?,
        snapshot_path: path(10)?,
        clean_path: path(11)?,
        clip_path: path(12)?,
        media_gone: row.get(13)?,
        verdict: Verdict::parse(&row.get::<_, String>(14)?),
        verdict_by: row.get(15)?,
        verdict_at: row.get(16)?,
        clip_start: row.get(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{BoxN, EndReason};

    /// A NaN score breaks `score NOT NULL`: refused for good. A store whose table is gone fails
    /// every write the same way a damaged file does: kept for later, not dropped.
    #[test]
    fn only_a_row_the_database_refuses_for_itself_counts_as_refused_for_good() {
        let dir = tempfile::tempdir().expect("dir");
        let store = EventStore::open(dir.path()).expect("store");
        let nan = store
            .record(&event(EventKind::New, "e1", f32::NAN, None), "m", None, 1.0)
            .expect_err("NaN score");
        assert!(nan.refused_for_good(), "{nan}");
        Connection::open(dir.path().join(DATABASE))
            .and_then(|db| db.execute_batch("DROP TABLE events"))
            .expect("drop the table");
        let gone = store
            .record(&event(EventKind::New, "e2", 0.8, None), "m", None, 1.0)
            .expect_err("no table");
        assert!(!gone.refused_for_good(), "{gone}");
    }

    fn event(kind: EventKind, id: &str, top: f32, end: Option<f64>) -> AlertEvent {
        AlertEvent {
            kind,
            end_time: end,
            boxes: vec![BoxN {
                x: 0.25,
                y: 0.5,
                w: 0.125,
                h: 0.0625,
            }],
            snapshot: true,
            model: "demo".into(),
            end_reason: end.map(|_| EndReason::Cleared),
            ..AlertEvent::sample(id, "line1", 1_700_000_000.125, top)
        }
    }

    #[test]
    fn an_event_goes_from_new_to_end_with_its_peak_and_a_verdict() {
        let dir = tempfile::tempdir().expect("dir");
        let store = EventStore::open(&dir.path().join("data")).expect("open");
        assert_eq!(store.version().expect("version"), MIGRATIONS.len() as i64);
        let id = "line1-1700000000125-1";
        let peak = Peak {
            raw_score: Some(3.5),
            snapshot_path: Some("s.jpg".into()),
            clean_path: Some("c.jpg".into()),
        };
        store
            .record(
                &event(EventKind::New, id, 0.7, None),
                "abc",
                Some(&peak),
                1.0,
            )
            .expect("new");
        let open = store.get(id).expect("get").expect("stored");
        assert_eq!((open.start_time, open.end_time), (1_700_000_000.125, None));
        // A lower update does not lower the peak; a higher one raises it.
        store
            .record(&event(EventKind::Update, id, 0.6, None), "abc", None, 2.0)
            .expect("update");
        assert_eq!(store.get(id).expect("get").map(|e| e.score), Some(0.7));
        store
            .record(&event(EventKind::Update, id, 0.9, None), "abc", None, 3.0)
            .expect("update");
        store
            .record(
                &event(EventKind::End, id, 0.9, Some(1_700_000_009.5)),
                "abc",
                None,
                4.0,
            )
            .expect("end");
        let stored = store.get(id).expect("get").expect("stored");
        assert_eq!(stored.score, 0.9);
        assert_eq!(stored.end_time, Some(1_700_000_009.5));
        assert_eq!(stored.end_reason.as_deref(), Some("cleared"));
        // The peak's pictures and raw score stay those of the frame that brought them.
        assert_eq!(stored.raw_score, Some(3.5));
        assert_eq!(stored.snapshot_path, Some(PathBuf::from("s.jpg")));
        assert_eq!(stored.boxes, Some([0.25, 0.5, 0.125, 0.0625]));
        assert_eq!(
            (stored.model.as_str(), stored.verdict),
            ("abc", Verdict::Unreviewed)
        );
        store
            .set_verdict(id, Verdict::NotADefect, "anna", 5.0)
            .expect("verdict");
        let reviewed = store.get(id).expect("get").expect("stored");
        assert_eq!(reviewed.verdict, Verdict::NotADefect);
        assert_eq!(reviewed.verdict_by.as_deref(), Some("anna"));
        assert!(matches!(
            store.set_verdict("nope", Verdict::Defect, "anna", 5.0),
            Err(StoreError::NoEvent(_))
        ));
        assert!(store.get("nope").expect("get").is_none());
    }

    #[test]
    fn reopening_migrates_once_ends_dangling_events_and_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let store = EventStore::open(dir.path()).expect("open");
            store
                .record(&event(EventKind::New, "a-1-1", 0.8, None), "m", None, 42.0)
                .expect("new");
        }
        let store = EventStore::open(dir.path()).expect("reopen");
        assert_eq!(store.version().expect("version"), MIGRATIONS.len() as i64);
        assert_eq!(store.end_dangling().expect("end"), 1);
        let ended = store.get("a-1-1").expect("get").expect("stored");
        assert_eq!(ended.end_time, Some(42.0));
        assert_eq!(ended.end_reason.as_deref(), Some("interrupted"));
        assert_eq!(store.end_dangling().expect("again"), 0);
        drop(store);
        let db = Connection::open(dir.path().join(DATABASE)).expect("raw");
        db.pragma_update(None, "user_version", 99).expect("bump");
        drop(db);
        let message = EventStore::open(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("schema version 99, newer"), "{message}");
    }

    #[test]
    fn processes_opening_a_new_store_at_once_create_it_once() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("dir");
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|_| {
                    let folder = dir.path().to_path_buf();
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        EventStore::open(&folder).map(|store| store.version())
                    })
                })
                .collect();
            for opener in openers {
                let version = opener
                    .join()
                    .expect("thread")
                    .expect("open")
                    .expect("version");
                assert_eq!(version, MIGRATIONS.len() as i64);
            }
        }
    }

    #[test]
    fn a_file_that_cannot_be_watched_is_named_as_such() {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = EventStore::open(dir.path()).expect("store");
        std::fs::remove_file(dir.path().join(DATABASE)).expect("delete");
        let error = store.watch().expect_err("nothing to watch");
        let message = error.to_string();
        assert!(
            message.starts_with("cannot open for watching ") && message.contains(DATABASE),
            "{message}"
        );
    }

    #[test]
    fn a_reader_never_makes_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let error = EventStore::open_existing(dir.path())
            .err()
            .expect("no store yet");
        assert!(matches!(error, StoreError::Missing(_)), "{error}");
        assert!(!dir.path().join(DATABASE).exists());
        EventStore::open(dir.path()).expect("the writer makes it");
        let store = EventStore::open_existing(dir.path()).expect("then a reader opens it");
        assert_eq!(store.version().expect("version"), MIGRATIONS.len() as i64);
        assert_eq!(store.file_now(), StoreFile::Same);
    }

    #[test]
    fn lists_filter_and_come_newest_first() {
        let dir = tempfile::tempdir().expect("dir");
        let store = EventStore::open(dir.path()).expect("open");
        for (index, (camera, score)) in [("a", 0.6), ("b", 0.9), ("a", 0.95)].iter().enumerate() {
            let mut e = event(EventKind::New, &format!("{camera}-{index}"), *score, None);
            e.camera = camera.to_string();
            e.start_time = 100.0 + index as f64;
            store.record(&e, "m", None, 1.0).expect("record");
        }
        let ids = |query: Query| -> Vec<String> {
            store
                .list(&query)
                .expect("list")
                .into_iter()
                .map(|e| e.id)
                .collect()
        };
        assert_eq!(ids(Query::default()), ["a-2", "b-1", "a-0"]);
        let camera_a = Query {
            camera: Some("a".into()),
            ..Query::default()
        };
        assert_eq!(ids(camera_a), ["a-2", "a-0"]);
        let strong = Query {
            min_score: Some(0.9),
            since: Some(101.0),
            limit: 1,
            ..Query::default()
        };
        assert_eq!(ids(strong), ["a-2"]);
        store
            .set_verdict("b-1", Verdict::Defect, "x", 2.0)
            .expect("verdict");
        let defects = Query {
            verdict: Some(Verdict::Defect),
            until: Some(102.0),
            ..Query::default()
        };
        assert_eq!(ids(defects), ["b-1"]);
    }
}
