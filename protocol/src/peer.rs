//! The peer channel (worker to worker, QUIC with mutual TLS, ALPN [`PEER_ALPN`]): one transfer
//! per bidirectional stream. The source writes a [`TransferHeader`] (length-prefixed JSON), then
//! the sealed snapshot; the target answers with one [`crate::envelope`] line of [`Imported`]
//! once it holds the import, then waits for the source's commit byte.
use crate::cid::{Cid, MigrationId};
use crate::hex::HexBytes;
use serde::{Deserialize, Serialize};

pub const PEER_ALPN: &[u8] = b"baton-peer/1";

/// Longest header the target reads (a header is a few hundred bytes).
pub const MAX_HEADER: usize = 4 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferHeader {
    pub migration_id: MigrationId,
    pub conn: Cid,
    /// Server IDs; `source` must be the authenticated peer's.
    pub source: u32,
    pub target: u32,
    pub token: HexBytes,
    /// Length of the sealed snapshot that follows.
    pub snapshot_len: u64,
}

/// The target holds the import (it sends nothing for it until the commit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Imported {
    pub id: u64,
}
