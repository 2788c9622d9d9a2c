//! The supervisor: [`run`] is the one entry point of the daemon, used by `main`, the demo
//! and the integration tests alike.
//!
//! It loads the persisted state and puts it in force before any network I/O (a corrupt
//! or foreign `state.json` is moved aside), sends READY, provisions the module identity
//! on first boot (`first_boot`), spawns the agent, the hub session and
//! the watchdog feeder on its own [`TaskTracker`], keeps `STATUS=` fed, applies reloads,
//! and stops in order: agent (state flushed) first, then the session (MQTT DISCONNECT),
//! each within a grace period, then waits for the tracker: no task outlives [`run_with`].
//! It owns no runtime state itself and never talks to the hub directly. Its error is
//! returned, not logged: the caller reports it once.
//!
//! - `signals`: [`handle_signals`] turns SIGTERM/SIGINT/SIGHUP into cancellation and
//!   reloads.
//! - `status`: the `STATUS=` text.
//! - `credential`: the module credential while running: read again after a refusal and
//!   on reload, so a fixed credential is used without a restart.
//! - `reprovision`: with `device`/`dps`, the module identity provisioned once more after
//!   repeated refusals (a deleted, re-created or re-keyed module).
//! - `aziot`: with `[aziot]`, the module identity asked of aziot-identityd at start.
//! - `first_boot`: the module credential from the configuration, or provisioned on first
//!   boot (`first_boot_credentials`) with the watchdog fed and reloads kept meanwhile.
//!
//! A refused credential never stops the daemon: the session checks the clock, then backs
//! off long, and `STATUS=` says so until a new credential is accepted.

mod aziot;
mod credential;
mod first_boot;
mod reprovision;
mod signals;
mod status;

pub use signals::handle_signals;

use first_boot::{first_boot_credentials, module_credentials, Waiting};
use status::{twin_words, Describe, Status};

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::agent::{Agent, AgentConfig, AgentControl, AgentLinks};
use crate::config::Settings;
use crate::hub::session::{ConnectionState, Session, SessionConfig};
use crate::hub::signer::Signer;
use crate::identity::{ModuleCredentials, ModuleIdentity};
use crate::provision::{Plan, ProvisionError};
use crate::systemd::{feed_watchdog, Heartbeat, Notifier};
use crate::twin::{RuntimeState, StateFile};

/// How long each of the agent and the session may take to stop.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a twin request may stay unanswered before it is sent again.
pub const TWIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the daemon stopped by itself. The caller maps it to an exit code (`cli::exit_code`).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A configuration problem (credential missing or malformed, proxy, CA file).
    #[error("{0}")]
    Config(String),
    /// The state directory is unusable (it is configuration, `state.dir`).
    #[error("state directory {}: {source}", dir.display())]
    StateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// First-boot provisioning failed for good: its configuration, a refusal by the hub
    /// (e.g. a policy without registry write rights) or an unwritable state dir.
    #[error("provisioning failed: {0}")]
    Provision(ProvisionError),
    /// `[aziot]`: no module identity from the Azure IoT Identity Service at start (the
    /// message names the socket, the group or the principal file to fix).
    #[error("{0}")]
    Aziot(crate::aziot::AziotError),
    /// A bug: a task panicked or an invariant broke.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), AppError> {
    run_with(settings, shutdown, RunControl::default()).await
}

/// Optional extras of [`run_with`]: reloads (SIGHUP) and a view for observers (tests).
#[derive(Default)]
pub struct RunControl {
    /// Each new [`Settings`] arriving here is applied live where it can be.
    pub reloads: Option<mpsc::Receiver<Settings>>,
    /// Receives read-only views of the state and the connection when READY is sent.
    pub on_ready: Option<oneshot::Sender<ReadyView>>,
}

/// What an observer can watch once the daemon is ready.
pub struct ReadyView {
    pub state: watch::Receiver<RuntimeState>,
    pub connection: watch::Receiver<ConnectionState>,
}

/// [`run`], with reloads and observation.
pub async fn run_with(
    mut settings: Settings,
    shutdown: CancellationToken,
    control: RunControl,
) -> Result<(), AppError> {
    let mut reloads = control.reloads.unwrap_or_else(|| mpsc::channel(1).1);
    for warning in &settings.warnings {
        tracing::warn!(edgetwin_event = "config_warning", "{warning}");
    }
    // First boot when the module credential is still to be provisioned; the plan (its
    // secret read once, here) names the identity to be.
    let start = match &settings.aziot {
        Some(client) => Start::Aziot(aziot::first_identity(&settings, client).await?),
        None => match module_credentials(&settings)? {
            Some(c) => Start::Known(c),
            None => Start::FirstBoot(Box::new(
                Plan::from_settings(&settings, None).map_err(AppError::Provision)?,
            )),
        },
    };
    let (device_id, module_id) = match &start {
        Start::Known(c) => (c.device_id.clone(), c.module_id.clone()),
        Start::Aziot(a) => (a.device_id.clone(), a.module_id.clone()),
        Start::FirstBoot(p) => (p.device_id.clone(), p.module_id.clone()),
    };
    let span = tracing::info_span!(
        "edgetwin",
        edgetwin_device = %device_id,
        edgetwin_module = %module_id
    );
    let state = load_state(&settings, &device_id, &module_id)
        .instrument(span.clone())
        .await?;
    let notifier = Notifier::from_env();
    // First boot: READY as soon as the local state is in force (DESIGN §3 rule 8), then
    // provision with STATUS saying so.
    let first_boot = matches!(start, Start::FirstBoot(_));
    let mut deferred_reload = None;
    let (identity, signer) = match start {
        Start::Known(c) => (c.identity(), Signer::Key(c.key)),
        Start::Aziot(identity) => {
            let client = settings.aziot.clone().ok_or_else(|| {
                AppError::Internal("the aziot identity came without [aziot]".into())
            })?;
            (identity, Signer::Aziot(client))
        }
        Start::FirstBoot(plan) => {
            let status = format!(
                "provisioning {device_id}/{module_id}, {} in force",
                twin_words(&state)
            );
            notifier.ready(&status);
            let mut waiting = Waiting {
                notifier: &notifier,
                reloads: &mut reloads,
                deferred: None,
                status,
            };
            let provisioned = first_boot_credentials(&settings, *plan, &mut waiting, &shutdown)
                .instrument(span.clone())
                .await?;
            deferred_reload = waiting.deferred;
            match provisioned {
                Some(c) => (c.identity(), Signer::Key(c.key)),
                None => {
                    notifier.stopping();
                    return Ok(());
                }
            }
        }
    };
    let mut live_credential = credential::LiveCredential::new(settings.hub.credentials.clone());
    let session_config = session_config(&settings, identity.clone(), signer, &live_credential);
    let agent_heart = Heartbeat::new();
    let session_heart = Heartbeat::new();
    agent_heart.beat();
    session_heart.beat();
    let agent_config = AgentConfig {
        device_id: identity.device_id.clone(),
        module_id: identity.module_id.clone(),
        state_file: settings.state.state_file(),
        ack: settings.twin.ack,
        schema: settings.twin.schema.clone(),
        telemetry_enabled: settings.telemetry.enabled,
        hook: settings.hooks.on_change.clone(),
    };
    let (agent, mut view) = Agent::new(agent_config, state, agent_heart.clone());
    let describe = Describe {
        hub: identity.host_name.clone(),
        device: identity.device_id.clone(),
        module: identity.module_id.clone(),
    };
    span.in_scope(|| {
        tracing::info!(
            edgetwin_event = "started",
            edgetwin_twin_version = agent.state().desired_version,
            "persisted state in force; connecting"
        )
    });
    let connecting = describe.status(ConnectionState::Connecting, agent.state());
    if first_boot {
        notifier.status(&connecting);
    } else {
        notifier.ready(&connecting);
    }

    let (session, link) = Session::new(session_config, session_heart.clone());
    let mut connection = link.state.clone();
    live_credential.connect(link.credentials);
    if let Some(on_ready) = control.on_ready {
        let _ = on_ready.send(ReadyView {
            state: view.clone(),
            connection: link.state.clone(),
        });
    }
    let (control_tx, control_rx) = mpsc::channel(4);
    if let Some(new) = deferred_reload {
        span.in_scope(|| reload(&settings, &new, &control_tx, &live_credential));
        settings = new;
    }
    let links = AgentLinks {
        events: link.events,
        commands: link.commands,
        connection: link.state,
        control: control_rx,
    };
    let agent_stop = CancellationToken::new();
    let session_stop = CancellationToken::new();
    let watchdog_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut agent_task = tasks.spawn(
        agent
            .run(links, agent_stop.clone())
            .instrument(span.clone()),
    );
    let mut session_task = tasks.spawn(session.run(session_stop.clone()).instrument(span.clone()));
    if let Some(period) = notifier.watchdog_period() {
        let feed = feed_watchdog(notifier.clone(), period, vec![agent_heart, session_heart]);
        let stop = watchdog_stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = feed => {}
            }
        });
    }
    tasks.close();

    let mut session_result = None;
    let mut status = Status::default();
    let mut reprovision = reprovision::Reprovision::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Ok(()) = connection.changed() => {
                let state = *connection.borrow_and_update();
                status.set(&notifier, describe.status(state, &view.borrow()));
                span.in_scope(|| reprovision.on_state(state, &settings, &tasks, &agent_stop));
            }
            Some(outcome) = reprovision.done.recv() => {
                span.in_scope(|| reprovision::finished(outcome, &settings, &live_credential));
            }
            Ok(()) = view.changed() => {
                let state = view.borrow_and_update().clone();
                status.set(&notifier, describe.status(*connection.borrow(), &state));
            }
            Some(new) = reloads.recv() => {
                span.in_scope(|| reload(&settings, &new, &control_tx, &live_credential));
                settings = new;
                notifier.ready(&describe.status(*connection.borrow(), &view.borrow()));
            }
            result = &mut session_task => {
                session_result = Some(result);
                break;
            }
        }
    }

    notifier.stopping();
    span.in_scope(|| tracing::info!(edgetwin_event = "stopping", "stopping"));
    agent_stop.cancel();
    let agent_result = match tokio::time::timeout(STOP_GRACE, &mut agent_task).await {
        Ok(r) => r,
        Err(_) => {
            // Last resort: the task ends at its next await; the tracker waits for that.
            agent_task.abort();
            span.in_scope(|| tracing::error!("agent did not stop in time"));
            Ok(())
        }
    };
    session_stop.cancel();
    let session_result = match session_result {
        // The session ends only when asked to: if it ended by itself, that is a bug.
        Some(Ok(())) => Err(AppError::Internal("the hub session ended by itself".into())),
        Some(Err(e)) => Err(AppError::Internal(format!("session task failed: {e}"))),
        None => match tokio::time::timeout(STOP_GRACE, &mut session_task).await {
            Ok(r) => r.map_err(|e| AppError::Internal(format!("session task failed: {e}"))),
            Err(_) => {
                session_task.abort();
                span.in_scope(|| tracing::error!("session did not stop in time"));
                Ok(())
            }
        },
    };
    watchdog_stop.cancel();
    tasks.wait().await;
    session_result?;
    agent_result.map_err(|e| AppError::Internal(format!("agent task failed: {e}")))
}

/// Applies what can change live (DESIGN §2): twin schema and ack style, telemetry, hook,
/// and the module credential (read again from its source, which may have changed: a
/// new key is used from the next connect, at once when the old one was refused). The log
/// level is applied by whoever owns the [`LogHandle`]; the other hub settings (a
/// credential for another identity included), provisioning and state need a restart.
fn reload(
    old: &Settings,
    new: &Settings,
    control: &mpsc::Sender<AgentControl>,
    credential: &credential::LiveCredential,
) {
    // With aziot there is no credential to read: identityd is asked at each connect.
    if new.aziot.is_none() {
        credential.reloaded(new);
    }
    let other_hub_settings = crate::config::HubSettings {
        credentials: old.hub.credentials.clone(),
        ..new.hub.clone()
    };
    let restart: Vec<&str> = [
        ("hub", old.hub != other_hub_settings),
        ("provisioning", old.provisioning != new.provisioning),
        ("aziot", old.aziot != new.aziot),
        ("state", old.state != new.state),
    ]
    .into_iter()
    .filter_map(|(section, changed)| changed.then_some(section))
    .collect();
    if !restart.is_empty() {
        tracing::warn!(
            edgetwin_event = "reload_partial",
            sections = %restart.join(","),
            "settings changed that take effect at the next restart"
        );
    }
    let sent = control.try_send(AgentControl::Reload {
        ack: new.twin.ack,
        schema: new.twin.schema.clone(),
        telemetry_enabled: new.telemetry.enabled,
        hook: new.hooks.on_change.clone(),
    });
    if sent.is_err() {
        tracing::warn!("agent busy; reload not applied");
    }
}

/// How the daemon starts: with its module credential, the identity aziot-identityd
/// gave, or provisioning it first.
enum Start {
    Known(ModuleCredentials),
    Aziot(ModuleIdentity),
    FirstBoot(Box<Plan>),
}

/// Assembles the session's configuration from values `config` already validated (proxy,
/// gateway host, CA bundle included), so it cannot fail.
fn session_config(
    settings: &Settings,
    identity: ModuleIdentity,
    signer: Signer,
    live: &credential::LiveCredential,
) -> SessionConfig {
    let hub = &settings.hub;
    // A credential read again from its source only means something for a module key.
    let reread = matches!(signer, Signer::Key(_)).then(|| live.reader());
    SessionConfig {
        identity,
        signer,
        transport: hub.transport,
        gateway_host: hub.gateway_host.clone(),
        tls: crate::hub::tls::client_config(hub.ca_file.as_ref()),
        sas_ttl: hub.sas_ttl,
        keep_alive: hub.keep_alive,
        backoff: hub.backoff,
        refused_backoff: hub.refused_backoff,
        twin_timeout: TWIN_TIMEOUT,
        proxy: hub.proxy.clone(),
        reread,
    }
}

/// Reads `state.json`; a corrupt or foreign one is moved aside and defaults are used.
async fn load_state(
    settings: &Settings,
    device_id: &str,
    module_id: &str,
) -> Result<RuntimeState, AppError> {
    let dir = settings.state.dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| AppError::StateDir {
        dir: dir.clone(),
        source,
    })?;
    let path = settings.state.state_file();
    let defaults = RuntimeState::from_defaults(&settings.twin.schema);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(
                edgetwin_event = "state_new",
                "no state file yet; starting from defaults"
            );
            return Ok(defaults);
        }
        Err(source) => return Err(AppError::StateDir { dir, source }),
    };
    match StateFile::parse(&bytes, device_id, module_id) {
        Ok(file) => Ok(file.into_state()),
        Err(problem) => {
            let aside = move_aside(&path).map_err(|source| AppError::StateDir {
                dir: dir.clone(),
                source,
            })?;
            tracing::error!(
                edgetwin_event = "state_corrupt",
                problem = %problem,
                moved_to = %aside.display(),
                "state file not trusted; moved aside, starting from defaults"
            );
            Ok(defaults)
        }
    }
}

fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let secs = crate::identity::clock::unix_now();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{secs}"));
    let aside = path.with_file_name(name);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}
