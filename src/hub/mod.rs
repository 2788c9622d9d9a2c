//! The daemon's MQTT session to IoT Hub as a module identity.
//!
//! - [`tls`]: trust anchors for the hub's certificate (system roots plus `ca_file`).

pub mod tls;
