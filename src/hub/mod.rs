//! The daemon's MQTT session to IoT Hub as a module identity.
//!
//! - [`session`]: the task that owns the rumqttc event loop and drives [`connection`];
//!   [`session::HubEvent`] out, [`session::HubCommand`] in, connection state on a `watch`.
//! - [`connection`]: the connection as a pure state machine with an injected clock:
//!   connect, SAS renewal at 80 % of the token's life, backoff, refused credentials (the
//!   clock checked, then a long backoff), graceful stop; it hands the session the actions
//!   to carry out.
//! - [`hub_time`]: the hub's time from the `Date` of one HTTPS answer, after a refusal.
//! - [`options`]: CONNECT identity, target, TLS/WebSocket transport and proxy.
//! - [`signer`]: who signs the SAS tokens (the module key, or aziot-keyd).
//! - [`topics`]: `$iothub` topics formatted and parsed.
//! - [`twin_requests`]: `$rid` correlation, timeouts and retries of twin requests.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`tls`]: trust anchors for the hub's certificate (system roots plus `ca_file`).

pub mod backoff;
pub mod connection;
pub mod hub_time;
pub mod options;
pub mod session;
pub mod signer;
pub mod tls;
pub mod topics;
pub mod twin_requests;
