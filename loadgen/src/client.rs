//! The demo client (`docs/DEMO-PROTOCOL.md`), the one every Baton test and tool speaks the demo
//! protocol with: TLS and endpoint set-up, a request and the check of its answer, and
//! [`Traffic`], a long-lived echo stream plus a request loop on one connection with every byte
//! and the session's request counter checked (what the migration tests keep running while they
//! move the connection).
use crate::{ALPN, KIND_REQUEST, KIND_STREAM, fill, first_mismatch};
use anyhow::{Context, Result, bail};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The CA certificates of a PEM file, as trust roots; an error if it holds none.
pub fn roots_from_pem_file(path: &Path) -> Result<rustls::RootCertStore> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading CA certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .with_context(|| format!("adding a CA certificate from {}", path.display()))?;
    }
    Ok(roots)
}

/// Trust roots of one certificate (e.g. a test's self-signed one).
pub fn roots_of(cert: CertificateDer<'static>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("a usable trust anchor");
    roots
}

fn tls13() -> (
    Arc<rustls::crypto::CryptoProvider>,
    rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with the ring provider");
    (provider, builder)
}

/// TLS 1.3 (ring) for the demo service's ALPN, trusting `roots`.
pub fn client_tls(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let mut tls = tls13()
        .1
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls
}

/// [`client_tls`] accepting any server certificate (lab use only: anyone on the path could
/// impersonate the service). The handshake signature made with it is still checked.
pub fn insecure_client_tls() -> rustls::ClientConfig {
    let (provider, builder) = tls13();
    let mut tls = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SkipServerVerification(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls
}

/// quinn's client config over `tls` (quinn's default transport).
pub fn quinn_config(tls: rustls::ClientConfig) -> quinn::ClientConfig {
    quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("a TLS 1.3 config with an initial cipher suite"),
    ))
}

/// A client endpoint on `socket` (made wherever the caller wants it, e.g. in a network
/// namespace) speaking the demo protocol, trusting `roots`.
pub fn endpoint_on(
    socket: std::net::UdpSocket,
    roots: rustls::RootCertStore,
) -> std::io::Result<quinn::Endpoint> {
    socket.set_nonblocking(true)?;
    let mut ep = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    ep.set_default_client_config(quinn_config(client_tls(roots)));
    Ok(ep)
}

/// A client endpoint on `bind` (port 0: any) speaking the demo protocol, trusting `roots`.
/// (quinn's `Endpoint::client`).
pub fn endpoint(
    bind: SocketAddr,
    roots: rustls::RootCertStore,
) -> std::io::Result<quinn::Endpoint> {
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(quinn_config(client_tls(roots)));
    Ok(ep)
}

/// One request: opens a stream, sends the kind byte and `body`, FIN, and reads the answer (at most
/// the size a correct one has).
pub async fn request(conn: &quinn::Connection, body: &[u8]) -> Result<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await.context("opening a request stream")?;
    send.write_all(&[KIND_REQUEST])
        .await
        .context("writing the request")?;
    send.write_all(body).await.context("writing the request")?;
    send.finish().context("finishing the request")?;
    recv.read_to_end(body.len() + 8)
        .await
        .context("reading the answer")
}

/// Checks an answer to `body` (8-byte big-endian session counter, then the body byte-exact);
/// returns the counter. `n` names the request in the error.
pub fn check_answer(answer: &[u8], body: &[u8], n: u64) -> Result<u64> {
    if answer.len() != body.len() + 8 {
        bail!(
            "answer has {} bytes, expected {}",
            answer.len(),
            body.len() + 8
        );
    }
    let counter = u64::from_be_bytes(answer[..8].try_into().expect("8 bytes"));
    if &answer[8..] != body {
        bail!("answer body differs from the request body (request {n})");
    }
    Ok(counter)
}

/// [`request`] and [`check_answer`]: the session counter of a byte-exact answer.
pub async fn checked_request(conn: &quinn::Connection, body: &[u8]) -> Result<u64> {
    check_answer(&request(conn, body).await?, body, 0)
}

/// [`checked_request`] that must be answered with session counter `n` within `limit`.
pub async fn expect_request(
    conn: &quinn::Connection,
    body: &[u8],
    n: u64,
    limit: Duration,
) -> Result<()> {
    let answer = match tokio::time::timeout(limit, request(conn, body)).await {
        Ok(answer) => answer?,
        Err(_) => bail!(
            "request {n} to {}: no answer within {limit:?}",
            conn.remote_address()
        ),
    };
    let counter = check_answer(&answer, body, n)?;
    if counter != n {
        bail!("request {n} was answered with session counter {counter}");
    }
    Ok(())
}

/// The pattern bytes at `offset..offset + len` of stream `seed` (see [`fill`]).
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, offset, &mut v);
    v
}

/// What a [`Traffic`] runs.
#[derive(Clone, Copy, Debug)]
pub struct TrafficConfig {
    /// Names the long stream's bytes and the request bodies.
    pub seed: u64,
    /// The long-lived echo stream, if any.
    pub stream: Option<StreamLoad>,
    /// The request loop, if any.
    pub requests: Option<RequestLoad>,
}

/// The long stream: `chunk` pattern bytes per write, then `pause` (none: only a yield).
#[derive(Clone, Copy, Debug)]
pub struct StreamLoad {
    pub chunk: usize,
    pub pause: Option<Duration>,
}

/// The request loop: request `n` (from 1) has a body of `size(n)` bytes; `pause` after each
/// answer (none: back to back).
#[derive(Clone, Copy, Debug)]
pub struct RequestLoad {
    pub size: fn(u64) -> usize,
    pub pause: Option<Duration>,
}

/// A long-lived echo stream (every echoed byte checked against what was written) and a request
/// loop (every answer byte-exact, the session counter going 1, 2, 3, ... without a break) on one
/// connection, until [`Traffic::finish`]. A check that fails ends its task with the error, which
/// `finish` returns; [`Traffic::ended`] tells a task ended early.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    writer: Option<JoinHandle<Result<u64>>>,
    reader: Option<JoinHandle<Result<u64>>>,
    requests: Option<JoinHandle<Result<(u64, Duration)>>>,
}

/// What a [`Traffic`] did: long-stream bytes written and echoed back (equal), requests answered
/// and the largest gap between two answers (or before the first).
#[derive(Clone, Copy, Debug, Default)]
pub struct TrafficEnd {
    pub written: u64,
    pub echoed: u64,
    pub requests: u64,
    pub max_gap: Duration,
}

impl Traffic {
    /// Opens the long stream (if any) and starts the tasks.
    pub async fn start(conn: &quinn::Connection, cfg: TrafficConfig) -> Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let seed = cfg.seed;
        let (mut writer, mut reader) = (None, None);
        if let Some(load) = cfg.stream {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .context("opening the long-lived stream")?;
            send.write_all(&[KIND_STREAM])
                .await
                .context("writing the stream kind")?;
            let stop = stop.clone();
            writer = Some(tokio::spawn(async move {
                let mut offset = 0u64;
                let mut chunk = vec![0u8; load.chunk];
                while !stop.load(Ordering::Relaxed) {
                    fill(seed, offset, &mut chunk);
                    send.write_all(&chunk)
                        .await
                        .context("writing the long stream")?;
                    offset += chunk.len() as u64;
                    match load.pause {
                        Some(p) => tokio::time::sleep(p).await,
                        None => tokio::task::yield_now().await,
                    }
                }
                send.finish().context("finishing the long stream")?;
                Ok(offset)
            }));
            let echoed = echoed.clone();
            reader = Some(tokio::spawn(async move {
                let mut got = 0u64;
                let mut buf = vec![0u8; 65536];
                while let Some(n) = recv
                    .read(&mut buf)
                    .await
                    .context("reading the long stream's echo")?
                {
                    if let Some(at) = first_mismatch(seed, got, &buf[..n]) {
                        bail!("long stream byte {at} differs from what was written");
                    }
                    got += n as u64;
                    echoed.store(got, Ordering::Relaxed);
                }
                Ok(got)
            }));
        }
        let requests = cfg.requests.map(|load| {
            let (stop, conn, answered) = (stop.clone(), conn.clone(), answered.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut max_gap = Duration::ZERO;
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = pattern(seed ^ 0x5eed_0000_0000_0000 ^ n, 0, (load.size)(n));
                    let counter = checked_request(&conn, &body)
                        .await
                        .with_context(|| format!("request {n}"))?;
                    if counter != n {
                        bail!("request {n} was answered with session counter {counter}");
                    }
                    answered.store(n, Ordering::Relaxed);
                    max_gap = max_gap.max(last.elapsed());
                    last = Instant::now();
                    if let Some(p) = load.pause {
                        tokio::time::sleep(p).await;
                    }
                }
                Ok((n, max_gap))
            })
        });
        Ok(Traffic {
            stop,
            answered,
            echoed,
            writer,
            reader,
            requests,
        })
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Long-stream bytes echoed and checked so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// The task that ended before [`Traffic::finish`] asked it to (`writer`, `reader` or
    /// `requests`), if one did: it failed (`finish` says how).
    pub fn ended(&self) -> Option<&'static str> {
        fn done<T>(t: &Option<JoinHandle<T>>) -> bool {
            t.as_ref().is_some_and(|t| t.is_finished())
        }
        if done(&self.writer) {
            Some("writer")
        } else if done(&self.reader) {
            Some("reader")
        } else if done(&self.requests) {
            Some("requests")
        } else {
            None
        }
    }

    /// Stops writing and requesting, waits for the long stream's echo to end (it must have come
    /// back completely) and the last request; an error if any check failed.
    pub async fn finish(mut self) -> Result<TrafficEnd> {
        self.stop.store(true, Ordering::Relaxed);
        let mut end = TrafficEnd::default();
        if let Some(w) = self.writer.take() {
            end.written = w.await.context("long stream writer")??;
        }
        if let Some(r) = self.reader.take() {
            end.echoed = r.await.context("long stream reader")??;
        }
        if end.echoed != end.written {
            bail!(
                "long stream: {} bytes written but {} echoed before FIN",
                end.written,
                end.echoed
            );
        }
        if let Some(q) = self.requests.take() {
            (end.requests, end.max_gap) = q.await.context("request loop")??;
        }
        Ok(end)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `--insecure-skip-verify`: accepts any certificate, still checks the handshake signature made
/// with it (so the TLS exchange itself stays well-formed).
#[derive(Debug)]
struct SkipServerVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked() {
        let body = b"hello baton";
        let mut answer = 7u64.to_be_bytes().to_vec();
        answer.extend_from_slice(body);
        assert_eq!(check_answer(&answer, body, 7).unwrap(), 7);
        assert!(check_answer(&answer[..answer.len() - 1], body, 7).is_err());
        let last = answer.len() - 1;
        answer[last] ^= 1;
        assert!(check_answer(&answer, body, 7).is_err());
    }

    #[test]
    fn pattern_slices_fit_together() {
        let whole = pattern(3, 5, 40);
        assert_eq!([pattern(3, 5, 11), pattern(3, 16, 29)].concat(), whole);
    }
}
