//! The bench chart (`throughput.svg`), drawn with plotters' SVG backend (text
//! is left to the viewer's fonts, so no font is needed to draw it): rows/s
//! over time for rekey and the floor statement, with labelled axes ticked
//! from 0; with `--interrupt-at`, the interrupted run too, its kill and its
//! resume marked; the checkpoints the server made during the run, shaded
//! from when each began; the batch latency percentiles; and with `--with-load`, the
//! application's transactions/s over each loaded run, the run's span marked.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{BenchReport, LoadReport};

/// Rows/s over time from cumulative (seconds, rows) samples: 80 points
/// across the run, each the rate over a window ending there (a twelfth of
/// the run, 0.1 s to 10 s: long enough to hold several batches, so the line
/// shows the rate rather than each commit), the last point exactly at the
/// end of the run (no interval past the end drawn as a drop).
pub fn rates(cumulative: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let Some(&(end, _)) = cumulative.last() else {
        return Vec::new();
    };
    if end <= 0.0 {
        return Vec::new();
    }
    let window = (end / 12.0).clamp(0.1, 10.0);
    let rows_at = |t: f64| -> f64 {
        // linear between samples; the samples start at (0, 0)
        let mut prev = (0.0, 0u64);
        for &(s, r) in cumulative {
            if s >= t {
                let span = (s - prev.0).max(1e-12);
                return prev.1 as f64 + (r as f64 - prev.1 as f64) * (t - prev.0) / span;
            }
            prev = (s, r);
        }
        prev.1 as f64
    };
    (1..=80)
        .map(|i| end * i as f64 / 80.0)
        .map(|t| {
            let from = (t - window).max(0.0);
            (t, (rows_at(t) - rows_at(from)) / (t - from).max(1e-12))
        })
        .collect()
}

/// How fast the last tenth of a run's rows went, over the run's median
/// rate ([`rates`]' windows): 1.0 where the run held its pace to the end,
/// 0.5 where its last rows went at half of it (lanes running out of work
/// at different times, a checkpoint). `None` for a run too short to tell.
pub fn last_tenth_ratio(cumulative: &[(f64, u64)]) -> Option<f64> {
    let &(end, rows) = cumulative.last()?;
    let mut windows: Vec<f64> = rates(cumulative).into_iter().map(|(_, r)| r).collect();
    windows.sort_by(f64::total_cmp);
    let median = *windows.get(windows.len() / 2)?;
    // when the rows done first reached nine tenths, between two samples
    let mark = rows as f64 * 0.9;
    let mut prev = (0.0, 0u64);
    let mut at_mark = None;
    for &(t, r) in cumulative {
        if r as f64 >= mark {
            let grew = (r - prev.1.min(r)) as f64;
            let part = if grew > 0.0 {
                (mark - prev.1 as f64) / grew
            } else {
                1.0
            };
            at_mark = Some(prev.0 + (t - prev.0) * part.clamp(0.0, 1.0));
            break;
        }
        prev = (t, r);
    }
    let took = end - at_mark?;
    (took > 0.0 && median > 0.0).then(|| rows as f64 * 0.1 / took / median)
}

/// The chart as SVG text.
pub fn throughput_svg(r: &BenchReport) -> Result<String, String> {
    let mut svg = String::new();
    {
        let height = if r.load.is_some() { 880 } else { 560 };
        let root = SVGBackend::with_string(&mut svg, (800, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, rest) = root.split_vertically(380);
        throughput_panel(&top, r)?;
        let (middle, bottom) = rest.split_vertically(180);
        latency_panel(&middle, r)?;
        if let Some(load) = &r.load {
            app_panel(&bottom, load)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn throughput_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    r: &BenchReport,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let rekey = rates(&r.progress);
    let resumed = rates(&r.resumed_progress);
    let t_max = rekey
        .iter()
        .chain(resumed.iter())
        .map(|p| p.0)
        .fold(r.floor_s, f64::max)
        .max(0.1);
    let y_max = rekey
        .iter()
        .chain(resumed.iter())
        .map(|p| p.1)
        .fold(r.floor_rows_per_s, f64::max)
        .max(1.0)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "rekey bench: {} rows, {:.0} rows/s, {:.2}x the floor",
                r.rows, r.rekey_rows_per_s, r.ratio
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start of the run")
        .y_desc("rows/s")
        .y_label_formatter(&|v| format!("{:.0}", v))
        .x_label_formatter(&|v| format!("{:.1}", v))
        .draw()
        .map_err(err)?;
    // under the lines: each checkpoint that ended, from when it began (the
    // run's start for one begun before it); one with no end seen, a line
    // where it began
    let checkpoints: Vec<_> = r.checkpoints.iter().flatten().collect();
    if !checkpoints.is_empty() {
        let shade = BLACK.mix(0.08).filled();
        let begun = checkpoints
            .iter()
            .filter(|c| c.ended_at_s.is_none())
            .filter_map(|c| c.began_at_s)
            .map(|t| PathElement::new(vec![(t, 0.0), (t, y_max)], BLACK.mix(0.3)));
        chart.draw_series(begun).map_err(err)?;
        let ended = checkpoints.iter().filter_map(|c| {
            let end = c.ended_at_s?.min(t_max);
            let start = c.began_at_s.unwrap_or(0.0);
            Some(Rectangle::new([(start, 0.0), (end, y_max)], shade))
        });
        chart
            .draw_series(ended)
            .map_err(err)?
            .label("a checkpoint of the server's")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], shade));
    }
    chart
        .draw_series(LineSeries::new(
            std::iter::once((0.0, 0.0)).chain(rekey.iter().copied()),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?
        .label("rekey")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            [(0.0, r.floor_rows_per_s), (r.floor_s, r.floor_rows_per_s)],
            BLACK.mix(0.5).stroke_width(2),
        ))
        .map_err(err)?
        .label(format!(
            "floor: one UPDATE ({:.0} rows/s)",
            r.floor_rows_per_s
        ))
        .legend(|(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5).stroke_width(2))
        });
    if !resumed.is_empty() {
        chart
            .draw_series(LineSeries::new(
                std::iter::once((0.0, 0.0)).chain(resumed.iter().copied()),
                RED.mix(0.7).stroke_width(2),
            ))
            .map_err(err)?
            .label("killed and resumed")
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.7).stroke_width(2))
            });
        // "killed" left of its line, "resumed" right of its own, a line lower
        let marks = [
            (
                r.killed_at_s,
                "killed ",
                0.97,
                Pos::new(HPos::Right, VPos::Top),
            ),
            (
                r.resumed_at_s,
                " resumed",
                0.90,
                Pos::new(HPos::Left, VPos::Top),
            ),
        ];
        for (at, what, height, pos) in marks {
            if let Some(t) = at {
                chart
                    .draw_series(LineSeries::new([(t, 0.0), (t, y_max)], RED.mix(0.4)))
                    .map_err(err)?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        what.to_string(),
                        (t, y_max * height),
                        ("sans-serif", 13).into_font().color(&RED).pos(pos),
                    )))
                    .map_err(err)?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn latency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    r: &BenchReport,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let points = [
        ("p50", r.batch_ms_p50),
        ("p90", r.batch_ms_p90),
        ("p99", r.batch_ms_p99),
        ("p99.9", r.batch_ms_p999),
        ("max", r.batch_ms_max),
    ];
    let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("batch latency ({} rows per batch)", r.batch_size),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..points.len() as f64 - 0.5, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_y_mesh()
        .x_labels(points.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            match points.get(i as usize) {
                Some(p) if (x - i).abs() < 0.01 && i >= 0.0 => p.0.to_string(),
                _ => String::new(),
            }
        })
        .x_desc("percentile")
        .y_desc("milliseconds")
        .y_label_formatter(&|v| format!("{:.0}", v))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(points.iter().enumerate().map(|(i, p)| {
            let x = i as f64;
            Rectangle::new([(x - 0.3, 0.0), (x + 0.3, p.1)], BLUE.mix(0.5).filled())
        }))
        .map_err(err)?;
    chart
        .draw_series(points.iter().enumerate().map(|(i, p)| {
            Text::new(
                format!("{:.0}", p.1),
                (i as f64, p.1),
                ("sans-serif", 12)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))
        .map_err(err)?;
    Ok(())
}

/// The application's TPS each second of each loaded run, the rekey run's span marked.
fn app_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    load: &LoadReport,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let points = || load.runs.iter().flat_map(|run| run.app_tps.iter());
    let t_max = points().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "the application under load: pgbench, {} clients, scale {}",
                load.clients, load.scale
            ),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the application's baseline began")
        .y_desc("transactions/s")
        .y_label_formatter(&|v| format!("{:.0}", v))
        .x_label_formatter(&|v| format!("{:.0}", v))
        .draw()
        .map_err(err)?;
    for (i, run) in load.runs.iter().enumerate() {
        let color = Palette99::pick(i * 3 + 1).to_rgba();
        let label = run.max_rows_per_sec.map_or_else(
            || "app TPS, rekey at full speed".to_string(),
            |n| format!("app TPS, rekey at max {n} rows/s"),
        );
        chart
            .draw_series(LineSeries::new(
                run.app_tps.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        // the rekey run's span under this line
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(run.rekey_from_s, 0.0), (run.rekey_to_s, y_max * 0.04)],
                color.mix(0.5).filled(),
            )))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_one_second_run_draws_a_level_line_to_its_end() {
        // 1,000 rows/s sampled every 50 ms, ending 10 ms after a sample
        let mut samples: Vec<(f64, u64)> = (1..=20).map(|i| (i as f64 * 0.05, i * 50)).collect();
        samples.push((1.01, 1010));
        let r = rates(&samples);
        assert!(r.len() >= 60, "{r:?}");
        assert!(r.iter().all(|&(_, v)| (v - 1000.0).abs() < 1.0), "{r:?}");
        assert_eq!(r.last().map(|p| p.0), Some(1.01));
    }

    #[test]
    fn commits_in_steps_still_draw_the_rate() {
        // 5,000-row batches landing every 50 ms over 3 s: 100,000 rows/s in steps
        let samples: Vec<(f64, u64)> = (1..=60).map(|i| (i as f64 * 0.05, i * 5000)).collect();
        let r = rates(&samples);
        let late: Vec<f64> = r.iter().filter(|p| p.0 > 0.5).map(|p| p.1).collect();
        assert!(
            late.iter().all(|v| (v - 100_000.0).abs() < 15_000.0),
            "{r:?}"
        );
    }

    #[test]
    fn no_samples_no_line() {
        assert!(rates(&[]).is_empty());
    }

    #[test]
    fn a_run_that_holds_its_pace_to_the_end_has_a_last_tenth_of_one() {
        let samples: Vec<(f64, u64)> = (1..=40).map(|i| (i as f64 * 0.05, i * 500)).collect();
        let ratio = last_tenth_ratio(&samples).unwrap();
        assert!((ratio - 1.0).abs() < 0.01, "{ratio}");
    }

    #[test]
    fn a_run_whose_last_rows_go_at_half_its_pace_has_a_last_tenth_of_one_half() {
        // 18,000 rows at 10,000 rows/s, then the last 2,000 at 5,000 rows/s
        let mut samples: Vec<(f64, u64)> = (1..=36).map(|i| (i as f64 * 0.05, i * 500)).collect();
        samples.extend((1..=8).map(|i| (1.8 + i as f64 * 0.05, 18_000 + i * 250)));
        let ratio = last_tenth_ratio(&samples).unwrap();
        assert!((ratio - 0.5).abs() < 0.02, "{ratio}");
    }

    #[test]
    fn a_run_with_no_rows_or_samples_has_no_last_tenth() {
        assert_eq!(last_tenth_ratio(&[(0.0, 0)]), None);
        assert_eq!(last_tenth_ratio(&[]), None);
    }
}
