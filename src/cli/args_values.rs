//! Parsers for the values typed on the command line that are not plain
//! numbers: sizes (`64MiB`), rates (`20MB/s`) and instants (`06:00`). Pure;
//! clap calls them while it validates the arguments.

/// Parses `64MiB`, `512KiB`, `1GiB`, `1000000` (bytes). Units are binary,
/// as PostgreSQL counts them: `MB` is the same as `MiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a size; write e.g. 64MiB, 512KiB or a number of bytes")
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?}; use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// Parses a rate in bytes per second: `20MB/s`, `20MiB/s` or `20MB` (the
/// `/s` may be left out), with the units of [`parse_size`].
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let size = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("/S"))
        .unwrap_or(t);
    parse_size(size).map_err(|e| format!("{e} (a rate: e.g. 20MB/s, 512KiB/s)"))
}

/// Parses `--until`: `HH:MM[:SS]` local time (the next one to come) or an RFC 3339 instant.
pub fn parse_until(text: &str) -> Result<std::time::SystemTime, String> {
    use chrono::{Local, NaiveTime, TimeZone};
    let t = text.trim();
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(at.with_timezone(&chrono::Utc).into());
    }
    let time = NaiveTime::parse_from_str(t, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(t, "%H:%M"))
        .map_err(|_| format!("{text:?} is not a time; write HH:MM (local time, e.g. 06:00) or an RFC 3339 instant (2026-11-26T06:00:00Z)"))?;
    let now = Local::now();
    let today = now.date_naive().and_time(time);
    let day = if today > now.naive_local() {
        today
    } else {
        today + chrono::Duration::days(1)
    };
    let at = Local.from_local_datetime(&day).earliest().ok_or_else(|| {
        format!("{text:?} does not exist today in the local time zone (a clock change)")
    })?;
    Ok(at.with_timezone(&chrono::Utc).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512kib"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn until_takes_a_time_of_day_in_the_future_or_an_instant() {
        let now = std::time::SystemTime::now();
        let at = parse_until("06:00").unwrap();
        assert!(at > now && at <= now + std::time::Duration::from_secs(24 * 3600 + 3600));
        assert!(parse_until("2026-11-26T06:00:00Z").is_ok());
        assert!(parse_until("6 o'clock").is_err());
    }

    #[test]
    fn rates_take_the_units_of_sizes_with_or_without_per_second() {
        assert_eq!(parse_rate("20MB/s"), Ok(20 << 20));
        assert_eq!(parse_rate("20MiB/s"), Ok(20 << 20));
        assert_eq!(parse_rate("20MB"), Ok(20 << 20));
        assert_eq!(parse_rate(" 512kib/S "), Ok(512 << 10));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("20MB/h").is_err());
        assert!(parse_rate("0/s").is_err());
    }
}
