//! The worker's control socket: a Unix stream socket (mode 0600) speaking JSON lines, one
//! `baton_protocol::worker::Request` per line, one `baton_protocol::envelope` answer per line.
//! Contract: `docs/MIGRATION-FLOW.md`. State-changing requests carry a migration token.
//!
//! With `[control_tls]` the same API is also served over TCP with mutual TLS ([`serve_tls`]), for
//! a controller on another host; both transports share [`serve_conn`] and the request handler.
//! Unknown TLS callers hold only a bounded, short-lived pending place until their handshake is
//! done; a slot of `max_clients` is for authenticated controllers that negotiated the ALPN.
use crate::admission::{Admission, LogLimit, Refused};
use crate::config::ControlTlsConfig;
use crate::migrate::Ctx;
use anyhow::{Context, Result};
pub use baton_protocol::worker::CONTROL_ALPN;
use baton_protocol::worker::{Conn, Info, Request};
use baton_protocol::{Cid, ErrorKind, Failure, encode_answer};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Binds the socket; a stale file (nobody answers) is replaced, a live one is refused.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => anyhow::bail!(
                "another worker answers on {}: give this one its own control_socket",
                path.display()
            ),
            // Nobody listens: its owner is gone, the file is stale.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale control socket");
                std::fs::remove_file(path).with_context(|| {
                    format!("cannot remove the stale socket {}", path.display())
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Anything else (not a socket, no permission): the file may not be ours to remove.
            Err(e) => anyhow::bail!(
                "{} exists and cannot be checked ({e}); remove it if no worker uses it",
                path.display()
            ),
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: tokio::net::UnixListener, ctx: Arc<Ctx>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (r, w) = stream.into_split();
            serve_conn(r, w, &ctx, None).await;
        });
    }
}

/// Longest request line accepted (a `migrate_out` is a few hundred bytes). A longer one is
/// answered with an error and the connection closed.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// One client connection, on either transport: reads request lines, answers each in order.
async fn serve_conn<R, W>(r: R, mut w: W, ctx: &Arc<Ctx>, idle: Option<Duration>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = tokio::io::BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut r).take(MAX_REQUEST_LINE as u64 + 1);
        let read = limited.read_until(b'\n', &mut line);
        let read = match idle {
            Some(idle) => match tokio::time::timeout(idle, read).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => read.await,
        };
        if !matches!(read, Ok(n) if n > 0) {
            break;
        }
        let too_long = line.len() > MAX_REQUEST_LINE && line.last() != Some(&b'\n');
        let answer = if too_long {
            Err(Failure::new(
                ErrorKind::Config,
                format!("request line longer than {MAX_REQUEST_LINE} bytes"),
            ))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handle(ctx, req).await,
                Err(e) => Err(Failure::new(ErrorKind::Config, format!("bad request: {e}"))),
            }
        };
        let out = encode_answer(&answer);
        if w.write_all(&out).await.is_err() || w.flush().await.is_err() || too_long {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// A TLS client has this long from its TCP connect to the end of its handshake: a real
/// controller needs one round trip and two signatures (milliseconds), an idle or trickling
/// connection is dropped well before it matters.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once, from all addresses: bounds the memory and tasks unknown
/// callers can hold (a few KiB each). When all are taken the oldest is cut off for the newest
/// ([`crate::admission`]), so idle connections cannot keep the controller out.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Handshakes in progress at once from one source (an IPv4 address, an IPv6 /64): one host
/// cannot take the places of all others (a controller needs one at a time).
pub const MAX_PENDING_PER_SOURCE: usize = 8;
/// An authenticated TLS client that sends nothing for this long is disconnected (it holds one
/// of the `max_clients` slots).
const TLS_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A client turned away for `max_clients` has this long to send its request before it is
/// answered "busy" anyway (reading it first lets the answer arrive instead of a reset).
const BUSY_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// A refused client's answer and close (close_notify) are not waited for longer: a client that
/// does not read cannot hold the task.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The TLS side of the control API: TLS 1.3 only, a client certificate signed by `cfg.ca` is
/// required, and its DNS names must include one of `cfg.clients`.
pub fn tls_acceptor(cfg: &ControlTlsConfig) -> Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(crate::load_roots(&cfg.ca).context("control_tls.ca")?);
    let (certs, key) = crate::load_tls(&cfg.cert, &cfg.key).context("control_tls.cert/key")?;
    let inner =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()?;
    let verifier = Arc::new(crate::tls::AllowedNames::new(
        inner,
        crate::tls::dns_names(&cfg.clients, "control_tls.clients")?,
        "control_tls.clients",
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("control_tls: the certificate and key do not match")?;
    server.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// TLS clients the control listener refused, by reason (`baton_worker_control_tls_refused_total`).
#[derive(Debug, Default)]
pub struct TlsRefusals {
    /// Closed at once: their source held [`MAX_PENDING_PER_SOURCE`] pending handshakes.
    pub source_limit: AtomicU64,
    /// Cut off to make room: [`MAX_PENDING_HANDSHAKES`] were pending.
    pub evicted: AtomicU64,
    /// No finished handshake within [`TLS_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: AtomicU64,
    /// The handshake failed: no certificate, another CA, a name not allowed, no common ALPN...
    pub handshake_failed: AtomicU64,
    /// Handshake done without ALPN [`CONTROL_ALPN`].
    pub alpn: AtomicU64,
    /// Authenticated, but `max_clients` were connected: answered `busy`.
    pub busy: AtomicU64,
}

impl TlsRefusals {
    /// (reason label, count) for the metrics page.
    pub fn counts(&self) -> [(&'static str, u64); 6] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("source_limit", n(&self.source_limit)),
            ("evicted", n(&self.evicted)),
            ("handshake_timeout", n(&self.handshake_timeout)),
            ("handshake_failed", n(&self.handshake_failed)),
            ("alpn", n(&self.alpn)),
            ("busy", n(&self.busy)),
        ]
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Accepts TLS clients on `listener`. Until its handshake is done a connection holds only a
/// pending place ([`MAX_PENDING_HANDSHAKES`], [`MAX_PENDING_PER_SOURCE`]) for at most
/// [`TLS_HANDSHAKE_TIMEOUT`]; one of the `max_clients` slots is taken only by a client whose
/// certificate was accepted and that negotiated [`CONTROL_ALPN`]. Refusals are logged with the
/// client's address, rate-limited ([`crate::admission::LogLimit`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    max_clients: usize,
    ctx: Arc<Ctx>,
    stats: Arc<TlsRefusals>,
) {
    let pending = Admission::new(MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_SOURCE);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_clients));
    let log = Arc::new(LogLimit::default());
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "control TLS: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut ticket = match pending.admit(addr.ip()) {
            Ok((ticket, evicted)) => {
                if let Some(old) = evicted {
                    count(&stats.evicted);
                    let why = format!(
                        "too many pending handshakes: cut off the oldest (from {old}) to make room"
                    );
                    refused(&log, addr, &why);
                }
                ticket
            }
            Err(Refused::SourceFull) => {
                count(&stats.source_limit);
                refused(
                    &log,
                    addr,
                    "refused, too many pending handshakes from this address",
                );
                continue; // `tcp` is closed here, nothing read
            }
        };
        let (acceptor, ctx, slots, log, stats) = (
            acceptor.clone(),
            ctx.clone(),
            slots.clone(),
            log.clone(),
            stats.clone(),
        );
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let tls = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        count(&stats.handshake_failed);
                        return refused(&log, addr, &format!("client refused: {e}"));
                    }
                    Err(_) => {
                        count(&stats.handshake_timeout);
                        return refused(&log, addr, "client refused, handshake timed out");
                    }
                },
                _ = ticket.cut_off() => return,
            };
            drop(ticket);
            let (_, conn) = tls.get_ref();
            if conn.alpn_protocol() != Some(CONTROL_ALPN) {
                let offered = conn.alpn_protocol().map(String::from_utf8_lossy);
                let why = match offered {
                    Some(p) => {
                        format!("client refused, it negotiated ALPN {p:?}, not baton-control/1")
                    }
                    None => {
                        "client refused, it negotiated no ALPN (baton-control/1 is required)".into()
                    }
                };
                count(&stats.alpn);
                refused(&log, addr, &why);
                let mut tls = tls;
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, tls.shutdown()).await;
                return;
            }
            let Ok(_slot) = slots.try_acquire_owned() else {
                count(&stats.busy);
                tracing::warn!(%addr, max_clients, "control TLS: refused, too many clients");
                return busy(tls, max_clients).await;
            };
            tracing::info!(%addr, "control TLS: client authenticated");
            let (r, w) = tokio::io::split(tls);
            serve_conn(r, w, &ctx, Some(TLS_IDLE_TIMEOUT)).await;
        });
    }
}

/// Logs a refused TLS client, within `log`'s rate.
fn refused(log: &LogLimit, addr: std::net::SocketAddr, why: &str) {
    match log.allow() {
        Some(0) => tracing::warn!(%addr, "control TLS: {why}"),
        Some(left_out) => {
            tracing::warn!(%addr, left_out, "control TLS: {why} (and {left_out} more refusals not logged)")
        }
        None => tracing::debug!(%addr, "control TLS: {why}"),
    }
}

/// Answers an authenticated client beyond `max_clients` with a `busy` error (after its first
/// request line, or [`BUSY_READ_TIMEOUT`]) and closes the connection.
async fn busy<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S, max_clients: usize) {
    let mut r = tokio::io::BufReader::new(&mut tls).take(MAX_REQUEST_LINE as u64);
    let mut line = Vec::new();
    let _ = tokio::time::timeout(BUSY_READ_TIMEOUT, r.read_until(b'\n', &mut line)).await;
    drop(r);
    let answer: Result<(), _> = Err(Failure::new(
        ErrorKind::Busy,
        format!(
            "the worker serves control_tls.max_clients = {max_clients} clients already; try again later"
        ),
    ));
    let out = encode_answer(&answer);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        tls.write_all(&out).await?;
        tls.shutdown().await
    })
    .await;
}

fn data<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("answers serialize")
}

/// Answers one request; the data of every answer is the protocol type the request names.
async fn handle(ctx: &Arc<Ctx>, req: Request) -> Result<Value, Failure> {
    match req {
        Request::Info {} => Ok(data(&Info {
            protocol: baton_protocol::PROTOCOL_VERSION,
            name: ctx.name.clone(),
            server_id: ctx.server_id,
            peer: ctx.peer_addr,
            cid: ctx.cid_layout,
        })),
        Request::Conns {} => {
            let conns = ctx
                .handle
                .connections()
                .await
                .map_err(|e| Failure::new(ErrorKind::Output, e))?;
            let cid = |b: &[u8]| Cid::new(b).map_err(|e| Failure::new(ErrorKind::Output, e));
            let list = conns
                .iter()
                .map(|c| {
                    Ok(Conn {
                        conn: cid(&c.key)?,
                        id: c.id as u64,
                        remote: c.remote,
                        vip: c.vip,
                        frozen: c.frozen,
                        held: c.held,
                        cids: c.cids.iter().map(|x| cid(x)).collect::<Result<_, _>>()?,
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            Ok(data(&list))
        }
        Request::MigrateOut(m) => crate::migrate::migrate_out(ctx, m)
            .await
            .map(|done| data(&done)),
        Request::Health {} => Ok(data(&crate::migrate::health(ctx).await)),
        Request::MigrationStatus { migration_id } => {
            Ok(data(&crate::migrate::status(ctx, migration_id)))
        }
        Request::Release { migration_id } => {
            crate::migrate::release(ctx, migration_id)?;
            Ok(data(&baton_protocol::worker::Released {
                released: migration_id,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ControlTlsConfig;

    /// Handshakes a client (certificate and key files, or none) with the acceptor in memory and
    /// sends one byte; Ok if the server accepted the client.
    async fn handshake(
        acceptor: &tokio_rustls::TlsAcceptor,
        ca: &Path,
        client: Option<(&Path, &Path)>,
    ) -> std::result::Result<(), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = crate::load_roots(ca).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut cfg = match client {
            Some((cert, key)) => {
                let (c, k) = crate::load_tls(cert, key).unwrap();
                b.with_client_auth_cert(c, k).unwrap()
            }
            None => b.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
                let mut byte = [0u8; 1];
                s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            })
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = rustls::pki_types::ServerName::try_from("w1").unwrap();
        let client = match connector.connect(name, b).await {
            Ok(mut c) => {
                let _ = c.write_all(b"x").await;
                let _ = c.flush().await;
                Ok(c)
            }
            Err(e) => Err(e.to_string()),
        };
        let verdict = server.await.unwrap();
        // The client's view stays open until the server decided.
        verdict.map_err(|e| format!("{e} (client: {:?})", client.err()))
    }

    #[tokio::test]
    async fn tls_clients_need_a_certificate_from_the_ca_with_an_allowed_name() {
        let dir = std::env::temp_dir().join(format!("baton-ctl-tls-{}", std::process::id()));
        let other = dir.join("other");
        crate::certs::generate(&dir, &["w1".into(), "w2".into()], "baton.test").unwrap();
        crate::certs::generate(&other, &["w1".into()], "baton.test").unwrap();
        let cfg = ControlTlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ca: dir.join("ca.pem"),
            cert: dir.join("w1.pem"),
            key: dir.join("w1.key"),
            clients: vec!["baton-controller".into()],
            max_clients: 4,
        };
        let acceptor = tls_acceptor(&cfg).unwrap();
        let ca = dir.join("ca.pem");
        let pair = |d: &Path, n: &str| (d.join(format!("{n}.pem")), d.join(format!("{n}.key")));
        let (c, k) = pair(&dir, "controller");
        handshake(&acceptor, &ca, Some((&c, &k))).await.unwrap();
        // Another worker's certificate: right CA, name not allowed.
        let (c, k) = pair(&dir, "w2");
        let e = handshake(&acceptor, &ca, Some((&c, &k))).await.unwrap_err();
        assert!(e.contains("not in control_tls.clients"), "{e}");
        // A controller certificate from another CA.
        let (c, k) = pair(&other, "controller");
        let e = handshake(&acceptor, &ca, Some((&c, &k))).await.unwrap_err();
        // (Same CA name, other key: BadSignature; an unrelated CA name: UnknownIssuer.)
        assert!(e.contains("invalid peer certificate"), "{e}");
        // No certificate at all.
        let e = handshake(&acceptor, &ca, None).await.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        // A name list with several entries: any one matches.
        let acceptor = tls_acceptor(&ControlTlsConfig {
            clients: vec!["ops".into(), "w2".into()],
            ..cfg
        })
        .unwrap();
        let (c, k) = pair(&dir, "w2");
        handshake(&acceptor, &ca, Some((&c, &k))).await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
