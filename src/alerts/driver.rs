//! The MQTT link's driver task: polls rumqttc's event loop for ever, forwards what happens to the
//! publisher task (`publisher`), and reconnects with capped exponential backoff.

use std::time::Duration;

use rumqttc::{ConnectionError, Event, EventLoop, Outgoing, Packet};
use tokio::sync::mpsc;

/// Capped exponential backoff between connection attempts.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(min_seconds: f64, max_seconds: f64) -> Self {
        let seconds = |value: f64, fallback: f64| {
            Duration::try_from_secs_f64(value).unwrap_or(Duration::from_secs_f64(fallback))
        };
        let min = seconds(min_seconds, 0.5);
        let max = seconds(max_seconds, 30.0).max(min);
        Self {
            min,
            max,
            next: min,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = self.min;
    }

    /// The wait before the next attempt; a refused login waits the longest straight away.
    pub(super) fn after_failure(&mut self, refused: bool) -> Duration {
        let wait = if refused { self.max } else { self.next };
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// What the driver reports to the publisher.
#[derive(Debug)]
pub(super) enum Net {
    Event(Event),
    /// The link failed; the driver waits for a resume before it cleans up and retries.
    Down {
        error: ConnectionError,
        retry_in: Duration,
    },
}

/// Polls rumqttc's event loop for ever, forwarding what happens. After a failure it waits for
/// the publisher to confirm it sends nothing more, drops rumqttc's queued requests (the spool
/// resends them), sleeps the backoff and reconnects.
pub(super) async fn drive(
    mut eventloop: EventLoop,
    net: mpsc::UnboundedSender<Net>,
    mut resume: mpsc::Receiver<()>,
    mut backoff: Backoff,
) {
    loop {
        match eventloop.poll().await {
            Ok(event) => {
                if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                    backoff.reset();
                }
                let disconnected = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                if net.send(Net::Event(event)).is_err() || disconnected {
                    return;
                }
            }
            Err(ConnectionError::RequestsDone) => return,
            Err(error) => {
                let refused = matches!(error, ConnectionError::ConnectionRefused(_));
                let retry_in = backoff.after_failure(refused);
                if net.send(Net::Down { error, retry_in }).is_err() {
                    return;
                }
                if resume.recv().await.is_none() {
                    return;
                }
                eventloop.clean();
                eventloop.pending.clear();
                tokio::time::sleep(retry_in).await;
            }
        }
    }
}
