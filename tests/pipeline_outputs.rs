//! `stpm run`'s network outputs with real components: a tiny trained bundle on the generated
//! conveyor, GStreamer RTSP clients (rtspsrc → avdec_h264) decoding the annotated stream (twice, so
//! the second client exercises a media torn down and built again), and `/metrics` and `/health`
//! read over plain HTTP.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;

use common::{output_text as text, path_str as path, stpm_in as stpm, write_recording_pipeline};

fn bundle() -> &'static Path {
    common::tiny_conveyor_bundle()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The value of the sample line that starts with `series ` (name and labels), if any.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A decoded frame from an RTSP client.
struct Decoded {
    width: i32,
    height: i32,
    pixels: Vec<u8>,
}

/// Connects an RTSP client (TCP interleaved), decodes up to `wanted` frames within `timeout`,
/// then disconnects.
fn watch(url: &str, wanted: usize, timeout: Duration) -> Vec<Decoded> {
    let (pipeline, sink) = common::appsink_pipeline(&format!(
        "rtspsrc location={url} protocols=tcp latency=0 ! rtph264depay ! avdec_h264 ! \
         videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    ));
    pipeline.set_state(gst::State::Playing).expect("play");
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    while frames.len() < wanted {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some(sample) =
            sink.try_pull_sample(gst::ClockTime::from_nseconds(left.as_nanos() as u64))
        else {
            break;
        };
        let size = common::sample_size(&sample);
        let pixels = sample
            .buffer()
            .and_then(|b| b.map_readable().ok().map(|m| m.as_slice().to_vec()))
            .unwrap_or_default();
        frames.push(Decoded {
            width: size.0,
            height: size.1,
            pixels,
        });
    }
    let _ = pipeline.set_state(gst::State::Null);
    frames
}

#[test]
fn rtsp_clients_get_annotated_frames_and_metrics_count_them() {
    let dir = tempfile::tempdir().expect("dir");
    let (rtsp_port, http_port) = (free_port(), free_port());
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?fps=15&frames=900\"\n\n\
             [output.rtsp]\nenabled = true\nbind = \"127.0.0.1\"\nport = {rtsp_port}\n\n\
             [http]\nenabled = true\nbind = \"127.0.0.1:{http_port}\"\n",
            path(bundle())
        ),
    )
    .expect("write pipeline");
    let log_path = dir.path().join("stpm.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stpm"))
        .args(["run", "--pipeline", path(&pipeline)])
        .current_dir(dir.path())
        .stdout(Stdio::from(log_file.try_clone().expect("log file")))
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("spawn");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Healthy once the camera delivers frames.
    let started = Instant::now();
    let health = loop {
        match common::http_get(http_port, "/health") {
            Some((200, body)) => break body,
            _ if started.elapsed() > Duration::from_secs(60) => {
                let _ = child.kill();
                panic!("/health never answered 200: {}", log());
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let health: serde_json::Value = serde_json::from_str(&health).expect("health JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["cameras"][0]["camera"], "line1", "{health}");
    assert_eq!(health["cameras"][0]["state"], "online", "{health}");

    // Two clients one after the other: the second gets a freshly configured media.
    let url = format!("rtsp://127.0.0.1:{rtsp_port}/line1");
    for client in 1..=2 {
        let frames = watch(&url, 10, Duration::from_secs(40));
        assert!(
            frames.len() >= 10,
            "client {client}: {} frames: {}",
            frames.len(),
            log()
        );
        for frame in &frames {
            assert_eq!((frame.width, frame.height), (640, 480), "client {client}");
            assert_eq!(frame.pixels.len(), 640 * 480 * 3, "client {client}");
        }
        // A real picture (belt, panels, overlay), not a flat or black frame.
        let last = &frames[frames.len() - 1].pixels;
        let mean = last.iter().map(|&v| f64::from(v)).sum::<f64>() / last.len() as f64;
        let spread = last
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / last.len() as f64;
        assert!(
            mean > 20.0 && spread.sqrt() > 10.0,
            "client {client}: mean {mean:.1}, std {:.1}",
            spread.sqrt()
        );
    }

    // Two clients at once whose URLs differ in a query: GStreamer gives each a media of its own,
    // and both get frames all along (the second used to take the camera's only place and freeze
    // the first).
    let first = {
        let url = url.clone();
        std::thread::spawn(move || watch(&url, 60, Duration::from_secs(40)).len())
    };
    std::thread::sleep(Duration::from_secs(2));
    let second = watch(&format!("{url}?second"), 30, Duration::from_secs(40)).len();
    let first = first.join().expect("first client");
    assert!(
        first >= 60 && second >= 30,
        "frames: {first} of 60 and {second} of 30 at once: {}",
        log()
    );

    let (status, metrics) = common::http_get(http_port, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200, "{metrics}");
    let frames = sample(&metrics, "stpm_frames_total{camera=\"line1\"}").unwrap_or(0.0);
    let analysed = sample(&metrics, "stpm_frames_analysed_total{camera=\"line1\"}").unwrap_or(0.0);
    assert!(frames > 0.0 && analysed > 0.0, "{metrics}");
    // The histogram is read after the counter, in the same scrape.
    let timed = sample(&metrics, "stpm_inference_seconds_count{camera=\"line1\"}").unwrap_or(0.0);
    assert!(timed > 0.0 && timed >= analysed - 1.0, "{metrics}");
    for stage in ["preprocess", "inference", "overlay", "output"] {
        let key = format!("stpm_stage_seconds_count{{camera=\"line1\",stage=\"{stage}\"}}");
        assert!(
            sample(&metrics, &key).unwrap_or(0.0) > 0.0,
            "{stage}: {metrics}"
        );
    }
    assert!(
        // `precision = "auto"` on a bundle without an INT8 graph runs model.onnx.
        metrics.contains("stpm_engine_info{provider=\"cpu\",precision=\"fp32\"} 1\n"),
        "{metrics}"
    );
    // The encoder announced at start is the one exported.
    let encoder = log()
        .lines()
        .find_map(|line| {
            line.strip_prefix("encoder: ")?
                .split(' ')
                .next()
                .map(String::from)
        })
        .unwrap_or_default();
    assert!(
        metrics.contains(&format!("stpm_encoder_info{{encoder=\"{encoder}\"}} 1\n")),
        "{encoder}: {metrics}"
    );
    assert_eq!(
        sample(&metrics, "stpm_camera_online{camera=\"line1\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "stpm_fps{camera=\"line1\"}").is_some_and(|fps| fps > 1.0),
        "{metrics}"
    );
    // Retention (30 days by default) has swept the data folder at least once.
    assert!(
        sample(&metrics, "stpm_storage_bytes").is_some()
            && sample(&metrics, "stpm_storage_deleted_files_total") == Some(0.0),
        "{metrics}"
    );

    common::sigterm(&child);
    let stopped = Instant::now();
    let status = child.wait().expect("wait");
    let log = log();
    assert!(status.success(), "{log}");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "took {:?}: {log}",
        stopped.elapsed()
    );
    assert_eq!(
        log.matches("RTSP: streaming to clients").count(),
        4,
        "one media per client (the two at once: one each): {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// Recording and RTSP on together share one encode: a client that joins mid-run decodes the
/// annotated stream from a key frame asked for when it joined, and the recording still holds every
/// frame the camera delivered.
#[test]
fn the_recording_and_an_rtsp_client_share_one_encode() {
    let dir = tempfile::tempdir().expect("dir");
    let rtsp_port = free_port();
    let pipeline = write_recording_pipeline(
        dir.path(),
        "source = \"test://conveyor?fps=15&frames=120\"",
        &format!("\n[output.rtsp]\nenabled = true\nbind = \"127.0.0.1\"\nport = {rtsp_port}\n"),
    );
    let log_path = dir.path().join("stpm.log");
    let mut child = common::spawn_run(&pipeline, &log_path, dir.path());
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Join once the recording runs, so the client does not start the encode.
    let started = Instant::now();
    while !log().contains("[line1] recording to ") {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the recording never started: {}", log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let frames = watch(
        &format!("rtsp://127.0.0.1:{rtsp_port}/line1"),
        10,
        Duration::from_secs(30),
    );
    assert!(frames.len() >= 10, "{} frames: {}", frames.len(), log());
    assert!(
        frames.iter().all(|f| (f.width, f.height) == (640, 480)),
        "{}",
        log()
    );
    let status = child.wait().expect("wait");
    let log = log();
    assert!(status.success(), "{log}");
    assert_eq!(
        log.matches("encoding the annotated video").count(),
        1,
        "one encode for both outputs: {log}"
    );
    assert_eq!(
        log.matches("RTSP: streaming to clients").count(),
        1,
        "{log}"
    );
    // Every frame the worker got is in the recording.
    let delivered: usize = log
        .lines()
        .find_map(|line| {
            line.split("camera line1: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no summary line: {log}"));
    let files = recordings(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        common::decode_mkv(&files[0]),
        (delivered, 640, 480),
        "{log}"
    );
    assert!(delivered > 60, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn taken_ports_fail_the_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let pipeline = dir.path().join("p.toml");
    let write = |extra: &str| {
        std::fs::write(
            &pipeline,
            format!(
                "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
                 [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?frames=5\"\n{extra}",
                path(bundle())
            ),
        )
        .expect("write pipeline");
    };
    write(&format!(
        "[http]\nenabled = true\nbind = \"127.0.0.1:{port}\"\n"
    ));
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!("http.bind = `127.0.0.1:{port}`")),
        "{log}"
    );
    write(&format!(
        "[output.rtsp]\nenabled = true\nbind = \"127.0.0.1\"\nport = {port}\n"
    ));
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// `[http]` on an address other machines reach needs `[http.auth]`: without it the start is
/// refused, saying why; with a password file it serves.
#[test]
fn an_http_server_reachable_from_other_machines_needs_auth() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = dir.path().join("p.toml");
    let port = free_port();
    let write = |auth: &str| {
        std::fs::write(
            &pipeline,
            format!(
                "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
                 [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?frames=3\"\n\n\
                 [http]\nenabled = true\nbind = \"0.0.0.0:{port}\"\n{auth}",
                path(bundle())
            ),
        )
        .expect("write pipeline");
    };
    write("");
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "http.bind = `0.0.0.0:{port}` is reachable from other machines"
        )),
        "{log}"
    );
    // A well-formed argon2id PHC line (the start checks the format; logging in is unit-tested).
    let passwords = dir.path().join("passwords");
    std::fs::write(
        &passwords,
        "anna:$argon2id$v=19$m=19456,t=2,p=1$YSBmaXhlZCBzYWx0$9c5DBKrLa5rWHrLyVYkBsTdZxjJ+7WD2LmaiQXzNfks\n",
    )
    .expect("passwords");
    write(&format!(
        "\n[http.auth]\npassword_file = \"{}\"\n",
        path(&passwords)
    ));
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    assert!(out.status.success(), "{}", text(&out));
}

/// Polls `/metrics` on `port` until `done` holds for it, or panics after `timeout` with `what`.
fn wait_metrics(port: u16, timeout: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        if let Some((200, metrics)) = common::http_get(port, "/metrics")
            && done(&metrics)
        {
            return metrics;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A network camera that goes away and comes back: `stpm run` marks it offline (metrics and
/// `/health`), keeps running, and resumes its frames once the camera serves again, without a
/// restart. The camera is a second `stpm run` serving the generated conveyor over RTSP, killed
/// (SIGKILL, no goodbye to its clients) and started again on the same port. Then it freezes
/// (SIGSTOP: its connection stays open, nothing comes): the stall watchdog marks it offline
/// within seconds, and after SIGCONT its frames come back.
#[test]
fn an_rtsp_camera_that_drops_or_freezes_is_marked_offline_and_reconnected() {
    let dir = tempfile::tempdir().expect("dir");
    let (camera_port, http_port) = (free_port(), free_port());
    let camera_pipeline = common::rtsp_camera_pipeline(dir.path(), camera_port);
    let watcher_pipeline =
        common::rtsp_watcher_pipeline(dir.path(), bundle(), camera_port, http_port, "");
    // A 2 s watchdog (the default is 10 s).
    let source = format!("source = \"rtsp://127.0.0.1:{camera_port}/cam\"\n");
    let text = std::fs::read_to_string(&watcher_pipeline).expect("read");
    std::fs::write(
        &watcher_pipeline,
        text.replace(&source, &format!("{source}stall_seconds = 2\n")),
    )
    .expect("write");
    let (camera_log, watcher_log) = (
        dir.path().join("camera.log"),
        dir.path().join("watcher.log"),
    );
    let mut camera = common::spawn_run(&camera_pipeline, &camera_log, dir.path());
    let mut watcher = common::spawn_run(&watcher_pipeline, &watcher_log, dir.path());
    let logs = || {
        format!(
            "watcher:\n{}\ncamera:\n{}",
            std::fs::read_to_string(&watcher_log).unwrap_or_default(),
            std::fs::read_to_string(&camera_log).unwrap_or_default()
        )
    };
    let frames =
        |metrics: &str| sample(metrics, "stpm_frames_total{camera=\"line1\"}").unwrap_or(0.0);
    let online = |metrics: &str| sample(metrics, "stpm_camera_online{camera=\"line1\"}");

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let metrics = wait_metrics(http_port, Duration::from_secs(90), "first frames", |m| {
            frames(m) >= 5.0 && online(m) == Some(1.0)
        });
        let before = frames(&metrics);

        let _ = camera.kill();
        let _ = camera.wait();
        wait_metrics(
            http_port,
            Duration::from_secs(60),
            "the camera offline",
            |m| online(m) == Some(0.0),
        );
        let health = common::http_get(http_port, "/health");
        assert!(
            matches!(&health, Some((503, body)) if body.contains("offline")),
            "{health:?}"
        );

        camera = common::spawn_run(&camera_pipeline, &camera_log, dir.path());
        let metrics = wait_metrics(http_port, Duration::from_secs(90), "frames again", |m| {
            online(m) == Some(1.0) && frames(m) >= before + 5.0
        });
        let before = frames(&metrics);

        // Frozen: the socket stays open and nothing comes. rtspsrc alone would wait for its
        // own timeouts (5 s of UDP, then 20 s of TCP); the watchdog says offline after 2 s.
        let signal = |name: &str| {
            let sent = Command::new("kill")
                .args([name, &camera.id().to_string()])
                .status()
                .expect("kill");
            assert!(sent.success(), "kill {name}");
        };
        signal("-STOP");
        wait_metrics(
            http_port,
            Duration::from_secs(8),
            "the frozen camera offline",
            |m| online(m) == Some(0.0),
        );
        signal("-CONT");
        wait_metrics(
            http_port,
            Duration::from_secs(90),
            "frames after the freeze",
            |m| online(m) == Some(1.0) && frames(m) >= before + 5.0,
        );
    }));
    let _ = camera.kill();
    let _ = camera.wait();
    common::sigterm(&watcher);
    let status = watcher.wait().expect("wait");
    if let Err(panic) = result {
        eprintln!("{}", logs());
        std::panic::resume_unwind(panic);
    }
    let logs = logs();
    eprintln!("{logs}");
    assert!(status.success(), "{logs}");
    assert!(logs.contains("[line1] offline"), "{logs}");
    assert!(logs.contains("the camera stalled"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

/// A USB camera (V4L2) that is not plugged in: its camera retries with backoff and is reported
/// offline, while the other camera of the same process is analysed; SIGTERM still exits 0. (This
/// machine has no /dev/video*; the source is the real v4l2src element failing on a missing device.)
#[test]
fn a_missing_usb_camera_retries_while_another_camera_runs() {
    let dir = tempfile::tempdir().expect("dir");
    let http_port = free_port();
    let missing = "/dev/video-stpm-test-missing";
    assert!(!Path::new(missing).exists());
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"usb\"\nsource = \"v4l2://{missing}\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?fps=15\"\n\n\
             [http]\nenabled = true\nbind = \"127.0.0.1:{http_port}\"\n",
            path(bundle())
        ),
    )
    .expect("write pipeline");
    let log = dir.path().join("run.log");
    let run = common::spawn_run(&pipeline, &log, dir.path());
    let result = std::panic::catch_unwind(|| {
        wait_metrics(http_port, Duration::from_secs(90), "line1 analysed", |m| {
            sample(m, "stpm_frames_analysed_total{camera=\"line1\"}").unwrap_or(0.0) >= 5.0
                && sample(m, "stpm_camera_online{camera=\"line1\"}") == Some(1.0)
                && sample(m, "stpm_camera_online{camera=\"usb\"}") == Some(0.0)
                && sample(m, "stpm_frames_total{camera=\"usb\"}") == Some(0.0)
        });
        let health = common::http_get(http_port, "/health");
        assert!(
            matches!(&health, Some((503, body))
                if body.contains(r#""camera":"line1","seconds""#)
                    && body.contains(r#""state":"online""#)
                    && body.contains(r#""unhealthy":["usb"]"#)),
            "{health:?}"
        );
        // Backoff starts at 0.5 s: a second failed attempt comes within a few seconds.
        let started = Instant::now();
        while std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("[usb] offline (")
            .count()
            < 2
        {
            assert!(started.elapsed() < Duration::from_secs(20), "no retry");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    common::sigterm(&run);
    let status = run.wait_with_output().expect("wait").status;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Err(panic) = result {
        eprintln!("{text}");
        std::panic::resume_unwind(panic);
    }
    assert!(status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "[usb] offline (cannot start: Cannot identify device '{missing}'"
        )),
        "the error says why: {text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// 24 conveyor frames at 12 fps, every frame analysed.
const CONVEYOR_24: &str = "source = \"test://conveyor?frames=24&fps=12\"\nrealtime = false";

/// The `.mkv` files under `<dir>/rec`, sorted by name.
fn recordings(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("rec"))
        .expect("recordings folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "mkv"))
        .collect();
    files.sort();
    files
}

/// Runs the 24-frame conveyor with one `--set`, checks that it exits 0 with one recording that
/// decodes to all 24 frames at 640×480, and returns the log.
fn record_24_frames_with(set: &str) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_recording_pipeline(dir.path(), CONVEYOR_24, "");
    let out = stpm(
        &["run", "--pipeline", path(&pipeline), "--set", set],
        dir.path(),
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let files = recordings(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(common::decode_mkv(&files[0]), (24, 640, 480), "{log}");
    log
}

/// `test://conveyor?size=WxH` draws frames of that size (the many-camera table's 720p and 1080p
/// cameras), all recorded.
#[test]
fn a_conveyor_of_another_size_records_frames_of_that_size() {
    let dir = tempfile::tempdir().expect("dir");
    let camera = "source = \"test://conveyor?frames=6&fps=12&size=320x240\"\nrealtime = false";
    let pipeline = write_recording_pipeline(dir.path(), camera, "");
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let files = recordings(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(common::decode_mkv(&files[0]), (6, 320, 240), "{log}");
}

#[test]
fn openh264_records_every_frame() {
    let log = record_24_frames_with("output.encoder=openh264");
    assert!(
        log.contains("encoder: openh264enc (output.encoder = openh264)\n"),
        "{log}"
    );
}

/// Two sessions: a camera's frames are scored by two analysers in turn and still all reach the
/// recording (their order is unit-tested in `pipeline::analyse`).
#[test]
fn two_sessions_analyse_and_record_every_frame() {
    let log = record_24_frames_with("model.sessions=2");
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1);
    assert!(
        log.contains(&format!("; 2 session(s) × {threads} intra-op thread(s)\n")),
        "{log}"
    );
    assert!(
        log.contains("camera line1: 24 frames, 24 analysed, 0 dropped"),
        "{log}"
    );
}

/// An explicit encoder whose element is not installed stops the start, naming the key and what
/// is installed: nvh264enc (no NVIDIA GPU here) or, where it is present, Jetson's nvv4l2h264enc.
#[test]
fn a_missing_encoder_fails_the_start_naming_the_key() {
    gst::init().expect("gst init");
    let Some((key, element)) = [("nvh264", "nvh264enc"), ("nvv4l2", "nvv4l2h264enc")]
        .into_iter()
        .find(|(_, element)| gst::ElementFactory::find(element).is_none())
    else {
        eprintln!("skipped: both NVIDIA encoders are installed");
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_recording_pipeline(dir.path(), CONVEYOR_24, "");
    let started = Instant::now();
    let out = stpm(
        &[
            "run",
            "--pipeline",
            path(&pipeline),
            "--set",
            &format!("output.encoder={key}"),
        ],
        dir.path(),
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "output.encoder = `{key}`: {element} is not available"
        )),
        "{log}"
    );
    assert!(log.contains("H.264 encoders found: "), "{log}");
    assert!(
        !log.contains("panicked") && !dir.path().join("rec").exists(),
        "{log}"
    );
    // Before the model is loaded or a frame is made.
    assert!(started.elapsed() < Duration::from_secs(10), "{log}");
}

/// Half-second segments of a 2 s run: at least two files, each complete on its own, none longer
/// than a segment (6 frames at 12 fps), together every frame.
#[test]
fn segments_are_complete_files_that_add_up_to_the_run() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_recording_pipeline(dir.path(), CONVEYOR_24, "segment_seconds = 0.5\n");
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let files = recordings(dir.path());
    assert!(files.len() >= 2, "{files:?}: {log}");
    let mut total = 0;
    for (index, file) in files.iter().enumerate() {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            name.starts_with("line1-") && name.ends_with(&format!("-{index:05}.mkv")),
            "{name}"
        );
        let (frames, width, height) = common::decode_mkv(file);
        assert!(
            (1..=6).contains(&frames) && (width, height) == (640, 480),
            "{name}: {frames} frames {width}x{height}"
        );
        total += frames;
    }
    assert_eq!(total, 24, "{files:?}");
    assert!(
        log.contains(&format!("camera line1: {} recording segments", files.len())),
        "{log}"
    );
}

/// SIGTERM during a segmented recording of a live-paced source: the run exits 0 and every segment,
/// the one open at the stop included, decodes.
#[test]
fn sigterm_finishes_the_open_segment() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_recording_pipeline(
        dir.path(),
        "source = \"test://conveyor?fps=20\"",
        "segment_seconds = 0.5\n",
    );
    let log_path = dir.path().join("stpm.log");
    let child = common::spawn_run(&pipeline, &log_path, dir.path());
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = Instant::now();
    // Two closed segments and a third open.
    while !dir.path().join("rec").is_dir() || recordings(dir.path()).len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no segments: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    common::sigterm(&child);
    let mut child = child;
    let status = child.wait().expect("wait");
    let log = log();
    assert!(status.success(), "{log}");
    let files = recordings(dir.path());
    for file in &files {
        let (frames, width, height) = common::decode_mkv(file);
        assert!(
            frames > 0 && (width, height) == (640, 480),
            "{}: {frames} frames {width}x{height}: {log}",
            file.display()
        );
    }
    assert!(
        log.contains(&format!("camera line1: {} recording segments", files.len())),
        "{files:?}: {log}"
    );
}

/// Two instances on one data folder: the second `stpm run` exits non-zero at once, naming the
/// folder and the process that holds it; the first runs on and stops cleanly.
#[test]
fn a_second_run_on_the_same_data_folder_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor\"\n\n\
             [storage]\npath = \"data\"\n",
            path(bundle())
        ),
    )
    .expect("write pipeline");
    let mut first = common::spawn_run(&pipeline, &dir.path().join("first.log"), dir.path());
    let holder = format!("pid {}", first.id());
    let lock = dir.path().join("data/stpm.lock");
    let started = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|text| text.contains(&holder)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the first run did not take the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("storage.path = data is in use by another stpm run") && log.contains(&holder),
        "{log}"
    );
    assert!(
        matches!(first.try_wait(), Ok(None)),
        "the first run goes on"
    );
    common::sigterm(&first);
    let status = first.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// `[output.rtsp] username` and `password_file`: a client without the password decodes nothing
/// and starts no encoder; with it (in the URL, as players take it) it decodes the stream.
#[test]
fn rtsp_with_a_password_turns_strangers_away_without_encoding() {
    rtsp_password_check("basic");
}

/// The same with `auth_method = "digest"` (only a hash of the password crosses the network).
#[test]
fn rtsp_with_digest_authentication_turns_strangers_away() {
    rtsp_password_check("digest");
}

/// `stpm run` of the tiny bundle on the generated conveyor (15 frames/s, no event store) with
/// RTSP on `port` and `rtsp` (more `[output.rtsp]` keys), started and listening: the process and
/// its log file.
fn rtsp_run(dir: &Path, port: u16, rtsp: &str) -> (std::process::Child, PathBuf) {
    let pipeline = dir.join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?fps=15\"\n\n\
             [storage]\nenabled = false\n\n\
             [output.rtsp]\nenabled = true\nport = {port}\n{rtsp}",
            path(bundle()),
        ),
    )
    .expect("write pipeline");
    let log = dir.join("stpm.log");
    let child = common::spawn_run(&pipeline, &log, dir);
    common::wait_for_port(port, "RTSP");
    (child, log)
}

fn rtsp_password_check(method: &str) {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let password = dir.path().join("rtsp-password");
    std::fs::write(&password, "s3cret\n").expect("password file");
    let (mut child, log) = rtsp_run(
        dir.path(),
        port,
        &format!(
            "bind = \"127.0.0.1\"\nusername = \"anna\"\npassword_file = \"{}\"\n\
             auth_method = \"{method}\"\n",
            path(&password)
        ),
    );
    // What the server asks a stranger for: the configured method only.
    let challenge = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let request = format!("DESCRIBE rtsp://127.0.0.1:{port}/line1 RTSP/1.0\r\nCSeq: 1\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("send");
        let mut answer = vec![0u8; 4096];
        let n = stream.read(&mut answer).unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    assert!(challenge.starts_with("RTSP/1.0 401"), "{challenge}");
    let offered: Vec<&str> = challenge
        .lines()
        .filter_map(|l| l.strip_prefix("WWW-Authenticate: "))
        .collect();
    let scheme = if method == "digest" {
        "Digest "
    } else {
        "Basic "
    };
    assert!(
        !offered.is_empty() && offered.iter().all(|o| o.starts_with(scheme)),
        "{challenge}"
    );
    let stranger = watch(
        &format!("rtsp://127.0.0.1:{port}/line1"),
        1,
        Duration::from_secs(5),
    );
    let wrong = watch(
        &format!("rtsp://anna:guess@127.0.0.1:{port}/line1"),
        1,
        Duration::from_secs(5),
    );
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let before = text();
    let anna = watch(
        &format!("rtsp://anna:s3cret@127.0.0.1:{port}/line1"),
        5,
        Duration::from_secs(30),
    );
    common::sigterm(&child);
    let status = child.wait().expect("wait");
    let after = text();
    assert!(stranger.is_empty() && wrong.is_empty(), "{after}");
    assert!(
        !before.contains("encoding the annotated video"),
        "a refused client started the encoder: {before}"
    );
    assert_eq!(anna.len(), 5, "{after}");
    assert_eq!((anna[0].width, anna[0].height), (640, 480));
    assert!(after.contains("encoding the annotated video"), "{after}");
    assert!(status.success(), "{after}");
}

/// RTSPS: with `tls_cert` and `tls_key` every connection is TLS; a client that accepts the
/// (self-signed) certificate decodes the stream, one speaking plain RTSP gets nothing.
#[test]
fn rtsps_serves_tls_clients_and_nobody_in_plain_text() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            path(&key),
            "-out",
            path(&cert),
        ])
        .output()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(made.status.success(), "{}", text(&made));
    let (mut child, log) = rtsp_run(
        dir.path(),
        port,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            path(&cert),
            path(&key)
        ),
    );
    let plain = watch(
        &format!("rtsp://127.0.0.1:{port}/line1"),
        1,
        Duration::from_secs(5),
    );
    // rtspsrc's own property after the location: accept a certificate no authority signed.
    let tls = watch(
        &format!("rtsps://127.0.0.1:{port}/line1 tls-validation-flags=0"),
        5,
        Duration::from_secs(30),
    );
    common::sigterm(&child);
    let status = child.wait().expect("wait");
    let after = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(plain.is_empty(), "plain RTSP was served: {after}");
    assert_eq!(tls.len(), 5, "{after}");
    assert_eq!((tls[0].width, tls[0].height), (640, 480));
    assert!(status.success(), "{after}");
}

/// `POST /api/cameras/{camera}/collect` on a running pipeline (issue 23): 60 good frames of the
/// conveyor land in `<storage>/collect/line1/train/good`, none showing a defect by the
/// generator's labels; a second request while it runs is refused; progress is readable.
#[test]
fn a_running_pipeline_collects_good_frames_through_the_api() {
    const FPS: f64 = 15.0;
    let dir = tempfile::tempdir().expect("dir");
    let http = free_port();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?fps={FPS}\"\n\n\
             [storage]\npath = \"{}\"\n\n\
             [http]\nenabled = true\nbind = \"127.0.0.1:{http}\"\n",
            path(common::detecting_conveyor_bundle()),
            path(&dir.path().join("data"))
        ),
    )
    .expect("write pipeline");
    let log = dir.path().join("stpm.log");
    let mut child = common::spawn_run(&pipeline, &log, dir.path());
    common::wait_for_port(http, "HTTP");
    let ask = |method: &str, target: &str, body: &str| {
        common::http_request(http, method, target, body).expect("an answer")
    };
    let (status, body) = ask(
        "POST",
        "/api/cameras/line1/collect",
        r#"{"frames": 60, "every": 0.1}"#,
    );
    assert_eq!(status, 202, "{body}");
    assert!(body.contains(r#""wanted":60"#), "{body}");
    let (status, body) = ask("POST", "/api/cameras/line1/collect", "");
    assert_eq!(status, 409, "{body}");
    assert_eq!(ask("GET", "/api/cameras/nowhere/collect", "").0, 404);
    let started = Instant::now();
    let progress = loop {
        let (status, body) = ask("GET", "/api/cameras/line1/collect", "");
        assert_eq!(status, 200, "{body}");
        let progress: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        if progress["done"] == true {
            break progress;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("not done in 90 s: {body}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    common::sigterm(&child);
    let status = child.wait().expect("wait");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{text}");
    assert_eq!(progress["saved"], 60, "{progress}");
    assert!(progress["error"].is_null(), "{progress}");
    let folder = dir.path().join("data/collect/line1");
    let listed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("collect.json")).expect("collect.json"))
            .expect("JSON");
    let saved = listed["runs"][0]["saved"].as_array().expect("saved");
    assert_eq!(saved.len(), 60);
    let (width, height) = stpm::pipeline::conveyor::CONVEYOR_SIZE;
    let mut conveyor = stpm::pipeline::conveyor::Conveyor::new(width, height, 1);
    for frame in saved {
        let file = folder.join(frame["file"].as_str().expect("file"));
        let decoded = image::open(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .to_rgb8();
        assert_eq!(
            (decoded.width(), decoded.height()),
            (width as u32, height as u32),
            "{}",
            file.display()
        );
        let index = (frame["stream_seconds"].as_f64().expect("time") * FPS).round() as u64;
        assert!(
            conveyor.frame(index).defect.is_none(),
            "frame {index} shows a defect: {text}"
        );
    }
}

/// Hostile video files: random bytes, an empty file and a recording cut off mid-way. Each camera
/// ends with a message naming it, what could be decoded is analysed, and nothing panics.
#[test]
fn garbage_and_truncated_video_files_end_their_camera_without_a_panic() {
    let dir = tempfile::tempdir().expect("dir");
    // A real recording of 24 frames, then cut to 40 % of its bytes.
    let pipeline = write_recording_pipeline(dir.path(), CONVEYOR_24, "");
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let recorded = recordings(dir.path()).pop().expect("a recording");
    let bytes = std::fs::read(&recorded).expect("read");
    let truncated = dir.path().join("truncated.mkv");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 5]).expect("write");
    // Random bytes from a fixed seed (xorshift), and nothing at all.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let noise: Vec<u8> = (0..200_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let random = dir.path().join("random.mkv");
    std::fs::write(&random, noise).expect("write");
    let empty = dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").expect("write");
    // One picture larger than 8K UHD (a JPEG of a flat colour: small on disk).
    let huge = dir.path().join("huge.jpg");
    let made = std::process::Command::new("gst-launch-1.0")
        .args([
            "-q",
            "videotestsrc",
            "num-buffers=1",
            "pattern=solid-color",
            "!",
        ])
        .args([
            "video/x-raw,width=7700,height=4400",
            "!",
            "jpegenc",
            "!",
            "filesink",
        ])
        .arg(format!("location={}", path(&huge)))
        .output()
        .expect("gst-launch-1.0");
    assert!(made.status.success(), "{}", text(&made));
    let cameras: String = [
        ("cut", &truncated),
        ("noise", &random),
        ("nothing", &empty),
        ("huge", &huge),
    ]
    .iter()
    .map(|(name, file)| {
        format!(
            "[[camera]]\nname = \"{name}\"\nsource = \"file://{}\"\nrealtime = false\n\n",
            path(file)
        )
    })
    .collect();
    let hostile = dir.path().join("hostile.toml");
    std::fs::write(
        &hostile,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n{cameras}[storage]\nenabled = false\n",
            path(bundle())
        ),
    )
    .expect("write pipeline");
    let out = stpm(&["run", "--pipeline", path(&hostile)], dir.path());
    let log = text(&out);
    assert!(!log.contains("panicked"), "{log}");
    for camera in ["noise", "nothing"] {
        assert!(
            log.contains(&format!("[{camera}] source failed")),
            "{camera}: {log}"
        );
    }
    assert!(
        log.contains("[huge] source failed: frames of 7700×4400 are larger than the 7680×4320"),
        "{log}"
    );
    assert!(log.contains("camera huge: 0 frames"), "{log}");
    // The cut recording's first frames decode and are analysed.
    let analysed = log
        .lines()
        .find_map(|line| line.strip_prefix("camera cut: "))
        .and_then(|rest| rest.split(" frames").next())
        .and_then(|n| n.trim().parse::<u32>().ok())
        .expect("the cut camera's summary");
    assert!((1..24).contains(&analysed), "{analysed} frames: {log}");
}

/// An RTSP client that decodes until `stop` is set: the arrival time of every decoded frame and
/// whether the stream ended or failed on the way (a reconnect would be one).
fn watch_until(url: &str, stop: &std::sync::atomic::AtomicBool) -> (Vec<Instant>, Option<String>) {
    let (pipeline, sink) = common::appsink_pipeline(&format!(
        "rtspsrc location={url} protocols=tcp latency=0 ! rtph264depay ! avdec_h264 ! \
         videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    ));
    pipeline.set_state(gst::State::Playing).expect("play");
    let bus = pipeline.bus().expect("bus");
    let mut arrivals = Vec::new();
    let mut broken = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && broken.is_none() {
        if sink
            .try_pull_sample(gst::ClockTime::from_mseconds(100))
            .is_some()
        {
            arrivals.push(Instant::now());
        }
        while let Some(message) = bus.pop() {
            match message.view() {
                gst::MessageView::Eos(_) => broken = Some("end of stream".to_string()),
                gst::MessageView::Error(e) => broken = Some(e.error().to_string()),
                _ => {}
            }
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
    (arrivals, broken)
}

/// The loop of training on the line: frames collected from the running camera, a model trained
/// on them by `POST /api/train` and swapped in when done; broken bundles refused with the live
/// model running; another swapped in with `POST /api/model` while an RTSP client decodes (no gap
/// over 1 s, no reconnect), events after the swap naming it; `[model] watch` swapping in new
/// thresholds written into the live bundle.
#[test]
fn a_model_trained_from_the_running_pipeline_is_swapped_in_while_a_client_watches() {
    let dir = tempfile::tempdir().expect("dir");
    let (http, rtsp) = (free_port(), free_port());
    // The first model never alerts; the new one always does.
    let first = common::recalibrated_bundle(bundle(), &dir.path().join("first"), "1e9", "0.0");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\nwatch = true\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?fps=15\"\n\n\
             [storage]\npath = \"{}\"\n\n\
             [http]\nenabled = true\nbind = \"127.0.0.1:{http}\"\n\n\
             [output.rtsp]\nenabled = true\nport = {rtsp}\n",
            path(&first),
            path(&dir.path().join("data"))
        ),
    )
    .expect("write pipeline");
    let log = dir.path().join("stpm.log");
    let mut run = common::KillOnDrop(common::spawn_run(&pipeline, &log, dir.path()));
    common::wait_for_port(http, "HTTP");
    common::wait_for_port(rtsp, "RTSP");
    let ask = |method: &str, target: &str, body: &str| {
        common::http_request(http, method, target, body).expect("an answer")
    };
    let json = |body: &str| -> serde_json::Value { serde_json::from_str(body).expect("JSON") };
    let live_id = || json(&ask("GET", "/api/model", "").1)["id"].to_string();
    let first_id = live_id();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = std::sync::Arc::clone(&stop);
        let url = format!("rtsp://127.0.0.1:{rtsp}/line1");
        std::thread::spawn(move || watch_until(&url, &stop))
    };

    // Collect, then train on what was collected.
    let (status, body) = ask(
        "POST",
        "/api/cameras/line1/collect",
        r#"{"frames": 16, "every": 0.1}"#,
    );
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while json(&ask("GET", "/api/cameras/line1/collect", "").1)["done"] != true {
        assert!(Instant::now() < deadline, "the collection did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Training from the running pipeline: a child process, its progress in the API, its bundle
    // swapped in when done.
    let trained = dir.path().join("trained");
    // Refused before anything starts: a camera that is not ours (it would name the output
    // folder, `../` included), and epochs or steps out of their bounds.
    let collected = dir.path().join("data/collect/line1");
    for (request, says) in [
        (
            format!(r#"{{"camera": "../../x", "data": "{}"}}"#, path(&collected)),
            "no camera ../../x",
        ),
        (
            r#"{"camera": "line1", "epochs": 0}"#.to_string(),
            "epochs must be 1 to",
        ),
        (
            r#"{"camera": "line1", "max_steps": 1000000000}"#.to_string(),
            "max_steps must be 1 to",
        ),
    ] {
        let (status, body) = ask("POST", "/api/train", &request);
        assert_eq!(status, 400, "{request}: {body}");
        assert!(body.contains(says), "{request}: {body}");
    }
    let (status, body) = ask(
        "POST",
        "/api/train",
        &format!(
            r#"{{"camera": "line1", "out": "{}", "epochs": 1, "int8": true}}"#,
            path(&trained)
        ),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(ask("POST", "/api/train", r#"{"camera": "line1"}"#).0, 409);
    let deadline = Instant::now() + Duration::from_secs(180);
    let training = loop {
        let status = json(&ask("GET", "/api/train", "").1);
        if status["state"] != "running" && status["state"] != "swapping" {
            break status;
        }
        assert!(Instant::now() < deadline, "training did not end: {status}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(training["state"], "done", "{training}");
    assert_eq!(training["progress"]["epochs"], 1, "{training}");
    assert!(
        training["progress"]["steps"].as_u64() > Some(0),
        "{training}"
    );
    // Its INT8 graph was written before the swap, and runs on the CPU.
    assert_eq!(training["model"]["precision"], "int8", "{training}");
    let trained_id = training["model"]["id"].to_string();
    assert_eq!(live_id(), trained_id, "{training}");
    assert_ne!(trained_id, first_id);
    let new = common::recalibrated_bundle(&trained, &dir.path().join("new"), "0.0", "-1.0");

    // Broken bundles are refused and the first model keeps running.
    let bad_hash = common::recalibrated_bundle(&new, &dir.path().join("bad-hash"), "0.0", "-1.0");
    let mut graph = std::fs::read(bad_hash.join("model.onnx")).expect("graph");
    graph.push(0);
    std::fs::write(bad_hash.join("model.onnx"), graph).expect("graph");
    let resized = common::recalibrated_bundle(&new, &dir.path().join("resized"), "0.0", "-1.0");
    let manifest = std::fs::read_to_string(resized.join("stpm.toml")).expect("manifest");
    std::fs::write(
        resized.join("stpm.toml"),
        manifest.replace(
            "input_size = [\n    64,\n    64,\n]",
            "input_size = [\n    128,\n    128,\n]",
        ),
    )
    .expect("manifest");
    for (bundle, why) in [
        (&bad_hash, "does not match its manifest"),
        (&resized, "input size"),
        (&dir.path().join("nowhere"), "no such bundle folder"),
    ] {
        let (status, body) = ask(
            "POST",
            "/api/model",
            &format!(r#"{{"bundle": "{}"}}"#, path(bundle)),
        );
        assert_eq!(status, 422, "{}: {body}", bundle.display());
        assert!(body.contains(why), "{}: {body}", bundle.display());
    }
    assert_eq!(ask("POST", "/api/model", "{\"bundel\": 1}").0, 400);
    assert_eq!(live_id(), trained_id, "a refused bundle changed the model");

    // The swap.
    let swapped_at = Instant::now();
    let (status, body) = ask(
        "POST",
        "/api/model",
        &format!(r#"{{"bundle": "{}"}}"#, path(&new)),
    );
    let answered = swapped_at.elapsed();
    assert_eq!(status, 200, "{body}");
    let new_id = json(&body)["model"]["id"].to_string();
    assert_ne!(new_id, trained_id);
    assert_eq!(live_id(), new_id);
    let cameras = json(&ask("GET", "/api/cameras", "").1);
    assert_eq!(cameras["cameras"][0]["model"].to_string(), new_id);
    std::thread::sleep(Duration::from_secs(3));

    // New thresholds written into the live bundle are picked up by `[model] watch`.
    let manifest = std::fs::read_to_string(new.join("stpm.toml")).expect("manifest");
    std::fs::write(
        new.join("stpm.toml"),
        manifest.replace("floor = -1.0", "floor = -2.0"),
    )
    .expect("manifest");
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_id() == new_id {
        assert!(Instant::now() < deadline, "model.watch did not swap");
        std::thread::sleep(Duration::from_millis(200));
    }
    let watched_id = live_id();
    let metrics = ask("GET", "/metrics", "").1;

    // A copy that writes the manifest before the graph: refused while the graph does not match
    // it, swapped in once the graph arrives (before, only a new manifest was tried again).
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("not swapped in")
            .count()
    };
    let refused_before = refusals();
    let graph = std::fs::read(new.join("model.onnx")).expect("graph");
    std::fs::write(new.join("model.onnx"), [graph.as_slice(), &[0]].concat()).expect("graph");
    let manifest = std::fs::read_to_string(new.join("stpm.toml")).expect("manifest");
    std::fs::write(
        new.join("stpm.toml"),
        manifest.replace("floor = -2.0", "floor = -3.0"),
    )
    .expect("manifest");
    let deadline = Instant::now() + Duration::from_secs(20);
    while refusals() == refused_before {
        assert!(
            Instant::now() < deadline,
            "model.watch did not refuse the copy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(live_id(), watched_id, "a half-copied bundle was swapped in");
    std::fs::write(new.join("model.onnx"), &graph).expect("graph");
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_id() == watched_id {
        assert!(
            Instant::now() < deadline,
            "model.watch did not retry the completed copy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let copied_id = live_id();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (arrivals, broken) = client.join().expect("client");
    common::sigterm(&run.0);
    let status = run.0.wait().expect("wait");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{log_text}");

    assert_eq!(broken, None, "the RTSP client's stream broke: {log_text}");
    let after = arrivals
        .iter()
        .filter(|&&t| t > swapped_at + answered)
        .count();
    assert!(after >= 15, "{after} frames after the swap");
    let gap = arrivals
        .windows(2)
        .filter(|pair| pair[1] > swapped_at)
        .map(|pair| pair[1] - pair[0])
        .max()
        .expect("frames");
    eprintln!("swap answered in {answered:?}; longest frame gap after it {gap:?}");
    assert!(
        gap < Duration::from_secs(1),
        "the client waited {gap:?} for a frame around the swap"
    );
    // Alerts name the model that scored their frame: the first never alerts, the trained one
    // may (its threshold is that of good frames), the last three always do.
    let alerts: Vec<serde_json::Value> = log_text
        .lines()
        .filter_map(|line| line.strip_prefix("alert "))
        .map(json)
        .collect();
    let models: Vec<String> = alerts.iter().map(|a| a["model"].to_string()).collect();
    assert!(
        models
            .iter()
            .all(|m| [&trained_id, &new_id, &watched_id, &copied_id].contains(&m)),
        "{models:?}: {log_text}"
    );
    assert!(
        models
            .iter()
            .any(|m| [&new_id, &watched_id, &copied_id].contains(&m)),
        "no alert from the swapped-in models: {log_text}"
    );
    let id = watched_id.trim_matches('"');
    assert!(
        metrics.contains(&format!("stpm_model_info{{id=\"{id}\",bundle=\"new\"}} 1")),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "stpm_model_swaps_total"), Some(3.0));
}
