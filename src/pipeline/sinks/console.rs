//! Alert events as `alert {…}` JSON lines on stdout (`stpm run`; `stpm bench` keeps stdout for its
//! report and leaves this sink out).

use super::{Picture, Sink, SinkError};
use crate::alerts::AlertEvent;

/// Prints every alert transition.
#[derive(Debug, Default)]
pub struct Console;

impl Sink for Console {
    fn alert(
        &mut self,
        event: &AlertEvent,
        _picture: Option<&Picture<'_>>,
    ) -> Result<(), SinkError> {
        println!("alert {}", serde_json::to_string(event)?);
        Ok(())
    }
}
