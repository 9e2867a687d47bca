//! The emulated path end to end on 127.0.0.1: a real quinn client on an [`ImpairedSocket`]
//! against a small in-process server of the demo protocol (`docs/DEMO-PROTOCOL.md`), and the
//! `baton-load` binary with `--rtt`/`--loss` against the same server.
//!
//! Only lower bounds are asserted (a delay is never shorter than asked); the figures are printed.
use baton_load::client;
use baton_load::impair::{DirectionConfig, ImpairedSocket, PathConfig, PathStats};
use baton_load::{ALPN, KIND_REQUEST, KIND_STREAM, MAX_REQUEST, Summary};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A demo-protocol server on 127.0.0.1; returns it with its certificate.
fn demo_server() -> (quinn::Endpoint, CertificateDer<'static>) {
    demo_server_on("127.0.0.1:0".parse().unwrap())
}

/// A demo-protocol server on `addr`; returns it with its certificate.
fn demo_server_on(addr: SocketAddr) -> (quinn::Endpoint, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
    let endpoint = quinn::Endpoint::server(config, addr).unwrap();
    let accept = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let counter = Arc::new(AtomicU64::new(0));
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(send, recv, counter.clone()));
                }
            });
        }
    });
    (endpoint, cert)
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    counter: Arc<AtomicU64>,
) {
    let mut kind = [0u8];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    match kind[0] {
        KIND_REQUEST => {
            let Ok(body) = recv.read_to_end(MAX_REQUEST).await else {
                return;
            };
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = send.write_all(&n.to_be_bytes()).await;
            let _ = send.write_all(&body).await;
            let _ = send.finish();
        }
        KIND_STREAM => {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                if send.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
        }
        _ => {}
    }
}

fn client_config(cert: &CertificateDer<'static>) -> quinn::ClientConfig {
    client::quinn_config(client::client_tls(client::roots_of(cert.clone())))
}

fn impaired_client(path: &PathConfig, stats: Arc<PathStats>) -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let socket = ImpairedSocket::new(socket, path, 0, stats).unwrap();
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap()
}

/// One demo request (the answer checked byte-exact); returns its session counter.
async fn request(conn: &quinn::Connection, body: &[u8]) -> u64 {
    client::checked_request(conn, body).await.unwrap()
}

fn one_way(delay_ms: u64, loss: f64) -> DirectionConfig {
    DirectionConfig {
        delay: Duration::from_millis(delay_ms),
        loss,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_request_take_the_emulated_round_trip() {
    let (server, cert) = demo_server();
    let target = server.local_addr().unwrap();
    let rtt = Duration::from_millis(80);
    let path = PathConfig {
        up: one_way(30, 0.0),
        down: one_way(50, 0.0),
        seed: 1,
        ..Default::default()
    };
    // The same on the real (loopback) path, for the printout.
    let plain = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let t = Instant::now();
    let conn = plain
        .connect_with(client_config(&cert), target, "localhost")
        .unwrap()
        .await
        .unwrap();
    let plain_handshake = t.elapsed();
    let t = Instant::now();
    request(&conn, b"plain").await;
    let plain_request = t.elapsed();
    conn.close(0u32.into(), b"done");

    let stats = Arc::new(PathStats::default());
    let client = impaired_client(&path, stats.clone());
    let t = Instant::now();
    let conn = client
        .connect_with(client_config(&cert), target, "localhost")
        .unwrap()
        .await
        .unwrap();
    let handshake = t.elapsed();
    let t = Instant::now();
    assert_eq!(request(&conn, b"first").await, 1);
    let first = t.elapsed();
    let t = Instant::now();
    for i in 2..=5 {
        assert_eq!(request(&conn, b"again").await, i);
    }
    let later = t.elapsed() / 4;
    eprintln!(
        "loopback: handshake {plain_handshake:?}, first request {plain_request:?}; emulated RTT +{rtt:?}: \
         handshake {handshake:?}, first request {first:?}, later requests {later:?} each, quinn's RTT estimate {:?}",
        conn.rtt()
    );
    assert!(handshake >= rtt, "handshake in {handshake:?}");
    assert!(first >= rtt, "first request in {first:?}");
    assert!(later >= rtt, "requests in {later:?}");
    assert!(conn.rtt() >= rtt, "quinn estimates {:?}", conn.rtt());
    let (up, down) = (stats.up.counts(), stats.down.counts());
    assert!(up.packets > 0 && up.delayed == up.packets && up.dropped == 0);
    assert!(down.packets > 0 && down.delayed == down.packets && down.dropped == 0);
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_survive_loss_jitter_and_reordering() {
    let (server, cert) = demo_server();
    let target = server.local_addr().unwrap();
    let path = PathConfig {
        up: one_way(5, 0.1),
        down: one_way(5, 0.1),
        jitter: Duration::from_millis(2),
        reorder: 0.05,
        reorder_delay: Duration::from_millis(5),
        seed: 2,
    };
    let stats = Arc::new(PathStats::default());
    let client = impaired_client(&path, stats.clone());
    let conn = client
        .connect_with(client_config(&cert), target, "localhost")
        .unwrap()
        .await
        .unwrap();
    let body = vec![7u8; 3000]; // a few datagrams per request
    for i in 1..=40 {
        assert_eq!(request(&conn, &body).await, i);
    }
    let (up, down) = (stats.up.counts(), stats.down.counts());
    eprintln!(
        "10% loss each way: up {up:?}, down {down:?}; client declared {} packets lost",
        conn.stats().path.lost_packets
    );
    // Seed 2 (socket 0) drops datagram 8 up and 3 down, and holds back 52 up and 0 down: with
    // 40 requests of 3 datagrams each, both happen in both directions whatever the timing.
    assert!(up.packets >= 120 && down.packets >= 120);
    assert!(up.dropped > 0 && down.dropped > 0);
    assert!(up.held_back > 0 && down.held_back > 0);
    assert_eq!(up.send_errors, 0);
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
}

#[test]
fn baton_load_reports_the_emulated_path() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (server, _cert) = rt.block_on(async { demo_server() });
    let target: SocketAddr = server.local_addr().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-load"))
        .args(["--target", &target.to_string(), "--insecure-skip-verify"])
        .args(["--connections", "2", "--duration", "3s", "--json"])
        .args(["--rtt", "40ms", "--loss", "1%", "--impair-seed", "5"])
        .args(["--stream-rate", "8192", "--progress-interval", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "baton-load failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("emulated path: RTT +40 ms (up 20 ms, down 20 ms), loss 1% each way"));
    let s: Summary = serde_json::from_str(stdout.trim()).unwrap();
    let p = s.path.as_ref().expect("the summary reports the path");
    eprintln!(
        "baton-load on RTT +40 ms, 1% loss: {} requests, stall p50 {:.1} ms, up {:?}, down {:?}",
        s.requests, s.p50_stall_ms, p.up, p.down
    );
    assert!(s.ok);
    assert_eq!((p.seed, p.rtt_ms, p.up_loss_pct), (5, 40.0, 1.0));
    assert!(p.up.packets > 0 && p.down.packets > 0);
    // Every request takes at least the emulated round trip.
    for c in &s.per_connection {
        assert!(c.requests > 0 && c.max_stall_ms >= 40.0, "{c:?}");
    }
    drop(server);
}

/// Two targets (IPv4 and IPv6 loopback): the connections alternate between them. With
/// --rebind-every and --key-update-every (on an emulated path, so the rebinds go through
/// `rebind_abstract`) every connection survives its new ports and key updates, and both are
/// counted. Only counts are asserted: each connection runs for 3 s with an event every 200 ms.
#[test]
fn baton_load_two_families_rebinds_and_key_updates() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (v4, _) = rt.block_on(async { demo_server_on("127.0.0.1:0".parse().unwrap()) });
    let (v6, _) = rt.block_on(async { demo_server_on("[::1]:0".parse().unwrap()) });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-load"))
        .args([
            "--insecure-skip-verify",
            "--json",
            "--progress-interval",
            "0",
        ])
        .args(["--target", &v4.local_addr().unwrap().to_string()])
        .args(["--target", &v6.local_addr().unwrap().to_string()])
        .args([
            "--connections",
            "4",
            "--duration",
            "3s",
            "--stream-rate",
            "8192",
        ])
        .args(["--rebind-every", "200ms", "--key-update-every", "200ms"])
        .args(["--rtt", "2ms", "--impair-seed", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "baton-load failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let s: Summary = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!(
        "two families: {} requests, {} rebinds, {} key updates, stall max {:.1} ms",
        s.requests, s.rebinds, s.key_updates, s.max_stall_ms
    );
    assert!(s.ok, "{s:?}");
    assert_eq!((s.ipv4_connections, s.ipv6_connections), (2, 2));
    for c in &s.per_connection {
        let v6 = c.target.starts_with('[');
        assert_eq!(v6, c.index % 2 == 1, "{c:?}");
        assert_eq!(c.local_addr.starts_with('['), v6, "{c:?}");
        assert!(c.rebinds > 0 && c.key_updates > 0, "{c:?}");
    }
    assert_eq!(
        s.rebinds,
        s.per_connection.iter().map(|c| c.rebinds).sum::<u64>()
    );
    drop((v4, v6));
}
