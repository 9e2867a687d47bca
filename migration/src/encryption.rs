//! AES-256-GCM sealing of encoded snapshots, with a key ring for rotation.
//!
//! Envelope: `magic "BTNE" | version | key id (u32 BE) | instance id (12) | nonce (12) |
//! ciphertext | tag (16)`; the plaintext is [`crate::envelope`]'s encoding. The associated data is the envelope header followed by the
//! [`MigrationBinding`], so a sealed snapshot only opens for the migration, connection, source
//! and target it was sealed for, and the header (key id, nonce) cannot be swapped either.
//!
//! Nonce scheme, and why it cannot repeat under one AES key: the AES-GCM key is never the master
//! key itself but a subkey `HMAC-SHA256(master, label | key id | instance id)`, where the
//! instance id is 96 random bits drawn when this [`EncryptionService`] is created. Within one
//! service, each subkey's nonce is a 64-bit counter that only moves forward (an atomic
//! increment that refuses to wrap), so one subkey never sees a nonce twice. Another process or
//! a restart holding the same master key derives a different subkey (its own instance id) and
//! starts its own counter there, so counters restarting at zero never meet an old subkey; two
//! instances would share a subkey only if their random 96-bit ids collided. No coordination or
//! persisted counter is needed between the workers that share a key.
use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{self, AeadInOut, KeyInit};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::ids::MigrationBinding;
use crate::protocol::{Corruption, MigrationError};

pub const ENVELOPE_MAGIC: [u8; 4] = *b"BTNE";
/// 2: the plaintext is `crate::envelope`'s encoding (1 held a chunked, compressed stream).
pub const ENVELOPE_VERSION: u8 = 2;
pub const KEY_LEN: usize = 32;
pub const INSTANCE_ID_LEN: usize = 12;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const ENVELOPE_HEADER_LEN: usize = 4 + 1 + 4 + INSTANCE_ID_LEN + NONCE_LEN;
const SUBKEY_LABEL: &[u8] = b"baton/migration/aead-subkey/v1";
/// Header plus the largest binding (16 + 1 + 20 + 4 + 4).
const MAX_AAD_LEN: usize = ENVELOPE_HEADER_LEN + 45;

/// A 256-bit master key. Zeroized on drop; `Debug` never shows it; not `Clone`, so each copy
/// is an explicit `from_bytes`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct EncryptionKey {
    bytes: [u8; KEY_LEN],
}

impl EncryptionKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self { bytes }
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MigrationError> {
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            MigrationError::InvalidKey(format!(
                "an AES-256 key is exactly {KEY_LEN} bytes, got {}; check how the key was generated or decoded",
                bytes.len()
            ))
        })?;
        Ok(Self { bytes })
    }

    /// The raw key, for distributing it to another worker over an authenticated channel.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    fn derive_subkey(&self, key_id: u32, instance: &[u8; INSTANCE_ID_LEN]) -> Aes256Gcm {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes).expect("HMAC takes any key length");
        mac.update(SUBKEY_LABEL);
        mac.update(&key_id.to_be_bytes());
        mac.update(instance);
        let subkey = Zeroizing::new(<[u8; KEY_LEN]>::from(mac.finalize().into_bytes()));
        Aes256Gcm::new_from_slice(subkey.as_slice()).expect("32-byte key")
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

struct KeyEntry {
    master: EncryptionKey,
    /// This instance's subkey (the aes crate zeroizes its round keys on drop).
    sealer: Aes256Gcm,
    next_nonce: AtomicU64,
}

/// Plaintext accumulated in place behind a reserved envelope header, so sealing encrypts without
/// copying. Write the encoded snapshot into it, then pass it to [`EncryptionService::seal`].
/// Zeroized if dropped unsealed (it holds secrets); reserve its final size up front, as a
/// growing buffer leaves unzeroized copies behind.
pub struct PlaintextBuffer {
    buf: Vec<u8>,
}

impl PlaintextBuffer {
    pub fn with_capacity(plaintext_len: usize) -> Self {
        let mut buf = Vec::with_capacity(ENVELOPE_HEADER_LEN + plaintext_len + TAG_LEN);
        buf.resize(ENVELOPE_HEADER_LEN, 0);
        Self { buf }
    }

    pub fn plaintext(&self) -> &[u8] {
        &self.buf[ENVELOPE_HEADER_LEN..]
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }
}

impl Drop for PlaintextBuffer {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

impl Write for PlaintextBuffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for PlaintextBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PlaintextBuffer({} bytes)",
            self.buf.len() - ENVELOPE_HEADER_LEN
        )
    }
}

/// The key ring: one active key seals, every non-retired key opens.
///
/// The ring sits behind a lock so a running worker can add, activate and retire keys (a reload of
/// `secrets.toml`) while other tasks seal and open; a seal or open holds the lock only to pick its
/// key (entries are shared, so each key's nonce counter survives ring changes).
pub struct EncryptionService {
    ring: RwLock<Ring>,
    instance: [u8; INSTANCE_ID_LEN],
}

struct Ring {
    keys: BTreeMap<u32, Arc<KeyEntry>>,
    retired: BTreeSet<u32>,
    active: u32,
}

impl Ring {
    fn missing(&self, key_id: u32) -> MigrationError {
        if self.retired.contains(&key_id) {
            MigrationError::RetiredKey { key_id }
        } else {
            MigrationError::UnknownKey { key_id }
        }
    }
}

impl EncryptionService {
    /// A ring whose first (active) key is `key` under `key_id`.
    pub fn new(key_id: u32, key: EncryptionKey) -> Self {
        let mut instance = [0u8; INSTANCE_ID_LEN];
        rand::rngs::OsRng.fill_bytes(&mut instance);
        let entry = Arc::new(Self::entry(&instance, key_id, key));
        Self {
            ring: RwLock::new(Ring {
                keys: BTreeMap::from([(key_id, entry)]),
                retired: BTreeSet::new(),
                active: key_id,
            }),
            instance,
        }
    }

    fn entry(instance: &[u8; INSTANCE_ID_LEN], key_id: u32, master: EncryptionKey) -> KeyEntry {
        let sealer = master.derive_subkey(key_id, instance);
        KeyEntry {
            master,
            sealer,
            next_nonce: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        // A panic elsewhere cannot leave the ring half-changed (each change is one assignment).
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a key that opens envelopes; it seals only once [`activate`](Self::activate)d.
    /// Distribute a new key to every worker with `add_key` first, then activate it.
    pub fn add_key(&self, key_id: u32, key: EncryptionKey) -> Result<(), MigrationError> {
        let entry = Arc::new(Self::entry(&self.instance, key_id, key));
        let mut ring = self.write();
        if ring.keys.contains_key(&key_id) || ring.retired.contains(&key_id) {
            return Err(MigrationError::Config(format!(
                "key id {key_id} is already used; key ids are never reused"
            )));
        }
        ring.keys.insert(key_id, entry);
        tracing::info!(key_id, "encryption key added");
        Ok(())
    }

    pub fn activate(&self, key_id: u32) -> Result<(), MigrationError> {
        let mut ring = self.write();
        if !ring.keys.contains_key(&key_id) {
            return Err(ring.missing(key_id));
        }
        ring.active = key_id;
        tracing::info!(key_id, "encryption key activated for sealing");
        Ok(())
    }

    /// `add_key` + `activate`: older keys keep opening until retired.
    pub fn rotate(&self, key_id: u32, key: EncryptionKey) -> Result<(), MigrationError> {
        self.add_key(key_id, key)?;
        self.activate(key_id)
    }

    /// Drops (and zeroizes, once no seal or open still uses it) a key; envelopes sealed with it
    /// then fail with `RetiredKey`.
    pub fn retire(&self, key_id: u32) -> Result<(), MigrationError> {
        let mut ring = self.write();
        if key_id == ring.active {
            return Err(MigrationError::Config(format!(
                "key id {key_id} is the active sealing key; activate another key before retiring it"
            )));
        }
        if ring.keys.remove(&key_id).is_none() {
            return Err(ring.missing(key_id));
        }
        ring.retired.insert(key_id);
        tracing::info!(key_id, "encryption key retired");
        Ok(())
    }

    pub fn active_key_id(&self) -> u32 {
        self.read().active
    }

    /// The ids of the keys that open envelopes (the active one among them).
    pub fn key_ids(&self) -> Vec<u32> {
        self.read().keys.keys().copied().collect()
    }

    /// Whether `key_id` was used and retired (ids are never reused).
    pub fn is_retired(&self, key_id: u32) -> bool {
        self.read().retired.contains(&key_id)
    }

    /// Encrypts the buffer in place under the active key and returns the envelope.
    pub fn seal(
        &self,
        binding: &MigrationBinding,
        plaintext: PlaintextBuffer,
    ) -> Result<Vec<u8>, MigrationError> {
        let (key_id, entry) = {
            let ring = self.read();
            let entry = ring.keys.get(&ring.active).cloned();
            (
                ring.active,
                entry.expect("the active key is always in the ring"),
            )
        };
        let counter = entry
            .next_nonce
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .map_err(|_| MigrationError::NonceExhausted { key_id })?;
        let mut plaintext = plaintext;
        let mut buf = std::mem::take(&mut plaintext.buf);
        let header = &mut buf[..ENVELOPE_HEADER_LEN];
        header[..4].copy_from_slice(&ENVELOPE_MAGIC);
        header[4] = ENVELOPE_VERSION;
        header[5..9].copy_from_slice(&key_id.to_be_bytes());
        header[9..9 + INSTANCE_ID_LEN].copy_from_slice(&self.instance);
        let nonce_at = 9 + INSTANCE_ID_LEN;
        header[nonce_at..nonce_at + 4].fill(0);
        header[nonce_at + 4..ENVELOPE_HEADER_LEN].copy_from_slice(&counter.to_be_bytes());
        let (header, body) = buf.split_at_mut(ENVELOPE_HEADER_LEN);
        let aad = associated_data(header, binding);
        let tag = entry
            .sealer
            .encrypt_inout_detached(&nonce(&header[nonce_at..]), &aad, body.into())
            .map_err(|_| MigrationError::SnapshotTooLarge {
                size: body.len() as u64,
                limit: 1 << 36,
            });
        let tag = match tag {
            Ok(tag) => tag,
            Err(e) => {
                // Refused before encrypting: the buffer still holds the plaintext.
                buf.zeroize();
                return Err(e);
            }
        };
        buf.extend_from_slice(&tag);
        Ok(buf)
    }

    /// Convenience: copies `plaintext` into a buffer and seals it.
    pub fn seal_slice(
        &self,
        binding: &MigrationBinding,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, MigrationError> {
        let mut buf = PlaintextBuffer::with_capacity(plaintext.len());
        buf.buf.extend_from_slice(plaintext);
        self.seal(binding, buf)
    }

    /// Decrypts in place and returns the plaintext part of `envelope`. Any altered byte of the
    /// header, ciphertext, tag or binding gives `StateCorruption(AuthenticationFailed)`.
    pub fn open_in_place<'a>(
        &self,
        binding: &MigrationBinding,
        envelope: &'a mut [u8],
    ) -> Result<&'a [u8], MigrationError> {
        if envelope.len() < ENVELOPE_HEADER_LEN + TAG_LEN {
            return Err(MigrationError::corrupt(Corruption::Truncated(format!(
                "envelope of {} bytes is shorter than header and tag ({})",
                envelope.len(),
                ENVELOPE_HEADER_LEN + TAG_LEN
            ))));
        }
        if envelope[..4] != ENVELOPE_MAGIC {
            return Err(MigrationError::corrupt(Corruption::BadHeader(
                "not a Baton envelope (bad magic)".into(),
            )));
        }
        if envelope[4] != ENVELOPE_VERSION {
            return Err(MigrationError::corrupt(Corruption::BadHeader(format!(
                "envelope version {} (this build reads {ENVELOPE_VERSION})",
                envelope[4]
            ))));
        }
        let key_id = u32::from_be_bytes(envelope[5..9].try_into().expect("4 bytes"));
        let entry = {
            let ring = self.read();
            ring.keys
                .get(&key_id)
                .cloned()
                .ok_or_else(|| ring.missing(key_id))?
        };
        let instance: [u8; INSTANCE_ID_LEN] = envelope[9..9 + INSTANCE_ID_LEN]
            .try_into()
            .expect("12 bytes");
        let derived;
        let cipher = if instance == self.instance {
            &entry.sealer
        } else {
            derived = entry.master.derive_subkey(key_id, &instance);
            &derived
        };
        let total = envelope.len();
        let (header, rest) = envelope.split_at_mut(ENVELOPE_HEADER_LEN);
        let (body, tag) = rest.split_at_mut(total - ENVELOPE_HEADER_LEN - TAG_LEN);
        let aad = associated_data(header, binding);
        let nonce_at = 9 + INSTANCE_ID_LEN;
        cipher
            .decrypt_inout_detached(&nonce(&header[nonce_at..]), &aad, body.into(), &tag_of(tag))
            .map_err(|_| MigrationError::corrupt(Corruption::AuthenticationFailed))?;
        Ok(body)
    }

    /// Convenience: opens a copy of `envelope`.
    pub fn open(
        &self,
        binding: &MigrationBinding,
        envelope: &[u8],
    ) -> Result<Vec<u8>, MigrationError> {
        let mut copy = envelope.to_vec();
        let n = self.open_in_place(binding, &mut copy)?.len();
        copy.truncate(ENVELOPE_HEADER_LEN + n);
        copy.drain(..ENVELOPE_HEADER_LEN);
        Ok(copy)
    }
}

impl fmt::Debug for EncryptionService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.read();
        f.debug_struct("EncryptionService")
            .field("active_key_id", &ring.active)
            .field("key_ids", &ring.keys.keys().collect::<Vec<_>>())
            .field("retired_key_ids", &ring.retired)
            .finish_non_exhaustive()
    }
}

fn nonce(bytes: &[u8]) -> aead::Nonce<Aes256Gcm> {
    aead::Nonce::<Aes256Gcm>::try_from(bytes).expect("12-byte nonce slice")
}

fn tag_of(bytes: &[u8]) -> aead::Tag<Aes256Gcm> {
    aead::Tag::<Aes256Gcm>::try_from(bytes).expect("16-byte tag slice")
}

fn associated_data(header: &[u8], binding: &MigrationBinding) -> Vec<u8> {
    let mut aad = Vec::with_capacity(MAX_AAD_LEN);
    aad.extend_from_slice(header);
    binding.encode_into(&mut aad);
    aad
}
