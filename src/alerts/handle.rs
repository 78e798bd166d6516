//! The pipeline's side of the MQTT publisher: [`PublisherHandle`] spools events, queues snapshots
//! and states for the publisher task, reports its counters and shuts it down.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::mqtt::is_topic_level;
use super::shared::{
    Command, LinkError, PublishError, PublisherError, PublisherHandle, PublisherStatus, Shared,
    ShutdownOutcome, lock,
};
use super::spool::SpoolError;
use super::tracker::{AlertEvent, CameraState};

impl PublisherHandle {
    /// Writes the event to the spool (durable once this returns), then wakes the publisher,
    /// which sends it to `<prefix>/<camera>/events` with QoS 1 and forgets it after the PUBACK.
    /// Returns the spool sequence number. Works while the broker is away and after shutdown:
    /// the event then waits on disk for the next run.
    pub fn event(&self, event: &AlertEvent) -> Result<u64, PublishError> {
        check_camera(&event.camera)?;
        let topic = self.shared.config.events_topic(&event.camera);
        let pushed = match lock(&self.shared.spool).push_event(&topic, event) {
            Ok(pushed) => pushed,
            Err(error) => return self.unspooled(topic, event, error),
        };
        for dropped in &pushed.dropped {
            log::warn!(
                "alert spool in {} full: dropped {:?} entry {} for {}",
                spool_dir_of(&self.shared),
                dropped.kind,
                dropped.seq,
                dropped.topic
            );
        }
        self.shared.wake.notify_one();
        Ok(pushed.seq)
    }

    /// The spool could not take `event` (a full or broken disk): it goes to the broker from
    /// memory instead, and the failure is counted (`stpm_alert_spool_write_failures`). It is
    /// lost only if the process ends before a connection.
    fn unspooled(
        &self,
        topic: String,
        event: &AlertEvent,
        error: SpoolError,
    ) -> Result<u64, PublishError> {
        let failures = self.shared.spool_failures.fetch_add(1, Ordering::Relaxed) + 1;
        // At the 1st, 2nd, 4th, 8th… failure: a full disk fails every message.
        if failures.is_power_of_two() {
            log::error!(
                "alert spool: {error}; event {} goes to the broker from memory instead (held \
                 there until connected; {failures} such message(s) so far, \
                 stpm_alert_spool_write_failures_total)",
                event.id
            );
        }
        let payload = serde_json::to_vec(event).map_err(|source| PublishError::Encode {
            camera: event.camera.clone(),
            source,
        })?;
        self.send(
            Command::Unspooled { topic, payload },
            "event",
            &event.camera,
        )?;
        self.shared.wake.notify_one();
        Ok(0)
    }

    /// Queues the annotated JPEG for `<prefix>/<camera>/snapshot` (QoS 1, not retained, not
    /// spooled): without a connection the latest one per camera is held in memory and sent on
    /// reconnect; one it replaces is dropped and counted.
    pub fn snapshot(&self, camera: &str, jpeg: Vec<u8>) -> Result<(), PublishError> {
        check_camera(camera)?;
        let topic = self.shared.config.snapshot_topic(camera);
        self.send(Command::Snapshot { topic, jpeg }, "snapshot", camera)
    }

    /// Queues the camera's state for `<prefix>/<camera>/state` (retained, QoS 1). The latest
    /// state of every camera is sent again after each reconnect.
    pub fn state(&self, camera: &str, state: &CameraState) -> Result<(), PublishError> {
        check_camera(camera)?;
        let payload = serde_json::to_vec(state).map_err(|source| PublishError::Encode {
            camera: camera.to_string(),
            source,
        })?;
        let topic = self.shared.config.state_topic(camera);
        self.send(Command::State { topic, payload }, "state", camera)
    }

    fn send(&self, command: Command, what: &'static str, camera: &str) -> Result<(), PublishError> {
        self.commands.try_send(command).map_err(|error| {
            self.shared.messages_dropped.fetch_add(1, Ordering::Relaxed);
            let camera = camera.to_string();
            match error {
                mpsc::error::TrySendError::Full(_) => PublishError::QueueFull { what, camera },
                mpsc::error::TrySendError::Closed(_) => PublishError::Stopped { what, camera },
            }
        })
    }

    /// Counters for metrics.
    pub fn status(&self) -> PublisherStatus {
        let (events_pending, events_dropped) = {
            let spool = lock(&self.shared.spool);
            (spool.len(), spool.dropped())
        };
        let link = lock(&self.shared.link);
        PublisherStatus {
            connected: link.connected,
            events_published: self.shared.events_published.load(Ordering::Relaxed),
            events_pending,
            events_dropped,
            messages_published: self.shared.messages_published.load(Ordering::Relaxed),
            messages_dropped: self.shared.messages_dropped.load(Ordering::Relaxed),
            reconnects: link.connects.saturating_sub(1),
            connection_failures: self.shared.connection_failures.load(Ordering::Relaxed),
            spool_failures: self.shared.spool_failures.load(Ordering::Relaxed),
            last_error: link.last_error.as_ref().map(ToString::to_string),
        }
    }

    /// Blocks until the broker accepted the connection. A refused login returns at once with
    /// the broker, the user and the reason; anything else waits up to `timeout`.
    pub fn wait_connected(&self, timeout: Duration) -> Result<(), PublisherError> {
        let start = Instant::now();
        let mut link = lock(&self.shared.link);
        loop {
            if link.connected {
                return Ok(());
            }
            if let Some(error @ LinkError::Refused { .. }) = &link.last_error {
                return Err(error.clone().into());
            }
            if link.stopped {
                return Err(PublisherError::Stopped {
                    broker: self.shared.config.broker(),
                });
            }
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                return Err(PublisherError::Timeout {
                    broker: self.shared.config.broker(),
                    waited: timeout,
                    last: link.last_error.clone(),
                });
            };
            link = self
                .shared
                .link_changed
                .wait_timeout(link, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Publishes `offline` (retained), waits for its PUBACK, disconnects, all within `timeout`,
    /// and blocks until the task has stopped. Events still spooled stay on disk for the next run.
    pub fn shutdown(&self, timeout: Duration) -> ShutdownOutcome {
        *lock(&self.shared.shutdown) = Some(timeout);
        self.shared.wake.notify_one();
        // The task gives up at `timeout`; the margin covers scheduling.
        let limit = timeout + Duration::from_millis(500);
        let start = Instant::now();
        let mut link = lock(&self.shared.link);
        while !link.stopped {
            let Some(left) = limit.checked_sub(start.elapsed()) else {
                return ShutdownOutcome::TimedOut;
            };
            link = self
                .shared
                .link_changed
                .wait_timeout(link, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        link.outcome.unwrap_or(ShutdownOutcome::TimedOut)
    }
}

fn spool_dir_of(shared: &Shared) -> String {
    lock(&shared.spool).dir().display().to_string()
}

fn check_camera(camera: &str) -> Result<(), PublishError> {
    if is_topic_level(camera) {
        Ok(())
    } else {
        Err(PublishError::Camera {
            camera: camera.to_string(),
        })
    }
}
