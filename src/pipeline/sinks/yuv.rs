//! The pixel format annotated frames reach the encoder in: I420 (what every H.264 encoder takes),
//! converted with OpenCV, which is faster than `videoconvert` from RGB. RGB stays the fallback
//! (odd frame sizes, an OpenCV error).

use opencv::core::{self, Mat};
use opencv::imgproc;
use opencv::prelude::*;

/// Raw video format of the frames pushed into an appsrc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Interleaved 8-bit RGB.
    Rgb,
    /// Planar Y, then U and V at half resolution in both directions (BT.601, limited range).
    I420,
}

impl PixelFormat {
    /// The `format` field of `video/x-raw` caps.
    pub fn caps_name(self) -> &'static str {
        match self {
            Self::Rgb => "RGB",
            Self::I420 => "I420",
        }
    }

    /// Bytes of one `width`×`height` frame.
    pub fn frame_len(self, width: usize, height: usize) -> usize {
        match self {
            Self::Rgb => width * height * 3,
            Self::I420 => width * height + 2 * (width.div_ceil(2) * height.div_ceil(2)),
        }
    }
}

/// One annotated frame as the outputs take it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFrame {
    pub format: PixelFormat,
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// `rgb` (`width`×`height`, interleaved) as I420 when both sides are even, else as RGB.
pub fn for_encoder(rgb: &[u8], width: usize, height: usize) -> OutputFrame {
    let converted =
        (width.is_multiple_of(2) && height.is_multiple_of(2) && rgb.len() == width * height * 3)
            .then(|| rgb_to_i420(rgb, width, height).ok())
            .flatten();
    match converted {
        Some(data) => OutputFrame {
            format: PixelFormat::I420,
            width,
            height,
            data,
        },
        None => OutputFrame {
            format: PixelFormat::Rgb,
            width,
            height,
            data: rgb.to_vec(),
        },
    }
}

/// OpenCV's RGB → I420 (BT.601 limited range: black Y 16, white Y 235, grey U = V = 128), the
/// colorimetry GStreamer assumes for I420 caps without one at this size.
pub fn rgb_to_i420(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>, opencv::Error> {
    let image = crate::overlay::live::mat_from_bytes(height, width, core::CV_8UC3, rgb)?;
    let mut yuv = Mat::default();
    imgproc::cvt_color_def(&image, &mut yuv, imgproc::COLOR_RGB2YUV_I420)?;
    Ok(yuv.data_bytes()?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BT.601 limited range, as GStreamer's videoconvert maps I420 back to RGB.
    fn expected_y(r: f32, g: f32, b: f32) -> f32 {
        16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    }

    #[test]
    fn i420_planes_have_bt601_limited_range_values() {
        let (width, height) = (4, 2);
        // Left half pure red, right half mid grey.
        let mut rgb = Vec::new();
        for _ in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(if x < 2 {
                    &[255, 0, 0]
                } else {
                    &[128, 128, 128]
                });
            }
        }
        let frame = for_encoder(&rgb, width, height);
        assert_eq!(frame.format, PixelFormat::I420);
        assert_eq!(frame.data.len(), PixelFormat::I420.frame_len(width, height));
        let (y, u, v) = (&frame.data[..8], &frame.data[8..10], &frame.data[10..12]);
        let red_y = expected_y(255.0, 0.0, 0.0);
        let grey_y = expected_y(128.0, 128.0, 128.0);
        for row in 0..height {
            assert!((f32::from(y[row * width]) - red_y).abs() <= 2.0, "{y:?}");
            assert!(
                (f32::from(y[row * width + 3]) - grey_y).abs() <= 2.0,
                "{y:?}"
            );
        }
        // Red: V well above 128, U below; grey: both 128.
        assert!(v[0] > 200 && u[0] < 128, "u {u:?} v {v:?}");
        assert!(
            u[1].abs_diff(128) <= 1 && v[1].abs_diff(128) <= 1,
            "u {u:?} v {v:?}"
        );
    }

    #[test]
    fn odd_sizes_and_bad_lengths_stay_rgb() {
        let odd = for_encoder(&[7; 3 * 3 * 3], 3, 3);
        assert_eq!((odd.format, odd.data.len()), (PixelFormat::Rgb, 27));
        let short = for_encoder(&[7; 5], 2, 2);
        assert_eq!((short.format, short.data), (PixelFormat::Rgb, vec![7; 5]));
        assert_eq!(PixelFormat::I420.frame_len(640, 480), 640 * 480 * 3 / 2);
        assert_eq!(PixelFormat::Rgb.caps_name(), "RGB");
    }
}
