//! Device-scoped SAS on the registry REST API (PROTOCOL §11.2): a token signed with a
//! device's key, `sr` = `{hub}/devices/{deviceId}` and no `skn`, as the Azure IoT
//! Identity Service sends it, lets that device manage its own modules — PUT, GET and
//! DELETE `/devices/{d}/modules/{m}` and GET `/devices/{d}/modules` — and nothing else:
//! another device's modules, the device itself, twins and methods all answer 401.
//!
//! The audience is compared without regard to case (identityd lower-cases it) and may
//! name the hub or the REST listener's `host:port`, as service tokens may. Expiry is
//! judged by the hub's clock (the clock-offset fault included). A device that is
//! disabled or unknown cannot sign anything.

use edgetwin::identity::{SasError, SasToken, SharedKey};

use super::errors::HubError;
use super::hub::{hub_unix_now, lock, Hub, Right};

impl Hub {
    /// Authorises a request on `/devices/{device_id}/modules[/...]`: a policy token with
    /// the right `needs`, or a device-scoped token of `device_id` itself.
    pub fn authorize_module_request(
        &self,
        authorization: Option<&str>,
        needs: Right,
        device_id: &str,
    ) -> Result<(), HubError> {
        let token = authorization.and_then(|h| SasToken::parse(h.trim()).ok());
        match token {
            Some(token) if token.key_name.is_none() => self.authorize_device(&token, device_id),
            _ => self.authorize(authorization, needs),
        }
    }

    /// The device a token without `skn` is scoped to: `{hub}/devices/{id}` exactly (a
    /// module's token, `.../modules/{m}`, is no registry credential). The hub may be
    /// named by its name or by the REST listener's `host:port`.
    pub(super) fn token_device<'a>(&self, token: &'a SasToken) -> Option<&'a str> {
        let authority = lock(&self.inner.rest_authority).clone();
        [Some(self.hub_name().to_owned()), authority]
            .into_iter()
            .flatten()
            .find_map(|hub| {
                let rest = strip_prefix_ignore_case(&token.resource, &hub)?;
                let id = strip_prefix_ignore_case(rest, "/devices/")?;
                (!id.is_empty() && !id.contains('/')).then_some(id)
            })
    }

    fn authorize_device(&self, token: &SasToken, device_id: &str) -> Result<(), HubError> {
        let scoped = self.token_device(token).ok_or_else(|| {
            HubError::unauthorized(format!(
                "token audience '{}' is neither a policy's nor a device's of this hub",
                token.resource
            ))
        })?;
        if !scoped.eq_ignore_ascii_case(device_id) {
            return Err(HubError::unauthorized(format!(
                "a token of device '{scoped}' may manage only that device's modules, not \
                 device '{device_id}''s"
            )));
        }
        let st = self.state();
        let device = st
            .data
            .devices
            .get(device_id)
            .ok_or_else(|| HubError::unauthorized(format!("no device '{device_id}'")))?;
        if !device.enabled {
            return Err(HubError::unauthorized(format!(
                "device '{device_id}' is disabled"
            )));
        }
        let now = hub_unix_now(st.faults.clock_offset_secs);
        // A genuine but expired token says more than a mismatch with the other key.
        let mut outcome = Err(SasError::BadSignature);
        for key in [&device.primary_key, &device.secondary_key] {
            if let Ok(key) = SharedKey::from_base64(key) {
                outcome = token.verify(&key, now);
                if outcome.is_ok() || matches!(outcome, Err(SasError::Expired { .. })) {
                    break;
                }
            }
        }
        match outcome {
            Ok(()) => Ok(()),
            Err(SasError::Expired { expired_for_secs }) => Err(HubError::new(
                401,
                401003,
                "IotHubUnauthorized",
                format!(
                    "token expired {expired_for_secs} s ago; check the client's clock against \
                     this response's Date"
                ),
            )),
            Err(_) => Err(HubError::unauthorized(format!(
                "signature does not match the keys of device '{device_id}'"
            ))),
        }
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}
