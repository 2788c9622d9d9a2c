//! What the session does about refused credentials, for the connection machine: reads
//! the hub's time off the event-loop task (one HTTPS request per reading, its result sent
//! back on a channel, a late one told apart by its sequence number), takes a new module
//! credential, from a reload or read again from its source before a connect, and turns a
//! token aziot could not sign into a failed attempt.

use std::ops::ControlFlow;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Core, SignError, Signer};
use crate::hub::connection::Failure;
use crate::hub::hub_time::{HubTimeError, TimeSource};
use crate::identity::clock::{exceeds_tolerance, SkewedClock};
use crate::identity::ModuleCredentials;

/// What one reading of the hub's time found: the seconds the hub is ahead of the signing
/// clock. `seq` tells the reading of the current refusal from a late one.
pub(super) struct ClockReading {
    seq: u64,
    offset: Result<i64, HubTimeError>,
}

/// Reading the hub's time after a refusal, off the event-loop task.
pub(super) struct Clock {
    /// `Err`: the HTTPS client could not be built; every reading fails with this.
    source: Result<TimeSource, String>,
    readings: mpsc::Sender<ClockReading>,
    /// Of the reading asked for last; earlier ones are stale.
    seq: u64,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Clock {
    /// Readings from `source`, each a task of `tasks` abandoned at `stop`; results on
    /// `readings`.
    pub(super) fn new(
        source: Result<TimeSource, String>,
        readings: mpsc::Sender<ClockReading>,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        Clock {
            source,
            readings,
            seq: 0,
            tasks,
            stop,
        }
    }

    /// Spawns one reading; its result comes back on `readings` with the current `seq`.
    pub(super) fn measure(&mut self, skew_secs: i64) {
        self.seq += 1;
        let seq = self.seq;
        let readings = self.readings.clone();
        let stop = self.stop.clone();
        let source = self.source.clone();
        if let Ok(source) = &source {
            tracing::info!(
                edgetwin_event = "clock_check",
                url = source.url(),
                "reading the hub's time to tell a wrong clock from a wrong credential"
            );
        }
        self.tasks.spawn(async move {
            let offset = match source {
                Ok(source) => tokio::select! {
                    _ = stop.cancelled() => return,
                    time = source.read() => {
                        // Compared with the clock the refused token was signed on.
                        time.map(|t| SkewedClock::system(skew_secs).offset_to(t))
                    }
                },
                Err(e) => Err(HubTimeError::Client(e)),
            };
            // The session reads this channel; a full one means it is gone or stale.
            let _ = readings.try_send(ClockReading { seq, offset });
        });
    }
}

impl Core {
    /// A reading of the hub's time came back.
    pub(super) fn clock_reading(&mut self, reading: ClockReading) -> ControlFlow<()> {
        if reading.seq != self.clock.seq {
            return ControlFlow::Continue(());
        }
        let offset = match reading.offset {
            Ok(offset) => {
                if !exceeds_tolerance(offset) {
                    tracing::info!(
                        edgetwin_event = "clock_ok",
                        skew_secs = offset,
                        "the clock agrees with the hub's: the credential itself is refused"
                    );
                }
                Some(offset)
            }
            Err(e) => {
                tracing::warn!(
                    edgetwin_event = "clock_unknown",
                    error = %e,
                    "could not read the hub's time; taking the refusal as the credential's"
                );
                None
            }
        };
        let actions = self.connection.clock_measured(offset, Instant::now());
        self.step(actions, None)
    }

    /// A module credential from a reload or read again from its source. Only a new key
    /// (or other secret) for the same identity is taken live: another hub, device, module
    /// or gateway needs a restart, as the state and the MQTT client id belong to one.
    pub(super) fn adopt(&mut self, new: ModuleCredentials, from: &'static str) -> ControlFlow<()> {
        let Signer::Key(key) = &self.signer else {
            // aziot-identityd alone says who this module is; it is asked at each connect.
            return ControlFlow::Continue(());
        };
        let same_identity = new.identity() == self.identity;
        if same_identity && new.key == *key {
            return ControlFlow::Continue(());
        }
        if !same_identity {
            tracing::warn!(
                edgetwin_event = "credential_ignored",
                from,
                "the module credential now names another hub, gateway, device or module; \
                 restart edgetwin to use it"
            );
            return ControlFlow::Continue(());
        }
        tracing::info!(
            edgetwin_event = "credential_changed",
            from,
            "new module credential; signing with it from the next connect"
        );
        self.signer = Signer::Key(new.key);
        let actions = self.connection.credentials_changed();
        self.step(actions, None)
    }

    /// No token could be signed (aziot-identityd or aziot-keyd failed or said no): a
    /// failed connect attempt, retried with the reconnect backoff. It is never a reason
    /// to exit: a principal file written, a group joined or a service restarted is picked
    /// up at a later attempt, as a fixed credential is. Logged once per attempt.
    pub(super) fn unsigned(&mut self, error: &SignError) -> ControlFlow<()> {
        tracing::error!(
            edgetwin_event = "aziot_failed",
            error = %error,
            "cannot sign a SAS token with the Azure IoT Identity Service; retrying later"
        );
        let actions = self.connection.failed(Failure::Other, Instant::now());
        self.step(actions, None)
    }

    /// The module's generation as the signer saw it: a new one means the module was
    /// deleted and re-created in the hub (and has a new key).
    pub(super) fn generation(&mut self, seen: Option<String>) {
        if seen.is_some() && seen != self.generation {
            if self.generation.is_some() {
                tracing::warn!(
                    edgetwin_event = "module_regenerated",
                    generation = seen.as_deref(),
                    "the module identity was re-created in the hub; connecting with its new key"
                );
            }
            self.generation = seen;
        }
    }

    /// Before a connect after a refusal: the credential read again from its source (a
    /// fixed file is picked up without a reload). A source that cannot be read now (being
    /// rewritten, say) leaves the credential in use.
    pub(super) fn reread(&mut self) {
        let Some(read) = self.reread.clone() else {
            return;
        };
        match read() {
            // Already connecting: nothing to start, the new key goes into this attempt.
            Ok(new) => drop(self.adopt(new, "source")),
            Err(problem) => tracing::warn!(
                edgetwin_event = "credential_unreadable",
                problem,
                "cannot read the module credential again; trying the one in use"
            ),
        }
    }
}
