//! Who signs a registry request, and what the token it mints may touch (PROTOCOL §2.6,
//! §11.2): a shared access policy's token is scoped to the whole hub (`skn` = the policy),
//! a device's token to `{hub}/devices/{deviceId}`, which the hub accepts for that
//! device's own modules only. A fresh token is minted per request; none is kept or logged.

use crate::identity::{token, DeviceCredentials, ServiceCredentials};

/// The credential a [`super::RegistryClient`] signs with. `Debug` redacts the keys (the
/// credentials types do).
#[derive(Debug, Clone)]
pub enum RegistryAuth {
    /// A shared access policy: every device of the hub, within the policy's rights.
    Service(ServiceCredentials),
    /// A device's own key: that device's modules only (create, read, set keys, delete).
    Device(DeviceCredentials),
}

impl RegistryAuth {
    /// `host[:port]` the requests go to: the host name of the connection string (which
    /// may carry a port, as the emulator's do), or a device's `GatewayHostName`.
    pub fn endpoint(&self) -> &str {
        match self {
            RegistryAuth::Service(c) => &c.host_name,
            RegistryAuth::Device(c) => c.connect_host(),
        }
    }

    /// The hub's host name as the connection string gives it (may carry a port).
    pub fn host_name(&self) -> &str {
        match self {
            RegistryAuth::Service(c) => &c.host_name,
            RegistryAuth::Device(c) => &c.host_name,
        }
    }

    /// `SharedAccessSignature ...` valid until `expiry` (Unix seconds).
    pub fn token(&self, expiry: u64) -> String {
        match self {
            RegistryAuth::Service(c) => c.sas_token(expiry),
            // The real hub's names carry no port; the emulator's service strings do, and
            // a device-scoped audience is the hub's name, not where it listens.
            RegistryAuth::Device(c) => {
                let audience = format!("{}/devices/{}", hub_host_name(&c.host_name), c.device_id);
                token(&c.key, &audience, expiry, None)
            }
        }
    }
}

/// The hub's host name without a port: what module credentials and device-scoped
/// audiences carry (service connection strings for the emulator name `localhost:PORT`).
pub fn hub_host_name(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SasToken;

    #[test]
    fn host_name_loses_only_a_port() {
        assert_eq!(hub_host_name("localhost:8443"), "localhost");
        assert_eq!(
            hub_host_name("hub.azure-devices.net"),
            "hub.azure-devices.net"
        );
        assert_eq!(hub_host_name("[::1]:8443"), "[::1]");
    }

    #[test]
    fn a_device_token_is_scoped_to_the_device_without_policy_or_port() {
        let device: DeviceCredentials =
            "HostName=localhost:8443;DeviceId=gw1;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
                .parse()
                .unwrap();
        let key = device.key.clone();
        let auth = RegistryAuth::Device(device);
        assert_eq!(auth.endpoint(), "localhost:8443");
        let token = SasToken::parse(&auth.token(1_700_000_000)).unwrap();
        assert_eq!(token.resource, "localhost/devices/gw1");
        assert_eq!(token.key_name, None);
        assert_eq!(token.verify(&key, 1_600_000_000), Ok(()));
    }
}
