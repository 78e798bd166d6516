//! What the publisher task and its handles share: the link state, the counters, the command
//! queue's message type, and the errors and status they report.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::mqtt::MqttConfig;
use super::spool::{Spool, SpoolError};

/// Why the broker link is not up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error(
        "MQTT broker {broker} refused the connection of user {user}: {reason}; check mqtt.username, mqtt.password and mqtt.client_id"
    )]
    Refused {
        broker: String,
        user: String,
        reason: String,
    },
    #[error("cannot reach MQTT broker {broker}: {message}")]
    Unreachable { broker: String, message: String },
    #[error("connection to MQTT broker {broker} lost: {message}")]
    Lost { broker: String, message: String },
}

/// What the publisher's handle can report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("no connection to MQTT broker {broker} after {waited:?}{}", .last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        broker: String,
        waited: Duration,
        last: Option<LinkError>,
    },
    #[error("the MQTT publisher for {broker} has stopped")]
    Stopped { broker: String },
}

/// Why a message was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "camera name {camera:?} cannot be an MQTT topic level: it must be non-empty, without '/', '+', '#' or NUL"
    )]
    Camera { camera: String },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot encode the state of camera {camera}: {source}")]
    Encode {
        camera: String,
        source: serde_json::Error,
    },
    #[error("the MQTT publisher's queue is full; {what} for camera {camera} dropped")]
    QueueFull { what: &'static str, camera: String },
    #[error("the MQTT publisher has stopped; {what} for camera {camera} dropped")]
    Stopped { what: &'static str, camera: String },
}

/// Counters for metrics, as of the call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublisherStatus {
    /// A CONNACK was accepted and the link has not failed since.
    pub connected: bool,
    /// Spooled events the broker acknowledged (PUBACK) since start.
    pub events_published: u64,
    /// Events waiting in the spool (on disk).
    pub events_pending: usize,
    /// Events the spool dropped to stay within its bound since start.
    pub events_dropped: u64,
    /// Snapshots and states handed to the broker.
    pub messages_published: u64,
    /// Snapshots and states dropped (queue full or no connection) and unpublishable spool entries.
    pub messages_dropped: u64,
    /// Events the spool could not write (a full or broken disk): each went to the broker from
    /// memory instead (at once when connected, else held up to [`HELD_EVENTS`]).
    pub spool_failures: u64,
    /// Successful connections after the first.
    pub reconnects: u64,
    /// Failed connection attempts and lost connections.
    pub connection_failures: u64,
    /// The latest link problem (kept after a later success, for the log and metrics page).
    pub last_error: Option<String>,
}

/// How `shutdown` went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// `offline` was acknowledged by the broker and the connection closed with DISCONNECT.
    Clean,
    /// There was no connection: the broker publishes the `offline` last will itself.
    NotConnected,
    /// The broker did not answer in time; the connection was dropped (the last will applies).
    TimedOut,
}

#[derive(Debug, Default)]
pub(super) struct Link {
    pub(super) connected: bool,
    pub(super) connects: u64,
    pub(super) last_error: Option<LinkError>,
    pub(super) stopped: bool,
    pub(super) outcome: Option<ShutdownOutcome>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: MqttConfig,
    pub(super) spool: Mutex<Spool>,
    /// Wakes the publisher task: an event was spooled or shutdown was requested.
    pub(super) wake: Notify,
    pub(super) shutdown: Mutex<Option<Duration>>,
    pub(super) link: Mutex<Link>,
    pub(super) link_changed: Condvar,
    pub(super) events_published: AtomicU64,
    pub(super) messages_published: AtomicU64,
    pub(super) messages_dropped: AtomicU64,
    pub(super) connection_failures: AtomicU64,
    pub(super) spool_failures: AtomicU64,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(super) fn update_link(&self, change: impl FnOnce(&mut Link)) {
        change(&mut lock(&self.link));
        self.link_changed.notify_all();
    }
}

/// What the pipeline hands the publisher task besides events (which go through the spool).
#[derive(Debug)]
pub(super) enum Command {
    Snapshot {
        topic: String,
        jpeg: Vec<u8>,
    },
    State {
        topic: String,
        payload: Vec<u8>,
    },
    /// An event the spool could not write: published from memory.
    Unspooled {
        topic: String,
        payload: Vec<u8>,
    },
}

/// Unspooled events held in memory while disconnected, at most (the oldest goes first).
pub const HELD_EVENTS: usize = 1000;

/// The pipeline's side: cheap to clone, every method returns at once (an event costs a spool
/// file write and fsync, never a network wait). Usable from any thread, inside tokio or not,
/// except the blocking `wait_connected` and `shutdown`, which must not run on a runtime thread.
#[derive(Debug, Clone)]
pub struct PublisherHandle {
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::Sender<Command>,
}
