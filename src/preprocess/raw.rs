//! The CPU twin of the GPU preprocessing kernels (`src/gpu/kernels.rs`): a frame in its GStreamer
//! format (RGB, BGR, RGBx, BGRx, NV12, I420) → NCHW float32, with the same maths op for op. It is
//! the reference the kernels are checked against; it does not try to be fast.

use super::{Normalisation, RgbFrame, resize_normalise};

/// Frame layouts the GPU kernels read, named as in GStreamer caps (`video/x-raw,format=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    Rgb,
    Bgr,
    /// RGB plus one padding byte per pixel.
    Rgbx,
    /// BGR plus one padding byte per pixel.
    Bgrx,
    /// Y plane, then one plane of interleaved U,V at half resolution in both directions.
    Nv12,
    /// Y plane, then U and V planes at half resolution in both directions.
    I420,
}

impl PixelFormat {
    pub const ALL: [PixelFormat; 6] = [
        PixelFormat::Rgb,
        PixelFormat::Bgr,
        PixelFormat::Rgbx,
        PixelFormat::Bgrx,
        PixelFormat::Nv12,
        PixelFormat::I420,
    ];

    /// The GStreamer caps name.
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb => "RGB",
            PixelFormat::Bgr => "BGR",
            PixelFormat::Rgbx => "RGBx",
            PixelFormat::Bgrx => "BGRx",
            PixelFormat::Nv12 => "NV12",
            PixelFormat::I420 => "I420",
        }
    }

    /// Byte offsets of R, G, B inside a pixel and bytes per pixel, for the packed formats.
    pub fn packed_channels(self) -> Option<([usize; 3], usize)> {
        match self {
            PixelFormat::Rgb => Some(([0, 1, 2], 3)),
            PixelFormat::Bgr => Some(([2, 1, 0], 3)),
            PixelFormat::Rgbx => Some(([0, 1, 2], 4)),
            PixelFormat::Bgrx => Some(([2, 1, 0], 4)),
            PixelFormat::Nv12 | PixelFormat::I420 => None,
        }
    }

    /// Rows and bytes per row (without padding) of each plane of a `width`×`height` frame.
    pub fn plane_sizes(self, width: usize, height: usize) -> Vec<(usize, usize)> {
        let (chroma_w, chroma_h) = chroma_size(width, height);
        match self {
            PixelFormat::Nv12 => vec![(height, width), (chroma_h, 2 * chroma_w)],
            PixelFormat::I420 => vec![(height, width), (chroma_h, chroma_w), (chroma_h, chroma_w)],
            packed => {
                let bytes = packed.packed_channels().map_or(3, |(_, bytes)| bytes);
                vec![(height, width * bytes)]
            }
        }
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Size of the chroma planes of NV12/I420 (GStreamer rounds odd sizes up).
pub fn chroma_size(width: usize, height: usize) -> (usize, usize) {
    (width.div_ceil(2), height.div_ceil(2))
}

/// Where each plane starts in the frame's bytes and how many bytes one of its rows takes, padding
/// included: GstVideoInfo's offsets and strides. Unused planes are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneLayout {
    pub offsets: [usize; 3],
    pub strides: [usize; 3],
}

impl PlaneLayout {
    /// Planes one after the other with no row padding.
    pub fn packed(format: PixelFormat, width: usize, height: usize) -> Self {
        Self::padded(format, width, height, 1)
    }

    /// Planes one after the other, each row padded to a multiple of `align` bytes.
    pub fn padded(format: PixelFormat, width: usize, height: usize, align: usize) -> Self {
        let mut layout = PlaneLayout {
            offsets: [0; 3],
            strides: [0; 3],
        };
        let mut offset = 0;
        for (plane, (rows, row_bytes)) in format.plane_sizes(width, height).into_iter().enumerate()
        {
            let stride = row_bytes.next_multiple_of(align.max(1));
            layout.offsets[plane] = offset;
            layout.strides[plane] = stride;
            offset += stride * rows;
        }
        layout
    }

    /// Bytes a frame with this layout needs: up to the last byte of the last row of any plane.
    pub fn required_len(&self, format: PixelFormat, width: usize, height: usize) -> usize {
        format
            .plane_sizes(width, height)
            .into_iter()
            .enumerate()
            .map(|(plane, (rows, row_bytes))| {
                self.offsets[plane] + self.strides[plane] * rows.saturating_sub(1) + row_bytes
            })
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RawFrameError {
    #[error("{format} frame is empty ({width}×{height})")]
    Empty {
        format: PixelFormat,
        width: usize,
        height: usize,
    },
    #[error("{format} plane {plane}: stride {stride} is shorter than a row ({row_bytes} bytes)")]
    Stride {
        format: PixelFormat,
        plane: usize,
        stride: usize,
        row_bytes: usize,
    },
    #[error("{format} frame {width}×{height} needs {needed} bytes, got {got}")]
    TooShort {
        format: PixelFormat,
        width: usize,
        height: usize,
        needed: usize,
        got: usize,
    },
}

/// A frame in one of the GPU kernels' formats, borrowed from its buffer (a mapped GStreamer buffer).
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    pub format: PixelFormat,
    pub width: usize,
    pub height: usize,
    pub layout: PlaneLayout,
    pub data: &'a [u8],
}

impl<'a> RawFrame<'a> {
    /// Checks that `data` holds every row of every plane of `layout`.
    pub fn new(
        format: PixelFormat,
        width: usize,
        height: usize,
        layout: PlaneLayout,
        data: &'a [u8],
    ) -> Result<Self, RawFrameError> {
        if width == 0 || height == 0 {
            return Err(RawFrameError::Empty {
                format,
                width,
                height,
            });
        }
        for (plane, (_, row_bytes)) in format.plane_sizes(width, height).into_iter().enumerate() {
            if layout.strides[plane] < row_bytes {
                return Err(RawFrameError::Stride {
                    format,
                    plane,
                    stride: layout.strides[plane],
                    row_bytes,
                });
            }
        }
        let needed = layout.required_len(format, width, height);
        if data.len() < needed {
            return Err(RawFrameError::TooShort {
                format,
                width,
                height,
                needed,
                got: data.len(),
            });
        }
        Ok(Self {
            format,
            width,
            height,
            layout,
            data,
        })
    }

    /// RGB (0–255, not rounded) of pixel (`x`, `y`); chroma of NV12/I420 is the nearest sample
    /// (the 2×2 block the pixel is in), as the GPU kernel reads it.
    pub fn rgb_at(&self, x: usize, y: usize) -> [f32; 3] {
        let PlaneLayout { offsets, strides } = self.layout;
        let byte = |plane: usize, row: usize, column: usize| {
            self.data[offsets[plane] + row * strides[plane] + column] as f32
        };
        match self.format {
            PixelFormat::Nv12 => {
                let luma = byte(0, y, x);
                let (u, v) = (byte(1, y / 2, (x / 2) * 2), byte(1, y / 2, (x / 2) * 2 + 1));
                yuv_to_rgb(luma, u, v)
            }
            PixelFormat::I420 => {
                let luma = byte(0, y, x);
                yuv_to_rgb(luma, byte(1, y / 2, x / 2), byte(2, y / 2, x / 2))
            }
            packed => {
                let (channels, bytes) = packed.packed_channels().unwrap_or(([0, 1, 2], 3));
                std::array::from_fn(|c| byte(0, y, x * bytes + channels[c]))
            }
        }
    }
}

// BT.601 limited range ("studio swing": Y 16–235, U/V 16–240), what GStreamer assumes for SD and
// most camera NV12/I420 without colorimetry. The GPU kernel uses the same literals.
const Y_SCALE: f32 = 1.164_383;
const V_TO_R: f32 = 1.596_027;
const U_TO_G: f32 = 0.391_762;
const V_TO_G: f32 = 0.812_968;
const U_TO_B: f32 = 2.017_232;

/// BT.601 limited-range Y, U, V (0–255) → R, G, B clamped to 0–255 (not rounded).
pub fn yuv_to_rgb(y: f32, u: f32, v: f32) -> [f32; 3] {
    let luma = Y_SCALE * (y - 16.0);
    let (d, e) = (u - 128.0, v - 128.0);
    let r = luma + V_TO_R * e;
    let g = luma - U_TO_G * d - V_TO_G * e;
    let b = luma + U_TO_B * d;
    [r, g, b].map(|value| value.clamp(0.0, 255.0))
}

/// R, G, B (0–255) → BT.601 limited-range Y, U, V (not rounded): the inverse of [`yuv_to_rgb`].
pub fn rgb_to_yuv(r: f32, g: f32, b: f32) -> [f32; 3] {
    [
        16.0 + 0.256_788 * r + 0.504_129 * g + 0.097_906 * b,
        128.0 - 0.148_223 * r - 0.290_993 * g + 0.439_216 * b,
        128.0 + 0.439_216 * r - 0.367_788 * g - 0.071_427 * b,
    ]
}

/// Rounds and clamps a channel value to a byte.
pub(crate) fn to_byte(value: f32) -> u8 {
    value.round().clamp(0.0, 255.0) as u8
}

/// `frame` in `format` with [`PlaneLayout::padded`] rows (`align` bytes): test inputs for the
/// reference and the GPU check. NV12/I420 chroma is the mean of each 2×2 block; padding bytes of
/// RGBx/BGRx are 255.
pub fn encode(frame: &RgbFrame, format: PixelFormat, align: usize) -> (PlaneLayout, Vec<u8>) {
    let (width, height) = (frame.width, frame.height);
    let layout = PlaneLayout::padded(format, width, height, align);
    let mut data = vec![0u8; layout.required_len(format, width, height)];
    let rgb = |x: usize, y: usize| -> [f32; 3] {
        std::array::from_fn(|c| frame.pixels[(y * width + x) * 3 + c] as f32)
    };
    let PlaneLayout { offsets, strides } = layout;
    if let Some((channels, bytes)) = format.packed_channels() {
        for y in 0..height {
            for x in 0..width {
                let at = offsets[0] + y * strides[0] + x * bytes;
                for c in 0..3 {
                    data[at + channels[c]] = frame.pixels[(y * width + x) * 3 + c];
                }
                if bytes == 4 {
                    data[at + 3] = 255;
                }
            }
        }
        return (layout, data);
    }
    for y in 0..height {
        for x in 0..width {
            let [r, g, b] = rgb(x, y);
            data[offsets[0] + y * strides[0] + x] = to_byte(rgb_to_yuv(r, g, b)[0]);
        }
    }
    let (chroma_w, chroma_h) = chroma_size(width, height);
    for cy in 0..chroma_h {
        for cx in 0..chroma_w {
            let (mut u, mut v, mut count) = (0.0, 0.0, 0.0);
            for y in (2 * cy)..(2 * cy + 2).min(height) {
                for x in (2 * cx)..(2 * cx + 2).min(width) {
                    let [r, g, b] = rgb(x, y);
                    let [_, pixel_u, pixel_v] = rgb_to_yuv(r, g, b);
                    u += pixel_u;
                    v += pixel_v;
                    count += 1.0;
                }
            }
            let (u, v) = (to_byte(u / count), to_byte(v / count));
            if format == PixelFormat::Nv12 {
                data[offsets[1] + cy * strides[1] + 2 * cx] = u;
                data[offsets[1] + cy * strides[1] + 2 * cx + 1] = v;
            } else {
                data[offsets[1] + cy * strides[1] + cx] = u;
                data[offsets[2] + cy * strides[2] + cx] = v;
            }
        }
    }
    (layout, data)
}

/// Resizes `frame` to `size` = [H, W] (half-pixel bilinear, edges clamped, as
/// [`super::frame_to_chw`]) and normalises it into `out` (CHW float32). NV12/I420 pixels are
/// converted to RGB first, then interpolated; for RGB frames the result equals `frame_to_chw`'s
/// bit for bit.
pub fn raw_to_chw(frame: &RawFrame, size: [usize; 2], norm: &Normalisation, out: &mut [f32]) {
    resize_normalise([frame.height, frame.width], size, norm, out, |x, y| {
        frame.rgb_at(x, y)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::to_chw;

    const IMAGENET: Normalisation = Normalisation {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    use crate::preprocess::test_frame as frame;

    /// Deterministic noise, so every pixel differs from its neighbours.
    fn noise(x: usize, y: usize, c: usize) -> u8 {
        let mut h =
            ((x as u64) * 0x9E37_79B9) ^ ((y as u64) * 0x85EB_CA6B) ^ ((c as u64) * 0xC2B2_AE35);
        h ^= h >> 15;
        h = h.wrapping_mul(0x2C1B_3C6D);
        (h >> 7) as u8
    }

    fn reference(format: PixelFormat, rgb: &RgbFrame, align: usize, size: [usize; 2]) -> Vec<f32> {
        let (layout, data) = encode(rgb, format, align);
        let raw = RawFrame::new(format, rgb.width, rgb.height, layout, &data).expect("valid frame");
        let mut out = vec![0.0; 3 * size[0] * size[1]];
        raw_to_chw(&raw, size, &IMAGENET, &mut out);
        out
    }

    /// Largest difference in 0–255 pixel levels between two normalised tensors.
    fn max_level_diff(a: &[f32], b: &[f32], plane: usize) -> f32 {
        a.iter()
            .zip(b)
            .enumerate()
            .map(|(i, (a, b))| (a - b).abs() * IMAGENET.std[i / plane] * 255.0)
            .fold(0.0, f32::max)
    }

    #[test]
    fn packed_formats_equal_the_rgb_path_bit_for_bit() {
        let rgb = frame(37, 23, noise);
        for size in [[16, 16], [64, 48], [23, 37]] {
            let direct = to_chw(&rgb, size, &IMAGENET);
            for format in [
                PixelFormat::Rgb,
                PixelFormat::Bgr,
                PixelFormat::Rgbx,
                PixelFormat::Bgrx,
            ] {
                for align in [1, 4, 64] {
                    assert_eq!(
                        reference(format, &rgb, align, size),
                        direct,
                        "{format} align {align} → {size:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn limited_range_anchors_and_round_trip() {
        assert_eq!(yuv_to_rgb(16.0, 128.0, 128.0), [0.0, 0.0, 0.0]);
        let white = yuv_to_rgb(235.0, 128.0, 128.0);
        assert!(white.iter().all(|&v| (v - 255.0).abs() < 0.01), "{white:?}");
        // Out-of-gamut YUV clamps instead of wrapping.
        assert_eq!(yuv_to_rgb(0.0, 0.0, 0.0)[0], 0.0);
        assert_eq!(yuv_to_rgb(255.0, 255.0, 255.0)[0], 255.0);
        for rgb in [
            [0.0, 0.0, 0.0],
            [255.0, 0.0, 0.0],
            [12.0, 200.0, 99.0],
            [255.0; 3],
        ] {
            let [y, u, v] = rgb_to_yuv(rgb[0], rgb[1], rgb[2]);
            let back = yuv_to_rgb(y, u, v);
            for c in 0..3 {
                assert!((back[c] - rgb[c]).abs() < 0.01, "{rgb:?} → {back:?}");
            }
        }
    }

    #[test]
    fn yuv_frames_match_the_rgb_path_when_chroma_is_blockwise() {
        // Colour constant per 2×2 block plus per-pixel grey detail: NV12/I420 lose nothing but the
        // 8-bit rounding of Y, U, V (≤ ~2 levels after conversion).
        let rgb = frame(40, 30, |x, y, c| {
            let block = [60 + (x / 2 * 7) % 100, 50 + (y / 2 * 11) % 120, 90][c];
            (block + noise(x, y, 0) as usize % 40) as u8
        });
        for size in [[32, 32], [17, 29], [60, 80]] {
            let direct = to_chw(&rgb, size, &IMAGENET);
            let plane = size[0] * size[1];
            let nv12 = reference(PixelFormat::Nv12, &rgb, 1, size);
            let i420 = reference(PixelFormat::I420, &rgb, 1, size);
            assert_eq!(nv12, i420, "same samples, same maths → {size:?}");
            let diff = max_level_diff(&nv12, &direct, plane);
            eprintln!("blockwise chroma {size:?}: max {diff:.3} levels from the RGB path");
            assert!(diff <= 2.0, "{size:?}: {diff} levels");
        }
    }

    #[test]
    fn yuv_frames_of_smooth_scenes_stay_close_to_the_rgb_path() {
        let rgb = frame(64, 48, |x, y, c| {
            [(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8][c]
        });
        let size = [32, 32];
        let direct = to_chw(&rgb, size, &IMAGENET);
        let plane = size[0] * size[1];
        for format in [PixelFormat::Nv12, PixelFormat::I420] {
            let diff = max_level_diff(&reference(format, &rgb, 1, size), &direct, plane);
            eprintln!("smooth {format}: max {diff:.3} levels from the RGB path");
            assert!(diff <= 3.0, "{format}: {diff} levels");
        }
    }

    #[test]
    fn padded_rows_and_odd_sizes_read_the_same_pixels() {
        let rgb = frame(31, 17, noise);
        for format in PixelFormat::ALL {
            let packed = reference(format, &rgb, 1, [20, 20]);
            let padded = reference(format, &rgb, 64, [20, 20]);
            assert_eq!(packed, padded, "{format}");
        }
    }

    #[test]
    fn short_buffers_and_bad_strides_are_errors_naming_the_format() {
        let layout = PlaneLayout::packed(PixelFormat::Nv12, 4, 4);
        assert_eq!(layout.required_len(PixelFormat::Nv12, 4, 4), 24);
        let data = vec![0u8; 23];
        let error = RawFrame::new(PixelFormat::Nv12, 4, 4, layout, &data)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("NV12") && error.contains("needs 24 bytes, got 23"),
            "{error}"
        );
        let narrow = PlaneLayout {
            offsets: [0, 0, 0],
            strides: [8, 0, 0],
        };
        let error = RawFrame::new(PixelFormat::Rgbx, 4, 1, narrow, &[0; 64]).err();
        assert!(
            matches!(error, Some(RawFrameError::Stride { plane: 0, .. })),
            "{error:?}"
        );
        assert!(matches!(
            RawFrame::new(PixelFormat::Rgb, 0, 4, layout, &[]),
            Err(RawFrameError::Empty { .. })
        ));
    }
}
