//! The module credential while the daemon runs: where it is read from (which a reload
//! may change) and how a new one reaches the session, so that a gateway whose credential
//! was refused recovers as soon as the credential is fixed, without a restart.
//!
//! Two ways in: the session reads the credential again from its source before each
//! connect after a refusal ([`LiveCredential::reader`]), and a reload (SIGHUP) reads it at
//! once and hands it over ([`LiveCredential::reloaded`]). Never logs the credential.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::config::credentials::module_key;
use crate::config::{CredentialSource, Settings};
use crate::hub::options::ReadCredential;
use crate::identity::ModuleCredentials;

/// The credential's source as of the last reload, and the session's end for new ones.
pub(super) struct LiveCredential {
    source: Arc<Mutex<CredentialSource>>,
    to_session: Option<watch::Sender<Option<ModuleCredentials>>>,
}

impl LiveCredential {
    pub(super) fn new(source: CredentialSource) -> Self {
        LiveCredential {
            source: Arc::new(Mutex::new(source)),
            to_session: None,
        }
    }

    /// Reads the credential from the current source, for the session.
    pub(super) fn reader(&self) -> ReadCredential {
        let source = Arc::clone(&self.source);
        Arc::new(move || read(&lock(&source)))
    }

    /// Where reloads send a credential that differs from the last one.
    pub(super) fn connect(&mut self, to_session: watch::Sender<Option<ModuleCredentials>>) {
        self.to_session = Some(to_session);
    }

    /// A reload: the source is taken from `settings` and read now (a file's content may
    /// have changed while its name did not). An unreadable one keeps the one in use.
    pub(super) fn reloaded(&self, settings: &Settings) {
        let source = settings.hub.credentials.clone();
        *lock(&self.source) = source.clone();
        match read(&source) {
            Ok(new) => self.provisioned(new),
            Err(problem) => tracing::warn!(
                edgetwin_event = "credential_unreadable",
                problem,
                "cannot read the module credential after the reload; keeping the one in use"
            ),
        }
    }
}

impl LiveCredential {
    /// Hands `new` to the session when it differs from the last one handed over (the hook
    /// for re-provisioning after repeated refusals, too: see the TODO in `run_with`).
    pub(super) fn provisioned(&self, new: ModuleCredentials) {
        if let Some(to_session) = &self.to_session {
            to_session.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&new);
                if changed {
                    *current = Some(new);
                }
                changed
            });
        }
    }
}

fn lock(source: &Mutex<CredentialSource>) -> std::sync::MutexGuard<'_, CredentialSource> {
    // The guarded value is replaced whole; a panic elsewhere cannot leave it half-written.
    source.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The credential from `source`; the error names the setting and the file only.
fn read(source: &CredentialSource) -> Result<ModuleCredentials, String> {
    let key = module_key(source);
    source
        .read_as::<ModuleCredentials>(key)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{key}: no module credential there (yet)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=AAECAwQ=";
    const TWO: &str = "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=BQYHCAk=";

    #[test]
    fn the_reader_follows_the_file_as_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("module.connstr");
        std::fs::write(&file, ONE).unwrap();
        let live = LiveCredential::new(CredentialSource::File(file.clone()));
        let reader = live.reader();
        assert_eq!(reader().unwrap(), ONE.parse().unwrap());
        std::fs::write(&file, format!("{TWO}\n")).unwrap();
        assert_eq!(reader().unwrap(), TWO.parse().unwrap());
        std::fs::write(&file, "HostName=h;DeviceId=d").unwrap();
        let e = reader().unwrap_err();
        assert!(e.contains("hub.connection_string_file"), "{e}");
        assert!(!e.contains("HostName"), "{e}");
    }

    #[test]
    fn a_provisioned_file_not_written_yet_is_an_error_not_a_credential() {
        let dir = tempfile::tempdir().unwrap();
        let live = LiveCredential::new(CredentialSource::Provisioned(dir.path().join("x")));
        let e = live.reader()().unwrap_err();
        assert!(e.contains("module.connstr"), "{e}");
    }
}
