//! Dependency-free SVG plots: a rank-load heat map of a placement and a multi-series line plot.
use std::fmt::Write as _;

use crate::Placement;
use crate::eval::rank_loads;

const PALETTE: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// Escapes text for SVG element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// A short, readable number.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        return format!("{v:.2e}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

fn lerp(a: (f64, f64, f64), b: (f64, f64, f64), t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let c = |x: f64, y: f64| (x + (y - x) * t).round().clamp(0.0, 255.0) as u8;
    format!("#{:02x}{:02x}{:02x}", c(a.0, b.0), c(a.1, b.1), c(a.2, b.2))
}

const BLUE: (f64, f64, f64) = (44.0, 123.0, 182.0);
const WHITE: (f64, f64, f64) = (247.0, 247.0, 247.0);
const RED: (f64, f64, f64) = (215.0, 25.0, 28.0);

/// Diverging colour of a load ratio: blue (idle) → white (= layer mean) → red (`vmax` and above).
fn ratio_colour(r: f64, vmax: f64) -> String {
    if !r.is_finite() {
        return "#000000".into();
    }
    if r <= 1.0 { lerp(BLUE, WHITE, r) } else { lerp(WHITE, RED, (r - 1.0) / (vmax - 1.0)) }
}

/// Label every `step`-th of `n` items so that at most ~`max` labels show.
fn label_step(n: usize, max: usize) -> usize {
    let raw = n.div_ceil(max.max(1)).max(1);
    [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000].into_iter().find(|&s| s >= raw).unwrap_or(raw)
}

/// Heat map of a placement's rank load: one row per layer, one column per rank, colour = the rank's
/// load ([`rank_loads`]: replicas split evenly) / the layer's mean rank load. `load[l][e]` is the
/// per-expert load (e.g. [`crate::RoutingStats::load`]); layers missing from `load` are drawn grey.
/// Includes a colour scale and axis labels; the title is escaped.
pub fn rank_load_heatmap_svg(placement: &Placement, load: &[Vec<f64>], title: &str) -> String {
    let layers = placement.layers.len();
    let ranks = placement.layers.iter().map(|l| l.ranks.len()).max().unwrap_or(0).max(placement.num_ranks());
    let ratios: Vec<Option<Vec<f64>>> = (0..layers)
        .map(|l| {
            let row = load.get(l)?;
            let rl = rank_loads(&placement.layers[l].ranks, row);
            let mean = rl.iter().sum::<f64>() / rl.len().max(1) as f64;
            Some(rl.iter().map(|&x| if mean > 0.0 { x / mean } else { 1.0 }).collect())
        })
        .collect();
    let max_ratio = ratios.iter().flatten().flatten().copied().filter(|r| r.is_finite()).fold(1.0, f64::max);
    let vmax = ((max_ratio * 4.0).ceil() / 4.0).max(1.25);

    let cw = (720.0 / ranks.max(1) as f64).clamp(3.0, 40.0);
    let ch = (480.0 / layers.max(1) as f64).clamp(3.0, 24.0);
    let (left, top) = (70.0, 50.0);
    let grid_w = cw * ranks as f64;
    let grid_h = ch * layers as f64;
    let legend_x = left + grid_w + 30.0;
    let legend_h = grid_h.max(120.0);
    let width = legend_x + 110.0;
    let height = top + legend_h.max(grid_h) + 60.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        esc(title)
    );
    for (l, row) in ratios.iter().enumerate() {
        let y = top + l as f64 * ch;
        for r in 0..ranks {
            let x = left + r as f64 * cw;
            match row.as_ref().and_then(|v| v.get(r)) {
                Some(&ratio) => {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.2}" y="{y:.2}" width="{cw:.2}" height="{ch:.2}" fill="{}"><title>layer {l}, rank {r}: {} x mean</title></rect>"#,
                        ratio_colour(ratio, vmax),
                        num(ratio)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x:.2}" y="{y:.2}" width="{cw:.2}" height="{ch:.2}" fill="#cccccc"><title>layer {l}, rank {r}: no data</title></rect>"##
                    );
                }
            }
        }
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{grid_w:.2}" height="{grid_h:.2}" fill="none" stroke="black" stroke-width="0.8"/>"#
    );
    // axes
    let rs = label_step(ranks, 16);
    for r in (0..ranks).step_by(rs) {
        let x = left + (r as f64 + 0.5) * cw;
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{r}</text>"#, top + grid_h + 14.0);
    }
    let ls = label_step(layers, 24);
    for l in (0..layers).step_by(ls) {
        let y = top + (l as f64 + 0.5) * ch + 4.0;
        let _ = writeln!(s, r#"<text x="{:.1}" y="{y:.1}" text-anchor="end">{l}</text>"#, left - 6.0);
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">rank</text>"#,
        left + grid_w / 2.0,
        top + grid_h + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 20 {:.1})">layer</text>"#,
        top + grid_h / 2.0,
        top + grid_h / 2.0
    );
    // colour scale: vmax at the top, 0 at the bottom
    let _ = writeln!(
        s,
        r#"<defs><linearGradient id="scale" x1="0" y1="1" x2="0" y2="0"><stop offset="0" stop-color="{}"/><stop offset="{:.4}" stop-color="{}"/><stop offset="1" stop-color="{}"/></linearGradient></defs>"#,
        lerp(BLUE, WHITE, 0.0),
        1.0 / vmax,
        lerp(WHITE, RED, 0.0),
        lerp(WHITE, RED, 1.0)
    );
    let _ = writeln!(
        s,
        r#"<rect x="{legend_x:.1}" y="{top}" width="16" height="{legend_h:.1}" fill="url(#scale)" stroke="black" stroke-width="0.6"/>"#
    );
    let mut ticks = vec![0.0, 1.0, vmax];
    if vmax > 2.0 {
        ticks.insert(2, ((vmax + 1.0) / 2.0 * 4.0).round() / 4.0);
    } else {
        ticks.insert(1, 0.5);
    }
    for t in ticks {
        let y = top + legend_h * (1.0 - t / vmax);
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="black"/><text x="{:.1}" y="{:.1}">{}{}</text>"#,
            legend_x + 16.0,
            legend_x + 20.0,
            legend_x + 23.0,
            y + 4.0,
            num(t),
            if t == vmax && max_ratio > vmax { "+" } else { "" }
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="11">load / layer mean</text>"#,
        legend_x - 10.0,
        top - 8.0
    );
    s.push_str("</svg>\n");
    s
}

/// Up to ~6 "nice" tick values (1, 2, 5 × 10^k steps) covering `lo..=hi`.
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let range = hi - lo;
    let raw = range / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut v = start;
    while v <= hi + step * 1e-9 && out.len() < 50 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

fn padded_range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    (lo, hi)
}

/// A line plot of several `(name, points)` series with axes, ticks, axis labels and a legend.
/// Non-finite points break a line; points are drawn in the given order.
pub fn line_plot_svg(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let finite = || series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (x0, x1) = padded_range(finite().map(|p| p.0));
    let (y0, y1) = padded_range(finite().map(|p| p.1));
    let (y0, y1) = (y0 - (y1 - y0) * 0.05, y1 + (y1 - y0) * 0.05);
    let (left, top, pw, ph) = (70.0, 45.0, 600.0, 340.0);
    let legend_w = 20.0 + series.iter().map(|(n, _)| n.chars().count()).max().unwrap_or(0).min(40) as f64 * 7.0;
    let width = left + pw + 30.0 + legend_w;
    let height = top + ph + 60.0;
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        left + pw / 2.0,
        esc(title)
    );
    // grid and ticks
    for t in nice_ticks(x0, x1) {
        let x = sx(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 14.0,
            num(t)
        );
    }
    for t in nice_ticks(y0, y1) {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            num(t)
        );
    }
    let _ = writeln!(s, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black" stroke-width="0.8"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
        left + pw / 2.0,
        top + ph + 36.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {:.1})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    // series
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for &(x, y) in pts {
            if x.is_finite() && y.is_finite() {
                if let Some(seg) = segments.last_mut() {
                    seg.push((sx(x), sy(y)));
                }
            } else if segments.last().is_some_and(|seg| !seg.is_empty()) {
                segments.push(Vec::new());
            }
        }
        let _ = writeln!(s, r#"<g class="series"><title>{}</title>"#, esc(name));
        for seg in segments.iter().filter(|seg| !seg.is_empty()) {
            let points: Vec<String> = seg.iter().map(|(x, y)| format!("{x:.2},{y:.2}")).collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"#,
                points.join(" ")
            );
            if seg.len() == 1 || pts.len() <= 60 {
                for (x, y) in seg {
                    let _ = writeln!(s, r#"<circle cx="{x:.2}" cy="{y:.2}" r="2.5" fill="{colour}"/>"#);
                }
            }
        }
        s.push_str("</g>\n");
        let ly = top + 10.0 + i as f64 * 18.0;
        let lx = left + pw + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 16.0,
            lx + 22.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}
