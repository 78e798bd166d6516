//! `stpm export --precision int8` on a tiny bundle: the QDQ graph is recorded in the manifest, ONNX
//! Runtime turns every backbone convolution into an INT8 kernel, and its anomaly maps follow the
//! fp32 graph's.

mod common;

use std::path::Path;

use common::{output_text, path_str, stpm_in, tiny_conveyor_bundle};
use stpm::bundle::{Bundle, BundleError, Precision, PrecisionChoice};
use stpm::engine::{Engine, EngineOptions};
use stpm::preprocess::{self, RgbFrame};

/// Backbone convolutions of EfficientNet-Lite0 up to the stride-16 tap, teacher and student,
/// less the two stems (fp32).
const INT8_CONVS: usize = 64;

fn copy_bundle(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("bundle") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// Pearson correlation of two equally long samples.
fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let mean = |x: &[f32]| x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (ma, mb) = (mean(a), mean(b));
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        cov += dx * dy;
        va += dx * dx;
        vb += dy * dy;
    }
    cov / (va * vb).sqrt().max(1e-30)
}

fn maps(bundle: &Bundle, images: &[std::path::PathBuf]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let size = bundle.manifest.model.input_size;
    let options = EngineOptions {
        int8: bundle.precision == Precision::Int8,
        ..EngineOptions::default()
    };
    let mut engine = Engine::open(&bundle.model_path(), size, options).expect("engine");
    let (mut maps, mut scores) = (Vec::new(), Vec::new());
    for path in images {
        let frame = RgbFrame::open(path).expect("image");
        let input = preprocess::to_chw(&frame, size, &bundle.manifest.normalisation);
        let scored = engine.run(&input, 1).expect("run");
        maps.push(scored.maps);
        scores.extend(scored.scores);
    }
    (maps, scores)
}

/// `stpm export --model <bundle_dir> <args>` in `dir`: success and its output.
fn export(bundle_dir: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let mut all = vec!["export", "--model", path_str(bundle_dir)];
    all.extend_from_slice(args);
    let out = stpm_in(&all, dir);
    (out.status.success(), output_text(&out))
}

/// The test images of the category the tiny bundle was trained on.
fn test_images(bundle: &Bundle) -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    let data = Path::new(&bundle.manifest.training.data)
        .parent()
        .and_then(Path::parent)
        .expect("category")
        .join("test");
    let mut images = Vec::new();
    for kind in std::fs::read_dir(&data).expect("test dir") {
        images.extend(stpm::dataset::images_in(&kind.expect("entry").path()).expect("images"));
    }
    (data, images)
}

#[test]
fn int8_export_runs_int8_kernels_and_follows_fp32() {
    let source = tiny_conveyor_bundle();
    let dir = tempfile::tempdir().expect("dir");
    let bundle_dir = dir.path().join("bundle");
    copy_bundle(source, &bundle_dir);
    let missing = Bundle::open_as(&bundle_dir, Precision::Int8);
    assert!(
        matches!(&missing, Err(BundleError::NoInt8 { .. })),
        "{missing:?}"
    );
    // `precision = "auto"` runs the fp32 graph then, and says how to make the INT8 one.
    let (auto, reason) =
        Bundle::open_choosing(&bundle_dir, PrecisionChoice::Auto, true).expect("auto");
    assert_eq!(auto.precision, Precision::Fp32);
    assert!(reason.contains("stpm export"), "{reason}");

    let (ok, text) = export(
        &bundle_dir,
        &["--precision", "int8", "--calib-images", "4", "--quiet"],
        dir.path(),
    );
    assert!(ok, "{text}");
    assert!(text.contains("held-out good images"), "{text}");

    let int8 = Bundle::open_as(&bundle_dir, Precision::Int8).expect("int8 bundle");
    let section = int8.manifest.int8.as_ref().expect("[int8]");
    assert_eq!(section.calibration_images, 4);
    assert_eq!(section.source_sha256, int8.manifest.model.onnx_sha256);
    assert_eq!(
        section.calibration.n_images,
        int8.manifest.training.n_holdout
    );
    assert!(int8.model_path().ends_with("model.int8.onnx"));
    // The whitened map's whitening was fitted again on the INT8 graph's own residuals (held-out
    // images): same Convs, other weights.
    assert!(int8.manifest.model.whitening.is_some());
    assert_eq!(
        section.whitening,
        format!(
            "fitted on {} images through the INT8 graph",
            int8.manifest.training.n_holdout
        )
    );
    assert!(text.contains("whitening fitted again"), "{text}");
    let whitening_weights = |path: &Path| {
        use prost::Message;
        let bytes = std::fs::read(path).expect("graph");
        let model = stpm::onnx::proto::ModelProto::decode(bytes.as_slice()).expect("onnx");
        let graph = model.graph.expect("graph");
        let convs = stpm::export::quantize::whitening_convs(&graph);
        assert_eq!(convs.len(), 3, "{convs:?}");
        convs
            .iter()
            .map(|conv| {
                let init = graph
                    .initializer
                    .iter()
                    .find(|t| t.name == conv.weight)
                    .expect("weight");
                assert_eq!(init.raw_data.len(), conv.channels * conv.channels * 4);
                init.raw_data.clone()
            })
            .collect::<Vec<_>>()
    };
    let fp32_whitening = whitening_weights(&int8.fp32_model_path());
    let int8_whitening = whitening_weights(&int8.model_path());
    for (scale, (a, b)) in fp32_whitening.iter().zip(&int8_whitening).enumerate() {
        assert_ne!(
            a, b,
            "scale {scale}: the INT8 graph kept the fp32 whitening"
        );
    }
    // `auto` takes it on the CPU, not for a GPU provider; `fp32` stays fp32.
    let (auto, reason) =
        Bundle::open_choosing(&bundle_dir, PrecisionChoice::Auto, true).expect("auto");
    assert_eq!(auto.precision, Precision::Int8, "{reason}");
    assert_eq!(auto.calibration(), &section.calibration);
    let (gpu, _) = Bundle::open_choosing(&bundle_dir, PrecisionChoice::Auto, false).expect("gpu");
    assert_eq!(gpu.precision, Precision::Fp32);
    let (fp32, _) = Bundle::open_choosing(&bundle_dir, PrecisionChoice::Fp32, true).expect("fp32");
    assert_eq!(fp32.precision, Precision::Fp32);

    // ONNX Runtime fuses every QDQ convolution of both backbones into QLinearConv; the only fp32
    // convolutions left are the two stems, the three 1×1 whitenings of the residuals (scoring),
    // the two of the Gaussian blur on the fused map, the scoring's 11 channel sums (6 L2 norms,
    // 3 whitened distances, 2 feature energies) and the defect head's output; its hidden layer
    // stays fp32 too, fused with its ReLU.
    let ops = stpm::engine::optimised_ops(&int8.model_path(), true).expect("optimised graph");
    assert!(int8.manifest.model.head.is_some());
    assert_eq!(ops.get("QLinearConv"), Some(&INT8_CONVS), "{ops:?}");
    assert_eq!(ops.get("Conv"), Some(&19), "{ops:?}");
    assert_eq!(ops.get("FusedConv"), Some(&1), "{ops:?}");
    assert_eq!(ops.get("ReduceSum"), None, "{ops:?}");

    // The maps of test images through both graphs. INT8 rounding adds noise to both feature
    // pyramids; on this one-epoch 64-pixel bundle the maps correlated at 0.9994-0.9998 with fp32
    // and the scores within 0.5 % on a CPU with VNNI (full-range weights). On an AVX2-only CPU
    // (AMD EPYC, no VNNI) with the 7-bit weights that its kernels need (`WEIGHT_QMAX`), 0.977-0.99
    // and up to 9 %; full-range weights saturated there and gave 0.77. The bounds (0.95, 15 %)
    // hold on both kinds of CPU and still fail that. (Inconsistent scales, e.g. weight scales ×1.3
    // or activation scales ×0.5 as tried, already fail the fusion check above.)
    let fp32 = Bundle::open(&bundle_dir).expect("fp32 bundle");
    let (data, images) = test_images(&fp32);
    assert!(images.len() >= 3, "{images:?}");
    let (fp32_maps, fp32_scores) = maps(&fp32, &images);
    let (int8_maps, int8_scores) = maps(&int8, &images);
    for (index, (a, b)) in fp32_maps.iter().zip(&int8_maps).enumerate() {
        let r = correlation(a, b);
        assert!(r > 0.95, "image {index}: map correlation {r:.4}");
    }
    for (a, b) in fp32_scores.iter().zip(&int8_scores) {
        assert!((a - b).abs() <= 0.15 * a.abs(), "scores {a} vs {b}");
    }

    // `stpm eval --precision int8` runs it and says so in the report.
    let report = dir.path().join("report");
    let out = stpm_in(
        &[
            "eval",
            "--model",
            path_str(&bundle_dir),
            "--data",
            path_str(data.parent().expect("category")),
            "--out",
            path_str(&report),
            "--precision",
            "int8",
            "--quiet",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).expect("report"))
            .expect("json");
    assert_eq!(json["precision"], "int8");

    // A changed INT8 file: `int8` refuses it, `auto` runs fp32 and names the file.
    let int8_path = int8.model_path();
    let mut bytes = std::fs::read(&int8_path).expect("int8 graph");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&int8_path, bytes).expect("tamper");
    let refused = Bundle::open_as(&bundle_dir, Precision::Int8);
    assert!(
        matches!(&refused, Err(BundleError::Hash { .. })),
        "{refused:?}"
    );
    let (auto, reason) =
        Bundle::open_choosing(&bundle_dir, PrecisionChoice::Auto, true).expect("auto");
    assert_eq!(auto.precision, Precision::Fp32);
    assert!(reason.contains("model.int8.onnx"), "{reason}");
}

/// The INT8 graph for TensorRT (`--activations int8-symmetric`, what `--format tensorrt --precision
/// int8` makes): recorded as TensorRT's kind, still a valid graph whose maps follow fp32's on the CPU,
/// and never what `auto` runs on the CPU. Without a GPU build, `--format tensorrt` stops at once.
#[test]
fn tensorrt_int8_graph_is_symmetric_and_skipped_by_auto_on_the_cpu() {
    let source = tiny_conveyor_bundle();
    let dir = tempfile::tempdir().expect("dir");
    let bundle_dir = dir.path().join("bundle");
    copy_bundle(source, &bundle_dir);
    let (ok, text) = export(
        &bundle_dir,
        &[
            "--precision",
            "int8",
            "--activations",
            "int8-symmetric",
            "--calib-images",
            "4",
            "--quiet",
        ],
        dir.path(),
    );
    assert!(ok, "{text}");
    assert!(text.contains("int8-symmetric"), "{text}");

    let int8 = Bundle::open_as(&bundle_dir, Precision::Int8).expect("int8 bundle");
    assert!(int8.int8_is_for_tensorrt());
    let section = int8.manifest.int8.as_ref().expect("[int8]");
    assert_eq!(section.activations, "int8-symmetric per tensor");
    let (auto, reason) =
        Bundle::open_choosing(&bundle_dir, PrecisionChoice::Auto, true).expect("auto");
    assert_eq!(auto.precision, Precision::Fp32, "{reason}");
    assert!(
        reason.contains("TensorRT") && reason.contains("--precision int8"),
        "{reason}"
    );
    // Asked for explicitly, the CPU runs it, and its maps follow the fp32 graph's.
    let (explicit, _) =
        Bundle::open_choosing(&bundle_dir, PrecisionChoice::Int8, true).expect("int8");
    assert_eq!(explicit.precision, Precision::Int8);
    let fp32 = Bundle::open(&bundle_dir).expect("fp32 bundle");
    let (_, images) = test_images(&fp32);
    let images = &images[..3.min(images.len())];
    let (fp32_maps, _) = maps(&fp32, images);
    let (int8_maps, _) = maps(&int8, images);
    // (Bounds as above: full-range weights gave 0.77 on an AVX2-only CPU, 7-bit ones 0.977.)
    for (index, (a, b)) in fp32_maps.iter().zip(&int8_maps).enumerate() {
        let r = correlation(a, b);
        assert!(r > 0.95, "image {index}: map correlation {r:.4}");
    }

    // A TensorRT engine needs a GPU build, a GPU and TensorRT: without them the export stops before
    // any work and says what is missing; `--out` is refused for an engine.
    if stpm::engine::resolve_provider(stpm::engine::ProviderRequest::TensorRt).is_err() {
        let manifest = || std::fs::read_to_string(bundle_dir.join("stpm.toml")).expect("manifest");
        let before = manifest();
        let (ok, text) = export(
            &bundle_dir,
            &["--format", "tensorrt", "--precision", "fp16"],
            dir.path(),
        );
        assert!(!ok, "{text}");
        assert!(
            text.contains("TensorRT export") && text.contains("gpu"),
            "{text}"
        );
        assert_eq!(manifest(), before);
    } else {
        println!("not checked: the missing-GPU message (this build and machine can run TensorRT)");
    }
    let (ok, text) = export(
        &bundle_dir,
        &[
            "--format",
            "tensorrt",
            "--precision",
            "int8",
            "--out",
            "x.plan",
        ],
        dir.path(),
    );
    assert!(!ok, "{text}");
    assert!(text.contains("--out is for `--format onnx`"), "{text}");

    // Calibrated on other images (the held-out split cannot be reproduced), the INT8 graph keeps
    // the fp32 whitening and threshold, and says so.
    let (data, _) = test_images(&fp32);
    let (ok, text) = export(
        &bundle_dir,
        &[
            "--precision",
            "int8",
            "--calib-data",
            path_str(&data.join("good")),
            "--calib-images",
            "2",
            "--quiet",
        ],
        dir.path(),
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("fp32 threshold") && text.contains("and whitening"),
        "{text}"
    );
    assert!(!text.contains("whitening fitted again"), "{text}");
    let other = Bundle::open_as(&bundle_dir, Precision::Int8).expect("int8 bundle");
    let section = other.manifest.int8.as_ref().expect("[int8]");
    assert_eq!(section.whitening, "");
    assert_eq!(section.calibration, fp32.manifest.calibration);
}
