//! The daemon's MQTT session to IoT Hub as a module identity.
//!
//! - [`session`]: the task that owns the rumqttc event loop; [`session::HubEvent`] out,
//!   [`session::HubCommand`] in, connection state on a `watch`.
//! - [`options`]: CONNECT identity, target, TLS/WebSocket transport and proxy.
//! - [`topics`]: `$iothub` topics formatted and parsed.
//! - [`twin_requests`]: `$rid` correlation, timeouts and retries of twin requests.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`tls`]: trust anchors for the hub's certificate (system roots plus `ca_file`).

pub mod backoff;
pub mod options;
pub mod session;
pub mod tls;
pub mod topics;
pub mod twin_requests;
