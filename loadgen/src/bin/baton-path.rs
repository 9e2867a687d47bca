//! `baton-path`: the emulated network path of `baton-load` (delay, jitter, loss; `impair.rs`) as a
//! UDP relay, for clients that are not ours (the h3 and aioquic HTTP/3 clients of the tests).
//!
//! The client sends to `--listen`; the relay sends each datagram on to `--to` from a socket of its
//! own per client address (as a NAT would), and the answers back to that client. Every datagram
//! of each direction gets its fate from that mapping's seeded shaper: dropped, or delivered after
//! its delay. Datagrams of one direction leave in the order they came (jitter delays, never
//! reorders). The lab's kernel has no netem (`shared/docs/ENVIRONMENT.md`), hence this.
use anyhow::{Context, Result};
use baton_load::impair::{Direction, DirectionConfig, Fate, PathConfig, Shaper};
use baton_load::{parse_delay, parse_percent};
use clap::Parser;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    about = "UDP relay that emulates a network path (delay, jitter, loss) for any client",
    long_about = "UDP relay that emulates a network path (delay, jitter, loss) for any client.\n\n\
        Point the client at --listen; each client address gets a socket of its own towards --to \
        (as behind a NAT). Prints `listening ADDR` once bound; on SIGTERM/SIGINT prints one JSON \
        line with what it relayed and dropped.\n\n\
        Example: baton-path --listen 127.0.0.1:4433 --to 10.200.100.1:4433 --rtt 40ms --loss 1%"
)]
struct Args {
    /// Where clients send.
    #[arg(long)]
    listen: SocketAddr,
    /// Where the relay sends on (the service, e.g. the VIP).
    #[arg(long)]
    to: SocketAddr,
    /// Round-trip time added, half each way (e.g. 40ms).
    #[arg(long, value_parser = parse_delay, default_value = "0")]
    rtt: Duration,
    /// Random extra delay per datagram, uniform from 0 to this.
    #[arg(long, value_parser = parse_delay, default_value = "0")]
    jitter: Duration,
    /// Share of datagrams lost at random, each direction (e.g. 1%).
    #[arg(long, value_parser = parse_percent, default_value = "0")]
    loss: f64,
    /// Seed of the random decisions (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Default)]
struct Counts {
    up: AtomicU64,
    down: AtomicU64,
    up_dropped: AtomicU64,
    down_dropped: AtomicU64,
}

/// Sends what it is given at each datagram's due time, in the order given.
fn sender(socket: Arc<UdpSocket>) -> mpsc::UnboundedSender<(Instant, SocketAddr, Vec<u8>)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, SocketAddr, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, to, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if let Err(e) = socket.send_to(&data, to).await {
                warn!(%to, "send: {e}");
            }
        }
    });
    tx
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let half = DirectionConfig {
        delay: args.rtt / 2,
        loss: args.loss,
    };
    let path = PathConfig {
        up: half,
        down: half,
        jitter: args.jitter,
        seed,
        ..PathConfig::default()
    };
    let front = Arc::new(
        UdpSocket::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?,
    );
    println!("listening {}", front.local_addr()?);
    info!(listen = %args.listen, to = %args.to, rtt = ?args.rtt, jitter = ?args.jitter, loss = args.loss, seed, "relaying");
    let counts = Arc::new(Counts::default());
    let to_clients = sender(front.clone());
    // Per client address: the shaper of its upstream direction and the sender of its socket.
    let mut mappings: HashMap<SocketAddr, (Shaper, mpsc::UnboundedSender<_>)> = HashMap::new();
    let bind_any: SocketAddr = if args.to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let mut buf = vec![0u8; 65_535];
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (n, client) = tokio::select! {
            r = front.recv_from(&mut buf) => r?,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        if !mappings.contains_key(&client) {
            let stream = mappings.len() as u64;
            let socket = Arc::new(UdpSocket::bind(bind_any).await?);
            info!(%client, via = %socket.local_addr()?, "new client");
            let mut down = Shaper::new(&path, Direction::Down, stream);
            let back = to_clients.clone();
            let reader = socket.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                    match down.fate() {
                        Fate::Dropped => {
                            counts.down_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Fate::Delivered { delay, .. } => {
                            counts.down.fetch_add(1, Ordering::Relaxed);
                            let _ = back.send((Instant::now() + delay, client, buf[..n].to_vec()));
                        }
                    }
                }
            });
            let up = Shaper::new(&path, Direction::Up, stream);
            mappings.insert(client, (up, sender(socket)));
        }
        let (up, tx) = mappings.get_mut(&client).expect("inserted");
        match up.fate() {
            Fate::Dropped => {
                counts.up_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Delivered { delay, .. } => {
                counts.up.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send((Instant::now() + delay, args.to, buf[..n].to_vec()));
            }
        }
    }
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "clients": mappings.len(),
            "up": c(&counts.up),
            "down": c(&counts.down),
            "up_dropped": c(&counts.up_dropped),
            "down_dropped": c(&counts.down_dropped),
            "seed": seed,
        })
    );
    Ok(())
}
