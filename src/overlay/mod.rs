//! Drawing anomaly maps onto images: the JET colour map, alpha blending of normalised maps, region
//! outlines and captions. Pure pixel work on RGB buffers; no I/O.

pub mod heat;
pub mod live;
pub mod text;

pub use text::draw_caption;

use std::path::Path;

use crate::bundle::Calibration;
use crate::preprocess::RgbFrame;

/// The JET colour map (blue → cyan → yellow → red) at `value` in [0, 1], as OpenCV's COLORMAP_JET.
pub fn jet(value: f32) -> [u8; 3] {
    let v = value.clamp(0.0, 1.0);
    let channel =
        |offset: f32| ((1.5 - (4.0 * v - offset).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// Blends the JET colours of `map` (normalised scores, same size as `frame`) over the frame:
/// weight `alpha` where the map reaches `from`, fading to nothing below it.
pub fn blend_heatmap(frame: &RgbFrame, map: &[f32], alpha: f32, from: f32) -> Vec<u8> {
    let mut out = frame.pixels.clone();
    for (pixel, &value) in out.chunks_exact_mut(3).zip(map) {
        let weight = if value >= from {
            alpha
        } else {
            alpha * (value / from.max(f32::EPSILON)).clamp(0.0, 1.0) * 0.5
        };
        let colour = jet(value);
        for (channel, c) in pixel.iter_mut().zip(colour) {
            *channel = (*channel as f32 * (1.0 - weight) + c as f32 * weight).round() as u8;
        }
    }
    out
}

/// Pixels of `mask` (row-major, `width` wide) that touch a pixel outside it (4-neighbours; the
/// image border counts as outside): the region's one-pixel outline.
pub fn outline(mask: &[bool], width: usize) -> Vec<bool> {
    let height = mask.len().checked_div(width).unwrap_or(0);
    let mut edge = vec![false; mask.len()];
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            if !mask[i] {
                continue;
            }
            edge[i] = x == 0
                || y == 0
                || x + 1 == width
                || y + 1 == height
                || !mask[i - 1]
                || !mask[i + 1]
                || !mask[i - width]
                || !mask[i + width];
        }
    }
    edge
}

/// Paints `colour` on every RGB pixel where `mask` is set.
pub fn paint(pixels: &mut [u8], mask: &[bool], colour: [u8; 3]) {
    for (pixel, _) in pixels.chunks_exact_mut(3).zip(mask).filter(|(_, m)| **m) {
        pixel.copy_from_slice(&colour);
    }
}

/// The annotated view of one scored image: JET heatmap where the normalised map is high, the
/// predicted region (raw map ≥ the calibrated threshold) outlined in white, the ground truth (when
/// known) outlined in green, and the normalised and raw score in the corner. `raw_map` has the
/// frame's size.
pub fn annotate(
    frame: &RgbFrame,
    raw_map: &[f32],
    truth: Option<&[bool]>,
    calibration: &Calibration,
    raw_score: f32,
) -> Vec<u8> {
    let normalised: Vec<f32> = raw_map.iter().map(|&v| calibration.normalise(v)).collect();
    let mut pixels = blend_heatmap(frame, &normalised, 0.6, 0.5);
    let predicted: Vec<bool> = raw_map
        .iter()
        .map(|&v| v >= calibration.threshold)
        .collect();
    paint(
        &mut pixels,
        &outline(&predicted, frame.width),
        [255, 255, 255],
    );
    if let Some(truth) = truth {
        paint(&mut pixels, &outline(truth, frame.width), [0, 255, 0]);
    }
    let caption = format!(
        "score {:.2} (raw {:.3e})",
        calibration.normalise(raw_score),
        raw_score
    );
    draw_caption(&mut pixels, frame.width, frame.height, &caption);
    pixels
}

/// The live view of one frame from the model's own map (`map_size` = [h, w]):
/// [`live::annotate_model_map`], or, if OpenCV fails, the plain-Rust [`annotate`], which still
/// shows the heatmap and the score; the OpenCV error comes back for the caller to report.
pub fn annotate_live(
    frame: &RgbFrame,
    model_map: &[f32],
    map_size: [usize; 2],
    calibration: &Calibration,
    raw_score: f32,
    caption: &live::Caption,
) -> (Vec<u8>, Option<live::OverlayError>) {
    match live::annotate_model_map(frame, model_map, map_size, calibration, raw_score, caption) {
        Ok((pixels, _boxes)) => (pixels, None),
        Err(e) => {
            let raw_map =
                crate::preprocess::resize_plane(model_map, map_size, [frame.height, frame.width]);
            let pixels = annotate(frame, &raw_map, None, calibration, raw_score);
            (pixels, Some(e))
        }
    }
}

/// Writes an interleaved RGB buffer as PNG, whole (through `<path>.part`: a full disk or a crash
/// leaves no cut file that a later training would fail on).
pub fn save_png(
    path: &Path,
    pixels: &[u8],
    width: usize,
    height: usize,
) -> Result<(), image::ImageError> {
    let mut png = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut png,
        pixels,
        width as u32,
        height as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )?;
    crate::files::write_whole(path, png.into_inner()).map_err(image::ImageError::IoError)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG is written whole: it decodes to the pixels given, and no staging file stays.
    #[test]
    fn pngs_are_written_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("frame.png");
        let pixels: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        save_png(&path, &pixels, 4, 3).expect("save");
        let decoded = image::open(&path).expect("decode").to_rgb8();
        assert_eq!(decoded.dimensions(), (4, 3));
        assert_eq!(decoded.into_raw(), pixels);
        assert!(!crate::files::staged(&path).exists());
        let missing = dir.path().join("no/such/folder/frame.png");
        assert!(save_png(&missing, &pixels, 4, 3).is_err());
    }

    #[test]
    fn jet_endpoints_and_middle() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        let middle = jet(0.5);
        assert!(
            middle[1] == 255 && middle[0] > 100 && middle[2] > 100,
            "{middle:?}"
        );
    }

    #[test]
    fn blend_leaves_low_pixels_almost_untouched_and_paints_high_ones() {
        let frame = RgbFrame {
            width: 2,
            height: 1,
            pixels: vec![100, 100, 100, 100, 100, 100],
        };
        let out = blend_heatmap(&frame, &[0.0, 1.0], 0.6, 0.5);
        assert_eq!(&out[..3], &[100, 100, 100]);
        assert!(
            out[3] > 110 && out[4] < 50 && out[5] < 50,
            "{:?}",
            &out[3..]
        );
    }

    #[test]
    fn outline_is_the_border_of_a_block() {
        // A 3×3 block inside a 5×5 image: 8 outline pixels, the centre is not one.
        let mut mask = vec![false; 25];
        for y in 1..4 {
            for x in 1..4 {
                mask[y * 5 + x] = true;
            }
        }
        let edge = outline(&mask, 5);
        assert_eq!(edge.iter().filter(|&&e| e).count(), 8);
        assert!(!edge[12]);
        assert!(edge[6] && edge[18]);
        let mut pixels = vec![0u8; 75];
        paint(&mut pixels, &edge, [0, 255, 0]);
        assert_eq!(&pixels[18..21], &[0, 255, 0]);
        assert_eq!(&pixels[36..39], &[0, 0, 0]);
    }
}
