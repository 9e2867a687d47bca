//! Orchestrating live migrations. [`Migration`] is the whole flow of moving one connection as a
//! sans-IO state machine in quinn-proto's style: the driver feeds it [`Event`]s
//! ([`Migration::handle`]) and the clock ([`Migration::handle_timeout`]), and carries out the
//! [`Action`]s it asks for ([`Migration::poll_action`]); it never does I/O or reads the clock.
//! The `baton` CLI drives it today (`baton migrate`, `baton drain`); a cluster controller can
//! drive the same machine.
//!
//! What the machine guarantees, whoever drives it (these are Baton's zero-downtime invariants):
//! - the LB overrides are written only after the source reported the commit (the target holds
//!   the import and the source will never send for the connection again);
//! - any failure before that leaves the map untouched (the source has rolled back);
//! - a failure after the commit is never a rollback: the connection lives on the target and the
//!   source keeps forwarding its late datagrams until released or its own deadline.
//!
//! [`recovery`] decides what becomes of a migration whose driver died mid-way.
pub mod machine;
pub mod recovery;
pub mod stats;

pub use machine::{Action, Event, Migration, Options, Outcome, Phase, Report};
pub use stats::MigrationStats;
