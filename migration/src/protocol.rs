//! Messages exchanged between controller, source and target, and the error type of the crate.
use serde::{Deserialize, Serialize};
use std::fmt;

use crate::ids::{ConnectionId, MigrationBinding, MigrationId, WorkerId};
use crate::state_machine::MigrationPhase;
use crate::token::MigrationToken;

/// Controller -> target (and source): move `connection_id` from `source` to `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRequest {
    pub migration_id: MigrationId,
    pub connection_id: ConnectionId,
    pub source: WorkerId,
    pub target: WorkerId,
    /// Proof that the controller authorised exactly this migration (see [`crate::token`]).
    pub token: MigrationToken,
    /// Wall-clock time the request was made, milliseconds since the Unix epoch.
    pub requested_at_unix_ms: u64,
}

impl MigrationRequest {
    pub fn binding(&self) -> MigrationBinding {
        MigrationBinding {
            migration_id: self.migration_id,
            connection_id: self.connection_id.clone(),
            source: self.source,
            target: self.target,
        }
    }
}

/// Who sends a confirmation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigrationParty {
    Controller,
    Source,
    Target,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfirmationStatus {
    /// The party accepted the request and is preparing.
    Accepted,
    /// The party finished its part (target: the connection is live there; source: state released).
    Completed,
    /// The party refused or failed; the controller rolls back.
    Rejected(MigrationError),
}

/// A party's answer to a [`MigrationRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfirmation {
    pub migration_id: MigrationId,
    pub connection_id: ConnectionId,
    pub party: MigrationParty,
    pub status: ConfirmationStatus,
    pub confirmed_at_unix_ms: u64,
}

/// Why a token was refused. Deliberately coarse towards the peer: a forged MAC and a token bound
/// to another migration look the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenRejection {
    Malformed,
    UnsupportedVersion,
    UnknownSecret,
    /// The MAC does not match: forged, altered, or bound to another migration/connection/pair.
    BadMac,
    Expired,
    NotYetValid,
    LifetimeTooLong,
    Replayed,
    /// Issued before the verifier started: it may have been used before a restart.
    IssuedBeforeRestart,
}

impl fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed token",
            Self::UnsupportedVersion => "unsupported token version",
            Self::UnknownSecret => "token signed with an unknown or retired secret",
            Self::BadMac => "MAC mismatch (forged, altered or issued for another migration, connection or worker pair)",
            Self::Expired => "token expired",
            Self::NotYetValid => "token issued in the future",
            Self::LifetimeTooLong => "token lifetime exceeds the configured maximum",
            Self::Replayed => "token already used",
            Self::IssuedBeforeRestart => {
                "token issued before the target worker (re)started; request a new token and retry"
            }
        })
    }
}

/// Why sealed or encoded state was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Corruption {
    /// AES-GCM tag check failed: ciphertext, tag, header or binding altered, or wrong key.
    AuthenticationFailed,
    /// The envelope or stream header is not ours or is malformed.
    BadHeader(String),
    /// The input ended before the final chunk (or inside a chunk header or payload).
    Truncated(String),
    /// A chunk arrived with a higher sequence number than expected (reordered or missing).
    OutOfOrder { expected: u32, found: u32 },
    /// A chunk arrived again (sequence number already seen).
    Duplicate { seq: u32 },
    /// A chunk announces more bytes than the stream's chunk size allows.
    ChunkTooLarge { len: u32, limit: u32 },
    /// A non-final chunk is shorter than the chunk size (not produced by our encoder).
    ShortChunk { seq: u32, len: u32, chunk_size: u32 },
    /// Compressed or decompressed input exceeds the configured maximum state size.
    TooLarge { limit: u64 },
    /// Bytes follow the end of the snapshot.
    TrailingData,
    /// Decompression or bincode decoding failed.
    Malformed(String),
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AuthenticationFailed => f.write_str("authentication failed (ciphertext, tag, header or migration binding altered, or wrong key)"),
            Self::BadHeader(m) => write!(f, "bad header: {m}"),
            Self::Truncated(m) => write!(f, "truncated: {m}"),
            Self::OutOfOrder { expected, found } => write!(f, "chunk {found} arrived where chunk {expected} was expected (reordered or missing chunk)"),
            Self::Duplicate { seq } => write!(f, "chunk {seq} arrived twice"),
            Self::ChunkTooLarge { len, limit } => write!(f, "chunk of {len} bytes exceeds the chunk size {limit}"),
            Self::ShortChunk { seq, len, chunk_size } => write!(f, "non-final chunk {seq} has {len} bytes, expected {chunk_size}"),
            Self::TooLarge { limit } => write!(f, "state exceeds the limit of {limit} bytes"),
            Self::TrailingData => f.write_str("data after the end of the snapshot"),
            Self::Malformed(m) => write!(f, "malformed content: {m}"),
        }
    }
}

/// Every failure of the pipeline. Each message names what to check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MigrationError {
    #[error(
        "migration token rejected: {0}; check that the controller and the target share the current token secret, that their clocks agree within the allowed skew, and that each token is used once for exactly the migration it was issued for"
    )]
    InvalidToken(TokenRejection),
    #[error(
        "snapshot state rejected: {0}; check that both workers use the same key ring and compression settings, that the migration id, connection id, source and target match the ones the snapshot was sealed for, and that the transfer was not cut short"
    )]
    StateCorruption(Corruption),
    #[error(
        "snapshot of {size} bytes exceeds the limit of {limit} bytes; check max_state_size on source and target, or reduce buffered stream data before migrating"
    )]
    SnapshotTooLarge { size: u64, limit: u64 },
    #[error(
        "encryption key id {key_id} is not in this key ring; check that the new key reached every worker before the source started sealing with it"
    )]
    UnknownKey { key_id: u32 },
    #[error(
        "encryption key id {key_id} has been retired; check for a sealed snapshot older than the key rotation, and retire keys only after in-flight migrations finish"
    )]
    RetiredKey { key_id: u32 },
    #[error("invalid encryption key: {0}")]
    InvalidKey(String),
    #[error(
        "target {target} is unavailable: {reason}; check the target worker's health and capacity, or pick another target"
    )]
    TargetUnavailable { target: WorkerId, reason: String },
    #[error(
        "migration phase {phase} timed out after {elapsed_ms} ms (limit {limit_ms} ms); check that the target is reachable and not overloaded, and that the phase timeout fits the snapshot size"
    )]
    Timeout {
        phase: MigrationPhase,
        elapsed_ms: u64,
        limit_ms: u64,
    },
    #[error(
        "{worker} exceeded {limit} migration requests per second; retry in {retry_after_ms} ms, and check for a controller loop re-requesting the same migrations"
    )]
    RateLimited {
        worker: WorkerId,
        limit: u32,
        retry_after_ms: u64,
    },
    #[error(
        "token replay cache is full ({capacity} live tokens); check the request rate against max_requests_per_second and token lifetime, or raise replay_cache_capacity"
    )]
    ReplayCacheFull { capacity: usize },
    #[error(
        "illegal transition: {event} in state {state}; check the order of migration events (Idle -> Preparing -> Transferring -> Completed | Failed)"
    )]
    IllegalTransition {
        state: MigrationPhase,
        event: String,
    },
    #[error(
        "unsupported snapshot format version {found} (this build reads {supported}); check that source and target run compatible Baton versions"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    #[error(
        "connection {0} is not registered with the session manager; check that the worker reported it"
    )]
    UnknownConnection(ConnectionId),
    #[error("connection {0} is already being migrated; wait for that migration to finish or fail")]
    AlreadyMigrating(ConnectionId),
    #[error(
        "migration {0} is unknown; check that it was started here and has not finished already"
    )]
    UnknownMigration(MigrationId),
    #[error("nonce counter exhausted for encryption key id {key_id}; rotate the key")]
    NonceExhausted { key_id: u32 },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("writing encoded state failed: {0}; check the output sink")]
    Output(String),
}

/// Fixed label set for per-kind error counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    InvalidToken,
    StateCorruption,
    SnapshotTooLarge,
    UnknownKey,
    RetiredKey,
    InvalidKey,
    TargetUnavailable,
    Timeout,
    RateLimited,
    ReplayCacheFull,
    IllegalTransition,
    UnsupportedVersion,
    InvalidSnapshot,
    UnknownConnection,
    AlreadyMigrating,
    UnknownMigration,
    NonceExhausted,
    Config,
    Output,
    /// The caller is authenticated but not allowed to do this (e.g. a worker on the peer channel
    /// sending a transfer in another worker's name).
    Unauthorized,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 20] = [
        Self::InvalidToken,
        Self::StateCorruption,
        Self::SnapshotTooLarge,
        Self::UnknownKey,
        Self::RetiredKey,
        Self::InvalidKey,
        Self::TargetUnavailable,
        Self::Timeout,
        Self::RateLimited,
        Self::ReplayCacheFull,
        Self::IllegalTransition,
        Self::UnsupportedVersion,
        Self::InvalidSnapshot,
        Self::UnknownConnection,
        Self::AlreadyMigrating,
        Self::UnknownMigration,
        Self::NonceExhausted,
        Self::Config,
        Self::Output,
        Self::Unauthorized,
    ];

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
            Self::RateLimited => "rate_limited",
            Self::ReplayCacheFull => "replay_cache_full",
            Self::IllegalTransition => "illegal_transition",
            Self::UnsupportedVersion => "unsupported_version",
            Self::InvalidSnapshot => "invalid_snapshot",
            Self::UnknownConnection => "unknown_connection",
            Self::AlreadyMigrating => "already_migrating",
            Self::UnknownMigration => "unknown_migration",
            Self::NonceExhausted => "nonce_exhausted",
            Self::Config => "config",
            Self::Output => "output",
            Self::Unauthorized => "unauthorized",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl MigrationError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidToken(_) => ErrorKind::InvalidToken,
            Self::StateCorruption(_) => ErrorKind::StateCorruption,
            Self::SnapshotTooLarge { .. } => ErrorKind::SnapshotTooLarge,
            Self::UnknownKey { .. } => ErrorKind::UnknownKey,
            Self::RetiredKey { .. } => ErrorKind::RetiredKey,
            Self::InvalidKey(_) => ErrorKind::InvalidKey,
            Self::TargetUnavailable { .. } => ErrorKind::TargetUnavailable,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::ReplayCacheFull { .. } => ErrorKind::ReplayCacheFull,
            Self::IllegalTransition { .. } => ErrorKind::IllegalTransition,
            Self::UnsupportedVersion { .. } => ErrorKind::UnsupportedVersion,
            Self::InvalidSnapshot(_) => ErrorKind::InvalidSnapshot,
            Self::UnknownConnection(_) => ErrorKind::UnknownConnection,
            Self::AlreadyMigrating(_) => ErrorKind::AlreadyMigrating,
            Self::UnknownMigration(_) => ErrorKind::UnknownMigration,
            Self::NonceExhausted { .. } => ErrorKind::NonceExhausted,
            Self::Config(_) => ErrorKind::Config,
            Self::Output(_) => ErrorKind::Output,
        }
    }

    pub(crate) fn corrupt(c: Corruption) -> Self {
        Self::StateCorruption(c)
    }
}
