//! The one snapshot envelope: what travels between workers for one migrated connection.
//!
//! A [`ConnectionState`] (the QUIC handoff in the handoff crate's own wire format, and the
//! application's captured session) is encoded once ([`encode`]), sealed once with AES-256-GCM
//! bound to the migration ([`EncryptionService`]), and sent as one frame whose length is in the
//! peer channel's transfer header. No inner framing, chunking or compression: the peer stream is
//! reliable and ordered, the AEAD tag covers every byte, and compression does not pay for the
//! state a connection carries (docs/MIGRATION-PIPELINE.md, "Compression", has the figures).
//!
//! Sealed layout (every integer big-endian):
//!
//! ```text
//! "BTNE" | version (2) | key id u32 | instance id [12] | nonce [12]   header, authenticated (AAD)
//! ciphertext of:  handoff len u32 | handoff | app len u32 | app         exactly, nothing after
//! tag [16]
//! ```
//!
//! The associated data is the header followed by the [`MigrationBinding`] (migration id,
//! connection id, source, target). The version byte names the plaintext layout as well.
use std::fmt;
use zeroize::Zeroizing;

use crate::encryption::{
    ENVELOPE_HEADER_LEN, ENVELOPE_VERSION, EncryptionService, PlaintextBuffer, TAG_LEN,
};
use crate::ids::MigrationBinding;
use crate::protocol::{Corruption, MigrationError};

/// The envelope version this build seals and opens (it names the plaintext layout too).
pub const VERSION: u8 = ENVELOPE_VERSION;
/// Largest encoded state (handoff and application state with their lengths) sealed or opened.
/// A connection holds at most its `[limits]` windows and buffers (about 21 MiB with the
/// defaults); this leaves room for larger configured limits.
pub const MAX_STATE_LEN: usize = 64 << 20;
const _: () = assert!(MAX_STATE_LEN <= u32::MAX as usize, "lengths are u32");
/// Bytes the encoding adds to the handoff and application state (two u32 lengths).
pub const ENCODING_OVERHEAD: usize = 8;
/// Bytes sealing adds to the encoding (header and tag).
pub const SEAL_OVERHEAD: usize = ENVELOPE_HEADER_LEN + TAG_LEN;

/// One exported connection, as it moves: secrets included, so both buffers are zeroized on drop
/// and `Debug` shows only their lengths.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConnectionState {
    /// The QUIC state and TLS secrets (`baton_handoff::wire`'s format; opaque here).
    pub handoff: Zeroizing<Vec<u8>>,
    /// The application session (`AppSession::capture`; opaque here).
    pub app: Zeroizing<Vec<u8>>,
}

impl ConnectionState {
    pub fn new(handoff: Zeroizing<Vec<u8>>, app: Zeroizing<Vec<u8>>) -> Self {
        Self { handoff, app }
    }

    /// The length of [`encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        ENCODING_OVERHEAD + self.handoff.len() + self.app.len()
    }
}

impl fmt::Debug for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionState")
            .field("handoff_len", &self.handoff.len())
            .field("app_len", &self.app.len())
            .finish()
    }
}

/// `limit` is at most [`MAX_STATE_LEN`], so each length also fits its u32.
fn check_size(state: &ConnectionState, limit: usize) -> Result<(), MigrationError> {
    let size = state.encoded_len();
    if size > limit {
        return Err(MigrationError::SnapshotTooLarge {
            size: size as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

/// The plaintext encoding: `handoff len u32 | handoff | app len u32 | app`. Refuses (before
/// allocating) a state over [`MAX_STATE_LEN`].
pub fn encode(state: &ConnectionState) -> Result<Zeroizing<Vec<u8>>, MigrationError> {
    check_size(state, MAX_STATE_LEN)?;
    let mut out = Zeroizing::new(Vec::with_capacity(state.encoded_len()));
    for part in [&state.handoff, &state.app] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// Decodes what [`encode`] produced. Every length is checked against the bytes that are actually
/// there before anything is allocated; the input must end right after the application state.
pub fn decode(bytes: &[u8]) -> Result<ConnectionState, MigrationError> {
    if bytes.len() > MAX_STATE_LEN {
        return Err(MigrationError::corrupt(Corruption::TooLarge {
            limit: MAX_STATE_LEN as u64,
        }));
    }
    let mut rest = bytes;
    let mut part = |what: &str| -> Result<Zeroizing<Vec<u8>>, MigrationError> {
        let Some((len, after)) = rest.split_first_chunk::<4>() else {
            return Err(MigrationError::corrupt(Corruption::Truncated(format!(
                "inside the length of the {what}"
            ))));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > after.len() {
            return Err(MigrationError::corrupt(Corruption::Truncated(format!(
                "the {what} announces {len} bytes, {} follow",
                after.len()
            ))));
        }
        let (data, after) = after.split_at(len);
        rest = after;
        Ok(Zeroizing::new(data.to_vec()))
    };
    let handoff = part("handoff")?;
    let app = part("application state")?;
    if !rest.is_empty() {
        return Err(MigrationError::corrupt(Corruption::TrailingData));
    }
    Ok(ConnectionState { handoff, app })
}

/// Seals and opens [`ConnectionState`]s with the worker's key ring.
#[derive(Debug)]
pub struct SnapshotSealer {
    pub encryption: EncryptionService,
    /// Largest encoded state sealed or opened ([`MAX_STATE_LEN`] unless lowered).
    max_state_len: usize,
}

impl SnapshotSealer {
    pub fn new(encryption: EncryptionService) -> Self {
        Self {
            encryption,
            max_state_len: MAX_STATE_LEN,
        }
    }

    /// Lowers the largest state sealed or opened (at most [`MAX_STATE_LEN`]).
    pub fn with_max_state_len(mut self, limit: usize) -> Self {
        self.max_state_len = limit.min(MAX_STATE_LEN);
        self
    }

    pub fn max_state_len(&self) -> usize {
        self.max_state_len
    }

    /// Largest sealed envelope [`open`](Self::open) accepts.
    pub fn max_sealed_len(&self) -> usize {
        self.max_state_len + SEAL_OVERHEAD
    }

    /// Encodes `state` straight into the envelope buffer and encrypts it in place under the
    /// active key, bound to `binding`.
    pub fn seal(
        &self,
        binding: &MigrationBinding,
        state: &ConnectionState,
    ) -> Result<Vec<u8>, MigrationError> {
        check_size(state, self.max_state_len)?;
        let mut buf = PlaintextBuffer::with_capacity(state.encoded_len());
        for part in [&state.handoff, &state.app] {
            buf.extend_from_slice(&(part.len() as u32).to_be_bytes());
            buf.extend_from_slice(part);
        }
        self.encryption.seal(binding, buf)
    }

    /// Decrypts in place and decodes. An envelope over [`max_sealed_len`](Self::max_sealed_len)
    /// is refused before anything is decrypted; any altered, missing or added byte, or another
    /// binding, is `StateCorruption` (an altered key id names a key the ring lacks: `UnknownKey`).
    pub fn open(
        &self,
        binding: &MigrationBinding,
        sealed: Vec<u8>,
    ) -> Result<ConnectionState, MigrationError> {
        if sealed.len() > self.max_sealed_len() {
            return Err(MigrationError::SnapshotTooLarge {
                size: sealed.len() as u64,
                limit: self.max_sealed_len() as u64,
            });
        }
        // Holds the plaintext once decrypted: zeroized whatever happens next.
        let mut sealed = Zeroizing::new(sealed);
        let plaintext = self.encryption.open_in_place(binding, &mut sealed)?;
        decode(plaintext)
    }
}
