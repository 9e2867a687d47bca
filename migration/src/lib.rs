//! Sealing and authorising a migration: what travels between workers besides the QUIC state
//! itself. A connection moves as a [`ConnectionState`], encoded and sealed once with AES-256-GCM
//! bound to the migration ([`envelope`], keys in [`encryption`]), and authorised by a single-use
//! HMAC token ([`token`]). Nothing here touches a socket or the clock: callers pass bytes in and
//! out and supply `now`. The orchestration of a migration is `baton_orchestrator`'s; the messages
//! are `baton_protocol`'s.
pub mod encryption;
pub mod envelope;
pub mod ids;
pub mod protocol;
pub mod secret_file;
pub mod token;

pub use encryption::{EncryptionKey, EncryptionService, PlaintextBuffer};
pub use envelope::{ConnectionState, SnapshotSealer};
pub use ids::{ConnectionId, MigrationBinding, MigrationId, WorkerId};
pub use protocol::{Corruption, ErrorKind, MigrationError, TokenRejection};
pub use token::{MigrationToken, MigrationTokenManager, TokenConfig, TokenSecret};
