//! The worker under load (issue 14), as a real `baton-worker` process on loopback with stock quinn
//! clients: request bodies at the size limit, and clients that write faster than they read
//! (memory stays within the configured limits, every byte is echoed exactly, other clients keep
//! being served, and no send is refused by the kernel).
mod common;

use baton_worker::demo::{KIND_REQUEST, KIND_STREAM, MAX_REQUEST};
use common::client::{StreamLoad, Traffic, TrafficConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Far beyond what anything takes on a loaded machine: only a worker that never gets there fails.
const WAIT: Duration = Duration::from_secs(30);

/// A `baton-worker` process serving the demo on 127.0.0.1, with metrics.
struct Worker {
    child: std::process::Child,
    dir: PathBuf,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port_udp() -> (std::net::UdpSocket, u16) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let p = s.local_addr().unwrap().port();
    (s, p)
}

impl Worker {
    /// Starts a worker whose config ends with `extra` (e.g. a `[limits]` table).
    fn start(name: &str, extra: &str) -> Worker {
        let dir = std::env::temp_dir().join(format!("baton-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        baton_worker::certs::generate(&dir, &["w1".into()], "localhost").unwrap();
        let (held, port) = free_port_udp();
        let metrics_port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let d = |f: &str| dir.join(f).display().to_string();
        std::fs::write(
            dir.join("worker.toml"),
            format!(
                "vip = \"127.0.0.1\"\nport = {port}\nserver_id = 1\ncert = \"{}\"\nkey = \"{}\"\n\
                 metrics = \"127.0.0.1:{metrics_port}\"\n{extra}",
                d("service.pem"),
                d("service.key"),
            ),
        )
        .unwrap();
        drop(held);
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let w = Worker {
            child,
            dir,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            metrics: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
        };
        let deadline = Instant::now() + WAIT;
        while w.scrape().is_none() {
            assert!(Instant::now() < deadline, "no metrics within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    fn endpoint(&self) -> quinn::Endpoint {
        common::demo_client_endpoint(common::roots_from_pem(&self.dir.join("ca.pem")))
    }

    async fn connect(&self, endpoint: &quinn::Endpoint) -> quinn::Connection {
        tokio::time::timeout(WAIT, endpoint.connect(self.addr, "localhost").unwrap())
            .await
            .expect("handshake in time")
            .expect("handshake")
    }

    /// The metrics page, or None if it does not answer.
    fn scrape(&self) -> Option<String> {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&self.metrics, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: worker\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.starts_with("HTTP/1.1 200").then_some(text)
    }

    /// Sum of a metric's samples (every label set).
    fn metric(&self, name: &str) -> u64 {
        let text = self.scrape().expect("metrics answer");
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The worker's resident memory now and at its peak, in bytes.
    fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        (kib("VmRSS:"), kib("VmHWM:"))
    }
}

/// One request of `body_len` bytes, the FIN with the last bytes or `fin_later`. Ok(counter and
/// echoed body), or Err(reset code).
async fn request(
    conn: &quinn::Connection,
    body: &[u8],
    fin_later: bool,
) -> Result<(u64, Vec<u8>), u64> {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let mut all = vec![KIND_REQUEST];
    all.extend_from_slice(body);
    // A refused body makes the worker stop our sending: the write may fail, the answer tells.
    if s.write_all(&all).await.is_ok() {
        if fin_later {
            // The body is out (and acknowledged by now); the FIN goes in a packet of its own.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = s.finish();
    }
    match tokio::time::timeout(WAIT, r.read_to_end(MAX_REQUEST + 64))
        .await
        .expect("an answer in time")
    {
        Ok(answer) => Ok((
            u64::from_be_bytes(answer[..8].try_into().unwrap()),
            answer[8..].to_vec(),
        )),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Err(code.into_inner()),
        Err(e) => panic!("reading the answer: {e}"),
    }
}

/// A body of exactly 1 MiB is answered; one byte more is refused with code 1 and uses up no
/// request number, whether the FIN comes with the last bytes or later.
#[tokio::test]
async fn request_bodies_at_the_size_limit() {
    let worker = Worker::start("limit", "");
    let endpoint = worker.endpoint();
    let conn = worker.connect(&endpoint).await;
    let body = |len: usize| (0..len).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>();
    let mut expected = 0;
    for fin_later in [false, true] {
        let exact = body(MAX_REQUEST);
        expected += 1;
        let (n, echoed) = request(&conn, &exact, fin_later)
            .await
            .unwrap_or_else(|code| panic!("1 MiB (FIN later: {fin_later}) refused: {code}"));
        assert_eq!(n, expected, "FIN later: {fin_later}");
        assert!(echoed == exact, "1 MiB echoed byte-exact");
        let over = body(MAX_REQUEST + 1);
        assert_eq!(
            request(&conn, &over, fin_later).await.map(|(n, _)| n),
            Err(1),
            "1 MiB + 1 (FIN later: {fin_later})"
        );
    }
    // The refusals took no number: the next request is the third answered.
    assert_eq!(request(&conn, b"after", false).await.unwrap().0, 3);
    conn.close(0u32.into(), b"done");
}

/// Four clients write as fast as they can on long echo streams for at least 20 s and until 1 GB
/// came back, while a fifth makes requests one after another. The worker's memory stays within a
/// bound derived from its `[limits]` (it slows the writers through flow control instead of
/// buffering), every byte comes back in order, the fifth client keeps being answered, and the
/// kernel refused no send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_clients_are_slowed_down_not_buffered() {
    const MIB: u64 = 1 << 20;
    const FLOODERS: u64 = 4;
    let worker = Worker::start(
        "flood",
        "[limits]\nstream_buffer = 262144\nconnection_buffer = 1048576\nmemory_budget = 2097152\n\
         receive_window = 2097152\nstream_receive_window = 1048576\nsend_window = 2097152\n",
    );
    let endpoint = worker.endpoint();
    let requester = worker.connect(&endpoint).await;
    request(&requester, b"warm-up", false).await.unwrap();
    let (rss_before, _) = worker.rss();

    // Each flooder writes pattern bytes as fast as it can and checks every echoed byte.
    let mut flooders = Vec::new();
    for seed in 0..FLOODERS {
        let endpoint = worker.endpoint();
        let conn = worker.connect(&endpoint).await;
        let flood = TrafficConfig {
            seed,
            stream: Some(StreamLoad {
                chunk: 64 * 1024,
                pause: None,
            }),
            requests: None,
        };
        let traffic = Traffic::start(&conn, flood).await.unwrap();
        flooders.push((endpoint, conn, traffic));
    }
    let echoed = || -> u64 { flooders.iter().map(|(_, _, t)| t.echoed()).sum() };
    let stop = Arc::new(AtomicBool::new(false));

    // Requests one after another on their own connection, all through the flood.
    let stop_r = stop.clone();
    let requests = tokio::spawn(async move {
        let (mut n, mut worst) = (0u64, Duration::ZERO);
        while !stop_r.load(Ordering::Relaxed) {
            let started = Instant::now();
            let body = n.to_be_bytes();
            let (counter, echoed) = request(&requester, &body, false).await.unwrap();
            assert_eq!((counter, &echoed[..]), (n + 2, &body[..]));
            worst = worst.max(started.elapsed());
            n += 1;
        }
        (n, worst)
    });

    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(20) || echoed() < 1 << 30 {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "only {} MiB echoed in 240 s",
            echoed() / MIB
        );
        if let Some((_, _, t)) = flooders.iter().find(|(_, _, t)| t.ended().is_some()) {
            panic!("a flooder's {} ended early", t.ended().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(worker.rss().0);
    }
    stop.store(true, Ordering::Relaxed);
    let echoed_total = echoed();
    let mut echoed_at_end = 0;
    for (seed, (_endpoint, conn, traffic)) in flooders.into_iter().enumerate() {
        // Every byte written came back, in order and byte-exact (or finish says what did not).
        let end = tokio::time::timeout(WAIT, traffic.finish())
            .await
            .expect("writer and echo end")
            .unwrap_or_else(|e| panic!("stream {seed}: {e:#}"));
        assert_eq!(end.echoed, end.written, "every byte written came back");
        echoed_at_end += end.echoed;
        conn.close(0u32.into(), b"done");
    }
    assert!(echoed_at_end >= echoed_total);
    let (answered, worst) = requests.await.unwrap();
    let (_, hwm) = worker.rss();
    peak = peak.max(hwm);
    let send_errors = worker.metric("baton_worker_send_errors_total");
    let buffered_peak = worker.metric("baton_worker_buffered_bytes_peak");
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "RESULT flood seconds={secs:.1} echoed_mib={} echo_mib_per_s={:.1} rss_before_mib={} rss_peak_mib={} buffered_peak_kib={} requests={answered} worst_request_ms={} send_errors={send_errors}",
        echoed_at_end / MIB,
        echoed_at_end as f64 / MIB as f64 / secs,
        rss_before / MIB,
        peak / MIB,
        buffered_peak / 1024,
        worst.as_millis(),
    );
    assert_eq!(send_errors, 0, "the kernel refused sends");
    // Five connections x (receive window + send window + connection buffer) = 25 MiB at most
    // held for clients; the rest is slack for the allocator and quinn's own records.
    assert!(
        peak <= rss_before + 64 * MIB,
        "RSS grew from {} MiB to {} MiB",
        rss_before / MIB,
        peak / MIB
    );
    assert!(
        buffered_peak <= 2 * MIB + 8 * (FLOODERS + 1) * 1024,
        "the services held {buffered_peak} bytes, over the 2 MiB budget"
    );
    assert!(
        answered >= 20,
        "only {answered} requests answered during the flood"
    );
    assert!(worst < Duration::from_secs(5), "a request waited {worst:?}");
}

/// A client that resets its long streams gets them reset back, so each one closes and gives the
/// client its stream credit back: far more streams than `max_concurrent_streams` (100) opened
/// and abandoned one after another, then a request is still answered.
#[tokio::test]
async fn abandoned_streams_are_closed_and_their_credit_returned() {
    let worker = Worker::start("abandon", "");
    let endpoint = worker.endpoint();
    let conn = worker.connect(&endpoint).await;
    for i in 0..150u32 {
        let (mut send, mut recv) = tokio::time::timeout(WAIT, conn.open_bi())
            .await
            .unwrap_or_else(|_| panic!("stream {i}: no stream credit within {WAIT:?}"))
            .unwrap();
        send.write_all(&[KIND_STREAM, 1, 2, 3]).await.unwrap();
        send.reset(7u32.into()).unwrap();
        // The worker answers the reset with its own: the read ends with it.
        let end = tokio::time::timeout(WAIT, recv.read_to_end(1 << 10))
            .await
            .unwrap_or_else(|_| panic!("stream {i}: never closed by the worker"));
        assert!(
            matches!(
                end,
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_))) | Ok(_)
            ),
            "stream {i}: {end:?}"
        );
    }
    assert_eq!(request(&conn, b"still here", false).await.unwrap().0, 1);
    conn.close(0u32.into(), b"done");
}
