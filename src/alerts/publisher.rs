//! The MQTT publisher: a tokio task that drains the spool to the broker in order, acknowledging a
//! spool entry only after its PUBACK, plus a handle the (non-tokio) pipeline threads call without
//! ever waiting on the network.
//!
//! Two tasks: the *driver* owns rumqttc's `EventLoop` and only polls it (a poll future is never
//! dropped half-way); the *publisher* owns the `AsyncClient`, the spool cursor and the counters.
//! PUBACK tracking: the publisher hands rumqttc one request at a time through its channel and
//! remembers what each was (`Tag`); rumqttc reports `Outgoing::Publish(pkid)` in request order,
//! which ties each packet id to its spool sequence number, and `PubAck(pkid)` then acks the spool.
//! On a connection loss the driver waits until the publisher has stopped sending, then throws away
//! rumqttc's own retransmission queue (clean session): the spool, not rumqttc, resends, from its
//! oldest unacknowledged entry, so order holds. A message may reach the broker twice (QoS 1);
//! consumers deduplicate by the event `id` + `type` (+ `top_score` for updates).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, NetworkOptions, Outgoing, Packet, QoS,
};
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::driver::{Backoff, Net, drive};
use super::mqtt::{MqttConfig, MqttSetupError, is_publish_topic};
use super::shared::{
    Command, HELD_EVENTS, Link, LinkError, PublisherHandle, Shared, ShutdownOutcome, lock,
};
use super::spool::{Spool, SpoolError};

impl MqttConfig {
    /// Where the settings become behaviour: validates them and starts the publisher on
    /// `runtime`, draining `spool` (see `AlertPublisher::start`).
    pub fn build(
        self,
        spool: Spool,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(PublisherHandle, tokio::task::JoinHandle<()>), MqttSetupError> {
        AlertPublisher::start(self, spool, runtime)
    }
}

/// Spool entries handed to rumqttc and not yet acknowledged, at most.
const SPOOL_WINDOW: usize = 16;
/// rumqttc's request channel and its in-flight limit.
const REQUEST_CAPACITY: usize = 64;
/// Snapshots and states queued for the publisher task, at most; beyond it they are dropped.
const COMMAND_CAPACITY: usize = 64;
/// Largest message we hand rumqttc (its outgoing packet limit is set above this in `mqtt.rs`).
const MAX_PAYLOAD: usize = 60 * 1024 * 1024;

/// Starts publishers.
pub struct AlertPublisher;

impl AlertPublisher {
    /// Validates `config`, then spawns the publisher on `runtime`. Entries already in `spool`
    /// (left by an earlier run) are published first, in order. The join handle ends after
    /// `PublisherHandle::shutdown` (or when the runtime stops).
    pub fn start(
        config: MqttConfig,
        spool: Spool,
        runtime: &Handle,
    ) -> Result<(PublisherHandle, JoinHandle<()>), MqttSetupError> {
        config.validate()?;
        let options = config.mqtt_options()?;
        for warning in spool.warnings() {
            log::warn!("alert spool: {warning}");
        }
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        let mut network = NetworkOptions::new();
        network.set_connection_timeout(u64::from(config.connect_timeout_seconds.max(1)));
        eventloop.set_network_options(network);
        eventloop.mqtt_options.set_inflight(REQUEST_CAPACITY as u16);

        let shared = Arc::new(Shared {
            config,
            spool: Mutex::new(spool),
            wake: Notify::new(),
            shutdown: Mutex::new(None),
            link: Mutex::new(Link::default()),
            link_changed: Condvar::new(),
            events_published: AtomicU64::new(0),
            messages_published: AtomicU64::new(0),
            messages_dropped: AtomicU64::new(0),
            connection_failures: AtomicU64::new(0),
            spool_failures: AtomicU64::new(0),
        });
        let (command_tx, command_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (net_tx, net_rx) = mpsc::unbounded_channel();
        let (resume_tx, resume_rx) = mpsc::channel(1);
        let backoff = Backoff::new(
            shared.config.reconnect_min_seconds,
            shared.config.reconnect_max_seconds,
        );
        let driver = runtime.spawn(drive(eventloop, net_tx, resume_rx, backoff));
        let publisher = Publisher {
            shared: Arc::clone(&shared),
            client,
            net_rx,
            resume_tx,
            commands: command_rx,
            driver,
            connected: false,
            session: Session::default(),
            states: BTreeMap::new(),
            held_snapshots: BTreeMap::new(),
            held_events: std::collections::VecDeque::new(),
            undeletable: 0,
        };
        let task = runtime.spawn(publisher.run());
        Ok((
            PublisherHandle {
                shared,
                commands: command_tx,
            },
            task,
        ))
    }
}

/// What a request handed to rumqttc was, so its packet id can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Spool(u64),
    Offline,
    Other,
}

/// Per-connection bookkeeping; reset on every connect and loss.
#[derive(Debug, Default)]
struct Session {
    /// Requests handed to rumqttc whose `Outgoing::Publish` has not been seen yet, in order.
    awaiting_pkid: VecDeque<Tag>,
    /// Packet id → what it carries, until its PUBACK.
    by_pkid: HashMap<u16, Tag>,
    /// Highest spool sequence number handed to rumqttc in this session.
    last_sent: Option<u64>,
    /// Spool entries handed over and not yet acknowledged.
    spool_in_flight: usize,
    offline_acked: bool,
}

struct Publisher {
    shared: Arc<Shared>,
    client: AsyncClient,
    net_rx: mpsc::UnboundedReceiver<Net>,
    resume_tx: mpsc::Sender<()>,
    commands: mpsc::Receiver<Command>,
    driver: JoinHandle<()>,
    connected: bool,
    session: Session,
    /// Latest state payload per topic, re-sent on every connect.
    states: BTreeMap<String, Vec<u8>>,
    /// Per snapshot topic, the latest JPEG that could not be sent while disconnected: sent on the
    /// next connect (a newer one replaces it; in memory only, so a restart loses it).
    held_snapshots: BTreeMap<String, Vec<u8>>,
    /// Events the spool could not write, waiting for a connection (in memory only).
    held_events: std::collections::VecDeque<(String, Vec<u8>)>,
    /// Spool files that could not be deleted after their message left (for a rate-limited log).
    undeletable: u64,
}

impl Publisher {
    async fn run(mut self) {
        let timeout = loop {
            if let Some(timeout) = *lock(&self.shared.shutdown) {
                break timeout;
            }
            if self.connected {
                self.send_spooled();
            }
            tokio::select! {
                net = self.net_rx.recv() => match net {
                    Some(net) => self.on_net(net).await,
                    None => {
                        log::error!("MQTT driver for {} stopped unexpectedly", self.shared.config.broker());
                        self.finish(ShutdownOutcome::NotConnected);
                        return;
                    }
                },
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    // Every handle is gone: nobody can ask for a shutdown any more.
                    None => {
                        lock(&self.shared.shutdown).get_or_insert(Duration::from_secs(2));
                    }
                },
                () = self.shared.wake.notified() => {}
            }
        };
        let outcome = match tokio::time::timeout(timeout, self.go_offline()).await {
            Ok(outcome) => outcome,
            Err(_) => ShutdownOutcome::TimedOut,
        };
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: ShutdownOutcome) {
        self.driver.abort();
        self.connected = false;
        self.shared.update_link(|link| {
            link.connected = false;
            link.stopped = true;
            link.outcome = Some(outcome);
        });
    }

    /// Publishes `offline`, waits for its PUBACK, then sends DISCONNECT (the broker then does not
    /// publish the last will; the retained `offline` stays).
    async fn go_offline(&mut self) -> ShutdownOutcome {
        if !self.connected {
            return ShutdownOutcome::NotConnected;
        }
        let topic = self.shared.config.available_topic();
        if !self.publish(
            topic,
            QoS::AtLeastOnce,
            true,
            b"offline".to_vec(),
            Tag::Offline,
        ) {
            return ShutdownOutcome::TimedOut;
        }
        while !self.session.offline_acked {
            match self.net_rx.recv().await {
                Some(net) => self.on_net(net).await,
                None => return ShutdownOutcome::TimedOut,
            }
            if !self.connected {
                return ShutdownOutcome::NotConnected;
            }
        }
        if self.client.try_disconnect().is_err() {
            return ShutdownOutcome::TimedOut;
        }
        loop {
            match self.net_rx.recv().await {
                Some(Net::Event(Event::Outgoing(Outgoing::Disconnect))) => {
                    return ShutdownOutcome::Clean;
                }
                Some(net) => self.on_net(net).await,
                None => return ShutdownOutcome::TimedOut,
            }
        }
    }

    async fn on_net(&mut self, net: Net) {
        match net {
            Net::Event(Event::Incoming(Packet::ConnAck(_))) => self.on_connected(),
            Net::Event(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(tag) = self.session.awaiting_pkid.pop_front() {
                    // QoS 0 publishes report packet id 0 and get no PUBACK.
                    if pkid != 0 {
                        self.session.by_pkid.insert(pkid, tag);
                    }
                }
            }
            Net::Event(Event::Incoming(Packet::PubAck(ack))) => {
                match self.session.by_pkid.remove(&ack.pkid) {
                    Some(Tag::Spool(seq)) => self.on_spool_acked(seq),
                    Some(Tag::Offline) => self.session.offline_acked = true,
                    Some(Tag::Other) | None => {}
                }
            }
            Net::Event(_) => {}
            Net::Down { error, retry_in } => {
                let was_connected = self.connected;
                self.connected = false;
                self.session = Session::default();
                let error = self.link_error(&error, was_connected);
                self.shared
                    .connection_failures
                    .fetch_add(1, Ordering::Relaxed);
                let repeated = lock(&self.shared.link).last_error.as_ref() == Some(&error);
                match &error {
                    LinkError::Refused { .. } => log::error!("{error}; retrying in {retry_in:?}"),
                    _ if !repeated => log::warn!("{error}; retrying in {retry_in:?}"),
                    _ => log::debug!("{error}; retrying in {retry_in:?}"),
                }
                self.shared.update_link(|link| {
                    link.connected = false;
                    link.last_error = Some(error);
                });
                // Everything handed to rumqttc so far is in its channel: the driver may clean up.
                let _ = self.resume_tx.send(()).await;
            }
        }
    }

    fn on_connected(&mut self) {
        self.connected = true;
        self.session = Session::default();
        self.shared.update_link(|link| {
            link.connected = true;
            link.connects += 1;
        });
        log::info!(
            "connected to MQTT broker {} as {}",
            self.shared.config.broker(),
            self.shared.config.client_id
        );
        let topic = self.shared.config.available_topic();
        self.publish(
            topic,
            QoS::AtLeastOnce,
            true,
            b"online".to_vec(),
            Tag::Other,
        );
        let states: Vec<(String, Vec<u8>)> = self
            .states
            .iter()
            .map(|(topic, payload)| (topic.clone(), payload.clone()))
            .collect();
        for (topic, payload) in states {
            if self.publish(topic, QoS::AtLeastOnce, true, payload, Tag::Other) {
                self.shared
                    .messages_published
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        for (topic, jpeg) in std::mem::take(&mut self.held_snapshots) {
            self.send_snapshot(topic, jpeg);
        }
        for (topic, payload) in std::mem::take(&mut self.held_events) {
            self.send_unspooled(topic, payload);
        }
    }

    /// Publishes an event the spool could not write, now if connected, else holds it for the
    /// next connect (the oldest held one is dropped and counted past [`HELD_EVENTS`]).
    fn send_unspooled(&mut self, topic: String, payload: Vec<u8>) {
        if self.connected
            && self.publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
                Tag::Other,
            )
        {
            self.shared
                .messages_published
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.held_events.push_back((topic, payload));
        if self.held_events.len() > HELD_EVENTS {
            self.held_events.pop_front();
            self.shared.messages_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes a snapshot now if connected; otherwise holds it (the latest per topic) for the
    /// next connect. Oversized JPEGs are dropped and counted.
    fn send_snapshot(&mut self, topic: String, jpeg: Vec<u8>) {
        if jpeg.len() > MAX_PAYLOAD {
            self.shared.messages_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.connected
            && self.publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                jpeg.clone(),
                Tag::Other,
            )
        {
            self.shared
                .messages_published
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.held_snapshots.insert(topic, jpeg).is_some() {
            // A newer snapshot replaced one that was never sent.
            self.shared.messages_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_spool_acked(&mut self, seq: u64) {
        self.session.spool_in_flight = self.session.spool_in_flight.saturating_sub(1);
        let acked = lock(&self.shared.spool).ack(seq);
        match acked {
            Ok(true) => {
                self.shared.events_published.fetch_add(1, Ordering::Relaxed);
            }
            // Dropped by the spool's bound while in flight: it reached the broker anyway.
            Ok(false) => {}
            Err(error) => {
                self.shared.events_published.fetch_add(1, Ordering::Relaxed);
                self.cannot_delete(error);
            }
        }
    }

    /// A message left the spool but its file stayed: logged at the 1st, 2nd, 4th… time, as a
    /// read-only disk fails every one.
    fn cannot_delete(&mut self, error: SpoolError) {
        self.undeletable += 1;
        if self.undeletable.is_power_of_two() {
            log::error!(
                "alert spool: {error}; the message is not sent again in this run, but a restart \
                 finds its file again ({} such file(s) so far)",
                self.undeletable
            );
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Snapshot { topic, jpeg } => self.send_snapshot(topic, jpeg),
            Command::Unspooled { topic, payload } => self.send_unspooled(topic, payload),
            Command::State { topic, payload } => {
                self.states.insert(topic.clone(), payload.clone());
                if self.connected
                    && self.publish(topic, QoS::AtLeastOnce, true, payload, Tag::Other)
                {
                    self.shared
                        .messages_published
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Hands the next spool entries to rumqttc, oldest first, up to the window.
    fn send_spooled(&mut self) {
        while self.session.spool_in_flight < SPOOL_WINDOW {
            let next = {
                let spool = lock(&self.shared.spool);
                spool
                    .pending()
                    .find(|entry| self.session.last_sent.is_none_or(|last| entry.seq > last))
                    .cloned()
            };
            let Some(entry) = next else { return };
            if !is_publish_topic(&entry.topic) || entry.payload.len() > MAX_PAYLOAD {
                // A hand-edited or foreign file would block the spool for ever: drop it, loudly.
                log::error!(
                    "alert spool entry {} (topic {:?}, {} bytes) cannot be published; dropped",
                    entry.seq,
                    entry.topic,
                    entry.payload.len()
                );
                self.shared.messages_dropped.fetch_add(1, Ordering::Relaxed);
                let acked = lock(&self.shared.spool).ack(entry.seq);
                if let Err(error) = acked {
                    self.cannot_delete(error);
                }
                self.session.last_sent = Some(entry.seq);
                continue;
            }
            if !self.publish(
                entry.topic,
                QoS::AtLeastOnce,
                false,
                entry.payload,
                Tag::Spool(entry.seq),
            ) {
                // rumqttc's channel is full: its acks wake us to continue.
                return;
            }
            self.session.last_sent = Some(entry.seq);
            self.session.spool_in_flight += 1;
        }
    }

    /// False when rumqttc's request channel is full (nothing was queued).
    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        tag: Tag,
    ) -> bool {
        match self.client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                self.session.awaiting_pkid.push_back(tag);
                true
            }
            Err(_) => false,
        }
    }

    fn link_error(&self, error: &ConnectionError, was_connected: bool) -> LinkError {
        let config = &self.shared.config;
        let broker = config.broker();
        if let ConnectionError::ConnectionRefused(code) = error {
            let reason = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorised",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not supported",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::Success => "refused with code success",
            };
            return LinkError::Refused {
                broker,
                user: config
                    .username
                    .clone()
                    .unwrap_or_else(|| "(anonymous)".to_string()),
                reason: reason.to_string(),
            };
        }
        let message = error.to_string();
        if was_connected {
            LinkError::Lost { broker, message }
        } else {
            LinkError::Unreachable { broker, message }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::driver::Backoff;
    use super::*;

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut backoff = Backoff::new(0.5, 3.0);
        let waits: Vec<f64> = (0..5)
            .map(|_| backoff.after_failure(false).as_secs_f64())
            .collect();
        assert_eq!(waits, [0.5, 1.0, 2.0, 3.0, 3.0]);
        backoff.reset();
        assert_eq!(backoff.after_failure(false), Duration::from_millis(500));
        assert_eq!(backoff.after_failure(true), Duration::from_secs(3));
    }

    #[test]
    fn refused_message_names_broker_and_user() {
        let error = LinkError::Refused {
            broker: "10.0.0.5:1883".into(),
            user: "line3".into(),
            reason: "bad user name or password".into(),
        };
        assert_eq!(
            error.to_string(),
            "MQTT broker 10.0.0.5:1883 refused the connection of user line3: bad user name or \
             password; check mqtt.username, mqtt.password and mqtt.client_id"
        );
    }
}
