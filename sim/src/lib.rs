//! edgetwin-sim: a local Azure IoT Hub emulator that Microsoft's SDKs accept unchanged
//! (apart from the connection string and trusting its CA). The binary `edgetwin-sim`
//! serves it (`serve`) and runs the tutorial end to end against it (`demo`); the daemon's
//! integration tests and benchmarks use it as a library.
//!
//! Layout:
//! - [`hub`]: the hub itself — registry, module twins, service policies, connected
//!   sessions, pending direct methods, telemetry log, faults. Protocol-agnostic: the
//!   front ends translate wire traffic into calls on [`hub::Hub`].
//! - [`device_side`], [`service_side`]: the hub's operations as a module and as a back
//!   end see them; [`device_auth`]: device-scoped tokens on the registry REST API.
//! - [`events`]: waiting for a [`SimEvent`] with a timeout ([`wait_for`]).
//! - [`errors`]: IoT Hub error codes and the two body formats the real hub uses.
//! - [`twin_doc`]: the service-side module twin document (versions, etag, `$metadata`,
//!   limits).
//! - [`persist`]: the durable on-disk form of the registry and twins, and the order of
//!   its writes.
//! - [`configurations`]: automatic module configurations (CRUD, validation) and their
//!   evaluation onto twins (priority, statuses, metrics).
//! - [`query`]: the IoT Hub query language (parser and evaluator, pure).
//! - [`dps`]: the Device Provisioning Service: enrollments, registrations, the DPS REST
//!   API; its MQTT side is in [`mqtt`].
//! - [`aziot`]: aziot-identityd and aziot-keyd of an IoT Edge host, on Unix sockets, for
//!   one module of the registry.
//! - [`twin_query`]: the twin query service (`POST /devices/query`) with paging.
//! - [`tls`]: the emulator's CA and server certificate.
//! - [`mqtt`]: MQTT 3.1.1 server (TLS and WebSocket transports) for module clients.
//! - [`rest`]: HTTPS service REST API; it mounts [`websocket`], the MQTT-over-WebSocket
//!   bridge, on its router.
//! - [`server`]: [`Sim`], which binds the listeners and owns their tasks; [`wire`]
//!   counts each connection's bytes beneath TLS and whether its handshake resumed.
//! - [`throttle`]: the tier's published rates as token buckets (`--tier`, `--units`).
//! - [`demo`]: the tutorial end to end: emulator, registry REST and the real daemon.
//! - [`testing`]: helpers for tests against the emulator (an MQTT test client, event
//!   waits with a timeout instead of sleeps, a scripted HTTPS server).
//!
//! The emulator never talks to anything but its own listeners and its state directory.

pub mod aziot;
pub mod configurations;
pub mod demo;
pub mod device_auth;
pub mod device_side;
pub mod dps;
pub mod errors;
pub mod events;
pub mod hub;
pub mod mqtt;
pub mod persist;
pub mod query;
pub mod rest;
pub mod server;
pub mod service_side;
pub mod testing;
pub mod throttle;
pub mod tls;
pub mod topics;
pub mod twin_doc;
pub mod twin_query;
pub mod websocket;
pub mod wire;

pub use dps::Dps;
pub use errors::HubError;
pub use events::{wait_for, wait_pick, WaitError};
pub use hub::{Faults, Hub, SimEvent};
pub use server::{Sim, SimConfig};
pub use throttle::{Admission, Tier};
