//! In-process handoff: an unmodified quinn-proto client talks to worker endpoint A (server ID 1);
//! the connection moves to endpoint B (server ID 2) and back, many times, while streams carry data.
//!
//! Sans-IO: the test shuttles datagrams itself through a small model of the load balancer (route by
//! the CID's server ID, with per-CID overrides during a handoff) with a fixed one-way delay, and a
//! simulated clock.
mod common;

use baton_handoff::handoff::{ImportError, NotQuiescent};
use bytes::BytesMut;
use common::*;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[test]
fn connection_moves_between_workers_byte_exact() {
    init_tracing();
    let mut sim = Sim::new();
    sim.run(100);
    assert_eq!(sim.client.connected, 1, "handshake done");
    assert_eq!(sim.workers[0].accepted, 1);
    for i in 0..4 {
        sim.client.start_request(20_000 + 7_919 * i);
    }
    sim.run(200);
    sim.key_updates();
    // Requests that are mid-flight when the first handoff starts.
    for i in 0..3 {
        sim.client.start_request(50_000 + 1_000 * i);
    }
    sim.run(3);

    let mut generations = Vec::new();
    let mut frozen = Vec::new();
    let migrations = 22;
    for m in 0..migrations {
        let from = sim.owner();
        let (steps, generation, cids) = sim.migrate();
        frozen.push(steps);
        generations.push(generation);
        assert_eq!(sim.owner(), 1 - from);
        if m > 0 {
            // The client had retired every CID of the previous owner: only the source's own moved.
            let source_sid = sim.workers[from].server_id;
            assert!(
                cids.iter()
                    .all(|c| sim.layout.decode_server_id(c) == Some(source_sid)),
                "migration {m}: stale CIDs still active"
            );
        }
        // Traffic in between: new requests, the long stream keeps flowing, key updates.
        sim.client.start_request(10_000 + 3_001 * m);
        sim.run(60);
        if m % 3 == 0 {
            sim.key_updates();
        }
        // The client moved onto the new owner's CIDs (retire-prior-to honoured).
        let owner_sid = sim.workers[sim.owner()].server_id;
        let last = sim.client.dcids.last().unwrap();
        assert_eq!(
            sim.layout.decode_server_id(last),
            Some(owner_sid),
            "client uses the new owner's CIDs after migration {m}"
        );
    }
    // Finish everything and check every stream end to end.
    sim.client.stop_long = true;
    let mut guard = 0;
    while !(sim.client.long_done && sim.client.requests.values().all(|r| r.done)) {
        sim.step();
        guard += 1;
        assert!(guard < 20_000, "streams did not complete");
    }
    assert_eq!(sim.client.connected, 1, "no second handshake");
    assert_eq!(
        sim.workers[0].accepted + sim.workers[1].accepted,
        1,
        "no second connection"
    );
    assert_eq!(
        sim.workers[0].responses + sim.workers[1].responses,
        0,
        "no stateless reset or other endpoint response"
    );
    assert!(
        sim.client.conn.stats().path.lost_packets == 0,
        "nothing lost on the way"
    );
    let first = generations[0];
    let last = *generations.last().unwrap();
    assert!(
        first >= 2 && last > first,
        "key updates before and after handoffs: {generations:?}"
    );
    eprintln!(
        "RESULT migrations={} requests={} long_stream_bytes={} bytes_verified={} key_generation first={} last={} frozen_steps_max={} handoff_bytes_max={} forced_key_updates={} cwnd_carried_max={} steps={}",
        migrations,
        sim.client.completed,
        sim.client.long_received,
        sim.client.verified,
        first,
        last,
        frozen.iter().max().unwrap(),
        sim.handoff_bytes,
        sim.key_updates_forced,
        sim.cwnd_max,
        sim.step_count,
    );
    eprintln!(
        "export refusals while frozen (steps by reason): {:?}",
        sim.refusals
    );
}

#[test]
fn export_is_refused_until_quiescent_and_the_connection_carries_on() {
    init_tracing();
    let mut sim = Sim::new();
    sim.run(100);
    sim.client.start_request(30_000);
    sim.run(2);
    // Mid-transfer: unacknowledged data in flight.
    sim.run(12);
    let ch = sim.workers[0].only();
    let Live { conn, keys, app } = sim.workers[0].conns.remove(&ch).unwrap();
    let err =
        baton_handoff::export(&mut sim.workers[0].endpoint, ch, conn, &keys, sim.now).unwrap_err();
    let reason = err.reason().cloned().unwrap();
    assert!(
        matches!(
            reason,
            NotQuiescent::AckElicitingInFlight(_)
                | NotQuiescent::KeyUpdateInProgress
                | NotQuiescent::StreamDataUnacked(_)
                | NotQuiescent::StreamDataUnsent
                | NotQuiescent::FramesPending
        ),
        "unexpected reason {reason:?}"
    );
    sim.workers[0].conns.insert(
        ch,
        Live {
            conn: err.into_connection(),
            keys,
            app,
        },
    );
    // The refused export changed nothing: the connection carries on and completes.
    sim.client.stop_long = true;
    let mut guard = 0;
    while !(sim.client.long_done && sim.client.requests.values().all(|r| r.done)) {
        sim.step();
        guard += 1;
        assert!(guard < 5_000);
    }
    assert_eq!(sim.client.completed, 1);
}

#[test]
fn double_import_is_refused_and_unknown_cids_get_no_reset() {
    init_tracing();
    let mut sim = Sim::new();
    sim.run(150);
    let _ = sim.migrate();
    assert_eq!(sim.owner(), 1);

    // Export from B, import into A, then try the same snapshot again into A.
    let ch = sim.workers[1].only();
    sim.workers[1].conns.get_mut(&ch).unwrap().app.frozen = true;
    let handoff = loop {
        let Live { conn, keys, app } = sim.workers[1].conns.remove(&ch).unwrap();
        match baton_handoff::export(&mut sim.workers[1].endpoint, ch, conn, &keys, sim.now) {
            Ok(h) => break (h, app),
            Err(e) => {
                sim.workers[1].conns.insert(
                    ch,
                    Live {
                        conn: e.into_connection(),
                        keys,
                        app,
                    },
                );
                sim.step();
            }
        }
    }
    .0;
    let (ch_a, conn_a, _keys) =
        baton_handoff::import(&mut sim.workers[0].endpoint, &handoff, sim.now).unwrap();
    let again = baton_handoff::import(&mut sim.workers[0].endpoint, &handoff, sim.now).unwrap_err();
    assert!(matches!(again, ImportError::CidInUse(_)), "{again:?}");
    assert_eq!(sim.workers[0].endpoint.open_connections(), 1);
    drop((ch_a, conn_a));

    // B no longer knows the connection: a packet for its CIDs, or for any CID with B's server ID,
    // is dropped without a stateless reset.
    let mut buf = Vec::new();
    let mut probes: Vec<Vec<u8>> = handoff
        .connection
        .local_cids
        .iter()
        .map(|(_, c)| c.to_vec())
        .collect();
    let mut forged = vec![0u8; 8];
    sim.layout.encode(0, 2, &[7; 5], &mut forged).unwrap();
    probes.push(forged);
    for cid in probes {
        let mut datagram = vec![0x40];
        datagram.extend_from_slice(&cid);
        datagram.extend_from_slice(&[0x55; 60]);
        let r = sim.workers[1].endpoint.handle(
            sim.now,
            CLIENT,
            Some(VIP.ip()),
            None,
            BytesMut::from(&datagram[..]),
            &mut buf,
        );
        assert!(r.is_none(), "unknown CID must be dropped silently");
    }
    // The byte form refuses every truncation and trailing garbage, without panicking.
    let bytes = baton_handoff::wire::encode(&handoff);
    for cut in 0..bytes.len() {
        assert!(baton_handoff::wire::decode(&bytes[..cut]).is_err());
    }
    let mut longer = bytes.to_vec();
    longer.push(0);
    assert!(baton_handoff::wire::decode(&longer).is_err());

    // A snapshot carries no secret, and the secrets print redacted.
    let shown = format!("{:?}", handoff.secrets);
    assert!(shown.contains("redacted"));
    let hex: String = handoff
        .secrets
        .client_secret_0
        .expose()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!shown.contains(&hex[..16]));
    let shown_conn = format!("{:?}", handoff.connection);
    assert!(!shown_conn.contains(&hex[..16]));
}

#[test]
fn connection_with_many_open_streams_moves_and_its_streams_complete() {
    init_tracing();
    let mut sim = Sim::new();
    sim.run(100);
    sim.client.open_held(90);
    sim.run(100);
    for _ in 0..4 {
        let _ = sim.migrate();
        sim.run(50);
    }
    // Every held stream is still usable on the new owner: finish them and check the echoes.
    for r in sim.client.requests.values_mut() {
        r.keep_open = false;
    }
    sim.client.stop_long = true;
    let mut guard = 0;
    while !(sim.client.long_done && sim.client.requests.values().all(|r| r.done)) {
        sim.step();
        guard += 1;
        assert!(guard < 10_000, "streams did not complete");
    }
    assert_eq!(sim.client.completed, 90);
    assert_eq!(sim.client.connected, 1);
}

#[test]
fn corrupted_handoff_bytes_never_panic_the_importer() {
    init_tracing();
    let mut sim = Sim::new();
    sim.run(150);
    let _ = sim.quiesce();
    let owner = sim.owner();
    let ch = sim.workers[owner].only();
    let Live { conn, keys, app: _ } = sim.workers[owner].conns.remove(&ch).unwrap();
    let handoff =
        baton_handoff::export(&mut sim.workers[owner].endpoint, ch, conn, &keys, sim.now).unwrap();
    let bytes = baton_handoff::wire::encode(&handoff);
    // Deterministic pseudo-random single-byte corruptions: decoding refuses or yields a handoff
    // that the importer takes or refuses, without panicking.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let (mut decoded, mut imported) = (0, 0);
    let mut errors = std::collections::BTreeMap::new();
    let target = 1 - owner;
    for _ in 0..2_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = bytes.to_vec();
        let i = (x as usize) % b.len();
        b[i] ^= 1 << ((x >> 32) % 8);
        if let Ok(h) = baton_handoff::wire::decode(&b) {
            decoded += 1;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                baton_handoff::import(&mut sim.workers[target].endpoint, &h, sim.now).map(
                    |(ch, mut conn, _)| {
                        // Drive it a little: what it sends is never delivered.
                        let mut buf = Vec::new();
                        conn.rotate_local_cids(sim.now);
                        for _ in 0..3 {
                            while conn.poll_transmit(sim.now, 1, &mut buf).is_some() {
                                buf.clear();
                            }
                            conn.handle_timeout(sim.now + std::time::Duration::from_secs(1));
                            while conn.poll().is_some() {}
                        }
                        (ch, conn)
                    },
                )
            }));
            match result {
                Ok(Ok((ch, conn))) => {
                    imported += 1;
                    // Undo: forget it, freeing its CIDs for the next attempt.
                    drop(conn);
                    sim.workers[target]
                        .endpoint
                        .handle_event(ch, quinn_proto::EndpointEvent::drained());
                }
                Ok(Err(e)) => {
                    *errors.entry(format!("{e}")).or_insert(0u32) += 1;
                }
                Err(_) => panic!("imported connection panicked, corrupted byte {i}"),
            }
        }
    }
    eprintln!("corruptions: decoded={decoded} imported={imported} refused={errors:?}");
}
