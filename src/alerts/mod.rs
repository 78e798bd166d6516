//! Alerts (DESIGN §6): per-camera zones, debounce and event state, the event JSON and the on-disk
//! spool that keeps events while the broker is away. Fed plain frame summaries with their times;
//! it must not touch the network (the MQTT client) or GStreamer.

mod config;
mod spool;
mod tracker;
mod zones;

pub use config::{AlertConfig, AlertConfigError, CameraAlertOverrides};
pub use spool::{EntryKind, Pushed, Spool, SpoolEntry, SpoolError, SpoolWarning};
pub use tracker::{AlertEvent, AlertTracker, CameraState, CameraStatus, EndReason, EventKind};
pub use zones::{BoxN, FrameSummary, MAX_BOXES, MapSizeError, Polygon, ZoneMask};
