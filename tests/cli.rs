//! The `stpm` binary end to end: generated data → train → eval → infer, and the errors a user meets.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn stpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stpm"))
        .args(args)
        .output()
        .expect("run stpm")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `stpm` and insists on success; returns stdout and stderr together.
fn stpm_ok(args: &[&str]) -> String {
    let out = stpm(args);
    assert!(
        out.status.success(),
        "stpm {args:?} failed:\n{}",
        text(&out)
    );
    text(&out)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// One line of `stpm eval`'s scores.csv.
struct ScoreRow {
    kind: String,
    image: String,
    raw: f32,
    score: f32,
    alert: bool,
}

fn scores_csv(text: &str) -> Vec<ScoreRow> {
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("defect_type,image,raw_score,score,alert"),
        "{text}"
    );
    lines
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 5, "{line}");
            ScoreRow {
                kind: f[0].to_string(),
                image: f[1].to_string(),
                raw: f[2].parse().expect("raw"),
                score: f[3].parse().expect("score"),
                alert: match f[4] {
                    "1" => true,
                    "0" => false,
                    other => panic!("alert {other}"),
                },
            }
        })
        .collect()
}

#[test]
fn devset_train_eval_infer_round_trip() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let bundle = dir.path().join("bundle");
    let report = dir.path().join("report");
    let overlays = dir.path().join("overlays");

    stpm_ok(&[
        "devset",
        "--out",
        path(&data),
        "--size",
        "64",
        "--train",
        "10",
        "--test-good",
        "4",
        "--test-per-defect",
        "3",
        "--seed",
        "5",
    ]);

    let out = stpm_ok(&[
        "train",
        "--data",
        path(&data),
        "--out",
        path(&bundle),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--quiet",
    ]);
    assert!(out.contains("8 train / 2 held-out images"), "{out}");
    for file in ["model.onnx", "stpm.toml", "student.safetensors"] {
        assert!(bundle.join(file).is_file(), "{file} missing");
    }

    // One mask at twice the image size: pixel metrics and saved maps follow the mask.
    let big_mask = data.join("ground_truth/stain/001_mask.png");
    image::open(&big_mask)
        .expect("mask")
        .resize_exact(128, 128, image::imageops::FilterType::Nearest)
        .save(&big_mask)
        .expect("save mask");
    let out = stpm_ok(&[
        "eval",
        "--model",
        path(&bundle),
        "--data",
        path(&data),
        "--out",
        path(&report),
        "--save-maps",
        "--quiet",
    ]);
    assert!(out.contains("AUPRO@0.3"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).expect("report"))
            .expect("json");
    assert_eq!(json["n_good"], 4);
    assert_eq!(json["n_defect"], 6);
    for key in ["image_auroc", "pixel_auroc", "aupro", "f1_max"] {
        let value = json[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&value), "{key} = {value}");
    }
    for defect in ["scratch", "stain"] {
        assert_eq!(json["per_defect_type"][defect]["n"], 3, "{defect}");
        let aupro = json["per_defect_type"][defect]["aupro"]
            .as_f64()
            .unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&aupro), "{defect} aupro = {aupro}");
    }
    assert!(json["threshold"].as_f64().unwrap_or(0.0) > 0.0);
    let csv = std::fs::read_to_string(report.join("scores.csv")).expect("scores.csv");
    let rows = scores_csv(&csv);
    assert_eq!(rows.len(), 10, "{csv}");
    let threshold = json["threshold"].as_f64().expect("threshold") as f32;
    for row in &rows {
        assert_eq!(row.alert, row.raw >= threshold, "{csv}");
        assert!((0.0..=1.0).contains(&row.score), "{csv}");
    }
    let alerts = |of: &dyn Fn(&str) -> bool| rows.iter().filter(|r| of(&r.kind) && r.alert).count();
    assert_eq!(
        json["at_threshold"]["good_flagged"],
        alerts(&|k| k == "good"),
        "{csv}"
    );
    assert_eq!(
        json["at_threshold"]["defects_caught"],
        alerts(&|k| k != "good"),
        "{csv}"
    );
    assert_eq!(json["at_threshold"]["good"], 4);
    assert_eq!(json["at_threshold"]["defects"], 6);
    for defect in ["scratch", "stain"] {
        assert_eq!(
            json["per_defect_type"][defect]["caught"],
            alerts(&|k| k == defect),
            "{defect}: {csv}"
        );
    }
    assert!(out.contains("at the bundle's threshold"), "{out}");

    // A threshold among the test scores splits them: the counts follow the raw scores above.
    let mut raws: Vec<f32> = rows.iter().map(|r| r.raw).collect();
    raws.sort_by(f32::total_cmp);
    let middle = raws[raws.len() / 2];
    let manifest_path = bundle.join("stpm.toml");
    let manifest = std::fs::read_to_string(&manifest_path).expect("manifest");
    let (head, calibration) = manifest.split_once("[calibration]").expect("calibration");
    let line = calibration
        .lines()
        .find(|l| l.starts_with("threshold = "))
        .expect("threshold line");
    let moved = calibration.replacen(line, &format!("threshold = {middle}"), 1);
    std::fs::write(&manifest_path, format!("{head}[calibration]{moved}")).expect("write manifest");
    let split_report = dir.path().join("split_report");
    stpm_ok(&[
        "eval",
        "--model",
        path(&bundle),
        "--data",
        path(&data),
        "--out",
        path(&split_report),
        "--quiet",
    ]);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(split_report.join("report.json")).expect("report"),
    )
    .expect("json");
    let expect = |of: &dyn Fn(&str) -> bool| {
        rows.iter()
            .filter(|r| of(&r.kind) && r.raw >= middle)
            .count()
    };
    let at = &json["at_threshold"];
    assert_eq!(at["good_flagged"], expect(&|k| k == "good"), "{at}");
    assert_eq!(at["defects_caught"], expect(&|k| k != "good"), "{at}");
    let split_rows =
        scores_csv(&std::fs::read_to_string(split_report.join("scores.csv")).expect("scores.csv"));
    let alerting = split_rows.iter().filter(|r| r.alert).count();
    assert!(
        alerting > 0 && alerting < split_rows.len(),
        "{alerting} of {} alert at the median",
        split_rows.len()
    );
    for plot in ["roc.png", "pro.png"] {
        let img = image::open(report.join(plot)).expect(plot);
        assert_eq!((img.width(), img.height()), (640, 480), "{plot}");
    }
    for (kind, count) in [("good", 4), ("scratch", 3), ("stain", 3)] {
        let overlays = std::fs::read_dir(report.join("overlays").join(kind)).expect("overlays");
        assert_eq!(overlays.count(), count, "{kind} overlays");
        let maps = std::fs::read_dir(report.join("maps").join(kind)).expect("maps");
        assert_eq!(maps.count(), count, "{kind} maps");
    }
    let overlay = image::open(report.join("overlays/stain/001.png")).expect("overlay");
    assert_eq!(
        (overlay.width(), overlay.height()),
        (64, 64),
        "overlay at image size"
    );
    // .npy v1: magic, version, little-endian header length, dict with the mask's shape.
    for (file, shape) in [
        ("maps/stain/001.npy", "(128, 128)"),
        ("maps/good/000.npy", "(64, 64)"),
    ] {
        let bytes = std::fs::read(report.join(file)).expect(file);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{file}");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = String::from_utf8_lossy(&bytes[10..10 + header_len]);
        assert!(header.contains(shape), "{file}: {header}");
        let n: usize = if shape.contains("128") {
            128 * 128
        } else {
            64 * 64
        };
        assert_eq!(bytes.len(), 10 + header_len + 4 * n, "{file}");
    }

    let out = stpm_ok(&[
        "infer",
        "--model",
        path(&bundle),
        path(&data.join("test/stain")),
        "--out",
        path(&overlays),
    ]);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("test/stain/")).collect();
    assert_eq!(lines.len(), 3, "{out}");
    // infer and eval run the same engine: the raw scores agree image by image.
    for line in lines {
        let mut fields = line.split_whitespace();
        let raw: f32 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .expect("raw score");
        let row = rows
            .iter()
            .find(|r| r.kind == "stain" && line.contains(&format!("test/stain/{}", r.image)))
            .unwrap_or_else(|| panic!("{line} not in scores.csv"));
        assert!(
            (raw - row.raw).abs() <= 1e-4 * row.raw.abs().max(1.0),
            "infer {raw} vs eval {}",
            row.raw
        );
    }
    let written = std::fs::read_dir(&overlays).expect("overlays").count();
    assert_eq!(written, 3);
    let overlay = image::open(
        std::fs::read_dir(&overlays)
            .expect("dir")
            .next()
            .expect("one")
            .expect("entry")
            .path(),
    )
    .expect("overlay decodes");
    assert_eq!((overlay.width(), overlay.height()), (64, 64));
}

#[test]
fn export_formats_this_build_or_machine_cannot_make_say_why_and_fail() {
    // A TensorRT engine needs a `gpu` build and a GPU driver: this one says which is missing
    // before it opens the bundle.
    let tensorrt = [
        "export",
        "--model",
        "b",
        "--format",
        "tensorrt",
        "--precision",
        "fp16",
    ];
    let out = stpm(&tensorrt);
    let message = text(&out);
    assert!(!out.status.success(), "{message}");
    assert!(message.contains("TensorRT export of b failed"), "{message}");
    assert!(
        message.contains("`gpu` feature") || message.contains("no CUDA driver"),
        "{message}"
    );
    // FP16 is TensorRT's only.
    let args = ["export", "--model", "b", "--precision", "fp16"];
    let out = stpm(&args);
    assert!(!out.status.success(), "{args:?} must fail");
    assert!(text(&out).contains("--format tensorrt"), "{}", text(&out));
    // The batch an engine is tuned for is TensorRT's, and within its profile.
    let args = [
        "export",
        "--model",
        "b",
        "--precision",
        "int8",
        "--batch",
        "4",
    ];
    let out = stpm(&args);
    assert!(!out.status.success(), "{args:?} must fail");
    assert!(
        text(&out).contains("--batch is for `--format tensorrt`"),
        "{}",
        text(&out)
    );
    let out = stpm(&[&tensorrt[..], &["--batch", "33"]].concat());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--batch 33: use 1 to 32"),
        "{}",
        text(&out)
    );
}

#[test]
fn user_errors_are_messages_not_panics() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nowhere");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["train", "--data", path(&missing), "--out", path(dir.path())],
            "does not exist",
        ),
        (
            vec![
                "eval",
                "--model",
                path(dir.path()),
                "--data",
                path(dir.path()),
                "--out",
                path(dir.path()),
            ],
            "not a model bundle",
        ),
        (
            vec!["export", "--model", path(&missing), "--precision", "int8"],
            "not a model bundle",
        ),
        (
            vec![
                "train",
                "--data",
                path(dir.path()),
                "--out",
                path(dir.path()),
                "--image-size",
                "100",
            ],
            "multiple of 16",
        ),
    ];
    for (args, expected) in cases {
        let out = stpm(&args);
        let message = text(&out);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(message.contains(expected), "{args:?}: {message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
    }
}

/// `stpm devset` of 32-pixel images in `dir/data`: 2 to train, `good` good test images and one
/// of each defect kind.
fn tiny_devset(dir: &Path, good: usize) -> std::path::PathBuf {
    let data = dir.join("data");
    let good = good.to_string();
    stpm_ok(&[
        "devset",
        "--out",
        path(&data),
        "--size",
        "32",
        "--train",
        "2",
        "--test-good",
        &good,
        "--test-per-defect",
        "1",
    ]);
    data
}

#[test]
fn eval_names_a_missing_mask() {
    let dir = tempfile::tempdir().expect("dir");
    let data = tiny_devset(dir.path(), 1);
    std::fs::remove_file(data.join("ground_truth/stain/000_mask.png")).expect("remove mask");
    let bundle = dir.path().join("bundle");
    stpm_ok(&[
        "train",
        "--data",
        path(&data),
        "--out",
        path(&bundle),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--quiet",
    ]);
    let out = stpm(&[
        "eval",
        "--model",
        path(&bundle),
        "--data",
        path(&data),
        "--out",
        path(&dir.path().join("r")),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("ground_truth/stain/000_mask.png"),
        "{}",
        text(&out)
    );
}

/// Archive junk (macOS `._` sidecars, `__MACOSX`, notebook checkpoints) is not read as images or
/// defect types, an image is decoded by its content whatever its extension says, and a test set
/// without good images gives no F1 (every threshold would have precision 1) and says why.
#[test]
fn eval_skips_archive_junk_and_says_what_needs_good_images() {
    let dir = tempfile::tempdir().expect("dir");
    let data = tiny_devset(dir.path(), 2);
    std::fs::write(data.join("test/good/._000.png"), b"\0\x05\x16\x07 Mac OS X").expect("sidecar");
    for junk in ["test/__MACOSX", "test/.ipynb_checkpoints"] {
        std::fs::create_dir_all(data.join(junk)).expect("junk folder");
        std::fs::copy(
            data.join("test/good/000.png"),
            data.join(junk).join("000.png"),
        )
        .expect("copy");
    }
    // A PNG under a JPEG's name.
    std::fs::rename(
        data.join("test/good/001.png"),
        data.join("test/good/001.jpg"),
    )
    .expect("rename");
    let bundle = path(common::tiny_conveyor_bundle());
    // Runs eval into `dir/<name>`; its output and report.
    let eval = |name: &str| {
        let out = dir.path().join(name);
        let run = stpm(&[
            "eval",
            "--model",
            bundle,
            "--data",
            path(&data),
            "--out",
            path(&out),
        ]);
        assert!(run.status.success(), "{}", text(&run));
        let report = std::fs::read_to_string(out.join("report.json")).expect("report.json");
        let report: serde_json::Value = serde_json::from_str(&report).expect("JSON");
        (text(&run), report)
    };
    let (_, first) = eval("r1");
    let types: Vec<&String> = first["per_defect_type"]
        .as_object()
        .map(|types| types.keys().collect())
        .unwrap_or_default();
    assert!(
        !types.is_empty()
            && types
                .iter()
                .all(|t| !t.contains("MACOSX") && !t.starts_with('.')),
        "{types:?}"
    );
    assert_eq!(first["at_threshold"]["good"], 2, "{first}");
    assert!(first["f1_max"].as_f64().is_some(), "{first}");

    for good in ["000.png", "001.jpg"] {
        std::fs::remove_file(data.join("test/good").join(good)).expect("remove");
    }
    let (printed, second) = eval("r2");
    assert!(printed.contains("test/good holds no images"), "{printed}");
    assert!(second["f1_max"].is_null(), "{second}");
    assert!(second["image_auroc"].is_null(), "{second}");
}

/// The keys both `stpm bench` reports share: positive numbers.
fn assert_headline_keys(json: &serde_json::Value) {
    for key in [
        "fps",
        "baseline_fps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "peak_rss_mb",
    ] {
        assert!(json[key].as_f64().unwrap_or(-1.0) > 0.0, "{key}: {json}");
    }
}

#[test]
fn bench_reports_engine_baseline_ratio_and_stages_as_json() {
    let dir = tempfile::tempdir().expect("dir");
    let out = stpm_ok(&[
        "bench",
        "--model",
        path(common::tiny_conveyor_bundle()),
        "--frames",
        "5",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let number = |key: &str| json[key].as_f64().unwrap_or(-1.0);
    assert_headline_keys(&json);
    assert!(number("p50_ms") <= number("p95_ms") && number("p95_ms") <= number("p99_ms"));
    let ratio = number("fps") / number("baseline_fps");
    assert!((number("ratio_vs_baseline") - ratio).abs() < 1e-9, "{json}");
    assert_eq!(json["provider"], "cpu");
    for stage in ["preprocess", "inference", "overlay", "end_to_end"] {
        assert!(
            json["stages"][stage]["p50_ms"].as_f64().unwrap_or(-1.0) > 0.0,
            "{stage}"
        );
    }
    let out = stpm(&[
        "bench",
        "--model",
        path(dir.path()),
        "--provider",
        "tensorrt",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("`tensorrt` is not available"),
        "{}",
        text(&out)
    );
}

#[test]
fn bench_pipeline_times_every_stage_of_the_run_path_on_a_generated_file() {
    let dir = tempfile::tempdir().expect("dir");
    let pipeline = dir.path().join("p.toml");
    // RTSP and HTTP on taken ports and an inference cap in the file: the bench must serve nothing
    // (a taken port would fail the start) and analyse every frame.
    let taken: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("listener"))
        .collect();
    let port = |i: usize| taken[i].local_addr().expect("address").port();
    std::fs::write(
        &pipeline,
        format!(
            "[model]\nbundle = \"{}\"\nprovider = \"cpu\"\n\n[[camera]]\nname = \"line1\"\n\
             source = \"test://conveyor?size=320x240\"\nmax_fps = 1\n\n[output.rtsp]\nenabled = true\nport = {}\n\n\
             [http]\nenabled = true\nbind = \"127.0.0.1:{}\"\n",
            path(common::tiny_conveyor_bundle()),
            port(0),
            port(1)
        ),
    )
    .expect("pipeline file");
    let out = stpm_ok(&[
        "bench",
        "--pipeline",
        path(&pipeline),
        "--frames",
        "12",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(
        out.lines()
            .find(|l| l.starts_with('{'))
            .expect("a JSON line"),
    )
    .expect("one JSON object");
    let number = |key: &str| json[key].as_f64().unwrap_or(-1.0);
    assert_headline_keys(&json);
    assert!(number("cpu_utilisation") > 0.0, "{json}");
    assert_eq!(json["provider"], "cpu");
    assert_eq!(json["source_generated"], true);
    // The generated file has the camera's conveyor size.
    let source = json["source"].as_str().unwrap_or("");
    assert!(source.ends_with("conveyor-320x240.mkv"), "{source}");
    // Every frame of the file analysed (max_fps ignored) and encoded, none dropped.
    for key in ["frames", "frames_analysed", "frames_encoded"] {
        assert_eq!(json[key], 12, "{key}: {json}");
    }
    assert_eq!(json["frames_dropped"], 0);
    let ratio = number("fps") / number("baseline_fps");
    assert!((number("ratio_vs_baseline") - ratio).abs() < 1e-9, "{json}");
    let ratio = number("fps") / number("engine_fps");
    assert!((number("ratio_vs_engine") - ratio).abs() < 1e-9, "{json}");
    assert!(
        json["ratio_meaning"]
            .as_str()
            .unwrap_or("")
            .contains("engine-only")
    );
    for stage in [
        "decode",
        "queue",
        "preprocess",
        "inference",
        "overlay",
        "output",
        "encode",
        "end_to_end",
    ] {
        let stats = &json["stages"][stage];
        let ms = |q: &str| stats[q].as_f64().unwrap_or(-1.0);
        assert_eq!(stats["count"], 12, "{stage}: {json}");
        assert!(
            ms("p50_ms") > 0.0 && ms("p50_ms") <= ms("p95_ms") && ms("p95_ms") <= ms("p99_ms"),
            "{stage}: {stats}"
        );
    }
    assert_eq!(json["p95_ms"], json["stages"]["end_to_end"]["p95_ms"]);
    // End to end spans the stages in between.
    let e2e = json["stages"]["end_to_end"]["mean_ms"]
        .as_f64()
        .unwrap_or(0.0);
    let inference = json["stages"]["inference"]["mean_ms"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(e2e > inference, "{json}");

    for (source, expected) in [
        ("rtsp://camera/line1", "measures a file source"),
        ("file:///no/such/video.mkv", "does not exist"),
    ] {
        let out = stpm(&["bench", "--pipeline", path(&pipeline), "--source", source]);
        assert!(!out.status.success(), "{source}");
        assert!(text(&out).contains(expected), "{source}: {}", text(&out));
    }
}

/// Raw scores `stpm infer` prints for `images` with the bundle's `precision` graph, in order.
fn infer_scores(bundle: &Path, images: &Path, precision: &str, out: &Path) -> Vec<f32> {
    let text = stpm_ok(&[
        "infer",
        "--model",
        path(bundle),
        "--precision",
        precision,
        path(images),
        "--out",
        path(out),
    ]);
    text.lines()
        .filter(|l| l.contains(".png"))
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("raw score in {l}"))
        })
        .collect()
}

/// `[calibration]` (or `[int8.calibration]`) threshold and floor of a bundle's manifest.
fn manifest_calibration(bundle: &Path, int8: bool) -> (f64, f64, String) {
    let text = std::fs::read_to_string(bundle.join("stpm.toml")).expect("manifest");
    let table: toml::Table = toml::from_str(&text).expect("toml");
    let section = if int8 {
        &table["int8"]["calibration"]
    } else {
        &table["calibration"]
    };
    let number = |key: &str| section[key].as_float().expect(key);
    let method = section["method"].as_str().expect("method").to_string();
    (number("threshold"), number("floor"), method)
}

/// `stpm train` options for a student of seconds: one epoch of 64-pixel images.
const TINY_TRAINING: &[&str] = &[
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--image-size",
    "64",
    "--quiet",
];

/// A generated category of 64-pixel images in `data`: 8 to train on, `test_good` good test images
/// and one of each defect.
fn devset_64(data: &Path, test_good: &str, more: &[&str]) {
    let head = [
        "devset",
        "--out",
        path(data),
        "--size",
        "64",
        "--train",
        "8",
        "--test-good",
        test_good,
        "--test-per-defect",
        "1",
    ];
    stpm_ok(&[head.as_slice(), more].concat());
}

#[test]
fn calibrate_sets_each_graphs_threshold_from_good_images() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let bundle = dir.path().join("bundle");
    devset_64(&data, "6", &["--seed", "3"]);
    stpm_ok(
        &[
            &["train", "--data", path(&data), "--out", path(&bundle)],
            TINY_TRAINING,
        ]
        .concat(),
    );
    stpm_ok(&[
        "export",
        "--model",
        path(&bundle),
        "--precision",
        "int8",
        "--quiet",
    ]);
    let good = data.join("test/good");
    let fp32 = infer_scores(&bundle, &good, "fp32", &dir.path().join("o1"));
    let int8 = infer_scores(&bundle, &good, "int8", &dir.path().join("o2"));
    assert_eq!((fp32.len(), int8.len()), (6, 6));
    let max = |s: &[f32]| s.iter().copied().fold(f32::MIN, f32::max) as f64;
    let min = |s: &[f32]| s.iter().copied().fold(f32::MAX, f32::min) as f64;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);

    // A dry run reports and leaves the manifest byte for byte.
    let before = std::fs::read(bundle.join("stpm.toml")).expect("manifest");
    let out = stpm_ok(&[
        "calibrate",
        "--model",
        path(&bundle),
        path(&good),
        "--dry-run",
    ]);
    assert!(out.contains("dry run"), "{out}");
    assert!(
        out.contains("fp32: threshold") && out.contains("int8: threshold"),
        "{out}"
    );
    assert!(out.contains("warning: 6 good images only"), "{out}");
    assert_eq!(
        std::fs::read(bundle.join("stpm.toml")).expect("manifest"),
        before
    );

    // The default: each graph's threshold is the highest of its own scores, the floor the lowest.
    let calibrate = || {
        stpm_ok(&[
            "calibrate",
            "--model",
            path(&bundle),
            path(&good),
            "--quiet",
        ])
    };
    calibrate();
    let (threshold, floor, method) = manifest_calibration(&bundle, false);
    assert!(close(threshold, max(&fp32)), "{threshold} vs {fp32:?}");
    assert!(close(floor, min(&fp32)), "{floor} vs {fp32:?}");
    assert!(method.contains("stpm calibrate"), "{method}");
    let (threshold8, floor8, _) = manifest_calibration(&bundle, true);
    assert!(close(threshold8, max(&int8)), "{threshold8} vs {int8:?}");
    assert!(close(floor8, min(&int8)), "{floor8} vs {int8:?}");
    // Normalised scores follow: the best-scoring good image sits at 0.5, none above.
    let out = stpm_ok(&[
        "infer",
        "--model",
        path(&bundle),
        path(&good),
        "--out",
        path(&dir.path().join("o3")),
    ]);
    assert_eq!(out.matches("ANOMALY").count(), 1, "{out}");

    // A quantile: the nearest-rank median of six scores is the third lowest.
    stpm_ok(&[
        "calibrate",
        "--model",
        path(&bundle),
        path(&good),
        "--quantile",
        "0.5",
        "--quiet",
    ]);
    let mut sorted = fp32.clone();
    sorted.sort_by(f32::total_cmp);
    let (threshold, _, method) = manifest_calibration(&bundle, false);
    assert!(
        close(threshold, sorted[2] as f64),
        "{threshold} vs {sorted:?}"
    );
    assert!(method.contains("0.5 quantile"), "{method}");

    for (args, expected) in [
        (vec!["--quantile", "0"], "--quantile must be in (0, 1]"),
        (vec!["--quantile", "1.5"], "--quantile must be in (0, 1]"),
    ] {
        let mut all = vec!["calibrate", "--model", path(&bundle), path(&good)];
        all.extend(args);
        let out = stpm(&all);
        assert!(!out.status.success());
        assert!(text(&out).contains(expected), "{}", text(&out));
    }
    let out = stpm(&["calibrate", "--model", path(&good), path(&good)]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not a model bundle"), "{}", text(&out));

    // A threshold that is not a number is refused where scores are used, and `stpm calibrate`,
    // which the message names, repairs it (for both graphs).
    let edit_manifest = |edit: &dyn Fn(&mut toml::Table)| {
        let manifest = bundle.join("stpm.toml");
        let mut table: toml::Table =
            toml::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("toml");
        edit(&mut table);
        std::fs::write(&manifest, toml::to_string(&table).expect("toml")).expect("write");
    };
    edit_manifest(&|table| {
        table["calibration"]["threshold"] = toml::Value::Float(f64::NAN);
        table["int8"]["calibration"]["floor"] = toml::Value::Float(f64::INFINITY);
    });
    let o5 = dir.path().join("o5");
    let out = stpm(&[
        "infer",
        "--model",
        path(&bundle),
        path(&good),
        "--out",
        path(&o5),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("threshold = NaN") && text(&out).contains("stpm calibrate"),
        "{}",
        text(&out)
    );
    calibrate();
    let (threshold, _, _) = manifest_calibration(&bundle, false);
    assert!(close(threshold, max(&fp32)), "{threshold} vs {fp32:?}");
    let (_, floor8, _) = manifest_calibration(&bundle, true);
    assert!(close(floor8, min(&int8)), "{floor8} vs {int8:?}");
    stpm_ok(&[
        "infer",
        "--model",
        path(&bundle),
        path(&good),
        "--out",
        path(&dir.path().join("o4")),
    ]);

    // The INT8 graph's numbers are checked where that graph is chosen: the fp32 graph still
    // scores, and calibrate repairs them.
    edit_manifest(&|table| {
        table["int8"]["calibration"]["threshold"] = toml::Value::Float(f64::NAN);
    });
    let int8_out = dir.path().join("o6");
    let out = stpm(&[
        "infer",
        "--model",
        path(&bundle),
        "--precision",
        "int8",
        path(&good),
        "--out",
        path(&int8_out),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("[int8.calibration] threshold = NaN"),
        "{}",
        text(&out)
    );
    assert_eq!(
        infer_scores(&bundle, &good, "fp32", &dir.path().join("o7")),
        fp32
    );
    calibrate();
    let (threshold8, _, _) = manifest_calibration(&bundle, true);
    assert!(close(threshold8, max(&int8)), "{threshold8} vs {int8:?}");
}

/// A bundle that cannot be written (here a folder stands where its graph goes) fails naming the
/// path, and leaves no half-written staging files behind.
#[test]
fn a_bundle_that_cannot_be_written_leaves_no_staging_files() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let bundle = dir.path().join("bundle");
    devset_64(&data, "2", &[]);
    std::fs::create_dir_all(bundle.join("model.onnx").join("in the way")).expect("folder");
    let out = stpm(
        &[
            &["train", "--data", path(&data), "--out", path(&bundle)],
            TINY_TRAINING,
        ]
        .concat(),
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("model.onnx"), "{}", text(&out));
    assert!(!bundle.join(".staging").exists(), "{}", text(&out));
}
