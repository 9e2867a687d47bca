//! Why something failed, as every part reports it: an [`ErrorKind`] (the fixed label set of the
//! error counters and of `baton --json`) and a message that says what to check.
use serde::{Deserialize, Serialize};
use std::fmt;

/// What kind of failure. One enum for the worker, the peer channel, the controller and the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A migration token was refused (forged, expired, replayed, bound to another migration).
    InvalidToken,
    /// Sealed state failed authentication or decoding.
    StateCorruption,
    SnapshotTooLarge,
    UnknownKey,
    RetiredKey,
    InvalidKey,
    /// The other worker cannot be reached, did not answer in time, or refused for capacity.
    TargetUnavailable,
    /// A step did not finish in time (e.g. the connection did not quiesce for export).
    Timeout,
    /// The connection's application had requests in flight for the whole of the migration's
    /// bound (an HTTP/3 connection moves only between requests): it carries on where it was.
    RequestsInFlight,
    RateLimited,
    ReplayCacheFull,
    UnsupportedVersion,
    InvalidSnapshot,
    /// No such connection where it was looked for.
    UnknownConnection,
    /// The connection is being migrated already.
    AlreadyMigrating,
    UnknownMigration,
    NonceExhausted,
    /// A request or configuration is wrong (names, layouts, parameters, credentials).
    Config,
    /// Writing or reading a local resource failed (the worker's own loop, an output sink).
    Output,
    /// The caller is authenticated but not allowed to do this (a worker on the peer channel
    /// sending a transfer in another worker's name).
    Unauthorized,
    /// The server is at its client limit; try again later.
    Busy,
    /// The operator tool could not start (configuration, secrets, maps).
    Setup,
    /// Writing the LB's exact-CID overrides failed.
    Override,
    /// The cluster's state (etcd) cannot be reached: a cluster's migrations need it, the data
    /// plane does not.
    ClusterUnavailable,
    /// A kind this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 25] = [
        Self::InvalidToken,
        Self::StateCorruption,
        Self::SnapshotTooLarge,
        Self::UnknownKey,
        Self::RetiredKey,
        Self::InvalidKey,
        Self::TargetUnavailable,
        Self::Timeout,
        Self::RequestsInFlight,
        Self::RateLimited,
        Self::ReplayCacheFull,
        Self::UnsupportedVersion,
        Self::InvalidSnapshot,
        Self::UnknownConnection,
        Self::AlreadyMigrating,
        Self::UnknownMigration,
        Self::NonceExhausted,
        Self::Config,
        Self::Output,
        Self::Unauthorized,
        Self::Busy,
        Self::Setup,
        Self::Override,
        Self::ClusterUnavailable,
        Self::Unknown,
    ];

    /// The snake_case name (as in JSON and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidToken => "invalid_token",
            Self::StateCorruption => "state_corruption",
            Self::SnapshotTooLarge => "snapshot_too_large",
            Self::UnknownKey => "unknown_key",
            Self::RetiredKey => "retired_key",
            Self::InvalidKey => "invalid_key",
            Self::TargetUnavailable => "target_unavailable",
            Self::Timeout => "timeout",
            Self::RequestsInFlight => "requests_in_flight",
            Self::RateLimited => "rate_limited",
            Self::ReplayCacheFull => "replay_cache_full",
            Self::UnsupportedVersion => "unsupported_version",
            Self::InvalidSnapshot => "invalid_snapshot",
            Self::UnknownConnection => "unknown_connection",
            Self::AlreadyMigrating => "already_migrating",
            Self::UnknownMigration => "unknown_migration",
            Self::NonceExhausted => "nonce_exhausted",
            Self::Config => "config",
            Self::Output => "output",
            Self::Unauthorized => "unauthorized",
            Self::Busy => "busy",
            Self::Setup => "setup",
            Self::Override => "override",
            Self::ClusterUnavailable => "cluster_unavailable",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal or failure as it travels: its kind and a message for the operator. On the wire:
/// `"kind": "...", "error": "..."` (see [`crate::envelope`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({kind})")]
pub struct Failure {
    pub kind: ErrorKind,
    #[serde(rename = "error")]
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_snake_case_on_the_wire_and_unknown_ones_are_kept_apart() {
        for k in ErrorKind::ALL {
            let j = serde_json::to_string(&k).unwrap();
            assert_eq!(j, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&j).unwrap(), k);
        }
        assert_eq!(
            serde_json::from_str::<ErrorKind>("\"from_the_future\"").unwrap(),
            ErrorKind::Unknown
        );
    }
}
