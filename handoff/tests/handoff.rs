//! In-process handoff: an unmodified quinn-proto client talks to worker endpoint A (server ID 1);
//! the connection moves to endpoint B (server ID 2) and back, many times, while streams carry data.
//!
//! Sans-IO: the test shuttles datagrams itself through a small model of the load balancer (route by
//! the CID's server ID, with per-CID overrides during a handoff) with a fixed one-way delay, and a
//! simulated clock.
mod common;

use baton_handoff::handoff::ImportError;
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

/// Runs until the long stream and every request completed, checking every byte (the client does).
fn finish(sim: &mut Sim, max_steps: u64) {
    sim.client.stop_long = true;
    let mut guard = 0;
    while !(sim.client.long_done && sim.client.requests.values().all(|r| r.done)) {
        sim.step();
        guard += 1;
        assert!(guard < max_steps, "streams did not complete");
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
}

/// The owner's connection: packets it declared lost since it was imported.
fn owner_lost_packets(sim: &Sim) -> u64 {
    let w = &sim.workers[sim.owner()];
    w.conns[&w.only()].conn.stats().path.lost_packets
}

#[test]
fn export_mid_transfer_moves_what_is_in_flight() {
    init_tracing();
    let mut sim = Sim::new();
    sim.run(100);
    sim.client.start_request(300_000);
    sim.run(14);
    // Mid-transfer: unacknowledged data in flight both ways, stream data unsent and unread.
    let ch = sim.workers[0].only();
    assert!(sim.workers[0].conns[&ch].conn.quiescence().is_ok());
    let (frozen_steps, _, _) = sim.migrate();
    assert_eq!(frozen_steps, 0, "the export waited for the client");
    assert!(
        sim.carried_in_flight > 0,
        "nothing was in flight at the export"
    );
    // The target understood the client's ACKs for the source's packets: nothing was declared
    // lost on a lossless path, and the client saw no loss either.
    sim.run(200);
    assert_eq!(owner_lost_packets(&sim), 0, "target declared packets lost");
    finish(&mut sim, 10_000);
    assert_eq!(sim.client.completed, 1);
    assert_eq!(sim.client.conn.stats().path.lost_packets, 0);
}

/// At every RTT from 20 to 300 ms the export happens at once: a migration never waits for the
/// client, so the pause it adds does not grow with the path.
#[test]
fn moves_on_long_paths_do_not_wait_for_the_client() {
    init_tracing();
    for one_way_ms in [10, 50, 100, 150] {
        let mut sim = Sim::new();
        sim.one_way = std::time::Duration::from_millis(one_way_ms);
        sim.run(8 * one_way_ms);
        assert_eq!(sim.client.connected, 1);
        let mut carried = 0;
        for m in 0..6u64 {
            sim.client.start_request(40_000 + 9_973 * m);
            sim.run(one_way_ms + 3 * m);
            let (frozen_steps, _, _) = sim.migrate();
            assert_eq!(
                frozen_steps,
                0,
                "RTT {} ms, migration {m}: the export waited ({:?})",
                2 * one_way_ms,
                sim.refusals
            );
            carried += sim.carried_in_flight;
            sim.run(2 * one_way_ms);
            assert_eq!(
                owner_lost_packets(&sim),
                0,
                "RTT {} ms, migration {m}: the target did not understand an ACK",
                2 * one_way_ms
            );
        }
        assert!(carried > 0, "nothing was ever in flight at an export");
        finish(&mut sim, 40 * one_way_ms + 20_000);
        assert_eq!(sim.client.completed, 6);
        assert_eq!(sim.client.conn.stats().path.lost_packets, 0);
        eprintln!(
            "RESULT rtt_ms={} migrations=6 carried_packets={carried} bytes_verified={} client_lost_packets={}",
            2 * one_way_ms,
            sim.client.verified,
            sim.client.conn.stats().path.lost_packets
        );
    }
}

/// Everything in flight at the export is lost, both ways: the target's loss recovery, continued
/// from the source's, sends it again.
#[test]
fn packets_lost_around_a_move_are_recovered_by_the_target() {
    init_tracing();
    let mut sim = Sim::new();
    sim.one_way = std::time::Duration::from_millis(20);
    sim.run(200);
    sim.lose_in_flight_at_export = true;
    let mut recovered = 0;
    for m in 0..8u64 {
        sim.client.start_request(30_000 + 7_001 * m);
        sim.run(25);
        let _ = sim.migrate();
        assert!(sim.carried_in_flight > 0);
        sim.run(300);
        recovered += owner_lost_packets(&sim);
    }
    assert!(sim.lost > 0);
    assert!(
        recovered > 0,
        "the target never retransmitted what the source had sent"
    );
    finish(&mut sim, 20_000);
    assert_eq!(sim.client.completed, 8);
}

/// Ten moves, each while a new request (of a length growing by `stride`) is under way, `gap +
/// m * step` steps after it started; every export must happen at the first attempt.
fn ten_moves_mid_request(sim: &mut Sim, stride: u64, gap: u64, step: u64) {
    for m in 0..10u64 {
        sim.client.start_request(20_000 + stride * m);
        sim.run(gap + step * m);
        let (frozen_steps, _, _) = sim.migrate();
        assert_eq!(frozen_steps, 0, "migration {m}: the export waited");
    }
}

#[test]
fn moves_on_a_lossy_long_path_keep_every_byte() {
    init_tracing();
    let mut sim = Sim::new();
    sim.one_way = std::time::Duration::from_millis(50);
    sim.run(500);
    sim.loss = 0.05;
    ten_moves_mid_request(&mut sim, 5_003, 40, 7);
    assert!(sim.lost > 20, "the path lost only {} datagrams", sim.lost);
    finish(&mut sim, 60_000);
    assert_eq!(sim.client.completed, 10);
}

/// Datagrams overtake each other (up to 15 ms of extra delay each, on a 40 ms RTT path) while
/// the connection moves: the reordering is absorbed like any other.
#[test]
fn moves_on_a_reordering_path() {
    init_tracing();
    let mut sim = Sim::new();
    sim.one_way = std::time::Duration::from_millis(20);
    sim.run(300);
    sim.jitter = std::time::Duration::from_millis(15);
    ten_moves_mid_request(&mut sim, 4_001, 30, 5);
    finish(&mut sim, 20_000);
    assert_eq!(sim.client.completed, 10);
}

/// A client that goes quiet (its long stream finished, no requests) is moved while idle, twice,
/// and then resumes with new requests.
#[test]
fn an_idle_client_is_moved_and_resumes() {
    init_tracing();
    let mut sim = Sim::new();
    sim.one_way = std::time::Duration::from_millis(30);
    sim.run(300);
    sim.client.start_request(25_000);
    finish(&mut sim, 10_000);
    // Idle: nothing in flight after a few seconds, then two moves.
    sim.run(5_000);
    for _ in 0..2 {
        let (frozen_steps, _, _) = sim.migrate();
        assert_eq!(frozen_steps, 0);
        sim.run(2_000);
    }
    for m in 0..3u64 {
        sim.client.start_request(10_000 + m);
    }
    let mut guard = 0;
    while !sim.client.requests.values().all(|r| r.done) {
        sim.step();
        guard += 1;
        assert!(
            guard < 10_000,
            "requests after the idle period did not complete"
        );
    }
    assert_eq!(sim.client.completed, 4);
    assert_eq!(sim.client.connected, 1, "no second handshake");
}

/// A NAT rebinding: the client's port changes. While the new path is being validated the export
/// waits (bounded by the validation, about one RTT); afterwards the connection stays movable.
#[test]
fn nat_rebinding_before_and_during_moves() {
    init_tracing();
    let one_way_ms = 20;
    let mut sim = Sim::new();
    sim.one_way = std::time::Duration::from_millis(one_way_ms);
    sim.run(200);
    sim.client_addr.set_port(sim.client_addr.port() + 1);
    sim.run(300);
    for m in 0..10u64 {
        sim.client.start_request(10_000 + 3_001 * m);
        sim.run(30);
        if m % 3 == 2 {
            // Rebinding right before the move: the validation must finish first.
            sim.client_addr.set_port(sim.client_addr.port() + 1);
            sim.run(2 * one_way_ms);
        }
        let (frozen_steps, _, _) = sim.migrate();
        assert!(
            frozen_steps <= 6 * one_way_ms,
            "migration {m}: frozen {frozen_steps} ms"
        );
        let w = &sim.workers[sim.owner()];
        assert_eq!(w.conns[&w.only()].conn.remote_address(), sim.client_addr);
        sim.run(50);
    }
    finish(&mut sim, 20_000);
    assert_eq!(sim.client.completed, 10);
}

/// A client with zero-length CIDs advertises `active_connection_id_limit = 2`: each owner may keep
/// only two of its CIDs at the client. Ten moves, each mid-request on a 40 ms RTT path: the
/// rotation stays within the limit (the client would close with CONNECTION_ID_LIMIT_ERROR), the
/// client moves onto the new owner's CIDs every time, and every byte arrives.
#[test]
fn a_client_that_allows_only_two_cids_is_moved() {
    init_tracing();
    let mut sim = Sim::with_client_cid_len(0);
    sim.one_way = std::time::Duration::from_millis(20);
    sim.run(300);
    assert_eq!(sim.client.connected, 1);
    for m in 0..10u64 {
        sim.client.start_request(20_000 + 2_003 * m);
        sim.run(25);
        let from = sim.owner();
        let (frozen_steps, _, cids) = sim.migrate();
        assert_eq!(frozen_steps, 0, "migration {m}: the export waited");
        assert!(
            (1..=2).contains(&cids.len()),
            "migration {m}: {} CIDs active at a client that allows 2",
            cids.len()
        );
        sim.run(100);
        let owner_sid = sim.workers[sim.owner()].server_id;
        assert_ne!(sim.owner(), from);
        assert_eq!(
            sim.layout
                .decode_server_id(sim.client.dcids.last().unwrap()),
            Some(owner_sid),
            "migration {m}: the client still uses the old owner's CIDs"
        );
    }
    finish(&mut sim, 20_000);
    assert_eq!(sim.client.completed, 10);
    assert_eq!(sim.client.connected, 1, "no second handshake");
    assert_eq!(
        sim.workers[0].responses + sim.workers[1].responses,
        0,
        "no stateless reset or other endpoint response"
    );
}

/// A key update right before a move, started by either side: the previous phase's keys move
/// with the connection, so the export does not wait and late packets of the old phase still
/// decrypt on the target (nothing is lost on a lossless path).
#[test]
fn key_update_right_before_a_move() {
    init_tracing();
    let one_way_ms = 20;
    let mut sim = Sim::new();
    sim.one_way = std::time::Duration::from_millis(one_way_ms);
    sim.run(200);
    for m in 0..6u64 {
        sim.client.start_request(10_000 + 3_001 * m);
        sim.run(20);
        let before = sim.generation();
        let mut waited = 0;
        while sim.generation() == before {
            if waited % 50 == 0 {
                if m % 2 == 0 {
                    sim.client.conn.force_key_update();
                } else {
                    let owner = sim.owner();
                    let ch = sim.workers[owner].only();
                    let live = sim.workers[owner].conns.get_mut(&ch).unwrap();
                    live.conn.force_key_update();
                }
            }
            sim.step();
            waited += 1;
            if waited >= 2_000 {
                let owner = sim.owner();
                let ch = sim.workers[owner].only();
                let conn = &sim.workers[owner].conns[&ch].conn;
                panic!(
                    "migration {m}: key update never happened: generation {before}, owner {owner}, update kept {}, client's {}",
                    conn.handoff_key_update_in_progress(),
                    sim.client.conn.handoff_key_update_in_progress()
                );
            }
        }
        let (frozen_steps, generation, _) = sim.migrate();
        assert!(
            sim.carried_key_update.is_some(),
            "migration {m}: the update was over before the export"
        );
        assert_eq!(generation, before + 1);
        assert_eq!(frozen_steps, 0, "migration {m}: the export waited");
        sim.run(100);
    }
    finish(&mut sim, 20_000);
    assert_eq!(sim.client.completed, 6);
    assert_eq!(sim.client.conn.stats().path.lost_packets, 0);
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
    let hex = lb_common::hex(handoff.secrets.client_secret_0.expose());
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
