//! The command line (DESIGN §1): the clap definitions, the sysexits codes every command
//! shares, and the commands themselves. This is the only code that prints or maps errors
//! to exit codes; the library below it returns typed errors. `main` parses, sets up
//! logging and dispatches here.
//!
//! - [`run`]: `edgetwin run` (the daemon: signals, the final error, its exit code) and
//!   `edgetwin check-config`.
//! - [`provision`]: `edgetwin provision`.
//! - [`twin`]: `edgetwin twin show` / `twin set` (service side, etag-guarded PATCH).
//! - [`fleet`]: `edgetwin fleet apply|status|list|remove|query` (module configurations).
//! - [`service`]: the service connection string and CA both of those use.

pub mod fleet;
pub mod provision;
pub mod run;
pub mod service;
pub mod twin;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::app::AppError;
use crate::aziot::AziotError;
use crate::fleet::FleetError;
use crate::provision::dps::DpsError;
use crate::provision::ProvisionError;
use crate::registry::{ClientSetupError, RegistryError};

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

/// A command failed: what to tell the user, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        Failure::new(registry_exit_code(&e), e.to_string())
    }
}

impl From<ProvisionError> for Failure {
    fn from(e: ProvisionError) -> Self {
        Failure::new(provision_exit_code(&e), e.to_string())
    }
}

impl From<ClientSetupError> for Failure {
    fn from(e: ClientSetupError) -> Self {
        let code = match &e {
            ClientSetupError::Client(e) => registry_exit_code(e),
            ClientSetupError::ConnectionString(_) | ClientSetupError::CaFile { .. } => exit::CONFIG,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<FleetError> for Failure {
    fn from(e: FleetError) -> Self {
        Failure::new(fleet_exit_code(&e), e.to_string())
    }
}

/// The sysexits code for a fleet error: a rollout that cannot be built is usage (64);
/// what the hub refused, or a name it does not know, is bad data (65).
pub fn fleet_exit_code(e: &FleetError) -> u8 {
    match e {
        FleetError::Spec(_) => exit::USAGE,
        FleetError::Exists { .. }
        | FleetError::Refused { .. }
        | FleetError::TooMany { .. }
        | FleetError::NotFound(_)
        | FleetError::NotARollout(_)
        | FleetError::Query(_) => exit::DATA,
        FleetError::Registry(e) => registry_exit_code(e),
    }
}

/// The sysexits code for a registry error.
pub fn registry_exit_code(e: &RegistryError) -> u8 {
    match e {
        RegistryError::Unauthorized(_) => exit::NOPERM,
        RegistryError::NotFound(_) | RegistryError::Invalid(_) => exit::DATA,
        RegistryError::Conflict(_) => exit::DATA,
        // The twin kept changing under us (after one retry): trying later may work.
        RegistryError::PreconditionFailed(_)
        | RegistryError::Throttled(_)
        | RegistryError::Transient(_) => exit::UNAVAILABLE,
    }
}

/// The sysexits code for a provisioning error (`edgetwin provision`, and the daemon when
/// its first boot fails for good).
pub fn provision_exit_code(e: &ProvisionError) -> u8 {
    match e {
        ProvisionError::Config { .. } | ProvisionError::StateDir { .. } => exit::CONFIG,
        ProvisionError::Registry(e) => registry_exit_code(e),
        ProvisionError::DeviceRefused { .. } => exit::NOPERM,
        ProvisionError::NoKey(_) | ProvisionError::NoGenerationId(_) => exit::DATA,
        ProvisionError::Dps(e) => dps_exit_code(e),
    }
}

/// The sysexits code for a DPS registration error: a refused key is 77 (the message
/// names the registration id, never the key); an ID scope DPS does not know is a
/// configuration error (78), as are malformed ids and local problems; what DPS decided
/// about the enrollment (disabled, failed, unassigned, rejected) is 65; what may pass
/// (throttling, unreachable, still assigning) is 69.
pub fn dps_exit_code(e: &DpsError) -> u8 {
    match e {
        DpsError::Unauthorized { .. } => exit::NOPERM,
        DpsError::UnknownScope { .. }
        | DpsError::InvalidRequest(_)
        | DpsError::Client(_)
        | DpsError::State { .. }
        | DpsError::Record { .. } => exit::CONFIG,
        DpsError::Rejected { .. }
        | DpsError::Disabled { .. }
        | DpsError::Failed { .. }
        | DpsError::Unassigned { .. } => exit::DATA,
        DpsError::Throttled { .. }
        | DpsError::Transient(_)
        | DpsError::Timeout { .. }
        | DpsError::Malformed(_) => exit::UNAVAILABLE,
    }
}

/// The sysexits code the daemon exits with when [`crate::app::run_with`] fails.
pub fn exit_code(e: &AppError) -> u8 {
    match e {
        AppError::Config(_) | AppError::StateDir { .. } => exit::CONFIG,
        AppError::Provision(e) => provision_exit_code(e),
        AppError::Aziot(e) => aziot_exit_code(e),
        AppError::Internal(_) => exit::SOFTWARE,
    }
}

/// The sysexits code for an Identity Service failure at start (see `app::aziot`): the
/// host's setup (no IoT Edge, a device or X.509 identity) is configuration, 78; a group
/// to join or a principal to declare is permission, 77; the rest may pass, 69.
pub fn aziot_exit_code(e: &AziotError) -> u8 {
    match e {
        AziotError::SocketMissing { .. } | AziotError::Unsupported(_) => exit::CONFIG,
        AziotError::PermissionDenied { .. } | AziotError::NotPrincipal { .. } => exit::NOPERM,
        AziotError::Unavailable { .. }
        | AziotError::Refused { .. }
        | AziotError::Malformed { .. } => exit::UNAVAILABLE,
    }
}

/// Runs one command on a runtime of its own; returns its exit code (everything to say
/// already printed or logged).
pub fn dispatch(command: Command) -> u8 {
    if let Command::CheckConfig(args) = command {
        return run::check_config(args.config);
    }
    // One thread runs every task (fsync and DNS go to tokio's blocking pool): a gateway
    // daemon's work is small, and each worker thread would cost a stack and a malloc
    // arena whatever the number of cores (docs/BENCHMARKS.md, memory).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgetwin: cannot start the async runtime: {e}");
            return exit::SOFTWARE;
        }
    };
    runtime.block_on(async move {
        match command {
            Command::Run(args) => run::daemon(args.config).await,
            Command::Provision(args) => provision::run(args).await,
            Command::Twin(command) => twin::run(command).await,
            Command::Fleet(command) => fleet::run(command).await,
            Command::CheckConfig(_) => exit::USAGE,
        }
    })
}

/// `--config` as given, or `None` for the default path (which may then be absent).
fn config_path(path: PathBuf) -> Option<PathBuf> {
    (path != Path::new(crate::config::DEFAULT_PATH)).then_some(path)
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
    /// Service side: roll desired values out to many gateways, and follow them.
    #[command(subcommand)]
    Fleet(FleetCommand),
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

/// Where the service side finds the hub: the credential and the trust anchors
/// (`twin` and `fleet`, resolved by [`service::connect`]).
#[derive(Debug, Args)]
pub struct HubArgs {
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
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub hub: HubArgs,
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
        /// Tags to merge into the twin, as a JSON object (`null` removes a tag); how
        /// fleets are targeted (`fleet apply --target "tags.site = 'north'"`).
        #[arg(long, value_name = "JSON")]
        tags: Option<String>,
        /// Wait until the module's reported acks show the new version.
        #[arg(long, value_name = "SECS")]
        wait_ack: Option<u64>,
        /// Properties to set, as key=value.
        #[arg(value_name = "KEY=VALUE")]
        assignments: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Roll desired values out to every gateway the target picks: an IoT Hub module
    /// configuration (content is immutable: a new value is a new NAME, higher priority).
    Apply {
        #[command(flatten)]
        hub: HubArgs,
        /// The configuration's name (its IoT Hub id: lowercase letters, digits, -_:...).
        name: String,
        /// WHERE clause picking the gateways, e.g. "tags.site = 'north'".
        #[arg(long, value_name = "WHERE")]
        target: String,
        /// The module id the gateways run edgetwin as (default: the config's
        /// provisioning.module_id, else `edgetwin`).
        #[arg(long, value_name = "M")]
        module: Option<String>,
        /// Highest wins per property (default: one above the configurations that set the
        /// same properties, or 10).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        priority: Option<i64>,
        /// Properties to set, as key=value (JSON values, else strings).
        #[arg(value_name = "KEY=VALUE")]
        assignments: Vec<String>,
    },
    /// Targeted / applied / rejected / pending per rollout, and who rejected why.
    Status {
        #[command(flatten)]
        hub: HubArgs,
        /// One rollout (default: every rollout in the hub).
        name: Option<String>,
        /// Poll until nothing is pending, at most SECS (at the pace the hub's quota allows).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// Print the statuses as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The hub's configurations.
    List {
        #[command(flatten)]
        hub: HubArgs,
        /// Print them as the hub returns them, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a configuration (twins keep its values until another one sets them).
    Remove {
        #[command(flatten)]
        hub: HubArgs,
        name: String,
    },
    /// Run a twin query (IoT Hub query language), following every page.
    Query {
        #[command(flatten)]
        hub: HubArgs,
        /// e.g. "SELECT deviceId, properties.reported.telemetryInterval FROM devices.modules"
        query: String,
        /// Print the rows as one JSON array (default: one JSON row per line).
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::SpecError;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn registry_errors_map_to_sysexits() {
        let code = |e| registry_exit_code(&e);
        assert_eq!(code(RegistryError::Unauthorized("x".into())), exit::NOPERM);
        assert_eq!(code(RegistryError::NotFound("x".into())), exit::DATA);
        assert_eq!(code(RegistryError::Conflict("x".into())), exit::DATA);
        assert_eq!(code(RegistryError::Invalid("x".into())), exit::DATA);
        for retryable in [
            RegistryError::PreconditionFailed("x".into()),
            RegistryError::Throttled("x".into()),
            RegistryError::Transient("x".into()),
        ] {
            assert_eq!(code(retryable), exit::UNAVAILABLE);
        }
    }

    #[test]
    fn fleet_errors_map_to_sysexits() {
        let code = |e| fleet_exit_code(&e);
        assert_eq!(code(FleetError::Spec(SpecError::NoSettings)), exit::USAGE);
        assert_eq!(
            code(FleetError::Exists {
                name: "a".into(),
                priority: Some(10),
                next: 11
            }),
            exit::DATA
        );
        assert_eq!(
            code(FleetError::Refused {
                name: "a".into(),
                message: "x".into()
            }),
            exit::DATA
        );
        assert_eq!(code(FleetError::Query("x".into())), exit::DATA);
        assert_eq!(
            code(FleetError::Registry(RegistryError::Throttled("x".into()))),
            exit::UNAVAILABLE
        );
        assert_eq!(
            code(FleetError::Registry(RegistryError::Unauthorized(
                "x".into()
            ))),
            exit::NOPERM
        );
    }

    #[test]
    fn dps_errors_map_to_sysexits() {
        let code = |e| provision_exit_code(&ProvisionError::Dps(e));
        let id = || "gw1".to_string();
        assert_eq!(
            code(DpsError::Unauthorized {
                registration_id: id(),
                status: 401,
                message: "x".into()
            }),
            exit::NOPERM
        );
        assert_eq!(
            code(DpsError::UnknownScope {
                id_scope: "0ne0".into(),
                endpoint: "e".into(),
                message: "x".into()
            }),
            exit::CONFIG
        );
        assert_eq!(
            code(DpsError::Disabled {
                registration_id: id(),
                message: String::new()
            }),
            exit::DATA
        );
        assert_eq!(
            code(DpsError::Unassigned {
                registration_id: id(),
                message: String::new()
            }),
            exit::DATA
        );
        assert_eq!(code(DpsError::Transient("x".into())), exit::UNAVAILABLE);
    }

    #[test]
    fn daemon_errors_map_to_sysexits() {
        let provision = |e| exit_code(&AppError::Provision(e));
        assert_eq!(exit_code(&AppError::Config("x".into())), exit::CONFIG);
        assert_eq!(exit_code(&AppError::Internal("x".into())), exit::SOFTWARE);
        assert_eq!(
            provision(ProvisionError::Config { what: "x".into() }),
            exit::CONFIG
        );
        assert_eq!(
            provision(ProvisionError::Registry(RegistryError::Unauthorized(
                "x".into()
            ))),
            exit::NOPERM
        );
        assert_eq!(provision(ProvisionError::NoKey("d/m".into())), exit::DATA);
        assert_eq!(
            provision(ProvisionError::DeviceRefused {
                device: "d".into(),
                target: "d".into(),
                source: RegistryError::Unauthorized("x".into()),
            }),
            exit::NOPERM
        );
        assert_eq!(
            provision(ProvisionError::StateDir {
                path: "/x".into(),
                source: std::io::ErrorKind::PermissionDenied.into(),
            }),
            exit::CONFIG
        );
    }
}
