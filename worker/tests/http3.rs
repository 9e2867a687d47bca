//! The proxy service end to end in one process: an h3 client (h3-quinn over quinn) through the
//! two-worker lab (`common::lab`) to a real hyper upstream on loopback (`baton-upstream`'s
//! server). Connections move between the workers between requests and the client never notices;
//! a migration asked for while a response streams waits for it, or rolls back as
//! `requests_in_flight`, and the response completes intact either way.
mod common;

use baton_test_upstream::pattern;
use baton_worker::core::ExportFailure;
use common::h3::{client, echo, get, proxy, upstream};
use common::lab::Lab;
use std::time::{Duration, Instant};

const QUIESCE: Duration = Duration::from_secs(20);

/// Where the one connection is, and its id there.
async fn locate(lab: &Lab) -> (usize, usize) {
    for (w, worker) in lab.workers.iter().enumerate() {
        if let Some(c) = worker.connections().await.unwrap().first() {
            return (w, c.id);
        }
    }
    panic!("the connection is on neither worker");
}

async fn move_connection(lab: &Lab) -> Duration {
    let (from, id) = locate(lab).await;
    let started = Instant::now();
    let exported = lab.workers[from].migrate_out(id, QUIESCE).await.unwrap();
    lab.hand_over(from, 1 - from, exported).await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_connection_moves_between_requests_and_the_client_never_notices() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    for protocol in ["http1", "h2c"] {
        let lab = Lab::start(proxy(upstream().await, protocol)).await;
        let mut c = client(&lab).await;
        let mut moves = 0;
        for round in 0..12u64 {
            let seed = round + 1;
            let (status, body) = get(&mut c.send, &format!("/bytes/1000?seed={seed}")).await;
            assert_eq!(status, 200, "{protocol} round {round}");
            assert_eq!(body, pattern(seed, 0, 1000), "{protocol} round {round}");
            let large = get(&mut c.send, &format!("/bytes/500000?seed={seed}")).await;
            assert_eq!(
                large.1,
                pattern(seed, 0, 500_000),
                "{protocol} round {round}"
            );
            let posted = pattern(seed + 1000, 0, 70_000);
            assert_eq!(
                echo(&mut c.send, &posted).await,
                posted,
                "{protocol} round {round}"
            );
            move_connection(&lab).await;
            moves += 1;
        }
        // The headers the upstream saw: forwarded for the client, over HTTP/3.
        let (_, headers) = get(&mut c.send, "/headers").await;
        let headers = String::from_utf8(headers).unwrap();
        assert!(headers.contains("x-forwarded-for: 127.0.0.1"), "{headers}");
        assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
        assert!(headers.contains("via: 3 baton"), "{headers}");
        assert!(
            c.conn.close_reason().is_none(),
            "{protocol}: the connection survived"
        );
        assert!(!c.driver.is_finished());
        eprintln!("{protocol}: {moves} moves, 37 requests on one connection, byte-exact");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_during_a_streaming_response_waits_or_rolls_back_and_the_response_completes() {
    let lab = Lab::start(proxy(upstream().await, "http1")).await;
    let mut c = client(&lab).await;
    // Warm up: the HTTP/3 set-up (control streams, SETTINGS) is done.
    assert_eq!(get(&mut c.send, "/bytes/10?seed=1").await.0, 200);

    // A response that streams for ~1 s: a migration bounded at 100 ms rolls back...
    let mut slow = c.send.clone();
    let drip = tokio::spawn(async move {
        get(&mut slow, "/drip/20000?seed=9&chunk=2000&interval_ms=100").await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (from, id) = locate(&lab).await;
    match lab.workers[from]
        .migrate_out(id, Duration::from_millis(100))
        .await
    {
        Err(ExportFailure::Busy(what)) => assert!(what.contains("requests in flight"), "{what}"),
        Err(e) => panic!("expected a busy rollback, got {e}"),
        Ok(_) => panic!("exported with a response streaming"),
    }
    // ...and one with a longer bound waits for the response's end, then moves.
    let (from, id) = locate(&lab).await;
    let exported = lab.workers[from].migrate_out(id, QUIESCE).await.unwrap();
    lab.hand_over(from, 1 - from, exported).await;
    let (status, body) = drip.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body,
        pattern(9, 0, 20_000),
        "the streamed response is intact"
    );
    assert_eq!(locate(&lab).await.0, 1 - from);
    // The connection goes on at the target.
    let (status, body) = get(&mut c.send, "/bytes/4096?seed=5").await;
    assert_eq!((status, body), (http::StatusCode::OK, pattern(5, 0, 4096)));
    assert!(c.conn.close_reason().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_the_connection_carries_on() {
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let lab = Lab::start(proxy(addr, "http1")).await;
    let mut c = client(&lab).await;
    for _ in 0..3 {
        let (status, _) = get(&mut c.send, "/bytes/10").await;
        assert_eq!(status, 502);
    }
    assert!(c.conn.close_reason().is_none());
}
