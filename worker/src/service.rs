//! What an application running on a worker implements, so its connections can move.
use quinn_proto::Connection;

/// An application protocol served by the worker (one ALPN).
pub trait Service: Send + Sync + 'static {
    /// The ALPN protocol id clients ask for.
    fn alpn(&self) -> &'static [u8];
    /// State for a new connection.
    fn new_session(&self) -> Box<dyn AppSession>;
    /// State for an imported connection, from what [`AppSession::capture`] produced on the source.
    fn restore(&self, state: &[u8]) -> Result<Box<dyn AppSession>, RestoreError>;
}

/// One connection's application state, including the stream data it has read but not yet
/// answered: all of it moves with the connection.
pub trait AppSession: Send {
    /// Accept, read and write the connection's streams. While `frozen`, take no new work: read
    /// (so receive buffers drain into the session) but do not write.
    fn drive(&mut self, conn: &mut Connection, frozen: bool);
    /// Serializes the whole state (called at the export, after a drive with `frozen` set).
    fn capture(&self) -> Vec<u8>;
}

/// The captured application state does not decode.
#[derive(Debug, thiserror::Error)]
#[error("application state does not decode: {0}")]
pub struct RestoreError(pub &'static str);
