//! The IoT Hub emulator behind `edgetwin sim`, also used as a library by the tests, the
//! demo and the benchmarks.
//!
//! Layout:
//! - [`hub`]: the hub itself — registry, module twins, service policies, connected
//!   sessions, pending direct methods, telemetry log, faults. Protocol-agnostic: the
//!   front ends translate wire traffic into calls on [`hub::Hub`].
//! - [`device_side`], [`service_side`]: the hub's operations as a module and as a back
//!   end see them.
//! - [`errors`]: IoT Hub error codes and the two body formats the real hub uses.
//! - [`twin_doc`]: the service-side module twin document (versions, etag, `$metadata`,
//!   limits).
//! - [`persist`]: the durable on-disk form of the registry and twins.
//! - [`tls`]: the emulator's CA and server certificate.
//! - [`mqtt`]: MQTT 3.1.1 server (TLS and WebSocket transports) for module clients.
//! - [`rest`]: HTTPS service REST API and the WebSocket upgrade endpoint.
//! - [`server`]: [`Sim`], which binds the listeners and owns their tasks.
//!
//! The emulator never talks to anything but its own listeners and its state directory.

pub mod device_side;
pub mod errors;
pub mod hub;
pub mod mqtt;
pub mod persist;
pub mod rest;
pub mod server;
pub mod service_side;
pub mod tls;
pub mod topics;
pub mod twin_doc;
pub mod websocket;

pub use errors::HubError;
pub use hub::{Faults, Hub, SimEvent};
pub use server::{Sim, SimConfig};
