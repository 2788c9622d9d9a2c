//! The command line (DESIGN §1), as clap definitions only: parsing, help text and the
//! sysexits codes every command shares. `main` dispatches; nothing here does I/O.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit codes (sysexits.h), shared by every command.
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATA: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const NOPERM: u8 = 77;
    pub const CONFIG: u8 = 78;
}

#[derive(Debug, Parser)]
#[command(
    name = "edgetwin",
    version,
    about = "Keeps an Azure IoT Hub module twin applied, persisted and reported on a Linux gateway",
    long_about = "edgetwin connects to Azure IoT Hub as a module identity over MQTT, applies the \
module twin's desired properties (such as telemetryInterval) to local state, persists them, \
reports what it applied and sends telemetry at that interval. It runs under systemd \
(Type=notify, watchdog), reads one TOML file and logs to journald.\n\n\
Exit codes: 0 ok, 64 usage, 65 bad input data, 69 hub unavailable, 77 permission denied, \
78 bad configuration."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (what systemd starts).
    Run(ConfigArg),
    /// Create or fetch the device and module identities and store the module credential.
    Provision(ProvisionArgs),
    /// Service side: show or change a module twin.
    #[command(subcommand)]
    Twin(TwinCommand),
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig(ConfigArg),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file (drop-ins are read from conf.d/ beside it).
    #[arg(
        long,
        short,
        value_name = "PATH",
        default_value = "/etc/edgetwin/edgetwin.toml"
    )]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// Configuration file (drop-ins are read from conf.d/ beside it).
    #[arg(
        long,
        short,
        value_name = "PATH",
        default_value = "/etc/edgetwin/edgetwin.toml"
    )]
    pub config: PathBuf,
    /// Extra PEM trust anchors for the hub's TLS certificate (instead of hub.ca_file).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Service (policy) connection string; prefer the environment variable to keep it out
    /// of the process list.
    #[arg(
        long,
        env = "EDGETWIN_SERVICE_CONNECTION_STRING",
        hide_env_values = true
    )]
    pub hub_connection_string: Option<String>,
    /// Extra PEM trust anchors for the hub's TLS certificate.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Configuration file to take the service credential and ca_file from.
    #[arg(long, short, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub device: String,
    #[arg(long)]
    pub module: String,
}

#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Print the module twin (desired, reported, versions, etag).
    Show {
        #[command(flatten)]
        service: ServiceArgs,
        /// Print the raw twin document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// PATCH desired properties with the twin's etag (k=v, JSON values; k=null deletes).
    Set {
        #[command(flatten)]
        service: ServiceArgs,
        /// A whole desired patch as JSON, for nested values.
        #[arg(long, value_name = "JSON")]
        patch: Option<String>,
        /// Wait until the module's reported acks show the new version.
        #[arg(long, value_name = "SECS")]
        wait_ack: Option<u64>,
        /// Properties to set, as key=value.
        #[arg(value_name = "KEY=VALUE")]
        assignments: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
