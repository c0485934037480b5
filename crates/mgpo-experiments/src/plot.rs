//! Loss-curve plots as PNG, drawn with plotters' bitmap backend and the
//! DejaVu Sans font embedded by the `dejavu` crate (no system fonts).

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
        Method::MgpoPaper => RGBColor(31, 119, 180),
        Method::MgpoTrainer => RGBColor(44, 160, 44),
        Method::MgpoNoApn => RGBColor(148, 103, 189),
        Method::LoraRandom => RGBColor(255, 127, 14),
        Method::LoraClip => RGBColor(127, 127, 127),
    }
}

/// File name of the plot of `task` at peak learning rate `lr`.
pub fn loss_plot_name(task: &str, lr: f64) -> String {
    format!("loss_{task}_lr{lr}.png")
}

/// One PNG per (task, lr): a panel per rank with the smoothed training
/// loss (log scale) of every run, coloured by method, one thin line per seed.
pub fn loss_plots(spec: &SweepSpec, res: &SweepResult, dir: &Path) -> Result<Vec<PathBuf>> {
    font();
    let mut out = Vec::new();
    for task in &spec.tasks {
        for &lr in &spec.lrs {
            let path = dir.join(loss_plot_name(task, lr));
            draw(spec, res, task, lr, &path).map_err(|e| io(&path, e))?;
            out.push(path);
        }
    }
    Ok(out)
}

fn draw(spec: &SweepSpec, res: &SweepResult, task: &str, lr: f64, path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let n = spec.ranks.len();
    let cols = n.min(3);
    let rows = n.div_ceil(cols);
    let (pw, ph) = (480u32, 360u32);
    let root = BitMapBackend::new(path, (pw * cols as u32, ph * rows as u32 + 70)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.draw_text(
        &format!("{task}: smoothed training loss (window {}), peak lr {lr}, alpha = r, {} seeds", spec.smooth, spec.seeds.len()),
        &("sans-serif", 20).into_font().color(&BLACK),
        (10, 10),
    )?;
    let (panels, legend) = body.split_vertically(ph * rows as u32);
    for (p, area) in panels.split_evenly((rows, cols)).into_iter().enumerate().take(n) {
        let rank = spec.ranks[p];
        let idx: Vec<usize> = (0..res.runs.len())
            .filter(|&i| {
                let s = &res.runs[i].spec;
                s.task == task && s.lr == lr && s.rank == rank
            })
            .collect();
        let vals = idx.iter().flat_map(|&i| res.curves[i].iter().copied()).filter(|v| v.is_finite() && *v > 0.0);
        let (lo, hi) = vals.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo * 0.8, hi * 1.25) } else { (1e-4, 10.0) };
        let mut chart = ChartBuilder::on(&area)
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
            let c = color(res.runs[i].spec.method);
            let pts: Vec<(u64, f64)> = res.curves[i]
                .iter()
                .enumerate()
                .skip(spec.smooth.saturating_sub(1))
                .filter(|(_, v)| v.is_finite() && **v > 0.0)
                .map(|(t, &v)| (t as u64 + 1, v.clamp(lo, hi)))
                .collect();
            chart.draw_series(LineSeries::new(pts, c.stroke_width(1)))?;
        }
    }
    // Legend: a coloured bar and the method's name.
    let mut x = 10i32;
    for &m in &spec.methods {
        legend.draw(&Rectangle::new([(x, 12), (x + 24, 16)], color(m).filled()))?;
        legend.draw_text(m.name(), &("sans-serif", 16).into_font().color(&BLACK), (x + 30, 5))?;
        x += 40 + 10 * m.name().len() as i32;
    }
    root.present()?;
    Ok(())
}
