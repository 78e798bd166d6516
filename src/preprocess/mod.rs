//! CPU preprocessing: an RGB frame of any size → the model's input tensor (bilinear resize,
//! per-channel normalisation, NCHW float32). The GPU path must reproduce exactly this maths;
//! `raw` is its CPU twin for every frame format the GPU kernels take.

pub mod raw;

use std::path::Path;

/// Mean and std per RGB channel, applied to pixel values scaled to 0–1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalisation {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// An interleaved 8-bit RGB image.
#[derive(Debug, Clone)]
pub struct RgbFrame {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot read image {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: image::ImageError,
    },
    #[error("image {path} is empty (0×0)")]
    Empty { path: std::path::PathBuf },
}

/// Decodes the image file at `path` by its content (a JPEG named `.png` still reads), the
/// extension deciding only where the content does not; warns when a JPEG has no end marker near
/// its end (a cut-off file, which decodes without error with its lower part filled in).
pub fn decode_file(path: &Path) -> Result<image::DynamicImage, image::ImageError> {
    let bytes = std::fs::read(path).map_err(image::ImageError::IoError)?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes));
    if let Ok(format) = image::ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    let reader = reader
        .with_guessed_format()
        .map_err(image::ImageError::IoError)?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_ends(&bytes) {
        log::warn!(
            "{}: the JPEG has no end marker (cut off?); it decodes with its missing part filled in",
            path.display()
        );
    }
    reader.decode()
}

/// Whether a JPEG's end-of-image marker (FF D9) is among its last bytes. Inside the compressed
/// data an FF byte is always followed by 00 or a restart marker, so FF D9 there is the real end.
fn jpeg_ends(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    tail.windows(2).any(|pair| pair == [0xFF, 0xD9])
}

impl RgbFrame {
    /// Reads any image file the `image` crate decodes ([`decode_file`]); grayscale and alpha
    /// become plain RGB.
    pub fn open(path: &Path) -> Result<Self, PreprocessError> {
        let decoded = decode_file(path).map_err(|source| PreprocessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let rgb = decoded.to_rgb8();
        if rgb.width() == 0 || rgb.height() == 0 {
            return Err(PreprocessError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            pixels: rgb.into_raw(),
        })
    }
}

/// Source coordinate and weight of a half-pixel-centred bilinear sample (OpenCV INTER_LINEAR,
/// PyTorch align_corners=False): the two source indices and the weight of the second.
pub fn bilinear_taps(out_index: usize, in_size: usize, out_size: usize) -> (usize, usize, f32) {
    let scale = in_size as f32 / out_size as f32;
    let src = ((out_index as f32 + 0.5) * scale - 0.5).max(0.0);
    let low = (src.floor() as usize).min(in_size - 1);
    let high = (low + 1).min(in_size - 1);
    (low, high, src - low as f32)
}

/// Resizes `frame` to `size`×`size` (bilinear) and normalises it into `out` as CHW float32.
///
/// The live pipeline runs this on every analysed frame, so a complete frame takes a loop of its
/// own: source rows and byte offsets are resolved once per output row and column instead of a
/// bounds-checked pixel lookup per tap (Criterion, 640×480 → 256×256: 551 → 466 µs). It does
/// [`resize_normalise`]'s arithmetic in the same order, so the values are bit for bit the same
/// (unit test); a frame with missing pixels takes that loop, which reads them as 0.
pub fn frame_to_chw(frame: &RgbFrame, size: [usize; 2], norm: &Normalisation, out: &mut [f32]) {
    let row = frame.width * 3;
    let [out_h, out_w] = size;
    let plane = out_h * out_w;
    let complete = frame.width > 0 && frame.height > 0 && frame.pixels.len() >= row * frame.height;
    if !complete || out.len() != 3 * plane {
        resize_normalise([frame.height, frame.width], size, norm, out, |x, y| {
            let at = y * row + x * 3;
            match frame.pixels.get(at..at + 3) {
                Some(&[r, g, b]) => [f32::from(r), f32::from(g), f32::from(b)],
                _ => [0.0; 3],
            }
        });
        return;
    }
    // Byte offsets of both taps within a row, and the second tap's weight, per output column.
    let xs: Vec<(usize, usize, f32)> = (0..out_w)
        .map(|x| {
            let (x0, x1, wx) = bilinear_taps(x, frame.width, out_w);
            (x0 * 3, x1 * 3, wx)
        })
        .collect();
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let offset: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    let mut planes = [red, green, blue];
    for y in 0..out_h {
        let (y0, y1, wy) = bilinear_taps(y, frame.height, out_h);
        let top_row = &frame.pixels[y0 * row..(y0 + 1) * row];
        let bottom_row = &frame.pixels[y1 * row..(y1 + 1) * row];
        for (c, plane) in planes.iter_mut().enumerate() {
            // One output row of one channel: a run of contiguous writes.
            let out_row = &mut plane[y * out_w..(y + 1) * out_w];
            for (value_out, &(a, b, wx)) in out_row.iter_mut().zip(&xs) {
                let top = f32::from(top_row[a + c]) * (1.0 - wx) + f32::from(top_row[b + c]) * wx;
                let bottom =
                    f32::from(bottom_row[a + c]) * (1.0 - wx) + f32::from(bottom_row[b + c]) * wx;
                let value = top * (1.0 - wy) + bottom * wy;
                *value_out = value * scale[c] - offset[c];
            }
        }
    }
}

/// The resize-and-normalise loop behind `raw::raw_to_chw` and incomplete frames in
/// [`frame_to_chw`] (whose own loop does the same arithmetic), and the maths the GPU kernel
/// reproduces: half-pixel bilinear from a source of `from` = [H, W] pixels,
/// read as RGB 0–255 by `rgb_at(x, y)`, to `size`, then `(v / 255 − mean) / std` per channel
/// into `out` (CHW).
pub(crate) fn resize_normalise(
    from: [usize; 2],
    size: [usize; 2],
    norm: &Normalisation,
    out: &mut [f32],
    rgb_at: impl Fn(usize, usize) -> [f32; 3],
) {
    let [in_h, in_w] = from;
    let [out_h, out_w] = size;
    debug_assert_eq!(out.len(), 3 * out_h * out_w);
    let xs: Vec<(usize, usize, f32)> = (0..out_w).map(|x| bilinear_taps(x, in_w, out_w)).collect();
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let offset: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
    let plane = out_h * out_w;
    for y in 0..out_h {
        let (y0, y1, wy) = bilinear_taps(y, in_h, out_h);
        for (x, &(x0, x1, wx)) in xs.iter().enumerate() {
            let (p00, p01) = (rgb_at(x0, y0), rgb_at(x1, y0));
            let (p10, p11) = (rgb_at(x0, y1), rgb_at(x1, y1));
            for c in 0..3 {
                let top = p00[c] * (1.0 - wx) + p01[c] * wx;
                let bottom = p10[c] * (1.0 - wx) + p11[c] * wx;
                let value = top * (1.0 - wy) + bottom * wy;
                out[c * plane + y * out_w + x] = value * scale[c] - offset[c];
            }
        }
    }
}

/// Bilinearly resizes one f32 plane (an anomaly map) from `from` = [h, w] to `to` = [h, w].
pub fn resize_plane(plane: &[f32], from: [usize; 2], to: [usize; 2]) -> Vec<f32> {
    if from == to {
        return plane.to_vec();
    }
    resize_plane_region(plane, from, to, 0..to[0], 0..to[1])
}

/// Only `rows` × `cols` of [`resize_plane`]'s output (row-major, the same values).
pub fn resize_plane_region(
    plane: &[f32],
    from: [usize; 2],
    to: [usize; 2],
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<f32> {
    let [in_h, in_w] = from;
    let [out_h, out_w] = to;
    let xs: Vec<(usize, usize, f32)> = cols.map(|x| bilinear_taps(x, in_w, out_w)).collect();
    let mut out = Vec::with_capacity(rows.len() * xs.len());
    for y in rows {
        let (y0, y1, wy) = bilinear_taps(y, in_h, out_h);
        let (row0, row1) = (
            &plane[y0 * in_w..(y0 + 1) * in_w],
            &plane[y1 * in_w..(y1 + 1) * in_w],
        );
        for &(x0, x1, wx) in &xs {
            let top = row0[x0] * (1.0 - wx) + row0[x1] * wx;
            let bottom = row1[x0] * (1.0 - wx) + row1[x1] * wx;
            out.push(top * (1.0 - wy) + bottom * wy);
        }
    }
    out
}

/// The output indices (of `out_size`) whose bilinear taps reach into `inputs` (of `in_size`):
/// outside them, every value is interpolated from inputs outside `inputs` only.
pub fn bilinear_reach(
    inputs: std::ops::RangeInclusive<usize>,
    in_size: usize,
    out_size: usize,
) -> std::ops::Range<usize> {
    let touches = |o: usize| {
        let (low, high, _) = bilinear_taps(o, in_size, out_size);
        inputs.contains(&low) || inputs.contains(&high)
    };
    let first = (0..out_size).find(|&o| touches(o));
    let last = (0..out_size).rev().find(|&o| touches(o));
    match (first, last) {
        (Some(first), Some(last)) => first..last + 1,
        _ => 0..0,
    }
}

/// Convenience: one frame → a fresh CHW buffer.
pub fn to_chw(frame: &RgbFrame, size: [usize; 2], norm: &Normalisation) -> Vec<f32> {
    let mut out = vec![0.0; 3 * size[0] * size[1]];
    frame_to_chw(frame, size, norm, &mut out);
    out
}

/// A frame whose channel `c` at (x, y) is `f(x, y, c)`, for tests.
#[cfg(test)]
pub(crate) fn test_frame(
    width: usize,
    height: usize,
    f: impl Fn(usize, usize, usize) -> u8,
) -> RgbFrame {
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            for c in 0..3 {
                pixels.push(f(x, y, c));
            }
        }
    }
    RgbFrame {
        width,
        height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_decoded_by_content_and_cut_jpegs_are_told() {
        let dir = tempfile::tempdir().expect("dir");
        let picture =
            image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, 7]));
        // A PNG named .jpg, and a JPEG named .png.
        let png_as_jpg = dir.path().join("a.jpg");
        picture
            .save_with_format(&png_as_jpg, image::ImageFormat::Png)
            .expect("png");
        let jpg_as_png = dir.path().join("b.png");
        picture
            .save_with_format(&jpg_as_png, image::ImageFormat::Jpeg)
            .expect("jpeg");
        for path in [&png_as_jpg, &jpg_as_png] {
            let frame = RgbFrame::open(path).expect("decoded by content");
            assert_eq!((frame.width, frame.height), (24, 16), "{}", path.display());
        }
        let jpeg = std::fs::read(&jpg_as_png).expect("bytes");
        assert!(jpeg_ends(&jpeg));
        assert!(!jpeg_ends(&jpeg[..jpeg.len() / 2]));
        // A file cut off right after its start marker still ends without one.
        assert!(!jpeg_ends(&jpeg[..4]));
    }

    use super::test_frame as frame;

    #[test]
    fn every_listed_image_extension_decodes() {
        // `dataset::IMAGE_EXTENSIONS` lists what training and evaluation take from a folder: each
        // must decode (BMP and TIFF, e.g. BTAD's and other industrial sets' files, too).
        let dir = tempfile::tempdir().expect("dir");
        let original = frame(5, 4, |x, y, c| (x * 40 + y * 15 + c * 7) as u8);
        let image = image::RgbImage::from_raw(5, 4, original.pixels.clone()).expect("image");
        for ext in crate::dataset::IMAGE_EXTENSIONS {
            let path = dir.path().join(format!("frame.{ext}"));
            image.save(&path).expect("save");
            let read = RgbFrame::open(&path).unwrap_or_else(|e| panic!("{ext}: {e}"));
            assert_eq!((read.width, read.height), (5, 4), "{ext}");
            if !matches!(ext, "jpg" | "jpeg") {
                assert_eq!(read.pixels, original.pixels, "{ext}: lossless");
            }
        }
        // Grey 16-bit (some inspection cameras' PNGs) becomes RGB.
        let grey = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(3, 2, |x, _| {
            image::Luma([x as u16 * 30000])
        });
        let path = dir.path().join("grey16.png");
        grey.save(&path).expect("save");
        let read = RgbFrame::open(&path).expect("grey16");
        assert_eq!(&read.pixels[..9], &[0, 0, 0, 117, 117, 117, 233, 233, 233]);
    }

    #[test]
    fn identity_size_only_normalises() {
        let f = frame(4, 3, |x, y, c| (x * 50 + y * 20 + c) as u8);
        let norm = Normalisation {
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 1.0],
        };
        let out = to_chw(&f, [3, 4], &norm);
        for y in 0..3 {
            for x in 0..4 {
                for c in 0..3 {
                    let pixel = (x * 50 + y * 20 + c) as f32 / 255.0;
                    let expected = (pixel - norm.mean[c]) / norm.std[c];
                    let got = out[c * 12 + y * 4 + x];
                    assert!(
                        (got - expected).abs() < 1e-5,
                        "({x},{y},{c}): {got} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn frame_loop_matches_the_generic_loop_bit_for_bit() {
        let norm = Normalisation {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        for (width, height, size) in [(640, 480, [256, 256]), (37, 23, [64, 48]), (5, 9, [16, 16])]
        {
            let frame = test_frame(width, height, |x, y, c| {
                ((x * 7 + y * 13 + c * 101) % 256) as u8
            });
            let mut fast = vec![0.0; 3 * size[0] * size[1]];
            frame_to_chw(&frame, size, &norm, &mut fast);
            let mut generic = vec![0.0; fast.len()];
            let row = width * 3;
            resize_normalise([height, width], size, &norm, &mut generic, |x, y| {
                let at = y * row + x * 3;
                let p = &frame.pixels[at..at + 3];
                [f32::from(p[0]), f32::from(p[1]), f32::from(p[2])]
            });
            let same = fast
                .iter()
                .zip(&generic)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{width}x{height} -> {size:?} differs from the generic loop"
            );
        }
        // A truncated frame still works (missing pixels read as 0) instead of panicking.
        let mut short = test_frame(8, 8, |_, _, _| 200);
        short.pixels.truncate(8 * 3 * 4);
        let mut out = vec![0.0; 3 * 4 * 4];
        frame_to_chw(&short, [4, 4], &norm, &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn halving_averages_pixel_pairs() {
        // Half-pixel bilinear at exactly 2× down-sampling samples between two source pixels.
        let f = frame(4, 2, |x, _, _| [0u8, 100, 200, 250][x]);
        let norm = Normalisation {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let out = to_chw(&f, [1, 2], &norm);
        assert!((out[0] * 255.0 - 50.0).abs() < 1e-3, "{}", out[0] * 255.0);
        assert!((out[1] * 255.0 - 225.0).abs() < 1e-3, "{}", out[1] * 255.0);
    }

    #[test]
    fn plane_resize_matches_frame_resize() {
        let f = frame(5, 3, |x, y, _| (x * 40 + y * 7) as u8);
        let norm = Normalisation {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let via_frame = to_chw(&f, [7, 4], &norm);
        let plane: Vec<f32> = (0..15)
            .map(|i| ((i % 5) * 40 + (i / 5) * 7) as f32 / 255.0)
            .collect();
        let via_plane = resize_plane(&plane, [3, 5], [7, 4]);
        for (a, b) in via_plane.iter().zip(&via_frame[..28]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn upsampling_clamps_at_edges() {
        let f = frame(2, 1, |x, _, _| [10u8, 30][x]);
        let norm = Normalisation {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let out = to_chw(&f, [1, 4], &norm);
        let values: Vec<f32> = out[..4].iter().map(|v| (v * 255.0).round()).collect();
        assert_eq!(values, vec![10.0, 15.0, 25.0, 30.0]);
    }

    #[test]
    fn grayscale_and_16_bit_files_open_as_replicated_rgb() {
        let dir = tempfile::tempdir().expect("dir");
        let gray = dir.path().join("gray.png");
        image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(10 * x + 100 * y) as u8]))
            .save(&gray)
            .expect("save");
        let frame = RgbFrame::open(&gray).expect("open");
        assert_eq!((frame.width, frame.height), (3, 2));
        assert_eq!(&frame.pixels[3 * 4..3 * 5], &[110, 110, 110]);
        let deep = dir.path().join("deep.png");
        image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_pixel(2, 2, image::Luma([65535]))
            .save(&deep)
            .expect("save");
        assert_eq!(RgbFrame::open(&deep).expect("open").pixels, vec![255; 12]);
        let broken = dir.path().join("broken.png");
        std::fs::write(&broken, b"not a png").expect("write");
        let message = RgbFrame::open(&broken)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("broken.png"), "{message}");
    }
}
