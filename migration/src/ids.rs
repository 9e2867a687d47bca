//! Identifiers shared by every part of the pipeline.
use serde::{Deserialize, Serialize};
use std::fmt;

use crate::protocol::MigrationError;

/// Longest QUIC connection ID (RFC 9000, section 17.2).
pub const MAX_CID_LEN: usize = 20;

pub use baton_protocol::MigrationId;

/// A backend worker (the index the controller uses in `BATON_WORKERS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker-{}", self.0)
    }
}

/// A QUIC connection ID: 0 to 20 bytes, validated on construction and on deserialization.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "serde_bytes::ByteBuf", into = "serde_bytes::ByteBuf")]
pub struct ConnectionId(Vec<u8>);

impl ConnectionId {
    pub fn new(bytes: &[u8]) -> Result<Self, MigrationError> {
        if bytes.len() > MAX_CID_LEN {
            return Err(MigrationError::InvalidSnapshot(format!(
                "connection ID is {} bytes, QUIC allows at most {MAX_CID_LEN}",
                bytes.len()
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<serde_bytes::ByteBuf> for ConnectionId {
    type Error = MigrationError;
    fn try_from(b: serde_bytes::ByteBuf) -> Result<Self, Self::Error> {
        Self::new(&b)
    }
}

impl From<ConnectionId> for serde_bytes::ByteBuf {
    fn from(c: ConnectionId) -> Self {
        serde_bytes::ByteBuf::from(c.0)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionId({self})")
    }
}

/// What a sealed snapshot and a token are bound to: replaying either into another migration,
/// for another connection or between other workers fails authentication.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MigrationBinding {
    pub migration_id: MigrationId,
    pub connection_id: ConnectionId,
    pub source: WorkerId,
    pub target: WorkerId,
}

impl MigrationBinding {
    /// Canonical, unambiguous encoding (fixed-width fields, length-prefixed CID) used as
    /// AEAD associated data and as HMAC input.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.migration_id.0);
        out.push(self.connection_id.as_bytes().len() as u8);
        out.extend_from_slice(self.connection_id.as_bytes());
        out.extend_from_slice(&self.source.0.to_be_bytes());
        out.extend_from_slice(&self.target.0.to_be_bytes());
    }
}
