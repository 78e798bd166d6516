//! `roc.png` and `pro.png` of an evaluation: curves drawn with plotters into an RGB buffer (the
//! embedded font labels the axes), saved as PNG.

use std::path::Path;

use plotters::prelude::*;

use crate::eval::detection::Curve;
use crate::overlay::text::{FONT_FAMILY, ensure_font};

const SIZE: (u32, u32) = (640, 480);

/// Why a chart was not written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("the embedded font failed to load")]
    Font,
    #[error("cannot draw the chart: {0}")]
    Draw(String),
    #[error("cannot save the chart: {0}")]
    Save(#[from] image::ImageError),
}

/// A drawing error of plotters (generic over the backend) as a [`PlotError`].
fn draw<E: std::fmt::Display>(error: E) -> PlotError {
    PlotError::Draw(error.to_string())
}

/// One labelled curve of a chart.
pub struct Series<'a> {
    pub label: String,
    pub curve: &'a Curve,
    pub colour: RGBColor,
}

/// Draws `series` (x: false positive rate up to `x_max`) with axis labels and a legend and writes
/// a PNG to `path`. `diagonal` adds the chance line.
pub fn line_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    x_max: f64,
    series: &[Series],
    diagonal: bool,
) -> Result<(), PlotError> {
    if !ensure_font() {
        return Err(PlotError::Font);
    }
    let (w, h) = SIZE;
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT_FAMILY, 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc("false positive rate")
            .y_desc(y_label)
            .label_style((FONT_FAMILY, 14))
            .axis_desc_style((FONT_FAMILY, 16))
            .draw()
            .map_err(draw)?;
        if diagonal {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, 0.0), (x_max, x_max.min(1.0))],
                    BLACK.mix(0.3),
                ))
                .map_err(draw)?;
        }
        for s in series {
            let points: Vec<(f64, f64)> = s
                .curve
                .fpr
                .iter()
                .zip(&s.curve.y)
                .map(|(&x, &y)| (x, y))
                .collect();
            let clipped = clip_at(&points, x_max);
            let colour = s.colour;
            chart
                .draw_series(LineSeries::new(clipped, colour.stroke_width(2)))
                .map_err(draw)?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    image::save_buffer(path, &pixels, w, h, image::ExtendedColorType::Rgb8)?;
    Ok(())
}

/// The points with x ≤ `x_max`, plus the interpolated point at `x_max`.
fn clip_at(points: &[(f64, f64)], x_max: f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(points.len());
    for &(x, y) in points {
        if x <= x_max {
            out.push((x, y));
            continue;
        }
        if let Some(&(x0, y0)) = out.last() {
            out.push((x_max, y0 + (y - y0) * (x_max - x0) / (x - x0)));
        }
        break;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_interpolates_at_the_limit() {
        let clipped = clip_at(&[(0.0, 0.0), (0.2, 0.5), (0.4, 0.9), (1.0, 1.0)], 0.3);
        assert_eq!(clipped.len(), 3);
        assert!((clipped[2].0 - 0.3).abs() < 1e-12 && (clipped[2].1 - 0.7).abs() < 1e-12);
    }

    #[test]
    fn chart_is_written_with_ink_on_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let curve = Curve {
            fpr: vec![0.0, 0.1, 1.0],
            y: vec![0.0, 0.8, 1.0],
        };
        let path = dir.path().join("roc.png");
        line_chart(
            &path,
            "ROC",
            "true positive rate",
            1.0,
            &[Series {
                label: "image AUROC 0.85".into(),
                curve: &curve,
                colour: RED,
            }],
            true,
        )
        .expect("chart");
        let img = image::open(&path).expect("png").to_rgb8();
        assert_eq!(img.dimensions(), SIZE);
        let red = img
            .pixels()
            .filter(|p| p.0[0] > 200 && p.0[1] < 60 && p.0[2] < 60)
            .count();
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(red > 300, "curve pixels: {red}");
        assert!(dark > 500, "axes and labels: {dark}");
    }
}
