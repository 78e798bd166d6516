//! `[mqtt]`: alert events into the on-disk spool, which the publisher drains to the broker in
//! order, and the camera's retained state message (`alerts::publisher` owns the connection).

use super::{Picture, Sink, SinkError};
use crate::alerts::{AlertEvent, CameraState, PublisherHandle};

/// One camera's events and state.
pub struct MqttAlerts {
    camera: String,
    publisher: PublisherHandle,
}

impl MqttAlerts {
    pub fn new(camera: &str, publisher: PublisherHandle) -> Self {
        Self {
            camera: camera.to_string(),
            publisher,
        }
    }
}

impl Sink for MqttAlerts {
    fn alert(
        &mut self,
        event: &AlertEvent,
        _picture: Option<&Picture<'_>>,
    ) -> Result<(), SinkError> {
        self.publisher
            .event(event)
            .map(|_| ())
            .map_err(SinkError::Alert)
    }

    fn state(&mut self, state: &CameraState) -> Result<(), SinkError> {
        self.publisher
            .state(&self.camera, state)
            .map_err(SinkError::State)
    }
}
