//! The session's twin and method traffic: agent commands turned into publishes, `$iothub`
//! publishes turned into [`HubEvent`]s, twin requests finished, and events forwarded to the
//! agent without ever waiting (a dropped one raises a resync).

use bytes::Bytes;
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Core, HubCommand, HubEvent};
use crate::hub::topics::{self, HubTopic};
use crate::hub::twin_requests::{Finished, TwinFailure, TwinOp, TwinReply};

impl Core {
    /// Forwards an event without waiting. What cannot be dropped safely raises a resync.
    /// One line is logged when an episode of drops starts and one when the agent has
    /// caught up (with the count), not one per event: a burst can drop thousands.
    pub(super) fn emit(&mut self, event: HubEvent) {
        self.flush_resync();
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            if self.dropped == 0 {
                tracing::warn!(
                    edgetwin_event = "event_dropped",
                    kind = event_kind(&event),
                    "agent is behind; dropping events until it catches up"
                );
            }
            self.dropped += 1;
            match event {
                HubEvent::Method { rid, .. } => {
                    self.publish(topics::method_response(503, &rid), b"null".to_vec());
                }
                HubEvent::Twin(_) => {
                    self.resync_pending = true;
                    self.resync_twin_lost = true;
                }
                _ => self.resync_pending = true,
            }
        }
    }

    pub(super) fn flush_resync(&mut self) {
        if !self.resync_pending {
            return;
        }
        let resync = HubEvent::Resync {
            twin_answer_lost: self.resync_twin_lost,
        };
        if self.events.try_send(resync).is_ok() {
            tracing::warn!(
                edgetwin_event = "events_dropped",
                dropped = self.dropped,
                "agent caught up; resynchronising after dropped events"
            );
            self.resync_pending = false;
            self.resync_twin_lost = false;
            self.dropped = 0;
        }
    }

    pub(super) fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "publish not queued");
                false
            }
        }
    }

    pub(super) fn command(&mut self, command: HubCommand) {
        let now = Instant::now();
        match command {
            HubCommand::GetTwin if self.connection.is_connected() => {
                let p = self.requests.start(TwinOp::Get, now);
                self.publish(p.topic, p.payload);
            }
            HubCommand::GetTwin => self.emit(HubEvent::Twin(Err(TwinFailure::Lost))),
            HubCommand::Report(patch) if self.connection.is_connected() => {
                let p = self.requests.start(TwinOp::Report(patch), now);
                self.publish(p.topic, p.payload);
            }
            HubCommand::Report(patch) => self.emit(HubEvent::Reported {
                patch,
                result: Err(TwinFailure::Lost),
            }),
            HubCommand::MethodResponse {
                rid,
                status,
                payload,
            } => {
                if self.connection.is_connected() {
                    self.publish(topics::method_response(status, &rid), payload);
                }
            }
            HubCommand::Telemetry(payload) => {
                if self.connection.is_connected() {
                    self.publish(self.telemetry_topic.clone(), payload);
                } else {
                    tracing::debug!("telemetry skipped while disconnected");
                }
            }
        }
    }

    pub(super) fn resend_due(&mut self, now: Instant) {
        for p in self.requests.due(now) {
            self.publish(p.topic, p.payload);
        }
    }

    pub(super) fn incoming(&mut self, topic: &str, payload: Bytes) {
        match topics::parse(topic) {
            Some(HubTopic::DesiredPatch { version }) => {
                self.emit(HubEvent::Desired { version, payload })
            }
            Some(HubTopic::TwinResponse {
                status,
                rid,
                version,
            }) => {
                if status == 429 || status >= 500 {
                    tracing::warn!(status, "twin request throttled or failed; will retry");
                }
                if let Some(done) =
                    self.requests
                        .response(&rid, status, version, payload, Instant::now())
                {
                    self.finished(done);
                }
            }
            Some(HubTopic::MethodRequest { name, rid }) => {
                self.emit(HubEvent::Method { name, rid, payload })
            }
            None => tracing::debug!(topic, "ignoring a publish on an unknown topic"),
        }
    }

    pub(super) fn finished(&mut self, done: Finished) {
        let event = match (done.op, done.result) {
            (TwinOp::Get, Ok(TwinReply::Twin(body))) => HubEvent::Twin(Ok(body)),
            (TwinOp::Get, Ok(TwinReply::Reported(_))) => return,
            (TwinOp::Get, Err(e)) => HubEvent::Twin(Err(e)),
            (TwinOp::Report(patch), Ok(TwinReply::Reported(version))) => HubEvent::Reported {
                patch,
                result: Ok(version),
            },
            (TwinOp::Report(_), Ok(TwinReply::Twin(_))) => return,
            (TwinOp::Report(patch), Err(e)) => HubEvent::Reported {
                patch,
                result: Err(e),
            },
        };
        self.emit(event);
    }
}

fn event_kind(event: &HubEvent) -> &'static str {
    match event {
        HubEvent::Connected { .. } => "connected",
        HubEvent::Disconnected => "disconnected",
        HubEvent::Desired { .. } => "desired",
        HubEvent::Twin(_) => "twin",
        HubEvent::Reported { .. } => "reported",
        HubEvent::Method { .. } => "method",
        HubEvent::Resync { .. } => "resync",
    }
}
