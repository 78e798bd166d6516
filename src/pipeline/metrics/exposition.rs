//! The `/metrics` families: a `prometheus-client` collector that reads a run's counters
//! ([`Exported`]) at each scrape. Counter names leave out `_total`, which the encoder adds.

use std::sync::atomic::Ordering;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;

use super::{CameraMetrics, CameraState, Exported, RECENT_FRAMES, RECENT_QUANTILES, Stage};

/// One sample's value.
enum Value {
    Count(u64),
    Int(i64),
    Real(f64),
}

impl Value {
    fn metric_type(&self) -> MetricType {
        match self {
            Value::Count(_) => MetricType::Counter,
            Value::Int(_) | Value::Real(_) => MetricType::Gauge,
        }
    }

    fn encode(self, encoder: prometheus_client::encoding::MetricEncoder<'_>) -> std::fmt::Result {
        match self {
            Value::Count(n) => ConstCounter::new(n).encode(encoder),
            Value::Int(n) => ConstGauge::new(n).encode(encoder),
            Value::Real(x) => ConstGauge::new(x).encode(encoder),
        }
    }
}

/// A per-camera family: name (counters without `_total`, which the encoder adds), help, and the
/// value of one camera at `started`.
type CameraFamily = (
    &'static str,
    &'static str,
    fn(&CameraMetrics, Instant) -> Value,
);

const CAMERA_FAMILIES: [CameraFamily; 8] = [
    (
        "stpm_frames",
        "Frames that reached the camera's worker.",
        |c, _| Value::Count(c.frames.load(Ordering::Relaxed)),
    ),
    (
        "stpm_frames_analysed",
        "Frames that went through the engine.",
        |c, _| Value::Count(c.analysed.load(Ordering::Relaxed)),
    ),
    (
        "stpm_frames_batched",
        "Analysed frames that shared their inference call with other cameras' frames.",
        |c, _| Value::Count(c.batched.load(Ordering::Relaxed)),
    ),
    (
        "stpm_frames_dropped",
        "Frames dropped because inference was behind the source.",
        |c, _| Value::Count(c.dropped.load(Ordering::Relaxed)),
    ),
    (
        "stpm_camera_online",
        "1 while the camera delivers frames, 0 while starting, offline or ended.",
        |c, _| Value::Int(i64::from(c.state() == CameraState::Online)),
    ),
    (
        "stpm_fps",
        "Analysed frames per second over the last 5 seconds.",
        |c, started| Value::Real(round3(c.fps(started))),
    ),
    (
        "stpm_alert_events",
        "Alert events (new, update, end) emitted.",
        |c, _| Value::Count(c.alerts.load(Ordering::Relaxed)),
    ),
    (
        "stpm_alerts_suppressed",
        "Anomalies not reported because of alerts.max_events_per_hour.",
        |c, _| Value::Count(c.suppressed.load(Ordering::Relaxed)),
    ),
];

impl Collector for Exported {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let precision = self
            .precision
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let engine = Info::new([
            ("provider", self.provider.clone()),
            ("precision", precision),
        ]);
        engine.encode(encoder.encode_descriptor(
            "stpm_engine",
            "The execution provider that runs the model, and which of the bundle's graphs (fp32 or int8).",
            None,
            engine.metric_type(),
        )?)?;
        let model = self
            .model
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some((id, bundle)) = model {
            let info = Info::new([("id", id), ("bundle", label_value(&bundle))]);
            info.encode(encoder.encode_descriptor(
                "stpm_model",
                "The live model: its id (the first 12 hex digits of the sha256 of its stpm.toml) and bundle folder.",
                None,
                info.metric_type(),
            )?)?;
            let swaps = Value::Count(self.model_swaps.load(Ordering::Relaxed));
            let kind = swaps.metric_type();
            swaps.encode(encoder.encode_descriptor(
                "stpm_model_swaps",
                "Models swapped in while running (POST /api/model, SIGHUP, model.watch).",
                None,
                kind,
            )?)?;
        }
        if let Some(element) = self.encoder.get() {
            let info = Info::new([("encoder", element.clone())]);
            info.encode(encoder.encode_descriptor(
                "stpm_encoder",
                "The H.264 encoder element of recordings and RTSP.",
                None,
                info.metric_type(),
            )?)?;
        }
        for (name, help, value) in CAMERA_FAMILIES {
            let Some(first) = self.cameras.first() else {
                break;
            };
            let kind = value(first, self.started).metric_type();
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for camera in &self.cameras {
                let labels = [("camera", camera.camera.as_str())];
                value(camera, self.started).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "stpm_inference_seconds",
            "Engine time per analysed frame.",
            None,
            MetricType::Histogram,
        )?;
        for camera in &self.cameras {
            let labels = [("camera", camera.camera.as_str())];
            camera.inference.encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "stpm_stage_seconds",
            "Time per frame in each stage: decode, queue, preprocess, inference, overlay, output, encode, and end_to_end (appsink to encoded frame).",
            None,
            MetricType::Histogram,
        )?;
        for camera in &self.cameras {
            for (stage, histogram) in Stage::ALL.iter().zip(&camera.stages) {
                let labels = [("camera", camera.camera.as_str()), ("stage", stage.name())];
                histogram.encode(family.encode_family(&labels)?)?;
            }
        }
        let help = format!(
            "Quantiles of each stage's time per frame over the camera's last {RECENT_FRAMES} frames (exact, unlike the histogram buckets)."
        );
        let mut family = encoder.encode_descriptor(
            "stpm_stage_recent_seconds",
            &help,
            None,
            MetricType::Gauge,
        )?;
        for camera in &self.cameras {
            for stage in Stage::ALL {
                let Some(values) = camera.recent_quantiles(stage) else {
                    continue;
                };
                for (q, value) in RECENT_QUANTILES.iter().zip(values) {
                    let quantile = q.to_string();
                    let labels = [
                        ("camera", camera.camera.as_str()),
                        ("stage", stage.name()),
                        ("quantile", quantile.as_str()),
                    ];
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        if let Some(seconds) = crate::process::cpu_seconds() {
            ConstCounter::new(seconds).encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time of this process.",
                None,
                MetricType::Counter,
            )?)?;
        }
        ConstGauge::new(crate::process::rss_bytes()).encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory of this process.",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(folders) = self.disk_folders.get() {
            let mut family = encoder.encode_descriptor(
                "stpm_disk_free_bytes",
                "Free bytes on the disk of each folder the run writes to (data, recordings, spool).",
                None,
                MetricType::Gauge,
            )?;
            for (name, folder) in folders {
                let Ok(free) = crate::store::disk::free_bytes(folder) else {
                    continue;
                };
                let path = label_value(&folder.display().to_string());
                let labels = [("folder", *name), ("path", path.as_str())];
                ConstGauge::new(i64::try_from(free).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        if self.storage.get().is_some() {
            for (name, help, value) in [
                (
                    "stpm_storage_bytes",
                    "Bytes of snapshots, clips and recordings kept (as of the latest retention sweep).",
                    Value::Int(
                        i64::try_from(self.storage_bytes.load(Ordering::Relaxed))
                            .unwrap_or(i64::MAX),
                    ),
                ),
                (
                    "stpm_storage_deleted_files",
                    "Files retention deleted ([storage] max_size, keep_days).",
                    Value::Count(self.storage_deleted.load(Ordering::Relaxed)),
                ),
            ] {
                let kind = value.metric_type();
                value.encode(encoder.encode_descriptor(name, help, None, kind)?)?;
            }
        }
        if let Some(store) = self.event_store.get() {
            for (name, help, value) in [
                (
                    "stpm_event_store_failing",
                    "1 while the event store refuses writes (a full disk, a lock held elsewhere, a damaged file).",
                    Value::Int(i64::from(store.failing.load(Ordering::Relaxed))),
                ),
                (
                    "stpm_event_store_backlog",
                    "Event changes waiting in memory for the event store.",
                    Value::Int(
                        i64::try_from(store.backlog.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
                    ),
                ),
                (
                    "stpm_event_store_unstored",
                    "Event changes the event store will not get (its writer too far behind, a full backlog, or refused for good).",
                    Value::Count(store.unstored.load(Ordering::Relaxed)),
                ),
            ] {
                let kind = value.metric_type();
                value.encode(encoder.encode_descriptor(name, help, None, kind)?)?;
            }
        }
        if let Some(publisher) = self.publisher.get() {
            let status = publisher.status();
            for (name, help, value) in [
                (
                    "stpm_mqtt_connected",
                    "1 while the MQTT broker is connected.",
                    Value::Int(i64::from(status.connected)),
                ),
                (
                    "stpm_alert_spool_pending",
                    "Alert events in the on-disk spool, not yet acknowledged by the broker.",
                    Value::Int(i64::try_from(status.events_pending).unwrap_or(i64::MAX)),
                ),
                (
                    "stpm_alert_spool_dropped",
                    "Alert events dropped because the spool was full.",
                    Value::Count(status.events_dropped),
                ),
                (
                    "stpm_alert_spool_write_failures",
                    "Alert events the spool could not write (a full or broken disk), sent from memory instead.",
                    Value::Count(status.spool_failures),
                ),
                (
                    "stpm_mqtt_reconnects",
                    "Reconnections to the MQTT broker.",
                    Value::Count(status.reconnects),
                ),
                (
                    "stpm_alert_messages_dropped",
                    "Snapshots and camera states not sent (a full queue, a newer one while the broker was away, too large), spool entries the broker cannot take, and events beyond those held in memory while the spool could not write.",
                    Value::Count(status.messages_dropped),
                ),
            ] {
                let kind = value.metric_type();
                value.encode(encoder.encode_descriptor(name, help, None, kind)?)?;
            }
        }
        Ok(())
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// A label value as the text format writes it: prometheus-client writes values as given, so a
/// `"`, `\` or line break in a folder's name would end the value early and break the whole scrape.
fn label_value(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}
