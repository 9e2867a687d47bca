//! The state of one connection as it moves between workers.
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;
use std::fmt;

use crate::ids::{ConnectionId, WorkerId};
use crate::protocol::MigrationError;

/// Version of the snapshot layout; bumped whenever a field changes.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;

/// Everything the target needs to resume a connection. Build it with
/// [`ConnectionStateSnapshot::builder`]. `Debug` shows sizes only: buffers hold user data.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStateSnapshot {
    format_version: u16,
    connection_id: ConnectionId,
    source: WorkerId,
    target: WorkerId,
    created_at_unix_ms: u64,
    last_activity_unix_ms: u64,
    /// QUIC transport state from the handoff work, opaque here.
    transport: ByteBuf,
    stream_buffers: BTreeMap<u64, ByteBuf>,
    application_state: BTreeMap<String, ByteBuf>,
}

impl ConnectionStateSnapshot {
    pub fn builder(
        connection_id: ConnectionId,
        source: WorkerId,
        target: WorkerId,
    ) -> SnapshotBuilder {
        SnapshotBuilder {
            snapshot: ConnectionStateSnapshot {
                format_version: SNAPSHOT_FORMAT_VERSION,
                connection_id,
                source,
                target,
                created_at_unix_ms: 0,
                last_activity_unix_ms: 0,
                transport: ByteBuf::new(),
                stream_buffers: BTreeMap::new(),
                application_state: BTreeMap::new(),
            },
            duplicate: None,
        }
    }

    pub fn format_version(&self) -> u16 {
        self.format_version
    }
    pub fn connection_id(&self) -> &ConnectionId {
        &self.connection_id
    }
    pub fn source(&self) -> WorkerId {
        self.source
    }
    pub fn target(&self) -> WorkerId {
        self.target
    }
    pub fn created_at_unix_ms(&self) -> u64 {
        self.created_at_unix_ms
    }
    pub fn last_activity_unix_ms(&self) -> u64 {
        self.last_activity_unix_ms
    }
    pub fn transport(&self) -> &[u8] {
        &self.transport
    }
    pub fn stream_buffer(&self, stream_id: u64) -> Option<&[u8]> {
        self.stream_buffers.get(&stream_id).map(|b| b.as_slice())
    }
    pub fn stream_buffers(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.stream_buffers.iter().map(|(k, v)| (*k, v.as_slice()))
    }
    pub fn application_state(&self, key: &str) -> Option<&[u8]> {
        self.application_state.get(key).map(|b| b.as_slice())
    }
    pub fn application_states(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.application_state
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Bytes of payload held (transport + buffers + application state), for size metrics.
    pub fn payload_len(&self) -> usize {
        self.transport.len()
            + self.stream_buffers.values().map(|b| b.len()).sum::<usize>()
            + self
                .application_state
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Invariants checked by the builder and again after decoding untrusted bytes.
    pub(crate) fn validate(&self) -> Result<(), MigrationError> {
        if self.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(MigrationError::UnsupportedVersion {
                found: self.format_version,
                supported: SNAPSHOT_FORMAT_VERSION,
            });
        }
        if self.source == self.target {
            return Err(MigrationError::InvalidSnapshot(format!(
                "source and target are both {}; a migration needs two different workers",
                self.source
            )));
        }
        if self.last_activity_unix_ms < self.created_at_unix_ms {
            return Err(MigrationError::InvalidSnapshot(
                "last activity precedes creation; check the worker's clock source".into(),
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for ConnectionStateSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionStateSnapshot")
            .field("format_version", &self.format_version)
            .field("connection_id", &self.connection_id)
            .field("source", &self.source)
            .field("target", &self.target)
            .field("created_at_unix_ms", &self.created_at_unix_ms)
            .field("last_activity_unix_ms", &self.last_activity_unix_ms)
            .field("transport_len", &self.transport.len())
            .field("stream_buffers", &self.stream_buffers.len())
            .field("application_state_keys", &self.application_state.len())
            .field("payload_len", &self.payload_len())
            .finish()
    }
}

/// Builder in the seed's style: `builder(..).add_stream_buffer(..).add_application_state(..).build()`.
#[must_use]
pub struct SnapshotBuilder {
    snapshot: ConnectionStateSnapshot,
    duplicate: Option<String>,
}

impl SnapshotBuilder {
    pub fn timestamps(mut self, created_at_unix_ms: u64, last_activity_unix_ms: u64) -> Self {
        self.snapshot.created_at_unix_ms = created_at_unix_ms;
        self.snapshot.last_activity_unix_ms = last_activity_unix_ms;
        self
    }

    pub fn transport_snapshot(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.snapshot.transport = ByteBuf::from(bytes.into());
        self
    }

    pub fn add_stream_buffer(mut self, stream_id: u64, bytes: impl Into<Vec<u8>>) -> Self {
        if self
            .snapshot
            .stream_buffers
            .insert(stream_id, ByteBuf::from(bytes.into()))
            .is_some()
        {
            self.duplicate
                .get_or_insert_with(|| format!("stream {stream_id} added twice"));
        }
        self
    }

    pub fn add_application_state(
        mut self,
        key: impl Into<String>,
        bytes: impl Into<Vec<u8>>,
    ) -> Self {
        let key = key.into();
        if self.snapshot.application_state.contains_key(&key) {
            self.duplicate
                .get_or_insert_with(|| format!("application state key {key:?} added twice"));
        }
        self.snapshot
            .application_state
            .insert(key, ByteBuf::from(bytes.into()));
        self
    }

    pub fn build(self) -> Result<ConnectionStateSnapshot, MigrationError> {
        if let Some(dup) = self.duplicate {
            return Err(MigrationError::InvalidSnapshot(format!(
                "{dup}; each key may appear once"
            )));
        }
        self.snapshot.validate()?;
        Ok(self.snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid() -> ConnectionId {
        ConnectionId::new(&[1, 2, 3, 4]).unwrap()
    }

    #[test]
    fn builder_collects_fields() {
        let s = ConnectionStateSnapshot::builder(cid(), WorkerId(1), WorkerId(2))
            .timestamps(10, 20)
            .transport_snapshot(vec![9; 5])
            .add_stream_buffer(4, b"abc".to_vec())
            .add_application_state("session", b"xyz".to_vec())
            .build()
            .unwrap();
        assert_eq!(s.stream_buffer(4), Some(&b"abc"[..]));
        assert_eq!(s.application_state("session"), Some(&b"xyz"[..]));
        assert_eq!(s.transport(), &[9; 5]);
        assert_eq!(s.payload_len(), 5 + 3 + 7 + 3);
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("xyz") && !dbg.contains("120, 121, 122"),
            "{dbg}"
        );
    }

    #[test]
    fn builder_refuses_bad_input() {
        let same = ConnectionStateSnapshot::builder(cid(), WorkerId(1), WorkerId(1)).build();
        assert!(matches!(same, Err(MigrationError::InvalidSnapshot(_))));
        let dup = ConnectionStateSnapshot::builder(cid(), WorkerId(1), WorkerId(2))
            .add_stream_buffer(0, vec![1])
            .add_stream_buffer(0, vec![2])
            .build();
        assert!(matches!(dup, Err(MigrationError::InvalidSnapshot(m)) if m.contains("stream 0")));
        let time = ConnectionStateSnapshot::builder(cid(), WorkerId(1), WorkerId(2))
            .timestamps(5, 4)
            .build();
        assert!(time.is_err());
        assert!(ConnectionId::new(&[0; 21]).is_err());
    }
}
