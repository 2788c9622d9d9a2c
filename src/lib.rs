//! edgetwin: a module-side daemon that keeps an Azure IoT Hub module twin applied to a
//! Linux gateway. The IoT Hub emulator it is tested and demonstrated against is the
//! separate crate `edgetwin-sim` (`sim/`): nothing of it ships in this one.
//!
//! # Layout
//! - [`identity`]: connection strings and SAS tokens (signing, parsing, verification).
//! - [`aziot`]: the module identity and SAS signatures from the Azure IoT Identity
//!   Service (identityd, keyd) on IoT Edge hosts, over their Unix sockets.
//! - [`twin`]: the pure twin-synchronisation core (no I/O, no clock): apply desired
//!   state, version rules, acknowledgements.
//! - [`config`]: figment layers → validated `Settings`, every problem reported at once.
//! - [`store`]: atomic, durable file writes.
//! - [`hub`]: the daemon's MQTT session to IoT Hub (one task owns the event loop).
//! - [`systemd`]: sd_notify READY/STATUS/RELOADING/STOPPING and the progress-gated watchdog.
//! - [`app`]: the supervisor; `app::run(settings, shutdown)` is the daemon's one entry point.
//! - [`logging`]: tracing to journald or stderr, reloadable level.
//! - [`memory`]: free heap pages back to the kernel after a burst.
//! - [`agent`]: sole owner of the runtime state: applies, persists, acknowledges,
//!   telemetry, direct methods, change hook.
//! - [`registry`]: the service REST client (registry, twins, methods, queries,
//!   configurations).
//! - [`fleet`]: rollouts to many gateways as IoT Hub module configurations, their status
//!   from twin queries, within the hub's quotas.
//! - [`provision`]: create/fetch the device and module identities, store `module.connstr`
//!   (typed errors, no printing).
//! - [`cli`]: the command line: clap definitions, the commands (`run`, `check-config`,
//!   `provision`, `twin show`/`twin set`), the only code that prints or maps errors to
//!   sysexits codes.

pub mod agent;
pub mod app;
pub mod aziot;
pub mod cli;
pub mod config;
pub mod fleet;
pub mod hub;
pub mod identity;
pub mod logging;
pub mod memory;
pub mod provision;
pub mod registry;
pub mod store;
pub mod systemd;
pub mod twin;
