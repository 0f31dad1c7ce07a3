//! Labelled sample sheets: `grid.png` for images and the animated `videos.gif`, so a reader
//! sees what the numbers mean. Samples are upscaled 4x with nearest-neighbour (no blur that
//! would hide what the verifier saw) and labelled with pass/fail, score, split and prompt.

use image::{imageops, Rgb, RgbImage};
use plotters::style::RGBColor;

use super::text::{draw_labels, png_bytes, wrap, Label};

/// Nearest-neighbour upscale factor of the 32x32 samples.
pub const SCALE: u32 = 4;
const IMG: u32 = crate::world::IMAGE_SIZE * SCALE;
const PAD: u32 = 4;
/// Room for the 128 px sample and a prompt of about 28 characters per line.
const CELL_W: u32 = 176;
const FONT_SIZE: f64 = 12.0;
const LINE_H: u32 = 14;
/// One status line and up to three lines of prompt.
const LABEL_LINES: u32 = 4;
const CELL_H: u32 = PAD + IMG + PAD + LINE_H * LABEL_LINES + PAD;
const HEADER_H: u32 = 24;
/// Columns of a sheet; eight samples is also the width of the video strip.
const COLS: usize = 8;
/// Frame rate of `videos.gif`: an 8-frame clip loops every 2 s.
const GIF_FPS: u32 = 4;

const INK: RGBColor = RGBColor(30, 30, 30);
const PASS: RGBColor = RGBColor(0, 130, 40);
const FAIL: RGBColor = RGBColor(200, 20, 20);

/// One labelled sample.
pub(crate) struct Tile<'a> {
    pub frames: &'a [RgbImage],
    pub prompt: &'a str,
    pub pass: bool,
    pub score: f32,
    /// Split name shown after the verdict.
    pub tag: &'a str,
}

/// Size in pixels of a sheet of `n` samples (`grid.png`, and each frame of `videos.gif`).
pub fn grid_size(n: usize) -> (u32, u32) {
    let cols = n.clamp(1, COLS);
    let rows = n.max(1).div_ceil(cols);
    (cols as u32 * CELL_W, HEADER_H + rows as u32 * CELL_H)
}

/// Top-left corner of the image of tile `i`.
fn image_origin(i: usize) -> (u32, u32) {
    let (col, row) = ((i % COLS) as u32, (i / COLS) as u32);
    (
        col * CELL_W + (CELL_W - IMG) / 2,
        HEADER_H + row * CELL_H + PAD,
    )
}

/// The sheet without samples: white background, title, labels and image frames.
fn base_sheet(title: &str, tiles: &[Tile]) -> anyhow::Result<RgbImage> {
    let (w, h) = grid_size(tiles.len());
    let mut canvas = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    // Text is placed by its line box; the font's baseline sits about 2/3 down the line.
    let baseline = (LINE_H as f64 * 0.3) as i32;
    let mut labels = vec![Label {
        text: title.to_string(),
        x: PAD as i32,
        y: (HEADER_H / 2) as i32 - 2,
        size: 13.0,
        color: INK,
    }];
    for (i, t) in tiles.iter().enumerate() {
        let (ix, iy) = image_origin(i);
        draw_border(&mut canvas, ix, iy);
        let x = ((i % COLS) as u32 * CELL_W + PAD) as i32;
        let top = (iy + IMG + PAD) as i32 + baseline;
        let (verdict, color) = if t.pass {
            ("PASS", PASS)
        } else {
            ("FAIL", FAIL)
        };
        labels.push(Label {
            text: format!("{verdict} {:.2} · {}", t.score, t.tag),
            x,
            y: top,
            size: FONT_SIZE,
            color,
        });
        let lines = wrap(
            t.prompt,
            FONT_SIZE,
            CELL_W - 2 * PAD,
            LABEL_LINES as usize - 1,
        )?;
        for (k, line) in lines.into_iter().enumerate() {
            labels.push(Label {
                text: line,
                x,
                y: top + (k as i32 + 1) * LINE_H as i32,
                size: FONT_SIZE,
                color: INK,
            });
        }
    }
    draw_labels(&mut canvas, &labels)?;
    Ok(canvas)
}

/// A 1 px light-grey frame around an image, so samples on white backgrounds stay visible.
fn draw_border(canvas: &mut RgbImage, ix: u32, iy: u32) {
    let grey = Rgb([190, 190, 190]);
    let (x0, y0, x1, y1) = (ix - 1, iy - 1, ix + IMG, iy + IMG);
    for x in x0..=x1 {
        canvas.put_pixel(x, y0, grey);
        canvas.put_pixel(x, y1, grey);
    }
    for y in y0..=y1 {
        canvas.put_pixel(x0, y, grey);
        canvas.put_pixel(x1, y, grey);
    }
}

/// `base` with frame `t` of every tile pasted in (the last frame for shorter clips).
fn with_frame(base: &RgbImage, tiles: &[Tile], t: usize) -> RgbImage {
    let mut canvas = base.clone();
    for (i, tile) in tiles.iter().enumerate() {
        let Some(frame) = tile.frames.get(t).or(tile.frames.last()) else {
            continue;
        };
        let up = imageops::resize(frame, IMG, IMG, imageops::FilterType::Nearest);
        let (ix, iy) = image_origin(i);
        imageops::replace(&mut canvas, &up, ix as i64, iy as i64);
    }
    canvas
}

/// `grid.png`: the first frame of every tile.
pub(crate) fn grid_png(title: &str, tiles: &[Tile]) -> anyhow::Result<Vec<u8>> {
    let base = base_sheet(title, tiles)?;
    png_bytes(&with_frame(&base, tiles, 0))
}

/// `videos.gif`: every frame of every tile, looping.
pub(crate) fn video_strip_gif(title: &str, tiles: &[Tile]) -> anyhow::Result<Vec<u8>> {
    let base = base_sheet(title, tiles)?;
    let n = tiles
        .iter()
        .map(|t| t.frames.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let frames: Vec<RgbImage> = (0..n).map(|t| with_frame(&base, tiles, t)).collect();
    Ok(crate::media::encode(
        &frames,
        crate::media::OutputFormat::Gif,
        GIF_FPS,
    )?)
}
