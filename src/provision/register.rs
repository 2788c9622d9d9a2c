//! `method = "dps"`: this gateway's device identity comes from the Device Provisioning
//! Service, then its module is provisioned exactly as `device` does.
//!
//! The enrollment key is read once, when the plan is made (sync, no network); the
//! registration happens in the async run: `<state.dir>/provisioning.json` is used when it
//! answers the configured scope and registration id (a reboot does not register again),
//! else DPS is asked and its assignment recorded (no key in the record). The device key
//! (individual, or derived from the group key) with the assigned hub and device id is the
//! device credential handed to [`Plan::for_device`].

use std::path::PathBuf;

use super::dps::{self, DpsClient, DpsError, DpsRequest, EnrollmentKey};
use super::{Plan, ProvisionError, Provisioned};
use crate::config::{DpsKeyKind, ProvisioningMethod, Settings};
use crate::hub::options::HostPort;
use crate::hub::tls::CaBundle;

/// What a `dps` plan keeps until it runs: the request (its key included), the client,
/// and what [`Plan::for_device`] needs afterwards.
#[derive(Debug)]
pub(super) struct Registration {
    request: DpsRequest,
    client: DpsClient,
    settings: Box<Settings>,
    ca_file: Option<PathBuf>,
}

impl Registration {
    pub(super) fn from_settings(
        settings: &Settings,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Registration, ProvisionError> {
        let d = &settings.provisioning.dps;
        let (kind, key) = settings
            .required_dps_key()
            .map_err(|e| ProvisionError::config(e.to_string()))?;
        let key = match kind {
            DpsKeyKind::Individual => EnrollmentKey::Individual(key),
            DpsKeyKind::Group => EnrollmentKey::Group(key),
        };
        let global_endpoint =
            HostPort::parse(&d.global_endpoint, dps::DEFAULT_PORT).map_err(|e| {
                ProvisionError::config(format!("provisioning.dps.global_endpoint: {e}"))
            })?;
        let request = DpsRequest {
            global_endpoint,
            id_scope: d.id_scope.clone(),
            registration_id: d.registration_id.clone(),
            key: key.device_key(&d.registration_id),
        };
        request.validate()?;
        let ca = match ca_file {
            Some(path) => Some(
                CaBundle::read(path)
                    .map_err(|e| ProvisionError::config(format!("{}: {e}", path.display())))?,
            ),
            None => settings.hub.ca_file.clone(),
        };
        let client = DpsClient::new(ca.as_ref())?;
        // The assigned device is DPS's choice; a configured device_id cannot override it
        // (the device key may manage that device's modules only).
        let mut settings = Box::new(settings.clone());
        settings.provisioning.device_id = None;
        Ok(Registration {
            request,
            client,
            settings,
            ca_file: ca_file.map(PathBuf::from),
        })
    }

    /// The device this plan expects before it ran: the recorded one, else the
    /// registration id (DPS's usual device id).
    pub(super) fn expected(&self) -> (String, String) {
        match self.record() {
            Ok(Some(r)) => (
                super::hub_host_name(&r.assigned_hub).to_owned(),
                r.device_id,
            ),
            _ => (
                self.request.global_endpoint.host.clone(),
                self.request.registration_id.clone(),
            ),
        }
    }

    fn record(&self) -> Result<Option<dps::ProvisioningRecord>, DpsError> {
        let path = dps::record_path(&self.settings.state.dir);
        Ok(dps::load(&path)?.filter(|r| r.matches(&self.request)))
    }

    pub(super) async fn run(&self) -> Result<Provisioned, ProvisionError> {
        let path = dps::record_path(&self.settings.state.dir);
        let recorded = match self.record() {
            Ok(r) => r,
            // Not a record of ours: registering again replaces it.
            Err(DpsError::Record { reason, .. }) => {
                tracing::warn!(
                    edgetwin_event = "dps_record_replaced",
                    problem = %reason,
                    path = %path.display(),
                    "provisioning.json unusable; registering again"
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        let assignment = match recorded {
            Some(record) => record.assignment(),
            None => {
                let assignment = self.client.register(&self.request).await?;
                std::fs::create_dir_all(&self.settings.state.dir).map_err(|source| {
                    ProvisionError::StateDir {
                        path: self.settings.state.dir.clone(),
                        source,
                    }
                })?;
                dps::save(
                    &path,
                    &dps::ProvisioningRecord::new(&self.request, &assignment),
                )?;
                tracing::info!(
                    edgetwin_event = "dps_registered",
                    registration = %self.request.registration_id,
                    hub = %assignment.assigned_hub,
                    device = %assignment.device_id,
                    "DPS assigned this gateway a hub and a device"
                );
                assignment
            }
        };
        let credentials = assignment.device_credentials(self.request.key.clone());
        let plan = Plan::for_device(
            &self.settings,
            ProvisioningMethod::Dps,
            credentials,
            self.ca_file.as_deref(),
        )?;
        Box::pin(plan.run()).await
    }
}
