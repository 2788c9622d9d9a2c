//! `STATUS=` in words (DESIGN §6): connected as whom with which twin version, or why
//! not (waiting to reconnect, checking the clock, credentials refused and until when).
//! Sent only when the text changes.

use std::time::Duration;

use crate::hub::session::ConnectionState;
use crate::systemd::Notifier;
use crate::twin::RuntimeState;

/// The last `STATUS=` sent, so only changes are sent.
#[derive(Default)]
pub(super) struct Status(String);

impl Status {
    pub(super) fn set(&mut self, notifier: &Notifier, text: String) {
        if self.0 != text {
            notifier.status(&text);
            self.0 = text;
        }
    }
}

pub(super) struct Describe {
    pub(super) hub: String,
    pub(super) device: String,
    pub(super) module: String,
}

impl Describe {
    /// `STATUS=` text (DESIGN §6).
    pub(super) fn status(&self, connection: ConnectionState, state: &RuntimeState) -> String {
        let twin = twin_words(state);
        match connection {
            ConnectionState::Connected => format!(
                "connected to {} as {}/{}, {twin}",
                self.hub, self.device, self.module
            ),
            ConnectionState::Refused { until, code, .. } => format!(
                "credentials refused by the hub {} (CONNACK {code}); retrying in {}; \
                 fix the credential file or reload; {twin} in force",
                self.hub,
                in_words(until.saturating_duration_since(tokio::time::Instant::now()))
            ),
            other => format!("{} ({}), {twin} in force", other.describe(), self.hub),
        }
    }
}

/// A wait as `STATUS=` says it: whole minutes (rounded up) from a minute on.
fn in_words(wait: Duration) -> String {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if secs < 60 {
        format!("{secs} s")
    } else {
        format!("{} min", secs.div_ceil(60))
    }
}

pub(super) fn twin_words(state: &RuntimeState) -> String {
    match state.desired_version {
        Some(v) => format!("twin v{v}"),
        None => "twin not seen yet".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn describe() -> Describe {
        Describe {
            hub: "hub.example".into(),
            device: "gw1".into(),
            module: "edgetwin".into(),
        }
    }

    #[test]
    fn refused_credentials_say_why_until_when_and_what_to_do() {
        let state = RuntimeState::default();
        let until = Instant::now() + Duration::from_secs(5 * 60);
        let refused = ConnectionState::Refused {
            until,
            code: 5,
            attempts: 3,
        };
        let text = describe().status(refused, &state);
        assert_eq!(
            text,
            "credentials refused by the hub hub.example (CONNACK 5); retrying in 5 min; \
             fix the credential file or reload; twin not seen yet in force"
        );
    }

    #[test]
    fn checking_the_clock_and_plain_waits_name_the_hub() {
        let state = RuntimeState::default();
        let text = describe().status(ConnectionState::CheckingClock, &state);
        assert_eq!(
            text,
            "checking the clock against the hub's (hub.example), twin not seen yet in force"
        );
    }

    #[test]
    fn waits_read_in_seconds_below_a_minute_and_in_whole_minutes_above() {
        assert_eq!(in_words(Duration::from_millis(1_500)), "2 s");
        assert_eq!(in_words(Duration::from_secs(59)), "59 s");
        assert_eq!(in_words(Duration::from_secs(60)), "1 min");
        assert_eq!(in_words(Duration::from_secs(61)), "2 min");
        assert_eq!(in_words(Duration::from_secs(3600)), "60 min");
    }
}
