//! `quinn_proto::crypto::{PacketKey, HeaderKey}` on ring, built from our key schedule.
use crate::schedule::{self, Suite};
use crate::secret::Secret;
use bytes::BytesMut;
use quinn_proto::crypto::{CryptoError, HeaderKey, KeyPair, Keys, PacketKey};
use ring::aead;
use zeroize::Zeroize;

/// AEAD packet protection (AES-GCM) for one direction and one key-update generation.
pub struct GcmPacketKey {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
}

impl GcmPacketKey {
    pub fn from_secret(suite: Suite, secret: &Secret) -> Self {
        let (key, iv) = schedule::packet_key_material(suite, secret);
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(suite.aead(), key.expose()).expect("key length matches suite"),
        );
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce.copy_from_slice(iv.expose());
        Self { key, iv: nonce }
    }

    fn nonce(&self, packet: u64) -> aead::Nonce {
        let mut nonce = self.iv;
        for (n, p) in nonce[4..].iter_mut().zip(packet.to_be_bytes()) {
            *n ^= p;
        }
        aead::Nonce::assume_unique_for_key(nonce)
    }
}

impl Drop for GcmPacketKey {
    fn drop(&mut self) {
        // ring zeroizes nothing it does not own; our copy of the IV we clear ourselves.
        self.iv.zeroize();
    }
}

impl PacketKey for GcmPacketKey {
    fn encrypt(&self, packet: u64, buf: &mut [u8], header_len: usize) {
        let tag_len = self.tag_len();
        let (header, rest) = buf.split_at_mut(header_len);
        let (payload, tag_out) = rest.split_at_mut(rest.len() - tag_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(packet), aead::Aad::from(&*header), payload)
            .expect("AES-GCM sealing cannot fail for QUIC-sized packets");
        tag_out.copy_from_slice(tag.as_ref());
    }

    fn decrypt(
        &self,
        packet: u64,
        header: &[u8],
        payload: &mut BytesMut,
    ) -> Result<(), CryptoError> {
        let plain_len = self
            .key
            .open_in_place(
                self.nonce(packet),
                aead::Aad::from(header),
                payload.as_mut(),
            )
            .map_err(|_| CryptoError)?
            .len();
        payload.truncate(plain_len);
        Ok(())
    }

    fn tag_len(&self) -> usize {
        self.key.algorithm().tag_len()
    }

    fn confidentiality_limit(&self) -> u64 {
        // RFC 9001 §6.6: 2^23 packets for AES-GCM.
        1 << 23
    }

    fn integrity_limit(&self) -> u64 {
        1 << 52
    }
}

/// AES header protection (RFC 9001 §5.4.3).
pub struct AesHeaderKey {
    key: aead::quic::HeaderProtectionKey,
}

impl AesHeaderKey {
    pub fn from_secret(suite: Suite, secret: &Secret) -> Self {
        let hp = schedule::header_key_material(suite, secret);
        Self {
            key: aead::quic::HeaderProtectionKey::new(suite.hp(), hp.expose())
                .expect("hp key length matches suite"),
        }
    }

    fn mask(&self, pn_offset: usize, packet: &[u8]) -> [u8; 5] {
        let sample = &packet[pn_offset + 4..pn_offset + 4 + self.sample_size()];
        self.key
            .new_mask(sample)
            .expect("sample has the right length")
    }
}

fn first_byte_mask(first: u8) -> u8 {
    if first & 0x80 != 0 { 0x0f } else { 0x1f }
}

impl HeaderKey for AesHeaderKey {
    fn decrypt(&self, pn_offset: usize, packet: &mut [u8]) {
        let mask = self.mask(pn_offset, packet);
        packet[0] ^= mask[0] & first_byte_mask(packet[0]);
        let pn_len = (packet[0] & 0x03) as usize + 1;
        for i in 0..pn_len {
            packet[pn_offset + i] ^= mask[1 + i];
        }
    }

    fn encrypt(&self, pn_offset: usize, packet: &mut [u8]) {
        let mask = self.mask(pn_offset, packet);
        let pn_len = (packet[0] & 0x03) as usize + 1;
        packet[0] ^= mask[0] & first_byte_mask(packet[0]);
        for i in 0..pn_len {
            packet[pn_offset + i] ^= mask[1 + i];
        }
    }

    fn sample_size(&self) -> usize {
        self.key.algorithm().sample_len()
    }
}

/// Packet keys of one generation, for a server: we send with the server secret, receive with the client's.
pub fn server_packet_keys(
    suite: Suite,
    client: &Secret,
    server: &Secret,
) -> KeyPair<Box<dyn PacketKey>> {
    KeyPair {
        local: Box::new(GcmPacketKey::from_secret(suite, server)),
        remote: Box::new(GcmPacketKey::from_secret(suite, client)),
    }
}

/// Server-side 1-RTT keys: header protection from generation 0, packet protection from the current one.
pub fn server_keys(
    suite: Suite,
    client0: &Secret,
    server0: &Secret,
    client_n: &Secret,
    server_n: &Secret,
) -> Keys {
    Keys {
        header: KeyPair {
            local: Box::new(AesHeaderKey::from_secret(suite, server0)),
            remote: Box::new(AesHeaderKey::from_secret(suite, client0)),
        },
        packet: server_packet_keys(suite, client_n, server_n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::tests::hex;

    /// RFC 9001 Appendix A.3: the server's Initial, header protection and all.
    #[test]
    fn rfc9001_server_initial_protection() {
        let (_, server) = schedule::initial_secrets(&hex("8394c8f03e515708"));
        let suite = Suite::Aes128GcmSha256;
        let header = hex("c1000000010008f067a5502a4262b50040750001");
        let payload = hex(
            "02000000000600405a020000560303eefce7f7b37ba1d1632e96677825ddf73988cfc79825df566dc5430b9a045a1200130100002e00330024001d00209d3c940d89690b84d08a60993c144eca684d1081287c834d5311bcf32bb9da1a002b00020304",
        );
        let mut packet = header.clone();
        packet.extend_from_slice(&payload);
        packet.extend_from_slice(&[0; 16]);
        let pk = GcmPacketKey::from_secret(suite, &server);
        pk.encrypt(1, &mut packet, header.len());
        let hk = AesHeaderKey::from_secret(suite, &server);
        hk.encrypt(header.len() - 2, &mut packet);
        let expected = hex(
            "cf000000010008f067a5502a4262b5004075c0d95a482cd0991cd25b0aac406a5816b6394100f37a1c69797554780bb38cc5a99f5ede4cf73c3ec2493a1839b3dbcba3f6ea46c5b7684df3548e7ddeb9c3bf9c73cc3f3bded74b562bfb19fb84022f8ef4cdd93795d77d06edbb7aaf2f58891850abbdca3d20398c276456cbc42158407dd074ee",
        );
        assert_eq!(packet, expected);
        // And back.
        hk.decrypt(header.len() - 2, &mut packet);
        assert_eq!(&packet[..header.len()], &header[..]);
        let mut body = BytesMut::from(&packet[header.len()..]);
        pk.decrypt(1, &header, &mut body).unwrap();
        assert_eq!(&body[..], &payload[..]);
    }
}
