//! `stpm run` end to end with real GStreamer: the generated conveyor and a real H.264 file through
//! a tiny trained bundle, Matroska recordings decoded back frame by frame, SIGTERM handling and
//! config errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;

use common::{
    decode_mkv as decode, output_text as text, path_str as path, stpm_in as stpm,
    write_recording_pipeline as write_pipeline,
};

fn recording(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir.join("rec"))
        .expect("recordings folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "mkv"))
        .expect("one .mkv recording")
}

#[test]
fn conveyor_frames_are_all_analysed_and_recorded() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_pipeline(
        dir.path(),
        "source = \"test://conveyor?frames=24&fps=12\"\nrealtime = false",
        "",
    );
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("camera line1: 24 frames, 24 analysed, 0 dropped"),
        "{log}"
    );
    assert!(log.contains("provider cpu"), "{log}");
    // The start line names the threshold of the bundle's manifest and where it came from.
    let manifest: toml::Table = toml::from_str(
        &std::fs::read_to_string(common::tiny_conveyor_bundle().join("stpm.toml"))
            .expect("manifest"),
    )
    .expect("toml");
    let calibration = &manifest["calibration"];
    let expected = format!(
        "threshold: raw {:.4} = 0.5 normalised ({}, {} images)",
        calibration["threshold"].as_float().expect("threshold"),
        calibration["method"].as_str().expect("method"),
        calibration["n_images"].as_integer().expect("n_images")
    );
    assert!(log.contains(&expected), "{expected} not in {log}");
    assert_eq!(decode(&recording(dir.path())), (24, 640, 480));
}

#[test]
fn file_source_runs_to_the_end_and_max_fps_passes_frames_through() {
    let dir = tempfile::tempdir().expect("dir");
    let video = dir.path().join("in.mkv");
    gst::init().expect("gst init");
    let writer = gst::parse::launch(&format!(
        "videotestsrc num-buffers=30 pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1 ! \
         x264enc ! h264parse ! matroskamux ! filesink location={}",
        path(&video)
    ))
    .expect("writer");
    writer.set_state(gst::State::Playing).expect("play");
    let bus = writer.bus().expect("bus");
    let eos = bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(30),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    assert!(
        matches!(
            eos.as_ref().map(|m| m.view()),
            Some(gst::MessageView::Eos(_))
        ),
        "test video not written"
    );
    let _ = writer.set_state(gst::State::Null);

    // 10 fps stream, analysis capped at 5/s: every second frame goes through the engine.
    let camera = format!(
        "source = \"file://{}\"\nrealtime = false\nmax_fps = 5",
        path(&video)
    );
    let pipeline = write_pipeline(dir.path(), &camera, "");
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("camera line1: 30 frames, 15 analysed"),
        "{log}"
    );
    assert_eq!(decode(&recording(dir.path())), (30, 320, 240));
}

#[test]
fn sigterm_finishes_the_recording_and_exits_zero() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_pipeline(dir.path(), "source = \"test://conveyor?fps=20\"", "");
    let child = Command::new(env!("CARGO_BIN_EXE_stpm"))
        .args(["run", "--pipeline", path(&pipeline)])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the recording has started, then let it run a little.
    let started = Instant::now();
    while !dir.path().join("rec").is_dir()
        || std::fs::read_dir(dir.path().join("rec")).map_or(0, |d| d.count()) == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no recording started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    common::sigterm(&child);
    let stopped = Instant::now();
    let out = child.wait_with_output().expect("wait");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "took {:?}",
        stopped.elapsed()
    );
    let (frames, w, h) = decode(&recording(dir.path()));
    assert!(
        frames > 0 && (w, h) == (640, 480),
        "{frames} {w}x{h}: {log}"
    );
}

#[test]
fn pipeline_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_pipeline(
        dir.path(),
        "source = \"file:///no/such/video.mkv\"",
        "[output.rtsp]\nenabled = true\nbind = \"camera-host\"\n",
    );
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(!out.status.success());
    assert!(log.contains("camera[0].source"), "{log}");
    assert!(log.contains("output.rtsp.bind = `camera-host`"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // A valid file asking for a GPU provider this build lacks fails loudly instead of using the CPU.
    let pipeline = write_pipeline(dir.path(), "source = \"test://conveyor?frames=1\"", "");
    let out = stpm(
        &[
            "run",
            "--pipeline",
            path(&pipeline),
            "--set",
            "model.provider=tensorrt",
        ],
        dir.path(),
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("`tensorrt` is not available"), "{log}");
}
