//! Live QUIC connection handoff between workers.
//!
//! - [`capture`]: per-connection capture of the 1-RTT traffic secrets, exporter secret and
//!   key-update generation, from rustls's `KeyLog` and a counting wrapper around quinn's session.
//! - [`schedule`] and [`keys`]: our own HKDF-Expand-Label key schedule and AES-GCM packet /
//!   header protection on ring.
//! - [`imported`]: the `crypto::Session` that serves an imported connection.
//! - [`cid`]: the CID generator in the QUIC-LB layout.
//! - [`export`]/[`import`]: the whole move, on top of the quinn-proto patch series
//!   (`patches/quinn-proto`), which provides `Endpoint::export`/`Endpoint::import`.
//!
//! See `docs/QUIC-HANDOFF-DESIGN.md`.
pub mod capture;
pub mod cid;
pub mod imported;
pub mod keys;
pub mod schedule;
pub mod secret;
pub mod wire;

use capture::{KeyError, KeyState, SessionSecrets};
use quinn_proto::handoff::{ConnectionSnapshot, ExportRefused, ImportError, NotQuiescent};
use quinn_proto::{Connection, ConnectionHandle, Endpoint};
use std::sync::Arc;
use std::time::Instant;

pub use quinn_proto::handoff;

/// Everything that moves: the connection's QUIC state and its TLS secrets.
#[derive(Clone, Debug)]
pub struct Handoff {
    pub connection: ConnectionSnapshot,
    pub secrets: SessionSecrets,
}

/// Why an export did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Not quiescent: the connection is handed back untouched and carries on.
    #[error("connection not quiescent: {}", .0.reason)]
    NotQuiescent(ExportRefused),
    /// The secrets are not available (the connection is left in place, untouched).
    #[error("connection keys unavailable: {1}")]
    Keys(Box<Connection>, KeyError),
}

impl ExportError {
    pub fn reason(&self) -> Option<&NotQuiescent> {
        match self {
            Self::NotQuiescent(r) => Some(&r.reason),
            Self::Keys(..) => None,
        }
    }

    /// The connection, which the caller keeps driving.
    pub fn into_connection(self) -> Connection {
        match self {
            Self::NotQuiescent(r) => *r.connection,
            Self::Keys(c, _) => *c,
        }
    }
}

/// Exports connection `ch` from `endpoint`. On success the connection is consumed (it can never
/// send again) and the endpoint no longer routes its CIDs.
pub fn export(
    endpoint: &mut Endpoint,
    ch: ConnectionHandle,
    conn: Connection,
    keys: &KeyState,
    now: Instant,
) -> Result<Handoff, ExportError> {
    if let Err(reason) = conn.quiescence() {
        return Err(ExportError::NotQuiescent(ExportRefused {
            reason,
            connection: Box::new(conn),
        }));
    }
    let (alpn, server_name) = capture::handshake_info(conn.crypto_session());
    let key_update = conn.handoff_key_update_in_progress();
    let secrets = match keys.secrets(alpn, server_name, key_update) {
        Ok(s) => s,
        Err(e) => return Err(ExportError::Keys(Box::new(conn), e)),
    };
    let connection = endpoint
        .export(ch, conn, now)
        .map_err(ExportError::NotQuiescent)?;
    tracing::info!(
        remote = %connection.remote,
        generation = secrets.generation,
        cids = connection.local_cids.len(),
        "connection exported"
    );
    Ok(Handoff {
        connection,
        secrets,
    })
}

/// Imports a [`Handoff`] into `endpoint`. Returns the connection and its key state (for the next export).
pub fn import(
    endpoint: &mut Endpoint,
    handoff: &Handoff,
    now: Instant,
) -> Result<(ConnectionHandle, Connection, Arc<KeyState>), ImportError> {
    let (session, keys) =
        imported::ImportedSession::new(&handoff.secrets, handoff.connection.peer_params);
    let (ch, conn) = endpoint.import(&handoff.connection, Box::new(session), now)?;
    tracing::info!(remote = %handoff.connection.remote, generation = handoff.secrets.generation, "connection imported");
    Ok((ch, conn, keys))
}
