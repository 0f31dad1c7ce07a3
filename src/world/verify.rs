//! Analytic verifier: finds objects by colour, classifies their shape by
//! template fitting, and checks every attribute a spec states.
//!
//! Per frame: the background is the median colour of the border; each pixel is
//! explained as a blend `bg + alpha * (palette - bg)` of the background
//! with the palette colour that leaves the smallest residual, so
//! anti-aliased and blurry edges keep their colour. Pixels with alpha >= 0.5
//! form 8-connected blobs per colour; blobs under [`MIN_AREA`] px are specks.
//! Each blob is fitted, for every shape, with that shape's template by
//! matching centroid and second moments, and scored by soft IoU; the best
//! IoU names the shape. Size comes from area, position from the fitted
//! centre, motion from least-squares trends of centre and log-size over the
//! frames (objects are tracked by matching them to the spec frame by frame).

use std::borrow::Cow;

use image::{imageops, RgbImage};
use serde::{Deserialize, Serialize};

use super::geometry::{inside, moments};
use super::{
    Background, Category, Color, Motion, ObjectSpec, Position, SceneSpec, Shape, SizeClass,
};

const SIZE: usize = super::IMAGE_SIZE as usize;
const N_SHAPES: usize = 4;
/// Blobs with less soft area (px) are specks, not objects.
const MIN_AREA: f32 = 6.0;
/// ... and so are blobs with fewer core pixels.
const MIN_CORE: usize = 3;
/// A pixel belongs to a blob core when at least this much of it is the colour.
const CORE_ALPHA: f32 = 0.5;
/// Largest RGB distance between a pixel and its best blend line.
const MAX_RESIDUAL: f32 = 70.0;
/// A shape is recognised only with at least this template IoU.
const MIN_SHAPE_IOU: f32 = 0.5;
/// Gaussian blur widths (px) the template fit tries, so blurry samples are
/// compared with equally blurry templates.
const BLUR_HYPOTHESES: [f32; 5] = [0.0, 0.6, 0.85, 1.1, 1.6];
/// A sharp-template IoU this high means the blob is crisp.
const SHARP_IOU: f32 = 0.9;
/// Largest blobs analysed per frame (noise can make many).
const MAX_BLOBS: usize = 12;
/// Half-extent separating small from large (geometric mean of 4 and 7).
const SIZE_SPLIT: f32 = 5.29;
/// Furthest a centre may be from its named anchor, in px.
const MAX_POSITION_ERROR: f32 = 6.0;
/// Furthest the background may be from the named one (RGB distance).
const MAX_BACKGROUND_ERROR: f32 = 60.0;
/// Share of video frames in which per-frame checks must hold.
const FRAME_QUORUM: f32 = 0.75;

/// One blob found in one frame, for debugging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectedObject {
    pub frame: usize,
    pub color: Color,
    /// Best-fitting shape (even when its IoU is too low to be trusted).
    pub shape: Shape,
    pub shape_iou: f32,
    /// Centre (x, y) of the fitted template, in pixels.
    pub center: [f32; 2],
    /// Half-extent estimated from the area, in pixels.
    pub radius: f32,
    /// Soft area in pixels.
    pub area: f32,
}

impl std::fmt::Display for DetectedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [x, y] = self.center;
        write!(
            f,
            "{} {} (shape IoU {:.2}) at ({x:.1}, {y:.1}), half-extent {:.1} px",
            self.color, self.shape, self.shape_iou, self.radius
        )
    }
}

/// The verifier's judgement of frames against a spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Every stated attribute holds (GenEval-style strict).
    pub pass: bool,
    /// Soft agreement in [0, 1]; ranks near misses, used as a reward.
    pub score: f32,
    pub categories: Vec<Category>,
    pub detected: Vec<DetectedObject>,
    /// Human-readable reasons the spec failed (empty when it passed).
    pub failures: Vec<String>,
}

/// Categories of a spec for the per-category breakdown: SingleObject,
/// TwoObjects or Count by structure; Color when two different colours must
/// be bound to their shapes; Position when any position is stated; Motion
/// for videos with any stated motion.
pub fn categories(spec: &SceneSpec) -> Vec<Category> {
    let mut out = Vec::new();
    match spec.objects.len() {
        0 => {}
        1 => out.push(Category::SingleObject),
        _ if spec.is_count() => out.push(Category::Count),
        _ => out.push(Category::TwoObjects),
    }
    if spec
        .objects
        .iter()
        .any(|o| o.color != spec.objects[0].color)
    {
        out.push(Category::Color);
    }
    if spec.objects.iter().any(|o| o.position.is_some()) {
        out.push(Category::Position);
    }
    if spec.frames > 1 && spec.objects.iter().any(|o| o.motion.is_some()) {
        out.push(Category::Motion);
    }
    out
}

#[derive(Clone, Debug)]
struct Blob {
    color: Color,
    area: f32,
    iou: [f32; N_SHAPES],
    centers: [(f32, f32); N_SHAPES],
}

impl Blob {
    fn best(&self) -> Shape {
        let mut best = Shape::all()[0];
        for &s in Shape::all() {
            if self.iou[s.index()] > self.iou[best.index()] {
                best = s;
            }
        }
        best
    }

    fn radius(&self, shape: Shape) -> f32 {
        (self.area / moments(shape).area).sqrt()
    }

    fn center(&self, shape: Shape) -> (f32, f32) {
        self.centers[shape.index()]
    }

    fn recognised_as(&self, o: &ObjectSpec) -> bool {
        self.color == o.color
            && self.best() == o.shape
            && self.iou[o.shape.index()] >= MIN_SHAPE_IOU
    }
}

struct FrameInfo {
    bg: [f32; 3],
    blobs: Vec<Blob>,
}

fn dist3(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// Per-channel median of the frame's border pixels: objects stay inside
/// the frame, so the border is background even when an object covers most
/// of the frame or the image is noisy.
fn estimate_background(px: &[[f32; 3]]) -> [f32; 3] {
    let border: Vec<[f32; 3]> = (0..SIZE * SIZE)
        .filter(|i| {
            let (x, y) = (i % SIZE, i / SIZE);
            x == 0 || y == 0 || x == SIZE - 1 || y == SIZE - 1
        })
        .map(|i| px[i])
        .collect();
    let mut out = [0f32; 3];
    for (c, slot) in out.iter_mut().enumerate() {
        let mut v: Vec<f32> = border.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        *slot = v[v.len() / 2];
    }
    out
}

/// Alpha and residual of `p` as a blend of `bg` towards `color`.
fn blend(p: [f32; 3], bg: [f32; 3], color: [f32; 3]) -> (f32, f32) {
    let d = [color[0] - bg[0], color[1] - bg[1], color[2] - bg[2]];
    let e = [p[0] - bg[0], p[1] - bg[1], p[2] - bg[2]];
    let dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    if dd < 1.0 {
        return (0.0, f32::INFINITY);
    }
    let alpha = (e[0] * d[0] + e[1] * d[1] + e[2] * d[2]) / dd;
    let a = alpha.clamp(0.0, 1.0);
    let r = [e[0] - a * d[0], e[1] - a * d[1], e[2] - a * d[2]];
    (alpha, (r[0] * r[0] + r[1] * r[1] + r[2] * r[2]).sqrt())
}

/// A blob before shape fitting: palette index, soft region as (pixel,
/// weight), soft area.
type Candidate = (usize, Vec<(usize, f32)>, f32);

fn analyze(img: &RgbImage) -> FrameInfo {
    if img.width() == 0 || img.height() == 0 {
        return FrameInfo {
            bg: [0.0; 3],
            blobs: Vec::new(),
        };
    }
    let img: Cow<RgbImage> = if img.dimensions() == (SIZE as u32, SIZE as u32) {
        Cow::Borrowed(img)
    } else {
        Cow::Owned(imageops::resize(
            img,
            SIZE as u32,
            SIZE as u32,
            imageops::FilterType::Triangle,
        ))
    };
    let px: Vec<[f32; 3]> = img.pixels().map(|p| p.0.map(f32::from)).collect();
    let bg = estimate_background(&px);
    let palette: Vec<[f32; 3]> = Color::all()
        .iter()
        .map(|c| c.rgb().map(f32::from))
        .collect();

    // Core label per pixel: the colour whose blend line fits best.
    let mut label: Vec<Option<usize>> = vec![None; SIZE * SIZE];
    for (i, &p) in px.iter().enumerate() {
        // Pick the colour first (among faint blends too), then require the
        // pixel to be mostly that colour: a half-covered orange edge on white
        // must not become a yellow core.
        let mut best: Option<(usize, f32, f32)> = None;
        for (c, &col) in palette.iter().enumerate() {
            let (alpha, res) = blend(p, bg, col);
            if alpha >= 0.15 && best.is_none_or(|b| res < b.2) {
                best = Some((c, alpha, res));
            }
        }
        label[i] = best
            .filter(|&(_, alpha, res)| alpha >= CORE_ALPHA && res < MAX_RESIDUAL)
            .map(|b| b.0);
    }

    // Candidate blobs: colour, soft region (pixel, weight) and soft area.
    let mut seen = vec![false; SIZE * SIZE];
    let mut candidates: Vec<Candidate> = Vec::new();
    for start in 0..SIZE * SIZE {
        let Some(c) = label[start] else { continue };
        if seen[start] {
            continue;
        }
        // Flood fill the 8-connected core.
        let mut core = vec![start];
        seen[start] = true;
        let mut k = 0;
        while k < core.len() {
            let i = core[k];
            k += 1;
            for j in neighbours(i) {
                if !seen[j] && label[j] == Some(c) {
                    seen[j] = true;
                    core.push(j);
                }
            }
        }
        if core.len() < MIN_CORE {
            continue;
        }
        // Soft region: core plus a two-pixel rim of partial coverage.
        let mut region: Vec<usize> = core;
        for _ in 0..2 {
            let grown: Vec<usize> = region
                .iter()
                .flat_map(|&i| neighbours(i))
                .filter(|&j| label[j].is_none())
                .collect();
            region.extend(grown);
            region.sort_unstable();
            region.dedup();
        }
        let soft: Vec<(usize, f32)> = region
            .into_iter()
            .map(|i| {
                let (alpha, res) = blend(px[i], bg, palette[c]);
                (
                    i,
                    if res < MAX_RESIDUAL {
                        alpha.clamp(0.0, 1.0)
                    } else {
                        0.0
                    },
                )
            })
            .collect();
        let area: f32 = soft.iter().map(|p| p.1).sum();
        if area >= MIN_AREA {
            candidates.push((c, soft, area));
        }
    }
    candidates.sort_by(|a, b| b.2.total_cmp(&a.2));
    candidates.truncate(MAX_BLOBS);
    let mut weights = vec![0f32; SIZE * SIZE];
    let mut blobs = Vec::with_capacity(candidates.len());
    for (c, soft, area) in candidates {
        for &(i, w) in &soft {
            weights[i] = w;
        }
        let region: Vec<usize> = soft.iter().map(|p| p.0).collect();
        blobs.push(fit(Color::all()[c], &region, &weights, area));
        for &(i, _) in &soft {
            weights[i] = 0.0;
        }
    }
    FrameInfo { bg, blobs }
}

fn neighbours(i: usize) -> impl Iterator<Item = usize> {
    let (x, y) = ((i % SIZE) as i32, (i / SIZE) as i32);
    (-1..=1)
        .flat_map(move |dy| (-1..=1).map(move |dx| (x + dx, y + dy)))
        .filter(move |&(nx, ny)| {
            (nx, ny) != (x, y) && nx >= 0 && ny >= 0 && nx < SIZE as i32 && ny < SIZE as i32
        })
        .map(|(nx, ny)| ny as usize * SIZE + nx as usize)
}

/// Fits every shape's template to the blob by moments and scores soft IoU.
fn fit(color: Color, region: &[usize], weights: &[f32], area: f32) -> Blob {
    let (mut mx, mut my) = (0f32, 0f32);
    let (mut x0, mut y0, mut x1, mut y1) = (SIZE, SIZE, 0, 0);
    for &i in region {
        let (x, y) = (i % SIZE, i / SIZE);
        mx += weights[i] * (x as f32 + 0.5);
        my += weights[i] * (y as f32 + 0.5);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    mx /= area;
    my /= area;
    let (mut vx, mut vy) = (0f32, 0f32);
    for &i in region {
        let (x, y) = ((i % SIZE) as f32 + 0.5, (i / SIZE) as f32 + 0.5);
        vx += weights[i] * (x - mx).powi(2);
        vy += weights[i] * (y - my).powi(2);
    }
    vx /= area;
    vy /= area;
    let mut iou = [0f32; N_SHAPES];
    let mut centers = [(mx, my); N_SHAPES];
    let stats = BlobStats {
        weights,
        mean: (mx, my),
        var: (vx, vy),
        bbox: (x0, y0, x1, y1),
    };
    for (k, sigma) in BLUR_HYPOTHESES.into_iter().enumerate() {
        // A crisp render fits a sharp template closely: skip blurred ones.
        if k > 0 && iou.iter().any(|&v| v >= SHARP_IOU) {
            break;
        }
        for &s in Shape::all() {
            let (score, center) = stats.template_iou(s, sigma);
            if score > iou[s.index()] {
                iou[s.index()] = score;
                centers[s.index()] = center;
            }
        }
    }
    Blob {
        color,
        area,
        iou,
        centers,
    }
}

/// What the template fit needs to know about a blob.
struct BlobStats<'a> {
    weights: &'a [f32],
    mean: (f32, f32),
    /// Coverage-weighted variance of pixel centres, which includes each
    /// pixel's own box spread (1/12) on top of the shape's.
    var: (f32, f32),
    bbox: (usize, usize, usize, usize),
}

impl BlobStats<'_> {
    /// Soft IoU of the blob with `shape`'s template blurred by `sigma`,
    /// placed by moment matching; also returns the template centre.
    fn template_iou(&self, shape: Shape, sigma: f32) -> (f32, (f32, f32)) {
        let m = moments(shape);
        let (x0, y0, x1, y1) = self.bbox;
        let spread = 1.0 / 12.0 + sigma * sigma;
        let hx = ((self.var.0 - spread).max(0.0) / m.var_u).sqrt().max(0.5);
        let hy = ((self.var.1 - spread).max(0.0) / m.var_v).sqrt().max(0.5);
        let (cx, cy) = (self.mean.0, self.mean.1 - m.mean_v * hy);
        let pad = (1.0 + 3.0 * sigma).ceil();
        let wx0 = x0.min((cx - hx - pad).max(0.0) as usize);
        let wy0 = y0.min((cy - hy - pad).max(0.0) as usize);
        let wx1 = (x1 + 1)
            .max((cx + hx + pad + 1.0).max(0.0) as usize)
            .min(SIZE);
        let wy1 = (y1 + 1)
            .max((cy + hy + pad + 1.0).max(0.0) as usize)
            .min(SIZE);
        let (w, h) = (wx1 - wx0, wy1 - wy0);
        let mut t = template(shape, cx - wx0 as f32, cy - wy0 as f32, hx, hy, w, h);
        gaussian_blur(&mut t, w, h, sigma);
        let (mut inter, mut union) = (0f32, 0f32);
        for y in 0..h {
            for x in 0..w {
                let a = t[y * w + x];
                let b = self.weights[(y + wy0) * SIZE + x + wx0];
                inter += a.min(b);
                union += a.max(b);
            }
        }
        let score = if union > 0.0 { inter / union } else { 0.0 };
        (score, (cx, cy))
    }
}

/// Coverage of a shape (centre, half-extents in window pixels) on a
/// `w`x`h` window, 3x3 supersampled like a soft render.
fn template(shape: Shape, cx: f32, cy: f32, hx: f32, hy: f32, w: usize, h: usize) -> Vec<f32> {
    const SS: usize = 3;
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut hits = 0;
            for sy in 0..SS {
                let v = (y as f32 + (sy as f32 + 0.5) / SS as f32 - cy) / hy;
                for sx in 0..SS {
                    let u = (x as f32 + (sx as f32 + 0.5) / SS as f32 - cx) / hx;
                    hits += inside(shape, u, v) as usize;
                }
            }
            out[y * w + x] = hits as f32 / (SS * SS) as f32;
        }
    }
    out
}

/// In-place separable Gaussian blur with zero padding.
fn gaussian_blur(img: &mut [f32], w: usize, h: usize, sigma: f32) {
    if sigma <= 0.0 {
        return;
    }
    let r = (3.0 * sigma).ceil() as i32;
    let kernel: Vec<f32> = (-r..=r).map(|i| gauss(i as f32, sigma)).collect();
    let norm: f32 = kernel.iter().sum();
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, kv) in kernel.iter().enumerate() {
                let xx = x as i32 + k as i32 - r;
                if xx >= 0 && (xx as usize) < w {
                    acc += kv * img[y * w + xx as usize];
                }
            }
            tmp[y * w + x] = acc / norm;
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, kv) in kernel.iter().enumerate() {
                let yy = y as i32 + k as i32 - r;
                if yy >= 0 && (yy as usize) < h {
                    acc += kv * tmp[yy as usize * w + x];
                }
            }
            img[y * w + x] = acc / norm;
        }
    }
}

fn gauss(x: f32, sigma: f32) -> f32 {
    (-(x * x) / (2.0 * sigma * sigma)).exp()
}

/// Soft shape agreement: half absolute fit, half margin over the best
/// other shape (a square seen as a circle still fits a circle fairly well,
/// but loses on the margin).
fn shape_term(o: &ObjectSpec, b: &Blob) -> f32 {
    let own = b.iou[o.shape.index()];
    let other = Shape::all()
        .iter()
        .filter(|&&s| s != o.shape)
        .map(|s| b.iou[s.index()])
        .fold(0.0, f32::max);
    let fit = ((own - 0.5) / 0.4).clamp(0.0, 1.0);
    let margin = 1.0 / (1.0 + (-(own - other) / 0.03).exp());
    0.5 * fit + 0.5 * margin
}

/// Per-frame agreement of a blob with an object, used to match them.
fn frame_score(o: &ObjectSpec, b: &Blob) -> f32 {
    let mut sum = (b.color == o.color) as u8 as f32 + shape_term(o, b);
    let mut n = 2.0;
    if let Some(size) = o.size {
        sum += gauss((b.radius(o.shape) / size.radius()).ln(), 0.3);
        n += 1.0;
    }
    if let Some(p) = o.position {
        let (ax, ay) = p.anchor();
        let (cx, cy) = b.center(o.shape);
        sum += gauss(((cx - ax).powi(2) + (cy - ay).powi(2)).sqrt(), 5.0);
        n += 1.0;
    }
    sum / n
}

/// Best assignment of blobs to objects in one frame (exhaustive for up to
/// three objects, greedy beyond), with a bonus for staying near each
/// object's previous centre so identical objects keep their identity.
fn assign(
    objects: &[ObjectSpec],
    blobs: &[Blob],
    prev: &[Option<(f32, f32)>],
) -> Vec<Option<usize>> {
    let score = |k: usize, b: usize| {
        let mut s = frame_score(&objects[k], &blobs[b]);
        if let Some((px, py)) = prev[k] {
            let (cx, cy) = blobs[b].center(objects[k].shape);
            s += 0.25 * gauss(((cx - px).powi(2) + (cy - py).powi(2)).sqrt(), 4.0);
        }
        s
    };
    let mut current = vec![None; objects.len()];
    if objects.len() > 3 {
        let mut used = vec![false; blobs.len()];
        for (k, slot) in current.iter_mut().enumerate() {
            let best = (0..blobs.len())
                .filter(|&b| !used[b])
                .max_by(|&a, &b| score(k, a).total_cmp(&score(k, b)));
            if let Some(b) = best {
                used[b] = true;
                *slot = Some(b);
            }
        }
        return current;
    }
    let mut best = (f32::NEG_INFINITY, current.clone());
    search(
        0,
        objects.len(),
        blobs.len(),
        &score,
        &mut current,
        0.0,
        &mut best,
    );
    best.1
}

fn search(
    k: usize,
    n: usize,
    blobs: usize,
    score: &dyn Fn(usize, usize) -> f32,
    current: &mut Vec<Option<usize>>,
    total: f32,
    best: &mut (f32, Vec<Option<usize>>),
) {
    if k == n {
        if total > best.0 {
            *best = (total, current.clone());
        }
        return;
    }
    current[k] = None;
    search(k + 1, n, blobs, score, current, total, best);
    for b in 0..blobs {
        if current[..k].contains(&Some(b)) {
            continue;
        }
        current[k] = Some(b);
        search(k + 1, n, blobs, score, current, total + score(k, b), best);
    }
    current[k] = None;
}

/// Least-squares change of `values` (indexed by frame) over the clip.
fn trend(points: &[(f32, f32)], frames: usize) -> f32 {
    let n = points.len() as f32;
    if points.len() < 2 {
        return 0.0;
    }
    let mt = points.iter().map(|p| p.0).sum::<f32>() / n;
    let mv = points.iter().map(|p| p.1).sum::<f32>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, v) in points {
        num += (t - mt) * (v - mv);
        den += (t - mt) * (t - mt);
    }
    if den <= 0.0 {
        0.0
    } else {
        num / den * (frames - 1) as f32
    }
}

/// Each object's blob index in each frame, tracked by matching the objects to the blobs frame
/// by frame, each frame near the object's last centre.
fn track(objects: &[ObjectSpec], infos: &[FrameInfo]) -> Vec<Vec<Option<usize>>> {
    let mut tracks: Vec<Vec<Option<usize>>> = vec![Vec::with_capacity(infos.len()); objects.len()];
    let mut prev = vec![None; objects.len()];
    for info in infos {
        let a = assign(objects, &info.blobs, &prev);
        for (k, slot) in a.into_iter().enumerate() {
            if let Some(b) = slot {
                prev[k] = Some(info.blobs[b].center(objects[k].shape));
            }
            tracks[k].push(slot);
        }
    }
    tracks
}

/// The (frame, blob) pairs of one object's track.
fn matched_blobs<'a>(track: &[Option<usize>], infos: &'a [FrameInfo]) -> Vec<(usize, &'a Blob)> {
    track
        .iter()
        .enumerate()
        .filter_map(|(f, b)| b.map(|b| (f, &infos[f].blobs[b])))
        .collect()
}

/// Displacement over the clip (x, y, in px) and log size change of one tracked object.
fn motion_trends(matched: &[(usize, &Blob)], shape: Shape, frames: usize) -> (f32, f32, f32) {
    let series = |value: &dyn Fn(&Blob) -> f32| -> Vec<(f32, f32)> {
        matched.iter().map(|(f, b)| (*f as f32, value(b))).collect()
    };
    let xs = series(&|b| b.center(shape).0);
    let ys = series(&|b| b.center(shape).1);
    let rs = series(&|b| b.radius(shape).max(0.1).ln());
    let n = frames.max(2);
    (trend(&xs, n), trend(&ys, n), trend(&rs, n))
}

/// The motion the verifier sees for each object of `spec` in `frames` (`None` when an object
/// is tracked in fewer than two frames or its path names no motion), by the same tracking and
/// thresholds as [`verify`]'s motion check.
pub fn observed_motions(spec: &SceneSpec, frames: &[RgbImage]) -> Vec<Option<Motion>> {
    let infos: Vec<FrameInfo> = frames.iter().map(analyze).collect();
    let tracks = track(&spec.objects, &infos);
    spec.objects
        .iter()
        .zip(&tracks)
        .map(|(o, t)| {
            let matched = matched_blobs(t, &infos);
            if matched.len() < 2 {
                return None;
            }
            let (dx, dy, g) = motion_trends(&matched, o.shape, infos.len());
            classify_motion(dx, dy, g)
        })
        .collect()
}

/// Motion named by a displacement (px over the clip) and log size change.
fn classify_motion(dx: f32, dy: f32, log_growth: f32) -> Option<Motion> {
    let (ax, ay) = (dx.abs(), dy.abs());
    if log_growth >= 0.3 {
        Some(Motion::Growing)
    } else if log_growth <= -0.3 {
        Some(Motion::Shrinking)
    } else if ax.max(ay) >= 5.0 && ax.max(ay) >= 2.0 * ax.min(ay) {
        Some(match (ax >= ay, dx > 0.0, dy > 0.0) {
            (true, true, _) => Motion::Right,
            (true, false, _) => Motion::Left,
            (false, _, true) => Motion::Down,
            (false, _, false) => Motion::Up,
        })
    } else if (dx * dx + dy * dy).sqrt() < 3.0 && log_growth.abs() < 0.2 {
        Some(Motion::Still)
    } else {
        None
    }
}

/// Expected (dx, dy, log growth) of a motion over a clip.
fn expected_motion(m: Motion) -> (f32, f32, f32) {
    let (dx, dy) = m.direction();
    let g = match m {
        Motion::Growing => 2f32.ln(),
        Motion::Shrinking => -(2f32.ln()),
        _ => 0.0,
    };
    (dx * super::scene::TRAVEL, dy * super::scene::TRAVEL, g)
}

fn nearest_position(x: f32, y: f32) -> (Position, f32) {
    let mut best = (Position::Center, f32::INFINITY);
    for &p in Position::all() {
        let (ax, ay) = p.anchor();
        let d = ((x - ax).powi(2) + (y - ay).powi(2)).sqrt();
        if d < best.1 {
            best = (p, d);
        }
    }
    best
}

/// Scores `frames` against `spec`; see the module docs for the method.
/// Frames of any size are resized to 32x32 first. Motion is checked only
/// when at least two frames are given.
pub fn verify(spec: &SceneSpec, frames: &[RgbImage]) -> Verdict {
    let categories = categories(spec);
    if frames.is_empty() {
        return Verdict {
            pass: false,
            score: 0.0,
            categories,
            detected: Vec::new(),
            failures: vec!["no frames".into()],
        };
    }
    let infos: Vec<FrameInfo> = frames.iter().map(analyze).collect();
    let n = infos.len();
    let quorum = ((n as f32 * FRAME_QUORUM).ceil() as usize).max(1);
    let objects = &spec.objects;
    let mut failures = Vec::new();

    let tracks = track(objects, &infos);

    let mut object_scores = 0.0;
    for (k, o) in objects.iter().enumerate() {
        let matched = matched_blobs(&tracks[k], &infos);
        let name = format!("{} {}", o.color, o.shape);
        let coverage = matched.len() as f32 / n as f32;
        let color_term =
            matched.iter().filter(|(_, b)| b.color == o.color).count() as f32 / n as f32;
        let shape_sum: f32 = matched.iter().map(|(_, b)| shape_term(o, b)).sum();
        // Stated attributes beyond colour and shape.
        let mut terms = Vec::new();
        let recognised = matched.iter().filter(|(_, b)| b.recognised_as(o)).count();
        if recognised < quorum {
            failures.push(format!("{name}: recognised in {recognised} of {n} frames"));
        }
        let m = matched.len().max(1) as f32;
        let mean_r = matched.iter().map(|(_, b)| b.radius(o.shape)).sum::<f32>() / m;
        let mean_x = matched
            .iter()
            .map(|(_, b)| b.center(o.shape).0)
            .sum::<f32>()
            / m;
        let mean_y = matched
            .iter()
            .map(|(_, b)| b.center(o.shape).1)
            .sum::<f32>()
            / m;
        if let Some(size) = o.size {
            terms.push(coverage * gauss((mean_r.max(0.1) / size.radius()).ln(), 0.3));
            let seen = if mean_r < SIZE_SPLIT {
                SizeClass::Small
            } else {
                SizeClass::Large
            };
            if matched.is_empty() || seen != size {
                failures.push(format!("{name}: size {mean_r:.1} px is not {size}"));
            }
        }
        if let Some(p) = o.position {
            let (ax, ay) = p.anchor();
            let d = ((mean_x - ax).powi(2) + (mean_y - ay).powi(2)).sqrt();
            terms.push(coverage * gauss(d, 5.0));
            let (near, nd) = nearest_position(mean_x, mean_y);
            if matched.is_empty() || near != p || nd > MAX_POSITION_ERROR {
                failures.push(format!(
                    "{name}: centre ({mean_x:.1}, {mean_y:.1}) is not {}",
                    p.phrase()
                ));
            }
        }
        if let Some(motion) = o.motion.filter(|_| n >= 2 || spec.frames > 1) {
            let (dx, dy, g) = motion_trends(&matched, o.shape, n);
            let (ex, ey, eg) = expected_motion(motion);
            let fit =
                gauss(((dx - ex).powi(2) + (dy - ey).powi(2)).sqrt(), 4.0) * gauss(g - eg, 0.25);
            terms.push(coverage * fit);
            let seen = classify_motion(dx, dy, g);
            if matched.len() < 2 || seen != Some(motion) {
                failures.push(format!(
                    "{name}: moved ({dx:.1}, {dy:.1}) px and grew x{:.2}, not {}",
                    g.exp(),
                    motion.phrase()
                ));
            }
        }
        // Identity (colour and shape) gates the other attributes: a red
        // square is a poor "red circle" however well it is placed.
        let identity = (0.25 + 0.75 * color_term) * (0.25 + 0.75 * shape_sum / n as f32);
        object_scores += if terms.is_empty() {
            identity
        } else {
            identity * (0.4 + 0.6 * terms.iter().sum::<f32>() / terms.len() as f32)
        };
    }

    let count_ok = infos
        .iter()
        .filter(|i| i.blobs.len() == objects.len())
        .count();
    if count_ok < quorum {
        let counts: Vec<usize> = infos.iter().map(|i| i.blobs.len()).collect();
        failures.push(format!(
            "expected {} objects, found {counts:?} per frame",
            objects.len()
        ));
    }
    let count_factor = infos
        .iter()
        .map(|i| 0.7f32.powi((i.blobs.len() as i32 - objects.len() as i32).abs()))
        .sum::<f32>()
        / n as f32;

    let mut bg_term = 0.0;
    if let Some(bg) = spec.background {
        let mut mean = [0f32; 3];
        for info in &infos {
            for (m, v) in mean.iter_mut().zip(info.bg) {
                *m += v / n as f32;
            }
        }
        let target = bg.rgb().map(f32::from);
        bg_term = gauss(dist3(mean, target), 50.0);
        let nearest = Background::all()
            .iter()
            .copied()
            .min_by(|a, b| {
                dist3(mean, a.rgb().map(f32::from)).total_cmp(&dist3(mean, b.rgb().map(f32::from)))
            })
            .unwrap_or(bg);
        if nearest != bg || dist3(mean, target) > MAX_BACKGROUND_ERROR {
            failures.push(format!(
                "background {:?} is not {bg}",
                mean.map(|c| c.round() as i32)
            ));
        }
    }
    // The background weighs half an object: it is the easiest part.
    let bg_weight = if spec.background.is_some() { 0.5 } else { 0.0 };
    let parts = objects.len() as f32 + bg_weight;
    let score = if parts > 0.0 {
        (object_scores + bg_weight * bg_term) / parts * count_factor
    } else {
        count_factor
    };

    let detected = infos
        .iter()
        .enumerate()
        .flat_map(|(f, info)| {
            info.blobs.iter().map(move |b| {
                let s = b.best();
                let (cx, cy) = b.center(s);
                DetectedObject {
                    frame: f,
                    color: b.color,
                    shape: s,
                    shape_iou: b.iou[s.index()],
                    center: [cx, cy],
                    radius: b.radius(s),
                    area: b.area,
                }
            })
        })
        .collect();
    Verdict {
        pass: failures.is_empty(),
        score: score.clamp(0.0, 1.0),
        categories,
        detected,
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{parse, prompt, render, sample_spec, Split, WorldRng};
    use image::Rgb;
    use rand::{Rng, SeedableRng};

    fn noise_frames(n: usize, rng: &mut WorldRng) -> Vec<RgbImage> {
        (0..n)
            .map(|_| {
                RgbImage::from_fn(32, 32, |_, _| {
                    Rgb([rng.random(), rng.random(), rng.random()])
                })
            })
            .collect()
    }

    /// Shape classification on clean and blurred single objects.
    #[test]
    fn shapes_survive_blur() {
        let mut rng = WorldRng::seed_from_u64(99);
        for (size, sigma, need) in [
            (SizeClass::Small, 0.0, 50),
            (SizeClass::Large, 0.0, 50),
            (SizeClass::Small, 0.8, 48),
            (SizeClass::Large, 1.5, 48),
        ] {
            for &s in Shape::all() {
                let mut right = 0;
                for _ in 0..50 {
                    let mut o = ObjectSpec::new(s, Color::all()[rng.random_range(0..6)]);
                    o.size = Some(size);
                    let spec = SceneSpec {
                        objects: vec![o],
                        background: None,
                        frames: 1,
                    };
                    let mut frames = render(&spec, &mut rng);
                    if sigma > 0.0 {
                        frames[0] = imageops::blur(&frames[0], sigma);
                    }
                    let info = analyze(&frames[0]);
                    right += info.blobs.first().is_some_and(|b| b.best() == s) as usize;
                }
                assert!(right >= need, "{size} {s} blur {sigma}: {right}/50");
            }
        }
    }

    /// True renders blurred anywhere from 0.7 to 1.25 px still pass: the blur hypotheses of
    /// the template fit leave no hole in that range (blur 1.0 once failed 10% of images and
    /// 22% of videos, between the 0.6 and 1.1 hypotheses). At 1.5 px 7% of images still fail
    /// (small triangles, crosses and squares; 9.5% with the old hypotheses): not covered yet.
    /// A 1.35 hypothesis made 1.5 worse (25% fail), so the list only gains 0.85.
    #[test]
    fn blurred_ground_truth_passes() {
        let mut rng = WorldRng::seed_from_u64(77);
        for sigma in [0.7f32, 0.85, 1.0, 1.25] {
            for video in [false, true] {
                let n = if video { 60 } else { 200 };
                let mut pass = 0;
                for _ in 0..n {
                    let spec = sample_spec(&mut rng, Split::Train, video);
                    let frames: Vec<RgbImage> = render(&spec, &mut rng)
                        .iter()
                        .map(|f| imageops::blur(f, sigma))
                        .collect();
                    let v = verify(&spec, &frames);
                    if !v.pass {
                        println!("blur {sigma}: {:?}: {:?}", prompt(&spec), v.failures);
                    }
                    pass += v.pass as usize;
                }
                let rate = pass as f64 / n as f64;
                println!("blur {sigma} video {video}: {pass}/{n}");
                assert!(rate >= 0.99, "blur {sigma}, video {video}: {pass}/{n} pass");
            }
        }
    }

    /// Mild blur plus uniform noise: a stand-in for a decent generated sample.
    fn degrade(frames: &[RgbImage], rng: &mut WorldRng) -> Vec<RgbImage> {
        frames
            .iter()
            .map(|f| {
                let mut b = imageops::blur(f, 0.7);
                for p in b.pixels_mut() {
                    for c in p.0.iter_mut() {
                        let n: f32 = rng.random_range(-20.0..20.0);
                        *c = (*c as f32 + n).clamp(0.0, 255.0) as u8;
                    }
                }
                b
            })
            .collect()
    }

    /// The acceptance test of the verifier, over 500 specs (train and
    /// held-out, images and videos). Measured at seed 2024: ground truth
    /// 100% pass (mean score 0.997), degraded ground truth 100%, uniform
    /// noise 0%, renders of a different prompt 0.6% (mean score 0.31).
    #[test]
    fn validation_ground_truth_noise_and_wrong_prompts() {
        let mut rng = WorldRng::seed_from_u64(2024);
        let groups = [
            (Split::Train, false),
            (Split::Train, true),
            (Split::HeldOut, false),
            (Split::HeldOut, true),
        ];
        let per_group = 125;
        let (mut total, mut gt_pass, mut soft_pass, mut noise_pass) =
            (0usize, 0usize, 0usize, 0usize);
        let (mut wrong_total, mut wrong_pass) = (0usize, 0usize);
        let (mut gt_score, mut wrong_score) = (0f64, 0f64);
        for (split, video) in groups {
            let specs: Vec<SceneSpec> = (0..per_group)
                .map(|_| sample_spec(&mut rng, split, video))
                .collect();
            let renders: Vec<Vec<RgbImage>> = specs.iter().map(|s| render(s, &mut rng)).collect();
            for (i, spec) in specs.iter().enumerate() {
                total += 1;
                let v = verify(spec, &renders[i]);
                gt_score += v.score as f64;
                gt_pass += v.pass as usize;
                if !v.pass {
                    println!("ground truth failed: {:?}: {:?}", prompt(spec), v.failures);
                }
                let soft = verify(spec, &degrade(&renders[i], &mut rng));
                soft_pass += soft.pass as usize;
                if !soft.pass {
                    println!("degraded failed: {:?}: {:?}", prompt(spec), soft.failures);
                }
                noise_pass += verify(spec, &noise_frames(spec.frames, &mut rng)).pass as usize;
                let j = (i + 1 + rng.random_range(0..per_group - 1)) % per_group;
                if specs[j] != *spec {
                    let w = verify(spec, &renders[j]);
                    wrong_total += 1;
                    wrong_score += w.score as f64;
                    wrong_pass += w.pass as usize;
                }
            }
        }
        let rate = |n: usize, d: usize| n as f64 / d as f64;
        let (gt_mean, wrong_mean) = (gt_score / total as f64, wrong_score / wrong_total as f64);
        println!(
            "ground truth {:.4} (score {gt_mean:.3}), degraded {:.4}, noise {:.4}, \
             wrong prompt {:.4} of {wrong_total} (score {wrong_mean:.3})",
            rate(gt_pass, total),
            rate(soft_pass, total),
            rate(noise_pass, total),
            rate(wrong_pass, wrong_total),
        );
        assert!(total >= 500);
        assert!(rate(gt_pass, total) >= 0.99);
        assert!(rate(soft_pass, total) >= 0.95);
        assert!(rate(noise_pass, total) <= 0.05);
        assert!(rate(wrong_pass, wrong_total) <= 0.05);
        assert!(gt_mean - wrong_mean >= 0.3, "{gt_mean} vs {wrong_mean}");
    }

    fn mean_score(target: &SceneSpec, shown: &str, seed: u64) -> f32 {
        let spec = parse(shown).expect("test prompt");
        let mut rng = WorldRng::seed_from_u64(seed);
        (0..10)
            .map(|_| verify(target, &render(&spec, &mut rng)).score)
            .sum::<f32>()
            / 10.0
    }

    #[test]
    fn soft_score_ranks_near_misses() {
        let target = parse("a large red circle on the left on a black background").expect("p");
        let exact = mean_score(
            &target,
            "a large red circle on the left on a black background",
            1,
        );
        let shape = mean_score(
            &target,
            "a large red square on the left on a black background",
            2,
        );
        let near = mean_score(
            &target,
            "a large red circle in the center on a black background",
            3,
        );
        let far = mean_score(
            &target,
            "a large red circle on the right on a black background",
            4,
        );
        let other = mean_score(
            &target,
            "a small blue square on the right on a white background",
            5,
        );
        let blank = verify(&target, &[RgbImage::new(32, 32)]).score;
        println!("exact {exact} shape {shape} near {near} far {far} other {other} blank {blank}");
        assert!(exact > 0.95);
        assert!(exact > shape + 0.1 && shape > blank && shape > other);
        assert!(exact > near && near > far && far > other);
        assert!(blank < 0.3 && other < 0.3);
    }

    #[test]
    fn wrong_motion_size_and_count_fail() {
        let mut rng = WorldRng::seed_from_u64(12);
        let cases = [
            ("a red circle moving left", "a red circle moving right"),
            ("a red circle moving up", "a red circle staying still"),
            ("a blue square growing", "a blue square shrinking"),
            ("a small green cross", "a large green cross"),
            ("two yellow triangles", "a yellow triangle"),
            ("a yellow triangle", "two yellow triangles"),
            (
                "a purple circle and an orange cross",
                "a purple cross and an orange circle",
            ),
            (
                "a red circle on a white background",
                "a red circle on a gray background",
            ),
        ];
        for (want, shown) in cases {
            let target = parse(want).expect("p");
            let spec = parse(shown).expect("p");
            for _ in 0..5 {
                let frames = render(&spec, &mut rng);
                assert!(verify(&spec, &frames).pass, "{shown}");
                let v = verify(&target, &frames);
                assert!(!v.pass, "{want} passed on {shown}");
            }
        }
    }

    #[test]
    fn categories_and_odd_inputs() {
        let c = |p: &str| categories(&parse(p).expect("p"));
        assert_eq!(c("a red circle"), vec![Category::SingleObject]);
        assert_eq!(
            c("a red circle on the left and a blue square on the right"),
            vec![Category::TwoObjects, Category::Color, Category::Position]
        );
        assert_eq!(
            c("two green squares moving left"),
            vec![Category::Count, Category::Motion]
        );
        let spec = parse("a large red circle").expect("p");
        assert!(!verify(&spec, &[]).pass);
        assert!(!verify(&spec, &[RgbImage::new(0, 0)]).pass);
        // Larger frames are resized before checking.
        let frame = render(&spec, &mut WorldRng::seed_from_u64(3)).remove(0);
        let big = imageops::resize(&frame, 64, 64, imageops::FilterType::Nearest);
        assert!(verify(&spec, &[big]).pass);
        // A video spec judged on one frame cannot show its motion.
        let video = parse("a red circle moving left").expect("p");
        let one = render(&video, &mut WorldRng::seed_from_u64(3)).remove(0);
        assert!(!verify(&video, &[one]).pass);
    }
}
