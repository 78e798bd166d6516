//! The Rust EfficientNet-Lite0 teacher against the PyTorch reference (tests/fixtures, made by
//! scripts/dev/make_golden.py): intermediate features and the ImageNet classifier's top-5.

mod common;

use burn::prelude::*;
use serde_json::Value;
use stpm::model::weights;
use stpm::model::{BackboneKind, compute_device};

fn fixture() -> Value {
    let text = std::fs::read_to_string(common::repo(
        "tests/fixtures/efficientnet_lite0_golden.json",
    ))
    .expect("fixture");
    serde_json::from_str(&text).expect("fixture json")
}

fn f64s(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

#[test]
fn features_match_pytorch_within_1e4_relative() {
    let golden = fixture();
    let device = compute_device();
    let teacher = weights::load_backbone(
        BackboneKind::EfficientNetLite0,
        &common::lite0_weights(),
        &device,
    )
    .expect("load");
    // x[0,c,h,w] = sin((0.05*(w+1))*(c+1) + 0.07*h), in f64 then f32 (as the fixture's formula).
    let (h, w) = (64usize, 64usize);
    let mut input = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                input.push(
                    ((0.05 * (x as f64 + 1.0)) * (c as f64 + 1.0) + 0.07 * y as f64).sin() as f32,
                );
            }
        }
    }
    let image = Tensor::<4>::from_data(TensorData::new(input, [1, 3, h, w]), &device);
    let pyramid = teacher.pyramid(image);
    for (scale, name) in ["stride4", "stride8", "stride16"].iter().enumerate() {
        let tap = &golden["features"]["taps"][name];
        let tensor = pyramid.0[scale].clone();
        let dims = tensor.dims();
        let expected_shape: Vec<usize> = f64s(&tap["shape"]).iter().map(|&v| v as usize).collect();
        assert_eq!(dims.to_vec(), expected_shape, "{name} shape");
        let values = stpm::model::to_vec(tensor);
        let [_, channels, th, tw] = dims;

        let sums = f64s(&tap["channel_sums"]);
        let sum_scale = sums.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let mut worst = 0.0f64;
        for (c, expected) in sums.iter().enumerate() {
            let got: f64 = values[c * th * tw..(c + 1) * th * tw]
                .iter()
                .map(|&v| v as f64)
                .sum();
            worst = worst.max((got - expected).abs() / sum_scale);
        }
        assert!(
            worst <= 1e-4,
            "{name}: channel sums differ by {worst:e} of the largest sum"
        );

        let points = tap["points"].as_array().expect("points");
        let point_scale = points.iter().fold(0.0f64, |m, p| {
            m.max(p["value"].as_f64().unwrap_or(0.0).abs())
        });
        for point in points {
            let at = |key: &str| point[key].as_u64().expect("index") as usize;
            let (c, y, x) = (at("c"), at("h"), at("w"));
            assert!(c < channels);
            let got = values[c * th * tw + y * tw + x] as f64;
            let expected = point["value"].as_f64().expect("value");
            let error = (got - expected).abs() / point_scale;
            assert!(
                error <= 1e-4,
                "{name} at c={c} h={y} w={x}: {got} vs {expected} ({error:e} relative)"
            );
        }
        println!("{name}: worst channel-sum error {worst:e} (relative to the largest sum)");
    }
}

#[test]
fn classifier_top5_on_chelsea_matches_pytorch() {
    let golden = fixture();
    let device = compute_device();
    let classifier =
        weights::load_lite0_classifier(&common::lite0_weights(), &device).expect("load classifier");
    let image = image::open(common::repo("tests/fixtures/chelsea_224.png"))
        .expect("png")
        .to_rgb8();
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut input = vec![0.0f32; 3 * h * w];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            input[c * h * w + i] = (pixel.0[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    let logits = classifier
        .logits(Tensor::<4>::from_data(
            TensorData::new(input, [1, 3, h, w]),
            &device,
        ))
        .expect("classifier head");
    let logits = stpm::model::to_vec(logits);
    let mut ranked: Vec<usize> = (0..logits.len()).collect();
    ranked.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));

    let expected: Vec<usize> = golden["classifier"]["top5"]
        .as_array()
        .expect("top5")
        .iter()
        .map(|entry| entry["class"].as_u64().expect("class") as usize)
        .collect();
    assert_eq!(&ranked[..5], expected.as_slice(), "top-5 ImageNet classes");
    assert!(
        expected[..3].iter().all(|c| (281..=285).contains(c)),
        "chelsea is a cat: {expected:?}"
    );

    let reference: Vec<f32> = f64s(&golden["classifier"]["logits"])
        .iter()
        .map(|&v| v as f32)
        .collect();
    let (diff, scale) = common::max_abs_diff(&logits, &reference);
    assert!(
        diff <= 1e-4 * scale,
        "logits differ by {diff} (largest logit {scale})"
    );
}

#[test]
fn weights_of_another_architecture_are_reported_key_by_key() {
    let device = compute_device();
    let error = weights::load_backbone(BackboneKind::ResNet18, &common::lite0_weights(), &device)
        .expect_err("Lite0 weights cannot fill a ResNet-18");
    let message = error.to_string();
    assert!(message.contains("missing key(s)"), "{message}");
    assert!(
        message.contains("layer1.0.conv1.weight"),
        "names a missing key: {message}"
    );
    assert!(message.contains("unexpected key(s)"), "{message}");
    assert!(
        message.contains("_blocks.0._depthwise_conv.weight")
            || message.contains("blocks.0.depthwise_conv.weight"),
        "{message}"
    );
}

#[test]
fn missing_weights_file_is_named() {
    let device = compute_device();
    let error = weights::load_backbone(
        BackboneKind::EfficientNetLite0,
        std::path::Path::new("/nonexistent/w.pth"),
        &device,
    )
    .expect_err("missing");
    assert!(error.to_string().contains("/nonexistent/w.pth"), "{error}");
}
