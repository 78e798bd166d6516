//! The live overlay, drawn with OpenCV: JET heatmap blended where the normalised map exceeds the
//! alert level, outlines and bounding boxes of the anomalous regions, and a caption with camera,
//! score and rate. RGB in, RGB out; no I/O.

use opencv::core::{self, Mat, Point, Rect, Scalar, Vector};
use opencv::imgproc;
use opencv::prelude::*;

use crate::bundle::Calibration;
use crate::preprocess::RgbFrame;

/// What the caption says besides the score.
pub struct Caption<'a> {
    pub camera: &'a str,
    /// Analysed frames per second (0 hides it).
    pub fps: f32,
}

/// Why a frame could not be annotated (an OpenCV error, with its message).
#[derive(Debug, thiserror::Error)]
#[error("overlay: {0}")]
pub struct OverlayError(String);

impl From<opencv::Error> for OverlayError {
    fn from(e: opencv::Error) -> Self {
        Self(e.to_string())
    }
}

/// Annotates `frame` with `raw_map` (the model's map resized to the frame) and returns the
/// anomalous regions' boxes in pixels alongside the RGB pixels.
pub fn annotate(
    frame: &RgbFrame,
    raw_map: &[f32],
    calibration: &Calibration,
    raw_score: f32,
    caption: &Caption,
) -> Result<(Vec<u8>, Vec<[i32; 4]>), OverlayError> {
    let (w, h) = (frame.width as i32, frame.height as i32);
    if raw_map.len() != frame.width * frame.height || frame.pixels.len() != raw_map.len() * 3 {
        return Err(OverlayError(format!(
            "map of {} values for a {w}×{h} frame",
            raw_map.len()
        )));
    }
    let mut image = Mat::new_rows_cols_with_default(h, w, core::CV_8UC3, Scalar::all(0.0))?;
    image.data_bytes_mut()?.copy_from_slice(&frame.pixels);
    let mut level = Mat::new_rows_cols_with_default(h, w, core::CV_8UC1, Scalar::all(0.0))?;
    for (out, &raw) in level.data_bytes_mut()?.iter_mut().zip(raw_map) {
        *out = (calibration.normalise(raw) * 255.0).round() as u8;
    }
    // Normalised 0.5 is the calibrated threshold: paint and outline what is above it.
    let mut mask = Mat::default();
    imgproc::threshold(&level, &mut mask, 127.0, 255.0, imgproc::THRESH_BINARY)?;
    // Most frames of a good line have nothing above it: no colour map or blend to compute.
    if core::count_non_zero(&mask)? > 0 {
        let mut heat_bgr = Mat::default();
        imgproc::apply_color_map(&level, &mut heat_bgr, imgproc::COLORMAP_JET)?;
        let mut heat = Mat::default();
        imgproc::cvt_color_def(&heat_bgr, &mut heat, imgproc::COLOR_BGR2RGB)?;
        let mut blended = Mat::default();
        core::add_weighted_def(&image, 0.4, &heat, 0.6, 0.0, &mut blended)?;
        blended.copy_to_masked(&mut image, &mask)?;
    }
    decorate(image, &mask, calibration, raw_score, caption)
}

/// The rest of the overlay on a frame whose heatmap is already blended (here, or on the GPU by
/// `overlay::heat`): outlines and boxes of `mask`'s regions (255 = anomalous, one byte per
/// pixel) and the caption. `pixels` is packed RGB of `width`×`height`.
pub fn decorate_rgb(
    pixels: &[u8],
    mask: &[u8],
    width: usize,
    height: usize,
    calibration: &Calibration,
    raw_score: f32,
    caption: &Caption,
) -> Result<(Vec<u8>, Vec<[i32; 4]>), OverlayError> {
    if pixels.len() != width * height * 3 || mask.len() != width * height {
        return Err(OverlayError(format!(
            "{} pixel bytes and a mask of {} for a {width}×{height} frame",
            pixels.len(),
            mask.len()
        )));
    }
    let (w, h) = (width as i32, height as i32);
    let mut image = Mat::new_rows_cols_with_default(h, w, core::CV_8UC3, Scalar::all(0.0))?;
    image.data_bytes_mut()?.copy_from_slice(pixels);
    let mut mask_mat = Mat::new_rows_cols_with_default(h, w, core::CV_8UC1, Scalar::all(0.0))?;
    mask_mat.data_bytes_mut()?.copy_from_slice(mask);
    decorate(image, &mask_mat, calibration, raw_score, caption)
}

fn decorate(
    mut image: Mat,
    mask: &Mat,
    calibration: &Calibration,
    raw_score: f32,
    caption: &Caption,
) -> Result<(Vec<u8>, Vec<[i32; 4]>), OverlayError> {
    let h = image.rows();
    let mut contours = Vector::<Vector<Point>>::new();
    imgproc::find_contours_def(
        mask,
        &mut contours,
        imgproc::RETR_EXTERNAL,
        imgproc::CHAIN_APPROX_SIMPLE,
    )?;
    let white = Scalar::new(255.0, 255.0, 255.0, 0.0);
    let red = Scalar::new(255.0, 40.0, 40.0, 0.0);
    imgproc::draw_contours(
        &mut image,
        &contours,
        -1,
        white,
        1,
        imgproc::LINE_8,
        &core::no_array(),
        i32::MAX,
        Point::default(),
    )?;
    let mut boxes = Vec::new();
    for contour in &contours {
        let rect = imgproc::bounding_rect(&contour)?;
        imgproc::rectangle(&mut image, rect, red, 2, imgproc::LINE_8, 0)?;
        boxes.push([rect.x, rect.y, rect.width, rect.height]);
    }
    let mut text = format!(
        "{}  score {:.2}",
        caption.camera,
        calibration.normalise(raw_score)
    );
    if caption.fps > 0.0 {
        text.push_str(&format!("  {:.1} fps", caption.fps));
    }
    let scale = (f64::from(h) / 600.0).clamp(0.4, 1.2);
    let mut baseline = 0;
    let size = imgproc::get_text_size(
        &text,
        imgproc::FONT_HERSHEY_SIMPLEX,
        scale,
        1,
        &mut baseline,
    )?;
    imgproc::rectangle(
        &mut image,
        Rect::new(0, 0, size.width + 12, size.height + baseline + 12),
        Scalar::new(0.0, 0.0, 0.0, 0.0),
        -1,
        imgproc::LINE_8,
        0,
    )?;
    imgproc::put_text(
        &mut image,
        &text,
        Point::new(6, size.height + 6),
        imgproc::FONT_HERSHEY_SIMPLEX,
        scale,
        white,
        1,
        imgproc::LINE_AA,
        false,
    )?;
    Ok((image.data_bytes()?.to_vec(), boxes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calibration() -> Calibration {
        Calibration {
            threshold: 1.0,
            floor: 0.0,
            method: "test".into(),
            n_images: 1,
            good_median: 0.1,
        }
    }

    #[test]
    fn hot_square_gets_a_box_heat_and_caption_and_cold_pixels_stay() {
        let (w, h) = (120usize, 90usize);
        let frame = RgbFrame {
            width: w,
            height: h,
            pixels: vec![100; w * h * 3],
        };
        // Raw 2.0 (normalised 1.0) inside x 60..80, y 40..60; 0 elsewhere.
        let map: Vec<f32> = (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                if (60..80).contains(&x) && (40..60).contains(&y) {
                    2.0
                } else {
                    0.0
                }
            })
            .collect();
        let (pixels, boxes) = annotate(
            &frame,
            &map,
            &calibration(),
            2.0,
            &Caption {
                camera: "line1",
                fps: 12.5,
            },
        )
        .expect("annotate");
        assert_eq!(boxes, vec![[60, 40, 20, 20]]);
        let at = |x: usize, y: usize| &pixels[(y * w + x) * 3..(y * w + x) * 3 + 3];
        // Inside: JET red blended over grey (R well above G and B).
        let inside = at(70, 50);
        // JET at the top is dark red (128, 0, 0): 0.4 × 100 + 0.6 × 128 = 117 red, 40 green/blue.
        assert!(
            inside[0] > 100 && inside[1] < 60 && inside[2] < 60,
            "{inside:?}"
        );
        // Far from the square and the caption: untouched.
        assert_eq!(at(10, 80), &[100, 100, 100]);
        // Caption box top-left: dark background with light text somewhere.
        assert!(at(1, 1).iter().all(|&c| c < 20), "{:?}", at(1, 1));
        let bright = (0..12)
            .flat_map(|y| (0..100).map(move |x| (x, y)))
            .any(|(x, y)| at(x, y)[0] > 200);
        assert!(bright, "caption text");
    }

    /// The GPU path's overlay (heatmap blended by `overlay::heat`, whose GPU kernel equals it, then
    /// `decorate_rgb`) draws what `annotate` draws: same boxes, colours within a JET rounding step.
    #[test]
    fn blend_then_decorate_matches_annotate() {
        use crate::preprocess::raw::{PixelFormat, PlaneLayout, RawFrame};
        let (w, h) = (120usize, 90usize);
        let frame = RgbFrame {
            width: w,
            height: h,
            pixels: (0..w * h * 3).map(|i| (i % 200) as u8).collect(),
        };
        let map: Vec<f32> = (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                if (30..70).contains(&x) && (20..50).contains(&y) {
                    1.0 + (x as f32 - 30.0) / 40.0
                } else {
                    0.2
                }
            })
            .collect();
        let caption = Caption {
            camera: "line1",
            fps: 0.0,
        };
        let (expected, expected_boxes) =
            annotate(&frame, &map, &calibration(), 1.5, &caption).expect("annotate");
        let layout = PlaneLayout::packed(PixelFormat::Rgb, w, h);
        let raw = RawFrame::new(PixelFormat::Rgb, w, h, layout, &frame.pixels).expect("frame");
        let heat = crate::overlay::heat::blend(&raw, &map, [h, w], &calibration()).expect("blend");
        let (got, boxes) = decorate_rgb(
            &heat.pixels,
            &heat.mask,
            w,
            h,
            &calibration(),
            1.5,
            &caption,
        )
        .expect("decorate");
        assert_eq!(boxes, expected_boxes);
        assert_eq!(boxes.len(), 1);
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        assert!(worst <= 3, "largest channel difference {worst}");
        let message = decorate_rgb(
            &heat.pixels,
            &heat.mask[1..],
            w,
            h,
            &calibration(),
            1.5,
            &caption,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(message.contains("120×90"), "{message}");
    }

    #[test]
    fn size_mismatch_is_an_error_not_a_panic() {
        let frame = RgbFrame {
            width: 4,
            height: 4,
            pixels: vec![0; 48],
        };
        let caption = Caption {
            camera: "c",
            fps: 0.0,
        };
        assert!(annotate(&frame, &[0.0; 3], &calibration(), 0.0, &caption).is_err());
    }
}
