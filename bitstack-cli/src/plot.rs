//! The memory ladder as a picture: perplexity against resident memory.
//!
//! The chart is drawn into an RGB buffer and encoded as PNG here, so neither
//! a system font nor an image library is involved: text is set in Noto Sans,
//! which is compiled into the binary. The file is written atomically.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use bitstack_assets::atomic::write_file as write_atomic;
use bitstack_quant::Rung;

/// Width of the picture in pixels.
pub const WIDTH: u32 = 1000;
/// Height of the picture in pixels.
pub const HEIGHT: u32 = 640;
/// The background colour.
pub const BACKGROUND_RGB: [u8; 3] = [255, 255, 255];
/// The colour of the measured rungs (points and the line through them).
pub const SERIES_RGB: [u8; 3] = [31, 119, 180];
/// The colour of the dense model's line.
pub const DENSE_RGB: [u8; 3] = [214, 39, 40];
/// The colour of the baselines' points.
pub const BASELINE_RGB: [u8; 3] = [44, 160, 44];

/// A perplexity measured elsewhere at some bits per linear weight (RTN or
/// GPTQ at their own sizes, another layout's rung), drawn as a marker with
/// its label where a rung of that size would sit.
#[derive(Clone, Debug, PartialEq)]
pub struct Baseline {
    pub label: String,
    pub bits: f64,
    pub ppl: f64,
}

/// Most points that get their perplexity written next to them.
const MAX_ANNOTATED: usize = 12;

/// What to draw.
#[derive(Clone, Debug)]
pub struct LadderPlot<'a> {
    /// The first title line (the model's name goes here).
    pub title: String,
    /// A smaller second line, e.g. what the perplexities were measured on.
    pub subtitle: Option<String>,
    /// Every rung of the ladder: all of them set the memory axis, those
    /// with a perplexity are drawn.
    pub ladder: &'a [Rung],
    /// Legend entry of the measured rungs.
    pub series_label: String,
    /// The dense model's perplexity, drawn as a dashed horizontal line.
    pub dense_ppl: Option<f64>,
    /// Legend entry of the dense line.
    pub dense_label: String,
    /// Points measured elsewhere, for comparison.
    pub baselines: Vec<Baseline>,
}

impl LadderPlot<'_> {
    /// The measured rungs as (resident MiB, PPL), by memory.
    pub fn points(&self) -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = self
            .ladder
            .iter()
            .filter_map(|r| r.ppl.map(|p| (mib(r.total_bytes), p)))
            .filter(|&(_, p)| p.is_finite() && p > 0.0)
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    }

    /// The picture as PNG bytes.
    pub fn render_png(&self) -> Result<Vec<u8>> {
        let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
        self.draw(&mut rgb)?;
        let mut png = Vec::new();
        let mut encoder = png::Encoder::new(&mut png, WIDTH, HEIGHT);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&rgb)?;
        writer.finish()?;
        Ok(png)
    }

    /// Renders and writes the PNG to `path` through a temporary file in the
    /// same directory: on any error no file (and no partial file) is left.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let png = self.render_png()?;
        write_atomic(path, &png)
            .with_context(|| format!("cannot write the plot to {}", path.display()))
    }

    fn draw(&self, rgb: &mut [u8]) -> Result<()> {
        register_font()?;
        let points = self.points();
        if points.is_empty() {
            bail!("no rung of the ladder has a measured perplexity to plot");
        }
        if let Some(d) = self.dense_ppl {
            if !(d.is_finite() && d > 0.0 && d <= MAX_PPL) {
                bail!("the dense model's perplexity must be a positive number up to {MAX_PPL:e}, not {d}");
            }
        }
        if let Some(p) = points.iter().find(|p| !(p.1 > 0.0 && p.1 <= MAX_PPL)) {
            bail!(
                "a measured perplexity of {} is outside the plot's range (up to {MAX_PPL:e})",
                p.1
            );
        }
        if let Some(b) = self
            .baselines
            .iter()
            .find(|b| !(b.ppl > 0.0 && b.ppl <= MAX_PPL && b.bits.is_finite() && b.bits > 0.0))
        {
            bail!(
                "baseline `{}`: {} bits per weight and a perplexity of {} cannot be drawn (bits > 0, perplexity up to {MAX_PPL:e})",
                b.label,
                b.bits,
                b.ppl
            );
        }

        let first = self.ladder.first().context("the ladder has no rungs")?;
        let last = self.ladder.last().context("the ladder has no rungs")?;
        // Bits per linear weight are an affine function of resident bytes.
        let dense_part = first.total_bytes as f64 - first.linear_bytes as f64;
        let bits_per_byte = if first.linear_bytes > 0 {
            first.bits_per_linear_weight / first.linear_bytes as f64
        } else {
            0.0
        };
        if !self.baselines.is_empty() && bits_per_byte <= 0.0 {
            bail!("the ladder's first rung holds no linear bytes, so bits per weight cannot be placed on the memory axis");
        }
        let bpw = |x_mib: f64| (x_mib * 1048576.0 - dense_part) * bits_per_byte;
        let at_bits = |bits: f64| mib((dense_part + bits / bits_per_byte).round() as usize);
        let baselines: Vec<(f64, f64, &str)> = self
            .baselines
            .iter()
            .map(|b| (at_bits(b.bits), b.ppl, b.label.as_str()))
            .collect();
        let xs = baselines.iter().map(|b| b.0);
        let (x0, x1) = padded(
            xs.clone().fold(mib(first.total_bytes), f64::min),
            xs.fold(mib(last.total_bytes), f64::max),
        );

        let all_ppl = points
            .iter()
            .map(|p| p.1)
            .chain(baselines.iter().map(|b| b.1));
        let mut lo = all_ppl.clone().fold(f64::INFINITY, f64::min);
        let mut hi = all_ppl.fold(0.0, f64::max);
        if let Some(d) = self.dense_ppl {
            lo = lo.min(d);
            hi = hi.max(d);
        }
        // Room above for the labels next to the points.
        let (y0, y1) = (lo / 1.4, hi * 2.0);
        let y_ticks = log_ticks(y0, y1);
        let x_decimals = decimals_for(x1 - x0);
        let b_decimals = decimals_for(bpw(x1) - bpw(x0));

        let series = rgb_color(SERIES_RGB);
        let dense = rgb_color(DENSE_RGB);
        let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&rgb_color(BACKGROUND_RGB))?;
        let mut root = root.titled(&self.title, ("sans-serif", 26))?;
        if let Some(sub) = &self.subtitle {
            root = root.titled(sub, ("sans-serif", 16))?;
        }
        let mut chart = ChartBuilder::on(&root)
            .margin_top(10)
            .margin_left(16)
            .margin_right(28)
            .margin_bottom(12)
            .x_label_area_size(52)
            .top_x_label_area_size(52)
            .y_label_area_size(72)
            .build_cartesian_2d(
                x0..x1,
                (y0..y1).log_scale().with_key_points(y_ticks.clone()),
            )?
            .set_secondary_coord(
                bpw(x0)..bpw(x1),
                (y0..y1).log_scale().with_key_points(y_ticks),
            );
        let x_fmt = |v: &f64| format!("{v:.x_decimals$}");
        let b_fmt = |v: &f64| format!("{v:.b_decimals$}");
        let y_fmt = |v: &f64| short(*v);
        chart
            .configure_mesh()
            .x_desc("resident memory (MiB)")
            .y_desc("perplexity (log scale)")
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_labels(10)
            .axis_desc_style(("sans-serif", 17))
            .label_style(("sans-serif", 14))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()?;
        chart
            .configure_secondary_axes()
            .x_desc("bits per linear weight")
            .x_label_formatter(&b_fmt)
            .x_labels(10)
            .axis_desc_style(("sans-serif", 17))
            .label_style(("sans-serif", 14))
            .draw()?;

        if let Some(d) = self.dense_ppl {
            let style = dense.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(vec![(x0, d), (x1, d)], 10, 7, style))?
                .label(&self.dense_label)
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 24, y)], 8, 5, style)
                });
        }
        chart
            .draw_series(LineSeries::new(points.clone(), series.stroke_width(2)))?
            .label(&self.series_label)
            .legend(move |(x, y)| {
                EmptyElement::at((x + 12, y))
                    + PathElement::new(vec![(-12, 0), (12, 0)], series.stroke_width(2))
                    + Circle::new((0, 0), 4, series.filled())
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, series.filled())))?;
        // Pixel boxes of what is drawn so far, so that no baseline's label
        // lands on a rung's label, a point or another baseline's label.
        let mut taken = Vec::new();
        let label_font = ("sans-serif", 14).into_font();
        let text_size = |text: &str| -> Result<(i32, i32)> {
            let style = TextStyle::from(label_font.clone());
            let (w, h) = root.estimate_text_size(text, &style)?;
            Ok((w as i32, h as i32))
        };
        let annotated = points.len() <= MAX_ANNOTATED;
        for &(x, p) in &points {
            let at = chart.backend_coord(&(x, p));
            taken.push(LabelBox::around(at, 5));
            if annotated {
                let size = text_size(&significant(p))?;
                taken.push(LabelBox::at(at, RUNG_LABEL_OFFSET, size));
            }
        }
        if annotated {
            let font = label_font.color(&series);
            chart.draw_series(points.iter().map(|&(x, p)| {
                EmptyElement::at((x, p))
                    + Text::new(significant(p), RUNG_LABEL_OFFSET, font.clone())
            }))?;
        }
        if !baselines.is_empty() {
            let colour = rgb_color(BASELINE_RGB);
            let font = label_font.color(&colour);
            let mut placed = Vec::new();
            for &(x, p, label) in &baselines {
                let text = format!("{label}: {}", significant(p));
                let (at, size) = (chart.backend_coord(&(x, p)), text_size(&text)?);
                taken.push(LabelBox::around(at, 7));
                let offset = place_label(at, size, &taken);
                taken.push(LabelBox::at(at, offset, size));
                placed.push((x, p, text, offset));
            }
            chart
                .draw_series(placed.into_iter().map(|(x, p, text, offset)| {
                    EmptyElement::at((x, p))
                        + TriangleMarker::new((0, 0), 7, colour.filled())
                        + Text::new(text, offset, font.clone())
                }))?
                .label("measured elsewhere")
                .legend(move |(x, y)| TriangleMarker::new((x + 12, y), 6, colour.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .margin(12)
            .label_font(("sans-serif", 15))
            .background_style(rgb_color(BACKGROUND_RGB).mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// Where a rung's perplexity is written, from its point in pixels.
const RUNG_LABEL_OFFSET: (i32, i32) = (8, -20);

/// A label's or a marker's extent in pixels, `[x0, x1) × [y0, y1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LabelBox {
    x0: i32,
    y0: i32,
    x1: i32,
    y1: i32,
}

impl LabelBox {
    /// Text of `size` written at `offset` from `point` (its top left corner).
    fn at(point: (i32, i32), offset: (i32, i32), size: (i32, i32)) -> Self {
        let (x0, y0) = (point.0 + offset.0, point.1 + offset.1);
        Self {
            x0,
            y0,
            x1: x0 + size.0,
            y1: y0 + size.1,
        }
    }

    /// A marker of radius `r` at `point`.
    fn around(point: (i32, i32), r: i32) -> Self {
        Self {
            x0: point.0 - r,
            y0: point.1 - r,
            x1: point.0 + r,
            y1: point.1 + r,
        }
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.x0 < other.x1 && other.x0 < self.x1 && self.y0 < other.y1 && other.y0 < self.y1
    }
}

/// The offset from a baseline's marker at `point` for its label of `size`:
/// right of it, and if that covers something in `taken`, the first of
/// above right, left, above left and further down that covers nothing (the
/// right side when every spot does).
fn place_label(point: (i32, i32), size: (i32, i32), taken: &[LabelBox]) -> (i32, i32) {
    let (w, h) = size;
    let spots = [
        (9, 4),
        (9, -4 - h),
        (-9 - w, 4),
        (-9 - w, -4 - h),
        (9, 8 + h),
        (9, -8 - 2 * h),
    ];
    spots
        .into_iter()
        .find(|&offset| {
            let label = LabelBox::at(point, offset, size);
            taken.iter().all(|t| !t.overlaps(&label))
        })
        .unwrap_or(spots[0])
}

/// Registers the embedded font once as `sans-serif`.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, ttf_noto_sans::REGULAR)
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded font could not be loaded"))
    }
}

fn rgb_color(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / 1048576.0
}

/// A range around `[a, b]` with a little room on both sides (for the points'
/// labels on the right).
fn padded(a: f64, b: f64) -> (f64, f64) {
    let pad = if b > a {
        (b - a) * 0.05
    } else {
        (a.abs() * 0.05).max(1e-3)
    };
    (a - pad, b + pad)
}

/// Decimals that tell apart about ten ticks over `span`.
fn decimals_for(span: f64) -> usize {
    if !(span.is_finite() && span > 0.0) {
        return 2;
    }
    (-(span / 10.0).log10().floor()).clamp(0.0, 6.0) as usize
}

/// The largest perplexity a plot shows: its log axis spans whole decades.
pub const MAX_PPL: f64 = 1e30;

/// Tick marks for a log axis over `[lo, hi]`: the finest of 1-2-…-9, 1-2-5,
/// 1-3, 1 per decade with at most twelve marks, or evenly spaced round
/// numbers when the range is too narrow for two of them.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const MANTISSAS: [&[f64]; 4] = [
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 3.0],
        &[1.0],
    ];
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        return Vec::new();
    }
    let decades = lo.log10().floor() as i32..=hi.log10().ceil() as i32;
    let in_range = |set: &[f64]| -> Vec<f64> {
        decades
            .clone()
            .flat_map(|e| set.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|v| *v >= lo && *v <= hi)
            .collect()
    };
    let finest = in_range(MANTISSAS[0]);
    if finest.len() < 2 {
        let step = nice_step((hi - lo) / 5.0);
        let first = (lo / step).ceil() as i64;
        let last = (hi / step).floor() as i64;
        return (first..=last).map(|i| i as f64 * step).collect();
    }
    for set in MANTISSAS {
        let ticks = in_range(set);
        if ticks.len() <= 12 {
            return ticks;
        }
    }
    // More than twelve decades: every few decades.
    let every = (decades.clone().count() / 10).max(1);
    decades
        .step_by(every)
        .map(|e| 10f64.powi(e))
        .filter(|v| *v >= lo && *v <= hi)
        .collect()
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// A tick value with no more decimals than it needs.
fn short(v: f64) -> String {
    for d in 0..=3 {
        let s = format!("{v:.d$}");
        if s.parse::<f64>()
            .is_ok_and(|p| (p - v).abs() <= 1e-9 * v.abs().max(1.0))
        {
            return s;
        }
    }
    format!("{v:.3}")
}

/// A perplexity to three significant digits (whole numbers from 100 on).
fn significant(p: f64) -> String {
    if p >= 100.0 {
        format!("{p:.0}")
    } else if p >= 10.0 {
        format!("{p:.1}")
    } else {
        format!("{p:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_cover_wide_and_narrow_ranges() {
        let wide = log_ticks(11.0, 70000.0);
        assert!((2..=12).contains(&wide.len()), "{wide:?}");
        assert!(wide.iter().all(|v| (11.0..=70000.0).contains(v)));
        assert!(wide.contains(&100.0) && wide.contains(&10000.0), "{wide:?}");
        let narrow = log_ticks(280.0, 330.0);
        assert!(narrow.len() >= 3, "{narrow:?}");
        assert!(narrow.iter().all(|v| (280.0..=330.0).contains(v)));
        assert!(narrow.windows(2).all(|w| w[1] > w[0]));
        let mid = log_ticks(12.0, 60.0);
        assert_eq!(mid, vec![20.0, 30.0, 40.0, 50.0, 60.0]);
    }

    #[test]
    fn a_baseline_label_moves_off_what_it_would_cover() {
        let size = (80, 14);
        let point = (300, 200);
        // Nothing in the way: right of the marker.
        assert_eq!(place_label(point, size, &[]), (9, 4));
        // A rung's label right of the marker: above right.
        let rung = LabelBox::at((310, 215), RUNG_LABEL_OFFSET, (30, 14));
        assert!(rung.overlaps(&LabelBox::at(point, (9, 4), size)));
        let moved = place_label(point, size, &[rung]);
        assert_ne!(moved, (9, 4));
        assert!(!rung.overlaps(&LabelBox::at(point, moved, size)));
        // Everything right of the marker taken: left of it.
        let wall = LabelBox {
            x0: 301,
            y0: 0,
            x1: 1000,
            y1: 640,
        };
        let left = place_label(point, size, &[wall]);
        assert!(left.0 + size.0 <= 0, "{left:?}");
        // Everything taken: the default spot.
        let all = LabelBox {
            x0: 0,
            y0: 0,
            x1: 1000,
            y1: 640,
        };
        assert_eq!(place_label(point, size, &[all]), (9, 4));
        // Boxes that only touch do not overlap.
        let a = LabelBox::at((0, 0), (0, 0), (10, 10));
        assert!(!a.overlaps(&LabelBox::at((10, 0), (0, 0), (10, 10))));
        assert!(a.overlaps(&LabelBox::at((9, 9), (0, 0), (10, 10))));
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(short(50000.0), "50000");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(15.25), "15.25");
        assert_eq!(significant(14.9171), "14.9");
        assert_eq!(significant(742.95), "743");
        assert_eq!(decimals_for(120.0), 0);
        assert_eq!(decimals_for(0.05), 3);
    }
}
