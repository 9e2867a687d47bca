//! `baton-worker --config worker.toml`: serves the configured service on the VIP.
use anyhow::Context;
use baton_worker::config::WorkerConfig;
use baton_worker::core::{CoreConfig, WorkerCore};
use baton_worker::io::{Inbound, spawn};
use baton_worker::udp::UdpIo;
use clap::Parser;
use lb_common::cid::CidLayout;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "baton-worker", about = "Baton QUIC worker")]
struct Args {
    /// TOML configuration file
    #[arg(long, short)]
    config: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = WorkerConfig::parse(&text)?;
    let service: Arc<dyn baton_worker::service::Service> = match config.service.as_str() {
        "demo" => Arc::new(baton_worker::demo::DemoService),
        other => anyhow::bail!("unknown service {other:?} (known: demo)"),
    };
    let layout = CidLayout::new(config.cid_len, config.server_id_len)
        .map_err(|e| anyhow::anyhow!("CID layout: {e}"))?;
    let (certs, key) = baton_worker::load_tls(&config.cert, &config.key)?;
    let addr = SocketAddr::new(config.vip, config.port);
    let socket = Arc::new(UdpIo::bind(addr).with_context(|| format!("binding {addr}"))?);
    let core = WorkerCore::new(
        CoreConfig {
            server_id: config.server_id,
            layout,
            certs,
            key,
            vip: config.vip,
            allow_mtud: !socket.may_fragment(),
        },
        service,
    )?;
    tracing::info!(%addr, server_id = config.server_id, "worker listening");
    let (_handle, task) = spawn(core, socket, Inbound::Socket);
    tokio::select! {
        _ = task => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    Ok(())
}
