//! `rekey`: parse, run, map the outcome to an exit code. With `--json`, a
//! failure is also one JSON object on stdout (`error`, `kind`, `exit_code`,
//! `hint`), for scripts; the human line stays on stderr.

use std::process::ExitCode;

use clap::Parser;
use rekey::cli::out;

/// Whether the command line asks for JSON (read from the raw arguments, so
/// that a command line clap refuses is answered in JSON too).
fn wants_json() -> bool {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Prints the `--json` error object on stdout.
fn json_error(error: &str, kind: &str, exit_code: u8, hint: &str) {
    let object =
        serde_json::json!({ "error": error, "kind": kind, "exit_code": exit_code, "hint": hint });
    out::stdout_line(format_args!("{object}"));
}

/// The stack of the thread that runs the command (the main thread's is 8 MiB
/// where the system sets it; only what is used is taken).
const COMMAND_STACK: usize = 64 << 20;

fn main() -> ExitCode {
    // Key material must not end up in a core file.
    rekey::crypto::keyring::forbid_core_dumps();
    let json = wants_json();
    let cli = match rekey::cli::args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            if json {
                // the message is its first paragraph (a value given may hold
                // a newline); the usage lines and the help pointer follow
                let text = e.to_string();
                let first = text.split("\n\n").next().unwrap_or_default();
                json_error(
                    first.trim_start_matches("error: ").trim_end(),
                    "usage",
                    2,
                    "see `rekey --help` or `rekey <command> --help`",
                );
            }
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    rekey::observe::logging::init_logging(cli.log_format);
    rekey::observe::progress::set_log_interval(cli.progress_every);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out::stderr_line(format_args!("rekey: cannot start the async runtime: {e}"));
            if json {
                json_error(
                    &format!("cannot start the async runtime: {e}"),
                    "runtime",
                    1,
                    "",
                );
            }
            return ExitCode::from(1);
        }
    };
    // the command's future (some 300 KB for `run` and `rotate`) lives on the
    // heap, and the frames that poll it (a debug build's hold every future
    // they make) run on a thread whose stack is larger than the main one's
    let command = cli.command;
    let polled = std::thread::Builder::new()
        .name("rekey-command".into())
        .stack_size(COMMAND_STACK)
        .spawn(move || runtime.block_on(Box::pin(rekey::cli::dispatch(command))));
    let done = match polled {
        Ok(thread) => match thread.join() {
            Ok(done) => done,
            // the panic was printed by its thread; end as a panic does
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(e) => {
            out::stderr_line(format_args!(
                "rekey: cannot start the command's thread: {e}"
            ));
            if json {
                json_error(
                    &format!("cannot start the command's thread: {e}"),
                    "runtime",
                    1,
                    "",
                );
            }
            return ExitCode::from(1);
        }
    };
    match done {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            out::stderr_line(format_args!("rekey: {}", e.chain()));
            if json {
                json_error(&e.chain(), e.kind(), e.exit_code(), e.hint());
            }
            ExitCode::from(e.exit_code())
        }
    }
}
