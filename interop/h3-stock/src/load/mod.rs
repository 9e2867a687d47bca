//! `h3-load`: the HTTP/3 load client of the tests (see README.md and the shared spec).

pub mod cli;
mod conn;
mod gaplog;
mod request;
mod stats;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quinn::crypto::rustls::QuicClientConfig;

use cli::Args;
use conn::{Shared, Sizes};
use stats::Stats;

/// Exit code when the run could not start.
pub const CANNOT_START: i32 = 1;

fn quinn_client_config(args: &Args) -> Result<quinn::ClientConfig> {
    let tls = crate::tls::client_config(&args.ca, args.alpn.as_bytes())?;
    let mut config = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).context("TLS configuration for QUIC")?,
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(
        (args.keep_alive_ms > 0).then(|| Duration::from_millis(args.keep_alive_ms)),
    );
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(args.idle_timeout_ms))
            .context("--idle-timeout-ms")?,
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Runs the load as `args` says; prints the summary line. Returns the exit code.
pub async fn run(args: Args) -> i32 {
    if let Err(e) = args.validate() {
        eprintln!("h3-load: {e}");
        return CANNOT_START;
    }
    let config = match quinn_client_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("h3-load: {e:#}");
            return CANNOT_START;
        }
    };
    let bind: SocketAddr = if args.connect.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };

    let mut stats = Stats::new(args.connections);
    if let Some(path) = &args.gap_log {
        match gaplog::GapLog::create(path) {
            Ok(log) => stats = stats.with_gap_log(log),
            Err(e) => {
                eprintln!("h3-load: creating {}: {e}", path.display());
                return CANNOT_START;
            }
        }
    }
    let stats = Arc::new(stats);

    // One UDP socket per connection, as separate clients would have.
    let mut dials = Vec::new();
    for idx in 0..args.connections {
        let endpoint = match quinn::Endpoint::client(bind) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("h3-load: binding a UDP socket: {e}");
                return CANNOT_START;
            }
        };
        let config = config.clone();
        let (server, name) = (args.connect, args.server_name.clone());
        dials.push(tokio::spawn(async move {
            let r = conn::dial(&endpoint, &config, server, &name).await;
            (idx, endpoint, r)
        }));
    }
    let mut first = Vec::new();
    for d in dials {
        let (idx, endpoint, r) = d.await.expect("dial task panicked");
        match r {
            Ok(est) => first.push((idx, endpoint, est)),
            Err(e) => {
                eprintln!("h3-load: connection {idx} to {}: {e:#}", args.connect);
                return CANNOT_START;
            }
        }
    }
    stats.handshakes.store(
        args.connections as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    tracing::info!(connections = args.connections, "connected");

    let start = Instant::now();
    let shared = Arc::new(Shared::new(
        stats.clone(),
        config,
        args.connect,
        args.server_name.clone(),
        args.authority(),
        args.concurrency,
        args.requests_per_loop,
        Sizes {
            small: args.small_bytes,
            large: args.large_bytes,
            post: args.post_bytes,
            small_only: args.small_only,
        },
        Duration::from_millis(args.request_timeout_ms),
        args.duration_ms.map(|d| start + Duration::from_millis(d)),
    ));

    // SIGTERM or SIGINT ends the run like the deadline: in-flight requests finish, then the
    // summary (a test stops the load when its migrations are done).
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping: signal");
            shared
                .stop
                .store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let progress = args.progress.then(|| {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                let line = serde_json::to_string(&stats.progress(start.elapsed()))
                    .expect("progress serializes");
                eprintln!("{line}");
            }
        })
    });

    let flusher = stats.gap_log().is_some().then(|| {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gaplog::FLUSH_EVERY);
            loop {
                tick.tick().await;
                if let Some(log) = stats.gap_log() {
                    let _ = log.flush();
                }
            }
        })
    });

    let mut endpoints = Vec::new();
    let mut slots = Vec::new();
    for (idx, endpoint, est) in first {
        endpoints.push(endpoint.clone());
        slots.push(tokio::spawn(conn::run_slot(
            shared.clone(),
            idx,
            endpoint,
            est,
        )));
    }
    for s in slots {
        s.await.expect("connection task panicked");
    }
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
    }
    if let Some(f) = flusher {
        f.abort();
    }
    if let (Some(log), Some(path)) = (stats.gap_log(), &args.gap_log) {
        if let Err(e) = log.flush() {
            eprintln!("h3-load: writing {}: {e}", path.display());
        }
    }
    // Let the CONNECTION_CLOSE frames go out.
    for e in endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
    }

    let summary = stats.summary(elapsed);
    tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, "done");
    println!(
        "{}",
        serde_json::to_string(&summary).expect("summary serializes")
    );
    0
}
