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

/// A normalised level below this rounds to at most 127 (the alert level is above 127): a map whose
/// largest value stays below it has nothing to paint or outline. Half a level of margin covers
/// float rounding in the resize.
const QUIET_BELOW: f32 = 127.0 / 255.0;

/// [`annotate`] for the model's own map (`map_size` = [h, w], e.g. 256×256), resized to the frame
/// only when something in it reaches the alert level. Bilinear resizing never exceeds the largest
/// input value, so a map that is quiet at model size is quiet at frame size; such frames (most of a
/// good line's) only get the caption, which is the same picture [`annotate`] draws for them.
pub fn annotate_model_map(
    frame: &RgbFrame,
    model_map: &[f32],
    map_size: [usize; 2],
    calibration: &Calibration,
    raw_score: f32,
    caption: &Caption,
) -> Result<(Vec<u8>, Vec<[i32; 4]>), OverlayError> {
    if model_map.len() != map_size[0] * map_size[1] {
        return Err(OverlayError(format!(
            "map of {} values, expected {}×{}",
            model_map.len(),
            map_size[1],
            map_size[0]
        )));
    }
    let peak = model_map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if calibration.normalise(peak) < QUIET_BELOW {
        if frame.pixels.len() != frame.width * frame.height * 3 {
            return Err(OverlayError(format!(
                "{} pixel bytes for a {}×{} frame",
                frame.pixels.len(),
                frame.width,
                frame.height
            )));
        }
        let mut pixels = frame.pixels.clone();
        caption_band(
            &mut pixels,
            frame.width,
            frame.height,
            calibration,
            raw_score,
            caption,
        )?;
        return Ok((pixels, Vec::new()));
    }
    // Only the frame pixels interpolated from a model pixel at the alert level can reach it:
    // resize, colour and blend just that rectangle.
    // (first row, last row, first column, last column) of the model pixels at the alert level.
    let mut hot: Option<(usize, usize, usize, usize)> = None;
    for (index, &value) in model_map.iter().enumerate() {
        if calibration.normalise(value) >= QUIET_BELOW {
            let (row, col) = (index / map_size[1], index % map_size[1]);
            hot = Some(match hot {
                None => (row, row, col, col),
                Some((r0, r1, c0, c1)) => (r0.min(row), r1.max(row), c0.min(col), c1.max(col)),
            });
        }
    }
    let Some((r0, r1, c0, c1)) = hot else {
        return annotate_region(frame, &[], Rect::default(), calibration, raw_score, caption);
    };
    let (rows, cols) = (r0..=r1, c0..=c1);
    let rows = crate::preprocess::bilinear_reach(rows, map_size[0], frame.height);
    let cols = crate::preprocess::bilinear_reach(cols, map_size[1], frame.width);
    let region = crate::preprocess::resize_plane_region(
        model_map,
        map_size,
        [frame.height, frame.width],
        rows.clone(),
        cols.clone(),
    );
    let rect = Rect::new(
        cols.start as i32,
        rows.start as i32,
        cols.len() as i32,
        rows.len() as i32,
    );
    annotate_region(frame, &region, rect, calibration, raw_score, caption)
}

/// A `rows`×`cols` Mat of element type `typ` holding a copy of `bytes` (which must fill it).
pub(crate) fn mat_from_bytes(
    rows: usize,
    cols: usize,
    typ: i32,
    bytes: &[u8],
) -> Result<Mat, opencv::Error> {
    let mut mat = Mat::new_rows_cols_with_default(rows as i32, cols as i32, typ, Scalar::all(0.0))?;
    let data = mat.data_bytes_mut()?;
    if data.len() != bytes.len() {
        return Err(opencv::Error::new(
            core::StsBadSize,
            format!(
                "{} bytes for a {rows}×{cols} Mat of {}",
                bytes.len(),
                data.len()
            ),
        ));
    }
    data.copy_from_slice(bytes);
    Ok(mat)
}

/// Draws the caption into packed RGB `pixels` through a Mat of only the rows it covers.
fn caption_band(
    pixels: &mut [u8],
    width: usize,
    height: usize,
    calibration: &Calibration,
    raw_score: f32,
    caption: &Caption,
) -> Result<(), OverlayError> {
    let text = caption_text(calibration, raw_score, caption);
    let (scale, size, baseline) = caption_size(&text, height as i32)?;
    let rows = ((size.height + baseline + 12).max(0) as usize).min(height);
    let band = &mut pixels[..rows * width * 3];
    let mut image = mat_from_bytes(rows, width, core::CV_8UC3, band)?;
    draw_caption(&mut image, &text, scale, size, baseline)?;
    band.copy_from_slice(image.data_bytes()?);
    Ok(())
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
    if raw_map.len() != frame.width * frame.height {
        return Err(OverlayError(format!(
            "map of {} values for a {w}×{h} frame",
            raw_map.len()
        )));
    }
    annotate_region(
        frame,
        raw_map,
        Rect::new(0, 0, w, h),
        calibration,
        raw_score,
        caption,
    )
}

/// [`annotate`] with the map given only inside `rect` (row-major, `rect`'s size), where the
/// caller knows nothing outside reaches the alert level.
fn annotate_region(
    frame: &RgbFrame,
    region_map: &[f32],
    rect: Rect,
    calibration: &Calibration,
    raw_score: f32,
    caption: &Caption,
) -> Result<(Vec<u8>, Vec<[i32; 4]>), OverlayError> {
    let (w, h) = (frame.width as i32, frame.height as i32);
    let inside = rect.x >= 0
        && rect.y >= 0
        && rect.width >= 0
        && rect.height >= 0
        && rect.x + rect.width <= w
        && rect.y + rect.height <= h;
    if !inside
        || region_map.len() != (rect.width * rect.height) as usize
        || frame.pixels.len() != frame.width * frame.height * 3
    {
        return Err(OverlayError(format!(
            "map of {} values in {}×{} at ({}, {}) for a {w}×{h} frame of {} bytes",
            region_map.len(),
            rect.width,
            rect.height,
            rect.x,
            rect.y,
            frame.pixels.len()
        )));
    }
    let mut image = mat_from_bytes(frame.height, frame.width, core::CV_8UC3, &frame.pixels)?;
    let mut mask = Mat::new_rows_cols_with_default(h, w, core::CV_8UC1, Scalar::all(0.0))?;
    if rect.width > 0 && rect.height > 0 {
        let levels: Vec<u8> = region_map
            .iter()
            .map(|&raw| (calibration.normalise(raw) * 255.0).round() as u8)
            .collect();
        let level = mat_from_bytes(
            rect.height as usize,
            rect.width as usize,
            core::CV_8UC1,
            &levels,
        )?;
        // Normalised 0.5 is the calibrated threshold: paint and outline what is above it.
        let mut region_mask = Mat::default();
        imgproc::threshold(
            &level,
            &mut region_mask,
            127.0,
            255.0,
            imgproc::THRESH_BINARY,
        )?;
        // Most frames of a good line have nothing above it: no colour map or blend to compute.
        if core::count_non_zero(&region_mask)? > 0 {
            let mut heat_bgr = Mat::default();
            imgproc::apply_color_map(&level, &mut heat_bgr, imgproc::COLORMAP_JET)?;
            let mut heat = Mat::default();
            imgproc::cvt_color_def(&heat_bgr, &mut heat, imgproc::COLOR_BGR2RGB)?;
            let mut blended = Mat::default();
            core::add_weighted_def(&Mat::roi(&image, rect)?, 0.4, &heat, 0.6, 0.0, &mut blended)?;
            blended.copy_to_masked(&mut Mat::roi_mut(&mut image, rect)?, &region_mask)?;
            region_mask.copy_to(&mut Mat::roi_mut(&mut mask, rect)?)?;
        }
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
    let image = mat_from_bytes(height, width, core::CV_8UC3, pixels)?;
    let mask_mat = mat_from_bytes(height, width, core::CV_8UC1, mask)?;
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
    let text = caption_text(calibration, raw_score, caption);
    let (scale, size, baseline) = caption_size(&text, h)?;
    draw_caption(&mut image, &text, scale, size, baseline)?;
    Ok((image.data_bytes()?.to_vec(), boxes))
}

/// `<camera>  score 0.42  12.5 fps`.
fn caption_text(calibration: &Calibration, raw_score: f32, caption: &Caption) -> String {
    let mut text = format!(
        "{}  score {:.2}",
        caption.camera,
        calibration.normalise(raw_score)
    );
    if caption.fps > 0.0 {
        text.push_str(&format!("  {:.1} fps", caption.fps));
    }
    text
}

/// Font scale for a frame `height` pixels tall, and the text's size and baseline at that scale.
fn caption_size(text: &str, height: i32) -> Result<(f64, core::Size, i32), OverlayError> {
    let scale = (f64::from(height) / 600.0).clamp(0.4, 1.2);
    let mut baseline = 0;
    let size =
        imgproc::get_text_size(text, imgproc::FONT_HERSHEY_SIMPLEX, scale, 1, &mut baseline)?;
    Ok((scale, size, baseline))
}

/// The caption, white on a black box in the top-left corner.
fn draw_caption(
    image: &mut Mat,
    text: &str,
    scale: f64,
    size: core::Size,
    baseline: i32,
) -> Result<(), OverlayError> {
    imgproc::rectangle(
        image,
        Rect::new(0, 0, size.width + 12, size.height + baseline + 12),
        Scalar::new(0.0, 0.0, 0.0, 0.0),
        -1,
        imgproc::LINE_8,
        0,
    )?;
    imgproc::put_text(
        image,
        text,
        Point::new(6, size.height + 6),
        imgproc::FONT_HERSHEY_SIMPLEX,
        scale,
        Scalar::new(255.0, 255.0, 255.0, 0.0),
        1,
        imgproc::LINE_AA,
        false,
    )?;
    Ok(())
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
    fn model_map_overlay_matches_the_full_size_overlay_quiet_or_not() {
        let (w, h) = (160usize, 120usize);
        let frame =
            crate::preprocess::test_frame(w, h, |x, y, c| ((x * 3 + y * 5 + c * 40) % 256) as u8);
        let caption = Caption {
            camera: "line1",
            fps: 12.5,
        };
        let size = [32usize, 32usize];
        // Quiet: everything below the alert level (normalised ≤ 0.45), so nothing is resized.
        let quiet: Vec<f32> = (0..32 * 32).map(|i| 0.9 * (i % 7) as f32 / 6.0).collect();
        // Hot: one corner above it.
        let hot: Vec<f32> = (0..32 * 32)
            .map(|i| if i % 32 < 8 && i / 32 < 8 { 1.8 } else { 0.2 })
            .collect();
        // Soft spots in the middle and near the far corner: the alert level is crossed gradually,
        // so pixels just outside the painted rectangle interpolate values just below it.
        let spots: Vec<f32> = (0..32 * 32)
            .map(|i| {
                let (x, y) = ((i % 32) as f32, (i / 32) as f32);
                let spot = |cx: f32, cy: f32| (-((x - cx).powi(2) + (y - cy).powi(2)) / 6.0).exp();
                1.6 * spot(14.0, 15.0) + 1.2 * spot(28.5, 26.0)
            })
            .collect();
        for (map, anomalous) in [(&quiet, false), (&hot, true), (&spots, true)] {
            let full = crate::preprocess::resize_plane(map, size, [h, w]);
            let expected = annotate(&frame, &full, &calibration(), 0.9, &caption).expect("full");
            let got = annotate_model_map(&frame, map, size, &calibration(), 0.9, &caption)
                .expect("model map");
            assert_eq!(got.1, expected.1, "boxes");
            assert_eq!(got.1.is_empty(), !anomalous);
            assert!(
                got.0 == expected.0,
                "pixels differ (anomalous: {anomalous})"
            );
            assert_ne!(got.0, frame.pixels, "the caption is drawn");
        }
        // A map of the wrong size is an error, not a panic.
        assert!(
            annotate_model_map(&frame, &quiet[1..], size, &calibration(), 0.9, &caption).is_err()
        );
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
