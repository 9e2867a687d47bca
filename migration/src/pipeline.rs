//! The complete workflow: snapshot -> bincode -> compress -> chunk -> AES-GCM, and back.
use crate::encryption::{EncryptionService, PlaintextBuffer};
use crate::ids::MigrationBinding;
use crate::protocol::MigrationError;
use crate::serialization::{EncodeStats, SerializationService};
use crate::snapshot::ConnectionStateSnapshot;

/// A sealed snapshot ready to send, and what it took to make it.
#[derive(Debug)]
pub struct SealedSnapshot {
    pub bytes: Vec<u8>,
    pub stats: EncodeStats,
}

#[derive(Debug)]
pub struct MigrationPipeline {
    pub serialization: SerializationService,
    pub encryption: EncryptionService,
}

impl MigrationPipeline {
    pub fn new(serialization: SerializationService, encryption: EncryptionService) -> Self {
        Self {
            serialization,
            encryption,
        }
    }

    /// Encodes straight into the envelope buffer and encrypts it in place: the encoded state
    /// exists once, next to the snapshot.
    pub fn seal(
        &self,
        binding: &MigrationBinding,
        snapshot: &ConnectionStateSnapshot,
    ) -> Result<SealedSnapshot, MigrationError> {
        check_matches(binding, snapshot)?;
        // Compressed output is usually smaller than the payload; start there and let it grow.
        let mut buf = PlaintextBuffer::with_capacity(snapshot.payload_len() + 1024);
        let stats = self.serialization.encode(snapshot, &mut buf)?;
        let bytes = self.encryption.seal(binding, buf)?;
        Ok(SealedSnapshot { bytes, stats })
    }

    /// Decrypts in place and decodes. The snapshot must describe the migration it was sealed for.
    pub fn open(
        &self,
        binding: &MigrationBinding,
        mut sealed: Vec<u8>,
    ) -> Result<ConnectionStateSnapshot, MigrationError> {
        let plaintext = self.encryption.open_in_place(binding, &mut sealed)?;
        let snapshot = self.serialization.decode_slice(plaintext)?;
        check_matches(binding, &snapshot)?;
        Ok(snapshot)
    }
}

fn check_matches(
    binding: &MigrationBinding,
    s: &ConnectionStateSnapshot,
) -> Result<(), MigrationError> {
    if s.connection_id() != &binding.connection_id
        || s.source() != binding.source
        || s.target() != binding.target
    {
        return Err(MigrationError::InvalidSnapshot(format!(
            "snapshot is for connection {} from {} to {}, but the migration moves {} from {} to {}",
            s.connection_id(),
            s.source(),
            s.target(),
            binding.connection_id,
            binding.source,
            binding.target
        )));
    }
    Ok(())
}
