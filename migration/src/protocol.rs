//! The error type of the crate (sealing, tokens, snapshots) and its [`ErrorKind`] mapping.
use serde::{Deserialize, Serialize};
use std::fmt;

pub use baton_protocol::ErrorKind;

use crate::ids::WorkerId;

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
    /// The envelope header is not ours, or of a version this build does not read.
    BadHeader(String),
    /// The input ended early (inside the envelope header or tag, or inside a length or the bytes
    /// it announces).
    Truncated(String),
    /// The encoded state exceeds the largest one accepted.
    TooLarge { limit: u64 },
    /// Bytes follow the end of the state.
    TrailingData,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AuthenticationFailed => f.write_str("authentication failed (ciphertext, tag, header or migration binding altered, or wrong key)"),
            Self::BadHeader(m) => write!(f, "bad header: {m}"),
            Self::Truncated(m) => write!(f, "truncated: {m}"),
            Self::TooLarge { limit } => write!(f, "state exceeds the limit of {limit} bytes"),
            Self::TrailingData => f.write_str("data after the end of the state"),
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
        "snapshot state rejected: {0}; check that both workers share the key ring and run compatible Baton versions, that the migration id, connection id, source and target match the ones the snapshot was sealed for, and that the transfer was not cut short"
    )]
    StateCorruption(Corruption),
    #[error(
        "snapshot of {size} bytes exceeds the limit of {limit} bytes; or reduce buffered stream data before migrating"
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
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(String),
    #[error("nonce counter exhausted for encryption key id {key_id}; rotate the key")]
    NonceExhausted { key_id: u32 },
    #[error("invalid configuration: {0}")]
    Config(String),
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
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::ReplayCacheFull { .. } => ErrorKind::ReplayCacheFull,
            Self::InvalidSnapshot(_) => ErrorKind::InvalidSnapshot,
            Self::NonceExhausted { .. } => ErrorKind::NonceExhausted,
            Self::Config(_) => ErrorKind::Config,
        }
    }

    pub(crate) fn corrupt(c: Corruption) -> Self {
        Self::StateCorruption(c)
    }
}

impl From<MigrationError> for baton_protocol::Failure {
    fn from(e: MigrationError) -> Self {
        Self::new(e.kind(), e)
    }
}
