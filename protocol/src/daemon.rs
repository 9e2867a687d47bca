//! The `baton-lb` control API (Unix socket, root only): what the CLI asks the running daemon.
//! JSON lines, one [`Request`] per line, each answered by one [`crate::envelope`] line.
use crate::cid::Cid;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answered with [`Status`].
    Status {},
    /// Answered with a list of [`WorkerStatus`].
    Workers {},
    /// Ask the daemon to exit (the XDP program stays attached). Answered with a string.
    Shutdown {},
    /// Route `cid` to worker slot `worker` by exact-CID override. Through the daemon, override
    /// writes are serialised with its own map updates (the fast-path rebuild). Answered with
    /// [`OverrideSet`].
    OverrideSet { cid: Cid, worker: u32 },
    /// Remove the override for `cid`. Answered with [`OverrideRemoved`].
    OverrideDel { cid: Cid },
    /// The outcome of one migration the CLI orchestrated, for the daemon's `/metrics`
    /// (success rate, phase latencies, snapshot sizes, errors by kind). Answered with `true`.
    MigrationDone(MigrationRecord),
}

impl Request {
    /// Whether asking again is harmless: reads and override writes (setting or removing the same
    /// entry twice ends in the same map). `Shutdown` is not: a retry could stop the daemon that
    /// replaced the one that went away; nor is a migration record (it would count twice).
    pub fn retryable(&self) -> bool {
        !matches!(self, Request::Shutdown {} | Request::MigrationDone(_))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    /// Slot in `BATON_WORKERS` (what overrides and the Maglev table name).
    pub index: u32,
    pub server_id: u64,
    pub address: String,
    pub mac: Option<String>,
    pub tx_interface: String,
    pub tx: String,
    pub healthy: bool,
    pub maglev_slots: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub interface: String,
    pub mode: String,
    pub program: String,
    pub prog_id: u32,
    pub link_id: u32,
    pub readopted: bool,
    pub uptime_secs: u64,
    pub workers: Vec<WorkerStatus>,
    /// The CID layout the data plane routes by.
    pub cid: crate::worker::CidLayout,
    /// Where this node stands in its cluster (`None`: a single node, no `[cluster]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// A cluster node's convergence from etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Its name in the cluster (`nodes/<node>/applied`).
    pub node: String,
    pub prefix: String,
    /// The etcd revision its maps reflect (0: not read yet; the pinned state routes).
    pub applied_revision: i64,
    /// Whether it follows etcd now (false: etcd unreachable, forwarding on the last state).
    pub watching: bool,
    /// Changes from etcd that could not be written to the maps (see the log).
    pub apply_errors: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideSet {
    pub worker_index: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideRemoved {
    pub removed: bool,
}

/// The steps of a migration as the orchestrator drives them (the fine view; `baton conns`, logs
/// and metrics also show the coarse phase of each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Learning both workers' server IDs, peer addresses and CID layouts; the target's LB slot.
    Resolve,
    /// Issuing the single-use token bound to this migration.
    Authorize,
    /// The source freezes, exports, seals and transfers; the target imports (held) and confirms;
    /// the source commits. Any failure here is rolled back by the source.
    Transfer,
    /// Writing the LB overrides of every CID to the target (after the commit only).
    Flip,
    /// Telling the source to stop forwarding and forget the connection.
    Release,
}

impl Step {
    pub const ALL: [Step; 5] = [
        Step::Resolve,
        Step::Authorize,
        Step::Transfer,
        Step::Flip,
        Step::Release,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Resolve => "resolve",
            Step::Authorize => "authorize",
            Step::Transfer => "transfer",
            Step::Flip => "flip",
            Step::Release => "release",
        }
    }
}

/// One finished migration, as the orchestrator reports it to the daemon's metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationRecord {
    /// `None`: it succeeded.
    pub failed: Option<crate::error::ErrorKind>,
    /// Milliseconds spent in each step reached, in order.
    pub steps: Vec<(Step, f64)>,
    /// Sealed snapshot size (0 when it never got that far).
    pub snapshot_bytes: u64,
    pub total_ms: f64,
}
