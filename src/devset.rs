//! Synthetic MVTec-layout data sets (textured surfaces with scratches and stains, exact masks) for
//! the demo and the tests, so neither needs a download. Deterministic for a given seed.

use std::f32::consts::PI;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};

use crate::rng::SplitMix;

#[derive(Debug, thiserror::Error)]
pub enum DevsetError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: image::ImageError,
    },
}

/// How many images of each kind to write, and how large.
#[derive(Debug, Clone, Copy)]
pub struct DevsetSpec {
    pub size: u32,
    pub train: usize,
    pub test_good: usize,
    pub test_per_defect: usize,
    pub seed: u64,
}

/// The defect types written under `test/` and `ground_truth/`.
pub const DEFECT_TYPES: [&str; 2] = ["scratch", "stain"];

/// A woven-fabric-like texture with per-image phase, slight rotation and smooth noise.
pub(crate) fn texture(size: u32, rng: &mut SplitMix) -> RgbImage {
    let s = size as f32;
    let period = s / 16.0;
    let angle = rng.range(-0.05, 0.05);
    let (phase_u, phase_v) = (rng.range(0.0, 2.0 * PI), rng.range(0.0, 2.0 * PI));
    let base = [
        0.55 + rng.range(-0.03, 0.03),
        0.48 + rng.range(-0.03, 0.03),
        0.38 + rng.range(-0.03, 0.03),
    ];
    // Smooth noise: random values on an 9×9 grid, bilinearly interpolated.
    let grid: Vec<f32> = (0..81).map(|_| rng.range(-0.06, 0.06)).collect();
    let grain: Vec<f32> = (0..size * size).map(|_| rng.range(-0.03, 0.03)).collect();
    RgbImage::from_fn(size, size, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let u = fx * angle.cos() + fy * angle.sin();
        let v = -fx * angle.sin() + fy * angle.cos();
        let weave =
            (2.0 * PI * u / period + phase_u).sin() * (2.0 * PI * v / period + phase_v).sin();
        let (gx, gy) = (fx / s * 8.0, fy / s * 8.0);
        let (ix, iy) = (gx.floor() as usize, gy.floor() as usize);
        let (tx, ty) = (gx - ix as f32, gy - iy as f32);
        let at = |i: usize, j: usize| grid[(j.min(8)) * 9 + i.min(8)];
        let noise = at(ix, iy) * (1.0 - tx) * (1.0 - ty)
            + at(ix + 1, iy) * tx * (1.0 - ty)
            + at(ix, iy + 1) * (1.0 - tx) * ty
            + at(ix + 1, iy + 1) * tx * ty;
        let shade = 0.12 * weave + noise + grain[(y * size + x) as usize];
        Rgb(std::array::from_fn(|c| {
            ((base[c] + shade).clamp(0.0, 1.0) * 255.0) as u8
        }))
    })
}

/// Paints one defect of `kind` onto `image` and returns its exact mask.
pub(crate) fn add_defect(image: &mut RgbImage, kind: &str, rng: &mut SplitMix) -> GrayImage {
    let size = image.width();
    let s = size as f32;
    let mut mask = GrayImage::new(size, size);
    let margin = s * 0.15;
    let (cx, cy) = (rng.range(margin, s - margin), rng.range(margin, s - margin));
    match kind {
        "scratch" => {
            let length = rng.range(0.2, 0.4) * s;
            let angle = rng.range(0.0, PI);
            let (dx, dy) = (angle.cos(), angle.sin());
            let half_width = (s / 128.0).max(1.0);
            for y in 0..size {
                for x in 0..size {
                    let (px, py) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                    let along = px * dx + py * dy;
                    let across = (-px * dy + py * dx).abs();
                    if along.abs() <= length / 2.0 && across <= half_width {
                        image.put_pixel(x, y, Rgb([40, 35, 30]));
                        mask.put_pixel(x, y, Luma([255]));
                    }
                }
            }
        }
        _ => {
            let (rx, ry) = (rng.range(0.04, 0.09) * s, rng.range(0.04, 0.09) * s);
            let tint = [
                rng.range(0.1, 0.3),
                rng.range(0.3, 0.5),
                rng.range(0.5, 0.7),
            ];
            for y in 0..size {
                for x in 0..size {
                    let (px, py) = ((x as f32 + 0.5 - cx) / rx, (y as f32 + 0.5 - cy) / ry);
                    if px * px + py * py <= 1.0 {
                        let pixel = image.get_pixel_mut(x, y);
                        for (channel, tint) in pixel.0.iter_mut().zip(tint) {
                            *channel = (*channel as f32 * 0.4 + tint * 255.0 * 0.6) as u8;
                        }
                        mask.put_pixel(x, y, Luma([255]));
                    }
                }
            }
        }
    }
    mask
}

pub(crate) fn create_dir(path: &Path) -> Result<(), DevsetError> {
    std::fs::create_dir_all(path).map_err(|source| DevsetError::Create {
        path: path.to_path_buf(),
        source,
    })
}

fn save_rgb(image: &RgbImage, path: PathBuf) -> Result<(), DevsetError> {
    image
        .save(&path)
        .map_err(|source| DevsetError::Write { path, source })
}

/// Writes one category in MVTec layout under `root`: `train/good`, `test/good`,
/// `test/<defect>` and `ground_truth/<defect>/<stem>_mask.png`.
pub fn write_category(root: &Path, spec: &DevsetSpec) -> Result<(), DevsetError> {
    let mut rng = SplitMix::new(spec.seed);
    for (dir, count) in [("train/good", spec.train), ("test/good", spec.test_good)] {
        let folder = root.join(dir);
        create_dir(&folder)?;
        for index in 0..count {
            save_rgb(
                &texture(spec.size, &mut rng),
                folder.join(format!("{index:03}.png")),
            )?;
        }
    }
    for kind in DEFECT_TYPES {
        let (images, masks) = (
            root.join("test").join(kind),
            root.join("ground_truth").join(kind),
        );
        create_dir(&images)?;
        create_dir(&masks)?;
        for index in 0..spec.test_per_defect {
            let mut image = texture(spec.size, &mut rng);
            let mask = add_defect(&mut image, kind, &mut rng);
            save_rgb(&image, images.join(format!("{index:03}.png")))?;
            let mask_path = masks.join(format!("{index:03}_mask.png"));
            mask.save(&mask_path).map_err(|source| DevsetError::Write {
                path: mask_path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mvtec_layout_with_nonempty_masks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = DevsetSpec {
            size: 64,
            train: 3,
            test_good: 2,
            test_per_defect: 2,
            seed: 7,
        };
        write_category(dir.path(), &spec).expect("write");
        assert_eq!(
            std::fs::read_dir(dir.path().join("train/good"))
                .expect("dir")
                .count(),
            3
        );
        for kind in DEFECT_TYPES {
            for index in 0..2 {
                let mask = image::open(
                    dir.path()
                        .join(format!("ground_truth/{kind}/{index:03}_mask.png")),
                )
                .expect("mask")
                .to_luma8();
                let on = mask.pixels().filter(|p| p.0[0] == 255).count();
                assert!(
                    on > 0 && on < 64 * 64 / 4,
                    "{kind} {index}: {on} defect pixels"
                );
            }
        }
    }

    #[test]
    fn same_seed_same_images() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let spec = DevsetSpec {
            size: 32,
            train: 1,
            test_good: 0,
            test_per_defect: 1,
            seed: 3,
        };
        write_category(a.path(), &spec).expect("write a");
        write_category(b.path(), &spec).expect("write b");
        for file in [
            "train/good/000.png",
            "test/stain/000.png",
            "ground_truth/scratch/000_mask.png",
        ] {
            let read = |root: &Path| std::fs::read(root.join(file)).expect("read");
            assert_eq!(read(a.path()), read(b.path()), "{file}");
        }
    }
}
