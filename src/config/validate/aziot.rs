//! `[aziot]` → the [`AziotClient`] the daemon uses (DESIGN §4): the two sockets, absolute
//! paths, and what `enabled = true` excludes. With aziot the module identity belongs to
//! aziot-identityd, so a module credential in `[hub]` or a `[provisioning]` method would
//! be a second, contradicting answer to "who am I": refused, not silently ignored.

use std::path::Path;

use super::super::credentials::{CredentialSource, SYSTEMD_MODULE_CREDENTIAL};
use super::super::raw::RawAziot;
use super::super::ProvisioningMethod;
use super::{non_empty, Check};
use crate::aziot::AziotClient;

pub(super) fn aziot(
    check: &mut Check,
    raw: &RawAziot,
    hub_credentials: &CredentialSource,
    method: ProvisioningMethod,
) -> Option<AziotClient> {
    if !raw.enabled {
        return None;
    }
    const ENABLED: &str = "aziot.enabled";
    if !matches!(hub_credentials, CredentialSource::Provisioned(_)) {
        check.fail(
            ENABLED,
            format!(
                "the module identity comes from aziot-identityd: remove hub.connection_string, \
                 hub.connection_string_file and the systemd credential {SYSTEMD_MODULE_CREDENTIAL}"
            ),
        );
    }
    if method != ProvisioningMethod::None {
        check.fail(
            ENABLED,
            format!(
                "aziot-identityd provisions the module identity: remove provisioning.method \
                 (\"{}\")",
                method.as_str()
            ),
        );
    }
    let identityd = socket(check, "aziot.identityd_socket", &raw.identityd_socket);
    let keyd = socket(check, "aziot.keyd_socket", &raw.keyd_socket);
    Some(AziotClient::new(identityd, keyd))
}

fn socket(check: &mut Check, key: &str, text: &str) -> String {
    match non_empty(text) {
        Some(path) if Path::new(path).is_absolute() => path.to_owned(),
        Some(_) => {
            check.fail(key, "must be an absolute path");
            text.to_owned()
        }
        None => {
            check.fail(key, "must name the service's Unix socket");
            text.to_owned()
        }
    }
}
