//! The snapshot envelope must refuse any input with an error, never panic, hang or allocate
//! beyond its limits. Every input goes to both stages a target worker runs on untrusted bytes:
//! opening a sealed envelope (header, key id, length and tag checks; only the seeds sealed with
//! this target's key open) and decoding an opened plaintext (the length-prefixed encoding).
//! Seeds: fuzz/seeds/decode_snapshot/, written by
//! `cargo test -p migration --test envelope -- --ignored write_fuzz_seeds`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::envelope::{decode, encode};
use migration::{
    ConnectionId, EncryptionKey, EncryptionService, MigrationBinding, MigrationId, SnapshotSealer,
    WorkerId,
};
use std::sync::OnceLock;

/// The key, key id and binding the seeds are sealed with (migration/tests/envelope.rs).
const KEY: [u8; 32] = [0x5e; 32];
const KEY_ID: u32 = 1;

fn sealer() -> &'static (SnapshotSealer, MigrationBinding) {
    static SEALER: OnceLock<(SnapshotSealer, MigrationBinding)> = OnceLock::new();
    SEALER.get_or_init(|| {
        let keys = EncryptionService::new(KEY_ID, EncryptionKey::from_bytes(&KEY).unwrap());
        let binding = MigrationBinding {
            migration_id: MigrationId([0x11; 16]),
            connection_id: ConnectionId::new(&[0x22; 8]).unwrap(),
            source: WorkerId(1),
            target: WorkerId(2),
        };
        // A 1 MiB limit: anything near the fuzzer's RSS limit is a leak.
        (
            SnapshotSealer::new(keys).with_max_state_len(1 << 20),
            binding,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (sealer, binding) = sealer();
    if let Ok(state) = sealer.open(binding, data.to_vec()) {
        // Sealed with our key for this binding: sealing it again opens to the same state.
        let again = sealer.seal(binding, &state).expect("an opened state seals");
        assert_eq!(sealer.open(binding, again).as_ref(), Ok(&state));
    }
    if let Ok(state) = decode(data) {
        // The encoding is canonical: what decodes encodes back to the same bytes.
        assert_eq!(&encode(&state).expect("a decoded state encodes")[..], data);
    }
});
