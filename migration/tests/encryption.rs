mod common;

use common::{binding, mixed_bytes};
use migration::encryption::{ENVELOPE_HEADER_LEN, TAG_LEN};
use migration::{
    ConnectionId, Corruption, EncryptionKey, EncryptionService, MigrationError, MigrationId,
    WorkerId,
};
use proptest::prelude::*;

fn key(n: u8) -> EncryptionKey {
    EncryptionKey::from_bytes(&[n; 32]).unwrap()
}

fn auth_failed(r: Result<Vec<u8>, MigrationError>) -> bool {
    matches!(
        r,
        Err(MigrationError::StateCorruption(
            Corruption::AuthenticationFailed
        ))
    )
}

#[test]
fn round_trip_and_envelope_size() {
    let svc = EncryptionService::new(1, EncryptionKey::generate());
    let data = mixed_bytes(5000, 9);
    let sealed = svc.seal_slice(&binding(), &data).unwrap();
    assert_eq!(sealed.len(), ENVELOPE_HEADER_LEN + data.len() + TAG_LEN);
    assert_ne!(
        &sealed[ENVELOPE_HEADER_LEN..ENVELOPE_HEADER_LEN + 64],
        &data[..64]
    );
    assert_eq!(svc.open(&binding(), &sealed).unwrap(), data);
    assert_eq!(
        svc.open(&binding(), &svc.seal_slice(&binding(), &[]).unwrap())
            .unwrap(),
        Vec::<u8>::new()
    );
}

#[test]
fn flipping_any_byte_of_header_ciphertext_or_tag_fails() {
    let svc = EncryptionService::new(1, key(1));
    let sealed = svc.seal_slice(&binding(), &mixed_bytes(100, 1)).unwrap();
    for i in 0..sealed.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = sealed.clone();
            t[i] ^= bit;
            let r = svc.open(&binding(), &t);
            match i {
                // magic and version: refused before decryption
                0..=4 => assert!(
                    matches!(
                        r,
                        Err(MigrationError::StateCorruption(Corruption::BadHeader(_)))
                    ),
                    "byte {i}: {r:?}"
                ),
                // key id: now names a key the ring does not hold
                5..=8 => assert!(
                    matches!(r, Err(MigrationError::UnknownKey { .. })),
                    "byte {i}: {r:?}"
                ),
                _ => assert!(auth_failed(r), "byte {i} bit {bit:#x}"),
            }
        }
    }
}

#[test]
fn any_change_to_the_binding_fails() {
    let svc = EncryptionService::new(1, key(1));
    let b = binding();
    let sealed = svc.seal_slice(&b, b"state").unwrap();
    let mut other = b.clone();
    other.migration_id = MigrationId([8; 16]);
    assert!(auth_failed(svc.open(&other, &sealed)));
    let mut other = b.clone();
    other.connection_id = ConnectionId::new(&[9; 8]).unwrap();
    assert!(auth_failed(svc.open(&other, &sealed)));
    let mut other = b.clone();
    other.source = WorkerId(3);
    assert!(auth_failed(svc.open(&other, &sealed)));
    let mut other = b.clone();
    other.target = WorkerId(3);
    assert!(auth_failed(svc.open(&other, &sealed)));
    // Swapped source and target is a different migration too.
    let mut other = b.clone();
    std::mem::swap(&mut other.source, &mut other.target);
    assert!(auth_failed(svc.open(&other, &sealed)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn flipping_any_binding_byte_fails(idx in 0usize..(16 + 8 + 8), bit in 0u8..8) {
        let svc = EncryptionService::new(1, key(1));
        let b = binding();
        let sealed = svc.seal_slice(&b, b"state").unwrap();
        let mut id = b.migration_id.0;
        let mut cid = b.connection_id.as_bytes().to_vec();
        let mut src = b.source.0.to_be_bytes();
        let mut dst = b.target.0.to_be_bytes();
        match idx {
            0..16 => id[idx] ^= 1 << bit,
            16..24 => cid[idx - 16] ^= 1 << bit,
            24..28 => src[idx - 24] ^= 1 << bit,
            _ => dst[idx - 28] ^= 1 << bit,
        }
        let other = migration::MigrationBinding {
            migration_id: MigrationId(id),
            connection_id: ConnectionId::new(&cid).unwrap(),
            source: WorkerId(u32::from_be_bytes(src)),
            target: WorkerId(u32::from_be_bytes(dst)),
        };
        prop_assert!(auth_failed(svc.open(&other, &sealed)));
    }
}

#[test]
fn truncated_envelope_is_corruption() {
    let svc = EncryptionService::new(1, key(1));
    let sealed = svc.seal_slice(&binding(), b"hello").unwrap();
    for len in 0..sealed.len() {
        let r = svc.open(&binding(), &sealed[..len]);
        assert!(
            matches!(r, Err(MigrationError::StateCorruption(_))),
            "len {len}: {r:?}"
        );
    }
}

#[test]
fn nonces_never_repeat_within_an_instance() {
    let svc = EncryptionService::new(1, key(1));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        let sealed = svc.seal_slice(&binding(), b"x").unwrap();
        assert!(
            seen.insert(sealed[9..ENVELOPE_HEADER_LEN].to_vec()),
            "instance id + nonce repeated"
        );
    }
}

#[test]
fn another_instance_with_the_same_key_opens_and_uses_its_own_subkey() {
    let a = EncryptionService::new(1, key(5));
    let b = EncryptionService::new(1, key(5));
    let from_a = a.seal_slice(&binding(), b"same plaintext").unwrap();
    let from_b = b.seal_slice(&binding(), b"same plaintext").unwrap();
    // Both start their counters at zero, but under different subkeys (instance ids differ).
    assert_eq!(
        from_a[ENVELOPE_HEADER_LEN - 12..ENVELOPE_HEADER_LEN],
        from_b[ENVELOPE_HEADER_LEN - 12..ENVELOPE_HEADER_LEN]
    );
    assert_ne!(from_a[9..21], from_b[9..21]);
    assert_ne!(from_a[ENVELOPE_HEADER_LEN..], from_b[ENVELOPE_HEADER_LEN..]);
    assert_eq!(b.open(&binding(), &from_a).unwrap(), b"same plaintext");
    assert_eq!(a.open(&binding(), &from_b).unwrap(), b"same plaintext");
    // A different master key under the same id fails authentication.
    let c = EncryptionService::new(1, key(6));
    assert!(auth_failed(c.open(&binding(), &from_a)));
}

#[test]
fn rotation_keeps_old_keys_until_retired() {
    let svc = EncryptionService::new(1, key(1));
    let old = svc.seal_slice(&binding(), b"old").unwrap();
    svc.rotate(2, key(2)).unwrap();
    assert_eq!(svc.active_key_id(), 2);
    let new = svc.seal_slice(&binding(), b"new").unwrap();
    assert_eq!(&new[5..9], &2u32.to_be_bytes());
    assert_eq!(svc.open(&binding(), &old).unwrap(), b"old");
    assert_eq!(svc.open(&binding(), &new).unwrap(), b"new");

    // The active key cannot be retired; the old one can, and then it is reported as retired.
    assert!(matches!(svc.retire(2), Err(MigrationError::Config(_))));
    svc.retire(1).unwrap();
    assert_eq!(
        svc.open(&binding(), &old),
        Err(MigrationError::RetiredKey { key_id: 1 })
    );
    assert_eq!(svc.open(&binding(), &new).unwrap(), b"new");
    // Key ids are never reused.
    assert!(svc.add_key(1, key(9)).is_err());
    assert!(svc.add_key(2, key(9)).is_err());
}

#[test]
fn unknown_key_id() {
    let sealer = EncryptionService::new(7, key(1));
    let opener = EncryptionService::new(1, key(1));
    let sealed = sealer.seal_slice(&binding(), b"x").unwrap();
    let err = opener.open(&binding(), &sealed).unwrap_err();
    assert_eq!(err, MigrationError::UnknownKey { key_id: 7 });
    assert!(err.to_string().contains("check"), "{err}");
    // Added (not yet active) keys open.
    opener.add_key(7, key(1)).unwrap();
    assert_eq!(opener.active_key_id(), 1);
    assert_eq!(opener.open(&binding(), &sealed).unwrap(), b"x");
}

#[test]
fn keys_are_exactly_32_bytes_and_never_printed() {
    for len in [0, 16, 31, 33, 64] {
        let err = EncryptionKey::from_bytes(&vec![1; len]).unwrap_err();
        assert!(
            matches!(&err, MigrationError::InvalidKey(m) if m.contains("exactly 32") && m.contains(&len.to_string())),
            "{err}"
        );
    }
    let k = EncryptionKey::from_bytes(&[0xAB; 32]).unwrap();
    assert_eq!(format!("{k:?}"), "EncryptionKey(<redacted>)");
    let svc = EncryptionService::new(3, k);
    let dbg = format!("{svc:?}");
    assert!(
        !dbg.to_lowercase().contains("ab, ab") && !dbg.contains("171"),
        "{dbg}"
    );
    assert_ne!(
        EncryptionKey::generate().expose_secret(),
        EncryptionKey::generate().expose_secret()
    );
}
