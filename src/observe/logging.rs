//! Log lines to stderr through `tracing`: `text` (`rekey: <message>
//! key=value ...`) or `json` (one object per line), filtered by `RUST_LOG`. While a
//! progress bar is drawn, each line is written above it ([`LogsAbove`]),
//! never onto the bar's line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use indicatif::ProgressBar;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human lines: `rekey: <message> key=value ...`.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message and fields.
    Json,
}

/// The filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info";

/// Installs the tracing subscriber on stderr, filtered by `RUST_LOG` (default
/// `info`). Only the first call installs anything; later calls do nothing.
pub fn init_logging(format: LogFormat) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
            Ok(filter) => (filter, None),
            Err(e) => {
                let bad = std::env::var("RUST_LOG").ok().map(|_| e.to_string());
                (EnvFilter::new(DEFAULT_FILTER), bad)
            }
        };
        // Fails only when another subscriber is already installed: keep that one.
        if tracing::subscriber::set_global_default(subscriber(format, filter, || ToStderr)).is_ok()
        {
            if let Some(e) = bad_filter {
                tracing::warn!("RUST_LOG ignored ({e}); logging at {DEFAULT_FILTER}");
            }
        }
    });
}

/// The subscriber [`init_logging`] installs, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.event_format(TextLine).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_target(false)
                .finish(),
        ),
    }
}

/// The bar being drawn on stderr, if any, with the number of the
/// [`LogsAbove`] that set it.
static BAR: Mutex<Option<(u64, ProgressBar)>> = Mutex::new(None);

/// Numbers each [`LogsAbove`].
static NEXT: AtomicU64 = AtomicU64::new(0);

/// While held, log lines are written above `bar`: the bar is cleared, the
/// line written, the bar drawn again below it. Dropping it writes them
/// plainly again.
pub struct LogsAbove(u64);

impl LogsAbove {
    /// Log lines go above `bar` from now on (instead of a bar drawn before).
    pub fn bar(bar: &ProgressBar) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut shown) = BAR.lock() {
            *shown = Some((n, bar.clone()));
        }
        LogsAbove(n)
    }
}

impl Drop for LogsAbove {
    fn drop(&mut self) {
        if let Ok(mut shown) = BAR.lock() {
            if shown.as_ref().is_some_and(|(n, _)| *n == self.0) {
                *shown = None;
            }
        }
    }
}

/// Stderr, around the bar being drawn. The formatter writes each event
/// whole in one `write_all`, so a line is never split by a redraw. A line
/// stderr does not take (a closed pipe, a full disk) is dropped: there is
/// nowhere to say so, and an error returned here would make
/// tracing-subscriber report it with `eprintln!`, which panics.
struct ToStderr;

impl Write for ToStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR
            .lock()
            .ok()
            .and_then(|shown| shown.as_ref().map(|(_, bar)| bar.clone()));
        let _dropped = match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _dropped = std::io::stderr().flush();
        Ok(())
    }
}

/// The text format: `rekey: message key=value ...`, with `warning: ` or
/// `error: ` after the program name for those levels; no timestamp.
struct TextLine;

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let prefix = match *event.metadata().level() {
            Level::ERROR => "rekey: error: ",
            Level::WARN => "rekey: warning: ",
            _ => "rekey: ",
        };
        writer.write_str(prefix)?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::observe::events::{BatchRetried, LeaseChange, LeaseChanged, ThrottleChanged};

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    /// The log lines `f` writes in `format`, at `debug` and above.
    pub(crate) fn logged(format: LogFormat, f: impl FnOnce()) -> String {
        let buf = Buffer::default();
        tracing::subscriber::with_default(
            subscriber(format, EnvFilter::new("debug"), buf.clone()),
            f,
        );
        let bytes = buf.0.lock().expect("buffer").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn json_logs_are_one_object_per_line() {
        let out = logged(LogFormat::Json, || {
            BatchRetried {
                table: "users",
                attempt: 2,
                error: "connection reset",
                rows: 10,
                wait_seconds: 1.5,
            }
            .emit();
            ThrottleChanged {
                reason: None,
                previous: None,
                detail: None,
            }
            .emit();
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        let first = &lines[0];
        assert_eq!(first["level"], "WARN");
        assert_eq!(
            first["message"],
            "batch on users failed, retrying in 1.5s: connection reset"
        );
        assert_eq!(first["attempt"], 2);
        assert_eq!(first["rows"], 10);
        assert!(first["timestamp"].is_string(), "{first}");
        assert_eq!(lines[1]["message"], "reading again");
    }

    #[test]
    fn text_logs_name_the_program_and_the_level() {
        let out = logged(LogFormat::Text, || {
            LeaseChanged {
                kind: LeaseChange::Lost,
                table: "users",
                range_no: 3,
                owner: "host-b:7",
            }
            .emit();
            BatchRetried {
                table: "users",
                attempt: 2,
                error: "connection reset",
                rows: 10,
                wait_seconds: 1.5,
            }
            .emit();
        });
        assert_eq!(
            out,
            "rekey: lost the lease on range 3 of users owner=\"host-b:7\"\n\
             rekey: warning: batch on users failed, retrying in 1.5s: connection reset attempt=2 rows=10\n"
        );
    }
}
