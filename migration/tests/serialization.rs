mod common;

use common::{binding, snapshot_for};
use migration::serialization::{CHUNK_HEADER_LEN, STREAM_HEADER_LEN};
use migration::{
    Compression, ConnectionStateSnapshot, Corruption, MigrationError, SerializationConfig,
    SerializationService, WorkerId,
};
use proptest::prelude::*;

const COMPRESSIONS: [Compression; 3] = [
    Compression::None,
    Compression::Gzip { level: 6 },
    Compression::Zstd { level: 1 },
];

fn service(compression: Compression, chunk_size: u32) -> SerializationService {
    SerializationService::new(SerializationConfig {
        compression,
        chunk_size,
        max_state_size: 1 << 20,
    })
    .unwrap()
}

fn arb_snapshot() -> impl Strategy<Value = ConnectionStateSnapshot> {
    (
        proptest::collection::vec(any::<u8>(), 0..=20),
        0u32..4,
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::btree_map(
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2000),
            0..4,
        ),
        proptest::collection::btree_map(
            "[a-z]{1,8}",
            proptest::collection::vec(0u8..4, 0..3000),
            0..3,
        ),
        any::<u32>(),
    )
        .prop_map(|(cid, src, transport, streams, app, t)| {
            let mut b = ConnectionStateSnapshot::builder(
                migration::ConnectionId::new(&cid).unwrap(),
                WorkerId(src),
                WorkerId(src + 1),
            )
            .timestamps(t as u64, t as u64 + 10)
            .transport_snapshot(transport);
            for (id, data) in streams {
                b = b.add_stream_buffer(id, data);
            }
            for (k, v) in app {
                b = b.add_application_state(k, v);
            }
            b.build().unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn round_trips_every_compression_and_chunk_size(snapshot in arb_snapshot(), chunk in prop::sample::select(vec![16u32, 17, 64, 1000, 4096, 65536])) {
        for compression in COMPRESSIONS {
            let svc = service(compression, chunk);
            let bytes = svc.encode_to_vec(&snapshot).unwrap();
            prop_assert_eq!(svc.decode_slice(&bytes).unwrap(), snapshot.clone());
        }
    }

    #[test]
    fn every_prefix_is_rejected(snapshot in arb_snapshot(), cut in any::<prop::sample::Index>()) {
        for compression in COMPRESSIONS {
            let svc = service(compression, 64);
            let bytes = svc.encode_to_vec(&snapshot).unwrap();
            let at = cut.index(bytes.len());
            prop_assert!(matches!(svc.decode_slice(&bytes[..at]), Err(MigrationError::StateCorruption(_))));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = service(Compression::Zstd { level: 1 }, 64).decode_slice(&data);
        let mut framed = b"BTNS\x01\x00\x00\x01\x00\x00\x00\x40".to_vec();
        framed.extend_from_slice(&data);
        for id in 0..3u8 {
            framed[5] = id;
            let _ = service(Compression::None, 64).decode_slice(&framed);
        }
    }
}

/// Splits an encoded stream into (header, frames).
fn frames(bytes: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut out = Vec::new();
    let mut at = STREAM_HEADER_LEN;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap()) as usize;
        out.push(bytes[at..at + CHUNK_HEADER_LEN + len].to_vec());
        at += CHUNK_HEADER_LEN + len;
    }
    (bytes[..STREAM_HEADER_LEN].to_vec(), out)
}

fn join(header: &[u8], frames: &[Vec<u8>]) -> Vec<u8> {
    let mut v = header.to_vec();
    frames.iter().for_each(|f| v.extend_from_slice(f));
    v
}

fn encoded(compression: Compression) -> (SerializationService, Vec<u8>) {
    let svc = service(compression, 256);
    let bytes = svc.encode_to_vec(&snapshot_for(&binding(), 3000)).unwrap();
    (svc, bytes)
}

fn corruption(r: Result<ConnectionStateSnapshot, MigrationError>) -> Corruption {
    match r {
        Err(MigrationError::StateCorruption(c)) => c,
        other => panic!("expected StateCorruption, got {other:?}"),
    }
}

#[test]
fn rejects_reordered_chunks() {
    for c in COMPRESSIONS {
        let (svc, bytes) = encoded(c);
        let (h, mut f) = frames(&bytes);
        assert!(f.len() >= 3, "{c:?} produced {} chunks", f.len());
        f.swap(0, 1);
        assert_eq!(
            corruption(svc.decode_slice(&join(&h, &f))),
            Corruption::OutOfOrder {
                expected: 0,
                found: 1
            }
        );
    }
}

#[test]
fn rejects_duplicated_and_missing_chunks() {
    for c in COMPRESSIONS {
        let (svc, bytes) = encoded(c);
        let (h, f) = frames(&bytes);
        let mut dup = f.clone();
        dup.insert(1, f[0].clone());
        assert_eq!(
            corruption(svc.decode_slice(&join(&h, &dup))),
            Corruption::Duplicate { seq: 0 }
        );
        let mut missing = f.clone();
        missing.remove(1);
        assert_eq!(
            corruption(svc.decode_slice(&join(&h, &missing))),
            Corruption::OutOfOrder {
                expected: 1,
                found: 2
            }
        );
    }
}

#[test]
fn rejects_truncation_and_trailing_data() {
    for c in COMPRESSIONS {
        let (svc, bytes) = encoded(c);
        let (h, f) = frames(&bytes);
        // Dropping the final chunk entirely.
        let c1 = corruption(svc.decode_slice(&join(&h, &f[..f.len() - 1])));
        assert!(
            matches!(c1, Corruption::Truncated(_) | Corruption::Malformed(_)),
            "{c1:?}"
        );
        // Cut inside a payload.
        assert!(matches!(
            corruption(svc.decode_slice(&bytes[..STREAM_HEADER_LEN + CHUNK_HEADER_LEN + 10])),
            Corruption::Truncated(_)
        ));
        // Cut inside a chunk header.
        assert!(matches!(
            corruption(svc.decode_slice(&bytes[..STREAM_HEADER_LEN + 3])),
            Corruption::Truncated(_)
        ));
        // Anything after the final chunk.
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(
            corruption(svc.decode_slice(&extra)),
            Corruption::TrailingData
        );
    }
}

#[test]
fn rejects_oversized_chunks_and_states_without_allocating() {
    let (svc, bytes) = encoded(Compression::None);
    // A chunk header announcing 4 GiB: refused from the header, nothing allocated.
    let mut huge = bytes[..STREAM_HEADER_LEN].to_vec();
    huge.extend_from_slice(&0u32.to_be_bytes());
    huge.push(1);
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        corruption(svc.decode_slice(&huge)),
        Corruption::ChunkTooLarge {
            len: u32::MAX,
            limit: 256
        }
    );

    // A bincode length prefix claiming a huge buffer inside a well-framed stream.
    let tiny = SerializationService::new(SerializationConfig {
        compression: Compression::None,
        chunk_size: 64,
        max_state_size: 4096,
    })
    .unwrap();
    let big = tiny_snapshot_bytes(&service(Compression::None, 64), 10_000);
    assert_eq!(
        corruption(tiny.decode_slice(&big)),
        Corruption::TooLarge { limit: 4096 }
    );

    // Encoding refuses what decoding would refuse.
    let err = tiny
        .encode_to_vec(&snapshot_for(&binding(), 10_000))
        .unwrap_err();
    assert!(
        matches!(err, MigrationError::SnapshotTooLarge { limit: 4096, .. }),
        "{err:?}"
    );
}

fn tiny_snapshot_bytes(svc: &SerializationService, payload: usize) -> Vec<u8> {
    svc.encode_to_vec(&snapshot_for(&binding(), payload))
        .unwrap()
}

#[test]
fn rejects_compression_bomb_beyond_limit() {
    // 1 MiB of zeros compresses to almost nothing; a 64 KiB limit must stop decompression.
    let loose = SerializationService::new(SerializationConfig {
        compression: Compression::Zstd { level: 3 },
        chunk_size: 1024,
        max_state_size: 4 << 20,
    })
    .unwrap();
    let s = ConnectionStateSnapshot::builder(common::cid(1), WorkerId(1), WorkerId(2))
        .add_stream_buffer(0, vec![0u8; 1 << 20])
        .build()
        .unwrap();
    let bytes = loose.encode_to_vec(&s).unwrap();
    assert!(bytes.len() < 4096);
    let strict = SerializationService::new(SerializationConfig {
        compression: Compression::Zstd { level: 3 },
        chunk_size: 1024,
        max_state_size: 65536,
    })
    .unwrap();
    assert_eq!(
        corruption(strict.decode_slice(&bytes)),
        Corruption::TooLarge { limit: 65536 }
    );
}

#[test]
fn rejects_short_non_final_chunks_and_bad_headers() {
    let (svc, bytes) = encoded(Compression::None);
    let (mut h, mut f) = frames(&bytes);
    f[0].truncate(CHUNK_HEADER_LEN + 10);
    f[0][5..9].copy_from_slice(&10u32.to_be_bytes());
    assert_eq!(
        corruption(svc.decode_slice(&join(&h, &f))),
        Corruption::ShortChunk {
            seq: 0,
            len: 10,
            chunk_size: 256
        }
    );

    let (_, f) = frames(&bytes);
    let mut flags = f.clone();
    flags[0][4] = 0x80;
    assert!(matches!(
        corruption(svc.decode_slice(&join(&h, &flags))),
        Corruption::BadHeader(_)
    ));

    h[0] = b'X';
    assert!(matches!(
        corruption(svc.decode_slice(&join(&h, &f))),
        Corruption::BadHeader(_)
    ));
    h[0] = b'B';
    h[5] = 9;
    assert!(
        matches!(corruption(svc.decode_slice(&join(&h, &f))), Corruption::BadHeader(m) if m.contains("compression"))
    );
    h[5] = 0;
    h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        corruption(svc.decode_slice(&join(&h, &f))),
        Corruption::BadHeader(_)
    ));
    h[8..12].copy_from_slice(&256u32.to_be_bytes());
    h[7] = 99;
    assert!(matches!(
        svc.decode_slice(&join(&h, &f)),
        Err(MigrationError::UnsupportedVersion { found: 99, .. })
    ));
}

#[test]
fn decoder_follows_the_stream_header_compression() {
    // A worker configured for zstd still reads a gzip stream from a peer mid-rollout.
    let (_, gz) = encoded(Compression::Gzip { level: 1 });
    let zstd = service(Compression::Zstd { level: 1 }, 1024);
    assert_eq!(
        zstd.decode_slice(&gz).unwrap(),
        snapshot_for(&binding(), 3000)
    );
}

#[test]
fn payload_on_a_chunk_boundary_round_trips() {
    let svc = service(Compression::None, 64);
    for payload in 0..200 {
        let s = snapshot_for(&binding(), payload);
        let bytes = svc.encode_to_vec(&s).unwrap();
        assert_eq!(svc.decode_slice(&bytes).unwrap(), s, "payload {payload}");
    }
}

#[test]
fn config_is_validated() {
    let bad = |c| SerializationService::new(c).is_err();
    let ok = SerializationConfig::default();
    assert!(bad(SerializationConfig {
        chunk_size: 1,
        ..ok
    }));
    assert!(bad(SerializationConfig {
        chunk_size: u32::MAX,
        ..ok
    }));
    assert!(bad(SerializationConfig {
        compression: Compression::Gzip { level: 10 },
        ..ok
    }));
    assert!(bad(SerializationConfig {
        compression: Compression::Zstd { level: 22 },
        ..ok
    }));
    assert!(bad(SerializationConfig {
        max_state_size: 0,
        ..ok
    }));
}

#[test]
fn pooled_zstd_contexts_recover_after_failures() {
    let svc = SerializationService::new(SerializationConfig {
        compression: Compression::Zstd { level: 3 },
        chunk_size: 256,
        max_state_size: 50_000,
    })
    .unwrap();
    let good = snapshot_for(&binding(), 20_000);
    let bytes = svc.encode_to_vec(&good).unwrap();
    for _ in 0..3 {
        // Fail mid-frame on both sides, then succeed with the same (pooled) contexts.
        assert!(svc.decode_slice(&bytes[..bytes.len() / 2]).is_err());
        assert!(matches!(
            svc.encode_to_vec(&snapshot_for(&binding(), 60_000)),
            Err(MigrationError::SnapshotTooLarge { .. })
        ));
        assert_eq!(svc.decode_slice(&bytes).unwrap(), good);
        assert_eq!(svc.encode_to_vec(&good).unwrap(), bytes);
    }
    // Another level on a clone: parameters do not leak between uses.
    let fast = SerializationService::new(SerializationConfig {
        compression: Compression::Zstd { level: -5 },
        ..*svc.config()
    })
    .unwrap();
    assert_eq!(
        fast.decode_slice(&fast.encode_to_vec(&good).unwrap())
            .unwrap(),
        good
    );
    assert_eq!(svc.clone().encode_to_vec(&good).unwrap(), bytes);
}

/// A reader that hands out one byte per call, like a slow socket.
struct Trickle<'a>(&'a [u8]);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.0[0];
        self.0 = &self.0[1..];
        Ok(1)
    }
}

#[test]
fn decodes_from_a_streaming_reader() {
    for c in COMPRESSIONS {
        let (svc, bytes) = encoded(c);
        assert_eq!(
            svc.decode(Trickle(&bytes)).unwrap(),
            snapshot_for(&binding(), 3000)
        );
        let mut extra = bytes.clone();
        extra.extend_from_slice(b"xyz");
        assert_eq!(
            corruption(svc.decode(Trickle(&extra))),
            Corruption::TrailingData
        );
        assert!(matches!(
            corruption(svc.decode(Trickle(&bytes[..bytes.len() - 1]))),
            Corruption::Truncated(_) | Corruption::Malformed(_)
        ));
    }
}

#[test]
fn large_states_span_several_zstd_frames() {
    let svc = SerializationService::new(SerializationConfig {
        compression: Compression::Zstd { level: -3 },
        chunk_size: 65536,
        max_state_size: 8 << 20,
    })
    .unwrap();
    let s = snapshot_for(&binding(), 2_500_000 + 123);
    let bytes = svc.encode_to_vec(&s).unwrap();
    assert_eq!(svc.decode_slice(&bytes).unwrap(), s);
}

/// Frames a raw compressed payload the way the encoder does (one final chunk).
fn framed(compression_id: u8, payload: &[u8]) -> Vec<u8> {
    let chunk = payload.len().max(16) as u32;
    let mut v = b"BTNS\x01".to_vec();
    v.push(compression_id);
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&chunk.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.push(1);
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn zstd_frames_asking_for_a_large_window_are_refused() {
    let svc = SerializationService::new(SerializationConfig {
        compression: Compression::Zstd { level: 1 },
        chunk_size: 1024,
        max_state_size: 16 << 20,
    })
    .unwrap();
    let raw = common::mixed_bytes(4 << 20, 5);
    // One frame with a 4 MiB window: more than our 1 MiB segments ever need.
    let mut cctx = zstd::zstd_safe::CCtx::create();
    cctx.set_parameter(zstd::zstd_safe::CParameter::WindowLog(22))
        .unwrap();
    let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
    cctx.compress2(&mut frame, &raw).unwrap();
    let err = corruption(svc.decode_slice(&framed(2, &frame)));
    assert!(
        matches!(&err, Corruption::Malformed(m) if m.contains("zstd") || m.contains("memory")),
        "{err:?}"
    );
}
