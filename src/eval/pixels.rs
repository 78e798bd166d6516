//! Every test pixel's score and ground truth, kept compactly per image, and `stpm eval`'s pixel
//! metrics from one merged sweep over them: pixel AUROC and AUPRO (MVTec protocol, 8-connected
//! regions) of all test images and of each defect type with the good images, with their curves
//! thinned for drawing. Exact: every distinct score is a threshold, as with one sorted table of all
//! pixels, in about 4 bytes a normal pixel and 8 a defect pixel. Does not read images or masks
//! (`eval` brings them at mask resolution) nor compute image-level metrics (`detection`).

use std::collections::BinaryHeap;
use std::collections::binary_heap::PeekMut;

use crate::eval::detection::{Curve, CurveSweep, score_key};

/// The MVTec false-positive-rate limit for AUPRO.
pub const AUPRO_FPR_LIMIT: f64 = 0.3;

/// Kept points of a pixel curve are at least this far apart (in x or y): a few thousand points.
const PLOT_SPACING: f64 = 5e-4;

/// Labels the 8-connected regions of `mask` (row-major, `width` wide): 0 for background, regions
/// 1..=n in raster order of their first pixel. Returns the labels and n.
pub fn label_regions(mask: &[bool], width: usize) -> (Vec<u32>, u32) {
    assert!(
        width > 0 && mask.len().is_multiple_of(width),
        "a mask of {} pixels is not rows of {width}",
        mask.len()
    );
    let height = mask.len() / width;
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(index) = stack.pop() {
            let (y, x) = (index / width, index % width);
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let next = ny * width + nx;
                    if mask[next] && labels[next] == 0 {
                        labels[next] = count;
                        stack.push(next);
                    }
                }
            }
        }
    }
    (labels, count)
}

/// Stream `2i` of the merge is image i's normal pixels, `2i + 1` its defect pixels: (i, defect).
fn stream_parts(stream: usize) -> (usize, bool) {
    (stream >> 1, stream & 1 == 1)
}

/// One test image's pixels, each part sorted from the highest score down.
struct ImagePixels {
    /// Score keys of the normal pixels.
    normal: Vec<u32>,
    /// (score key << 32) | global region id (1-based) of the defect pixels.
    defect: Vec<u64>,
    /// The image's group (its defect type).
    group: u16,
    /// How many ground-truth regions it has.
    regions: u32,
}

/// The test images' pixels at mask resolution and their ground-truth regions.
#[derive(Default)]
pub struct PixelTable {
    images: Vec<ImagePixels>,
    /// Pixel count of every region, by global id − 1.
    region_sizes: Vec<u32>,
}

/// Pixel metrics of a set of images.
#[derive(Debug, Clone, Default)]
pub struct PixelMetrics {
    /// Area under the pixel ROC curve; `None` without normal or defect pixels.
    pub auroc: Option<f64>,
    /// Normalised area under the PRO curve up to [`AUPRO_FPR_LIMIT`]; `None` without regions.
    pub aupro: Option<f64>,
    /// The ROC curve, thinned for drawing.
    pub roc: Option<Curve>,
    /// The PRO curve, thinned for drawing.
    pub pro: Option<Curve>,
}

/// [`PixelTable::metrics`]: of every image, and of each group's images with the good ones.
#[derive(Debug, Clone)]
pub struct PixelReport {
    /// Of every image.
    pub all: PixelMetrics,
    /// By group; the good group's entry is empty.
    pub groups: Vec<PixelMetrics>,
}

/// One curve pair (ROC and PRO) of a set of images during the sweep.
struct Sweeps {
    roc: CurveSweep,
    pro: CurveSweep,
    /// 1 / the number of regions in the set: a region's PRO weight is this over its size.
    region_share: f64,
}

impl PixelTable {
    /// Adds an image: its map `scores` and `truth` mask (row-major, `width` wide, the same size),
    /// in `group`.
    pub fn add_image(&mut self, scores: &[f32], truth: &[bool], width: usize, group: u16) {
        assert_eq!(scores.len(), truth.len(), "one mask pixel per score");
        let (labels, n) = label_regions(truth, width);
        let base = self.region_sizes.len() as u32;
        self.region_sizes.extend(std::iter::repeat_n(0, n as usize));
        let defects = labels.iter().filter(|&&l| l > 0).count();
        let mut normal = Vec::with_capacity(scores.len() - defects);
        let mut defect = Vec::with_capacity(defects);
        for (&score, &label) in scores.iter().zip(&labels) {
            let key = score_key(score);
            if label == 0 {
                normal.push(key);
            } else {
                let id = base + label;
                self.region_sizes[id as usize - 1] += 1;
                defect.push(u64::from(key) << 32 | u64::from(id));
            }
        }
        normal.sort_unstable_by(|a, b| b.cmp(a));
        defect.sort_unstable_by(|a, b| b.cmp(a));
        self.images.push(ImagePixels {
            normal,
            defect,
            group,
            regions: n,
        });
    }

    /// The pixel metrics of all images and, for each of `groups` groups but `good`, of that
    /// group's images with the good group's (alone when `good` is `None`; groups past `groups`
    /// that images name are counted too). One sweep through every pixel from the highest score
    /// down (a merge of the images' sorted pixels); each distinct score is one threshold.
    pub fn metrics(&self, good: Option<u16>, groups: usize) -> PixelReport {
        let groups = self
            .images
            .iter()
            .map(|image| usize::from(image.group) + 1)
            .fold(groups, usize::max);
        // Curve 0: every image; curve 1 + g: group g with the good images.
        let curves_of = |group: u16| -> Vec<usize> {
            if Some(group) == good {
                std::iter::once(0)
                    .chain(
                        (0..groups)
                            .filter(|&g| Some(g as u16) != good)
                            .map(|g| 1 + g),
                    )
                    .collect()
            } else {
                vec![0, 1 + group as usize]
            }
        };
        let image_curves: Vec<Vec<usize>> = self
            .images
            .iter()
            .map(|image| curves_of(image.group))
            .collect();
        let n_curves = 1 + groups;
        let (mut negatives, mut positives, mut regions) = (
            vec![0u64; n_curves],
            vec![0u64; n_curves],
            vec![0u64; n_curves],
        );
        for (image, curves) in self.images.iter().zip(&image_curves) {
            for &c in curves {
                negatives[c] += image.normal.len() as u64;
                positives[c] += image.defect.len() as u64;
                regions[c] += u64::from(image.regions);
            }
        }
        let mut sweeps: Vec<Sweeps> = (0..n_curves)
            .map(|c| {
                let region_share = 1.0 / regions[c].max(1) as f64;
                // The PRO weights' total: a share per region (each region's pixels add up to it).
                let pro_total = regions[c] as f64 * region_share;
                Sweeps {
                    roc: CurveSweep::new(
                        negatives[c] as f64,
                        positives[c] as f64,
                        1.0,
                        PLOT_SPACING,
                    ),
                    pro: CurveSweep::new(
                        negatives[c] as f64,
                        pro_total,
                        AUPRO_FPR_LIMIT,
                        PLOT_SPACING,
                    ),
                    region_share,
                }
            })
            .collect();

        // Streams 2i (image i's normal pixels) and 2i + 1 (its defect pixels); the heap holds
        // (key << 32 | stream) of each stream's next pixel.
        let stream_key = |stream: usize, at: usize| -> Option<u32> {
            let (image, defect) = stream_parts(stream);
            let image = &self.images[image];
            if defect {
                image.defect.get(at).map(|&p| (p >> 32) as u32)
            } else {
                image.normal.get(at).copied()
            }
        };
        let n_streams = 2 * self.images.len();
        let mut next = vec![0usize; n_streams];
        let mut heap: BinaryHeap<u64> = (0..n_streams)
            .filter_map(|s| stream_key(s, 0).map(|k| u64::from(k) << 32 | s as u64))
            .collect();
        let mut touched: Vec<usize> = Vec::new();
        let mut current: Option<u32> = None;
        while let Some(mut top) = heap.peek_mut() {
            let (key, stream) = ((*top >> 32) as u32, *top as u32 as usize);
            if current != Some(key) {
                for &c in &touched {
                    sweeps[c].roc.close();
                    sweeps[c].pro.close();
                }
                touched.clear();
                current = Some(key);
            }
            let (image, defect) = stream_parts(stream);
            let at = next[stream];
            for &c in &image_curves[image] {
                let curve = &mut sweeps[c];
                let first = if defect {
                    let id = self.images[image].defect[at] as u32 as usize;
                    let weight = curve.region_share / f64::from(self.region_sizes[id - 1]);
                    curve.pro.add(0.0, weight);
                    curve.roc.add(0.0, 1.0)
                } else {
                    curve.pro.add(1.0, 0.0);
                    curve.roc.add(1.0, 0.0)
                };
                if first {
                    touched.push(c);
                }
            }
            next[stream] = at + 1;
            match stream_key(stream, at + 1) {
                Some(k) => *top = u64::from(k) << 32 | stream as u64,
                None => {
                    PeekMut::pop(top);
                }
            }
        }
        let mut results = sweeps.into_iter().map(|sweeps| {
            let roc = sweeps.roc.finish();
            let pro = sweeps.pro.finish();
            PixelMetrics {
                auroc: roc.as_ref().map(|(area, _)| *area),
                aupro: pro.as_ref().map(|(area, _)| area / AUPRO_FPR_LIMIT),
                roc: roc.map(|(_, curve)| curve),
                pro: pro.map(|(_, curve)| curve),
            }
        });
        let all = results.next().unwrap_or_default();
        let groups = results
            .enumerate()
            .map(|(g, metrics)| {
                if Some(g as u16) == good {
                    PixelMetrics::default()
                } else {
                    metrics
                }
            })
            .collect();
        PixelReport { all, groups }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    /// Regions by repeated min-propagation over the 8 neighbours (slow, obviously right).
    fn slow_regions(mask: &[bool], width: usize) -> Vec<Vec<usize>> {
        let height = mask.len() / width;
        let mut id: Vec<usize> = (0..mask.len()).collect();
        loop {
            let mut changed = false;
            for y in 0..height {
                for x in 0..width {
                    let i = y * width + x;
                    if !mask[i] {
                        continue;
                    }
                    for dy in -1i64..=1 {
                        for dx in -1i64..=1 {
                            let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                            if ny < 0 || nx < 0 || ny >= height as i64 || nx >= width as i64 {
                                continue;
                            }
                            let j = ny as usize * width + nx as usize;
                            if mask[j] && id[j] < id[i] {
                                id[i] = id[j];
                                changed = true;
                            }
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for i in (0..mask.len()).filter(|&i| mask[i]) {
            groups.entry(id[i]).or_default().push(i);
        }
        groups.into_values().collect()
    }

    /// The MVTec procedure written out: every distinct threshold, FPR over all normal pixels, PRO
    /// averaged over regions, trapezoid up to the limit with interpolation, divided by the limit.
    fn slow_aupro(maps: &[Vec<f32>], masks: &[Vec<bool>], width: usize, limit: f64) -> f64 {
        let mut regions = Vec::new();
        for (image, mask) in masks.iter().enumerate() {
            for region in slow_regions(mask, width) {
                regions.push((image, region));
            }
        }
        let negatives: usize = masks.iter().flatten().filter(|&&m| !m).count();
        let mut thresholds: Vec<f32> = maps.iter().flatten().copied().collect();
        thresholds.sort_by(|a, b| b.total_cmp(a));
        thresholds.dedup();
        let mut points = vec![(0.0f64, 0.0f64)];
        for t in thresholds {
            let fp = maps
                .iter()
                .zip(masks)
                .flat_map(|(m, g)| m.iter().zip(g))
                .filter(|(v, g)| **v >= t && !**g)
                .count();
            let pro: f64 = regions
                .iter()
                .map(|(image, r)| {
                    r.iter().filter(|&&i| maps[*image][i] >= t).count() as f64 / r.len() as f64
                })
                .sum::<f64>()
                / regions.len() as f64;
            points.push((fp as f64 / negatives as f64, pro));
        }
        let mut area = 0.0;
        for w in points.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if x1 <= limit {
                area += (x1 - x0) * (y0 + y1) / 2.0;
            } else if x0 < limit {
                let y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0);
                area += (limit - x0) * (y0 + y_at) / 2.0;
            }
        }
        area / limit
    }

    /// AUPRO of every image through a [`PixelTable`], the last image good, the others one type.
    fn fast_aupro(maps: &[Vec<f32>], masks: &[Vec<bool>], width: usize) -> f64 {
        let mut table = PixelTable::default();
        for (index, (map, mask)) in maps.iter().zip(masks).enumerate() {
            let group = if index + 1 == maps.len() { 0 } else { 1 };
            table.add_image(map, mask, width, group);
        }
        table.metrics(Some(0), 2).all.aupro.expect("regions")
    }

    /// Random blobs: a few filled rectangles and single pixels per image, some touching diagonally.
    fn random_mask(rng: &mut SplitMix, width: usize, height: usize) -> Vec<bool> {
        let mut mask = vec![false; width * height];
        for _ in 0..1 + (rng.unit() * 4.0) as usize {
            let (x0, y0) = (
                (rng.unit() * width as f32) as usize,
                (rng.unit() * height as f32) as usize,
            );
            let (w, h) = (
                1 + (rng.unit() * 5.0) as usize,
                1 + (rng.unit() * 4.0) as usize,
            );
            for y in y0..(y0 + h).min(height) {
                for x in x0..(x0 + w).min(width) {
                    mask[y * width + x] = true;
                }
            }
        }
        mask
    }

    #[test]
    fn label_regions_joins_diagonal_neighbours_only() {
        #[rustfmt::skip]
        let mask = [
            true,  false, false, true,
            false, true,  false, false,
            false, false, false, true,
        ];
        let (labels, n) = label_regions(&mask, 4);
        assert_eq!(n, 3);
        assert_eq!(labels, vec![1, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3]);
        let mut rng = SplitMix::new(3);
        for _ in 0..20 {
            let mask = random_mask(&mut rng, 13, 9);
            let (_, n) = label_regions(&mask, 13);
            assert_eq!(n as usize, slow_regions(&mask, 13).len());
        }
    }

    #[test]
    fn aupro_matches_the_slow_mvtec_procedure() {
        let mut rng = SplitMix::new(11);
        let (width, height) = (16, 12);
        for trial in 0..8 {
            let n_images = 2 + trial % 3;
            let mut masks: Vec<Vec<bool>> = (0..n_images)
                .map(|_| random_mask(&mut rng, width, height))
                .collect();
            // One good image (no region) in every set.
            masks.push(vec![false; width * height]);
            let maps: Vec<Vec<f32>> = masks
                .iter()
                .map(|mask| {
                    mask.iter()
                        .map(|&m| {
                            // Quantised, so ties between normal and defect pixels are common.
                            let noise = (rng.unit() * 10.0).floor() / 10.0;
                            noise + if m { 0.3 } else { 0.0 }
                        })
                        .collect()
                })
                .collect();
            let fast = fast_aupro(&maps, &masks, width);
            let slow = slow_aupro(&maps, &masks, width, AUPRO_FPR_LIMIT);
            assert!(
                (fast - slow).abs() < 1e-4,
                "trial {trial}: {fast} vs {slow}"
            );
            assert!(fast > 0.0 && fast < 1.0, "trial {trial}: {fast}");
        }
    }

    #[test]
    fn aupro_known_answers() {
        let width = 8;
        let mut mask = vec![false; 64];
        for i in [9, 10, 17, 18, 45, 46, 47] {
            mask[i] = true;
        }
        let masks = vec![mask.clone(), vec![false; 64]];
        let perfect: Vec<Vec<f32>> = masks
            .iter()
            .map(|m| m.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect())
            .collect();
        assert!((fast_aupro(&perfect, &masks, width) - 1.0).abs() < 1e-12);
        let inverted: Vec<Vec<f32>> = perfect
            .iter()
            .map(|m| m.iter().map(|v| 1.0 - v).collect())
            .collect();
        assert!(fast_aupro(&inverted, &masks, width).abs() < 1e-12);
        let constant = vec![vec![0.5f32; 64]; 2];
        assert!((fast_aupro(&constant, &masks, width) - AUPRO_FPR_LIMIT / 2.0).abs() < 1e-12);
        // Finds one region of two fully at FPR 0 and the other never: PRO 0.5 until FPR 1.
        let half: Vec<Vec<f32>> = masks
            .iter()
            .map(|m| {
                m.iter()
                    .enumerate()
                    .map(|(i, &v)| if v && i < 20 { 1.0 } else { 0.0 })
                    .collect()
            })
            .collect();
        let half_score = fast_aupro(&half, &masks, width);
        assert!(half_score > 0.5 && half_score < 0.6, "{half_score}");
    }

    /// A map and mask: no defect in group 0 (good), random blobs otherwise; `score` of each pixel
    /// from whether it is a defect.
    fn random_image(
        rng: &mut SplitMix,
        width: usize,
        height: usize,
        group: u16,
        score: impl Fn(&mut SplitMix, bool) -> f32,
    ) -> (Vec<f32>, Vec<bool>) {
        let mask = if group == 0 {
            vec![false; width * height]
        } else {
            random_mask(rng, width, height)
        };
        let map = mask.iter().map(|&m| score(rng, m)).collect();
        (map, mask)
    }

    #[test]
    fn each_group_gets_the_metrics_of_its_images_with_the_good_ones() {
        let mut rng = SplitMix::new(5);
        let (width, height) = (14, 10);
        // Groups: 0 good, 1..=3 defect types; several images each; scores on a coarse grid so
        // that pixels of different images and kinds tie often.
        let groups = [0u16, 1, 2, 0, 3, 1, 2, 3, 0, 1];
        let mut table = PixelTable::default();
        let mut images = Vec::new();
        for &group in &groups {
            let (map, mask) = random_image(&mut rng, width, height, group, |rng, m| {
                (rng.unit() * 8.0).floor() / 8.0 + if m { 0.25 } else { 0.0 } - 0.5
            });
            table.add_image(&map, &mask, width, group);
            images.push((group, map, mask));
        }
        let report = table.metrics(Some(0), 4);
        assert!(report.groups[0].auroc.is_none() && report.groups[0].aupro.is_none());
        for curve in 0..4u16 {
            let members: Vec<&(u16, Vec<f32>, Vec<bool>)> = images
                .iter()
                .filter(|(g, _, _)| curve == 0 || *g == 0 || *g == curve)
                .collect();
            let metrics = if curve == 0 {
                &report.all
            } else {
                &report.groups[curve as usize]
            };
            let scores: Vec<f32> = members.iter().flat_map(|(_, m, _)| m.clone()).collect();
            let labels: Vec<bool> = members.iter().flat_map(|(_, _, t)| t.clone()).collect();
            let by_ranks = crate::eval::detection::auroc(&scores, &labels).expect("both kinds");
            let swept = metrics.auroc.expect("auroc");
            assert!(
                (swept - by_ranks).abs() < 1e-9,
                "curve {curve}: {swept} vs {by_ranks}"
            );
            let maps: Vec<Vec<f32>> = members.iter().map(|(_, m, _)| m.clone()).collect();
            let masks: Vec<Vec<bool>> = members.iter().map(|(_, _, t)| t.clone()).collect();
            let slow = slow_aupro(&maps, &masks, width, AUPRO_FPR_LIMIT);
            let swept = metrics.aupro.expect("aupro");
            assert!(
                (swept - slow).abs() < 1e-9,
                "curve {curve}: {swept} vs {slow}"
            );
        }
    }

    #[test]
    fn drawn_curves_are_thinned_and_run_from_zero_to_one() {
        let mut rng = SplitMix::new(9);
        let (width, height) = (200, 150);
        let mut table = PixelTable::default();
        for group in [1u16, 0, 1, 0] {
            // Every pixel its own score: 120 000 distinct thresholds.
            let (map, mask) = random_image(&mut rng, width, height, group, |rng, m| {
                rng.unit() + if m { 0.3 } else { 0.0 }
            });
            table.add_image(&map, &mask, width, group);
        }
        let report = table.metrics(Some(0), 2);
        for curve in [report.all.roc.as_ref(), report.all.pro.as_ref()] {
            let curve = curve.expect("curve");
            assert!(
                curve.fpr.len() > 100 && curve.fpr.len() < 5000,
                "{}",
                curve.fpr.len()
            );
            assert_eq!((curve.fpr[0], curve.y[0]), (0.0, 0.0));
            let last = curve.fpr.len() - 1;
            assert_eq!((curve.fpr[last], curve.y[last]), (1.0, 1.0));
            assert!(curve.fpr.windows(2).all(|w| w[0] <= w[1]));
            assert!(curve.y.windows(2).all(|w| w[0] <= w[1]));
        }
        let auroc = report.all.auroc.expect("auroc");
        assert!(auroc > 0.5 && auroc < 1.0, "{auroc}");
    }

    #[test]
    fn without_good_images_each_group_is_measured_alone() {
        let mut rng = SplitMix::new(21);
        let (width, height) = (12, 9);
        let groups = [0u16, 1, 0, 1, 1, 0];
        let mut table = PixelTable::default();
        let mut images = Vec::new();
        for &group in &groups {
            // Every image has a defect (group 0 is a defect type here, not "good").
            let (map, mask) = random_image(&mut rng, width, height, group + 1, |rng, m| {
                (rng.unit() * 6.0).floor() + if m { 2.0 } else { 0.0 }
            });
            table.add_image(&map, &mask, width, group);
            images.push((group, map, mask));
        }
        let report = table.metrics(None, 2);
        for group in 0..2u16 {
            let members: Vec<_> = images.iter().filter(|(g, _, _)| *g == group).collect();
            let scores: Vec<f32> = members.iter().flat_map(|(_, m, _)| m.clone()).collect();
            let labels: Vec<bool> = members.iter().flat_map(|(_, _, t)| t.clone()).collect();
            let by_ranks = crate::eval::detection::auroc(&scores, &labels).expect("both kinds");
            let swept = report.groups[group as usize].auroc.expect("auroc");
            assert!((swept - by_ranks).abs() < 1e-9, "group {group}");
            let maps: Vec<Vec<f32>> = members.iter().map(|(_, m, _)| m.clone()).collect();
            let masks: Vec<Vec<bool>> = members.iter().map(|(_, _, t)| t.clone()).collect();
            let slow = slow_aupro(&maps, &masks, width, AUPRO_FPR_LIMIT);
            let swept = report.groups[group as usize].aupro.expect("aupro");
            assert!((swept - slow).abs() < 1e-9, "group {group}");
        }
    }

    #[test]
    fn without_defect_pixels_there_is_no_pixel_metric() {
        let mut table = PixelTable::default();
        table.add_image(&[0.1, 0.2, 0.3, 0.4], &[false; 4], 2, 0);
        table.add_image(&[0.5, 0.2, 0.3, 0.4], &[false; 4], 2, 1);
        let report = table.metrics(Some(0), 2);
        assert!(report.all.auroc.is_none() && report.all.aupro.is_none());
        assert!(report.groups[1].auroc.is_none());
    }
}
