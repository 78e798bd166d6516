//! Drawing anomaly maps onto images: the JET colour map and alpha blending of normalised maps.
//! Pure pixel work on RGB buffers; no I/O.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
