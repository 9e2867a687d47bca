mod common;

use common::{binding, mixed_bytes, state};
use migration::envelope::{self, ENCODING_OVERHEAD, MAX_STATE_LEN, SEAL_OVERHEAD};
use migration::{
    ConnectionId, ConnectionState, Corruption, EncryptionKey, EncryptionService, MigrationBinding,
    MigrationError, MigrationId, SnapshotSealer, WorkerId,
};
use proptest::prelude::*;
use zeroize::Zeroizing;

fn sealer() -> SnapshotSealer {
    SnapshotSealer::new(EncryptionService::new(
        1,
        EncryptionKey::from_bytes(&[3; 32]).unwrap(),
    ))
}

fn corrupt(r: &Result<ConnectionState, MigrationError>) -> bool {
    matches!(r, Err(MigrationError::StateCorruption(_)))
}

#[test]
fn round_trip_at_every_size() {
    let s = sealer();
    // Empty; an idle connection's size; a connection with megabytes of buffered stream data.
    for (handoff, app) in [(0, 0), (1500, 0), (1500, 40), (3 << 20, 1 << 20)] {
        let st = state(handoff, app);
        let sealed = s.seal(&binding(), &st).unwrap();
        assert_eq!(
            sealed.len(),
            SEAL_OVERHEAD + ENCODING_OVERHEAD + handoff + app
        );
        assert_eq!(s.open(&binding(), sealed).unwrap(), st);
        let encoded = envelope::encode(&st).unwrap();
        assert_eq!(encoded.len(), st.encoded_len());
        assert_eq!(envelope::decode(&encoded).unwrap(), st);
    }
}

#[test]
fn the_state_is_encrypted_and_never_printed() {
    let st = ConnectionState::new(
        Zeroizing::new(b"TLS-SECRET-TLS-SECRET".to_vec()),
        Zeroizing::new(b"session=42".to_vec()),
    );
    let sealed = sealer().seal(&binding(), &st).unwrap();
    assert!(!sealed.windows(10).any(|w| w == b"TLS-SECRET"));
    assert!(!sealed.windows(10).any(|w| w == b"session=42"));
    let dbg = format!("{st:?}");
    assert!(
        !dbg.contains("84, 76, 83") && !dbg.contains("SECRET"),
        "{dbg}"
    );
}

#[test]
fn every_single_bit_flip_is_refused() {
    let s = sealer();
    let st = state(60, 20);
    let sealed = s.seal(&binding(), &st).unwrap();
    for i in 0..sealed.len() {
        for bit in 0..8 {
            let mut t = sealed.clone();
            t[i] ^= 1 << bit;
            let r = s.open(&binding(), t);
            if (5..9).contains(&i) {
                // The key id: it now names a key the ring does not hold (checked before the tag).
                assert!(
                    matches!(r, Err(MigrationError::UnknownKey { .. })),
                    "byte {i} bit {bit}: {r:?}"
                );
            } else {
                assert!(corrupt(&r), "byte {i} bit {bit}: {r:?}");
            }
        }
    }
}

#[test]
fn every_truncation_and_any_extra_byte_is_refused() {
    let s = sealer();
    let sealed = s.seal(&binding(), &state(60, 20)).unwrap();
    for len in 0..sealed.len() {
        let r = s.open(&binding(), sealed[..len].to_vec());
        assert!(corrupt(&r), "cut at {len}: {r:?}");
    }
    let mut longer = sealed.clone();
    longer.push(0);
    assert!(corrupt(&s.open(&binding(), longer)));
}

#[test]
fn another_binding_is_refused() {
    let s = sealer();
    let b = binding();
    let sealed = s.seal(&b, &state(100, 10)).unwrap();
    let others = [
        MigrationBinding {
            migration_id: MigrationId([8; 16]),
            ..b.clone()
        },
        MigrationBinding {
            connection_id: ConnectionId::new(&[9; 8]).unwrap(),
            ..b.clone()
        },
        MigrationBinding {
            source: WorkerId(3),
            ..b.clone()
        },
        MigrationBinding {
            target: WorkerId(3),
            ..b.clone()
        },
        MigrationBinding {
            source: b.target,
            target: b.source,
            ..b.clone()
        },
    ];
    for other in others {
        assert_eq!(
            s.open(&other, sealed.clone()),
            Err(MigrationError::StateCorruption(
                Corruption::AuthenticationFailed
            )),
            "{other:?}"
        );
    }
    assert!(s.open(&b, sealed).is_ok());
}

#[test]
fn an_unknown_version_is_refused() {
    let s = sealer();
    let sealed = s.seal(&binding(), &state(10, 10)).unwrap();
    assert_eq!(sealed[4], envelope::VERSION);
    for v in [0u8, 1, 3, 255] {
        let mut t = sealed.clone();
        t[4] = v;
        let r = s.open(&binding(), t);
        assert!(
            matches!(&r, Err(MigrationError::StateCorruption(Corruption::BadHeader(m))) if m.contains(&format!("version {v}"))),
            "{r:?}"
        );
    }
}

#[test]
fn oversize_is_refused_before_allocation() {
    let s = sealer().with_max_state_len(1000);
    // Sealing: refused from the lengths alone.
    let big = state(900, 200);
    assert_eq!(
        s.seal(&binding(), &big),
        Err(MigrationError::SnapshotTooLarge {
            size: 1108,
            limit: 1000
        })
    );
    assert!(s.seal(&binding(), &state(900, 92)).is_ok());
    // Opening: refused from the length, before anything is decrypted (these bytes are not even
    // an envelope).
    let r = s.open(&binding(), vec![0; s.max_sealed_len() + 1]);
    assert!(
        matches!(r, Err(MigrationError::SnapshotTooLarge { .. })),
        "{r:?}"
    );
    // Decoding: a length larger than the bytes that follow is refused without allocating it.
    let mut lying = u32::MAX.to_be_bytes().to_vec();
    lying.extend([0; 16]);
    assert!(matches!(
        envelope::decode(&lying),
        Err(MigrationError::StateCorruption(Corruption::Truncated(_)))
    ));
    let mut lying = 0u32.to_be_bytes().to_vec();
    lying.extend(u32::MAX.to_be_bytes());
    assert!(matches!(
        envelope::decode(&lying),
        Err(MigrationError::StateCorruption(Corruption::Truncated(_)))
    ));
    assert_eq!(
        envelope::decode(&vec![0; MAX_STATE_LEN + 1]),
        Err(MigrationError::StateCorruption(Corruption::TooLarge {
            limit: MAX_STATE_LEN as u64
        }))
    );
}

#[test]
fn decoding_refuses_every_prefix_and_trailing_bytes() {
    let encoded = envelope::encode(&state(30, 7)).unwrap();
    for len in 0..encoded.len() {
        assert!(
            matches!(
                envelope::decode(&encoded[..len]),
                Err(MigrationError::StateCorruption(Corruption::Truncated(_)))
            ),
            "cut at {len}"
        );
    }
    let mut longer = encoded.to_vec();
    longer.push(1);
    assert_eq!(
        envelope::decode(&longer),
        Err(MigrationError::StateCorruption(Corruption::TrailingData))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_states_round_trip(handoff in proptest::collection::vec(any::<u8>(), 0..3000), app in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let st = ConnectionState::new(Zeroizing::new(handoff), Zeroizing::new(app));
        let s = sealer();
        prop_assert_eq!(s.open(&binding(), s.seal(&binding(), &st).unwrap()).unwrap(), st.clone());
        prop_assert_eq!(envelope::decode(&envelope::encode(&st).unwrap()).unwrap(), st);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(st) = envelope::decode(&data) {
            prop_assert_eq!(&envelope::encode(&st).unwrap()[..], &data[..]);
        }
        let r = sealer().open(&binding(), data);
        prop_assert!(r.is_err());
    }
}

/// The fuzz target's key, key id and binding (fuzz/fuzz_targets/decode_snapshot.rs).
const FUZZ_KEY: [u8; 32] = [0x5e; 32];
const FUZZ_KEY_ID: u32 = 1;

fn fuzz_binding() -> MigrationBinding {
    MigrationBinding {
        migration_id: MigrationId([0x11; 16]),
        connection_id: ConnectionId::new(&[0x22; 8]).unwrap(),
        source: WorkerId(1),
        target: WorkerId(2),
    }
}

/// Writes the fuzz target's seeds: encoded states and envelopes sealed with the target's key.
/// `cargo test -p migration --test envelope -- --ignored write_fuzz_seeds`
#[test]
#[ignore = "writes fuzz/seeds/decode_snapshot/"]
fn write_fuzz_seeds() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/decode_snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    for old in std::fs::read_dir(&dir).unwrap() {
        std::fs::remove_file(old.unwrap().path()).unwrap();
    }
    let s = SnapshotSealer::new(EncryptionService::new(
        FUZZ_KEY_ID,
        EncryptionKey::from_bytes(&FUZZ_KEY).unwrap(),
    ));
    let states = [
        ("empty", ConnectionState::default()),
        ("small", state(200, 24)),
        (
            "text",
            ConnectionState::new(
                Zeroizing::new(b"BHO2 handoff".to_vec()),
                Zeroizing::new(mixed_bytes(300, 5)),
            ),
        ),
    ];
    for (name, st) in states {
        std::fs::write(
            dir.join(format!("encoded-{name}")),
            envelope::encode(&st).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("sealed-{name}")),
            s.seal(&fuzz_binding(), &st).unwrap(),
        )
        .unwrap();
    }
}

/// The checked-in seeds are what the fuzz target expects: the sealed ones open with its key and
/// binding, the encoded ones decode.
#[test]
fn the_fuzz_seeds_open_and_decode() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/decode_snapshot");
    let s = SnapshotSealer::new(EncryptionService::new(
        FUZZ_KEY_ID,
        EncryptionKey::from_bytes(&FUZZ_KEY).unwrap(),
    ));
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("sealed-") {
            s.open(&fuzz_binding(), bytes)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            envelope::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        seen += 1;
    }
    assert!(seen >= 2, "no seeds in {}", dir.display());
}
