//! Real sockets, real tokio loops: an unmodified quinn client talks the demo protocol to two
//! worker loops behind one VIP socket (`common::lab`: a userspace stand-in for the XDP load
//! balancer, the workers sending straight from the VIP socket, like direct server return). The connection moves between the workers while a long
//! stream and a request loop run; the client checks every byte and the session's request counter.
mod common;

use baton_worker::demo::DemoService;
use common::client::{self, RequestLoad, StreamLoad, Traffic, TrafficConfig};
use common::lab::Lab;
use lb_common::cid::CidLayout;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long to wait for something that takes milliseconds (a request answered, the client moving
/// onto new CIDs): far beyond what a loaded machine needs, so only a real stall fails a test.
const WAIT: Duration = Duration::from_secs(30);
/// How long a freeze may wait for the connection to become quiescent. A round trip on loopback is
/// enough; this is not what the tests measure, so it is generous.
const QUIESCE: Duration = Duration::from_secs(20);

/// Polls `done` every few milliseconds until it holds; panics after [`WAIT`], naming `what`.
async fn wait_until(what: impl std::fmt::Display, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn client(lab: &Lab) -> quinn::Connection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(lab.cert.clone()).unwrap();
    let endpoint = common::demo_client_endpoint(roots);
    endpoint
        .connect(lab.vip, "localhost")
        .unwrap()
        .await
        .unwrap()
}

/// Waits (up to [`WAIT`]) until worker `owner`'s connections are reachable only by CIDs carrying
/// its server ID, i.e. the client retired the previous owner's CIDs.
async fn wait_for_own_cids(lab: &Lab, owner: usize) {
    let sid = owner as u64 + 1;
    let deadline = Instant::now() + WAIT;
    loop {
        let conns = lab.workers[owner].connections().await.unwrap();
        if conns.iter().all(|c| {
            !c.cids.is_empty()
                && c.cids
                    .iter()
                    .all(|cid| CidLayout::default().decode_server_id(cid) == Some(sid))
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "old CIDs still in use on worker {owner} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Moves the connection from worker `from` to the other one; returns how long it took.
async fn migrate(lab: &Lab, from: usize) -> Duration {
    let to = 1 - from;
    let started = Instant::now();
    let conns = lab.workers[from].connections().await.unwrap();
    assert_eq!(conns.len(), 1, "worker {from} holds the connection");
    let exported = lab.workers[from]
        .migrate_out(conns[0].id, QUIESCE)
        .await
        .unwrap();
    lab.workers[to].import(exported.state).await.unwrap();
    // What reached the source while frozen goes first, then the LB flips.
    let kept = lab.workers[from].take_forward().await.unwrap();
    lab.workers[to].inject(kept).await.unwrap();
    {
        let mut routes = lab.overrides.lock().unwrap();
        for c in &exported.cids {
            routes.insert(c.clone(), to);
        }
    }
    let took = started.elapsed();
    // Whatever reached the source meanwhile goes to the target, now and a little later.
    for _ in 0..3 {
        let kept = lab.workers[from].take_forward().await.unwrap();
        lab.workers[to].inject(kept).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lab.workers[from]
        .forget_exported(exported.cids)
        .await
        .unwrap();
    assert!(lab.workers[from].connections().await.unwrap().is_empty());
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quinn_client_keeps_its_connection_across_worker_migrations() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let lab = Lab::start(Arc::new(DemoService::default())).await;
    let conn = client(&lab).await;
    // The long-lived stream (the client writes continuously and checks every echoed byte) and
    // the request/response loop (the session's request counter must continue across migrations).
    let traffic = Traffic::start(
        &conn,
        TrafficConfig {
            seed: 7,
            stream: Some(StreamLoad {
                chunk: 4096,
                pause: Some(Duration::from_millis(1)),
            }),
            requests: Some(RequestLoad {
                size: |n| 500 + (n as usize * 997) % 20_000,
                pause: None,
            }),
        },
    )
    .await
    .unwrap();

    // Both flows are under way before the first move.
    wait_until("the first requests and echoed bytes", || {
        traffic.answered() >= 3 && traffic.echoed() >= 64 * 1024
    })
    .await;
    let mut owner = 0;
    let mut took = Vec::new();
    let migrations = 12;
    for m in 0..migrations {
        took.push(migrate(&lab, owner).await);
        owner = 1 - owner;
        // The new owner serves: one request at a time, so the one after the next is opened only
        // once the move is over (the next may have been answered before the freeze).
        let (a, e) = (traffic.answered(), traffic.echoed());
        wait_until(
            format_args!(
                "requests and the long stream to go on at worker {owner} after migration {m}"
            ),
            || {
                assert_eq!(traffic.ended(), None, "a traffic task ended");
                traffic.answered() >= a + 2 && traffic.echoed() > e
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        // The client retired the previous owner's CIDs: every CID left routes by its server ID,
        // so the overrides can go (what the controller does once old CIDs are retired).
        wait_for_own_cids(&lab, owner).await;
        lab.overrides.lock().unwrap().clear();
    }
    // Every byte echoed, every answer byte-exact and in counter order (or an error here).
    let end = traffic.finish().await.unwrap();
    let (echoed, done, max_gap) = (end.echoed, end.requests, end.max_gap);
    assert_eq!(echoed, end.written, "long stream echoed completely");
    assert!(
        conn.close_reason().is_none(),
        "connection alive: {:?}",
        conn.close_reason()
    );
    assert!(
        done > 2 * migrations,
        "requests kept completing across every migration ({done})"
    );
    // The client now talks to the current owner's CIDs only; the other worker holds nothing.
    assert_eq!(lab.workers[owner].connections().await.unwrap().len(), 1);
    assert!(
        lab.workers[1 - owner]
            .connections()
            .await
            .unwrap()
            .is_empty()
    );
    let stats = conn.stats();
    eprintln!(
        "RESULT migrations={migrations} requests={done} long_stream_bytes={echoed} max_request_gap_ms={} migrate_ms_max={} lost_packets={} rtt_ms={}",
        max_gap.as_millis(),
        took.iter().max().unwrap().as_millis(),
        stats.path.lost_packets,
        stats.path.rtt.as_millis()
    );
    conn.close(0u32.into(), b"done");
}

/// Packets in flight no longer hold a migration up, but a path validation under way does: the
/// client's address appears to change (a NAT rebinding) to one that never answers the challenge.
/// A migration with a zero timeout then rolls back; once the client's real address is seen again
/// the connection carries on, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_that_cannot_happen_in_time_rolls_back() {
    let lab = Lab::start(Arc::new(DemoService::default())).await;
    let conn = client(&lab).await;
    let traffic = Traffic::start(
        &conn,
        TrafficConfig {
            seed: 9,
            stream: Some(StreamLoad {
                chunk: 16 * 1024,
                pause: None,
            }),
            requests: None,
        },
    )
    .await
    .unwrap();
    wait_until("the long stream to flow", || traffic.echoed() >= 256 * 1024).await;

    let real = lab.workers[0].connections().await.unwrap()[0].remote;
    // Nothing listens there: the path validation towards it can never succeed.
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    *lab.rewrite_source.lock().unwrap() = Some(nowhere);
    let owner = 0;
    let mut rolled_back = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline && !rolled_back {
        let conns = lab.workers[owner].connections().await.unwrap();
        if conns[0].remote != nowhere {
            // Not seen from there yet, or the validation failed and quinn went back to the old
            // path until the next datagram: look again.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        match lab.workers[owner]
            .migrate_out(conns[0].id, Duration::ZERO)
            .await
        {
            Err(reason) => {
                let reason = reason.to_string();
                assert!(reason.contains("path validation"), "{reason}");
                rolled_back = true;
            }
            Ok(exported) => {
                // Between a failed validation and the next datagram the connection can be
                // exported: put it back where it was and look again.
                lab.workers[owner].import(exported.state).await.unwrap();
                let kept = lab.workers[owner].take_forward().await.unwrap();
                lab.workers[owner].inject(kept).await.unwrap();
            }
        }
    }
    assert!(
        rolled_back,
        "no export was refused during a path validation"
    );
    *lab.rewrite_source.lock().unwrap() = None;
    let deadline = Instant::now() + WAIT;
    while lab.workers[owner].connections().await.unwrap()[0].remote != real {
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} for the worker to see the client's real address again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = traffic.echoed();
    wait_until("the long stream to flow again", || {
        traffic.echoed() > e + 64 * 1024
    })
    .await;
    // Rolled back: still on the same worker, un-frozen, and the connection carries on.
    let conns = lab.workers[owner].connections().await.unwrap();
    assert_eq!(conns.len(), 1);
    assert!(!conns[0].frozen);
    for n in 1..=5u64 {
        client::expect_request(&conn, &[42], n, WAIT)
            .await
            .unwrap_or_else(|e| panic!("after the rollback: {e:#}"));
    }
    let end = traffic.finish().await.unwrap();
    assert_eq!(end.echoed, end.written);
    assert!(conn.close_reason().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_worker_moves_every_connection() {
    let lab = Lab::start(Arc::new(DemoService::default())).await;
    let connections = 16;
    // A request loop per connection; requests answered so far, per connection.
    let mut loops = Vec::new();
    for c in 0..connections {
        let conn = client(&lab).await;
        let traffic = Traffic::start(
            &conn,
            TrafficConfig {
                seed: c * 1_000_000,
                stream: None,
                requests: Some(RequestLoad {
                    size: |n| 200 + (n as usize * 131) % 3_000,
                    pause: Some(Duration::from_millis(2)),
                }),
            },
        )
        .await
        .unwrap();
        loops.push((conn, traffic));
    }
    let counts = || -> Vec<u64> { loops.iter().map(|(_, t)| t.answered()).collect() };
    // Every connection answers at least `min[c]` requests (each loop runs one request at a time).
    let all_reach = |min: Vec<u64>| {
        let (counts, loops) = (&counts, &loops);
        move || {
            assert!(
                loops.iter().all(|(_, t)| t.ended().is_none()),
                "a request loop ended"
            );
            counts().iter().zip(&min).all(|(n, m)| n >= m)
        }
    };
    wait_until(
        "every connection to answer a request",
        all_reach(vec![1; connections as usize]),
    )
    .await;
    for (from, round) in [(0usize, 0), (1, 1), (0, 2)] {
        let to = 1 - from;
        let conns = lab.workers[from].connections().await.unwrap();
        assert_eq!(
            conns.len(),
            connections as usize,
            "round {round}: all on worker {from}"
        );
        let started = Instant::now();
        for c in conns {
            let exported = lab.workers[from].migrate_out(c.id, QUIESCE).await.unwrap();
            lab.workers[to].import(exported.state).await.unwrap();
            let kept = lab.workers[from].take_forward().await.unwrap();
            lab.workers[to].inject(kept).await.unwrap();
            let mut routes = lab.overrides.lock().unwrap();
            for cid in &exported.cids {
                routes.insert(cid.clone(), to);
            }
        }
        let drained_in = started.elapsed();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let kept = lab.workers[from].take_forward().await.unwrap();
        lab.workers[to].inject(kept).await.unwrap();
        assert!(lab.workers[from].connections().await.unwrap().is_empty());
        // Every connection goes on at the target: the request after the one in flight at the
        // freeze is opened only once its connection moved.
        let past = counts();
        wait_until(
            format_args!("every connection to answer requests at worker {to} (round {round})"),
            all_reach(past.iter().map(|n| n + 2).collect()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        wait_for_own_cids(&lab, to).await;
        lab.overrides.lock().unwrap().clear();
        eprintln!(
            "drain round {round}: {connections} connections moved in {} ms",
            drained_in.as_millis()
        );
    }
    let mut total = 0;
    for (conn, traffic) in loops {
        total += traffic.finish().await.unwrap().requests;
        assert!(conn.close_reason().is_none());
    }
    eprintln!("RESULT drain connections={connections} rounds=3 requests={total}");
    assert!(
        total >= connections * 7,
        "every connection answered requests on every owner ({total})"
    );
}
