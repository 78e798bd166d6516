//! The live overlay's heatmap blend in plain Rust, from a frame in its GStreamer format: the model's
//! anomaly map resized to the frame (bilinear, `preprocess::resize_plane`), normalised with the bundle's calibration, JET
//! colours blended over the pixels above the alert level, and the mask of those pixels for the
//! outlines and boxes drawn afterwards. The CPU twin of the GPU overlay kernel
//! (`stpm_overlay_rgb` in src/gpu/kernels.rs), op for op, so the two can be compared exactly.

use super::jet;
use crate::bundle::Calibration;
use crate::preprocess::raw::{RawFrame, to_byte};
use crate::preprocess::resize_plane;

/// Weight of the heatmap colour where it is drawn (the frame keeps the rest).
pub const HEAT_WEIGHT: f32 = 0.6;
/// Map levels (normalised × 255, rounded) above this are anomalous: normalised 0.5 is the
/// calibrated threshold.
pub const ALERT_LEVEL: u8 = 127;

/// A blended frame and its anomaly mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Heat {
    /// Packed RGB, `width × height × 3`.
    pub pixels: Vec<u8>,
    /// 255 where the map is above [`ALERT_LEVEL`], else 0; `width × height`.
    pub mask: Vec<u8>,
}

/// Why [`blend`] was not given a map it can use.
#[derive(Debug, thiserror::Error)]
#[error("anomaly map of {len} values is not {height}×{width}")]
pub struct MapSizeError {
    pub len: usize,
    pub height: usize,
    pub width: usize,
}

/// Blends `map` (raw scores, `map_size` = [H, W], usually the model's input size) over `frame`.
pub fn blend(
    frame: &RawFrame,
    map: &[f32],
    map_size: [usize; 2],
    calibration: &Calibration,
) -> Result<Heat, MapSizeError> {
    let [map_h, map_w] = map_size;
    if map.len() != map_h * map_w || map.is_empty() {
        return Err(MapSizeError {
            len: map.len(),
            height: map_h,
            width: map_w,
        });
    }
    let (width, height) = (frame.width, frame.height);
    let raw_map = resize_plane(map, map_size, [height, width]);
    let mut pixels = Vec::with_capacity(width * height * 3);
    let mut mask = Vec::with_capacity(width * height);
    for (i, &raw) in raw_map.iter().enumerate() {
        let level = (calibration.normalise(raw) * 255.0).round() as u8;
        let rgb = frame.rgb_at(i % width, i / width);
        if level > ALERT_LEVEL {
            let colour = jet(level as f32 / 255.0);
            for (value, c) in rgb.into_iter().zip(colour) {
                pixels.push(to_byte(
                    value * (1.0 - HEAT_WEIGHT) + c as f32 * HEAT_WEIGHT,
                ));
            }
            mask.push(255);
        } else {
            pixels.extend(rgb.map(to_byte));
            mask.push(0);
        }
    }
    Ok(Heat { pixels, mask })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::raw::{self, PixelFormat};
    use crate::preprocess::test_frame;

    fn calibration() -> Calibration {
        Calibration {
            threshold: 2.0,
            floor: 1.0,
            method: "test".into(),
            n_images: 1,
            good_median: 0.2,
        }
    }

    #[test]
    fn only_pixels_above_the_threshold_are_coloured_and_masked() {
        let rgb = test_frame(8, 4, |_, _, _| 100);
        let (layout, data) = raw::encode(&rgb, PixelFormat::Rgb, 1);
        let frame = RawFrame::new(PixelFormat::Rgb, 8, 4, layout, &data).expect("frame");
        // Left half well above the threshold (2.0), right half below; same size as the frame.
        let map: Vec<f32> = (0..32).map(|i| if i % 8 < 4 { 3.0 } else { 1.5 }).collect();
        let heat = blend(&frame, &map, [4, 8], &calibration()).expect("blend");
        for (i, &m) in heat.mask.iter().enumerate() {
            let left = i % 8 < 4;
            assert_eq!(m, if left { 255 } else { 0 }, "pixel {i}");
            let pixel = &heat.pixels[i * 3..i * 3 + 3];
            if left {
                // Normalised 1.0 → JET red [128, 0, 0]... blended 0.4·100 + 0.6·colour.
                let colour = jet(1.0);
                let expected: Vec<u8> = colour
                    .iter()
                    .map(|&c| (100.0 * 0.4 + c as f32 * 0.6).round() as u8)
                    .collect();
                assert_eq!(pixel, &expected[..], "pixel {i}");
            } else {
                assert_eq!(pixel, &[100, 100, 100], "pixel {i}");
            }
        }
    }

    #[test]
    fn a_small_map_is_resized_to_the_frame() {
        let rgb = test_frame(16, 16, |x, y, c| (x * 10 + y + c) as u8);
        let (layout, data) = raw::encode(&rgb, PixelFormat::Rgb, 1);
        let frame = RawFrame::new(PixelFormat::Rgb, 16, 16, layout, &data).expect("frame");
        // A 2×2 map: only the top-left cell anomalous → mask only in the top-left quadrant area.
        let heat = blend(&frame, &[4.0, 0.0, 0.0, 0.0], [2, 2], &calibration()).expect("blend");
        assert_eq!(heat.mask.len(), 256);
        assert_eq!(heat.pixels.len(), 768);
        assert_eq!(heat.mask[0], 255, "top-left corner");
        assert_eq!(heat.mask[255], 0, "bottom-right corner");
        assert!(heat.mask[15 * 16] == 0 && heat.mask[15] == 0);
        // Untouched pixels keep the frame's values.
        assert_eq!(&heat.pixels[765..768], &rgb.pixels[765..768]);
        let message = blend(&frame, &[1.0; 3], [2, 2], &calibration())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(message, "anomaly map of 3 values is not 2×2");
    }
}
