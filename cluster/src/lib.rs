//! Baton as a cluster on etcd (issue 13): many LB nodes, one truth.
//!
//! This crate owns what every participant must agree on, without any I/O:
//! - [`keys`]: the key schema under one prefix per cluster, as one type ([`Key`]);
//! - [`records`]: the record stored at each key, one serde type per kind, for writers and
//!   readers alike;
//! - [`node`]: one LB node's convergence from the watch ([`Node`]), a sans-IO state machine the
//!   controller drives with what etcd said and whose actions it carries out on its pinned maps;
//! - [`etcd`]: the one place that talks to etcd: leases, a worker's registration, and
//!   [`etcd::follow`], which drives a [`Node`] from the watch.
pub mod etcd;
pub mod keys;
pub mod node;
pub mod records;
#[cfg(feature = "test-support")]
pub mod testing;

pub use keys::{Key, KeyError, Prefix, check_name};
pub use node::{Action, Input, Node, View, WatchEvent};
pub use records::{
    AppliedRecord, HealthRecord, MigrationRecord, MigrationStage, OverrideRecord, RecordEncap,
    ServerIdClaim, WorkerRecord, all_applied,
};
