//! Every message Baton's processes exchange, defined once and used by both ends:
//!
//! - [`worker`]: the worker control API (`baton` -> `baton-worker`, JSON lines over a Unix socket
//!   or mutual TLS);
//! - [`daemon`]: the `baton-lb` control API (`baton` -> `baton-lb`, JSON lines over a Unix socket);
//! - [`peer`]: the header and answer of a transfer on the worker-to-worker peer channel.
//!
//! Each request and answer travels in one [`envelope`]; failures carry an [`ErrorKind`] (an enum,
//! never a free string) and a message that says what to do. Connection IDs are [`Cid`]s (hex in
//! every text form). Requests refuse unknown fields, so a renamed field is an error, not a
//! silently defaulted value.
pub mod cid;
pub mod daemon;
pub mod envelope;
pub mod error;
pub mod hex;
pub mod peer;
pub mod worker;

pub use cid::{Cid, CidError, MigrationId};
pub use envelope::{decode_answer, encode_answer};
pub use error::{ErrorKind, Failure};
pub use hex::HexBytes;

/// Version of these messages. A worker reports it in `info`; the controller refuses a worker
/// that speaks another one (naming both), instead of misreading it.
pub const PROTOCOL_VERSION: u16 = 1;
