//! What `rekey bench` reports: medians, peak memory, sizes and durations as
//! people write them, the report file (its chart is drawn in `chart`).

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
    let svg = super::chart::throughput_svg(r)
        .map_err(|e| Error::Runtime(format!("drawing the bench chart: {e}")))?;
    std::fs::write(dir.join("throughput.svg"), svg).map_err(io)
}
