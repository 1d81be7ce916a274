//! `rekey`: parse, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Key material must not end up in a core file.
    rekey::crypto::keyring::forbid_core_dumps();
    let cli = rekey::cli::args::Cli::parse();
    rekey::observe::logging::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rekey: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(rekey::cli::dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rekey: {}", e.chain());
            ExitCode::from(e.exit_code())
        }
    }
}
