//! Entry point: parse the command line, set up logging, dispatch to [`edgetwin::cli`],
//! exit with the code it returns. Kept thin: the commands live in `src/cli/`.

use std::process::ExitCode;

use clap::Parser;
use edgetwin::cli::{exit, Cli, Command};

fn main() -> ExitCode {
    let Cli { command } = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on a usage error; edgetwin's codes are sysexits (DESIGN §1).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    // The daemon sets up its logging from its configuration; check-config only prints.
    if matches!(
        command,
        Command::Provision(_) | Command::Twin(_) | Command::Fleet(_)
    ) {
        init_logging();
    }
    ExitCode::from(edgetwin::cli::dispatch(command))
}

/// One-shot commands log to stderr, at `EDGETWIN_LOG` (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGETWIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
