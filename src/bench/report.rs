//! What `rekey bench` reports: medians, peak memory, sizes and durations as
//! people write them, the report file and its throughput chart.

use std::fmt::Write as _;

use crate::Error;

use super::BenchReport;

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Resets the kernel's peak-RSS mark for this process (Linux 4.0+).
pub(super) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process, MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Parses `10M,100M,1B` (K, M, B suffixes) into row counts.
pub fn parse_sizes(text: &str) -> Result<Vec<u64>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.trim();
            let (num, mult) = match s.char_indices().last() {
                Some((i, 'k' | 'K')) => (&s[..i], 1_000.0),
                Some((i, 'm' | 'M')) => (&s[..i], 1_000_000.0),
                Some((i, 'b' | 'B' | 'g' | 'G')) => (&s[..i], 1_000_000_000.0),
                _ => (s, 1.0),
            };
            num.parse::<f64>()
                .map(|n| (n * mult) as u64)
                .map_err(|_| format!("{s:?} is not a row count like 10M, 250K or 1B"))
        })
        .collect()
}

/// A duration for people: `42s`, `7m 12s`, `3h 05m`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub(super) fn write_report(dir: &std::path::Path, r: &BenchReport) -> Result<(), Error> {
    let io = |e: std::io::Error| {
        Error::Runtime(format!(
            "writing the bench report to {}: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(r).unwrap_or_default(),
    )
    .map_err(io)?;
    std::fs::write(dir.join("throughput.svg"), throughput_svg(r)).map_err(io)
}

/// Throughput over time as a small SVG line chart, with the floor as a dashed line.
pub fn throughput_svg(r: &BenchReport) -> String {
    let (w, h, pad) = (720.0, 320.0, 50.0);
    let t_max = r.throughput.last().map_or(1.0, |p| p.0).max(1e-9);
    let y_max = r
        .throughput
        .iter()
        .map(|p| p.1)
        .fold(r.floor_rows_per_s, f64::max)
        .max(1.0)
        * 1.1;
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / y_max;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        svg,
        r#"<text x="{pad}" y="20">rekey bench: {} rows, {:.0} rows/s ({:.2}x the floor)</text>"#,
        r.rows, r.rekey_rows_per_s, r.ratio
    );
    let _ = write!(
        svg,
        r#"<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>"#,
        b = h - pad,
        r = w - pad
    );
    let fy = y(r.floor_rows_per_s);
    let _ = write!(
        svg,
        r#"<line x1="{pad}" y1="{fy}" x2="{}" y2="{fy}" stroke="gray" stroke-dasharray="6,4"/><text x="{}" y="{}" fill="gray">floor {:.0}/s</text>"#,
        w - pad,
        w - pad - 110.0,
        fy - 5.0,
        r.floor_rows_per_s
    );
    let points = r
        .throughput
        .iter()
        .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
        .collect::<Vec<_>>()
        .join(" ");
    let _ = write!(
        svg,
        r#"<polyline fill="none" stroke="steelblue" stroke-width="2" points="{points}"/>"#
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}">seconds ({:.1})</text><text x="5" y="{pad}">rows/s</text><text x="5" y="{}">{:.0}</text></svg>"#,
        w / 2.0,
        h - 15.0,
        t_max,
        pad + 15.0,
        y_max
    );
    svg
}
