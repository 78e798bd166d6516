//! `test://conveyor`: a generated camera view of textured panels moving along a belt, every third
//! panel with a scratch or stain, so the live demo and the tests run on any machine. Frames are a
//! pure function of (seed, index); the exact defect mask comes with each frame.

use std::collections::HashMap;

use image::RgbImage;

use std::path::{Path, PathBuf};

use crate::devset::{DevsetError, DevsetSpec, add_defect, create_dir, texture};
use crate::preprocess::RgbFrame;
use crate::rng::SplitMix;

/// Conveyor frame size (a typical machine-vision camera mode).
pub const CONVEYOR_SIZE: (usize, usize) = (640, 480);

/// Every `DEFECT_EVERY`-th panel carries a defect.
pub const DEFECT_EVERY: u64 = 3;

/// One generated frame and where its defects are.
pub struct ConveyorFrame {
    pub frame: RgbFrame,
    /// Row-major, true on defect pixels.
    pub mask: Vec<bool>,
    /// The kind of the defect in view (`scratch` or `stain`), if any pixel of one is visible.
    pub defect: Option<&'static str>,
}

/// The scene generator (keeps the few panels in view cached).
pub struct Conveyor {
    width: usize,
    height: usize,
    seed: u64,
    /// Belt speed in pixels per frame.
    speed: usize,
    panels: HashMap<u64, Panel>,
}

/// One panel's texture and, for defective panels, its mask and defect kind.
type Panel = (RgbImage, Option<(image::GrayImage, &'static str)>);

impl Conveyor {
    pub fn new(width: usize, height: usize, seed: u64) -> Self {
        Self {
            width,
            height,
            seed,
            speed: (width / 80).max(1),
            panels: HashMap::new(),
        }
    }

    fn panel_size(&self) -> usize {
        self.height * 7 / 8
    }

    fn pitch(&self) -> usize {
        self.height
    }

    /// Whether panel `k` carries a defect.
    pub fn has_defect(k: u64) -> bool {
        k % DEFECT_EVERY == DEFECT_EVERY - 1
    }

    fn panel(&mut self, k: u64) -> &Panel {
        let size = self.panel_size() as u32;
        let seed = self.seed;
        self.panels.entry(k).or_insert_with(|| {
            let mut rng = SplitMix::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(k));
            let mut image = texture(size, &mut rng);
            let mask = Self::has_defect(k).then(|| {
                let kind = if (k / DEFECT_EVERY).is_multiple_of(2) {
                    "scratch"
                } else {
                    "stain"
                };
                (add_defect(&mut image, kind, &mut rng), kind)
            });
            (image, mask)
        })
    }

    /// Frame `index` of the stream.
    pub fn frame(&mut self, index: u64) -> ConveyorFrame {
        let (w, h) = (self.width, self.height);
        let offset = index as usize * self.speed;
        let (pitch, size) = (self.pitch(), self.panel_size());
        let top = (h - size) / 2;
        // Belt: plain dark grey (a pattern moving under the model would be one more thing to learn
        // from 40 frames; the panels are what is inspected).
        let mut pixels = [50u8, 50, 54].repeat(w * h);
        let mut mask = vec![false; w * h];
        let mut defect = None;
        let first = offset / pitch;
        let last = (offset + w) / pitch;
        for k in first as u64..=last as u64 {
            let left = k as i64 * pitch as i64 - offset as i64 + ((pitch - size) / 2) as i64;
            let (panel, panel_mask) = self.panel(k);
            // The panel's columns inside the frame.
            let visible = (-left).clamp(0, size as i64) as usize
                ..(w as i64 - left).clamp(0, size as i64) as usize;
            for py in 0..size {
                let y = top + py;
                for px in visible.clone() {
                    let i = y * w + (left + px as i64) as usize;
                    pixels[i * 3..i * 3 + 3]
                        .copy_from_slice(&panel.get_pixel(px as u32, py as u32).0);
                    if let Some((m, kind)) = panel_mask
                        && m.get_pixel(px as u32, py as u32).0[0] > 127
                    {
                        mask[i] = true;
                        defect = Some(*kind);
                    }
                }
            }
        }
        self.panels.retain(|&k, _| k + 1 >= first as u64);
        ConveyorFrame {
            frame: RgbFrame {
                width: w,
                height: h,
                pixels,
            },
            mask,
            defect,
        }
    }
}

/// Writes an MVTec-layout category of conveyor frames (height `spec.size`, 4:3) for training and
/// evaluating the live demo's model: defect-free frames in `train/good` and `test/good`, frames
/// showing a defect under `test/<kind>` with exact masks. Every fifth frame is used, so
/// consecutive images differ; test frames come from later panels than training frames.
pub fn write_conveyor_category(root: &Path, spec: &DevsetSpec) -> Result<(), DevsetError> {
    let height = spec.size as usize;
    let width = height * 4 / 3;
    let mut conveyor = Conveyor::new(width, height, spec.seed);
    let save = |image: &RgbFrame, path: PathBuf| {
        crate::overlay::save_png(&path, &image.pixels, image.width, image.height)
            .map_err(|source| DevsetError::Write { path, source })
    };
    for dir in ["train/good", "test/good"] {
        create_dir(&root.join(dir))?;
    }
    let mut index = 0u64;
    let mut train = 0;
    while train < spec.train {
        let generated = conveyor.frame(index);
        index += 5;
        if generated.defect.is_none() {
            save(
                &generated.frame,
                root.join(format!("train/good/{train:03}.png")),
            )?;
            train += 1;
        }
    }
    let mut good = 0;
    let mut per_kind: HashMap<&'static str, usize> = HashMap::new();
    let limit = index + 200_000;
    while (good < spec.test_good
        || ["scratch", "stain"]
            .iter()
            .any(|k| per_kind.get(k).copied().unwrap_or(0) < spec.test_per_defect))
        && index < limit
    {
        let generated = conveyor.frame(index);
        index += 5;
        let visible = generated.mask.iter().filter(|&&m| m).count();
        match generated.defect {
            None if good < spec.test_good => {
                save(
                    &generated.frame,
                    root.join(format!("test/good/{good:03}.png")),
                )?;
                good += 1;
            }
            Some(kind) if visible >= 30 => {
                let n = per_kind.entry(kind).or_default();
                if *n >= spec.test_per_defect {
                    continue;
                }
                let (images, masks) = (
                    root.join("test").join(kind),
                    root.join("ground_truth").join(kind),
                );
                create_dir(&images)?;
                create_dir(&masks)?;
                save(&generated.frame, images.join(format!("{n:03}.png")))?;
                let mask = image::GrayImage::from_fn(width as u32, height as u32, |x, y| {
                    image::Luma([if generated.mask[y as usize * width + x as usize] {
                        255
                    } else {
                        0
                    }])
                });
                let path = masks.join(format!("{n:03}_mask.png"));
                mask.save(&path)
                    .map_err(|source| DevsetError::Write { path, source })?;
                *n += 1;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_deterministic_move_and_show_defects_with_masks() {
        let mut a = Conveyor::new(160, 120, 7);
        let mut b = Conveyor::new(160, 120, 7);
        let first = a.frame(10);
        assert_eq!(first.frame.pixels, b.frame(10).frame.pixels);
        assert_eq!(first.frame.pixels.len(), 160 * 120 * 3);
        assert_ne!(
            first.frame.pixels,
            a.frame(11).frame.pixels,
            "the belt moves"
        );
        // Over one full cycle of panels, some frames show a defect and some do not.
        let pitch = 120u64;
        let frames_per_panel = pitch / 2; // speed is 2 px/frame at width 160
        let with_defect = (0..DEFECT_EVERY * frames_per_panel)
            .filter(|&i| a.frame(i).mask.iter().any(|&m| m))
            .count();
        assert!(with_defect > 0, "no defect in a whole cycle");
        assert!(
            (with_defect as u64) < DEFECT_EVERY * frames_per_panel,
            "every frame defective"
        );
    }

    #[test]
    fn conveyor_category_has_mvtec_layout_and_masks() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = DevsetSpec {
            size: 48,
            train: 4,
            test_good: 2,
            test_per_defect: 2,
            seed: 3,
        };
        write_conveyor_category(dir.path(), &spec).expect("write");
        let count = |p: &str| {
            std::fs::read_dir(dir.path().join(p))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        assert_eq!(count("train/good"), 4);
        assert_eq!(count("test/good"), 2);
        for kind in ["scratch", "stain"] {
            assert_eq!(count(&format!("test/{kind}")), 2, "{kind}");
            let mask = image::open(dir.path().join(format!("ground_truth/{kind}/000_mask.png")))
                .expect("mask")
                .to_luma8();
            assert_eq!(mask.dimensions(), (64, 48));
            assert!(mask.pixels().filter(|p| p.0[0] == 255).count() >= 30);
        }
    }
}
