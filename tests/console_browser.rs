//! The browser console in a real browser: Debian's headless Chromium driven through chromedriver
//! (WebDriver, `fantoccini`), against a real `stpm run` with a real MQTT broker. The console loads,
//! the live view plays, an event appears in the list when it starts (pushed, not polled), its
//! snapshot and clip play, and a verdict click is stored. Screenshots are kept in
//! `target/tmp/console/`.
//!
//! Needs `chromium` and `chromium-driver` (scripts/setup.sh installs them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::broker::{Broker, always_anomalous_bundle, free_port};
use common::{KillOnDrop, http_get, spawn_run};
use fantoccini::{Client, ClientBuilder, Locator};
use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

fn chromedriver() -> PathBuf {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromedriver is not installed: run `bash scripts/setup.sh` (it installs the \
                 Debian packages chromium and chromium-driver)"
            )
        })
}

/// Starts chromedriver on a free port and waits until it answers.
fn start_chromedriver() -> (KillOnDrop, u16) {
    let port = free_port();
    let child = Command::new(chromedriver())
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let child = KillOnDrop(child);
    let started = Instant::now();
    // chromedriver speaks HTTP/1.1 only; listening is enough, the WebDriver client does the rest.
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chromedriver did not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, port)
}

/// The time each `new` event message of `topic` arrived, with the message.
fn subscribe_new_events(port: u16, topic: &str) -> mpsc::Receiver<(Instant, Value)> {
    let mut options = MqttOptions::new(
        format!("browser-test-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(options, 16);
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .expect("subscribe");
    let (arrived, messages) = mpsc::channel();
    std::thread::spawn(move || {
        let _client = client;
        for notification in connection.iter() {
            let Ok(Event::Incoming(Packet::Publish(publish))) = notification else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<Value>(&publish.payload) else {
                continue;
            };
            if event["type"] == "new" && arrived.send((Instant::now(), event)).is_err() {
                return;
            }
        }
    });
    messages
}

/// Runs `script` in the page (its `return` value).
async fn js(browser: &Client, script: &str) -> Value {
    browser.execute(script, vec![]).await.expect("script runs")
}

/// Polls `script` until it returns true, or panics after `timeout` naming `what`.
async fn until(browser: &Client, timeout: Duration, what: &str, script: &str) -> Duration {
    let started = Instant::now();
    loop {
        if js(browser, script).await == json!(true) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs_f64())
        .unwrap_or_default()
}

async fn screenshot(browser: &Client, name: &str) -> PathBuf {
    let folder = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&folder).expect("screenshot folder");
    let file = folder.join(name);
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(&file, png).expect("write screenshot");
    file
}

#[test]
fn the_console_shows_live_video_pushes_events_plays_clips_and_stores_verdicts() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("dir");
    let (camera_port, http_port) = (free_port(), free_port());
    // The camera: a second `stpm run` serving the generated conveyor over RTSP, started only
    // once the page is open, so the watcher's event starts while the console watches.
    let camera_pipeline = common::rtsp_camera_pipeline(dir.path(), camera_port);
    let bundle = always_anomalous_bundle(dir.path());
    let watcher_pipeline = common::rtsp_watcher_pipeline(
        dir.path(),
        &bundle,
        camera_port,
        http_port,
        &format!(
            "[storage]\npath = \"data\"\n\n\
             [clips]\nenabled = true\npre_seconds = 1\npost_seconds = 1\nmax_seconds = 3\n\n\
             [alerts]\nspool_dir = \"spool\"\n\n\
             [mqtt]\nport = {}\nprefix = \"console\"\nclient_id = \"stpm-console-{}\"\n",
            broker.port,
            std::process::id()
        ),
    );
    let new_events = subscribe_new_events(broker.port, "console/line1/events");
    let watcher_log = dir.path().join("watcher.log");
    let mut watcher = KillOnDrop(spawn_run(&watcher_pipeline, &watcher_log, dir.path()));
    let started = Instant::now();
    while http_get(http_port, "/api/cameras").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stpm run did not serve: {}",
            std::fs::read_to_string(&watcher_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_driver, driver_port) = start_chromedriver();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let logs = || {
        format!(
            "watcher:\n{}\ncamera:\n{}",
            std::fs::read_to_string(&watcher_log).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("camera.log")).unwrap_or_default()
        )
    };
    let result = runtime.block_on(async {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--autoplay-policy=no-user-gesture-required", "--window-size=1280,900"]}),
        );
        let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("a Chromium session through chromedriver");
        let checks = async {
            browser
                .goto(&format!("http://127.0.0.1:{http_port}/"))
                .await
                .expect("open the console");
            until(&browser, Duration::from_secs(10), "the camera is listed",
                  "return document.querySelector('#cameras [data-camera=\"line1\"]') !== null").await;
            assert_eq!(
                js(&browser, "return document.querySelectorAll('#events tr[data-id]').length").await,
                json!(0),
                "no event before the camera serves"
            );

            // The camera comes up: the watcher connects and its first event starts.
            let camera_started = unix_now();
            let _camera = KillOnDrop(spawn_run(&camera_pipeline, &dir.path().join("camera.log"), dir.path()));
            let (published, new) = new_events
                .recv_timeout(Duration::from_secs(60))
                .expect("an MQTT `new` event once the camera serves");
            let id = new["id"].as_str().expect("id").to_string();
            let start_time = new["start_time"].as_f64().expect("start_time");
            // The message names the stored snapshot on this server.
            assert_eq!(new["snapshot_url"], format!("/api/events/{id}/snapshot.jpg"), "{new}");
            // A camera that connects late has its frames at the times they were seen.
            assert!(
                start_time >= camera_started,
                "the event starts at {start_time}, before the camera served (from {camera_started})"
            );
            let row = format!("return document.querySelector('#events tr[data-id=\"{id}\"]') !== null");
            until(&browser, Duration::from_secs(10), "the new event is listed", &row).await;
            let listed = published.elapsed();
            assert!(
                listed < Duration::from_secs(2),
                "the event was listed {listed:?} after its MQTT `new` (pushed, it takes well under 2 s)"
            );

            // The live view plays: its time advances.
            until(&browser, Duration::from_secs(20), "the live view plays",
                  "const v = document.getElementById('live'); return v.readyState >= 2 && v.currentTime > 1").await;
            let before = js(&browser, "return document.getElementById('live').currentTime").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = js(&browser, "return document.getElementById('live').currentTime").await;
            assert!(
                after.as_f64() > before.as_f64(),
                "the live video's currentTime does not advance ({before} → {after})"
            );
            let behind = js(&browser, "return Number(document.getElementById('latency').dataset.seconds)").await;
            println!("live view: {behind} s behind the camera (frame time against the browser clock)");
            let live_png = screenshot(&browser, "live.png").await;

            // The event's page: its snapshot, then its clip (cut at max_seconds) plays.
            browser
                .find(Locator::Css(&format!("#events tr[data-id=\"{id}\"]")))
                .await
                .expect("the event's row")
                .click()
                .await
                .expect("click the event");
            until(&browser, Duration::from_secs(10), "the snapshot shows",
                  "const i = document.getElementById('snapshot'); return i !== null && i.complete && i.naturalWidth === 640").await;
            until(&browser, Duration::from_secs(20), "the clip is offered",
                  "return document.getElementById('clip') !== null").await;
            js(&browser, "document.getElementById('clip').play(); return true").await;
            until(&browser, Duration::from_secs(10), "the clip plays",
                  "const c = document.getElementById('clip'); return c.currentTime > 0.5").await;

            // A verdict click is stored.
            browser
                .find(Locator::Css("button[data-verdict=\"defect\"]"))
                .await
                .expect("the Defect button")
                .click()
                .await
                .expect("click Defect");
            until(&browser, Duration::from_secs(5), "the verdict shows",
                  "return document.getElementById('verdict').className === 'verdict-defect'").await;
            let event_png = screenshot(&browser, "event.png").await;
            let (status, body) =
                http_get(http_port, &format!("/api/events/{id}")).expect("the event over HTTP");
            assert_eq!(status, 200, "{body}");
            let stored: Value = serde_json::from_str(&body).expect("json");
            assert_eq!(stored["verdict"], "defect", "{stored}");
            // Training on the line from the console: the collection starts (this model finds
            // every frame anomalous, so it saves none), and a training on the empty collection
            // fails, which the page says.
            until(&browser, Duration::from_secs(5), "the live model is named",
                  "return document.getElementById('model').textContent.includes('bundle')").await;
            for button in ["collect", "train"] {
                browser
                    .find(Locator::Id(button))
                    .await
                    .expect("the button")
                    .click()
                    .await
                    .expect("click");
            }
            until(&browser, Duration::from_secs(5), "the collection shows",
                  "return document.getElementById('training-status').textContent.includes('collecting: 0 of 150 frames')").await;
            until(&browser, Duration::from_secs(60), "the failed training shows",
                  "return document.getElementById('training-status').textContent.includes('training failed: stpm train failed')").await;
            let training_png = screenshot(&browser, "training.png").await;
            println!(
                "screenshots: {} {} {}",
                live_png.display(),
                event_png.display(),
                training_png.display()
            );

            // SIGTERM with the console open (its live video and event stream): stpm still stops.
            common::sigterm(&watcher.0);
            let stopping = Instant::now();
            let status = loop {
                if let Some(status) = watcher.0.try_wait().expect("wait") {
                    break status;
                }
                assert!(
                    stopping.elapsed() < Duration::from_secs(20),
                    "stpm run did not stop within 20 s of SIGTERM with the console open"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert!(status.success(), "stpm run exited with {status}");
        };
        let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checks)).await;
        let _ = browser.close().await;
        outcome
    });
    if let Err(panic) = result {
        eprintln!("{}", logs());
        std::panic::resume_unwind(panic);
    }
}
