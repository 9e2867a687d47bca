//! What real exported connections weigh, and whether compressing them pays: a quinn-proto client
//! and a `WorkerCore` joined by in-memory datagram queues (as in `held_import.rs`). One connection
//! is exported idle; others after the client streamed megabytes to the demo echo without reading
//! the echo (so the worker holds them: unread request data, unanswered bytes, unsent echo), once
//! with the demo's pseudo-random load-generator bytes and once with JSON-like text. Every export is
//! sealed and opened as a migration does; the measurement (ignored by default: timings mean
//! something only in release) prints the sizes and the zstd figures quoted in
//! docs/MIGRATION-PIPELINE.md ("Compression"):
//!
//! `cargo test --release -p baton-worker --test snapshot_size -- --ignored --nocapture`
mod common;

use baton_worker::core::{CoreConfig, WorkerCore};
use baton_worker::demo::{DemoService, KIND_REQUEST, KIND_STREAM};
use lb_common::cid::CidLayout;
use migration::{
    ConnectionId, ConnectionState, EncryptionKey, EncryptionService, MigrationBinding, MigrationId,
    SnapshotSealer, WorkerId,
};
use quinn_proto::{Dir, StreamId};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SansIoClient as Client, VIP, exchange};

/// Loadgen's echo data: deterministic pseudo-random bytes (incompressible).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len.div_ceil(8))
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .take(len)
        .collect()
}

/// JSON-like API records with varying numbers (compressible).
fn text_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut rng = random_bytes(len / 4 + 64, 9).into_iter();
    let mut n = 0u64;
    while out.len() < len {
        n += 1;
        let r = u32::from_le_bytes([
            rng.next().unwrap_or(1),
            rng.next().unwrap_or(2),
            rng.next().unwrap_or(3),
            rng.next().unwrap_or(4),
        ]);
        let _ = writeln!(
            out,
            "{{\"id\":{n},\"user\":\"u-{}\",\"ts\":{},\"status\":\"ok\",\"items\":[{},{}]}}",
            r % 100_000,
            1_700_000_000_000u64 + n * 37,
            r % 1000,
            (r >> 10) % 1000
        );
    }
    out.truncate(len);
    out
}

/// A connection to a fresh core, after the handshake and a few requests; then `load` streamed to
/// the demo echo (the client reading none of the echo), then exported.
fn export(dir: &std::path::Path, load: &[u8]) -> ConnectionState {
    let (certs, key) =
        baton_worker::load_tls(&dir.join("service.pem"), &dir.join("service.key")).unwrap();
    let mut core = WorkerCore::new(
        CoreConfig {
            server_id: 1,
            layout: CidLayout::default(),
            certs,
            key,
            vips: vec![VIP.parse::<SocketAddr>().unwrap().ip()],
            allow_mtud: false,
            limits: Default::default(),
        },
        Arc::new(DemoService::default()),
    )
    .unwrap();
    let mut now = Instant::now();
    let mut client = Client::connect(&dir.join("ca.pem"), now);
    let mut stream: Option<(StreamId, usize)> = None;
    for n in 0..4000u32 {
        if !client.conn.is_handshaking() {
            if n % 8 == 0 && n < 64 {
                let id = client.conn.streams().open(Dir::Bi).unwrap();
                client
                    .conn
                    .send_stream(id)
                    .write(&[KIND_REQUEST, n as u8])
                    .unwrap();
                client.conn.send_stream(id).finish().unwrap();
            }
            if n >= 64 && !load.is_empty() {
                let (id, sent) = *stream.get_or_insert_with(|| {
                    let id = client.conn.streams().open(Dir::Bi).unwrap();
                    client.conn.send_stream(id).write(&[KIND_STREAM]).unwrap();
                    (id, 0)
                });
                if sent < load.len() {
                    let end = load.len().min(sent + 64 * 1024);
                    if let Ok(w) = client.conn.send_stream(id).write(&load[sent..end]) {
                        stream = Some((id, sent + w));
                    }
                }
            }
        }
        now += Duration::from_millis(1);
        let answer = exchange(&mut client, &mut core, now);
        client.receive(now, answer);
        if n > 200 && stream.is_none_or(|(_, sent)| sent == load.len()) && n % 100 == 0 {
            break;
        }
    }
    let id = core.connections()[0].id;
    assert!(core.begin_export(id, now + Duration::from_secs(2)));
    for _ in 0..2000 {
        now += Duration::from_millis(1);
        let answer = exchange(&mut client, &mut core, now);
        client.receive(now, answer);
        if let Some((_, r)) = core.take_export_results().pop() {
            return r.expect("export").state;
        }
    }
    panic!("not exported");
}

/// Median of `f`'s time over `n` runs.
fn median<T>(n: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        last = Some(std::hint::black_box(f()));
        times.push(t.elapsed());
    }
    times.sort();
    (times[n / 2], last.unwrap())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
#[ignore = "measurement: run in release with --ignored --nocapture"]
fn exported_snapshot_sizes_and_compression() {
    let dir = std::env::temp_dir().join(format!("baton-snapsize-test-{}", std::process::id()));
    baton_worker::certs::generate(&dir, &["w1".into()], "localhost").unwrap();
    let sealer = SnapshotSealer::new(EncryptionService::new(
        1,
        EncryptionKey::from_bytes(&[1; 32]).unwrap(),
    ));
    let binding = MigrationBinding {
        migration_id: MigrationId([1; 16]),
        connection_id: ConnectionId::new(&[2; 8]).unwrap(),
        source: WorkerId(1),
        target: WorkerId(2),
    };
    let cases = [
        ("idle", Vec::new()),
        ("echo 4 MiB random", random_bytes(4 << 20, 7)),
        ("echo 4 MiB text", text_bytes(4 << 20)),
        ("echo 12 MiB random", random_bytes(12 << 20, 8)),
        ("echo 12 MiB text", text_bytes(12 << 20)),
    ];
    println!(
        "{:<20} {:>10} {:>9} | {:>8} {:>8} | zstd level: size ratio, encode ms, decode ms",
        "case", "handoff", "app", "seal ms", "open ms"
    );
    for (name, load) in cases {
        let state = export(&dir, &load);
        let (seal, sealed) = median(9, || sealer.seal(&binding, &state).unwrap());
        let (open, opened) = median(9, || sealer.open(&binding, sealed.clone()).unwrap());
        assert_eq!(opened, state);
        let encoded = migration::envelope::encode(&state).unwrap();
        let mut line = format!(
            "{name:<20} {:>10} {:>9} | {:>8.3} {:>8.3} |",
            state.handoff.len(),
            state.app.len(),
            ms(seal),
            ms(open)
        );
        for level in [-3, 1, 3] {
            let (enc, z) = median(5, || zstd::bulk::compress(&encoded, level).unwrap());
            let (dec, back) = median(5, || zstd::bulk::decompress(&z, encoded.len()).unwrap());
            assert_eq!(back, encoded[..]);
            line += &format!(
                " {level}: {:.3}, {:.3}, {:.3};",
                z.len() as f64 / encoded.len() as f64,
                ms(enc),
                ms(dec)
            );
        }
        println!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
