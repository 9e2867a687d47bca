//! `baton-upstream --listen ADDR [--listen ADDR ...] [--tls-cert FILE --tls-key FILE
//! [--tls-client-ca FILE]]`: the upstream HTTP server (HTTP/1.1 keep-alive and h2c on each
//! listener; with the TLS files, HTTPS instead: HTTP/1.1 and h2 by ALPN) behind Baton's HTTP/3
//! proxy in the netns tests, the demo and the bench. Prints `listening ADDR` on stdout for each listener once bound (the bound
//! address, so port 0 works), logs to stderr (RUST_LOG, default info), runs until SIGINT/SIGTERM.
use anyhow::{Context, Result};
use baton_test_upstream::server::{Stats, serve, serve_tls};
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "baton-upstream",
    about = "Upstream HTTP/1.1 + h2c (or HTTPS: HTTP/1.1 + h2) test server behind Baton's HTTP/3 proxy",
    long_about = "Upstream HTTP/1.1 + h2c (prior knowledge) test server behind Baton's HTTP/3 \
proxy. Endpoints: GET /bytes/{n}?seed={s} (with range/if-range), /echo (any method: streams the \
request body back), GET /slow/{ms}, GET /drip/{n}?seed={s}&chunk={c}&interval_ms={t}, \
GET /headers, GET /status/{code}, GET /stats. With --tls-cert and --tls-key every listener \
serves HTTPS instead of cleartext (HTTP/1.1 or HTTP/2, chosen by ALPN)."
)]
struct Args {
    /// TCP address to listen on (repeatable), e.g. 127.0.0.1:8080 or [::1]:0.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// PEM certificate chain: serve HTTPS (HTTP/1.1 and h2 by ALPN) on every listener.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): HTTPS clients must present a certificate from one of them.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();

    let acceptor = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
            baton_test_upstream::tls::server_config(cert, key, args.tls_client_ca.as_deref())?,
        )),
        _ => None,
    };

    let stats = Arc::new(Stats::default());
    let mut listeners = Vec::new();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        listeners.push(listener);
    }
    // Announce only once every listener is bound, so a caller that waits for the lines can connect
    // to any of them.
    let mut stdout = std::io::stdout().lock();
    for listener in &listeners {
        let local = listener.local_addr().context("local_addr")?;
        writeln!(stdout, "listening {local}").context("stdout")?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        tracing::info!("listening on {local} ({scheme})");
    }
    stdout.flush().context("stdout")?;
    drop(stdout);

    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        match &acceptor {
            Some(acceptor) => tasks.spawn(serve_tls(listener, stats.clone(), acceptor.clone())),
            None => tasks.spawn(serve(listener, stats.clone())),
        };
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting"),
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        Some(res) = tasks.join_next() => {
            res.context("listener task")?.context("listener")?;
        }
    }
    Ok(())
}
