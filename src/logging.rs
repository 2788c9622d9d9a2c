//! Logging set-up: tracing to journald (with our own fields as journal fields) when run
//! by systemd or asked to, else text or JSON on stderr; the level can change on reload.
//!
//! `main` calls [`init`] once per process and keeps the [`LogHandle`] to apply a new
//! `log.level` on SIGHUP. With journald, a tracing field `edgetwin_event` becomes the
//! journal field `EDGETWIN_EVENT` (no prefix is added), likewise `EDGETWIN_DEVICE`,
//! `EDGETWIN_MODULE` and `EDGETWIN_TWIN_VERSION`. Nothing here may log a secret; callers
//! must never pass one as a field.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Changes the level of the installed subscriber.
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    /// Applies a new `log.level` directive; a bad one is refused and the old one stays.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter = parse_filter(level)?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| format!("invalid log level {level:?}: {e}"))
}

/// Where log lines go, once `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Text,
    Json,
}

/// `auto` means journald when stderr is connected to the journal (`JOURNAL_STREAM`).
pub fn resolve(format: LogFormat) -> Sink {
    match format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => Sink::Journald,
        LogFormat::Auto | LogFormat::Text => Sink::Text,
        LogFormat::Journald => Sink::Journald,
        LogFormat::Json => Sink::Json,
    }
}

/// Installs the global subscriber. `EDGETWIN_LOG`, when set, overrides `level` (for a
/// quick debug session without editing the config). Falls back to text on stderr when
/// the journal cannot be reached.
pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let requested = std::env::var("EDGETWIN_LOG").unwrap_or_else(|_| level.to_owned());
    let filter = parse_filter(&requested).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let mut sink = resolve(format);
    let journald = if sink == Sink::Journald {
        match tracing_journald::layer() {
            Ok(layer) => Some(layer.with_field_prefix(None)),
            Err(_) => {
                sink = Sink::Text;
                None
            }
        }
    } else {
        None
    };
    let text = (sink == Sink::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour only for a person at a terminal, not in files, pipes or the journal.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
    });
    let json = (sink == Sink::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(text)
        .with(json)
        .try_init();
    LogHandle { filter: handle }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_formats_resolve_to_themselves() {
        assert_eq!(resolve(LogFormat::Json), Sink::Json);
        assert_eq!(resolve(LogFormat::Text), Sink::Text);
        assert_eq!(resolve(LogFormat::Journald), Sink::Journald);
    }

    #[test]
    fn bad_level_is_refused() {
        assert!(parse_filter("info,edgetwin=debug").is_ok());
        assert!(parse_filter("edgetwin=loud").is_err());
    }
}
