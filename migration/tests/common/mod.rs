#![allow(dead_code)]
use migration::{ConnectionId, ConnectionStateSnapshot, MigrationBinding, MigrationId, WorkerId};

pub fn cid(n: u8) -> ConnectionId {
    ConnectionId::new(&[n, 1, 2, 3, 4, 5, 6, 7]).unwrap()
}

pub fn binding() -> MigrationBinding {
    MigrationBinding {
        migration_id: MigrationId([7; 16]),
        connection_id: cid(1),
        source: WorkerId(1),
        target: WorkerId(2),
    }
}

/// Deterministic bytes: half pseudo-random, half repetitive text.
pub fn mixed_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let line = b"GET /api/v1/items?page=42 HTTP/3 accept: application/json\n";
    (0..len)
        .map(|i| {
            if (i / 4096) % 2 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                line[i % line.len()]
            }
        })
        .collect()
}

pub fn snapshot_for(b: &MigrationBinding, payload: usize) -> ConnectionStateSnapshot {
    ConnectionStateSnapshot::builder(b.connection_id.clone(), b.source, b.target)
        .timestamps(1_700_000_000_000, 1_700_000_000_500)
        .transport_snapshot(mixed_bytes(256, 1))
        .add_stream_buffer(0, mixed_bytes(payload / 2, 2))
        .add_stream_buffer(4, mixed_bytes(payload - payload / 2, 3))
        .add_application_state("session", b"user=42;role=admin".to_vec())
        .build()
        .unwrap()
}
