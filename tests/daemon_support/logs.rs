//! The daemon's log events (info and above) as a test sees them: each `edgetwin_event`
//! with its fields, recorded by a subscriber that is the default of the test's thread
//! only, so tests running in parallel do not see each other's daemons. For
//! `#[tokio::test]`s on the default current-thread runtime, where the in-process daemon's
//! tasks run on the test's thread. Tests wait on an event with a timeout, never sleep.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::Layer;

use super::WAIT;

/// One event: its `edgetwin_event` and every field, as text.
#[derive(Debug, Clone)]
pub struct Logged {
    pub event: String,
    pub fields: BTreeMap<String, String>,
}

impl Logged {
    /// A field parsed as an integer.
    pub fn int(&self, name: &str) -> Option<i64> {
        self.fields.get(name)?.parse().ok()
    }
}

/// Records events while alive; dropping it restores the thread's previous default.
pub struct Logs {
    seen: watch::Receiver<Vec<Logged>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct Capture(Arc<watch::Sender<Vec<Logged>>>);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.0
            .insert(field.name().to_owned(), text.trim_matches('"').to_owned());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields(BTreeMap::new());
        event.record(&mut fields);
        if let Some(name) = fields.0.get("edgetwin_event").cloned() {
            self.0.send_modify(|seen| {
                seen.push(Logged {
                    event: name,
                    fields: fields.0,
                })
            });
        }
    }
}

impl Logs {
    /// Starts recording this thread's events.
    pub fn capture() -> Logs {
        let (tx, seen) = watch::channel(Vec::new());
        let layer = Capture(Arc::new(tx)).with_filter(tracing::level_filters::LevelFilter::INFO);
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        Logs {
            seen,
            _guard: guard,
        }
    }

    /// How many `event`s were logged so far.
    pub fn count(&self, event: &str) -> usize {
        self.seen
            .borrow()
            .iter()
            .filter(|l| l.event == event)
            .count()
    }

    /// Every `event` logged so far.
    pub fn all(&self, event: &str) -> Vec<Logged> {
        self.seen
            .borrow()
            .iter()
            .filter(|l| l.event == event)
            .cloned()
            .collect()
    }

    /// Waits for the `n`th (1-based) `event`; panics after [`WAIT`].
    pub async fn wait_nth(&mut self, event: &str, n: usize) -> Logged {
        let enough = |seen: &Vec<Logged>| seen.iter().filter(|l| l.event == event).count() >= n;
        let arrived = tokio::time::timeout(WAIT, self.seen.wait_for(enough))
            .await
            .is_ok();
        assert!(arrived, "no {event} #{n} logged; got {:?}", self.names());
        let found = self
            .seen
            .borrow()
            .iter()
            .filter(|l| l.event == event)
            .nth(n - 1)
            .cloned();
        found.expect("counted above")
    }

    /// Waits for the first `event`.
    pub async fn wait_for(&mut self, event: &str) -> Logged {
        self.wait_nth(event, 1).await
    }

    fn names(&self) -> Vec<String> {
        self.seen.borrow().iter().map(|l| l.event.clone()).collect()
    }
}
