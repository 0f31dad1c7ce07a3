//! The forward of the 3x3 convolution (stride 1, zero padding 1) as one long matrix multiply
//! per tile of output pixels: `out[Co, cols] = W[Co, 9C] x cols[9C, cols]`, where `cols` is
//! the im2col matrix of that tile alone.
//!
//! Why: nine products of depth `C` (one per tap, as the backward runs them) read and write the
//! output nine times and pack nine strided views; one product of depth `9C` streams through
//! the GEMM's own blocking once. A tile of a few hundred pixels keeps its im2col matrix a few
//! megabytes, where candle's conv2d builds the whole batch's (9x the input, in fresh memory).
//! Images smaller than a tile share one, so the weights are packed once for the group.

use super::{for_tasks, Grid};
use crate::nn::strided_gemm::{gemm_into_par, Out};

/// Output pixels one product aims at. Fewer and the weights' packing (once per product)
/// grows against the work; more and the im2col matrix outgrows the caches.
const TILE_COLUMNS: usize = 512;

/// One product's output pixels: rows `rows` of images `images` (several whole images, or part
/// of one).
#[derive(Debug)]
struct Tile {
    images: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
}

impl Grid {
    /// The tiles of about `columns` pixels each, in output order: whole rows of one image when
    /// an image holds a tile, otherwise groups of whole images.
    fn tiles(&self, columns: usize) -> Vec<Tile> {
        let hw = self.h * self.w;
        if hw >= columns {
            let rows = (columns / self.w).max(1);
            (0..self.n)
                .flat_map(|i| {
                    (0..self.h).step_by(rows).map(move |y| Tile {
                        images: i..i + 1,
                        rows: y..(y + rows).min(self.h),
                    })
                })
                .collect()
        } else {
            let per = columns.div_ceil(hw.max(1)).min(self.n);
            (0..self.n)
                .step_by(per.max(1))
                .map(|i| Tile {
                    images: i..(i + per).min(self.n),
                    rows: 0..self.h,
                })
                .collect()
        }
    }

    /// The im2col matrix of `tile`, `[9C, pixels]`, row `9 ci + 3 ky + kx` (the weight's own
    /// order), column by image, row and column of the output pixel. Every element is written
    /// once, zeros where a tap falls outside its image.
    fn im2col(&self, x: &[f32], tile: &Tile) -> Vec<f32> {
        let (c, h, w) = (self.c, self.h, self.w);
        let mut cols = Vec::with_capacity(9 * c * tile.images.len() * tile.rows.len() * w);
        for ci in 0..c {
            for ky in 0..3 {
                for kx in 0..3 {
                    for i in tile.images.clone() {
                        let plane = &x[(i * c + ci) * h * w..][..h * w];
                        for y in tile.rows.clone() {
                            // Source row y + ky - 1, if inside the image.
                            let Some(src) = (y + ky)
                                .checked_sub(1)
                                .filter(|&sy| sy < h)
                                .map(|sy| &plane[sy * w..][..w])
                            else {
                                cols.resize(cols.len() + w, 0.0);
                                continue;
                            };
                            match kx {
                                0 => {
                                    cols.push(0.0);
                                    cols.extend_from_slice(&src[..w - 1]);
                                }
                                1 => cols.extend_from_slice(src),
                                _ => {
                                    cols.extend_from_slice(&src[1..]);
                                    cols.push(0.0);
                                }
                            }
                        }
                    }
                }
            }
        }
        cols
    }
}

/// `x [N, C, H, W]` (contiguous) convolved with `wt [Co, C, 3, 3]`: `[N, Co, H, W]`.
pub(super) fn forward(x: &[f32], wt: &[f32], d: Grid) -> Vec<f32> {
    let hw = d.h * d.w;
    let mut out = vec![0f32; d.n * d.co * hw];
    if out.is_empty() || d.c == 0 {
        return out;
    }
    let tiles = d.tiles(TILE_COLUMNS);
    let dst = Out(out.as_mut_ptr());
    for_tasks(tiles.len(), |ti, par| {
        let tile = &tiles[ti];
        let (images, pixels) = (tile.images.len(), tile.rows.len() * d.w);
        let n = images * pixels;
        let cols = d.im2col(x, tile);
        let product = |dst: *mut f32, dst_rs: usize| {
            // SAFETY: lhs is the whole [Co, 9C] weight, rhs this tile's [9C, n] matrix, and
            // dst's [Co, n] block (row stride dst_rs) belongs to this tile alone.
            unsafe {
                gemm_into_par(
                    (d.co, n, 9 * d.c),
                    dst,
                    (dst_rs, 1),
                    false,
                    wt.as_ptr(),
                    (9 * d.c, 1),
                    cols.as_ptr(),
                    (n, 1),
                    1.0,
                    par,
                )
            }
        };
        if images == 1 {
            // Straight into the output: pixel rows of one image are contiguous per channel.
            let at = tile.images.start * d.co * hw + tile.rows.start * d.w;
            product(dst.at(at), hw);
        } else {
            let mut acc = vec![0f32; d.co * n];
            product(acc.as_mut_ptr(), n);
            for (li, i) in tile.images.clone().enumerate() {
                for co in 0..d.co {
                    // SAFETY: this tile alone writes its images' [Co, H, W] blocks.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            acc.as_ptr().add(co * n + li * hw),
                            dst.at((i * d.co + co) * hw),
                            hw,
                        );
                    }
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_output_pixel_once() {
        for (n, h, w, columns) in [
            (3, 5, 4, 8),
            (2, 64, 64, 512),
            (5, 8, 8, 512),
            (1, 1, 1, 512),
        ] {
            let d = Grid {
                n,
                c: 1,
                co: 1,
                h,
                w,
            };
            let mut seen = vec![0u8; n * h * w];
            for t in d.tiles(columns) {
                assert!(t.images.len() == 1 || t.rows == (0..h), "{t:?}");
                for i in t.images {
                    for y in t.rows.clone() {
                        for x in 0..w {
                            seen[(i * h + y) * w + x] += 1;
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{:?}", (n, h, w, columns));
        }
    }
}
