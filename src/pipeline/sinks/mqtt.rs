//! `[mqtt]`: alert events into the on-disk spool, which the publisher drains to the broker in
//! order, and the camera's retained state message (`alerts::publisher` owns the connection).
//! With the event store served over `[http]`, events name their snapshot's and clip's paths.

use super::{Picture, Sink, SinkError};
use crate::alerts::{AlertEvent, CameraState, EventKind, PublisherHandle};

/// What the event store keeps of each event and `[http]` serves, for the messages' URLs.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    /// `[clips]` is on for the camera: `end` messages name the clip.
    pub clips: bool,
}

/// One camera's events and state.
pub struct MqttAlerts {
    camera: String,
    publisher: PublisherHandle,
    served: Option<Served>,
}

impl MqttAlerts {
    pub fn new(camera: &str, publisher: PublisherHandle, served: Option<Served>) -> Self {
        Self {
            camera: camera.to_string(),
            publisher,
            served,
        }
    }
}

/// `event` with the paths of its stored snapshot and (on `end`, with clips) its clip.
fn with_urls(event: &AlertEvent, served: Served) -> AlertEvent {
    let mut event = event.clone();
    event.snapshot_url = Some(format!("/api/events/{}/snapshot.jpg", event.id));
    if served.clips && event.kind == EventKind::End {
        event.clip_url = Some(format!("/api/events/{}/clip.mp4", event.id));
    }
    event
}

impl Sink for MqttAlerts {
    fn alert(
        &mut self,
        event: &AlertEvent,
        _picture: Option<&Picture<'_>>,
    ) -> Result<(), SinkError> {
        let linked = self.served.map(|served| with_urls(event, served));
        self.publisher
            .event(linked.as_ref().unwrap_or(event))
            .map(|_| ())
            .map_err(SinkError::Alert)
    }

    fn state(&mut self, state: &CameraState) -> Result<(), SinkError> {
        self.publisher
            .state(&self.camera, state)
            .map_err(SinkError::State)
    }
}
