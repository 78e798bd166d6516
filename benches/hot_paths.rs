//! The hot non-inference stages of a frame, so regressions show up in `cargo bench`:
//! preprocessing a 640×480 frame into the 256×256 input, the live (OpenCV) and plain-Rust overlays,
//! and the evaluation's pixel metrics on one million pixels.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use stpm::bundle::Calibration;
use stpm::eval::pixels;
use stpm::pipeline::conveyor::Conveyor;
use stpm::preprocess::{self, Normalisation};

fn calibration() -> Calibration {
    Calibration {
        threshold: 1.0,
        floor: 0.0,
        method: "bench".into(),
        n_images: 1,
        good_median: 0.2,
    }
}

fn hot_paths(c: &mut Criterion) {
    let frame = Conveyor::new(640, 480, 1).frame(60).frame;
    let norm = Normalisation {
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    c.bench_function("preprocess 640x480 -> 256x256", |b| {
        b.iter(|| preprocess::to_chw(black_box(&frame), [256, 256], &norm))
    });

    // A map with one hot blob, at frame size, as the pipeline hands to the overlay.
    let map: Vec<f32> = (0..640 * 480)
        .map(|i| {
            let (x, y) = ((i % 640) as f32, (i / 640) as f32);
            let d2 = (x - 320.0).powi(2) + (y - 240.0).powi(2);
            0.3 + 1.5 * (-d2 / 2000.0).exp()
        })
        .collect();
    let calibration = calibration();
    let caption = stpm::overlay::live::Caption {
        camera: "line1",
        fps: 15.0,
    };
    c.bench_function("overlay opencv 640x480", |b| {
        b.iter(|| {
            stpm::overlay::live::annotate(&frame, black_box(&map), &calibration, 1.8, &caption)
        })
    });
    // A good part: the map stays below the alert level everywhere (the common case on a line).
    let quiet: Vec<f32> = map.iter().map(|&v| v.min(0.5)).collect();
    c.bench_function("overlay opencv 640x480, nothing anomalous", |b| {
        b.iter(|| {
            stpm::overlay::live::annotate(&frame, black_box(&quiet), &calibration, 0.5, &caption)
        })
    });
    // What the pipeline calls: the model's 256×256 map, resized only when something is above the
    // alert level.
    let small: Vec<f32> = (0..256 * 256)
        .map(|i| {
            let (x, y) = ((i % 256) as f32, (i / 256) as f32);
            let d2 = (x - 128.0).powi(2) + (y - 128.0).powi(2);
            0.3 + 1.5 * (-d2 / 300.0).exp()
        })
        .collect();
    let small_quiet: Vec<f32> = small.iter().map(|&v| v.min(0.5)).collect();
    for (name, model_map) in [
        ("overlay from the 256x256 map, 640x480", &small),
        (
            "overlay from the 256x256 map, 640x480, nothing anomalous",
            &small_quiet,
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                stpm::overlay::live::annotate_model_map(
                    &frame,
                    black_box(model_map),
                    [256, 256],
                    &calibration,
                    0.5,
                    &caption,
                )
            })
        });
    }
    c.bench_function("overlay plain-rust 640x480", |b| {
        b.iter(|| stpm::overlay::annotate(&frame, black_box(&map), None, &calibration, 1.8))
    });
    c.bench_function("map resize 256x256 -> 640x480", |b| {
        let small = vec![0.5f32; 256 * 256];
        b.iter(|| preprocess::resize_plane(black_box(&small), [256, 256], [480, 640]))
    });

    // The alert summary of every analysed frame: top score and the boxes of the hot regions of
    // the model's 256×256 map (normalised), on a quiet frame and on one with a hot blob.
    let zones = stpm::alerts::ZoneMask::new(256, 256, &[], &[]);
    let below: Vec<f32> = small.iter().map(|&v| v.min(0.45)).collect();
    for (name, model_map) in [
        ("alert zones summary 256x256, one hot region", &small),
        ("alert zones summary 256x256, nothing anomalous", &below),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| zones.summarise(black_box(model_map), 0.5))
        });
    }

    // One million pixels (four 512x512 images, two good) with a few thousand distinct values and
    // 1 % defect pixels (2 % of the two defective images), through what `stpm eval` runs: the pixel table and its merged sweep.
    let side = 512;
    let images: Vec<(Vec<f32>, Vec<bool>, u16)> = (0..4)
        .map(|image| {
            let scores: Vec<f32> = (0..side * side)
                .map(|i| (((i + image * 31) * 7919) % 4096) as f32 / 4096.0)
                .collect();
            let mask: Vec<bool> = (0..side * side)
                .map(|i| image % 2 == 1 && (i % side) < 20 && (i / side) % 2 == 0)
                .collect();
            (scores, mask, (image % 2) as u16)
        })
        .collect();
    c.bench_function("pixel metrics: table + merged sweep, 1M pixels", |b| {
        b.iter(|| {
            let mut table = pixels::PixelTable::default();
            for (scores, mask, group) in &images {
                table.add_image(black_box(scores), mask, side, *group);
            }
            table.metrics(Some(0), 2).all.auroc
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = hot_paths
}
criterion_main!(benches);
