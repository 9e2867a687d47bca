//! Migration snapshot benchmarks: AES-256-GCM alone, and the snapshot envelope (encode, seal =
//! encode + encrypt in place, open = decrypt in place + decode, and the round trip) at 1 KiB,
//! 1 MiB and 10 MiB of connection state.
//!
//! Data: a state whose handoff alternates 1 KiB blocks of pseudo-random bytes (like already
//! encrypted or compressed application data) and 1 KiB blocks of JSON-like records with varying
//! numbers (like buffered API traffic), plus a small application state. Deterministic (fixed
//! xorshift seed), so runs compare. `cargo xtask bench --only migration` runs this and prints the
//! report.
//!
//! Heap: the process pins glibc's malloc thresholds first (see `warm_heap`), as a long-running
//! worker's heap would be. Without that, glibc hands the freed 10 MiB buffers back to the kernel
//! after each iteration and the next one pays ~4,000 page faults (about 10 ms on this VM), which
//! measures the allocator's trimming policy rather than the envelope.
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group};
use migration::encryption::PlaintextBuffer;
use migration::envelope::{decode, encode};
use migration::{
    ConnectionId, ConnectionState, EncryptionKey, EncryptionService, MigrationBinding, MigrationId,
    SnapshotSealer, WorkerId,
};
use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

const SIZES: [(&str, usize); 3] = [("1KiB", 1 << 10), ("1MiB", 1 << 20), ("10MiB", 10 << 20)];
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Alternating 1 KiB blocks of random bytes and JSON-like text.
fn realistic_bytes(len: usize, rng: &mut XorShift) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut record = 0u64;
    while out.len() < len {
        let block_end = (out.len() + 1024).min(len);
        if (out.len() / 1024) % 2 == 0 {
            while out.len() < block_end {
                out.extend_from_slice(&rng.next().to_le_bytes());
            }
        } else {
            while out.len() < block_end {
                record += 1;
                let _ = writeln!(
                    out,
                    "{{\"id\":{record},\"user\":\"u-{}\",\"ts\":{},\"status\":\"ok\",\"items\":[{},{}]}}",
                    rng.next() % 100_000,
                    1_700_000_000_000u64 + record * 37,
                    rng.next() % 1000,
                    rng.next() % 1000
                );
            }
        }
        out.truncate(block_end);
    }
    out
}

fn binding() -> MigrationBinding {
    MigrationBinding {
        migration_id: MigrationId([0x5a; 16]),
        connection_id: ConnectionId::new(&[0x42, 0, 1, 2, 3, 4, 5, 6]).unwrap(),
        source: WorkerId(1),
        target: WorkerId(2),
    }
}

/// A connection state of `size` encoded bytes.
fn state(size: usize) -> ConnectionState {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let app = b"{\"session\":\"resumed\",\"tier\":\"gold\"}".to_vec();
    let handoff = size - app.len() - migration::envelope::ENCODING_OVERHEAD;
    let s = ConnectionState::new(realistic_bytes(handoff, &mut rng).into(), app.into());
    assert_eq!(s.encoded_len(), size);
    s
}

fn encryption() -> EncryptionService {
    EncryptionService::new(1, EncryptionKey::from_bytes(&[7; 32]).unwrap())
}

fn bench_encryption(c: &mut Criterion) {
    let mut group = c.benchmark_group("migration_encryption");
    let svc = encryption();
    let b = binding();
    let mut rng = XorShift(3);
    for (size_label, size) in SIZES {
        let data = realistic_bytes(size, &mut rng);
        group.throughput(Throughput::Bytes(size as u64));
        // Seal in place; the plaintext copy is setup, outside the timing.
        group.bench_with_input(
            BenchmarkId::new("seal", size_label),
            &data,
            |bench, data| {
                bench.iter_batched(
                    || {
                        let mut buf = PlaintextBuffer::with_capacity(data.len());
                        buf.write_all(data).unwrap();
                        buf
                    },
                    |buf| svc.seal(&b, buf).unwrap(),
                    BatchSize::LargeInput,
                )
            },
        );
        let sealed = svc.seal_slice(&b, &data).unwrap();
        group.bench_with_input(
            BenchmarkId::new("open", size_label),
            &sealed,
            |bench, sealed| {
                bench.iter_batched(
                    || sealed.clone(),
                    |mut env| {
                        black_box(svc.open_in_place(&b, &mut env).unwrap().len());
                        env
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    group.finish();
}

fn bench_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("migration_envelope");
    let sealer = SnapshotSealer::new(encryption());
    let b = binding();
    for (size_label, size) in SIZES {
        let st = state(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size_label), &st, |bench, st| {
            bench.iter(|| black_box(encode(st).unwrap()))
        });
        let encoded = encode(&st).unwrap();
        group.bench_with_input(
            BenchmarkId::new("decode", size_label),
            &encoded,
            |bench, encoded| bench.iter(|| black_box(decode(encoded).unwrap())),
        );
        group.bench_with_input(BenchmarkId::new("seal", size_label), &st, |bench, st| {
            bench.iter(|| black_box(sealer.seal(&b, st).unwrap()))
        });
        let sealed = sealer.seal(&b, &st).unwrap();
        // The copy of the sealed bytes (open consumes them) is setup, outside the timing.
        group.bench_with_input(
            BenchmarkId::new("open", size_label),
            &sealed,
            |bench, sealed| {
                bench.iter_batched(
                    || sealed.clone(),
                    |sealed| black_box(sealer.open(&b, sealed).unwrap()),
                    BatchSize::LargeInput,
                )
            },
        );
        group.bench_with_input(
            BenchmarkId::new("round_trip", size_label),
            &st,
            |bench, st| {
                bench.iter(|| black_box(sealer.open(&b, sealer.seal(&b, st).unwrap()).unwrap()))
            },
        );
    }
    group.finish();
}

fn config() -> Criterion {
    // 10 samples keep the 10 MiB cases to seconds; the xtask passes shorter times when asked.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

/// Keeps freed buffers in the heap: no mmap for large blocks, no trimming of the heap top.
fn warm_heap() {
    // 32 MiB is glibc's largest mmap threshold; every buffer here is smaller.
    // SAFETY: mallopt only adjusts glibc's allocator parameters; called before any thread starts.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
    };
    if !ok {
        eprintln!(
            "warning: mallopt refused the heap settings; large cases will include page-fault time"
        );
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_encryption, bench_envelope
}

fn main() {
    warm_heap();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
