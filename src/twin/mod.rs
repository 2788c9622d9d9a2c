//! The pure twin core: desired properties in, state and acknowledgements out.
//!
//! Owns the rules of DESIGN §3 (rules 2–5 and the coalescing half of rule 7): which
//! desired documents apply, how they merge, what is acknowledged, what `state.json`
//! holds. The agent drives it; `config` builds its [`Schema`]. It must never do I/O,
//! await, read a clock or log — so every rule is testable with plain `#[test]`s and
//! fuzzable, and the agent decides what to persist, send and log from each [`Outcome`].
//!
//! - [`schema`]: declared properties, bounds, defaults, unknown-property policy.
//! - [`state`]: the runtime state in force and its on-disk form.
//! - [`apply`]: [`TwinSync`], the version/queueing state machine.
//! - [`ack`]: Plug and Play / plain acknowledgements, [`ReportedCoalescer`].
//! - [`merge`]: JSON merge-patch arithmetic shared by the above.

pub mod ack;
pub mod apply;
pub mod merge;
pub mod schema;
pub mod state;

pub use ack::{AckStyle, ReportedCoalescer};
pub use apply::{Disposition, Handled, ItemResult, Outcome, TwinSync, Verdict};
pub use schema::{
    PropertySpec, PropertyType, Schema, SpecError, UnknownPolicy, TELEMETRY_INTERVAL,
};
pub use state::{RuntimeState, StateFile, StateFileError, UpdatedAt};

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod sync_tests;
