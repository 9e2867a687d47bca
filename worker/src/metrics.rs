//! The worker's Prometheus metrics (`metrics = "ip:port"` in `worker.toml`, `GET /metrics`):
//! what its sends came to and what its services hold against the buffer budget.
//!
//! The endpoint holds against slow or many clients: one request per connection, answered or cut
//! off within [`REQUEST_DEADLINE`] of the connect, at most [`MAX_CONNECTIONS`] at once and
//! [`MAX_PER_SOURCE`] per IP address ([`crate::admission`]: over its address's share a connection
//! is closed at once; when all places are taken the oldest is cut off). Each refusal is counted in
//! `baton_worker_metrics_refused_total{reason}`.
use crate::limits::BufferBudget;
use crate::udp::VipSockets;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Metrics connections at once, all addresses: bounds the tasks and buffers unknown clients hold
/// (a scraper needs one per scrape).
pub const MAX_CONNECTIONS: usize = 64;
/// Metrics connections at once from one IP address: one host cannot take every place.
pub const MAX_PER_SOURCE: usize = 8;
/// A connection is closed this long after its connect, answered or not: a whole request (a
/// scrape takes milliseconds), not a timeout that restarts with every byte a slow client sends.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// hyper's limit for the request head; a scraper's is a few hundred bytes (8 KiB is hyper's
/// smallest allowed buffer).
const MAX_HEAD: usize = 8 * 1024;

/// What the metrics are read from.
#[derive(Clone)]
pub struct Metrics {
    pub sockets: Arc<VipSockets>,
    pub budget: Arc<BufferBudget>,
    /// What the endpoint refused.
    pub endpoint: Arc<EndpointStats>,
    /// What the control API over TLS refused (with `[control_tls]`).
    pub control_tls: Option<Arc<crate::control::TlsRefusals>>,
}

/// Connections the metrics endpoint refused or cut off, by reason.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Closed at once: their address held [`MAX_PER_SOURCE`] connections.
    pub source_limit: AtomicU64,
    /// Cut off to make room: [`MAX_CONNECTIONS`] were open.
    pub evicted: AtomicU64,
    /// Cut off at [`REQUEST_DEADLINE`] (or hyper's header read timeout, half of it).
    pub deadline: AtomicU64,
}

fn errno_name(errno: i32) -> String {
    match errno {
        0 => "other".into(),
        libc::EMSGSIZE => "EMSGSIZE".into(),
        libc::ENOBUFS => "ENOBUFS".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::EIO => "EIO".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL".into(),
        n => format!("errno{n}"),
    }
}

impl Metrics {
    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let stats = self.sockets.stats();
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        };
        counter(
            "baton_worker_sends_total",
            "UDP sends handed to the kernel (one sendmsg each; several datagrams with GSO).",
            stats.sends.load(Ordering::Relaxed),
        );
        counter(
            "baton_worker_datagrams_sent_total",
            "QUIC datagrams sent.",
            stats.datagrams.load(Ordering::Relaxed),
        );
        counter(
            "baton_worker_sent_bytes_total",
            "UDP payload bytes sent.",
            stats.bytes.load(Ordering::Relaxed),
        );
        counter(
            "baton_worker_budget_exhausted_total",
            "Times a service had data to read and the buffer budget (limits.memory_budget) had no room.",
            self.budget.exhausted_count(),
        );
        out.push_str(
            "# HELP baton_worker_send_errors_total Sends the kernel refused, by error (their datagrams are lost).\n\
             # TYPE baton_worker_send_errors_total counter\n",
        );
        let errors = stats.errors();
        if errors.is_empty() {
            out.push_str("baton_worker_send_errors_total{error=\"EMSGSIZE\"} 0\n");
        }
        for (errno, n) in errors {
            let _ = writeln!(
                out,
                "baton_worker_send_errors_total{{error=\"{}\"}} {n}",
                errno_name(errno)
            );
        }
        let mut gauge = |name: &str, help: &str, v: usize| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        };
        gauge(
            "baton_worker_buffered_bytes",
            "Bytes the services hold (read from clients, not yet written back), all connections.",
            self.budget.used(),
        );
        gauge(
            "baton_worker_buffered_bytes_peak",
            "Largest value of baton_worker_buffered_bytes since the start.",
            self.budget.peak(),
        );
        gauge(
            "baton_worker_buffer_budget_bytes",
            "limits.memory_budget: what the services may hold in all.",
            self.budget.limit(),
        );
        if let Some(d) = self.sockets.decap() {
            out.push_str(
                "# HELP baton_worker_decap_datagrams_total Encapsulated datagrams received and delivered, by encapsulation.\n\
                 # TYPE baton_worker_decap_datagrams_total counter\n",
            );
            for (kind, n) in [("gue", &d.stats.gue), ("ipip", &d.stats.ipip)] {
                let _ = writeln!(
                    out,
                    "baton_worker_decap_datagrams_total{{encap=\"{kind}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
            out.push_str(
                "# HELP baton_worker_decap_dropped_total Encapsulated datagrams dropped, by reason (truncated, bad_header, bad_gue, fragment, not_udp, not_vip: not for this worker's VIPs and port, checksum).\n\
                 # TYPE baton_worker_decap_dropped_total counter\n",
            );
            for r in crate::decap::DropReason::ALL {
                let _ = writeln!(
                    out,
                    "baton_worker_decap_dropped_total{{reason=\"{}\"}} {}",
                    r.as_str(),
                    d.stats.dropped(r)
                );
            }
        }
        out.push_str(
            "# HELP baton_worker_metrics_refused_total Metrics connections refused or cut off: source_limit (its address had too many open), evicted (all places taken, the oldest made room), deadline (no answer within the request deadline).\n\
             # TYPE baton_worker_metrics_refused_total counter\n",
        );
        let e = &self.endpoint;
        for (reason, n) in [
            ("source_limit", &e.source_limit),
            ("evicted", &e.evicted),
            ("deadline", &e.deadline),
        ] {
            let _ = writeln!(
                out,
                "baton_worker_metrics_refused_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        if let Some(tls) = &self.control_tls {
            out.push_str(
                "# HELP baton_worker_control_tls_refused_total Control TLS connections refused: source_limit (8 handshakes pending from its address), evicted (64 pending: the oldest made room), handshake_timeout, handshake_failed (certificate, name or ALPN), alpn (none negotiated), busy (max_clients connected).\n\
                 # TYPE baton_worker_control_tls_refused_total counter\n",
            );
            for (reason, n) in tls.counts() {
                let _ = writeln!(
                    out,
                    "baton_worker_control_tls_refused_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        out
    }
}

/// Binds `addr` for [`serve`]; the error says which key to change.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("metrics: cannot listen on {addr}: {e} (change `metrics` in the config)")
    })
}

/// Serves `GET /metrics` (HTTP/1.1, hyper) on `listener` until the task is dropped; see the
/// module header for the limits.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    use crate::admission::{Admission, LogLimit};
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};
    let admission = Admission::new(MAX_CONNECTIONS, MAX_PER_SOURCE);
    let log = LogLimit::default();
    let refused = |peer: SocketAddr, why: &str| match log.allow() {
        Some(left_out) => tracing::warn!(%peer, left_out, "metrics: {why}"),
        None => tracing::debug!(%peer, "metrics: {why}"),
    };
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut ticket = match admission.admit(peer.ip()) {
            Ok((ticket, evicted)) => {
                if let Some(old) = evicted {
                    metrics.endpoint.evicted.fetch_add(1, Ordering::Relaxed);
                    refused(
                        peer,
                        &format!(
                            "{MAX_CONNECTIONS} connections open: cut off the oldest (from {old}) to make room"
                        ),
                    );
                }
                ticket
            }
            Err(_) => {
                metrics
                    .endpoint
                    .source_limit
                    .fetch_add(1, Ordering::Relaxed);
                refused(
                    peer,
                    &format!("refused, {MAX_PER_SOURCE} connections from this address are open"),
                );
                continue; // `tcp` is closed here, nothing read
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let stats = metrics.endpoint.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, body) = match (req.method(), req.uri().path()) {
                            (&Method::GET, "/metrics") => (StatusCode::OK, metrics.render()),
                            (&Method::GET, _) => {
                                (StatusCode::NOT_FOUND, "only /metrics is served\n".into())
                            }
                            _ => (StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into()),
                        };
                        Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                // A client whose request head is not in by then is cut off (`deadline`).
                .header_read_timeout(REQUEST_DEADLINE / 2)
                .max_buf_size(MAX_HEAD)
                // One request per connection: the deadline is the request's.
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            tokio::select! {
                r = tokio::time::timeout(REQUEST_DEADLINE, conn) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) if e.is_timeout() => {
                        stats.deadline.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "metrics: cut off, no request head in time");
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: connection ended"),
                    Err(_) => {
                        stats.deadline.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "metrics: cut off at the request deadline");
                    }
                },
                _ = ticket.cut_off() => {}
            }
        });
    }
}
