//! Synthetic defects pasted into good training images, for the defect head: a region (a smooth
//! blob of random size and shape, or a thin wandering line) where the image is darkened or
//! brightened, replaced by another good image turned and mirrored or by noise, or blurred; with
//! the region's mask. Works on the normalised CHW images training uses; pure functions of the seed.

use super::prepare::turn;
use crate::preprocess::{Normalisation, resize_plane};
use crate::rng::SplitMix;

/// A good image with a synthetic defect, and the defect's mask (`size`², values in [0, 1]).
pub(super) struct Synthetic {
    pub(super) pixels: Vec<f32>,
    pub(super) mask: Vec<f32>,
}

/// Pastes one synthetic defect into `image` (normalised CHW, `size`², square), drawing the kind
/// and region from `rng`; `others` are good images of the same size a foreign texture comes from.
pub(super) fn paste_defect(
    image: &[f32],
    others: &[&[f32]],
    size: usize,
    norm: &Normalisation,
    rng: &mut SplitMix,
) -> Synthetic {
    let plane = size * size;
    let unit: Vec<f32> = image
        .iter()
        .enumerate()
        .map(|(i, v)| v * norm.std[i / plane] + norm.mean[i / plane])
        .collect();
    let kind = rng.next_u64() % 4;
    let mask = if kind == 3 {
        line_mask(size, rng)
    } else {
        blob_mask(size, rng)
    };
    let defect: Vec<f32> = match kind {
        0 => {
            let sign = if rng.unit() < 0.5 { -1.0 } else { 1.0 };
            let gain = 1.0 + sign * rng.range(0.1, 0.5);
            let offset = rng.range(-0.05, 0.05);
            unit.iter()
                .map(|v| (v * gain + offset).clamp(0.0, 1.0))
                .collect()
        }
        1 if rng.unit() < 0.3 => {
            let sigma = rng.range(0.05, 0.2);
            unit.iter()
                .map(|v| (v + sigma * normal(rng)).clamp(0.0, 1.0))
                .collect()
        }
        1 => {
            let other = others[(rng.next_u64() % others.len().max(1) as u64) as usize];
            let turned = turn(other, size, (rng.next_u64() % 4) as usize, rng.unit() < 0.5);
            let blend = rng.range(0.5, 1.0);
            unit.iter()
                .zip(turned.iter().enumerate())
                .map(|(v, (i, o))| {
                    let o = o * norm.std[i / plane] + norm.mean[i / plane];
                    (1.0 - blend) * v + blend * o
                })
                .collect()
        }
        2 => {
            let sigma = rng.range(2.0, 6.0);
            unit.chunks_exact(plane)
                .flat_map(|channel| blur(channel, size, sigma))
                .collect()
        }
        _ => {
            let value = match rng.next_u64() % 4 {
                0 => 0.0,
                1 => 1.0,
                _ => unit.iter().sum::<f32>() / unit.len().max(1) as f32 * rng.range(0.2, 0.6),
            };
            let (keep, add) = (rng.range(0.4, 1.0), rng.range(0.4, 1.0));
            unit.iter()
                .enumerate()
                .map(|(i, v)| {
                    let m = mask[i % plane];
                    (v * (1.0 - keep * m) + value * add * m).clamp(0.0, 1.0)
                })
                .collect()
        }
    };
    let pixels = unit
        .iter()
        .zip(&defect)
        .enumerate()
        .map(|(i, (v, d))| {
            let m = mask[i % plane];
            let mixed = v * (1.0 - m) + d * m;
            (mixed - norm.mean[i / plane]) / norm.std[i / plane]
        })
        .collect();
    Synthetic { pixels, mask }
}

/// Per `stride`² block of a `size`² mask: 1 where the block is more than a quarter defect.
pub(super) fn block_targets(mask: &[f32], size: usize, stride: usize) -> Vec<f32> {
    let blocks = size / stride;
    let mut out = vec![0.0; blocks * blocks];
    for (b, target) in out.iter_mut().enumerate() {
        let (by, bx) = (b / blocks, b % blocks);
        let mut sum = 0.0;
        for y in by * stride..(by + 1) * stride {
            sum += mask[y * size + bx * stride..y * size + (bx + 1) * stride]
                .iter()
                .sum::<f32>();
        }
        *target = if sum / (stride * stride) as f32 > 0.25 {
            1.0
        } else {
            0.0
        };
    }
    out
}

/// A standard normal draw (Box–Muller).
pub(super) fn normal(rng: &mut SplitMix) -> f32 {
    let u = rng.unit().max(1e-7);
    let v = rng.unit();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Smooth blobs covering 0.5–15 % of the image: noise smoothed on a 4× coarser grid, enlarged,
/// thresholded at a random quantile, its edge softened over about a pixel.
fn blob_mask(size: usize, rng: &mut SplitMix) -> Vec<f32> {
    let coarse = (size / 4).max(2);
    let noise: Vec<f32> = (0..coarse * coarse).map(|_| normal(rng)).collect();
    let field = resize_plane(
        &blur(&noise, coarse, rng.range(1.0, 6.0)),
        [coarse, coarse],
        [size, size],
    );
    let mut sorted = field.clone();
    sorted.sort_by(f32::total_cmp);
    let share = rng.range(0.005, 0.15);
    let cut = sorted[((1.0 - share) * (sorted.len() - 1) as f32) as usize];
    let binary: Vec<f32> = field
        .iter()
        .map(|&v| if v > cut { 1.0 } else { 0.0 })
        .collect();
    blur(&binary, size, 1.0)
}

/// A thin line (0.8–3 px) wandering for 20–120 px from a random point.
fn line_mask(size: usize, rng: &mut SplitMix) -> Vec<f32> {
    let mut mask = vec![0.0f32; size * size];
    let margin = size as f32 * 0.08;
    let (mut x, mut y) = (
        rng.range(margin, size as f32 - margin),
        rng.range(margin, size as f32 - margin),
    );
    let mut angle = rng.range(0.0, std::f32::consts::PI);
    let length = rng.range(20.0, 120.0) * size as f32 / 256.0;
    for _ in 0..(length * 2.0) as usize {
        angle += 0.05 * normal(rng);
        x += 0.5 * angle.cos();
        y += 0.5 * angle.sin();
        if (0.0..size as f32).contains(&x) && (0.0..size as f32).contains(&y) {
            mask[y as usize * size + x as usize] = 1.0;
        }
    }
    let blurred = blur(&mask, size, rng.range(0.8, 3.0));
    let peak = blurred.iter().copied().fold(0.0f32, f32::max).max(1e-6);
    blurred.iter().map(|v| (v / peak * 1.5).min(1.0)).collect()
}

/// Separable Gaussian blur of a `size`² plane, edges clamped.
fn blur(plane: &[f32], size: usize, sigma: f32) -> Vec<f32> {
    let taps = crate::model::features::gaussian_kernel(sigma);
    let r = (taps.len() / 2) as isize;
    let clamp =
        |i: usize, k: usize| (i as isize + k as isize - r).clamp(0, size as isize - 1) as usize;
    // One pass along the rows (`across`) or down the columns.
    let pass = |source: &[f32], across: bool| -> Vec<f32> {
        (0..size * size)
            .map(|i| {
                let (y, x) = (i / size, i % size);
                taps.iter()
                    .enumerate()
                    .map(|(k, t)| {
                        let at = if across {
                            y * size + clamp(x, k)
                        } else {
                            clamp(y, k) * size + x
                        };
                        t * source[at]
                    })
                    .sum()
            })
            .collect()
    };
    pass(&pass(plane, true), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NORM: Normalisation = Normalisation {
        mean: [0.5; 3],
        std: [0.5; 3],
    };

    fn image(size: usize, phase: f32) -> Vec<f32> {
        (0..3 * size * size)
            .map(|i| ((i as f32) * 0.01 + phase).sin() * 0.5)
            .collect()
    }

    #[test]
    fn defects_change_the_image_only_inside_their_mask() {
        let size = 64;
        let good = image(size, 0.0);
        let other = image(size, 1.0);
        let mut rng = SplitMix::new(7);
        for _ in 0..40 {
            let synthetic = paste_defect(&good, &[&other], size, &NORM, &mut rng);
            assert_eq!(synthetic.pixels.len(), good.len());
            let covered = synthetic.mask.iter().filter(|&&m| m > 0.5).count();
            assert!(covered > 0, "an empty mask");
            assert!(
                covered < size * size / 2,
                "{covered} of {} pixels",
                size * size
            );
            for (i, (a, b)) in synthetic.pixels.iter().zip(&good).enumerate() {
                if synthetic.mask[i % (size * size)] == 0.0 {
                    assert!((a - b).abs() < 1e-5, "pixel {i} changed outside the mask");
                }
                assert!(a.abs() <= 1.0 + 1e-5, "pixel {i} out of range: {a}");
            }
        }
    }

    #[test]
    fn the_same_seed_pastes_the_same_defect() {
        let good = image(32, 0.3);
        let draw = |seed| paste_defect(&good, &[&good], 32, &NORM, &mut SplitMix::new(seed)).pixels;
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn block_targets_mark_blocks_more_than_a_quarter_covered() {
        let size = 16;
        let mut mask = vec![0.0; size * size];
        // 3 × 8 pixels of the top-left 8×8 block (37 %), 1 × 8 of the top-right one (12 %).
        for y in 0..3 {
            for x in 0..8 {
                mask[y * size + x] = 1.0;
            }
        }
        for x in 8..16 {
            mask[5 * size + x] = 1.0;
        }
        assert_eq!(block_targets(&mask, size, 8), vec![1.0, 0.0, 0.0, 0.0]);
    }
}
