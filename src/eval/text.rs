//! Text in PNGs: DejaVu Sans is compiled in and registered with plotters' `ab_glyph`
//! backend, so labels and plots render the same everywhere without system fonts.

use std::sync::OnceLock;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// `assets/DejaVuSans.ttf` (Bitstream Vera / DejaVu license; see `assets/README.md`).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
/// Registered under plotters' default family name, so chart axes use it too.
pub(crate) const FAMILY: &str = "sans-serif";

/// Registers the bundled font once; later calls are free.
pub(crate) fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    anyhow::ensure!(ok, "the bundled font DejaVuSans.ttf could not be parsed");
    Ok(())
}

/// Maps a plotters error (whose type is generic over the backend) to anyhow.
pub(crate) fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e}")
}

/// A line of text to draw at a pixel position (top left of the line box).
pub(crate) struct Label {
    pub text: String,
    pub x: i32,
    pub y: i32,
    pub size: f64,
    pub color: RGBColor,
}

/// Width in pixels of `text` at `size`.
pub(crate) fn text_width(text: &str, size: f64) -> anyhow::Result<u32> {
    ensure_font()?;
    let (w, _) = (FAMILY, size)
        .into_font()
        .box_size(text)
        .map_err(draw_err)?;
    Ok(w)
}

/// Greedy word wrap into at most `max_lines` lines of at most `max_width` px; an overlong
/// last line is cut and ends in an ellipsis.
pub(crate) fn wrap(
    text: &str,
    size: f64,
    max_width: u32,
    max_lines: usize,
) -> anyhow::Result<Vec<String>> {
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let candidate = if current.is_empty() {
            word.to_string()
        } else {
            format!("{current} {word}")
        };
        if current.is_empty() || text_width(&candidate, size)? <= max_width {
            current = candidate;
        } else {
            lines.push(std::mem::replace(&mut current, word.to_string()));
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            last.push('…');
        }
    }
    if let Some(last) = lines.last_mut() {
        while text_width(last, size)? > max_width && last.chars().count() > 1 {
            let mut chars: Vec<char> = last.chars().collect();
            chars.truncate(chars.len().saturating_sub(2));
            *last = chars.into_iter().collect::<String>() + "…";
        }
    }
    Ok(lines)
}

/// Draws `labels` onto `canvas` in place.
pub(crate) fn draw_labels(canvas: &mut RgbImage, labels: &[Label]) -> anyhow::Result<()> {
    ensure_font()?;
    let (w, h) = canvas.dimensions();
    let buf: &mut [u8] = canvas;
    let backend = BitMapBackend::<plotters::backend::RGBPixel>::with_buffer_and_format(buf, (w, h))
        .map_err(draw_err)?;
    let root = backend.into_drawing_area();
    for l in labels {
        let style = TextStyle::from((FAMILY, l.size).into_font()).color(&l.color);
        root.draw_text(&l.text, &style, (l.x, l.y))
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Encodes `img` as PNG with the crate's own `image` version.
pub(crate) fn png_bytes(img: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}
