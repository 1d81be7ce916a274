//! Command output that never panics. `println!` panics when stdout is a
//! pipe whose reader has gone (`rekey status | head -0`) or a full disk, and
//! a run whose work is done would then exit 101 instead of the code it
//! earned. Every line a command prints goes through [`out!`] (stdout) or
//! [`eout!`] (stderr): a write that fails is dropped, and the exit code
//! stays the work's. A failure other than a closed pipe (a full disk) is
//! said once on stderr, so a summary redirected to a file is not lost
//! unnoticed. What must not be lost, a new key, is written with [`line`],
//! which returns the error instead.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout has failed: later lines are not tried, and
/// the failure is said only once.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout and flushes it; returns what the OS said.
pub fn line(args: fmt::Arguments<'_>) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_fmt(args)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

/// Writes one line to stdout, or drops it when stdout cannot take it (see
/// the module's comment). Used through [`out!`].
pub fn stdout_line(args: fmt::Arguments<'_>) {
    if STDOUT_FAILED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = line(args) {
        if !STDOUT_FAILED.swap(true, Ordering::Relaxed) && e.kind() != io::ErrorKind::BrokenPipe {
            stderr_line(format_args!(
                "rekey: warning: output to stdout was lost: {e}"
            ));
        }
    }
}

/// Writes one line to stderr, or drops it when stderr cannot take it: there
/// is nowhere left to say so. Used through [`eout!`].
pub fn stderr_line(args: fmt::Arguments<'_>) {
    let mut stderr = io::stderr().lock();
    let _ = stderr
        .write_fmt(args)
        .and_then(|()| stderr.write_all(b"\n"));
}

/// `println!` that never panics: see [`stdout_line`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::stdout_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: see [`stderr_line`].
macro_rules! eout {
    ($($arg:tt)*) => {
        $crate::cli::out::stderr_line(format_args!($($arg)*))
    };
}

pub(crate) use {eout, out};
