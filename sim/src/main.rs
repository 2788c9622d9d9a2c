//! `edgetwin-sim`: the IoT Hub emulator in the foreground (`serve`), or Microsoft's
//! module-twin tutorial end to end on it (`demo`). Parses the command line, prints where
//! things are and maps the outcome to an exit code; the work lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use edgetwin_sim::aziot::AziotConfig;
use edgetwin_sim::{Sim, SimConfig, Tier};

#[derive(Debug, Parser)]
#[command(
    name = "edgetwin-sim",
    version,
    about = "A local Azure IoT Hub emulator (MQTT over TLS and WebSocket, registry and twin REST) \
that Microsoft's SDKs accept, and the edgetwin tutorial demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the emulator in the foreground until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Run the module-twin tutorial end to end on the emulator, in one process.
    Demo,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// MQTT over TLS listener (Microsoft's device SDK hard-codes port 8883).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8883")]
    mqtt: SocketAddr,
    /// HTTPS listener: REST API and MQTT over WebSocket.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    https: SocketAddr,
    /// Hub host name used in SAS scopes and MQTT user names.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    hub_name: String,
    /// State directory (registry, twins, certificates); a new temporary one by default.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Also serve the Azure IoT Identity Service of an IoT Edge host: DIR/identityd.sock
    /// and DIR/keyd.sock, for the module `--aziot-module` of device `--aziot-device`
    /// (created if missing). SIGUSR1 deletes and re-creates the module (a new generation).
    #[arg(long, value_name = "DIR")]
    aziot: Option<PathBuf>,
    #[arg(long, value_name = "ID", default_value = "edge-gw", requires = "aziot")]
    aziot_device: String,
    #[arg(
        long,
        value_name = "ID",
        default_value = "edgetwin",
        requires = "aziot"
    )]
    aziot_module: String,
    /// The uid identityd answers (the principal); default: this process's.
    #[arg(long, value_name = "UID", requires = "aziot")]
    aziot_principal_uid: Option<u32>,
    /// Throttle operations at this IoT Hub tier's published rates (off, free, s1, s2, s3).
    #[arg(long, value_name = "TIER", default_value = "off")]
    tier: Tier,
    /// Units of the tier (rates given per unit scale with it).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    units: u32,
    /// How often automatic configurations are evaluated (the real hub: 5m).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = edgetwin::config::duration::parse)]
    configurations_every: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGETWIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgetwin-sim: cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Demo => runtime.block_on(edgetwin_sim::demo::run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgetwin-sim: {e:#}");
            ExitCode::from(70)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let state_dir = match args.state {
        Some(dir) => dir,
        None => tempfile::Builder::new()
            .prefix("edgetwin-sim-")
            .tempdir()?
            .keep(),
    };
    let sim = Sim::start(SimConfig {
        mqtt_addr: args.mqtt,
        https_addr: args.https,
        hub_name: args.hub_name,
        state_dir,
        aziot: args.aziot.map(|dir| {
            let mut c = AziotConfig::new(dir, &args.aziot_device);
            c.module_id = args.aziot_module;
            if let Some(uid) = args.aziot_principal_uid {
                c.principal_uid = uid;
            }
            c
        }),
        configurations_every: args.configurations_every,
    })
    .await?;
    sim.set_throttle(args.tier, args.units);
    println!("state directory: {}", sim.state_dir().display());
    println!("CA certificate:  {}", sim.ca_path().display());
    println!(
        "service connection string (iothubowner): {}",
        sim.state_dir()
            .join(edgetwin_sim::server::SERVICE_CONNSTR_FILE)
            .display()
    );
    if let Some(aziot) = sim.aziot() {
        let c = aziot.config();
        println!(
            "aziot: {} and {} for {}/{} (principal uid {})",
            c.identityd_socket().display(),
            c.keyd_socket().display(),
            c.device_id,
            c.module_id,
            c.principal_uid
        );
    }
    println!(
        "edgetwin-sim ready: mqtts://{} https://{} hub {}",
        sim.mqtt_addr(),
        sim.https_addr(),
        sim.hub_name()
    );
    wait_for_stop_signal(&sim).await?;
    let counts = sim.throttle_counts();
    sim.shutdown().await;
    print!("{counts}");
    Ok(())
}

/// Until SIGINT or SIGTERM; SIGUSR1 re-creates the aziot module meanwhile.
async fn wait_for_stop_signal(sim: &Sim) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = usr1.recv() => match sim.aziot().map(|a| a.recreate_module()) {
                Some(Ok(())) => println!("aziot: module re-created (new generation)"),
                Some(Err(e)) => eprintln!("edgetwin-sim: {e:#}"),
                None => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_defaults_match_the_design() {
        let cli = Cli::try_parse_from(["edgetwin-sim", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.mqtt.to_string(), "127.0.0.1:8883");
        assert_eq!(args.https.to_string(), "127.0.0.1:8443");
        assert_eq!(args.hub_name, "localhost");
        assert_eq!(args.aziot, None);
        assert_eq!((args.tier, args.units), (Tier::Off, 1));
        assert_eq!(
            args.configurations_every,
            edgetwin_sim::server::CONFIGURATIONS_EVERY
        );
    }

    #[test]
    fn aziot_names_a_directory_and_its_module_defaults_to_edgetwin() {
        let cli =
            Cli::try_parse_from(["edgetwin-sim", "serve", "--aziot", "/run/sim-aziot"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.aziot, Some(PathBuf::from("/run/sim-aziot")));
        assert_eq!(args.aziot_module, "edgetwin");
        assert!(
            Cli::try_parse_from(["edgetwin-sim", "serve", "--aziot-principal-uid", "7"]).is_err(),
            "the principal belongs to --aziot"
        );
    }

    #[test]
    fn serve_takes_a_tier_and_units() {
        let cli =
            Cli::try_parse_from(["edgetwin-sim", "serve", "--tier", "s1", "--units", "2"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!((args.tier, args.units), (Tier::S1, 2));
        assert!(Cli::try_parse_from(["edgetwin-sim", "serve", "--tier", "s9"]).is_err());
        assert!(Cli::try_parse_from(["edgetwin-sim", "serve", "--units", "0"]).is_err());
    }

    #[test]
    fn configurations_every_takes_a_human_duration() {
        let cli = Cli::try_parse_from(["edgetwin-sim", "serve", "--configurations-every", "250ms"])
            .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.configurations_every, Duration::from_millis(250));
        assert!(
            Cli::try_parse_from(["edgetwin-sim", "serve", "--configurations-every", "soon"])
                .is_err()
        );
    }
}
