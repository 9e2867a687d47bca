//! Sealing and authorising a migration: what travels between workers besides the QUIC state
//! itself. A connection moves as a [`ConnectionStateSnapshot`], which is serialized
//! ([`serialization`]), sealed with AES-256-GCM bound to the migration ([`encryption`]) and
//! authorised by a single-use HMAC token ([`token`]). Nothing here touches a socket or the clock:
//! callers pass bytes in and out and supply `now`. The orchestration of a migration is
//! `baton_orchestrator`'s; the messages are `baton_protocol`'s.
pub mod encryption;
pub mod ids;
pub mod pipeline;
pub mod protocol;
pub mod secret_file;
pub mod serialization;
pub mod snapshot;
pub mod token;

pub use encryption::{EncryptionKey, EncryptionService, PlaintextBuffer};
pub use ids::{ConnectionId, MigrationBinding, MigrationId, WorkerId};
pub use pipeline::{MigrationPipeline, SealedSnapshot};
pub use protocol::{Corruption, ErrorKind, MigrationError, TokenRejection};
pub use serialization::{Compression, EncodeStats, SerializationConfig, SerializationService};
pub use snapshot::{ConnectionStateSnapshot, SnapshotBuilder};
pub use token::{MigrationToken, MigrationTokenManager, TokenConfig, TokenSecret};
