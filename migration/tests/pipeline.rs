mod common;

use common::{binding, snapshot_for};
use migration::{
    Compression, Corruption, EncryptionKey, EncryptionService, MigrationError, MigrationPipeline,
    SerializationConfig, SerializationService, WorkerId,
};

fn pipeline(compression: Compression) -> MigrationPipeline {
    let ser = SerializationService::new(SerializationConfig {
        compression,
        chunk_size: 4096,
        max_state_size: 8 << 20,
    })
    .unwrap();
    MigrationPipeline::new(
        ser,
        EncryptionService::new(1, EncryptionKey::from_bytes(&[3; 32]).unwrap()),
    )
}

#[test]
fn seal_and_open_every_compression() {
    for c in [
        Compression::None,
        Compression::Gzip { level: 6 },
        Compression::Zstd { level: 1 },
    ] {
        let p = pipeline(c);
        let s = snapshot_for(&binding(), 200_000);
        let sealed = p.seal(&binding(), &s).unwrap();
        assert_eq!(
            sealed.stats.encoded_len as usize + 33 + 16,
            sealed.bytes.len()
        );
        if c != Compression::None {
            assert!(
                sealed.bytes.len() < 150_000,
                "{c:?}: {}",
                sealed.bytes.len()
            );
        }
        assert_eq!(p.open(&binding(), sealed.bytes).unwrap(), s);
    }
}

#[test]
fn a_snapshot_cannot_be_opened_for_another_migration() {
    let p = pipeline(Compression::Zstd { level: 1 });
    let s = snapshot_for(&binding(), 1000);
    let sealed = p.seal(&binding(), &s).unwrap().bytes;
    let other = migration::MigrationBinding {
        target: WorkerId(5),
        ..binding()
    };
    assert_eq!(
        p.open(&other, sealed),
        Err(MigrationError::StateCorruption(
            Corruption::AuthenticationFailed
        ))
    );
    // Sealing refuses a snapshot that describes another migration.
    assert!(matches!(
        p.seal(&other, &s),
        Err(MigrationError::InvalidSnapshot(_))
    ));
}

#[test]
fn errors_name_what_to_check() {
    let errors = [
        MigrationError::InvalidToken(migration::TokenRejection::Expired),
        MigrationError::StateCorruption(Corruption::AuthenticationFailed),
        MigrationError::TargetUnavailable {
            target: WorkerId(2),
            reason: "down".into(),
        },
        MigrationError::RateLimited {
            worker: WorkerId(1),
            limit: 5,
            retry_after_ms: 200,
        },
        MigrationError::UnknownKey { key_id: 3 },
        MigrationError::RetiredKey { key_id: 3 },
    ];
    for e in errors {
        assert!(e.to_string().contains("check"), "{e}");
        assert!(!e.kind().as_str().is_empty());
    }
}

#[test]
fn connection_ids_longer_than_quic_allows_are_refused_while_decoding() {
    // A connection ID longer than QUIC allows is refused while decoding, not just when built.
    let long = bincode::serialize(&serde_bytes::ByteBuf::from(vec![1u8; 21])).unwrap();
    assert!(bincode::deserialize::<migration::ConnectionId>(&long).is_err());
}
