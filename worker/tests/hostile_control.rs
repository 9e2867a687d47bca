//! Hostile callers of the worker's TCP listeners (issue 15), against a real `baton-worker` process
//! on loopback with `baton-worker gen-certs` certificates: the control API over mutual TLS
//! (`[control_tls]`) and the metrics endpoint.
//!
//! - A flood of TCP connections that never handshake, from one address and from many, does not
//!   keep the real controller (the controller certificate, ALPN `baton-control/1`) out, round
//!   after round; the flood is closed by the worker and its memory stays bounded.
//! - Only the allowed certificate with the ALPN is served: another worker's certificate (same
//!   CA), no certificate, no ALPN, another ALPN are refused; past `max_clients` authenticated
//!   clients, one more is answered `busy`.
//! - 200 clients sending a request head one byte per second are cut off within the deadline,
//!   while a normal scrape still answers; the refusals are counted.
//!
//! Attackers connect from 127.0.0.2 and up (all of 127/8 is loopback), the controller and the
//! scraper from 127.0.0.1. Waits are generous (a loaded 2-core machine): what is asserted is who
//! is served and who is not, never how fast.
mod common;

use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far beyond what anything takes on a loaded machine: only a worker that never gets there fails.
const WAIT: Duration = Duration::from_secs(30);
const MAX_CLIENTS: usize = 4;

struct Worker {
    child: std::process::Child,
    dir: PathBuf,
    control: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- worker log ----\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Worker {
    /// A worker `w1` with `[control_tls]` (clients = baton-controller) and metrics on 127.0.0.1.
    async fn start(name: &str) -> Worker {
        let dir = std::env::temp_dir().join(format!("baton-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = env!("CARGO_BIN_EXE_baton-worker");
        let o = std::process::Command::new(bin)
            .args(["gen-certs", "--workers", "w1,w2", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "gen-certs: {o:?}");
        let control: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let d = dir.display();
        let [vip_port, peer_port] = common::free_udp_ports();
        let cfg = common::migrating_worker_config(
            &dir,
            vip_port,
            peer_port,
            &format!("metrics = \"{metrics}\""),
            &format!(
                r#"[control_tls]
listen = "{control}"
ca = "{d}/ca.pem"
cert = "{d}/w1.pem"
key = "{d}/w1.key"
clients = ["baton-controller"]
max_clients = {MAX_CLIENTS}
"#
            ),
        );
        std::fs::write(dir.join("w1.toml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("w1.log")).unwrap();
        let child = std::process::Command::new(bin)
            .arg("--config")
            .arg(dir.join("w1.toml"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut w = Worker {
            child,
            dir,
            control,
            metrics,
        };
        let start = Instant::now();
        loop {
            assert!(
                w.child.try_wait().unwrap().is_none(),
                "worker exited:\n{}",
                w.log()
            );
            if w.info(&w.pair("controller"), true).await.is_ok() {
                break;
            }
            assert!(start.elapsed() < WAIT, "worker not up:\n{}", w.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        w
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("w1.log")).unwrap_or_default()
    }

    fn pair(&self, name: &str) -> Option<(PathBuf, PathBuf)> {
        Some((
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        ))
    }

    /// A TLS client of the control API from 127.0.0.1 with this certificate and ALPN list.
    async fn connect(
        &self,
        client: &Option<(PathBuf, PathBuf)>,
        alpn: &[&[u8]],
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&self.dir.join("ca.pem")));
        let mut cfg = match client {
            Some((cert, key)) => {
                let (c, k) = baton_worker::load_tls(cert, key).unwrap();
                b.with_client_auth_cert(c, k).unwrap()
            }
            None => b.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let tcp = TcpStream::connect(self.control)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("w1").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))
    }

    /// `{"cmd":"info"}` over TLS; Ok(answer) if the worker answered at all.
    async fn info(&self, client: &Option<(PathBuf, PathBuf)>, alpn: bool) -> Result<Value, String> {
        let alpn: &[&[u8]] = if alpn { &[b"baton-control/1"] } else { &[] };
        self.info_with(client, alpn).await
    }

    async fn info_with(
        &self,
        client: &Option<(PathBuf, PathBuf)>,
        alpn: &[&[u8]],
    ) -> Result<Value, String> {
        tokio::time::timeout(WAIT, async {
            let mut s = self.connect(client, alpn).await?;
            request(&mut s).await
        })
        .await
        .map_err(|_| "no answer in time".to_string())?
    }

    /// The metrics page from 127.0.0.1, or an error.
    async fn scrape(&self) -> Result<String, String> {
        tokio::time::timeout(WAIT, async {
            let mut s = TcpStream::connect(self.metrics)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: worker\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut text = String::new();
            s.read_to_string(&mut text)
                .await
                .map_err(|e| e.to_string())?;
            if text.starts_with("HTTP/1.1 200") {
                Ok(text)
            } else {
                Err(format!("answer: {text:?}"))
            }
        })
        .await
        .map_err(|_| "no answer in time".to_string())?
    }

    /// One sample of a metric (the first line starting with `series`).
    async fn metric(&self, series: &str) -> u64 {
        let text = self.scrape().await.expect("metrics answer");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// The worker's resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
            * 1024
    }
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    baton_worker::load_roots(ca).unwrap()
}

/// Sends `{"cmd":"info"}` and reads one answer line.
async fn request<S>(s: &mut S) -> Result<Value, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(b"{\"cmd\":\"info\"}\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut line = String::new();
    let n = tokio::io::BufReader::new(s)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("closed without answering".into());
    }
    serde_json::from_str(&line).map_err(|e| format!("unreadable answer {line:?}: {e}"))
}

/// 127.0.0.`2 + n`: an attacker's source address.
fn attacker(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n as u8))
}

/// A TCP connection to `to` from `from` (any port).
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// Waits until the worker closed `s` (EOF or reset); the time it took, or None after `limit`.
async fn closed_within(mut s: TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at((start + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn is_ok(v: &Result<Value, String>) -> bool {
    matches!(v, Ok(v) if v["ok"] == true)
}

/// Rounds of 64 idle connections from one address and 64 from sixteen others (more than the
/// worker's 64 pending places), held open; in every round the controller is served. Every flood
/// connection is closed by the worker, the log holds a bounded number of refusal lines, and the
/// worker's memory does not grow with the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_does_not_keep_the_controller_out() {
    let w = Worker::start("flood").await;
    let controller = w.pair("controller");
    let rss_before = w.rss();
    let mut rss_peak = rss_before;
    let mut served = Vec::new();
    let mut closing = Vec::new();
    for round in 0..4 {
        let mut flood = Vec::new();
        for i in 0..64 {
            flood.push(connect_from(attacker(0), w.control).await);
            flood.push(connect_from(attacker(1 + i % 16), w.control).await);
        }
        let flood: Vec<TcpStream> = flood
            .into_iter()
            .map(|c| c.expect("the kernel accepts the connect"))
            .collect();
        // The flood is in (and has filled every pending place); the controller comes now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        let answer = w.info(&controller, true).await;
        assert!(
            is_ok(&answer),
            "round {round}: controller not served: {answer:?}"
        );
        assert_eq!(answer.unwrap()["data"]["name"], "w1");
        served.push(start.elapsed());
        rss_peak = rss_peak.max(w.rss());
        for s in flood {
            closing.push(tokio::spawn(closed_within(s, WAIT * 2)));
        }
    }
    // Every flood connection is closed by the worker: refused at once, cut off to make room,
    // or at the handshake deadline.
    let mut slowest = Duration::ZERO;
    for (i, c) in closing.into_iter().enumerate() {
        let t = c
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("flood connection {i} still open after {:?}", WAIT * 2));
        slowest = slowest.max(t);
    }
    rss_peak = rss_peak.max(w.rss());
    // And the controller is served after the flood too.
    assert!(is_ok(&w.info(&controller, true).await));
    // Each flood connection was refused once: at once, cut off, or at the deadline.
    let tls = |r: &str| format!("baton_worker_control_tls_refused_total{{reason=\"{r}\"}}");
    let source_limit = w.metric(&tls("source_limit")).await;
    let evicted = w.metric(&tls("evicted")).await;
    let timed_out = w.metric(&tls("handshake_timeout")).await;
    assert!(
        source_limit + evicted + timed_out >= 4 * 128,
        "refusals counted: {source_limit} + {evicted} + {timed_out}"
    );
    assert!(source_limit > 0 && evicted > 0, "{source_limit} {evicted}");
    let log = w.log();
    let refusal_lines = log
        .lines()
        .filter(|l| l.contains("control TLS:") && l.contains("WARN"))
        .count();
    eprintln!(
        "controller served in {served:?} during 4 floods of 128 idle connections; flood closed \
         within {slowest:?} (refused at once {source_limit}, cut off {evicted}, timed out \
         {timed_out}); {refusal_lines} refusal lines logged; RSS {} -> peak {} KiB",
        rss_before / 1024,
        rss_peak / 1024
    );
    assert!(
        log.contains("too many pending handshakes"),
        "the refusals are logged:\n{log}"
    );
    // 512 refusals and evictions: a burst of lines, then one per 10 s.
    assert!(
        refusal_lines < 60,
        "refusals flood the log: {refusal_lines} lines"
    );
    // A pending handshake costs a few KiB: 64 of them, nowhere near this.
    assert!(
        rss_peak < rss_before + (64 << 20),
        "RSS grew from {rss_before} to {rss_peak} bytes"
    );
}

/// Only the controller certificate with ALPN baton-control/1 is served; at most `max_clients` of
/// them at once, one more is answered `busy`.
#[tokio::test]
async fn only_the_allowed_certificate_with_the_alpn_is_served() {
    let w = Worker::start("names").await;
    let controller = w.pair("controller");
    assert!(is_ok(&w.info(&controller, true).await));
    // Another worker's certificate: signed by the same CA, but w2 is not a controller.
    let e = w.info(&w.pair("w2"), true).await;
    assert!(!is_ok(&e), "a worker's certificate was served: {e:?}");
    // No certificate.
    let e = w.info(&None, true).await;
    assert!(!is_ok(&e), "no certificate was served: {e:?}");
    // The controller's certificate, but no ALPN, or another one.
    let e = w.info(&controller, false).await;
    assert!(!is_ok(&e), "no ALPN was served: {e:?}");
    let e = w.info_with(&controller, &[b"h2"]).await;
    assert!(!is_ok(&e), "ALPN h2 was served: {e:?}");
    // Offering several, baton-control/1 among them, is fine.
    let v = w.info_with(&controller, &[b"h2", b"baton-control/1"]).await;
    assert!(is_ok(&v), "{v:?}");

    // max_clients authenticated clients held open; the next is answered busy.
    let mut held = Vec::new();
    for _ in 0..MAX_CLIENTS {
        let mut s = w.connect(&controller, &[b"baton-control/1"]).await.unwrap();
        assert!(is_ok(&request(&mut s).await));
        held.push(s);
    }
    let busy = w.info(&controller, true).await.expect("an answer");
    assert_eq!(busy["kind"], "busy", "{busy}");
    // Idle TCP connections take no client slot: with one slot free, the controller gets it.
    let idle = idle_connections(&w, 8).await;
    held.pop();
    let start = Instant::now();
    loop {
        // The worker notices the closed client when it reads from it: soon, but not at once.
        let v = w.info(&controller, true).await;
        if is_ok(&v) {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "a freed slot was not given back: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(idle);

    let tls = |r: &str| format!("baton_worker_control_tls_refused_total{{reason=\"{r}\"}}");
    // w2, no certificate, ALPN h2; no ALPN; one busy.
    assert!(w.metric(&tls("handshake_failed")).await >= 3);
    assert!(w.metric(&tls("alpn")).await >= 1);
    assert!(w.metric(&tls("busy")).await >= 1);
    let log = w.log();
    for needle in [
        "not in control_tls.clients",
        "peer sent no certificates",
        "negotiated no ALPN",
        "peer doesn't support any known protocol",
        "too many clients",
    ] {
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }
    assert!(!log.contains("PRIVATE KEY"));
}

/// `n` idle TCP connections to the control port from an attacker address.
async fn idle_connections(w: &Worker, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(connect_from(attacker(40), w.control).await.unwrap());
    }
    v
}

/// 200 clients from twenty addresses send a request head one byte per second: every one is cut
/// off within the deadline (plus slack), a normal scrape answers during the attack, the
/// refusals are counted, and the worker's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_metrics_clients_are_cut_off_and_scrapes_still_answer() {
    let w = Worker::start("metrics").await;
    let rss_before = w.rss();
    let mut slow = Vec::new();
    for i in 0..200 {
        let s = connect_from(attacker(i / 10), w.metrics)
            .await
            .expect("the kernel accepts the connect");
        slow.push(tokio::spawn(trickle(s)));
    }
    let mut rss_peak = rss_before;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let page = w.scrape().await;
        assert!(page.is_ok(), "a scrape during the attack: {page:?}");
        rss_peak = rss_peak.max(w.rss());
    }
    let mut slowest = Duration::ZERO;
    for (i, t) in slow.into_iter().enumerate() {
        let t = t.await.unwrap().unwrap_or_else(|| {
            panic!("slow client {i} was not cut off within {:?}", TRICKLE_LIMIT)
        });
        slowest = slowest.max(t);
    }
    let page = w.scrape().await;
    assert!(page.is_ok(), "a scrape after the attack: {page:?}");
    let counted = w
        .metric("baton_worker_metrics_refused_total{reason=\"source_limit\"}")
        .await
        + w.metric("baton_worker_metrics_refused_total{reason=\"evicted\"}")
            .await
        + w.metric("baton_worker_metrics_refused_total{reason=\"deadline\"}")
            .await;
    eprintln!(
        "200 slow metrics clients cut off within {slowest:?}; {counted} refusals counted; RSS {} -> peak {} KiB",
        rss_before / 1024,
        rss_peak / 1024
    );
    assert!(counted >= 200, "every slow client is counted: {counted}");
    assert!(
        rss_peak < rss_before + (64 << 20),
        "RSS grew from {rss_before} to {rss_peak} bytes"
    );
}

/// How long a trickling client keeps trying (the deadline is 10 s; this is slack for a loaded
/// machine, not a bound the worker is meant to reach).
const TRICKLE_LIMIT: Duration = Duration::from_secs(60);

/// Sends a request head one byte per second until the worker closes the connection; the time
/// that took, or None after [`TRICKLE_LIMIT`].
async fn trickle(mut s: TcpStream) -> Option<Duration> {
    let head = b"GET /metrics HTTP/1.1\r\nhost: worker\r\nx-slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let start = Instant::now();
    let mut buf = [0u8; 512];
    for byte in head {
        if start.elapsed() > TRICKLE_LIMIT {
            return None;
        }
        if s.write_all(&[*byte]).await.is_err() {
            return Some(start.elapsed());
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            // Closed (a 408 answer counts: it is followed by the close).
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
    }
    None
}
