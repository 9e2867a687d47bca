//! The peer channel against hostile callers (issue 15), with a real `baton-worker` process on
//! loopback and quinn clients that hold a CA-signed certificate that is not a worker's (the
//! controller's), another worker's certificate (w2, a configured peer), or none:
//! - only configured workers complete the handshake;
//! - a configured worker cannot send a transfer in another's name, and a transfer is refused on
//!   its header and token before any of its snapshot is read, with no memory spent on what it
//!   announced;
//! - forwarded datagrams for connections that were not imported from the forwarder make the
//!   worker send nothing, whatever address they claim.
mod common;

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Far beyond what anything takes on a loaded machine: only a worker that never answers fails.
const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// A migrating `baton-worker` (w1) whose `[peer] workers` lists itself and w2.
struct Worker {
    child: std::process::Child,
    dir: PathBuf,
    peer: SocketAddr,
    log: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- worker log ----\n{}", self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Worker {
    fn start(name: &str) -> Worker {
        let dir = std::env::temp_dir().join(format!("baton-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        baton_worker::certs::generate(&dir, &["w1".into(), "w2".into()], "localhost").unwrap();
        let [port, peer_port] = common::free_udp_ports();
        std::fs::write(
            dir.join("worker.toml"),
            common::migrating_worker_config(&dir, port, peer_port, "", ""),
        )
        .unwrap();
        let log = dir.join("worker.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let w = Worker {
            child,
            peer: format!("127.0.0.1:{peer_port}").parse().unwrap(),
            log,
            dir,
        };
        // Up once it answers on its control socket (the peer channel is bound before it).
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(w.dir.join("w1.sock")).is_err() {
            assert!(Instant::now() < deadline, "worker not up: {}", w.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib * 1024
    }

    /// A peer-channel client presenting `cert` (`<cert>.pem`/`.key` from gen-certs), or none.
    fn client(&self, cert: Option<&str>) -> quinn::Endpoint {
        let roots = common::roots_from_pem(&self.dir.join("ca.pem"));
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
        let mut tls = match cert {
            Some(c) => {
                let (certs, key) = baton_worker::load_tls(
                    &self.dir.join(format!("{c}.pem")),
                    &self.dir.join(format!("{c}.key")),
                )
                .unwrap();
                b.with_client_auth_cert(certs, key).unwrap()
            }
            None => b.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![baton_protocol::peer::PEER_ALPN.to_vec()];
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        )));
        ep
    }

    async fn connect(&self, ep: &quinn::Endpoint) -> Result<quinn::Connection, String> {
        tokio::time::timeout(WAIT, ep.connect(self.peer, "w1").unwrap())
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())
    }
}

/// One transfer stream: `header` (JSON) announcing a snapshot of `announced` bytes, then `body`
/// bytes of it; returns the worker's answer.
async fn transfer(
    conn: &quinn::Connection,
    header: &Value,
    announced: u64,
    body: usize,
) -> Result<Value, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut header = header.clone();
    header["snapshot_len"] = json!(announced);
    let h = serde_json::to_vec(&header).unwrap();
    let mut msg = (h.len() as u32).to_be_bytes().to_vec();
    msg.extend(&h);
    s.write_all(&msg).await.map_err(|e| e.to_string())?;
    // The body goes out beside the read: a worker that stops reading must not wedge us.
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a; 64 << 10];
        let mut left = body;
        while left > 0 {
            let n = left.min(chunk.len());
            if s.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            left -= n;
        }
        s
    });
    let answer = tokio::time::timeout(WAIT, r.read_to_end(64 << 10))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    writer.abort();
    serde_json::from_slice(&answer).map_err(|e| e.to_string())
}

fn header(source: u32) -> Value {
    json!({
        "migration_id": "00112233445566778899aabbccddeeff",
        "conn": "0102030405060708",
        "source": source,
        "target": 1,
        "token": "00".repeat(64),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_workers_are_admitted_on_the_peer_channel() {
    let w = Worker::start("hostile-admit");
    // The controller's certificate is from the same CA, but it is not a worker's; no
    // certificate at all. Either the handshake fails, or the worker closes the connection as
    // soon as it has seen the certificate: no transfer gets an answer.
    for who in [Some("controller"), None] {
        let ep = w.client(who);
        if let Ok(conn) = w.connect(&ep).await {
            let r = transfer(&conn, &header(2), 100, 0).await;
            assert!(r.is_err(), "{who:?} got an answer: {r:?}");
        }
    }
    // w2 is a configured worker: admitted, and its transfer with a bad token refused.
    let ep = w.client(Some("w2"));
    let conn = w.connect(&ep).await.expect("w2 is admitted");
    let answer = transfer(&conn, &header(2), 100, 100).await.unwrap();
    assert_eq!(answer["kind"], "invalid_token", "{answer}");
    let log = w.log_text();
    assert!(
        log.contains("not in peer.workers"),
        "the refusal names the setting: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_refused_on_their_header_before_their_snapshot_is_read() {
    let w = Worker::start("hostile-import");
    let ep = w.client(Some("w2"));
    let conn = w.connect(&ep).await.expect("w2 is admitted");
    // w2 may not send as another worker.
    let answer = transfer(&conn, &header(3), 100, 100).await.unwrap();
    assert_eq!(answer["kind"], "unauthorized", "{answer}");
    // A bad token is answered before a byte of the announced 64 MiB is sent.
    let answer = transfer(&conn, &header(2), 64 * MIB, 0).await.unwrap();
    assert_eq!(answer["kind"], "invalid_token", "{answer}");
    // A header that never completes is given up on.
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(&[0, 0]).await.unwrap();
    let started = Instant::now();
    let answer: Value = serde_json::from_slice(
        &tokio::time::timeout(WAIT, r.read_to_end(4096))
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(answer["kind"], "timeout", "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Sixteen transfers at once, each announcing 64 MiB and sending 48 MiB of it: all refused,
    // and the worker's memory does not follow what they announced or sent.
    let before = w.rss();
    let attacks = (0..16).map(|_| {
        let conn = conn.clone();
        tokio::spawn(async move { transfer(&conn, &header(2), 64 * MIB, 48 << 20).await })
    });
    let mut peak = before;
    for a in attacks {
        let answer = a.await.unwrap().unwrap();
        assert_eq!(answer["kind"], "invalid_token", "{answer}");
        peak = peak.max(w.rss());
    }
    eprintln!(
        "RESULT hostile_import rss_before_mib={} rss_peak_mib={}",
        before / MIB,
        peak / MIB
    );
    assert!(
        peak < before + 64 * MIB,
        "RSS grew from {} MiB to {} MiB",
        before / MIB,
        peak / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_datagrams_cannot_aim_the_worker_at_another_address() {
    let w = Worker::start("hostile-forward");
    let ep = w.client(Some("w2"));
    let conn = w.connect(&ep).await.expect("w2 is admitted");
    // The address the attacker wants answers sent to: another loopback address we listen on.
    let victim = tokio::net::UdpSocket::bind("127.0.0.9:0").await.unwrap();
    let to = victim.local_addr().unwrap();
    let long_unknown_version = {
        let mut p = vec![0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 8];
        p.extend([7u8; 8]);
        p.push(8);
        p.extend([9u8; 8]);
        p.resize(1200, 0);
        p
    };
    let initial_v1 = {
        let mut p = vec![0xc0, 0, 0, 0, 1, 8];
        p.extend([3u8; 8]);
        p.push(0);
        p.resize(1200, 0);
        p
    };
    let short = {
        let mut p = vec![0x40];
        p.extend([0x11u8; 8]);
        p.resize(100, 0);
        p
    };
    let d: Vec<(SocketAddr, Vec<u8>)> = [long_unknown_version, initial_v1, short]
        .into_iter()
        .map(|p| (to, p))
        .collect();
    for _ in 0..5 {
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&baton_worker::migrate::encode_datagrams(&d))
            .await
            .unwrap();
        s.finish().unwrap();
    }
    let mut buf = [0u8; 2048];
    let got = tokio::time::timeout(Duration::from_secs(2), victim.recv_from(&mut buf)).await;
    assert!(
        got.is_err(),
        "the worker sent {:?} to the address a peer claimed",
        got
    );
    let deadline = Instant::now() + WAIT;
    while !w.log_text().contains("dropping a forwarded datagram") {
        assert!(Instant::now() < deadline, "the refusal is not logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
