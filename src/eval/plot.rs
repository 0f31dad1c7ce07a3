//! Training curves from a `metrics.jsonl` log (one JSON object per line with a `step`), as a
//! PNG with one panel per field: the teacher's `loss.png` and, later, distillation curves.

use std::path::Path;

use anyhow::Context;
use image::RgbImage;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::text::{draw_err, ensure_font, png_bytes, FAMILY};

const WIDTH: u32 = 900;
const PANEL_H: u32 = 260;
const TITLE_H: u32 = 30;
/// A positive field spanning more than this ratio gets a log-scale y axis.
const LOG_SPAN: f64 = 10.0;

/// One panel: a field's (step, value) points, sorted by step.
#[derive(Debug, Clone, PartialEq)]
struct Curve {
    name: String,
    points: Vec<(f64, f64)>,
}

impl Curve {
    fn y_range(&self) -> (f64, f64) {
        let lo = self
            .points
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min);
        let hi = self
            .points
            .iter()
            .map(|p| p.1)
            .fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    }

    fn log_scale(&self) -> bool {
        let (lo, hi) = self.y_range();
        lo > 0.0 && hi / lo > LOG_SPAN
    }
}

/// Plots the numeric fields `series` of `metrics_jsonl` against `step` into `out_png`, one
/// panel per field; an empty `series` plots every numeric field. Unparsable lines (such as
/// a line still being written by a running job) are skipped with a warning; when a step
/// repeats (a resumed run), the later entry wins.
pub fn plot_jsonl(metrics_jsonl: &Path, out_png: &Path, series: &[&str]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(metrics_jsonl)
        .with_context(|| format!("reading {}", metrics_jsonl.display()))?;
    let curves =
        curves(&text, series).with_context(|| format!("plotting {}", metrics_jsonl.display()))?;
    let title = metrics_jsonl.display().to_string();
    let img = render(&title, &curves)?;
    crate::util::write_atomic(out_png, &png_bytes(&img)?)
        .with_context(|| format!("writing {}", out_png.display()))?;
    tracing::info!(out = %out_png.display(), panels = curves.len(), "wrote plot");
    Ok(())
}

/// Parses the log into one curve per requested field.
fn curves(text: &str, series: &[&str]) -> anyhow::Result<Vec<Curve>> {
    let mut rows = Vec::new();
    let mut skipped = 0usize;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line) {
            Ok(obj) => match obj.get("step").and_then(serde_json::Value::as_f64) {
                Some(step) if step.is_finite() => rows.push((step, obj)),
                _ => skipped += 1,
            },
            Err(e) => {
                tracing::warn!(line = n + 1, error = %e, "skipping unparsable metrics line");
                skipped += 1;
            }
        }
    }
    if skipped > 0 {
        tracing::warn!(skipped, "metrics lines without a numeric step were skipped");
    }
    anyhow::ensure!(!rows.is_empty(), "no entries with a numeric \"step\"");
    // Stable sort, then keep the last entry of each step.
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut deduped: Vec<(f64, serde_json::Map<String, serde_json::Value>)> = Vec::new();
    for row in rows {
        match deduped.last_mut() {
            Some(last) if last.0 == row.0 => *last = row,
            _ => deduped.push(row),
        }
    }
    let mut available: Vec<String> = Vec::new();
    for (_, obj) in &deduped {
        for (k, v) in obj {
            if k != "step" && v.is_number() && !available.contains(k) {
                available.push(k.clone());
            }
        }
    }
    // Losses first, then alphabetical: the file's key order is not preserved by serde_json.
    available.sort_by_key(|k| (!k.contains("loss"), k.clone()));
    let names: Vec<String> = if series.is_empty() {
        available.clone()
    } else {
        series.iter().map(|s| s.to_string()).collect()
    };
    anyhow::ensure!(!names.is_empty(), "no numeric fields besides \"step\"");
    names
        .into_iter()
        .map(|name| {
            let points: Vec<(f64, f64)> = deduped
                .iter()
                .filter_map(|(step, obj)| {
                    let v = obj.get(&name)?.as_f64()?;
                    v.is_finite().then_some((*step, v))
                })
                .collect();
            anyhow::ensure!(
                !points.is_empty(),
                "no numeric values of {name:?} (fields: {})",
                available.join(", ")
            );
            Ok(Curve { name, points })
        })
        .collect()
}

/// Pads a degenerate range so an axis can be built.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        (lo, hi)
    } else {
        let d = (lo.abs() * 0.1).max(1e-6);
        (lo - d, hi + d)
    }
}

fn render(title: &str, curves: &[Curve]) -> anyhow::Result<RgbImage> {
    ensure_font()?;
    let (w, h) = (WIDTH, TITLE_H + PANEL_H * curves.len() as u32);
    let mut img = RgbImage::new(w, h);
    {
        let buf: &mut [u8] = &mut img;
        let root =
            BitMapBackend::<plotters::backend::RGBPixel>::with_buffer_and_format(buf, (w, h))
                .map_err(draw_err)?
                .into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, (FAMILY, 16)).map_err(draw_err)?;
        for (area, curve) in root.split_evenly((curves.len(), 1)).iter().zip(curves) {
            let (x0, x1) = curve
                .points
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                    (a.min(p.0), b.max(p.0))
                });
            let (x0, x1) = widen(x0, x1);
            let (lo, hi) = curve.y_range();
            let mut builder = ChartBuilder::on(area);
            builder
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(70);
            if curve.log_scale() {
                builder.caption(format!("{} (log scale)", curve.name), (FAMILY, 14));
                let (lo, hi) = (lo / 1.2, hi * 1.2);
                let y = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
                let mut chart = builder.build_cartesian_2d(x0..x1, y).map_err(draw_err)?;
                draw_curve(&mut chart, curve)?;
            } else {
                builder.caption(&curve.name, (FAMILY, 14));
                let pad = (hi - lo) * 0.05;
                let (lo, hi) = widen(lo - pad, hi + pad);
                let mut chart = builder
                    .build_cartesian_2d(x0..x1, lo..hi)
                    .map_err(draw_err)?;
                draw_curve(&mut chart, curve)?;
            }
        }
        root.present().map_err(draw_err)?;
    }
    Ok(img)
}

/// 1-2-5 ticks per decade within [lo, hi] (only powers of ten when that would be crowded):
/// plotters' own log axis labels only powers of ten, so a one-decade loss would get one label.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let ticks: Vec<(bool, f64)> = (d0..=d1)
        .flat_map(|d| [1.0, 2.0, 5.0].map(|m| (m == 1.0, m * 10f64.powi(d))))
        .filter(|&(_, v)| v >= lo && v <= hi)
        .collect();
    let crowded = ticks.len() > 9;
    ticks
        .into_iter()
        .filter(|&(decade, _)| decade || !crowded)
        .map(|(_, v)| v)
        .collect()
}

/// A tick label with three significant digits, without float noise such as 0.30000000000004.
fn short(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.2e}");
        return match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.')),
            None => s,
        };
    }
    let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Axes, grid and the line of one panel, for a linear or a log y axis.
fn draw_curve<DB, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, Y>>,
    curve: &Curve,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| short(*y))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(LineSeries::new(
            curve.points.iter().copied(),
            RGBColor(31, 119, 180).stroke_width(2),
        ))
        .map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_a_small_log() {
        let dir = std::env::temp_dir().join(format!("fewstep-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("metrics.jsonl");
        let mut text = String::new();
        for step in (10..=300).step_by(10) {
            let loss = 2.0 * (-(step as f64) / 60.0).exp() + 0.01;
            text.push_str(&format!(
                "{{\"step\":{step},\"loss\":{loss},\"grad_norm\":0.5,\"lr\":0.001}}\n"
            ));
        }
        // A repeated step (resumed run) and a half-written last line.
        text.push_str("{\"step\":300,\"loss\":0.02,\"grad_norm\":0.4,\"lr\":0.001}\n{\"step\":3");
        std::fs::write(&log, text).expect("write log");

        let out = dir.join("loss.png");
        plot_jsonl(&log, &out, &["loss", "grad_norm"]).expect("plot");
        let img = image::open(&out).expect("PNG decodes");
        assert_eq!((img.width(), img.height()), (WIDTH, TITLE_H + 2 * PANEL_H));
        // Something besides the white background was drawn.
        assert!(img.to_rgb8().pixels().any(|p| p.0 != [255, 255, 255]));

        let curves = curves(&std::fs::read_to_string(&log).expect("read"), &[]).expect("all");
        let names: Vec<&str> = curves.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["loss", "grad_norm", "lr"]);
        assert_eq!(curves[0].points.len(), 30);
        assert_eq!(curves[0].points.last(), Some(&(300.0, 0.02)));
        assert!(curves[0].log_scale() && !curves[1].log_scale());

        assert_eq!(log_ticks(0.11, 1.8), [0.2, 0.5, 1.0]);
        assert_eq!(short(0.30000000000004), "0.3");
        assert_eq!(short(5e-4), "5e-4");
        assert!(plot_jsonl(&log, &out, &["nope"]).is_err());
        assert!(plot_jsonl(&dir.join("missing.jsonl"), &out, &[]).is_err());
        std::fs::remove_dir_all(dir).ok();
    }
}
