//! A worker on two VIPs, IPv4 and IPv6 (127.0.0.1 and ::1, the same port), with real sockets and
//! tokio loops, no root: unmodified quinn clients over each address family talk the demo protocol
//! to two worker loops behind the two VIP sockets (a userspace stand-in for the XDP load balancer,
//! as in `migrate.rs`). Each connection must be answered from the VIP its client addressed (a
//! quinn client drops packets from any other address), also after moving between the workers; a
//! worker without the connection's VIP refuses to import it.
mod common;

use baton_worker::io::{Inbound, WorkerHandle, spawn};
use baton_worker::udp::{UdpIo, VipSockets};
use lb_common::cid::CidLayout;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long to wait for something that takes milliseconds: far beyond what a loaded machine
/// needs, so only a real stall fails the test.
const WAIT: Duration = Duration::from_secs(30);
/// The freeze's quiescence timeout: not what this test is about, so generous.
const QUIESCE: Duration = Duration::from_secs(20);
const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Binds 127.0.0.1 and ::1 on one port (a free one on both).
fn dual_sockets() -> VipSockets {
    let mut last = None;
    for _ in 0..50 {
        let v4 = UdpIo::bind(SocketAddr::new(V4, 0)).unwrap();
        let port = v4.local_addr().unwrap().port();
        match UdpIo::bind(SocketAddr::new(V6, port)) {
            Ok(v6) => return VipSockets::new(vec![v4, v6]).unwrap(),
            Err(e) => last = Some(e),
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1: {last:?}");
}

/// One request on `conn`; checks the session counter `n` and the echoed body.
async fn request(conn: &quinn::Connection, n: u64) {
    let body: Vec<u8> = (0..200 + n as usize * 31)
        .map(|i| (i as u64 ^ n) as u8)
        .collect();
    common::client::expect_request(conn, &body, n, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Moves the connection whose client is `remote` from `from` to `to` (LB stand-in: overrides).
async fn migrate(
    workers: &[WorkerHandle],
    overrides: &Mutex<HashMap<Vec<u8>, usize>>,
    remote: SocketAddr,
    from: usize,
    to: usize,
) {
    let conns = workers[from].connections().await.unwrap();
    let c = conns
        .iter()
        .find(|c| c.remote == remote)
        .unwrap_or_else(|| panic!("{remote} not on worker {from}: {conns:?}"));
    let exported = workers[from].migrate_out(c.id, QUIESCE).await.unwrap();
    workers[to].import(exported.state).await.unwrap();
    let kept = workers[from].take_forward().await.unwrap();
    workers[to].inject(kept).await.unwrap();
    {
        let mut routes = overrides.lock().unwrap();
        for cid in &exported.cids {
            routes.insert(cid.clone(), to);
        }
    }
    // Stragglers that reached the source after the flip follow.
    let deadline = Instant::now() + Duration::from_millis(50);
    while Instant::now() < deadline {
        let kept = workers[from].take_forward().await.unwrap();
        workers[to].inject(kept).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    workers[from].forget_exported(exported.cids).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_and_ipv6_clients_are_answered_from_their_vip_across_migrations() {
    let dir = std::env::temp_dir().join(format!("baton-dual-test-{}", std::process::id()));
    baton_worker::certs::generate(&dir, &["w1".into()], "localhost").unwrap();
    let sockets = Arc::new(dual_sockets());
    let vips = sockets.vips();
    assert_eq!(vips, [V4, V6]);
    let port = sockets.sockets()[0].local_addr().unwrap().port();
    let layout = CidLayout::default();
    let (mut senders, mut workers) = (Vec::new(), Vec::new());
    for server_id in [1u64, 2] {
        let (tx, rx) = mpsc::channel(4096);
        let core = common::demo_core(server_id, vips.clone(), &dir);
        workers.push(spawn(core, sockets.clone(), Inbound::Channel(rx)).0);
        senders.push(tx);
    }
    // The LB stand-in reads both VIP sockets: Initials to worker 0, else override or server ID.
    let overrides: Arc<Mutex<HashMap<Vec<u8>, usize>>> = Arc::default();
    let (routes, lb) = (overrides.clone(), sockets.clone());
    tokio::spawn(async move {
        let mut received = Vec::new();
        while lb.recv(&mut received).await.is_ok() {
            for d in received.drain(..) {
                let w = if d.data[0] & 0x80 != 0 {
                    0
                } else {
                    let cid = &d.data[1..1 + layout.cid_len()];
                    let o = routes.lock().unwrap().get(cid).copied();
                    o.unwrap_or(usize::from(layout.decode_server_id(cid) == Some(2)))
                };
                let _ = senders[w].send(d).await;
            }
        }
    });

    let roots = || common::roots_from_pem(&dir.join("ca.pem"));
    let v4_client = common::demo_client_endpoint(roots());
    let v6_client = common::client::endpoint(SocketAddr::new(V6, 0), roots()).unwrap();
    let mut conns = Vec::new();
    for (ep, vip) in [(&v4_client, V4), (&v6_client, V6)] {
        let c = ep
            .connect(SocketAddr::new(vip, port), "localhost")
            .unwrap()
            .await
            .unwrap();
        conns.push((c, vip, ep.local_addr().unwrap()));
    }
    for (c, _, _) in &conns {
        request(c, 1).await;
    }
    // Each connection is listed with the VIP its client addressed.
    let listed = workers[0].connections().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (_, vip, local) in &conns {
        let row = listed.iter().find(|c| c.remote.port() == local.port());
        assert_eq!(row.map(|r| r.vip), Some(Some(*vip)), "{listed:?}");
    }

    // Both move back and forth; every request after each move is answered (from the right VIP,
    // or the client would never see the answer).
    let mut n = 1;
    let mut owner = 0;
    for _ in 0..4 {
        for (_, vip, local) in &conns {
            let remote = SocketAddr::new(*vip, local.port());
            migrate(&workers, &overrides, remote, owner, 1 - owner).await;
        }
        owner = 1 - owner;
        n += 1;
        for (c, _, _) in &conns {
            request(c, n).await;
        }
        let listed = workers[owner].connections().await.unwrap();
        assert_eq!(listed.len(), 2, "both on worker {owner}: {listed:?}");
        for (_, vip, local) in &conns {
            let row = listed.iter().find(|c| c.remote.port() == local.port());
            assert_eq!(row.map(|r| r.vip), Some(Some(*vip)), "{listed:?}");
        }
    }
    // A worker that does not serve the IPv6 VIP refuses the IPv6 connection (it could not
    // answer from ::1); the source takes it back and it carries on there.
    let (_tx, rx) = mpsc::channel(16);
    let v4_only = spawn(
        common::demo_core(3, vec![V4], &dir),
        sockets.clone(),
        Inbound::Channel(rx),
    )
    .0;
    let listed = workers[owner].connections().await.unwrap();
    let v6 = listed
        .iter()
        .find(|c| c.vip == Some(V6))
        .expect("the IPv6 connection");
    let exported = workers[owner].migrate_out(v6.id, QUIESCE).await.unwrap();
    let err = v4_only
        .import_held(exported.state.clone())
        .await
        .unwrap_err();
    assert!(err.contains("not one of this worker's VIPs"), "{err}");
    assert!(v4_only.connections().await.unwrap().is_empty());
    workers[owner].import(exported.state).await.unwrap();
    let kept = workers[owner]
        .take_forward_for(exported.cids)
        .await
        .unwrap();
    workers[owner].inject(kept).await.unwrap();
    n += 1;
    for (c, _, _) in &conns {
        request(c, n).await;
    }
    for (c, _, _) in &conns {
        assert!(c.close_reason().is_none(), "{:?}", c.close_reason());
        c.close(0u32.into(), b"done");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
