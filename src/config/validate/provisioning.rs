//! `[provisioning]` and `[provisioning.dps]` → [`ProvisioningSettings`] (DESIGN §4).
//!
//! Which method is in force (the deprecated `enabled = true` still means `service`, with
//! a warning), where each secret comes from, and which ids are known before provisioning.
//! A method's secret is required only while provisioning is due (no module credential
//! yet): afterwards it may be gone, and that is a warning, not a problem. Secret files
//! are not read here (see the `config` module documentation); inline secrets are parsed.

use std::str::FromStr;

use super::super::credentials::{self, CredentialSource};
use super::super::raw::{RawDps, RawProvisioning};
use super::super::{DpsKeyKind, DpsSettings, ProvisioningMethod, ProvisioningSettings};
use super::{check_identity_name, hostname, inline_credential, non_empty, Check};
use crate::hub::options::HostPort;
use crate::identity::{ConnectionStringError, DeviceCredentials, ServiceCredentials};
use crate::provision::dps;

/// The method in force, from `method` and the deprecated `enabled`.
pub(super) fn method(check: &mut Check, p: &RawProvisioning) -> ProvisioningMethod {
    const ENABLED: &str = "provisioning.enabled";
    use ProvisioningMethod::{None as Off, Service};
    match (p.method, p.enabled) {
        (method, None) => method.unwrap_or_default(),
        (None | Some(Service), Some(true)) => {
            check.warn(
                ENABLED,
                "deprecated: write provisioning.method = \"service\" instead of enabled = true \
                 (and consider \"device\", which needs no key to the whole hub)",
            );
            Service
        }
        (Some(method), Some(true)) => {
            check.fail(
                ENABLED,
                format!(
                    "enabled = true (deprecated) means method = \"service\", which contradicts \
                     provisioning.method = \"{}\"; remove provisioning.enabled",
                    method.as_str()
                ),
            );
            method
        }
        (method, Some(false)) => {
            let method = method.unwrap_or(Off);
            check.warn(
                ENABLED,
                format!(
                    "deprecated and ignored: provisioning.method (\"{}\") says how to provision",
                    method.as_str()
                ),
            );
            method
        }
    }
}

pub(super) fn provisioning(
    check: &mut Check,
    p: &RawProvisioning,
    method: ProvisioningMethod,
    due: bool,
) -> ProvisioningSettings {
    let service = source::<ServiceCredentials>(
        check,
        (
            "provisioning.service_connection_string",
            &p.service_connection_string,
        ),
        (
            "provisioning.service_connection_string_file",
            &p.service_connection_string_file,
        ),
        credentials::SYSTEMD_SERVICE_CREDENTIAL,
        due && method == ProvisioningMethod::Service,
        credentials::service_key,
    );
    let device = source::<DeviceCredentials>(
        check,
        (
            "provisioning.device_connection_string",
            &p.device_connection_string,
        ),
        (
            "provisioning.device_connection_string_file",
            &p.device_connection_string_file,
        ),
        credentials::SYSTEMD_DEVICE_CREDENTIAL,
        due && method == ProvisioningMethod::Device,
        credentials::device_key,
    );
    let dps = dps(check, &p.dps, method);
    match method {
        ProvisioningMethod::None => {}
        ProvisioningMethod::Service => secret_presence(check, method, &service, due),
        ProvisioningMethod::Device => secret_presence(check, method, &device, due),
        ProvisioningMethod::Dps => secret_presence(check, method, &dps.1, due),
    }

    let configured = non_empty(&p.device_id).map(str::to_owned);
    let device_id = match method {
        ProvisioningMethod::Service => {
            let id = configured.or_else(hostname);
            if id.is_none() {
                check.fail(
                    "provisioning.device_id",
                    "not set, and the hostname could not be read",
                );
            }
            id
        }
        _ => configured,
    };
    let module_id = p.module_id.trim().to_owned();
    if method != ProvisioningMethod::None && module_id.is_empty() {
        check.fail(
            "provisioning.module_id",
            "must be set when a provisioning method is chosen",
        );
    }
    for (key, id) in [
        ("provisioning.device_id", device_id.as_deref().unwrap_or("")),
        ("provisioning.module_id", &module_id),
    ] {
        if let Err(e) = check_identity_name(id) {
            check.fail(key, e);
        }
    }
    let registry_endpoint = non_empty(&p.registry_endpoint).and_then(|text| {
        HostPort::parse(text, 443)
            .map_err(|e| check.fail("provisioning.registry_endpoint", e.to_string()))
            .ok()
    });
    ProvisioningSettings {
        method,
        service_credentials: service.source,
        device_credentials: device.source,
        device_id,
        module_id,
        registry_endpoint,
        dps: dps.0,
    }
}

/// Where one secret comes from, and whether choosing it already went wrong (both an
/// inline value and a file set), so that "not configured" is not said on top.
struct Chosen<T> {
    source: Option<T>,
    ambiguous: bool,
}

/// A connection string secret: inline, file or systemd credential. An inline one is
/// parsed (as `T`) when it is about to be used.
fn source<T: FromStr<Err = ConnectionStringError>>(
    check: &mut Check,
    inline: (&str, &str),
    file: (&str, &str),
    systemd_name: &str,
    in_use: bool,
    key_of: fn(&CredentialSource) -> &'static str,
) -> Chosen<CredentialSource> {
    let before = check.errors.len();
    let layers = check.layers;
    let source = credentials::choose(
        inline,
        file,
        systemd_name,
        |k| layers.origin(k),
        check.errors,
    );
    let ambiguous = check.errors.len() > before;
    if in_use {
        if let Some(source) = &source {
            inline_credential::<T>(check, source, key_of(source));
        }
    }
    Chosen { source, ambiguous }
}

/// The chosen method's secret: required while provisioning is due; once the module
/// credential exists its absence is only worth a warning (it is not read any more).
fn secret_presence<T: SecretPath>(
    check: &mut Check,
    method: ProvisioningMethod,
    chosen: &Chosen<T>,
    due: bool,
) {
    if chosen.ambiguous {
        return;
    }
    let (key, message) = credentials::missing_secret(method);
    match &chosen.source {
        None if due => check.fail(key, message),
        None => check.warn(
            key,
            format!(
                "provisioning method \"{}\" is chosen but its secret is not configured; not \
                 needed, as the module credential exists (set method = \"none\" to say so)",
                method.as_str()
            ),
        ),
        Some(source) if !due => {
            if let Some(path) = source.path().filter(|p| !p.exists()) {
                check.warn(
                    key,
                    format!(
                        "{} does not exist; not needed, as the module credential exists",
                        path.display()
                    ),
                );
            }
        }
        Some(_) => {}
    }
}

/// What [`secret_presence`] needs of a source: the file it names, if any.
trait SecretPath {
    fn path(&self) -> Option<&std::path::Path>;
}

impl SecretPath for CredentialSource {
    fn path(&self) -> Option<&std::path::Path> {
        CredentialSource::path(self)
    }
}

impl SecretPath for (DpsKeyKind, CredentialSource) {
    fn path(&self) -> Option<&std::path::Path> {
        self.1.path()
    }
}

/// `[provisioning.dps]`; its values are checked only when `dps` is the method.
fn dps(
    check: &mut Check,
    d: &RawDps,
    method: ProvisioningMethod,
) -> (DpsSettings, Chosen<(DpsKeyKind, CredentialSource)>) {
    let in_use = method == ProvisioningMethod::Dps;
    let global_endpoint = d.global_endpoint.trim().to_owned();
    let id_scope = d.id_scope.trim().to_owned();
    let registration_id = non_empty(&d.registration_id)
        .map(str::to_owned)
        .or_else(hostname)
        .unwrap_or_default();
    if in_use {
        // The DPS client picks the port of its transport; the name must be usable.
        if let Err(e) = HostPort::parse(&global_endpoint, 443) {
            check.fail("provisioning.dps.global_endpoint", e.to_string());
        }
        if id_scope.is_empty() {
            check.fail(
                "provisioning.dps.id_scope",
                "must be set when provisioning.method = \"dps\"",
            );
        } else if let Err(e) = dps::check_id_scope(&id_scope) {
            check.fail("provisioning.dps.id_scope", e);
        }
        if registration_id.is_empty() {
            check.fail(
                "provisioning.dps.registration_id",
                "not set, and the hostname could not be read",
            );
        } else if let Err(e) = dps::check_registration_id(&registration_id) {
            check.fail("provisioning.dps.registration_id", e);
        }
    }
    let before = check.errors.len();
    let key = match (
        non_empty(&d.symmetric_key_file),
        non_empty(&d.group_key_file),
    ) {
        (Some(_), Some(_)) => {
            check.fail(
                "provisioning.dps.symmetric_key_file",
                "set either provisioning.dps.symmetric_key_file (individual enrollment) or \
                 provisioning.dps.group_key_file (enrollment group), not both",
            );
            None
        }
        (Some(file), None) => Some((DpsKeyKind::Individual, CredentialSource::File(file.into()))),
        (None, Some(file)) => Some((DpsKeyKind::Group, CredentialSource::File(file.into()))),
        (None, None) => credentials::systemd_credential(credentials::SYSTEMD_DPS_SYMMETRIC_KEY)
            .map(|p| {
                (
                    DpsKeyKind::Individual,
                    CredentialSource::SystemdCredential(p),
                )
            })
            .or_else(|| {
                credentials::systemd_credential(credentials::SYSTEMD_DPS_GROUP_KEY)
                    .map(|p| (DpsKeyKind::Group, CredentialSource::SystemdCredential(p)))
            }),
    };
    let chosen = Chosen {
        source: key.clone(),
        ambiguous: check.errors.len() > before,
    };
    let settings = DpsSettings {
        global_endpoint,
        id_scope,
        registration_id,
        key,
    };
    (settings, chosen)
}
