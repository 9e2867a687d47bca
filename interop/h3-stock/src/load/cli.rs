//! The command line of `h3-load`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// HTTP/3 load client: N QUIC connections, C request loops on each, every body checked byte by
/// byte; prints one JSON summary line on stdout.
#[derive(Debug, Clone, Parser)]
#[command(name = "h3-load", version)]
pub struct Args {
    /// Server address (UDP).
    #[arg(long, value_name = "IP:PORT")]
    pub connect: SocketAddr,

    /// TLS server name (SNI, and the name the certificate must carry).
    #[arg(long, value_name = "NAME")]
    pub server_name: String,

    /// PEM file with the CA certificate(s): the only trusted roots.
    #[arg(long, value_name = "CA.pem")]
    pub ca: PathBuf,

    /// :authority of the requests [default: the server name, with ":PORT" unless the port is 443].
    #[arg(long, value_name = "HOST")]
    pub authority: Option<String>,

    /// QUIC connections held open at once.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub connections: usize,

    /// Concurrent request loops on each connection.
    #[arg(long, default_value_t = 1, value_name = "C")]
    pub concurrency: usize,

    /// Stop starting requests this many ms after the connections are up. At least one of
    /// --duration-ms and --requests-per-loop is needed; with both, the first one reached stops.
    #[arg(long, value_name = "D")]
    pub duration_ms: Option<u64>,

    /// Each loop issues exactly K requests, then stops.
    #[arg(long, value_name = "K")]
    pub requests_per_loop: Option<u64>,

    /// Size of the large GET (/bytes/{large}).
    #[arg(long, default_value_t = 500_000)]
    pub large_bytes: u64,

    /// Size of the small GET (/bytes/{small}).
    #[arg(long, default_value_t = 1000)]
    pub small_bytes: u64,

    /// Size of the POST /echo body.
    #[arg(long, default_value_t = 65_536)]
    pub post_bytes: u64,

    /// Every request is the small GET (no large GET, no POST): a request-rate workload.
    #[arg(long)]
    pub small_only: bool,

    /// QUIC keep-alive interval in ms (0: none).
    #[arg(long, default_value_t = 1000)]
    pub keep_alive_ms: u64,

    /// QUIC idle timeout in ms.
    #[arg(long, default_value_t = 30_000)]
    pub idle_timeout_ms: u64,

    /// A request not complete after this many ms fails.
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// ALPN protocol offered.
    #[arg(long, default_value = "h3")]
    pub alpn: String,

    /// One JSON progress line per second on stderr.
    #[arg(long)]
    pub progress: bool,

    /// Append a line per successful request to this file: `<connection index> <unix time in
    /// microseconds>` (wall clock; baton-load's --gap-log format). Flushed every 100 ms and at
    /// the end.
    #[arg(long, value_name = "FILE")]
    pub gap_log: Option<PathBuf>,
}

impl Args {
    pub fn authority(&self) -> String {
        match &self.authority {
            Some(a) => a.clone(),
            None if self.connect.port() == 443 => self.server_name.clone(),
            None => format!("{}:{}", self.server_name, self.connect.port()),
        }
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.duration_ms.is_none() && self.requests_per_loop.is_none() {
            return Err("give --duration-ms or --requests-per-loop (or both)".into());
        }
        if self.connections == 0 || self.concurrency == 0 {
            return Err("--connections and --concurrency must be at least 1".into());
        }
        for (name, v) in [
            ("--large-bytes", self.large_bytes),
            ("--small-bytes", self.small_bytes),
            ("--post-bytes", self.post_bytes),
        ] {
            if v >= 1 << 32 {
                return Err(format!("{name} must be below 2^32"));
            }
        }
        if self.idle_timeout_ms == 0 {
            return Err("--idle-timeout-ms must be positive".into());
        }
        Ok(())
    }
}
