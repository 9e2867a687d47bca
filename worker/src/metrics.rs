//! The worker's Prometheus metrics (`metrics = "ip:port"` in `worker.toml`, `GET /metrics`):
//! what its sends came to and what its services hold against the buffer budget.
use crate::limits::BufferBudget;
use crate::udp::VipSockets;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What the metrics are read from.
#[derive(Clone)]
pub struct Metrics {
    pub sockets: Arc<VipSockets>,
    pub budget: Arc<BufferBudget>,
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
        out
    }
}

/// Binds `addr` for [`serve`]; the error says which key to change.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("metrics: cannot listen on {addr}: {e} (change `metrics` in the config)")
    })
}

/// Serves `GET /metrics` (HTTP/1.1, hyper) on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};
    /// A scraper that sends nothing for this long is disconnected.
    const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
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
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "metrics: connection ended");
            }
        });
    }
}
