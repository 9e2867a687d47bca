//! Export and import cost of one connection with 0, 10 and 100 open streams (plus the long-lived
//! echo stream), measured on a quiescent connection moved back and forth between two endpoints.
//! Export = `baton_handoff::export` + byte encoding; import = decoding + `baton_handoff::import`.
//! (Waiting for quiescence is network-bound and not part of these numbers.)
#[path = "../tests/common/mod.rs"]
mod common;

use common::{Live, Sim};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::time::{Duration, Instant};

fn setup(streams: usize) -> Sim {
    let mut sim = Sim::new();
    sim.run(100);
    sim.client.open_held(streams);
    sim.run(150);
    sim.quiesce();
    sim
}

/// Moves the connection once; returns (export time, import time).
fn move_once(sim: &mut Sim) -> (Duration, Duration) {
    let from = sim.owner();
    let to = 1 - from;
    let ch = sim.workers[from].only();
    let Live { conn, keys, app } = sim.workers[from].conns.remove(&ch).unwrap();
    let t0 = Instant::now();
    let handoff =
        baton_handoff::export(&mut sim.workers[from].endpoint, ch, conn, &keys, sim.now).unwrap();
    let bytes = baton_handoff::wire::encode(&handoff);
    let t1 = Instant::now();
    let handoff = baton_handoff::wire::decode(&bytes).unwrap();
    let (ch, conn, keys) =
        baton_handoff::import(&mut sim.workers[to].endpoint, &handoff, sim.now).unwrap();
    let t2 = Instant::now();
    sim.workers[to].conns.insert(ch, Live { conn, keys, app });
    (t1 - t0, t2 - t1)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for streams in [0usize, 10, 100] {
        let mut sim = setup(streams);
        group.bench_function(BenchmarkId::new("export", streams), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| move_once(&mut sim).0).sum())
        });
        group.bench_function(BenchmarkId::new("import", streams), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| move_once(&mut sim).1).sum())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
