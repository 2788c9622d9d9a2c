//! Entry point: parse the command line, set up logging, dispatch, map the outcome to a
//! sysexits code. Kept thin; every command's work lives in the library.

use std::process::ExitCode;

use clap::Parser;
use edgetwin::cli::{exit, Cli, Command};
use edgetwin::config::Settings;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgetwin: cannot start the async runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let code = match cli.command {
        Command::Run(args) => runtime.block_on(run_daemon(args.config)),
        Command::CheckConfig(args) => check_config(args.config),
        other => {
            init_logging();
            runtime.block_on(dispatch(other))
        }
    };
    ExitCode::from(code)
}

async fn dispatch(command: Command) -> u8 {
    match command {
        Command::Run(_) | Command::CheckConfig(_) => exit::USAGE,
        Command::Provision(args) => {
            let config = config_path(args.config);
            edgetwin::provision::command(config.as_deref(), args.ca_file.as_deref()).await
        }
        Command::Twin(command) => edgetwin::twin_cli::run(command).await,
    }
}

/// `--config` as given, or `None` for the default path (which may then be absent).
fn config_path(path: PathBuf) -> Option<PathBuf> {
    (path != Path::new(edgetwin::config::DEFAULT_PATH)).then_some(path)
}

/// `edgetwin run`: the daemon, until SIGTERM/SIGINT.
async fn run_daemon(path: PathBuf) -> u8 {
    let path = config_path(path);
    let settings = match Settings::load(path.as_deref()) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("edgetwin: {errors}");
            return exit::CONFIG;
        }
    };
    let log = edgetwin::logging::init(&settings.log.level, settings.log.format);
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let signals = tokio::spawn(edgetwin::app::handle_signals(
        path,
        log,
        shutdown.clone(),
        reload_tx,
    ));
    let control = edgetwin::app::RunControl {
        reloads: Some(reload_rx),
        on_ready: None,
    };
    let result = edgetwin::app::run_with(settings, shutdown, control).await;
    signals.abort();
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!(error = %e, "edgetwin stopped");
            eprintln!("edgetwin: {e}");
            e.exit_code()
        }
    }
}

/// `edgetwin check-config`: validate (reading the credentials `run` would read), print
/// the effective config with secrets redacted.
fn check_config(path: PathBuf) -> u8 {
    let checked = Settings::load(config_path(path).as_deref())
        .and_then(|s| s.check_credentials().map(|()| s));
    match checked {
        Ok(settings) => {
            print!("{}", settings.redacted_toml());
            exit::OK
        }
        Err(errors) => {
            eprintln!("edgetwin: {errors}");
            exit::CONFIG
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGETWIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
