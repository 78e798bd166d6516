//! Alerts (docs/alerts.md): per-camera zones, debounce and event state, the event JSON and the on-disk
//! spool that keeps events while the broker is away, and the MQTT publisher that drains it. Fed
//! plain frame summaries with their times; only `mqtt`, `publisher`, `driver` and `handle` touch the network, none GStreamer.

mod config;
mod driver;
mod handle;
mod mqtt;
mod publisher;
mod shared;
mod spool;
mod tracker;
mod zones;

pub use config::{AlertConfig, AlertConfigError, CameraAlertOverrides};
pub use mqtt::{MqttConfig, MqttConfigError, MqttSetupError, is_publish_topic, is_topic_level};
pub use publisher::AlertPublisher;
pub use shared::{
    LinkError, PublishError, PublisherError, PublisherHandle, PublisherStatus, ShutdownOutcome,
};
pub use spool::{EntryKind, Pushed, Spool, SpoolEntry, SpoolError, SpoolWarning};
pub use tracker::{AlertEvent, AlertTracker, CameraState, CameraStatus, EndReason, EventKind};
pub use zones::{BoxN, FrameSummary, MAX_BOXES, MapSizeError, Polygon, ZoneMask};
