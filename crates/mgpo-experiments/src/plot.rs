//! Plots as PNG, drawn with plotters' bitmap backend and the DejaVu Sans
//! font embedded by the `dejavu` crate (no system fonts). One file of each
//! kind per (task, lr), one panel per rank:
//!
//! - `loss_*`: the smoothed logged loss of every run (log scale);
//! - `clean_*`: the clean training loss at the evaluations (log scale);
//! - `rebound_*`: the clean-loss rebound of every run, methods along x,
//!   one grey line per seed joining its runs (the pairing), one dot per run.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{io, Result};
use crate::method::Method;
use crate::sweep::{SweepResult, SweepSpec};

static FONT: Once = Once::new();

fn font() {
    FONT.call_once(|| {
        // Cannot fail for a valid TTF; if it did, text would be missing, not the plot.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// The colour of a method's curves.
pub fn color(m: Method) -> RGBColor {
    match m {
        Method::Lora => RGBColor(214, 39, 40),
        Method::LoraClip => RGBColor(127, 127, 127),
        Method::MgpoPaper => RGBColor(31, 119, 180),
        Method::MgpoTrainer => RGBColor(44, 160, 44),
        Method::MgpoTrainerNoClip => RGBColor(23, 190, 207),
        Method::MgpoNoApn => RGBColor(148, 103, 189),
        Method::LoraRandom => RGBColor(255, 127, 14),
        Method::LoraRandomWeight => RGBColor(140, 86, 75),
    }
}

/// File name of the logged-loss plot of `task` at peak learning rate `lr`.
pub fn loss_plot_name(task: &str, lr: f64) -> String {
    format!("loss_{task}_lr{lr}.png")
}

/// File name of the clean-loss plot.
pub fn clean_plot_name(task: &str, lr: f64) -> String {
    format!("clean_{task}_lr{lr}.png")
}

/// File name of the paired clean-rebound plot.
pub fn rebound_plot_name(task: &str, lr: f64) -> String {
    format!("rebound_{task}_lr{lr}.png")
}

/// The three plots of every (task, lr) into `dir`.
pub fn plots(spec: &SweepSpec, res: &SweepResult, dir: &Path) -> Result<Vec<PathBuf>> {
    font();
    let mut out = Vec::new();
    for task in &spec.tasks {
        for &lr in &spec.lrs {
            let p = dir.join(loss_plot_name(task, lr));
            let title = format!("{task}: smoothed logged training loss (window {}), peak lr {lr}, alpha = r, {} seeds", spec.smooth, spec.seeds.len());
            let logged = |i: usize| -> Vec<(u64, f64)> {
                res.curves[i].iter().enumerate().skip(spec.smooth.saturating_sub(1)).map(|(t, &v)| (t as u64 + 1, v)).collect()
            };
            curves(spec, res, task, lr, &title, &logged, &p).map_err(|e| io(&p, e))?;
            out.push(p);
            let p = dir.join(clean_plot_name(task, lr));
            let title = format!("{task}: clean training loss every {} steps, peak lr {lr}, alpha = r, {} seeds", spec.eval_every, spec.seeds.len());
            curves(spec, res, task, lr, &title, &|i| res.clean[i].clone(), &p).map_err(|e| io(&p, e))?;
            out.push(p);
            let p = dir.join(rebound_plot_name(task, lr));
            paired(spec, res, task, lr, &p).map_err(|e| io(&p, e))?;
            out.push(p);
        }
    }
    Ok(out)
}

type Draw = std::result::Result<(), Box<dyn std::error::Error>>;

/// The figure's layout: a title strip, a grid of panels (one per rank), a legend strip.
fn layout<'a>(spec: &SweepSpec, path: &'a Path, title: &str) -> std::result::Result<(DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>, Vec<DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>>, DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>), Box<dyn std::error::Error>> {
    let n = spec.ranks.len();
    let cols = n.min(3);
    let rows = n.div_ceil(cols);
    let (pw, ph) = (480u32, 360u32);
    let legend_rows = spec.methods.len().div_ceil(4) as u32;
    // At least the legend's four columns wide (one rank: one wide panel).
    let width = (pw * cols as u32).max(940);
    let root = BitMapBackend::new(path, (width, ph * rows as u32 + 40 + 30 * legend_rows)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(40);
    top.draw_text(title, &("sans-serif", 18).into_font().color(&BLACK), (10, 10))?;
    let (panels, legend) = body.split_vertically(ph * rows as u32);
    let panels = panels.split_evenly((rows, cols)).into_iter().take(n).collect();
    Ok((root, panels, legend))
}

/// A coloured bar and the name of each method, four per line, numbered
/// as the x axis of the rebound plot.
fn legend(spec: &SweepSpec, area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Draw {
    for (k, &m) in spec.methods.iter().enumerate() {
        let (x, y) = (10 + 230 * (k % 4) as i32, 5 + 30 * (k / 4) as i32);
        area.draw(&Rectangle::new([(x, y + 7), (x + 24, y + 11)], color(m).filled()))?;
        area.draw_text(&format!("{}. {}", k + 1, m.name()), &("sans-serif", 16).into_font().color(&BLACK), (x + 30, y))?;
    }
    Ok(())
}

/// Runs of (task, lr, rank), by index into the result.
fn runs_of(res: &SweepResult, task: &str, lr: f64, rank: usize) -> Vec<usize> {
    (0..res.runs.len())
        .filter(|&i| {
            let s = &res.runs[i].spec;
            s.task == task && s.lr == lr && s.rank == rank
        })
        .collect()
}

fn curves(spec: &SweepSpec, res: &SweepResult, task: &str, lr: f64, title: &str, points: &dyn Fn(usize) -> Vec<(u64, f64)>, path: &Path) -> Draw {
    let (root, panels, leg) = layout(spec, path, title)?;
    for (area, &rank) in panels.iter().zip(&spec.ranks) {
        let idx = runs_of(res, task, lr, rank);
        let vals = idx.iter().flat_map(|&i| points(i)).map(|p| p.1).filter(|v| v.is_finite() && *v > 0.0);
        let (lo, hi) = vals.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo * 0.8, hi * 1.25) } else { (1e-4, 10.0) };
        let mut chart = ChartBuilder::on(area)
            .caption(format!("r = {rank}"), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0u64..spec.steps, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("step")
            .y_desc("loss (log scale)")
            .label_style(("sans-serif", 12))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()?;
        for &i in &idx {
            let pts: Vec<(u64, f64)> = points(i).into_iter().filter(|(_, v)| v.is_finite() && *v > 0.0).map(|(t, v)| (t, v.clamp(lo, hi))).collect();
            chart.draw_series(LineSeries::new(pts, color(res.runs[i].spec.method).stroke_width(1)))?;
        }
    }
    legend(spec, &leg)?;
    root.present()?;
    Ok(())
}

fn paired(spec: &SweepSpec, res: &SweepResult, task: &str, lr: f64, path: &Path) -> Draw {
    let title = format!("{task}: clean-loss rebound per run, peak lr {lr}; grey lines join the runs of one seed");
    let (root, panels, leg) = layout(spec, path, &title)?;
    let nm = spec.methods.len();
    for (area, &rank) in panels.iter().zip(&spec.ranks) {
        let idx = runs_of(res, task, lr, rank);
        let value = |i: usize| res.runs[i].outcome.clean.height;
        let hi = idx.iter().map(|&i| value(i)).filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-3) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("r = {rank}"), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5f64..(nm as f64 - 0.5), 0.0..hi)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels(nm)
            .x_label_formatter(&|x| {
                let k = x.round();
                if (x - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < nm { format!("{}", k as usize + 1) } else { String::new() }
            })
            .x_desc("method (legend order)")
            .y_desc("clean rebound")
            .label_style(("sans-serif", 12))
            .draw()?;
        let xs = |i: usize| spec.methods.iter().position(|&m| m == res.runs[i].spec.method).unwrap_or(0) as f64;
        let clamp = |v: f64| if v.is_finite() { v } else { hi };
        for &seed in &spec.seeds {
            let mut pts: Vec<(f64, f64)> = idx.iter().filter(|&&i| res.runs[i].spec.seed == seed).map(|&i| (xs(i), clamp(value(i)))).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart.draw_series(LineSeries::new(pts, RGBColor(190, 190, 190).stroke_width(1)))?;
        }
        chart.draw_series(idx.iter().map(|&i| Circle::new((xs(i), clamp(value(i))), 4, color(res.runs[i].spec.method).filled())))?;
    }
    legend(spec, &leg)?;
    root.present()?;
    Ok(())
}
