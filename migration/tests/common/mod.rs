#![allow(dead_code)]
use migration::{ConnectionId, ConnectionState, MigrationBinding, MigrationId, WorkerId};
use zeroize::Zeroizing;

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

/// A connection's state: a handoff of `handoff` bytes and an application state of `app` bytes.
pub fn state(handoff: usize, app: usize) -> ConnectionState {
    ConnectionState::new(
        Zeroizing::new(mixed_bytes(handoff, 1)),
        Zeroizing::new(mixed_bytes(app, 2)),
    )
}
