//! Baton's sans-IO migration pipeline.
//!
//! A live QUIC connection moves from a source worker to a target worker as a
//! [`ConnectionStateSnapshot`], which is serialized and compressed ([`serialization`]), sealed with
//! AES-256-GCM bound to the migration ([`encryption`]), authorised by a single-use HMAC token
//! ([`token`]) and driven by a [`MigrationStateMachine`]. Nothing here touches a socket or the
//! clock: callers pass bytes in and out and supply `now`.
pub mod encryption;
pub mod health;
pub mod ids;
pub mod metrics;
pub mod pipeline;
pub mod protocol;
pub mod secret_file;
pub mod serialization;
pub mod session;
pub mod snapshot;
pub mod state_machine;
pub mod token;

pub use encryption::{EncryptionKey, EncryptionService, PlaintextBuffer};
pub use health::{HealthChecker, HealthIssue, HealthReport, HealthStatus, HealthThresholds};
pub use ids::{ConnectionId, MigrationBinding, MigrationId, WorkerId};
pub use metrics::MigrationMetrics;
pub use pipeline::{MigrationPipeline, SealedSnapshot};
pub use protocol::{
    ConfirmationStatus, Corruption, ErrorKind, MigrationConfirmation, MigrationError,
    MigrationParty, MigrationRequest, TokenRejection,
};
pub use serialization::{Compression, EncodeStats, SerializationConfig, SerializationService};
pub use session::{Session, SessionConfig, SessionManager};
pub use snapshot::{ConnectionStateSnapshot, SnapshotBuilder};
pub use state_machine::{
    MigrationEvent, MigrationPhase, MigrationStateMachine, PhaseTimeouts, RollbackAction,
};
pub use token::{MigrationToken, MigrationTokenManager, TokenConfig, TokenSecret};
