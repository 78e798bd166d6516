//! The MQTT publisher against a real mosquitto (installed by scripts/setup.sh). Every test starts
//! its own broker on a free port with a generated config, and stops it when done.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::broker::{Broker, always_anomalous_bundle, free_port};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use stpm::alerts::{
    AlertEvent, BoxN, CameraState, CameraStatus, EndReason, EventKind, LinkError, MqttConfig,
    PublishError, PublisherError, PublisherHandle, ShutdownOutcome, Spool,
};
use stpm::store::{EventStore, Query};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A subscriber (rumqttc's blocking client on its own thread)

#[derive(Debug, Clone)]
struct Message {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    /// The broker's DUP flag: a copy the broker itself re-sent to this subscriber.
    dup: bool,
}

impl Message {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("payload is JSON")
    }
}

struct Subscriber {
    messages: mpsc::Receiver<Message>,
    client: Client,
}

impl Subscriber {
    /// Connects, subscribes to `filter` with QoS 1 and waits for the SUBACK. With `session`, the
    /// broker keeps the subscription and queues messages while the subscriber is away.
    fn new(port: u16, filter: &str, session: Option<&str>) -> Self {
        let id = session
            .map(str::to_string)
            .unwrap_or_else(|| format!("sub-{}-{}", std::process::id(), free_port()));
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(session.is_none())
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(options, 16);
        let (message_tx, messages) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let filter = filter.to_string();
        let subscriber = client.clone();
        thread::spawn(move || {
            loop {
                match connection.recv() {
                    Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        let _ = subscriber.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                        let message = Message {
                            topic: publish.topic.clone(),
                            payload: publish.payload.to_vec(),
                            retain: publish.retain,
                            dup: publish.dup,
                        };
                        if message_tx.send(message).is_err() {
                            return;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => thread::sleep(Duration::from_millis(50)),
                    Err(_) => return,
                }
            }
        });
        ready
            .recv_timeout(WAIT)
            .expect("test subscriber got no SUBACK");
        Self { messages, client }
    }

    fn next(&self) -> Message {
        self.messages
            .recv_timeout(WAIT)
            .expect("no MQTT message within 5 s")
    }

    /// The next `count` messages.
    fn take(&self, count: usize) -> Vec<Message> {
        (0..count).map(|_| self.next()).collect()
    }

    /// The next message on `topic`, skipping others.
    fn next_on(&self, topic: &str) -> Message {
        let start = Instant::now();
        loop {
            let left = WAIT.saturating_sub(start.elapsed());
            let message = self
                .messages
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no message on {topic} within 5 s"));
            if message.topic == topic {
                return message;
            }
        }
    }

    /// True when nothing arrives for `quiet`.
    fn silent_for(&self, quiet: Duration) -> bool {
        self.messages.recv_timeout(quiet).is_err()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// The retained message of `topic`, as a new subscriber sees it.
fn retained(port: u16, topic: &str) -> Message {
    let subscriber = Subscriber::new(port, topic, None);
    let message = subscriber.next();
    assert_eq!(message.topic, topic);
    message
}

// ---------------------------------------------------------------------------------------------
// The publisher under test

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn config(port: u16, prefix: &str) -> MqttConfig {
    MqttConfig {
        port,
        prefix: prefix.to_string(),
        client_id: format!("stpm-test-{prefix}"),
        keep_alive_seconds: 5,
        connect_timeout_seconds: 2,
        reconnect_min_seconds: 0.05,
        reconnect_max_seconds: 0.5,
        ..MqttConfig::default()
    }
}

fn start_publisher(
    runtime: &tokio::runtime::Runtime,
    config: MqttConfig,
    spool_dir: &Path,
) -> PublisherHandle {
    let spool = Spool::open(spool_dir, 1000).unwrap();
    let (handle, _task) = config.build(spool, runtime.handle()).unwrap();
    handle
}

fn event(kind: EventKind, camera: &str, counter: u32, score: f32) -> AlertEvent {
    AlertEvent {
        kind,
        id: format!("{camera}-1700000000000-{counter}"),
        camera: camera.to_string(),
        start_time: 1_700_000_000.0,
        end_time: (kind == EventKind::End).then_some(1_700_000_004.5),
        score,
        top_score: score,
        boxes: vec![BoxN {
            x: 0.25,
            y: 0.5,
            w: 0.125,
            h: 0.25,
        }],
        snapshot: kind == EventKind::New,
        model: "brick-v1".to_string(),
        end_reason: (kind == EventKind::End).then_some(EndReason::Cleared),
        snapshot_url: None,
        clip_url: None,
    }
}

/// A camera's events `new`, `update`, `end`, numbered `counter`.
fn one_alert(camera: &str, counter: u32) -> Vec<AlertEvent> {
    vec![
        event(EventKind::New, camera, counter, 0.6),
        event(EventKind::Update, camera, counter, 0.8),
        event(EventKind::End, camera, counter, 0.3),
    ]
}

/// (type, id) of each message, to compare orders.
fn kinds_and_ids(messages: &[Message]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|message| {
            let json = message.json();
            (
                json["type"].as_str().unwrap_or_default().to_string(),
                json["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn expected(events: &[AlertEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|event| {
            let json = serde_json::to_value(event).unwrap();
            (json["type"].as_str().unwrap().to_string(), event.id.clone())
        })
        .collect()
}

fn spool_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|item| item.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".msg"))
        .collect();
    names.sort();
    names
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn events_arrive_in_order_with_design_keys_and_available_is_online_retained() {
    let broker = Broker::start();
    let spool_dir = tempfile::tempdir().unwrap();
    let subscriber = Subscriber::new(broker.port, "t_a/+/events", None);
    let runtime = runtime();
    let publisher = start_publisher(&runtime, config(broker.port, "t_a"), spool_dir.path());
    publisher.wait_connected(WAIT).unwrap();

    let mut events = one_alert("line1", 0);
    events.insert(1, event(EventKind::New, "line2", 0, 0.9));
    for event in &events {
        publisher.event(event).unwrap();
    }
    let received = subscriber.take(events.len());
    assert_eq!(kinds_and_ids(&received), expected(&events));
    assert_eq!(received[0].topic, "t_a/line1/events");
    assert_eq!(received[1].topic, "t_a/line2/events");
    assert!(received.iter().all(|message| !message.retain));
    let new = received[0].json();
    let mut keys: Vec<&str> = new
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "boxes",
            "camera",
            "end_time",
            "id",
            "model",
            "score",
            "snapshot",
            "start_time",
            "top_score",
            "type"
        ]
    );
    assert_eq!(new["camera"], "line1");
    assert_eq!(new["score"], 0.6);
    assert_eq!(new["boxes"][0]["w"], 0.125);
    assert_eq!(new["end_time"], Value::Null);
    let end = received[3].json();
    assert_eq!(end["end_time"], 1_700_000_004.5);
    assert_eq!(end["end_reason"], "cleared");
    let parsed: AlertEvent = serde_json::from_slice(&received[2].payload).unwrap();
    assert_eq!(parsed, events[2]);

    let available = retained(broker.port, "t_a/available");
    assert_eq!(available.text(), "online");
    assert!(available.retain);

    wait_until("PUBACKs", || publisher.status().events_pending == 0);
    let status = publisher.status();
    assert!(status.connected);
    assert_eq!(status.events_published, 4);
    assert_eq!((status.events_dropped, status.reconnects), (0, 0));
    assert_eq!(spool_files(spool_dir.path()), Vec::<String>::new());

    // Snapshots go out as they are, not retained, not spooled.
    let snapshots = Subscriber::new(broker.port, "t_a/line1/snapshot", None);
    let jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3, 0xFF, 0xD9];
    publisher.snapshot("line1", jpeg.clone()).unwrap();
    let snapshot = snapshots.next();
    assert_eq!(snapshot.payload, jpeg);
    assert!(!snapshot.retain);
    assert!(matches!(
        publisher.snapshot("line/1", jpeg.clone()),
        Err(PublishError::Camera { .. })
    ));
    assert_eq!(
        publisher.shutdown(Duration::from_secs(2)),
        ShutdownOutcome::Clean
    );

    // After the shutdown, events still go to disk for the next run; snapshots are refused.
    let late = event(EventKind::New, "line1", 9, 0.9);
    publisher.event(&late).unwrap();
    assert_eq!(spool_files(spool_dir.path()).len(), 1);
    assert!(matches!(
        publisher.snapshot("line1", jpeg),
        Err(PublishError::Stopped { .. })
    ));
    assert!(subscriber.silent_for(Duration::from_millis(200)));
}

#[test]
fn events_spooled_while_broker_is_down_arrive_in_order_after_it_returns() {
    let mut broker = Broker::start();
    let spool_dir = tempfile::tempdir().unwrap();
    // A persistent session: the broker queues what arrives before the subscriber is back.
    let subscriber = Subscriber::new(broker.port, "t_b/+/events", Some("t_b-subscriber"));
    let snapshots = Subscriber::new(broker.port, "t_b/+/snapshot", Some("t_b-snapshots"));
    let runtime = runtime();
    let publisher = start_publisher(&runtime, config(broker.port, "t_b"), spool_dir.path());
    publisher.wait_connected(WAIT).unwrap();

    let before = event(EventKind::New, "line1", 0, 0.7);
    publisher.event(&before).unwrap();
    assert_eq!(kinds_and_ids(&[subscriber.next()]), expected(&[before]));

    broker.stop();
    wait_until("the publisher to notice", || !publisher.status().connected);
    let mut during = one_alert("line2", 1);
    during.push(event(EventKind::End, "line1", 0, 0.2));
    for event in &during {
        publisher.event(event).unwrap();
    }
    // Snapshots are not spooled: the latest per camera waits in memory for the reconnect.
    for (camera, jpeg) in [
        ("line2", b"old".as_slice()),
        ("line2", b"new"),
        ("line1", b"one"),
    ] {
        publisher.snapshot(camera, jpeg.to_vec()).unwrap();
    }
    // They are on disk, one file each, in order, while the broker is away.
    thread::sleep(Duration::from_millis(300));
    let files = spool_files(spool_dir.path());
    assert_eq!(files.len(), during.len(), "{files:?}");
    let on_disk = Spool::open(spool_dir.path(), 1000).unwrap();
    let payloads: Vec<AlertEvent> = on_disk
        .pending()
        .map(|entry| serde_json::from_slice(&entry.payload).unwrap())
        .collect();
    assert_eq!(payloads, during);
    drop(on_disk);
    let status = publisher.status();
    assert_eq!(status.events_pending, during.len());
    assert!(status.connection_failures >= 1);
    assert!(status.last_error.is_some());

    broker.launch();
    let received = subscriber.take(during.len());
    assert_eq!(kinds_and_ids(&received), expected(&during));
    wait_until("the spool to empty", || {
        publisher.status().events_pending == 0
    });
    assert_eq!(spool_files(spool_dir.path()), Vec::<String>::new());
    let status = publisher.status();
    assert!(status.connected);
    assert_eq!(status.events_published, 1 + during.len() as u64);
    assert!(status.reconnects >= 1);
    assert_eq!(retained(broker.port, "t_b/available").text(), "online");
    assert!(subscriber.silent_for(Duration::from_millis(200)));
    let mut held: Vec<(String, Vec<u8>)> = snapshots
        .take(2)
        .into_iter()
        .map(|m| (m.topic, m.payload))
        .collect();
    held.sort();
    assert_eq!(
        held,
        vec![
            ("t_b/line1/snapshot".to_string(), b"one".to_vec()),
            ("t_b/line2/snapshot".to_string(), b"new".to_vec()),
        ]
    );
    assert!(
        snapshots.silent_for(Duration::from_millis(200)),
        "the replaced snapshot came too"
    );
}

#[test]
fn spool_left_by_a_previous_run_is_published_by_the_next() {
    let port = free_port();
    let spool_dir = tempfile::tempdir().unwrap();
    let events = [one_alert("line1", 0), one_alert("line1", 1)].concat();
    {
        // First run: no broker at all; it stops with everything spooled.
        let runtime = runtime();
        let publisher = start_publisher(&runtime, config(port, "t_c"), spool_dir.path());
        for event in &events {
            publisher.event(event).unwrap();
        }
        let error = publisher
            .wait_connected(Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(error, PublisherError::Timeout { .. }), "{error}");
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error}"
        );
        assert_eq!(
            publisher.shutdown(Duration::from_secs(1)),
            ShutdownOutcome::NotConnected
        );
    }
    assert_eq!(spool_files(spool_dir.path()).len(), events.len());

    let broker = Broker::start_on(port, None);
    let subscriber = Subscriber::new(broker.port, "t_c/#", None);
    let runtime = runtime();
    let publisher = start_publisher(&runtime, config(port, "t_c"), spool_dir.path());
    assert_eq!(subscriber.next_on("t_c/available").text(), "online");
    let received = subscriber.take(events.len());
    assert_eq!(kinds_and_ids(&received), expected(&events));
    wait_until("the spool to empty", || {
        publisher.status().events_pending == 0
    });
    assert_eq!(spool_files(spool_dir.path()), Vec::<String>::new());
    assert_eq!(publisher.status().events_published, events.len() as u64);
}

#[test]
fn offline_on_available_after_abrupt_end_and_after_clean_shutdown() {
    let broker = Broker::start();
    let spool_dir = tempfile::tempdir().unwrap();
    let subscriber = Subscriber::new(broker.port, "t_d/available", None);

    // The process dies: its runtime (and socket) go away without DISCONNECT → last will.
    let abrupt = runtime();
    let publisher = start_publisher(&abrupt, config(broker.port, "t_d"), spool_dir.path());
    publisher.wait_connected(WAIT).unwrap();
    assert_eq!(subscriber.next().text(), "online");
    abrupt.shutdown_background();
    let will = subscriber.next();
    assert_eq!(will.text(), "offline");
    let available = retained(broker.port, "t_d/available");
    assert_eq!(
        (available.text().as_str(), available.retain),
        ("offline", true)
    );

    // A clean shutdown says `offline` itself.
    let runtime = runtime();
    let publisher = start_publisher(&runtime, config(broker.port, "t_d"), spool_dir.path());
    publisher.wait_connected(WAIT).unwrap();
    assert_eq!(subscriber.next().text(), "online");
    let start = Instant::now();
    assert_eq!(
        publisher.shutdown(Duration::from_secs(2)),
        ShutdownOutcome::Clean
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(subscriber.next().text(), "offline");
    assert!(!publisher.status().connected);
    let available = retained(broker.port, "t_d/available");
    assert_eq!(
        (available.text().as_str(), available.retain),
        ("offline", true)
    );
    assert!(subscriber.silent_for(Duration::from_millis(300)));
}

#[test]
fn wrong_password_is_a_clear_error_without_hammering_the_broker() {
    let broker = Broker::start_on(free_port(), Some(("line3", "right-password")));
    let spool_dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let wrong = MqttConfig {
        username: Some("line3".to_string()),
        password: Some("wrong-password".to_string()),
        reconnect_max_seconds: 1.0,
        ..config(broker.port, "t_e")
    };
    let publisher = start_publisher(&runtime, wrong.clone(), spool_dir.path());
    let start = Instant::now();
    let error = publisher.wait_connected(WAIT).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let PublisherError::Link(LinkError::Refused {
        broker: at,
        user,
        reason,
    }) = &error
    else {
        panic!("expected a refused login, got {error}");
    };
    assert_eq!(at, &format!("127.0.0.1:{}", broker.port));
    assert_eq!(user, "line3");
    assert!(
        reason == "not authorised" || reason == "bad user name or password",
        "{reason}"
    );
    let text = error.to_string();
    assert!(
        text.contains("check mqtt.username, mqtt.password"),
        "{text}"
    );
    assert!(!text.contains("wrong-password"), "{text}");
    // A refusal waits reconnect_max_seconds (1 s) between attempts, not a tight loop.
    thread::sleep(Duration::from_millis(1500));
    let status = publisher.status();
    assert!(!status.connected);
    assert!((1..=3).contains(&status.connection_failures), "{status:?}");
    assert_eq!(status.last_error.as_deref(), Some(text.as_str()));
    assert_eq!(
        publisher.shutdown(Duration::from_secs(1)),
        ShutdownOutcome::NotConnected
    );

    let right = MqttConfig {
        password: Some("right-password".to_string()),
        client_id: "stpm-test-t_e-right".to_string(),
        ..wrong.clone()
    };
    let publisher = start_publisher(&runtime, right, spool_dir.path());
    publisher.wait_connected(WAIT).unwrap();
    drop(publisher);

    // The same password from a file (mqtt.password_file), kept out of the configuration.
    let file = spool_dir.path().join("mqtt-password");
    fs::write(&file, "right-password\n").unwrap();
    let from_file = MqttConfig {
        password: None,
        password_file: Some(file),
        client_id: "stpm-test-t_e-file".to_string(),
        ..wrong
    };
    let other_spool = tempfile::tempdir().unwrap();
    let publisher = start_publisher(&runtime, from_file, other_spool.path());
    publisher.wait_connected(WAIT).unwrap();
}

#[test]
fn camera_state_is_retained_and_resent_after_connecting() {
    let port = free_port();
    let spool_dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let publisher = start_publisher(&runtime, config(port, "t_f"), spool_dir.path());
    // Set while there is no broker yet: kept and sent once connected.
    let starting = CameraState {
        status: CameraStatus::Offline,
        fps: 0.0,
        score: 0.0,
    };
    publisher.state("line1", &starting).unwrap();
    thread::sleep(Duration::from_millis(100));

    let broker = Broker::start_on(port, None);
    publisher.wait_connected(WAIT).unwrap();
    wait_until("the state to go out", || {
        publisher.status().messages_published >= 1
    });
    thread::sleep(Duration::from_millis(100));
    let subscriber = Subscriber::new(port, "t_f/line1/state", None);
    let first = subscriber.next();
    assert!(first.retain);
    assert_eq!(
        first.json(),
        serde_json::json!({"status": "offline", "fps": 0.0, "score": 0.0})
    );

    for state in [
        CameraState {
            status: CameraStatus::Anomaly,
            fps: 12.5,
            score: 0.75,
        },
        CameraState {
            status: CameraStatus::Ok,
            fps: 12.5,
            score: 0.125,
        },
    ] {
        publisher.state("line1", &state).unwrap();
    }
    assert_eq!(subscriber.next().json()["status"], "anomaly");
    assert_eq!(subscriber.next().json()["status"], "ok");
    let state = retained(broker.port, "t_f/line1/state");
    assert!(state.retain);
    assert_eq!(
        state.json(),
        serde_json::json!({"status": "ok", "fps": 12.5, "score": 0.125})
    );
    assert!(publisher.state("line#1", &starting).is_err());
    assert_eq!(
        publisher.shutdown(Duration::from_secs(2)),
        ShutdownOutcome::Clean
    );
}

#[test]
fn broker_stopped_mid_stream_loses_no_event_and_keeps_first_arrivals_in_order() {
    let mut broker = Broker::start();
    let spool_dir = tempfile::tempdir().unwrap();
    let subscriber = Subscriber::new(broker.port, "t_g/+/events", Some("t_g-subscriber"));
    let runtime = runtime();
    let publisher = start_publisher(&runtime, config(broker.port, "t_g"), spool_dir.path());
    publisher.wait_connected(WAIT).unwrap();

    let events: Vec<AlertEvent> = (0..300)
        .map(|counter| event(EventKind::New, "line1", counter, 0.9))
        .collect();
    let (halfway_tx, halfway) = mpsc::channel();
    let pushing = {
        let publisher = publisher.clone();
        let events = events.clone();
        thread::spawn(move || {
            for (index, event) in events.iter().enumerate() {
                publisher.event(event).unwrap();
                if index == 100 {
                    let _ = halfway_tx.send(());
                }
            }
        })
    };
    // Stop the broker while messages are in flight; unacknowledged ones must be sent again.
    halfway.recv_timeout(WAIT).unwrap();
    broker.stop();
    pushing.join().unwrap();
    thread::sleep(Duration::from_millis(200));
    assert!(publisher.status().events_pending > 0);
    broker.launch();

    let mut first_seen: Vec<(String, String)> = Vec::new();
    let (mut duplicates, mut broker_resent) = (0, 0);
    while first_seen.len() < events.len() {
        let message = subscriber.next();
        let [received] = kinds_and_ids(std::slice::from_ref(&message))
            .try_into()
            .unwrap_or_else(|_| unreachable!());
        if first_seen.contains(&received) {
            if message.dup {
                broker_resent += 1;
            } else {
                duplicates += 1;
            }
        } else {
            first_seen.push(received);
        }
    }
    assert_eq!(first_seen, expected(&events));
    wait_until("the spool to empty", || {
        publisher.status().events_pending == 0
    });
    assert_eq!(spool_files(spool_dir.path()), Vec::<String>::new());
    // QoS 1 allows a resent copy of what was in flight, never more than the publisher's window
    // of 16. Copies the restarted broker re-sends to the reconnecting subscriber (DUP flag set;
    // 0–17 of them in 10 runs) are the broker's QoS 1 duty, not the publisher's, so they are
    // counted apart and not held to that window.
    assert!(
        duplicates <= 16,
        "{duplicates} duplicates from the publisher ({broker_resent} re-sent by the broker)"
    );
    assert_eq!(publisher.status().events_published, events.len() as u64);
}

/// Runs openssl (part of Debian's base system) in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl missing: run `bash scripts/setup.sh`");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for IP 127.0.0.1 and a client certificate, all EC P-256 PEM.
fn make_certificates(dir: &Path) {
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=stpm test CA"];
    ca.extend(new_key);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=stpm-line1")] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let ext = format!("{name}.ext");
        let mut request = vec!["req", "-subj", subject];
        request.extend(new_key);
        request.extend(["-keyout", &key, "-out", &csr]);
        openssl(dir, &request);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
}

#[test]
fn tls_with_client_certificate_delivers_events() {
    let certificates = tempfile::tempdir().unwrap();
    let dir = certificates.path();
    make_certificates(dir);
    let tls_port = free_port();
    let tls_listener = format!(
        "listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
         require_certificate true\n",
        ca = dir.join("ca.pem").display(),
        cert = dir.join("server.pem").display(),
        key = dir.join("server.key").display(),
    );
    // The subscriber uses the plain listener, the publisher the TLS one.
    let broker = Broker::start_with(free_port(), None, &tls_listener);
    let subscriber = Subscriber::new(broker.port, "t_h/+/events", None);
    let spool_dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let tls = MqttConfig {
        tls_ca: Some(dir.join("ca.pem")),
        tls_cert: Some(dir.join("client.pem")),
        tls_key: Some(dir.join("client.key")),
        ..config(tls_port, "t_h")
    };
    let publisher = start_publisher(&runtime, tls.clone(), spool_dir.path());
    publisher.wait_connected(WAIT).unwrap();
    let events = one_alert("line1", 0);
    for event in &events {
        publisher.event(event).unwrap();
    }
    assert_eq!(
        kinds_and_ids(&subscriber.take(events.len())),
        expected(&events)
    );
    assert_eq!(
        publisher.shutdown(Duration::from_secs(2)),
        ShutdownOutcome::Clean
    );

    // Without the client certificate the broker ends the handshake: reported, not a panic.
    let anonymous = MqttConfig {
        tls_cert: None,
        tls_key: None,
        client_id: "stpm-test-t_h-nocert".to_string(),
        ..tls
    };
    let publisher = start_publisher(&runtime, anonymous, spool_dir.path());
    let error = publisher
        .wait_connected(Duration::from_millis(1500))
        .unwrap_err();
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{tls_port}")),
        "{error}"
    );
    assert!(!publisher.status().connected);
    assert!(error.to_string().contains("CertificateRequired"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The real binary: `stpm run` publishing to the broker

/// Runs `stpm run --pipeline <pipeline>` to its end; checks it exits 0 and returns its output.
fn run_to_end(pipeline: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_stpm"))
        .args(["run", "--pipeline"])
        .arg(pipeline)
        .output()
        .expect("run stpm");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    log
}

/// A pipeline file: one conveyor camera (not realtime when `frames=` is given), the spool in
/// `dir/spool`, the event store in `dir/data`, MQTT on 127.0.0.1:`port` with `prefix`.
fn run_pipeline(dir: &Path, bundle: &Path, source: &str, port: u16, prefix: &str) -> PathBuf {
    run_pipeline_with(dir, bundle, source, port, prefix, "")
}

/// [`run_pipeline`] with `extra` TOML appended.
fn run_pipeline_with(
    dir: &Path,
    bundle: &Path,
    source: &str,
    port: u16,
    prefix: &str,
    extra: &str,
) -> PathBuf {
    let pipeline = dir.join(format!("{prefix}.toml"));
    fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"{source}\"\nrealtime = {}\n\n\
             [alerts]\nspool_dir = \"{}\"\n\n\
             [storage]\npath = \"{}\"\n\n\
             [mqtt]\nport = {port}\nprefix = \"{prefix}\"\nclient_id = \"stpm-{prefix}-{}\"\n{extra}",
            bundle.display(),
            !source.contains("frames="),
            dir.join("spool").display(),
            dir.join("data").display(),
            std::process::id()
        ),
    )
    .expect("pipeline file");
    pipeline
}

#[test]
fn events_of_a_killed_run_are_published_by_the_next_run() {
    let dir = tempfile::tempdir().expect("dir");
    let bundle = always_anomalous_bundle(dir.path());
    let spool = dir.path().join("spool");
    // No broker yet: the first run spools its events, and is killed with SIGKILL.
    let port = free_port();
    let http = free_port();
    let pipeline = run_pipeline_with(
        dir.path(),
        &bundle,
        "test://conveyor?fps=20",
        port,
        "restart",
        &format!("\n[http]\nenabled = true\nbind = \"127.0.0.1:{http}\"\n"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_stpm"))
        .args(["run", "--pipeline"])
        .arg(&pipeline)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stpm");
    let started = Instant::now();
    let data = dir.path().join("data");
    let stored = || {
        data.join("events.db").is_file()
            && EventStore::open(&data)
                .and_then(|store| store.list(&Query::default()))
                .is_ok_and(|events| !events.is_empty())
    };
    // Killed mid-event: once its first event is spooled and stored.
    while !spool.is_dir() || spool_files(&spool).is_empty() || !stored() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing spooled and stored"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // /metrics shows the broker down and the events waiting in the spool.
    let get = |target: &str| {
        let mut stream = TcpStream::connect(("127.0.0.1", http)).expect("http endpoint");
        stream
            .write_all(format!("GET {target} HTTP/1.0\r\n\r\n").as_bytes())
            .expect("request");
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).expect("response");
        bytes
    };
    let metrics = String::from_utf8_lossy(&get("/metrics")).into_owned();
    assert!(metrics.contains("stpm_mqtt_connected 0\n"), "{metrics}");
    let pending: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stpm_alert_spool_pending "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(pending >= 1.0, "{metrics}");
    assert!(
        metrics.contains("# TYPE stpm_alert_messages_dropped counter\n"),
        "{metrics}"
    );
    // The events API lists the stored event, with its snapshot on the same server.
    let listed = String::from_utf8_lossy(&get("/api/events?camera=line1")).into_owned();
    let (head, body) = listed.split_once("\r\n\r\n").expect("a response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{listed}"
    );
    let api: Value = serde_json::from_str(body).expect("JSON");
    let newest = &api["events"][0];
    assert_eq!(newest["camera"], "line1", "{api}");
    let snapshot_url = newest["snapshot_url"]
        .as_str()
        .expect("a snapshot URL")
        .to_string();
    let picture = get(&snapshot_url);
    let at = picture
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response")
        + 4;
    let decoded = image::load_from_memory(&picture[at..]).expect("the snapshot decodes");
    assert_eq!((decoded.width(), decoded.height()), (640, 480));
    child.kill().expect("SIGKILL");
    let out = child.wait_with_output().expect("wait");
    let printed = String::from_utf8_lossy(&out.stdout);
    let first_id = printed
        .lines()
        .filter_map(|l| l.strip_prefix("alert "))
        .filter_map(|json| serde_json::from_str::<Value>(json).ok())
        .find(|e| e["type"] == "new")
        .and_then(|e| e["id"].as_str().map(str::to_string))
        .expect("the killed run printed its new event");
    let left = spool_files(&spool);
    assert!(!left.is_empty());
    // The killed run's event store is readable and holds the open event.
    let killed = EventStore::open(&data)
        .expect("the store of a killed run opens")
        .get(&first_id)
        .expect("readable")
        .expect("the new event was stored");
    assert_eq!(killed.end_time, None);

    // Broker up; the next run (one frame) sends what the killed one left, oldest first.
    let _broker = Broker::start_on(port, None);
    let subscriber = Subscriber::new(port, "restart/line1/events", None);
    let pipeline = run_pipeline(
        dir.path(),
        &bundle,
        "test://conveyor?frames=1",
        port,
        "restart",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_stpm"))
        .args(["run", "--pipeline"])
        .arg(&pipeline)
        .output()
        .expect("run stpm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = subscriber.next().json();
    assert_eq!(first["type"], "new");
    assert_eq!(first["id"].as_str(), Some(first_id.as_str()));
    assert!(spool_files(&spool).is_empty(), "spool drained");
    // The next run ended the event the killed one left open, saying why.
    let ended = EventStore::open(&data)
        .expect("store")
        .get(&first_id)
        .expect("readable")
        .expect("still there");
    assert_eq!(ended.end_reason.as_deref(), Some("interrupted"));
    assert!(ended.end_time.is_some_and(|end| end >= ended.start_time));
}

#[test]
fn stpm_run_publishes_events_snapshot_state_and_availability() {
    let broker = Broker::start();
    let subscriber = Subscriber::new(broker.port, "e2e/#", None);
    let dir = tempfile::tempdir().expect("dir");
    let bundle = always_anomalous_bundle(dir.path());
    let pipeline = run_pipeline(
        dir.path(),
        &bundle,
        "test://conveyor?frames=40&fps=10",
        broker.port,
        "e2e",
    );
    let log = run_to_end(&pipeline);
    assert!(log.contains("connected"), "{log}");

    let mut messages = Vec::new();
    while let Ok(message) = subscriber.messages.recv_timeout(Duration::from_secs(2)) {
        messages.push(message);
    }
    let on = |topic: &'static str| messages.iter().filter(move |m| m.topic == topic);
    let availability: Vec<String> = on("e2e/available").map(Message::text).collect();
    assert_eq!(
        availability.first().map(String::as_str),
        Some("online"),
        "{availability:?}"
    );
    assert_eq!(
        availability.last().map(String::as_str),
        Some("offline"),
        "{availability:?}"
    );
    let events: Vec<Value> = on("e2e/line1/events").map(Message::json).collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"new"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"end"), "{kinds:?}");
    assert_eq!(
        events.last().map(|e| e["end_reason"].clone()),
        Some(Value::from("shutdown"))
    );
    let ids: std::collections::BTreeSet<&str> =
        events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one event: {ids:?}");
    // Printed events are the published ones, and the summary counts them: messages, then events.
    assert_eq!(log.matches("alert {").count(), events.len(), "{log}");
    let counted = format!("{} alert messages (1 new event)", events.len());
    assert!(log.contains(&counted), "{counted} in {log}");
    let snapshot = on("e2e/line1/snapshot").next().expect("a snapshot");
    assert_eq!(&snapshot.payload[..2], &[0xFF, 0xD8], "JPEG");
    let decoded = image::load_from_memory(&snapshot.payload).expect("snapshot decodes");
    assert_eq!((decoded.width(), decoded.height()), (640, 480));
    // The event store holds the same event: id, times and end reason of its MQTT messages, and
    // the peak's annotated and clean frames.
    let stored = EventStore::open(&dir.path().join("data"))
        .expect("store")
        .list(&Query::default())
        .expect("list");
    assert_eq!(stored.len(), 1, "{stored:?}");
    let row = &stored[0];
    let (first, last) = (&events[0], &events[events.len() - 1]);
    assert_eq!(Some(row.id.as_str()), first["id"].as_str());
    // serde_json parses floats to within an ulp or so: the same number, not the same bits.
    let close = |stored: f64, published: Option<f64>| {
        published.is_some_and(|published| (stored - published).abs() < 1e-5)
    };
    assert!(
        close(row.start_time, first["start_time"].as_f64()),
        "{row:?} {first}"
    );
    assert!(
        row.end_time
            .is_some_and(|end| close(end, last["end_time"].as_f64())),
        "{row:?} {last}"
    );
    assert_eq!(row.end_reason.as_deref(), Some("shutdown"));
    let top = events
        .iter()
        .filter_map(|e| e["top_score"].as_f64())
        .fold(0.0, f64::max);
    assert!((f64::from(row.score) - top).abs() < 1e-6, "{row:?}");
    assert_eq!(row.model.len(), 12, "{row:?}");
    for picture in [&row.snapshot_path, &row.clean_path] {
        let path = picture.as_ref().expect("a picture of the peak");
        let decoded = image::open(path).expect("the picture decodes");
        assert_eq!((decoded.width(), decoded.height()), (640, 480));
    }
    let state = retained(broker.port, "e2e/line1/state").json();
    assert!(
        state["status"].is_string() && state["fps"].is_number(),
        "{state}"
    );
    assert!(
        spool_files(&dir.path().join("spool")).is_empty(),
        "spool drained"
    );
}

/// `[clips]`: an event of the always-anomalous bundle gets one MP4, cut from the camera's encoded
/// stream, recorded in the store, that decodes to the frames of the run (the event lasts from the
/// first frame to the end, so there is no room for pre- or post-roll here).
#[test]
fn an_event_gets_a_clip_that_decodes() {
    let dir = tempfile::tempdir().expect("dir");
    let bundle = always_anomalous_bundle(dir.path());
    let pipeline = run_pipeline_with(
        dir.path(),
        &bundle,
        "test://conveyor?frames=60&fps=10",
        free_port(),
        "clips",
        "\n[clips]\nenabled = true\npre_seconds = 1\npost_seconds = 1\n",
    );
    let log = run_to_end(&pipeline);
    let events = EventStore::open(&dir.path().join("data"))
        .expect("store")
        .list(&Query::default())
        .expect("list");
    assert_eq!(events.len(), 1, "{events:?}");
    let clip = events[0]
        .clip_path
        .clone()
        .unwrap_or_else(|| panic!("the event has no clip: {log}"));
    assert!(
        clip.ends_with(format!("clips/line1/{}.mp4", events[0].id)),
        "{clip:?}"
    );
    let (frames, width, height) = common::decode_mp4(&clip);
    assert_eq!((width, height), (640, 480));
    assert!((55..=60).contains(&frames), "{frames} frames: {log}");
}

/// The issue's clip check on real detections: a model that finds the conveyor's defects, the
/// generator's own labels, and for every event on a defective part a clip that holds the first
/// frame where that defect was in view (before the model saw it), decodes, and lasts about
/// pre-roll + event + post-roll.
#[test]
fn clips_of_real_detections_hold_the_first_defective_frame() {
    const FPS: f64 = 15.0;
    const FRAMES: u64 = 900;
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = run_pipeline_with(
        dir.path(),
        common::detecting_conveyor_bundle(),
        &format!("test://conveyor?frames={FRAMES}&fps={FPS}"),
        free_port(),
        "labelled",
        "\n[clips]\nenabled = true\npre_seconds = 2\npost_seconds = 1\n\
         [camera.alerts]\nmin_clear_seconds = 0.5\ncooldown_seconds = 0.0\nmax_events_per_hour = 3600\n",
    );
    let log = run_to_end(&pipeline);
    let epoch: f64 = log
        .lines()
        .find_map(|line| line.split("stream time 0 = unix ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .expect("the stream-time origin in the log");
    let frame_at = |unix: f64| ((unix - epoch) * FPS).round() as i64;
    let (width, height) = stpm::pipeline::conveyor::CONVEYOR_SIZE;
    let mut conveyor = stpm::pipeline::conveyor::Conveyor::new(width, height, 1);
    let defective: Vec<bool> = (0..FRAMES)
        .map(|index| conveyor.frame(index).defect.is_some())
        .collect();
    let events = EventStore::open(&dir.path().join("data"))
        .expect("store")
        .list(&Query::default())
        .expect("list");
    let mut checked = 0;
    for event in &events {
        let start = frame_at(event.start_time);
        let Some(index) = usize::try_from(start)
            .ok()
            .filter(|&i| defective.get(i) == Some(&true))
        else {
            continue; // not on a defect (a false alarm): no first defective frame to look for
        };
        // The first frame of this run of defective frames: where the part's defect came into view.
        let first = (0..=index)
            .rev()
            .take_while(|&i| defective[i])
            .last()
            .unwrap_or(index) as i64;
        let clip = event.clip_path.clone().expect("the event has a clip");
        let clip_start = frame_at(event.clip_start.expect("the clip's start time"));
        assert!(
            clip_start <= first,
            "event {} (frame {start}): its clip starts at frame {clip_start}, after the first \
             defective frame {first}: {log}",
            event.id
        );
        let end = frame_at(event.end_time.expect("ended"));
        // pre-roll + event + post-roll, the pre-roll from the key frame before (at most 30
        // frames earlier), the post-roll cut short where the source ended.
        let wanted = (end + FPS as i64).min(FRAMES as i64 - 1) - clip_start + 1;
        let (frames, w, h) = common::decode_mp4(&clip);
        assert_eq!((w, h), (640, 480));
        assert!(
            (wanted - 2..=wanted + 1).contains(&(frames as i64)),
            "event {}: clip of {frames} frames from frame {clip_start}, wanted about {wanted} \
             (to frame {end} + 1 s)",
            event.id
        );
        if start >= 2 * FPS as i64 {
            assert!(start - clip_start >= 2 * FPS as i64, "a pre-roll of 2 s");
        }
        checked += 1;
    }
    println!(
        "{checked} of {} events on defective parts, each clip checked",
        events.len()
    );
    assert!(
        checked >= 3,
        "{checked} of {} events were on defective parts: {events:?}\n{log}",
        events.len()
    );
}

/// A spool that cannot be written (its folder replaced by a file, which even root cannot write
/// into, like a full disk): every event still reaches the broker, from memory, in order, and
/// each failure is counted.
#[test]
fn events_the_spool_cannot_write_still_reach_the_broker() {
    let broker = Broker::start();
    let folder = tempfile::tempdir().unwrap();
    let spool = folder.path().join("spool");
    let subscriber = Subscriber::new(broker.port, "t_full/+/events", None);
    let runtime = runtime();
    let publisher = start_publisher(&runtime, config(broker.port, "t_full"), &spool);
    publisher.wait_connected(WAIT).unwrap();
    fs::remove_dir_all(&spool).unwrap();
    fs::write(&spool, b"not a folder").unwrap();

    let events = one_alert("line1", 0);
    for event in &events {
        publisher.event(event).expect("sent from memory");
    }
    let received = subscriber.take(events.len());
    assert_eq!(kinds_and_ids(&received), expected(&events));
    let status = publisher.status();
    assert_eq!(status.spool_failures, events.len() as u64, "{status:?}");
    assert_eq!(status.events_pending, 0, "{status:?}");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`32m`) at `at`; the error says why not (mounting needs root).
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Appends zeros to `path` until the disk refuses (ENOSPC); the bytes written.
fn fill_disk(path: &Path) -> u64 {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("filler");
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0;
    loop {
        match file.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = file.flush();
    written
}

/// The id of the next `new` event to arrive within `within`.
fn next_new_event(subscriber: &Subscriber, within: Duration) -> Option<String> {
    let start = Instant::now();
    while let Some(left) = within.checked_sub(start.elapsed()) {
        let event = subscriber.messages.recv_timeout(left).ok()?.json();
        if event["type"] == "new" {
            return Some(event["id"].as_str().unwrap_or_default().to_string());
        }
    }
    None
}

/// Spool, event store and recordings on a small tmpfs driven past full (issue 25): retention
/// deletes the oldest recordings first when free space falls under `[storage] min_free`; while
/// the disk is full every alert still reaches the broker (from memory) and the run goes on; when
/// space returns, events are stored and recorded again.
#[test]
fn a_full_disk_loses_no_alert_and_frees_the_oldest_recordings() {
    let dir = tempfile::tempdir().expect("dir");
    let small = dir.path().join("small");
    let _tmpfs = match Tmpfs::mount(&small, "40m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("SKIPPED: cannot mount a tmpfs to fill ({reason}); needs root");
            return;
        }
    };
    let broker = Broker::start();
    let data = small.join("data");
    let recordings = small.join("recordings");
    fs::create_dir_all(&recordings).expect("dir");
    // Three recordings of earlier runs, 4 MB each, 3, 2 and 1 hours old.
    let now = std::time::SystemTime::now();
    let old: Vec<PathBuf> = [3, 2, 1]
        .into_iter()
        .enumerate()
        .map(|(index, hours)| {
            let path = recordings.join(format!("line1-100{index}.mkv"));
            fs::write(&path, vec![1u8; 4 << 20]).expect("old recording");
            fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(now - Duration::from_secs(hours * 3600)))
                .expect("mtime");
            path
        })
        .collect();
    let http = free_port();
    let pipeline = dir.path().join("disk.toml");
    fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?fps=15\"\nrealtime = true\n\n\
             [alerts]\nspool_dir = \"{}\"\nmin_clear_seconds = 0.5\ncooldown_seconds = 0.0\n\
             max_events_per_hour = 3600\n\n\
             [storage]\npath = \"{}\"\nmin_free = \"6MB\"\n\n\
             [output.record]\nenabled = true\ndir = \"{}\"\n\n\
             [output.rtsp]\nenabled = false\n\n\
             [http]\nenabled = true\nbind = \"127.0.0.1:{http}\"\n\n\
             [mqtt]\nport = {}\nprefix = \"t_disk\"\nclient_id = \"stpm-t_disk-{}\"\n",
            common::detecting_conveyor_bundle().display(),
            data.join("spool").display(),
            data.display(),
            recordings.display(),
            broker.port,
            std::process::id()
        ),
    )
    .expect("pipeline file");
    let subscriber = Subscriber::new(broker.port, "t_disk/+/events", None);
    let log = dir.path().join("run.log");
    let mut child = common::spawn_run(&pipeline, &log, dir.path());
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    let fail = |child: &mut std::process::Child, what: String| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what}\n{}", log_text());
    };

    // Room to work: the first event is stored, nothing old is deleted.
    let Some(first) = next_new_event(&subscriber, Duration::from_secs(60)) else {
        fail(&mut child, "no event within 60 s".into());
    };
    assert!(old.iter().all(|p| p.exists()), "deleted with room to spare");

    // Under the floor: the oldest recordings go, oldest first, until 6 MB are free.
    let free_now = stpm::store::disk::free_bytes(&small).expect("statvfs");
    let filler = vec![0u8; free_now.saturating_sub(2 << 20) as usize];
    fs::write(small.join("filler-floor"), filler).expect("filler");
    let deadline = Instant::now() + Duration::from_secs(20);
    while old[0].exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
    }
    if old[0].exists() {
        fail(
            &mut child,
            "the oldest recording was not deleted under the floor".into(),
        );
    }
    let gone: Vec<bool> = old.iter().map(|p| !p.exists()).collect();
    assert!(
        gone.windows(2).all(|w| w[0] || !w[1]),
        "deleted out of age order: {gone:?}"
    );

    // Full: nothing old is left to delete (the rest of the old recordings go, then the filler
    // takes every byte); alerts still reach the broker.
    for round in 0..3 {
        fill_disk(&small.join(format!("filler-full-{round}")));
        thread::sleep(Duration::from_secs(6));
    }
    fill_disk(&small.join("filler-full-last"));
    assert!(
        old.iter().all(|p| !p.exists()),
        "old recordings left on a full disk"
    );
    let Some(while_full) = next_new_event(&subscriber, Duration::from_secs(40)) else {
        fail(
            &mut child,
            "no event reached the broker while the disk was full".into(),
        );
    };
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the run ended on a full disk: {}",
        log_text()
    );

    // Space returns: the events are stored, those of the full disk too (kept in memory).
    for entry in fs::read_dir(&small).expect("list").flatten() {
        if entry.file_name().to_string_lossy().starts_with("filler") {
            fs::remove_file(entry.path()).expect("filler");
        }
    }
    let Some(after) = next_new_event(&subscriber, Duration::from_secs(60)) else {
        fail(&mut child, "no event after space returned".into());
    };
    let (status, metrics) = common::http_get(http, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stpm_disk_free_bytes{folder=\"recordings\"")),
        "{metrics}"
    );
    thread::sleep(Duration::from_secs(2));
    common::sigterm(&child);
    let status = child.wait().expect("wait");
    let text = log_text();
    // An orderly stop (the recordings the full disk broke make its exit status an error).
    assert!(status.code().is_some(), "killed by a signal: {text}");
    assert!(text.contains("stopping: finishing recordings"), "{text}");
    assert!(text.contains("under [storage] min_free"), "{text}");
    let store = EventStore::open(&data).expect("store");
    let stored = store.list(&Query::default()).expect("list");
    for id in [&first, &while_full, &after] {
        assert!(
            stored.iter().any(|e| &e.id == id),
            "event {id} is not in the store: {stored:?}\n{text}"
        );
    }
    let recorded: Vec<PathBuf> = fs::read_dir(&recordings)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.metadata().is_ok_and(|m| m.len() > 0))
        .collect();
    assert!(!recorded.is_empty(), "no recording written: {text}");
    // The file the full disk broke keeps what it had: it decodes up to there.
    let broken = recorded
        .iter()
        .find(|p| !p.to_string_lossy().contains("-r"))
        .expect("the run's first recording");
    let (frames, width, height) = common::decode_mkv(broken);
    assert!(
        frames >= 15 && (width, height) == (640, 480),
        "{}: {frames} frames of {width}×{height}",
        broken.display()
    );
    println!(
        "events {first} before, {while_full} while full, {after} after, all stored; \
         recordings {recorded:?}"
    );
}

/// SIGHUP reloads the alert settings of a running `stpm run`: a camera whose zone ignored the
/// whole frame raises no event; the file rewritten without it and SIGHUP sent, events start on
/// the next frames, without a restart (issue 23).
#[test]
fn sighup_reloads_alert_settings_without_a_restart() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("dir");
    let bundle = always_anomalous_bundle(dir.path());
    let zones = "\n[camera.alerts]\nignore = [[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]]\n";
    // The HTTP server's token file is read again too.
    let tokens = dir.path().join("tokens");
    fs::write(&tokens, format!("{}\n", "ab".repeat(32))).expect("tokens");
    let http = format!(
        "\n[http]\nenabled = true\nbind = \"127.0.0.1:0\"\n\n[http.auth]\ntoken_file = \"{}\"\n",
        common::path_str(&tokens)
    );
    let pipeline = run_pipeline_with(
        dir.path(),
        &bundle,
        "test://conveyor?fps=15",
        broker.port,
        "t_hup",
        &format!("{zones}{http}"),
    );
    let subscriber = Subscriber::new(broker.port, "t_hup/+/events", None);
    let log = dir.path().join("run.log");
    let mut child = common::spawn_run(&pipeline, &log, dir.path());
    let text = || fs::read_to_string(&log).unwrap_or_default();
    let started = Instant::now();
    while !text().contains("stream time 0") {
        assert!(started.elapsed() < Duration::from_secs(30), "{}", text());
        thread::sleep(Duration::from_millis(100));
    }
    let quiet = next_new_event(&subscriber, Duration::from_secs(3));
    // Rewrites the pipeline file, then sends SIGHUP.
    let rewrite_and_hang_up = |from: &str, to: &str| {
        let rewritten = fs::read_to_string(&pipeline)
            .expect("pipeline")
            .replace(from, to);
        fs::write(&pipeline, rewritten).expect("rewrite");
        let hup = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(hup.success());
    };
    // The same file without the ignore zone; a second token.
    fs::write(
        &tokens,
        format!("{}\n{}\n", "ab".repeat(32), "cd".repeat(32)),
    )
    .expect("tokens");
    rewrite_and_hang_up(zones, "\n");
    let after = next_new_event(&subscriber, Duration::from_secs(10));
    // The file names another bundle, one that never alerts: SIGHUP swaps it in and the event in
    // progress ends, its `end` naming the new model.
    let quiet_bundle = common::recalibrated_bundle(
        common::tiny_conveyor_bundle(),
        &dir.path().join("quiet"),
        "1e9",
        "0.0",
    );
    rewrite_and_hang_up(common::path_str(&bundle), common::path_str(&quiet_bundle));
    let ended = {
        let start = Instant::now();
        loop {
            let Some(left) = Duration::from_secs(15).checked_sub(start.elapsed()) else {
                break None;
            };
            let Ok(message) = subscriber.messages.recv_timeout(left) else {
                break None;
            };
            let event = message.json();
            if event["type"] == "end" {
                break Some(event);
            }
        }
    };
    let alive = child.try_wait().expect("wait").is_none();
    common::sigterm(&child);
    let status = child.wait().expect("wait");
    let log_text = text();
    assert_eq!(quiet, None, "an event inside the ignored zone: {log_text}");
    assert!(alive, "SIGHUP ended the run: {log_text}");
    assert!(after.is_some(), "no event after the reload: {log_text}");
    assert!(
        log_text.contains("[line1] alert settings reloaded"),
        "{log_text}"
    );
    assert!(
        log_text.contains("http.auth read again: 0 user(s), 2 token(s), 0 metrics token(s)"),
        "{log_text}"
    );
    let ended = ended.unwrap_or_else(|| panic!("no end after the model swap: {log_text}"));
    assert_eq!(
        ended["model"],
        stpm::pipeline::model::id_on_disk(&quiet_bundle),
        "{log_text}"
    );
    assert!(log_text.contains("model: quiet ("), "{log_text}");
    assert!(status.success(), "{log_text}");
}
