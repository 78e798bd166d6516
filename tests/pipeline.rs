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
    // Which decoder ran (no NVIDIA GPU here: the CPU's).
    assert!(
        log.contains("[line1] decoding with ") && log.contains(" (CPU)"),
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

/// SIGKILL mid-recording (no EOS, no index written): the Matroska file still decodes, up to
/// shortly before the kill.
#[test]
fn a_recording_killed_mid_run_decodes_up_to_the_kill() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_pipeline(dir.path(), "source = \"test://conveyor?fps=20\"", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stpm"))
        .args(["run", "--pipeline", path(&pipeline)])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    let recorded = loop {
        let size = std::fs::read_dir(dir.path().join("rec"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok()?.metadata().ok())
            .map_or(0, |m| m.len());
        if size > 0 {
            break Instant::now();
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("no recording started");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(4));
    child.kill().expect("SIGKILL");
    let seconds = recorded.elapsed().as_secs_f64();
    child.wait().expect("wait");
    let (frames, w, h) = decode(&recording(dir.path()));
    // 20 frames/s for about `seconds`; what the muxer and the file had not written yet is lost
    // (up to about a second), the rest decodes.
    let expected = (seconds * 20.0) as usize;
    println!("{frames} frames decoded of about {expected} recorded");
    assert!((w, h) == (640, 480), "{w}x{h}");
    assert!(
        frames + 25 >= expected,
        "{frames} frames decoded of about {expected} recorded before SIGKILL"
    );
}

/// Encodes `frames` test frames of `width`×`height` as H.264 in MPEG-TS to `path` (runs to EOS).
fn write_ts(path: &Path, width: u32, height: u32, frames: u32) {
    gst::init().expect("gst");
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! \
         video/x-raw,width={width},height={height},framerate=15/1 ! x264enc key-int-max=15 ! \
         h264parse ! mpegtsmux ! filesink location={}",
        path.display()
    ))
    .expect("encoder pipeline");
    pipeline.set_state(gst::State::Playing).expect("play");
    let bus = pipeline.bus().expect("bus");
    let message = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("EOS within 60 s");
    assert!(
        matches!(message.view(), gst::MessageView::Eos(_)),
        "{message:?}"
    );
    let _ = pipeline.set_state(gst::State::Null);
}

/// A camera whose frames change size mid-stream (MPEG-TS can be concatenated: 30 frames of
/// 640×480, then 30 of 320×240): the recording starts a new file at the new size and drops
/// nothing.
#[test]
fn a_resolution_change_starts_a_new_recording_file() {
    let dir = tempfile::tempdir().expect("dir");
    let (large, small) = (dir.path().join("a.ts"), dir.path().join("b.ts"));
    write_ts(&large, 640, 480, 30);
    write_ts(&small, 320, 240, 30);
    let mut joined = std::fs::read(&large).expect("read");
    joined.extend(std::fs::read(&small).expect("read"));
    let video = dir.path().join("camera.ts");
    std::fs::write(&video, joined).expect("write");
    let pipeline = write_pipeline(
        dir.path(),
        &format!("source = \"file://{}\"\nrealtime = false", video.display()),
        "",
    );
    let out = stpm(&["run", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path().join("rec"))
        .expect("recordings")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort_by_key(|p| p.to_string_lossy().len());
    assert_eq!(files.len(), 2, "{files:?}: {log}");
    assert!(files[1].to_string_lossy().ends_with("-r1.mkv"), "{files:?}");
    assert_eq!(decode(&files[0]), (30, 640, 480), "{log}");
    assert_eq!(decode(&files[1]), (30, 320, 240), "{log}");
}

/// `stpm collect` on the generated conveyor, screened by a model that finds its defects: 60
/// decodable frames in `train/good`, none of them showing a defect by the generator's labels,
/// each listed in `collect.json`.
#[test]
fn collect_saves_good_frames_only() {
    const FPS: f64 = 15.0;
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = dir.path().join("collect.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n\
             [[camera]]\nname = \"line1\"\nsource = \"test://conveyor?frames=1500&fps={FPS}\"\n\
             realtime = false\n",
            path(common::detecting_conveyor_bundle())
        ),
    )
    .expect("pipeline");
    let out = dir.path().join("line1-good");
    let run = stpm(
        &[
            "collect",
            "--pipeline",
            path(&pipeline),
            "--camera",
            "line1",
            "--out",
            path(&out),
            "--frames",
            "60",
            "--every",
            "0.2",
        ],
        dir.path(),
    );
    let log = text(&run);
    assert!(run.status.success(), "{log}");
    let (width, height) = stpm::pipeline::conveyor::CONVEYOR_SIZE;
    let mut conveyor = stpm::pipeline::conveyor::Conveyor::new(width, height, 1);
    let listed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("collect.json")).expect("collect.json"))
            .expect("JSON");
    let saved = listed["runs"][0]["saved"].as_array().expect("saved frames");
    assert_eq!(saved.len(), 60, "{log}");
    for frame in saved {
        let file = out.join(frame["file"].as_str().expect("file"));
        let image = image::open(&file).expect("a decodable PNG");
        assert_eq!(
            (image.width(), image.height()),
            (width as u32, height as u32)
        );
        let seconds = frame["stream_seconds"].as_f64().expect("time");
        let index = (seconds * FPS).round() as u64;
        assert!(
            conveyor.frame(index).defect.is_none(),
            "frame {index} ({}) shows a defect: {log}",
            file.display()
        );
    }
    let files = std::fs::read_dir(out.join("train/good"))
        .expect("folder")
        .count();
    assert_eq!(files, 60);
    // The stretch of belt it collected from had defects to leave out.
    let indices: Vec<u64> = saved
        .iter()
        .filter_map(|f| f["stream_seconds"].as_f64())
        .map(|s| (s * FPS).round() as u64)
        .collect();
    let (first, last) = (indices[0], indices[indices.len() - 1]);
    let defective = (first..=last)
        .filter(|&i| conveyor.frame(i).defect.is_some())
        .count();
    assert!(
        defective > 0,
        "frames {first}..={last} show no defect at all"
    );
    let screened = listed["runs"][0]["near_anomalies"].as_u64().unwrap_or(0);
    assert!(screened > 0, "no frame was screened out: {log}");
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

/// Random model inputs of the tiny bundle's size.
fn noise_inputs(count: usize, len: usize) -> Vec<Vec<f32>> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..count)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 2001) as f32 / 1000.0 - 1.0
                })
                .collect()
        })
        .collect()
}

fn tiny_engine() -> (stpm::engine::Engine, usize) {
    let bundle = stpm::bundle::Bundle::open(common::tiny_conveyor_bundle()).expect("bundle");
    let [h, w] = bundle.manifest.model.input_size;
    let engine = stpm::engine::Engine::for_bundle(&bundle, stpm::engine::EngineOptions::default())
        .expect("cpu session");
    (engine, 3 * h * w)
}

/// `callers` threads each score one random input on a session of `max_batch`, beside `idle`
/// cameras waiting for their next frame (every call padded to one image per camera when `padded`,
/// as on a GPU); every outcome must be its own input's batch-1 result. Returns the batch sizes and
/// the images each call ran.
fn score_at_once(
    callers: usize,
    max_batch: usize,
    padded: bool,
    idle: usize,
) -> Vec<(usize, usize)> {
    use stpm::engine::batch::{Input, SharedSession};
    let (mut engine, len) = tiny_engine();
    let inputs = noise_inputs(callers, len);
    let alone: Vec<_> = inputs
        .iter()
        .map(|input| engine.run(input, 1).expect("one image"))
        .collect();
    let session = SharedSession::new(engine, max_batch, Duration::from_secs(1)).padded(padded);
    let participants: Vec<_> = (0..callers).map(|_| session.join()).collect();
    let waiting: Vec<_> = (0..idle).map(|_| session.join()).collect();
    for camera in &waiting {
        camera.waiting_for_frame(true);
    }
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = participants
            .iter()
            .zip(&inputs)
            .map(|(participant, input)| {
                scope.spawn(move || participant.score(Input::Host(input.clone())))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("caller"))
            .collect()
    });
    let mut batches = Vec::new();
    for ((outcome, expected), input) in outcomes.into_iter().zip(&alone).zip(&inputs) {
        batches.push((outcome.batch, outcome.images));
        let scores = outcome.scores.expect("scores");
        let (diff, scale) = common::max_abs_diff(&scores.maps, &expected.maps);
        assert!(diff <= 1e-4 * scale, "map differs by {diff} (max {scale})");
        assert_eq!(scores.scores.len(), 1);
        assert!((scores.scores[0] - expected.scores[0]).abs() <= 1e-4 * scale);
        // The caller's buffer comes back for its next frame.
        assert_eq!(outcome.input.into_host().as_ref(), Some(input));
    }
    batches
}

#[test]
fn a_shared_session_runs_the_cameras_frames_in_one_call_and_hands_each_its_own() {
    // Three callers with a frame in hand: the leader waits for all three (well inside its 1 s).
    let started = Instant::now();
    assert_eq!(score_at_once(3, 3, false, 0), [(3, 3); 3]);
    assert!(started.elapsed() < Duration::from_secs(10));
    // More frames than a batch holds: batches of at most two, every frame its own result.
    let batches = score_at_once(5, 2, false, 0);
    assert!(
        batches
            .iter()
            .all(|&(b, images)| (1..=2).contains(&b) && images == b),
        "{batches:?}"
    );
    assert!(batches.iter().any(|&(b, _)| b == 2), "{batches:?}");
}

#[test]
fn a_padded_session_keeps_one_call_size_and_drops_the_padding() {
    // As on CUDA: a call holds one image per camera on the session, up to the batch,
    // whoever has a frame: three frames in a call of four (a fourth camera between frames), one
    // alone in a call of two (of three cameras, batch 2); each caller gets its own image's
    // result, none the padding's.
    assert_eq!(score_at_once(3, 4, true, 1), [(3, 4); 3]);
    assert_eq!(score_at_once(1, 2, true, 2), [(1, 2)]);
    assert_eq!(score_at_once(2, 8, true, 0), [(2, 2); 2]);
}

#[test]
fn a_leader_does_not_wait_for_cameras_without_a_frame() {
    use stpm::engine::batch::{Input, SharedSession};
    let (engine, len) = tiny_engine();
    let input = noise_inputs(1, len).remove(0);
    let session = SharedSession::new(engine, 4, Duration::from_secs(1));
    let present = session.join();
    let between_frames = session.join();
    let gone = session.join();
    // One camera waits for its next frame, one has left (after the leader began to wait for it).
    between_frames.waiting_for_frame(true);
    let started = Instant::now();
    let outcome = std::thread::scope(|scope| {
        let caller = scope.spawn(|| present.score(Input::Host(input.clone())));
        std::thread::sleep(Duration::from_millis(100));
        drop(gone);
        caller.join().expect("caller")
    });
    assert!(outcome.scores.is_ok());
    assert_eq!(outcome.batch, 1);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the leader waited {:?} for cameras without a frame",
        started.elapsed()
    );
    // A camera with a frame in hand is waited for, up to the session's wait.
    between_frames.waiting_for_frame(false);
    let started = Instant::now();
    let outcome = present.score(Input::Host(input));
    assert_eq!(outcome.batch, 1);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// On the H200 `batch_wait_ms = 0` cost about a second per call (the 1 s cap on a batch's wait).
/// The host side of the batching does not: four cameras that keep their frames coming, batches of
/// up to 4, no wait. Every call returns long before the cap, with its own result.
#[test]
fn a_wait_of_zero_never_holds_a_batch_back() {
    use stpm::engine::batch::{Input, SharedSession};
    let (engine, len) = tiny_engine();
    let inputs = noise_inputs(4, len);
    let session = SharedSession::new(engine, 4, Duration::ZERO);
    let cameras: Vec<_> = (0..4).map(|_| session.join()).collect();
    let calls: Vec<(Duration, usize, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cameras
            .iter()
            .zip(&inputs)
            .map(|(camera, input)| {
                scope.spawn(move || {
                    (0..8)
                        .map(|_| {
                            let started = Instant::now();
                            let outcome = camera.score(Input::Host(input.clone()));
                            let map = outcome.scores.expect("scored").maps.len();
                            (started.elapsed(), outcome.batch, map)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("camera"))
            .collect()
    });
    assert_eq!(calls.len(), 32);
    let map_len = calls[0].2;
    assert!(
        calls
            .iter()
            .all(|&(_, batch, map)| (1..=4).contains(&batch) && map == map_len)
    );
    let slowest = calls.iter().map(|c| c.0).max().unwrap_or_default();
    assert!(
        slowest < Duration::from_millis(500),
        "a call with batch_wait_ms = 0 took {slowest:?}"
    );
}

#[test]
fn two_cameras_on_one_session_are_batched() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("p.toml");
    let camera = |name: &str, seed: u32| {
        format!(
            "[[camera]]\nname = \"{name}\"\nsource = \"test://conveyor?frames=48&fps=12&seed={seed}\"\n\
             realtime = false\n"
        )
    };
    std::fs::write(
        &file,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\nsessions = 1\nbatch = 2\nbatch_wait_ms = 500\n\n{}\n{}",
            path(common::tiny_conveyor_bundle()),
            camera("line1", 1),
            camera("line2", 2)
        ),
    )
    .expect("write pipeline");
    let out = stpm(&["run", "--pipeline", path(&file)], dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("batches of up to 2 frames across cameras"),
        "{log}"
    );
    let batched: Vec<u64> = ["line1", "line2"]
        .iter()
        .map(|name| {
            let line = log
                .lines()
                .find(|l| l.starts_with(&format!("camera {name}: 48 frames, 48 analysed")))
                .unwrap_or_else(|| panic!("no summary of {name} in {log}"));
            line.split(", ")
                .find_map(|part| part.strip_suffix(" in batches with other cameras' frames"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{name} had no frames in batches: {line}"))
        })
        .collect();
    // Frames are batched only when both cameras have one in hand (how often depends on timing:
    // 23-65 % here), and every batch of two holds one frame of each camera.
    assert!(batched[0] >= 1, "{batched:?}");
    assert_eq!(batched[0], batched[1], "{log}");
}

/// `deploy/stpm.service`: its `ExecStart` runs a pipeline (with the repository's binary and a test
/// pipeline in place of the installed paths), and `systemd-analyze verify` accepts the unit.
#[test]
fn the_systemd_unit_runs_the_pipeline_it_names() {
    let unit = std::fs::read_to_string(common::repo("deploy/stpm.service")).expect("unit file");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let installed_binary = "/opt/stpm-stream/target/release/stpm";
    let installed_pipeline = "/etc/stpm/pipeline.toml";
    assert!(
        exec.starts_with(installed_binary) && exec.contains(installed_pipeline),
        "{exec}"
    );
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_pipeline(
        dir.path(),
        "source = \"test://conveyor?frames=12&fps=12\"\nrealtime = false",
        "",
    );
    let mut args = exec.split_whitespace();
    assert_eq!(args.next(), Some(installed_binary));
    let args: Vec<&str> = args
        .map(|a| {
            if a == installed_pipeline {
                path(&pipeline)
            } else {
                a
            }
        })
        .collect();
    let out = stpm(&args, dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("camera line1: 12 frames, 12 analysed"),
        "{log}"
    );

    let Ok(analyse) = which("systemd-analyze") else {
        println!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    };
    let local = dir.path().join("stpm.service");
    std::fs::write(
        &local,
        unit.replace(installed_binary, env!("CARGO_BIN_EXE_stpm"))
            .replace("/opt/stpm-stream", path(dir.path())),
    )
    .expect("write unit");
    let verify = Command::new(analyse)
        .arg("verify")
        .arg(&local)
        .output()
        .expect("systemd-analyze");
    let said = text(&verify);
    assert!(verify.status.success(), "{said}");
    // Unknown keys and bad values are only warnings for systemd; here they are failures.
    assert!(!said.contains("stpm.service"), "{said}");
}

/// The first `name` on PATH.
fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .ok_or(())
}

/// `stpm run --shard i/n`: two processes on one pipeline file at once take disjoint cameras that
/// together are all of the file's; a shard without a camera is refused by name.
#[test]
fn two_shards_of_one_file_split_its_cameras() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("p.toml");
    let cameras: String = ["line1", "line2", "line3"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                "[[camera]]\nname = \"{name}\"\nsource = \"test://conveyor?frames=12&fps=12&seed={}\"\n\
                 realtime = false\n\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(
        &file,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\nsessions = 1\n\n{cameras}",
            path(common::tiny_conveyor_bundle())
        ),
    )
    .expect("write pipeline");
    let shards: Vec<_> = ["0/2", "1/2"]
        .iter()
        .map(|shard| {
            let own = dir.path().join(shard.replace('/', "-of-"));
            std::fs::create_dir(&own).expect("shard dir");
            Command::new(env!("CARGO_BIN_EXE_stpm"))
                .args(["run", "--pipeline", path(&file), "--shard", shard])
                .current_dir(&own)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn stpm run")
        })
        .collect();
    let mut owners: Vec<Vec<String>> = Vec::new();
    for child in shards {
        let out = child.wait_with_output().expect("wait");
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        let mine: Vec<String> = log
            .lines()
            .filter_map(|l| l.strip_prefix("camera "))
            .filter(|l| l.contains(": 12 frames, 12 analysed"))
            .filter_map(|l| l.split(':').next().map(str::to_owned))
            .collect();
        owners.push(mine);
    }
    assert_eq!(owners[0], ["line1", "line3"], "{owners:?}");
    assert_eq!(owners[1], ["line2"], "{owners:?}");

    let out = stpm(
        &["run", "--pipeline", path(&file), "--shard", "3/4"],
        dir.path(),
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("--shard 3/4 has no camera: the pipeline has 3"),
        "{log}"
    );
    let out = stpm(
        &["run", "--pipeline", path(&file), "--shard", "2/2"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("INDEX must be below COUNT"),
        "{}",
        text(&out)
    );
}

/// `stpm demo` with a pipeline whose bundle exists runs it without training; `--frames` belongs
/// to the embedded pipeline only.
#[test]
fn demo_runs_a_pipeline_whose_model_exists_without_training() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = write_pipeline(
        dir.path(),
        "source = \"test://conveyor?frames=12&fps=12\"\nrealtime = false",
        "",
    );
    let out = stpm(&["demo", "--pipeline", path(&pipeline)], dir.path());
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("(--retrain trains it again)"), "{log}");
    assert!(!log.contains("training the demo model"), "{log}");
    assert!(
        log.contains("camera line1: 12 frames, 12 analysed"),
        "{log}"
    );
    let out = stpm(
        &["demo", "--pipeline", path(&pipeline), "--frames", "5"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("--frames applies to the embedded demo pipeline"));
}
