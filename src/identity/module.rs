//! [`ModuleIdentity`]: who a module is to the hub, without the means to sign for it.
//!
//! The MQTT session needs the names (client id, user name, `sr`, where to connect) from
//! whichever source holds them: a module connection string, whose key signs here, or the
//! Azure IoT Identity Service, whose key never leaves aziot-keyd. Keeping the names apart
//! from the key lets both sources feed the same session.

use super::ModuleCredentials;

/// A module identity as the hub knows it. No secret: safe to log and to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleIdentity {
    /// The hub (`sr` and the MQTT user name always name it, even through a gateway).
    pub host_name: String,
    pub device_id: String,
    pub module_id: String,
    /// The TCP/TLS target when it is not the hub: a parent gateway.
    pub gateway_host_name: Option<String>,
}

impl ModuleIdentity {
    /// `{host}/devices/{deviceId}/modules/{moduleId}` (unencoded), what a token grants.
    pub fn resource_uri(&self) -> String {
        format!(
            "{}/devices/{}/modules/{}",
            self.host_name, self.device_id, self.module_id
        )
    }

    /// Where to open the TCP/TLS connection: the gateway if set, else the hub.
    pub fn connect_host(&self) -> &str {
        self.gateway_host_name.as_deref().unwrap_or(&self.host_name)
    }
}

impl ModuleCredentials {
    /// The names of this credential, without its key.
    pub fn identity(&self) -> ModuleIdentity {
        ModuleIdentity {
            host_name: self.host_name.clone(),
            device_id: self.device_id.clone(),
            module_id: self.module_id.clone(),
            gateway_host_name: self.gateway_host_name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_names_the_same_resource_and_target_as_its_identity() {
        let creds: ModuleCredentials =
            "HostName=h.example;DeviceId=d;ModuleId=m;SharedAccessKey=AAECAwQ=;GatewayHostName=gw"
                .parse()
                .unwrap();
        let identity = creds.identity();
        assert_eq!(identity.resource_uri(), creds.resource_uri());
        assert_eq!(identity.connect_host(), "gw");
        assert_eq!(identity.host_name, "h.example");
    }
}
