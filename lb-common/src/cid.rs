//! QUIC-LB connection-ID layout, plaintext mode (draft-ietf-quic-load-balancers).
//!
//! ```text
//! First Octet { Config Rotation (3), CID Length - 1 (5) } | Server ID (server_id_len) | Nonce (>= 4)
//! ```
//! The same code decodes in the XDP program and encodes in the worker's CID generator, so the two
//! can never disagree about where the server ID sits.

/// Longest connection ID QUIC v1 allows.
pub const MAX_CID_LEN: usize = 20;
/// We keep server IDs in a u64 map key, so at most 8 bytes (the draft allows 15).
pub const MAX_SERVER_ID_LEN: usize = 8;
/// The draft requires a nonce of at least 4 bytes so CIDs stay unlinkable.
pub const MIN_NONCE_LEN: usize = 4;
/// Config-rotation value the draft reserves for "this CID carries no routing information".
pub const CR_UNROUTABLE: u8 = 0b111;

/// Why a layout is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// `cid_len` must be 1..=20.
    CidLength,
    /// `server_id_len` must be 1..=8.
    ServerIdLength,
    /// `cid_len - 1 - server_id_len` must be at least [`MIN_NONCE_LEN`].
    NonceTooShort,
    /// Config rotation must be 0..=6 (7 means unroutable).
    ConfigRotation,
    /// The server ID does not fit in `server_id_len` bytes.
    ServerIdTooLarge,
}

impl LayoutError {
    pub const fn describe(self) -> &'static str {
        match self {
            LayoutError::CidLength => "cid_len must be between 1 and 20",
            LayoutError::ServerIdLength => "server_id_len must be between 1 and 8",
            LayoutError::NonceTooShort => {
                "cid_len - 1 - server_id_len must leave a nonce of at least 4 bytes"
            }
            LayoutError::ConfigRotation => {
                "config rotation must be 0..=6 (7 is reserved for unroutable CIDs)"
            }
            LayoutError::ServerIdTooLarge => "server id does not fit in server_id_len bytes",
        }
    }
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Where the server ID sits in a server-issued connection ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidLayout {
    cid_len: u8,
    server_id_len: u8,
}

impl Default for CidLayout {
    /// 8-byte CIDs with a 2-byte server ID (5-byte nonce).
    fn default() -> Self {
        Self {
            cid_len: 8,
            server_id_len: 2,
        }
    }
}

impl CidLayout {
    pub const fn new(cid_len: u8, server_id_len: u8) -> Result<Self, LayoutError> {
        if cid_len == 0 || cid_len as usize > MAX_CID_LEN {
            return Err(LayoutError::CidLength);
        }
        if server_id_len == 0 || server_id_len as usize > MAX_SERVER_ID_LEN {
            return Err(LayoutError::ServerIdLength);
        }
        if (cid_len as usize) < 1 + server_id_len as usize + MIN_NONCE_LEN {
            return Err(LayoutError::NonceTooShort);
        }
        Ok(Self {
            cid_len,
            server_id_len,
        })
    }

    pub const fn cid_len(&self) -> usize {
        self.cid_len as usize
    }

    pub const fn server_id_len(&self) -> usize {
        self.server_id_len as usize
    }

    pub const fn nonce_len(&self) -> usize {
        self.cid_len as usize - 1 - self.server_id_len as usize
    }

    /// Largest server ID this layout can carry.
    pub const fn max_server_id(&self) -> u64 {
        if self.server_id_len as usize >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * self.server_id_len as u32)) - 1
        }
    }

    /// The first octet: config rotation in the top 3 bits, `cid_len - 1` in the low 5 bits.
    pub const fn first_octet(&self, config_rotation: u8) -> u8 {
        (config_rotation << 5) | ((self.cid_len - 1) & 0x1f)
    }

    /// Writes a routable CID into `out[..cid_len]`. `nonce` supplies at least `nonce_len` bytes
    /// (the worker passes fresh random bytes).
    pub fn encode(
        &self,
        config_rotation: u8,
        server_id: u64,
        nonce: &[u8],
        out: &mut [u8],
    ) -> Result<(), LayoutError> {
        if config_rotation >= CR_UNROUTABLE {
            return Err(LayoutError::ConfigRotation);
        }
        if server_id > self.max_server_id() {
            return Err(LayoutError::ServerIdTooLarge);
        }
        let (sid_len, nonce_len) = (self.server_id_len(), self.nonce_len());
        if out.len() < self.cid_len() || nonce.len() < nonce_len {
            return Err(LayoutError::CidLength);
        }
        out[0] = self.first_octet(config_rotation);
        let sid_bytes = server_id.to_be_bytes();
        out[1..1 + sid_len].copy_from_slice(&sid_bytes[8 - sid_len..]);
        out[1 + sid_len..self.cid_len()].copy_from_slice(&nonce[..nonce_len]);
        Ok(())
    }

    /// The server ID a CID carries, or `None` if it is too short for the layout or marked
    /// unroutable (config rotation `0b111`): the caller then falls back to hashing.
    #[inline(always)]
    pub fn decode_server_id(&self, cid: &[u8]) -> Option<u64> {
        let sid_len = self.server_id_len();
        if cid.len() < 1 + sid_len || sid_len > MAX_SERVER_ID_LEN {
            return None;
        }
        if config_rotation(cid[0]) == CR_UNROUTABLE {
            return None;
        }
        let mut id = 0u64;
        let mut i = 0;
        while i < sid_len {
            id = (id << 8) | cid[1 + i] as u64;
            i += 1;
        }
        Some(id)
    }
}

impl CidLayout {
    /// [`CidLayout::decode_server_id`] over a CID key's words (`crate::cid_key_words`): what the
    /// XDP program runs, a byte swap and a shift instead of a loop. `words[0]` holds the key's
    /// length byte and the CID's first 7 bytes, `words[1]` the next 8.
    #[inline(always)]
    pub fn decode_server_id_words(&self, words: &[u64; 3]) -> Option<u64> {
        decode_server_id_words(self.server_id_len(), words)
    }
}

/// [`CidLayout::decode_server_id_words`] given only the server ID length: the one definition of
/// the word decoder. The XDP program calls it directly where it already knows the layout is
/// valid (its fast path, whose flag userspace sets only for a valid layout), so it does not
/// validate the layout again per packet; a `server_id_len` outside 1..=8 decodes nothing.
#[inline(always)]
pub fn decode_server_id_words(server_id_len: usize, words: &[u64; 3]) -> Option<u64> {
    let cid_len = (words[0] & 0xff) as usize;
    if cid_len < 1 + server_id_len || server_id_len == 0 || server_id_len > MAX_SERVER_ID_LEN {
        return None;
    }
    if config_rotation((words[0] >> 8) as u8) == CR_UNROUTABLE {
        return None;
    }
    // Key bytes 2..10 (CID bytes 1..9), lowest address in the lowest byte.
    let after_first = (words[0] >> 16) | (words[1] << 48);
    Some(after_first.swap_bytes() >> (64 - 8 * server_id_len as u32))
}

/// The config-rotation bits of a CID's first octet.
#[inline(always)]
pub const fn config_rotation(first_octet: u8) -> u8 {
    first_octet >> 5
}

/// The CID length a first octet claims (its low 5 bits hold `length - 1`, as our servers write it).
#[inline(always)]
pub const fn self_described_len(first_octet: u8) -> usize {
    (first_octet & 0x1f) as usize + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_validation_names_the_problem() {
        assert_eq!(CidLayout::new(0, 2), Err(LayoutError::CidLength));
        assert_eq!(CidLayout::new(21, 2), Err(LayoutError::CidLength));
        assert_eq!(CidLayout::new(8, 0), Err(LayoutError::ServerIdLength));
        assert_eq!(CidLayout::new(8, 9), Err(LayoutError::ServerIdLength));
        assert_eq!(CidLayout::new(8, 4), Err(LayoutError::NonceTooShort));
        assert!(CidLayout::new(8, 3).is_ok());
        assert_eq!(CidLayout::default().nonce_len(), 5);
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let layout = CidLayout::new(12, 3).unwrap();
        let mut cid = [0u8; 12];
        layout.encode(2, 0xabcdef, &[9; 8], &mut cid).unwrap();
        assert_eq!(cid[0], (2 << 5) | 11);
        assert_eq!(layout.decode_server_id(&cid), Some(0xabcdef));
    }

    fn hex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        let bytes = crate::text::unhex(s).expect("hex");
        out[..bytes.len()].copy_from_slice(&bytes);
        out
    }

    /// draft-ietf-quic-load-balancers, "Load Balancer Test Vectors", "Unencrypted CIDs", first row:
    /// cr_bits 0, sid c4605e, nonce 4504cc4f, cid 07c4605e4504cc4f (the server encodes the length).
    #[test]
    fn draft_plaintext_vector_1() {
        let layout = CidLayout::new(8, 3).unwrap();
        let mut cid = [0u8; 8];
        layout
            .encode(0, 0xc4605e, &hex("4504cc4f")[..4], &mut cid)
            .unwrap();
        assert_eq!(cid, hex("07c4605e4504cc4f")[..8]);
        assert_eq!(layout.decode_server_id(&cid), Some(0xc4605e));
        assert_eq!(config_rotation(cid[0]), 0);
        assert_eq!(self_described_len(cid[0]), 8);
    }

    /// Second row: cr_bits 1, sid 350d28b420, nonce 3487d970b, cid 20a350d28b4203487d970b.
    /// The row is garbled in the draft: the nonce has 9 hex digits and the CID 22, so neither is
    /// whole bytes. Its intent is unambiguous though: 1 + 5 + 5 = 11 bytes, so the first octet is
    /// cr 1 and length 10 = 0x2a (the draft printed "2" "0a"), followed by the server ID. We check
    /// that much, with the nonce's missing last digit taken as 0.
    #[test]
    fn draft_plaintext_vector_2() {
        let layout = CidLayout::new(11, 5).unwrap();
        let nonce = hex("3487d970b0");
        let mut cid = [0u8; 11];
        layout
            .encode(1, 0x350d28b420, &nonce[..5], &mut cid)
            .unwrap();
        assert_eq!(cid, hex("2a350d28b4203487d970b0")[..11]);
        assert_eq!(cid[0], 0x2a);
        assert_eq!(layout.decode_server_id(&cid), Some(0x350d28b420));
        assert_eq!(config_rotation(cid[0]), 1);
        assert_eq!(self_described_len(cid[0]), 11);
    }

    #[test]
    fn word_decoder_agrees_with_the_byte_decoder() {
        for sid_len in 1..=8u8 {
            for cid_len in (1 + sid_len + 4)..=20 {
                let layout = CidLayout::new(cid_len, sid_len).unwrap();
                for seed in 0..50u64 {
                    let mut cid = [0u8; 20];
                    for (i, b) in cid.iter_mut().enumerate() {
                        *b = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (i % 8 * 8)) as u8
                            ^ i as u8;
                    }
                    let cid = &cid[..cid_len as usize];
                    let words = crate::cid_key_words(&crate::CidKey::new(cid).unwrap());
                    assert_eq!(
                        layout.decode_server_id_words(&words),
                        layout.decode_server_id(cid),
                        "{cid:02x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn unroutable_and_short_cids_fall_back() {
        let layout = CidLayout::default();
        let mut cid = [0u8; 8];
        layout.encode(0, 7, &[1; 5], &mut cid).unwrap();
        cid[0] |= CR_UNROUTABLE << 5;
        assert_eq!(layout.decode_server_id(&cid), None);
        assert_eq!(layout.decode_server_id(&[0x07, 1]), None);
        assert_eq!(
            layout.encode(7, 1, &[0; 5], &mut cid),
            Err(LayoutError::ConfigRotation)
        );
        assert_eq!(
            layout.encode(0, 0x1_0000, &[0; 5], &mut cid),
            Err(LayoutError::ServerIdTooLarge)
        );
    }
}
