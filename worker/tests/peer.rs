//! The migration path between worker processes, in one process without root: two worker loops
//! behind one VIP socket (a userspace stand-in for the LB, as in `migrate.rs`), each with its
//! control context and its own peer-channel endpoint (quinn, mutual TLS, certificates from
//! `certs::generate`). `migrate::migrate_out` moves the connection; a target that refuses the
//! token makes the source roll back, and the connection carries on there.
mod common;

use baton_protocol::worker::{MigrateOut, TargetRef};
use baton_protocol::{Cid, ErrorKind, HexBytes};
use baton_worker::config::PeerWorker;
use baton_worker::core::{CoreConfig, WorkerCore};
use baton_worker::demo::DemoService;
use baton_worker::io::{Inbound, WorkerHandle, spawn};
use baton_worker::migrate::Ctx;
use baton_worker::udp::{UdpIo, VipSockets};
use lb_common::cid::CidLayout;
use migration::{
    MigrationBinding, MigrationId, MigrationTokenManager, TokenConfig, TokenSecret, WorkerId,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// How long to wait for something that takes milliseconds (a request answered, a held import
/// discarded): far beyond what a loaded machine needs, so only a real stall fails the test.
const WAIT: Duration = Duration::from_secs(30);
/// The freeze's quiescence timeout (`timeout_ms`): not what this test is about, so generous.
const QUIESCE_MS: u64 = 20_000;
/// How long the target sits on the snapshot in step 3 (`BATON_TEST_IMPORT_DELAY_MS`): twice the
/// source's 1.5 s transfer timeout, so the source gives up first even if its timer fires late.
const IMPORT_DELAY_MS: u64 = 3_000;

/// Worker `name`'s peer-channel endpoint (bound, not yet serving), admitting w1 and w2.
fn endpoint(dir: &Path, name: &str) -> quinn::Endpoint {
    let any = "127.0.0.1:0".parse().unwrap();
    let names = [("w1", 1), ("w2", 2)].map(|(name, server_id)| PeerWorker {
        name: name.into(),
        server_id,
        peer: any,
    });
    let (server, client) = baton_worker::migrate::peer_tls(
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
        &names,
    )
    .unwrap();
    let mut ep = quinn::Endpoint::server(server, any).unwrap();
    ep.set_default_client_config(client);
    ep
}

/// `[peer] workers` with w1 and w2 at these endpoints' addresses.
fn workers(w1: &quinn::Endpoint, w2: &quinn::Endpoint) -> Vec<PeerWorker> {
    vec![
        PeerWorker {
            name: "w1".into(),
            server_id: 1,
            peer: w1.local_addr().unwrap(),
        },
        PeerWorker {
            name: "w2".into(),
            server_id: 2,
            peer: w2.local_addr().unwrap(),
        },
    ]
}

fn ctx(
    dir: &Path,
    (name, sid): (&str, u32),
    handle: WorkerHandle,
    token_secret: &[u8],
    ep: quinn::Endpoint,
    workers: Vec<PeerWorker>,
) -> Arc<Ctx> {
    let secrets = baton_worker::secrets::Secrets::load(&dir.join("secrets.toml")).unwrap();
    let (key_id, key) = secrets.snapshot_key.unwrap();
    let tokens = MigrationTokenManager::new(
        TokenConfig::default(),
        1,
        TokenSecret::from_bytes(token_secret).unwrap(),
    )
    .unwrap();
    let pipeline = migration::SnapshotSealer::new(migration::EncryptionService::new(key_id, key));
    let ctx = Ctx::new(
        baton_worker::migrate::Identity {
            name: name.into(),
            server_id: sid,
            cid_layout: baton_protocol::worker::CidLayout {
                cid_len: 8,
                server_id_len: 2,
            },
        },
        handle,
        tokens,
        pipeline,
        ep,
        workers,
    )
    .unwrap();
    tokio::spawn(baton_worker::migrate::serve_peer(ctx.clone()));
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_out_over_the_peer_channel_and_roll_back_on_refusal() {
    let dir = std::env::temp_dir().join(format!("baton-peer-test-{}", std::process::id()));
    baton_worker::certs::generate(&dir, &["w1".into(), "w2".into()], "localhost").unwrap();
    let (certs, key) =
        baton_worker::load_tls(&dir.join("service.pem"), &dir.join("service.key")).unwrap();
    let socket = Arc::new(VipSockets::single(
        UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
    ));
    let vip = socket.sockets()[0].local_addr().unwrap();
    let layout = CidLayout::default();
    let (mut senders, mut handles) = (Vec::new(), Vec::new());
    for server_id in [1u64, 2] {
        let core = WorkerCore::new(
            CoreConfig {
                server_id,
                layout,
                certs: certs.clone(),
                key: key.clone_key(),
                vips: vec![vip.ip()],
                allow_mtud: false,
                limits: Default::default(),
            },
            Arc::new(DemoService::default()),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(4096);
        handles.push(spawn(core, socket.clone(), Inbound::Channel(rx)).0);
        senders.push(tx);
    }
    // The LB stand-in: Initials to worker 0, short headers by override, else by server ID.
    let overrides: Arc<Mutex<HashMap<Vec<u8>, usize>>> = Arc::default();
    let routes = overrides.clone();
    let lb_socket = socket.clone();
    tokio::spawn(async move {
        let mut received = Vec::new();
        while lb_socket.recv(&mut received).await.is_ok() {
            for d in received.drain(..) {
                let w = if d.data[0] & 0x80 != 0 {
                    0
                } else {
                    let cid = &d.data[1..1 + layout.cid_len()];
                    let o = routes.lock().unwrap().get(cid).copied();
                    o.unwrap_or(if layout.decode_server_id(cid) == Some(2) {
                        1
                    } else {
                        0
                    })
                };
                let _ = senders[w].send(d).await;
            }
        }
    });
    let secret = [7u8; 32];
    let (ea, eb) = (endpoint(&dir, "w1"), endpoint(&dir, "w2"));
    // A second w2 whose token secret differs (it refuses every token), and a w1 configured
    // with that one as w2.
    let (ea_wrong, eb_wrong) = (endpoint(&dir, "w1"), endpoint(&dir, "w2"));
    let (to_b, to_b_wrong) = (workers(&ea, &eb), workers(&ea_wrong, &eb_wrong));
    let a = ctx(
        &dir,
        ("w1", 1),
        handles[0].clone(),
        &secret,
        ea,
        to_b.clone(),
    );
    let b = ctx(&dir, ("w2", 2), handles[1].clone(), &secret, eb, to_b);
    let a_wrong = ctx(
        &dir,
        ("w1", 1),
        handles[0].clone(),
        &secret,
        ea_wrong,
        to_b_wrong.clone(),
    );
    let b_wrong = ctx(
        &dir,
        ("w2", 2),
        handles[1].clone(),
        &[9u8; 32],
        eb_wrong,
        to_b_wrong,
    );
    // Tokens live as long as allowed: a slow run must not see them expire (or leave the replay
    // caches, which step 3 watches).
    let mut controller = MigrationTokenManager::new(
        TokenConfig {
            ttl: TokenConfig::default().max_ttl,
            ..TokenConfig::default()
        },
        1,
        TokenSecret::from_bytes(&secret).unwrap(),
    )
    .unwrap();

    // The client (trusts the CA; the service certificate names "localhost").
    let endpoint = common::demo_client_endpoint(common::roots_from_pem(&dir.join("ca.pem")));
    let conn = endpoint.connect(vip, "localhost").unwrap().await.unwrap();
    let mut n = 0u64;
    let mut request = async || {
        n += 1;
        common::client::expect_request(&conn, &[n as u8], n, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    };
    request().await;
    let key = handles[0].connections().await.unwrap()[0].key.clone();
    let conn_cid = Cid::new(&key).unwrap();
    let mut out = |target: &Arc<Ctx>| {
        let mid = MigrationId::random();
        let binding = MigrationBinding {
            migration_id: mid,
            connection_id: migration::ConnectionId::new(&key).unwrap(),
            source: WorkerId(1),
            target: WorkerId(2),
        };
        let token = controller.issue(&binding, SystemTime::now()).unwrap();
        MigrateOut {
            conn: conn_cid,
            migration_id: mid,
            token: HexBytes(token.as_bytes().to_vec()),
            target: TargetRef {
                name: "w2".into(),
                server_id: 2,
                peer: target.peer_addr,
            },
            timeout_ms: Some(QUIESCE_MS),
            test_tamper: false,
        }
    };

    // 1. The target refuses the token: rollback, the connection carries on at the source.
    let started = Instant::now();
    let refused = baton_worker::migrate::migrate_out(&a_wrong, out(&b_wrong))
        .await
        .unwrap_err();
    let refused_ms = started.elapsed().as_millis();
    assert_eq!(refused.kind, ErrorKind::InvalidToken, "{}", refused.message);
    assert_eq!(
        handles[0].connections().await.unwrap().len(),
        1,
        "rolled back to the source"
    );
    assert!(
        handles[1].connections().await.unwrap().is_empty(),
        "the target holds nothing"
    );
    for _ in 0..5 {
        request().await;
    }

    // 1b. A good token, but one bit of the sealed snapshot flipped on the way (`test_tamper`):
    //     the target refuses it (the AEAD tag), the source rolls back.
    let tampered = baton_worker::migrate::migrate_out(
        &a,
        MigrateOut {
            test_tamper: true,
            ..out(&b)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        tampered.kind,
        ErrorKind::StateCorruption,
        "{}",
        tampered.message
    );
    assert_eq!(handles[0].connections().await.unwrap().len(), 1);
    assert!(handles[1].connections().await.unwrap().is_empty());
    request().await;

    // 2. A good token: the target imports; flip, release; the connection carries on at the target.
    let req = out(&b);
    let mid = req.migration_id;
    let replay = req.clone();
    let done = baton_worker::migrate::migrate_out(&a, req).await.unwrap();
    // (Step 1 and this move each dial a peer and transfer within the worker's 1.5 s transfer
    // timeout, which has no test knob; the figures show the margin.)
    eprintln!(
        "RESULT refused_ms={refused_ms} migrated_total_ms={} freeze_ms={}",
        done.total_ms, done.freeze_ms
    );
    for c in &done.cids {
        overrides.lock().unwrap().insert(c.as_bytes().to_vec(), 1);
    }
    baton_worker::migrate::release(&a, mid).unwrap();
    assert!(handles[0].connections().await.unwrap().is_empty());
    assert_eq!(
        handles[1].connections().await.unwrap()[0].key,
        key,
        "same connection key on the target"
    );
    for _ in 0..5 {
        request().await;
    }
    // The same request again: its token was used, so it is refused (single use).
    let replayed = baton_worker::migrate::migrate_out(&a, replay)
        .await
        .unwrap_err();
    assert_eq!(
        replayed.kind,
        ErrorKind::InvalidToken,
        "{}",
        replayed.message
    );
    assert!(
        replayed.message.contains("already used"),
        "{}",
        replayed.message
    );
    request().await;

    // 3. The target answers after the source gave up (1.5 s): the source rolls back and keeps
    //    sending; the target's import was held, gets no commit and is discarded unsent.
    let mid = MigrationId::random();
    let binding = MigrationBinding {
        migration_id: mid,
        connection_id: migration::ConnectionId::new(&key).unwrap(),
        source: WorkerId(2),
        target: WorkerId(1),
    };
    let token = controller.issue(&binding, SystemTime::now()).unwrap();
    let late = MigrateOut {
        conn: conn_cid,
        migration_id: mid,
        token: HexBytes(token.as_bytes().to_vec()),
        target: TargetRef {
            name: "w1".into(),
            server_id: 1,
            peer: a.peer_addr,
        },
        timeout_ms: Some(QUIESCE_MS),
        test_tamper: false,
    };
    // w1's token checks so far: one more once it woke up and looked at this transfer.
    let checked = a.tokens.lock().unwrap().replay_cache_len();
    // SAFETY: no other thread of this test process reads or writes the environment now.
    unsafe { std::env::set_var("BATON_TEST_IMPORT_DELAY_MS", IMPORT_DELAY_MS.to_string()) };
    let timed_out = baton_worker::migrate::migrate_out(&b, late)
        .await
        .unwrap_err();
    assert_eq!(
        timed_out.kind,
        ErrorKind::TargetUnavailable,
        "{}",
        timed_out.message
    );
    assert_eq!(
        handles[1].connections().await.unwrap().len(),
        1,
        "rolled back to w2"
    );
    // Requests go on at w2 while w1 sleeps on the snapshot, then checks its token (so it got
    // that far: the token is now in its replay cache), imports held, finds no commit (the source
    // closed the peer connection when it gave up) and discards.
    let deadline = Instant::now() + Duration::from_millis(IMPORT_DELAY_MS) + WAIT;
    while a.tokens.lock().unwrap().replay_cache_len() == checked {
        assert!(
            Instant::now() < deadline,
            "w1 never got to the late transfer's token"
        );
        request().await;
    }
    unsafe { std::env::remove_var("BATON_TEST_IMPORT_DELAY_MS") };
    // The token check comes before the held import is installed, so w1 may be empty for a
    // moment before it holds the import: wait until it is empty for five requests in a row.
    let deadline = Instant::now() + WAIT;
    let mut empty_in_a_row = 0;
    while empty_in_a_row < 5 {
        assert!(
            Instant::now() < deadline,
            "the uncommitted import was not discarded (and kept gone) within {WAIT:?}"
        );
        if handles[0].connections().await.unwrap().is_empty() {
            empty_in_a_row += 1;
        } else {
            empty_in_a_row = 0;
        }
        request().await;
    }
    assert!(conn.close_reason().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
