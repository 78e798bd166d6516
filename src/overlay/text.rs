//! Text on images and plots with the embedded DejaVu Sans Mono (no system fonts needed): registers
//! the font with plotters once and draws captions onto RGB buffers.

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// The family name plots and captions ask plotters for.
pub const FONT_FAMILY: &str = "stpm-mono";

static FONT: &[u8] = include_bytes!("font/DejaVuSansMono.ttf");

/// Registers the embedded font with plotters (idempotent). `false` if the font failed to parse,
/// in which case text is left out rather than failing the caller.
pub fn ensure_font() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok())
}

/// Draws `text` in white on a black box at the top-left corner of an RGB buffer.
pub fn draw_caption(pixels: &mut [u8], width: usize, height: usize, text: &str) {
    if !ensure_font() || pixels.len() != width * height * 3 || width == 0 || height == 0 {
        return;
    }
    let size = (height as f64 / 18.0).clamp(10.0, 28.0);
    let root =
        BitMapBackend::with_buffer(pixels, (width as u32, height as u32)).into_drawing_area();
    let style = TextStyle::from((FONT_FAMILY, size).into_font()).color(&WHITE);
    let (text_w, text_h) = root.estimate_text_size(text, &style).unwrap_or((0, 0));
    let pad = 3i32;
    let box_w = (text_w as i32 + 2 * pad).min(width as i32);
    let box_h = (text_h as i32 + 2 * pad).min(height as i32);
    // Drawing errors on an in-memory buffer only mean a clipped caption; the image stays usable.
    let _ = root.draw(&Rectangle::new(
        [(0, 0), (box_w, box_h)],
        BLACK.mix(0.7).filled(),
    ));
    let _ = root.draw(&Text::new(text.to_string(), (pad, pad), style));
    let _ = root.present();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_paints_light_pixels_in_the_corner_only() {
        let (w, h) = (120, 60);
        let mut pixels = vec![128u8; w * h * 3];
        draw_caption(&mut pixels, w, h, "score 0.73");
        let corner_max = (0..12)
            .flat_map(|y| (0..60).map(move |x| (y, x)))
            .map(|(y, x)| pixels[(y * w + x) * 3])
            .max()
            .unwrap_or(0);
        assert!(corner_max > 200, "white glyphs expected, max {corner_max}");
        let corner_dark = (0..12).any(|y| pixels[(y * w + 1) * 3] < 60);
        assert!(corner_dark, "dark caption box expected");
        let far = &pixels[((h - 1) * w + w - 1) * 3..];
        assert_eq!(far, &[128, 128, 128], "bottom-right corner untouched");
    }
}
