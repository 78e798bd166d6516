//! Training end to end on a tiny synthetic set, then the exported ONNX graph (run by ONNX Runtime)
//! against burn's own forward pass of the same teacher and student.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::prelude::*;
use stpm::bundle::Bundle;
use stpm::devset::{DevsetSpec, write_category};
use stpm::engine::{Engine, EngineOptions};
use stpm::model::map::{FUSION_STRIDE, anomaly_map, image_score};
use stpm::model::{BackboneKind, Fusion, compute_device, weights};
use stpm::rng::SplitMix;
use stpm::train::{Augment, TeacherWeights, TrainConfig, train};

const SIZE: usize = 64;

/// `count` synthetic good images of `size` pixels under `root/data`.
fn good_images(root: &std::path::Path, count: usize, size: u32, seed: u64) -> std::path::PathBuf {
    let data = root.join("data");
    let spec = DevsetSpec {
        size,
        train: count,
        test_good: 0,
        test_per_defect: 0,
        seed,
    };
    write_category(&data, &spec).expect("devset");
    data
}

fn tiny_config(
    data: &std::path::Path,
    out: &std::path::Path,
    backbone: BackboneKind,
) -> TrainConfig {
    let mut config = TrainConfig::new(data.to_path_buf(), out.to_path_buf());
    config.backbone = backbone;
    config.epochs = 2;
    config.batch_size = 4;
    config.image_size = SIZE;
    config.learning_rate = 0.05;
    config.progress = false;
    config
}

/// Trains, reloads teacher and student, and compares ORT's map and score with burn's.
fn check_parity(backbone: BackboneKind, teacher: TeacherWeights, fusion: Fusion, blur_sigma: f32) {
    check_parity_at(backbone, teacher, fusion, blur_sigma, FUSION_STRIDE);
}

fn check_parity_at(
    backbone: BackboneKind,
    teacher: TeacherWeights,
    fusion: Fusion,
    blur_sigma: f32,
    fusion_stride: usize,
) {
    let dir = tempfile::tempdir().expect("dir");
    let data = good_images(dir.path(), 10, 80, 11);
    let out = dir.path().join("bundle");
    let mut config = tiny_config(&data, &out, backbone);
    config.teacher = teacher.clone();
    config.fusion = fusion;
    config.blur_sigma = blur_sigma;
    config.fusion_stride = fusion_stride;
    let outcome = train(&config, Arc::new(AtomicBool::new(false))).expect("train");

    let manifest = &outcome.bundle.manifest;
    assert_eq!(manifest.model.input_size, [SIZE, SIZE]);
    assert_eq!(
        (
            manifest.model.fusion,
            manifest.model.blur_sigma,
            manifest.model.fusion_stride
        ),
        (fusion, blur_sigma, fusion_stride)
    );
    assert_eq!(
        manifest.model.map_stats.is_some(),
        fusion.standardises(),
        "term statistics are recorded exactly for the standardising fusions"
    );
    assert_eq!(
        manifest.model.whitening.is_some(),
        fusion == Fusion::Whitened,
        "a whitening file is recorded exactly for the whitened fusion"
    );
    assert_eq!(
        (manifest.training.n_train, manifest.training.n_holdout),
        (8, 2)
    );
    assert_eq!(manifest.training.epochs_run, 2);
    let losses = &manifest.training.epoch_losses;
    assert!(
        losses[1] < losses[0],
        "the student learns: epoch losses {losses:?}"
    );
    assert_eq!(outcome.holdout_scores.len(), 2);
    // The manifest keeps what the threshold was fitted on, and the schedule (8 images in
    // batches of the test's size, under the default step budget: every batch each epoch).
    assert_eq!(manifest.training.holdout_scores, outcome.holdout_scores);
    assert_eq!(manifest.training.max_steps, stpm::train::DEFAULT_MAX_STEPS);
    assert_eq!(
        manifest.training.steps_per_epoch,
        8usize.div_ceil(manifest.training.batch_size)
    );
    assert!(
        (manifest
            .calibration
            .normalise(manifest.calibration.threshold)
            - 0.5)
            .abs()
            < 1e-6,
        "threshold normalises to 0.5"
    );
    assert!(manifest.calibration.threshold > 0.0);

    // Burn's forward of the very weights the bundle holds.
    let device = compute_device();
    let teacher_net = match &teacher {
        TeacherWeights::File(path) => {
            weights::load_backbone(backbone, path, &device).expect("teacher")
        }
        TeacherWeights::Random => {
            assert_eq!(manifest.training.teacher_weights, "teacher.safetensors");
            weights::load_safetensors(backbone, &out.join("teacher.safetensors"), &device)
                .expect("teacher")
        }
    };
    let student = weights::load_safetensors(backbone, &out.join("student.safetensors"), &device)
        .expect("student");

    let mut rng = SplitMix::new(99);
    let n = 2;
    let input: Vec<f32> = (0..n * 3 * SIZE * SIZE)
        .map(|_| rng.range(-2.0, 2.0))
        .collect();
    let image = Tensor::<4>::from_data(TensorData::new(input.clone(), [n, 3, SIZE, SIZE]), &device);
    let map_options = Bundle::open(&out)
        .expect("bundle")
        .map_options()
        .expect("map options");
    // The standardising fusions carry the defect head by default; the others cannot.
    assert_eq!(map_options.head.is_some(), fusion.standardises());
    if fusion == Fusion::Whitened {
        let whitening = map_options.whitening.as_ref().expect("whitening read");
        let channels = backbone.tap_channels();
        for (scale, w) in whitening.0.iter().enumerate() {
            assert_eq!(w.channels(), channels[scale]);
            assert!(
                w.matrix.iter().all(|v| v.is_finite()) && w.matrix[0] > 0.0,
                "scale {scale}: W = L⁻¹ has a positive diagonal"
            );
        }
    }
    let map = anomaly_map(
        &teacher_net.pyramid(image.clone()),
        &student.pyramid(image),
        [SIZE, SIZE],
        &map_options,
    );
    let burn_scores = stpm::model::to_vec(image_score(map.clone()));
    let burn_map = stpm::model::to_vec(map);

    let bundle = Bundle::open(&out).expect("bundle");
    let mut engine =
        Engine::open(&bundle.model_path(), [SIZE, SIZE], EngineOptions::default()).expect("engine");
    let onnx = engine.run(&input, n).expect("run");
    let (map_diff, map_max) = common::max_abs_diff(&onnx.maps, &burn_map);
    println!("{backbone} {fusion:?}: map max abs error {map_diff:e}, map max {map_max:e}");
    assert!(map_max > 0.0, "the map must not be all zeros");
    assert!(
        map_diff <= 1e-4 * map_max,
        "map error {map_diff} exceeds 1e-4 × {map_max}"
    );
    let (score_diff, score_max) = common::max_abs_diff(&onnx.scores, &burn_scores);
    assert!(
        score_diff <= 1e-4 * score_max,
        "score error {score_diff} vs {score_max}"
    );
}

#[test]
fn lite0_bundle_matches_burn_forward() {
    check_parity(
        BackboneKind::EfficientNetLite0,
        TeacherWeights::File(common::lite0_weights()),
        Fusion::Product,
        4.0,
    );
}

#[test]
fn lite0_bundle_matches_burn_forward_with_standardised_fusion() {
    check_parity(
        BackboneKind::EfficientNetLite0,
        TeacherWeights::File(common::lite0_weights()),
        Fusion::Standardised,
        4.0,
    );
}

/// The full-resolution graph of bundles made before the fusion stride was recorded.
#[test]
fn lite0_bundle_matches_burn_forward_fused_at_full_resolution() {
    check_parity_at(
        BackboneKind::EfficientNetLite0,
        TeacherWeights::File(common::lite0_weights()),
        Fusion::Whitened,
        4.0,
        1,
    );
}

#[test]
fn lite0_bundle_matches_burn_forward_with_whitened_fusion() {
    check_parity(
        BackboneKind::EfficientNetLite0,
        TeacherWeights::File(common::lite0_weights()),
        Fusion::Whitened,
        4.0,
    );
}

#[test]
fn resnet18_bundle_matches_burn_forward_with_whitened_fusion_unblurred() {
    check_parity(
        BackboneKind::ResNet18,
        TeacherWeights::Random,
        Fusion::Whitened,
        0.0,
    );
}

#[test]
fn resnet18_bundle_matches_burn_forward_with_sum_fusion_unblurred() {
    check_parity(
        BackboneKind::ResNet18,
        TeacherWeights::Random,
        Fusion::Sum,
        0.0,
    );
}

#[test]
fn tampered_model_is_rejected_by_hash() {
    let dir = tempfile::tempdir().expect("dir");
    let data = good_images(dir.path(), 4, 64, 2);
    let out = dir.path().join("bundle");
    let mut config = tiny_config(&data, &out, BackboneKind::ResNet18);
    config.teacher = TeacherWeights::Random;
    config.epochs = 1;
    train(&config, Arc::new(AtomicBool::new(false))).expect("train");
    // The whitening file of the default (whitened) fusion is checked when it is read.
    let bundle = Bundle::open(&out).expect("bundle");
    assert!(bundle.map_options().expect("intact").whitening.is_some());
    let whitening = out.join("whitening.safetensors");
    let mut bytes = std::fs::read(&whitening).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&whitening, bytes).expect("write");
    let error = bundle.map_options().expect_err("tampered whitening");
    assert!(
        error.to_string().contains("sha256") && error.to_string().contains("whitening"),
        "{error}"
    );
    // A fusion stride the graph cannot be built with is named.
    let manifest_path = out.join("stpm.toml");
    let manifest = std::fs::read_to_string(&manifest_path).expect("manifest");
    assert!(manifest.contains("fusion_stride = 4"), "{manifest}");
    std::fs::write(
        &manifest_path,
        manifest.replace("fusion_stride = 4", "fusion_stride = 3"),
    )
    .expect("write");
    let error = Bundle::open(&out).expect_err("fusion stride 3");
    assert!(error.to_string().contains("fusion_stride = 3"), "{error}");
    std::fs::write(&manifest_path, manifest).expect("restore");
    let model = out.join("model.onnx");
    let mut bytes = std::fs::read(&model).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&model, bytes).expect("write");
    let error = Bundle::open(&out).expect_err("tampered");
    assert!(error.to_string().contains("sha256"), "{error}");
}

#[test]
fn resnet18_without_weights_asks_for_them() {
    let dir = tempfile::tempdir().expect("dir");
    let data = good_images(dir.path(), 3, 64, 2);
    let config = tiny_config(&data, &dir.path().join("bundle"), BackboneKind::ResNet18);
    let error = train(&config, Arc::new(AtomicBool::new(false))).expect_err("needs weights");
    assert!(error.to_string().contains("--teacher-weights"), "{error}");
}

/// A tiny ResNet-18 student of a random teacher (`seed`, `augment`) and its map of `input`.
fn train_random_resnet(
    data: &std::path::Path,
    out: &std::path::Path,
    seed: u64,
    augment: Augment,
    input: &[f32],
) -> (Bundle, Vec<f32>) {
    let mut config = tiny_config(data, out, BackboneKind::ResNet18);
    config.teacher = TeacherWeights::Random;
    config.seed = seed;
    config.augment = augment;
    let outcome = train(&config, Arc::new(AtomicBool::new(false))).expect("train");
    let mut engine = Engine::open(
        &outcome.bundle.model_path(),
        [SIZE, SIZE],
        EngineOptions::default(),
    )
    .expect("engine");
    let map = engine.run(input, 1).expect("run").maps;
    (outcome.bundle, map)
}

#[test]
fn same_seed_gives_the_same_student() {
    // Bit-identical weights are not promised: burn's multi-threaded kernels may sum in a different
    // order when the machine is busy. The trained models must agree to float precision.
    let dir = tempfile::tempdir().expect("dir");
    let data = good_images(dir.path(), 7, 64, 4);
    let mut maps = Vec::new();
    let input: Vec<f32> = {
        let mut rng = SplitMix::new(3);
        (0..3 * SIZE * SIZE).map(|_| rng.range(-2.0, 2.0)).collect()
    };
    for seed in [17, 17, 18] {
        let out = dir.path().join(format!("bundle{}", maps.len()));
        maps.push(train_random_resnet(&data, &out, seed, Augment::None, &input).1);
    }
    let (same_seed, scale) = common::max_abs_diff(&maps[1], &maps[0]);
    let (other_seed, _) = common::max_abs_diff(&maps[2], &maps[0]);
    println!(
        "same seed: max map difference {same_seed:e}; other seed: {other_seed:e} (map max {scale:e})"
    );
    assert!(
        same_seed <= 1e-4 * scale,
        "seed 17 twice: maps differ by {same_seed} (max {scale})"
    );
    assert!(
        other_seed > 1e-2 * scale,
        "seeds 17 and 18 should give different models"
    );
}

#[test]
fn a_reused_student_gets_the_defect_head_without_training_again() {
    let dir = tempfile::tempdir().expect("dir");
    let data = good_images(dir.path(), 7, 64, 4);
    let plain = dir.path().join("plain");
    let mut config = tiny_config(&data, &plain, BackboneKind::ResNet18);
    config.teacher = TeacherWeights::Random;
    config.fusion = Fusion::Whitened;
    config.head_weight = 0.0;
    config.seed = 17;
    // Six of the seven images (the image cap), recorded as such.
    config.max_images = 6;
    let first = train(&config, Arc::new(AtomicBool::new(false))).expect("train");
    assert!(first.bundle.manifest.model.head.is_none());
    let recorded = &first.bundle.manifest.training;
    assert_eq!(
        (
            recorded.n_train + recorded.n_holdout,
            recorded.images_found,
            recorded.max_images
        ),
        (6, 7, 6)
    );
    // `stpm export` finds the same six images and their held-out share again (it measures the
    // INT8 graph's threshold on them), the cap included.
    let int8 = stpm::export::int8::export_int8(&plain, &Default::default()).expect("int8 export");
    assert_eq!(int8.recalibrated_on, Some(recorded.n_holdout), "{int8:?}");

    let with_head = dir.path().join("with-head");
    let mut again = tiny_config(&data, &with_head, BackboneKind::ResNet18);
    again.teacher = TeacherWeights::Random;
    again.reuse_student = Some(plain.clone());
    again.seed = 99;
    let second = train(&again, Arc::new(AtomicBool::new(false))).expect("reuse");
    let manifest = &second.bundle.manifest;
    let head = manifest.model.head.as_ref().expect("a head section");
    assert!(head.logit_std > 0.0 && head.weight == 1.0, "{head:?}");
    // The student's seed and image cap (this run's default is larger), so the same images are
    // held out; the student itself unchanged.
    assert_eq!(manifest.training.seed, 17);
    assert_eq!(
        (manifest.training.n_train, manifest.training.n_holdout),
        (recorded.n_train, recorded.n_holdout)
    );
    assert_eq!(manifest.training.max_images, 6);
    // The same student: its features of one input agree.
    let device = compute_device();
    let image = Tensor::<4>::from_data(
        TensorData::new(vec![0.25f32; 3 * SIZE * SIZE], [1, 3, SIZE, SIZE]),
        &device,
    );
    let features = |dir: &std::path::Path| {
        let student = weights::load_safetensors(
            BackboneKind::ResNet18,
            &dir.join("student.safetensors"),
            &device,
        )
        .expect("student");
        let [_, _, deepest] = student.pyramid(image.clone()).0;
        stpm::model::to_vec(deepest)
    };
    let (difference, scale) = common::max_abs_diff(&features(&plain), &features(&with_head));
    assert!(
        difference <= 1e-6 * scale.max(1.0),
        "the reused student changed: {difference:e}"
    );

    // Another folder is refused: with the adopted cap its 9 images give the same split counts (5 +
    // 1) as the student's 7, so the recorded folder size (`images_found`) is what tells.
    let other = good_images(&dir.path().join("other"), 9, 64, 5);
    let mut wrong_data = tiny_config(
        &other,
        &dir.path().join("wrong-data"),
        BackboneKind::ResNet18,
    );
    wrong_data.teacher = TeacherWeights::Random;
    wrong_data.reuse_student = Some(plain.clone());
    let error = train(&wrong_data, Arc::new(AtomicBool::new(false))).expect_err("other data");
    assert!(
        error.to_string().contains("give --data the folder"),
        "{error}"
    );

    let mut wrong_size = tiny_config(&data, &dir.path().join("wrong"), BackboneKind::ResNet18);
    wrong_size.reuse_student = Some(plain);
    wrong_size.image_size = 128;
    let error = train(&wrong_size, Arc::new(AtomicBool::new(false))).expect_err("size");
    assert!(error.to_string().contains("--image-size is 128"), "{error}");
}

#[test]
fn flip_augmentation_is_recorded_and_changes_what_is_learnt() {
    let dir = tempfile::tempdir().expect("dir");
    let data = good_images(dir.path(), 7, 64, 4);
    let input: Vec<f32> = {
        let mut rng = SplitMix::new(5);
        (0..3 * SIZE * SIZE).map(|_| rng.range(-2.0, 2.0)).collect()
    };
    let mut maps = Vec::new();
    for augment in [Augment::None, Augment::Flips] {
        let out = dir.path().join(augment.name());
        let (bundle, map) = train_random_resnet(&data, &out, 17, augment, &input);
        let training = &bundle.manifest.training;
        assert_eq!(training.augment, augment.name());
        assert_eq!(
            training.lr_schedule, "cosine",
            "the default schedule is recorded"
        );
        // As many training images (and steps) as without augmentation.
        assert_eq!((training.n_train, training.n_holdout), (6, 1));
        let losses = &training.epoch_losses;
        assert!(
            losses[1] < losses[0],
            "{augment:?}: epoch losses {losses:?}"
        );
        maps.push(map);
    }
    // Same seed, same images: only the mirrored copies drawn can make the students differ.
    let (difference, scale) = common::max_abs_diff(&maps[1], &maps[0]);
    assert!(
        difference > 1e-2 * scale,
        "augmented and plain students should differ: {difference:e} (map max {scale:e})"
    );
}

#[test]
fn stop_flag_still_writes_a_usable_bundle() {
    let dir = tempfile::tempdir().expect("dir");
    let data = good_images(dir.path(), 5, 64, 4);
    let out = dir.path().join("bundle");
    let mut config = tiny_config(&data, &out, BackboneKind::ResNet18);
    config.teacher = TeacherWeights::Random;
    config.epochs = 50;
    // Already set: as if Ctrl-C came before the first step.
    let outcome = train(&config, Arc::new(AtomicBool::new(true))).expect("train");
    assert!(outcome.bundle.manifest.training.interrupted);
    assert_eq!(outcome.bundle.manifest.training.epochs_run, 0);
    let mut engine = Engine::open(
        &outcome.bundle.model_path(),
        [SIZE, SIZE],
        EngineOptions::default(),
    )
    .expect("engine");
    let scores = engine.run(&vec![0.1; 3 * SIZE * SIZE], 1).expect("run");
    assert!(scores.scores[0].is_finite());
}
