//! Who signs the session's SAS tokens: the module key of a connection string, here in
//! memory, or aziot-keyd on an IoT Edge host (the key never leaves it; PROTOCOL §13.4).
//!
//! The session asks [`Signer::password`] before every connect, renewal included. With
//! aziot that is also when identityd is asked who edgetwin is, so a module deleted and
//! re-created in the hub (a new generation, a new key handle) is followed at the next
//! connect, and identityd is never polled otherwise. The token goes into the MQTT
//! options only, never into a log.

use crate::aziot::{AziotClient, AziotError};
use crate::identity::{token, ModuleIdentity, SharedKey};

/// How tokens for the session's module are signed.
#[derive(Clone)]
pub enum Signer {
    /// The connection string's module key.
    Key(SharedKey),
    /// aziot-keyd, with the key handle aziot-identityd names at each connect.
    Aziot(AziotClient),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Key(_) => f.write_str("Signer::Key(<redacted>)"),
            Signer::Aziot(client) => f.debug_tuple("Signer::Aziot").field(client).finish(),
        }
    }
}

/// Why no token could be signed for a connect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Aziot(#[from] AziotError),
    /// The state, the MQTT client id and the target belong to one identity; following
    /// another one takes a restart.
    #[error("aziot-identityd now names the module {now}, not {was}: restart edgetwin to use it")]
    IdentityChanged { was: String, now: String },
}

/// A token, and the module's generation when the signer knows it (aziot).
#[derive(Debug)]
pub struct Signed {
    pub password: String,
    pub generation: Option<String>,
}

impl Signer {
    /// A SAS token for `identity` that expires at `expiry` (Unix seconds).
    pub async fn password(
        &self,
        identity: &ModuleIdentity,
        expiry: u64,
    ) -> Result<Signed, SignError> {
        match self {
            Signer::Key(key) => Ok(Signed {
                password: token(key, &identity.resource_uri(), expiry, None),
                generation: None,
            }),
            Signer::Aziot(client) => {
                let now = client.identity().await?;
                if now.identity != *identity {
                    return Err(SignError::IdentityChanged {
                        was: describe(identity),
                        now: describe(&now.identity),
                    });
                }
                let password = client.sas_token(&now, expiry).await?;
                Ok(Signed {
                    password,
                    generation: now.gen_id,
                })
            }
        }
    }
}

fn describe(identity: &ModuleIdentity) -> String {
    let mut text = identity.resource_uri();
    if let Some(gateway) = &identity.gateway_host_name {
        text.push_str(" via ");
        text.push_str(gateway);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::clock::SkewedClock;
    use crate::identity::{ModuleCredentials, SasToken};
    use std::time::Duration;

    const MODULE: &str = "HostName=h.example;DeviceId=d1;ModuleId=m1;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[tokio::test]
    async fn a_module_key_signs_a_token_the_hub_verifies_for_the_module() {
        let creds: ModuleCredentials = MODULE.parse().unwrap();
        let expiry = SkewedClock::system(0).expiry(Duration::from_secs(3600));
        let signed = Signer::Key(creds.key.clone())
            .password(&creds.identity(), expiry)
            .await
            .unwrap();
        let parsed = SasToken::parse(&signed.password).unwrap();
        assert_eq!(parsed.expiry, expiry);
        assert_eq!(parsed.resource, creds.resource_uri());
        parsed.verify(&creds.key, expiry - 10).unwrap();
        assert_eq!(signed.generation, None);
        assert_eq!(signed.password, creds.sas_token(expiry));
    }

    #[test]
    fn the_key_is_not_in_the_debug_output() {
        let creds: ModuleCredentials = MODULE.parse().unwrap();
        let shown = format!("{:?}", Signer::Key(creds.key));
        assert!(!shown.contains("AAEC"), "{shown}");
    }
}
