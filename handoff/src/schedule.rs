//! Our own QUIC key schedule (RFC 9001 §5.1, §5.2, §6; RFC 8446 §7.1, §7.5) on `ring`.
//!
//! From a TLS 1.3 traffic secret: `quic key`, `quic iv`, `quic hp` give the packet and
//! header-protection keys, `quic ku` the next generation's secret. Header-protection keys always
//! come from generation 0; packet keys from the current generation.
use crate::secret::Secret;
use ring::{digest, hkdf};

/// The 1-RTT cipher suites we implement (and restrict TLS to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// TLS_AES_128_GCM_SHA256
    Aes128GcmSha256,
    /// TLS_AES_256_GCM_SHA384
    Aes256GcmSha384,
}

impl Suite {
    /// The suite whose hash produces secrets of this length.
    pub fn from_secret_len(len: usize) -> Option<Self> {
        match len {
            32 => Some(Self::Aes128GcmSha256),
            48 => Some(Self::Aes256GcmSha384),
            _ => None,
        }
    }

    pub fn from_rustls(suite: rustls::CipherSuite) -> Option<Self> {
        match suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Self::Aes128GcmSha256),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Self::Aes256GcmSha384),
            _ => None,
        }
    }

    pub(crate) fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Self::Aes128GcmSha256 => hkdf::HKDF_SHA256,
            Self::Aes256GcmSha384 => hkdf::HKDF_SHA384,
        }
    }

    pub(crate) fn digest(self) -> &'static digest::Algorithm {
        match self {
            Self::Aes128GcmSha256 => &digest::SHA256,
            Self::Aes256GcmSha384 => &digest::SHA384,
        }
    }

    pub(crate) fn aead(self) -> &'static ring::aead::Algorithm {
        match self {
            Self::Aes128GcmSha256 => &ring::aead::AES_128_GCM,
            Self::Aes256GcmSha384 => &ring::aead::AES_256_GCM,
        }
    }

    pub(crate) fn hp(self) -> &'static ring::aead::quic::Algorithm {
        match self {
            Self::Aes128GcmSha256 => &ring::aead::quic::AES_128,
            Self::Aes256GcmSha384 => &ring::aead::quic::AES_256,
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            Self::Aes128GcmSha256 => 16,
            Self::Aes256GcmSha384 => 32,
        }
    }

    pub fn hash_len(self) -> usize {
        self.digest().output_len()
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, context, len) of RFC 8446 §7.1 (the "tls13 " prefix added here).
pub fn hkdf_expand_label(
    suite: Suite,
    secret: &[u8],
    label: &[u8],
    context: &[u8],
    len: usize,
) -> Secret {
    expand_label(
        &hkdf::Prk::new_less_safe(suite.hkdf(), secret),
        label,
        context,
        len,
    )
}

fn expand_label(prk: &hkdf::Prk, label: &[u8], context: &[u8], len: usize) -> Secret {
    let out_len = (len as u16).to_be_bytes();
    let label_len = [6 + label.len() as u8];
    let context_len = [context.len() as u8];
    let info: [&[u8]; 6] = [
        &out_len,
        &label_len,
        b"tls13 ",
        label,
        &context_len,
        context,
    ];
    let mut out = zeroize::Zeroizing::new(vec![0u8; len]);
    prk.expand(&info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF output length is within bounds");
    Secret::new(&out)
}

/// The next key-update generation's secret (`quic ku`).
pub fn next_secret(suite: Suite, secret: &Secret) -> Secret {
    hkdf_expand_label(suite, secret.expose(), b"quic ku", &[], suite.hash_len())
}

/// Packet key and IV (`quic key`, `quic iv`) of a traffic secret.
pub fn packet_key_material(suite: Suite, secret: &Secret) -> (Secret, Secret) {
    (
        hkdf_expand_label(suite, secret.expose(), b"quic key", &[], suite.key_len()),
        hkdf_expand_label(suite, secret.expose(), b"quic iv", &[], 12),
    )
}

/// Header-protection key (`quic hp`) of a traffic secret.
pub fn header_key_material(suite: Suite, secret: &Secret) -> Secret {
    hkdf_expand_label(suite, secret.expose(), b"quic hp", &[], suite.key_len())
}

/// TLS 1.3 exporter (RFC 8446 §7.5) from the exporter master secret.
pub fn export_keying_material(
    suite: Suite,
    exporter_secret: &Secret,
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) {
    let empty = digest::digest(suite.digest(), &[]);
    let derived = hkdf_expand_label(
        suite,
        exporter_secret.expose(),
        label,
        empty.as_ref(),
        suite.hash_len(),
    );
    let ctx = digest::digest(suite.digest(), context);
    let okm = hkdf_expand_label(
        suite,
        derived.expose(),
        b"exporter",
        ctx.as_ref(),
        out.len(),
    );
    out.copy_from_slice(okm.expose());
}

/// QUIC v1 Initial secrets (RFC 9001 §5.2) for a client's first destination CID: (client, server).
pub fn initial_secrets(dst_cid: &[u8]) -> (Secret, Secret) {
    const SALT_V1: [u8; 20] = [
        0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c,
        0xad, 0xcc, 0xbb, 0x7f, 0x0a,
    ];
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &SALT_V1);
    let initial = salt.extract(dst_cid);
    (
        expand_label(&initial, b"client in", &[], 32),
        expand_label(&initial, b"server in", &[], 32),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Decodes the RFC 9001 test vectors' hex.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        lb_common::unhex(s).expect("hex")
    }

    /// RFC 9001 Appendix A.1.
    #[test]
    fn rfc9001_initial_keys() {
        let (client, server) = initial_secrets(&hex("8394c8f03e515708"));
        assert_eq!(
            client.expose(),
            &hex("c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea")[..]
        );
        assert_eq!(
            server.expose(),
            &hex("3c199828fd139efd216c155ad844cc81fb82fa8d7446fa7d78be803acdda951b")[..]
        );
        let suite = Suite::Aes128GcmSha256;
        let (key, iv) = packet_key_material(suite, &client);
        assert_eq!(key.expose(), &hex("1f369613dd76d5467730efcbe3b1a22d")[..]);
        assert_eq!(iv.expose(), &hex("fa044b2f42a3fd3b46fb255c")[..]);
        assert_eq!(
            header_key_material(suite, &client).expose(),
            &hex("9f50449e04a0e810283a1e9933adedd2")[..]
        );
        let (key, iv) = packet_key_material(suite, &server);
        assert_eq!(key.expose(), &hex("cf3a5331653c364c88f0f379b6067e37")[..]);
        assert_eq!(iv.expose(), &hex("0ac1493ca1905853b0bba03e")[..]);
        assert_eq!(
            header_key_material(suite, &server).expose(),
            &hex("c206b8d9b9f0f37644430b490eeaa314")[..]
        );
    }

    /// RFC 9001 Appendix A.5 (the key-update step is suite-independent given the hash).
    #[test]
    fn rfc9001_key_update_secret() {
        let secret = Secret::new(&hex(
            "9ac312a7f877468ebe69422748ad00a15443f18203a07d6060f688f30f21632b",
        ));
        let next = next_secret(Suite::Aes128GcmSha256, &secret);
        assert_eq!(
            next.expose(),
            &hex("1223504755036d556342ee9361d253421a826c9ecdf3c7148684b36b714881f9")[..]
        );
    }
}
