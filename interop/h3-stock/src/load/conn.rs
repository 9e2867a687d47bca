//! One connection slot: dial, run the request loops on the h3 connection, re-dial when the
//! connection fails, close gracefully at the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use h3::error::{Code, ConnectionError};
use tokio::sync::{oneshot, watch};

use super::request::{self, Failure, MIX, Sender, Spec};
use super::stats::Stats;
use crate::pattern::SEED_LIMIT;

type Driver = h3::client::Connection<h3_quinn::Connection, Bytes>;

/// After the loops stopped early, how long the driver may take to report why.
const DRIVER_REPORT: Duration = Duration::from_secs(2);
/// How long a graceful close may take.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Pause between failed re-dials.
const REDIAL_PAUSE: Duration = Duration::from_millis(200);
/// Without a deadline (only --requests-per-loop), failed re-dials allowed in a row.
const REDIAL_TRIES: u32 = 20;

/// What every slot shares.
pub struct Shared {
    pub stats: Arc<Stats>,
    pub client_config: quinn::ClientConfig,
    pub server: SocketAddr,
    pub server_name: String,
    pub authority: String,
    pub concurrency: usize,
    pub requests_per_loop: Option<u64>,
    pub sizes: Sizes,
    pub request_timeout: Duration,
    /// Set once the initial connections are up.
    pub deadline: Option<Instant>,
    /// Set on SIGTERM/SIGINT: stop as at the deadline (finish what is in flight, close).
    pub stop: std::sync::atomic::AtomicBool,
    seeds: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub small: u64,
    pub large: u64,
    pub post: u64,
    /// Only the small GET, instead of the round-robin mix.
    pub small_only: bool,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stats: Arc<Stats>,
        client_config: quinn::ClientConfig,
        server: SocketAddr,
        server_name: String,
        authority: String,
        concurrency: usize,
        requests_per_loop: Option<u64>,
        sizes: Sizes,
        request_timeout: Duration,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            stats,
            client_config,
            server,
            server_name,
            authority,
            concurrency,
            requests_per_loop,
            sizes,
            request_timeout,
            deadline,
            stop: std::sync::atomic::AtomicBool::new(false),
            seeds: AtomicU64::new(0),
        }
    }

    fn past_deadline(&self) -> bool {
        self.stop.load(Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn next_seed(&self) -> u64 {
        self.seeds.fetch_add(1, Relaxed) % SEED_LIMIT
    }
}

/// An HTTP/3 connection, handshake done.
pub struct Established {
    quic: quinn::Connection,
    driver: Driver,
    sender: Sender,
}

/// Dials the server on `endpoint` and sets up HTTP/3 on the connection.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    server: SocketAddr,
    server_name: &str,
) -> Result<Established> {
    let quic = endpoint
        .connect_with(config.clone(), server, server_name)
        .context("starting the handshake")?
        .await
        .context("QUIC handshake")?;
    let (driver, sender) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
        .await
        .context("HTTP/3 setup")?;
    Ok(Established {
        quic,
        driver,
        sender,
    })
}

/// Where one request loop stands; kept across re-dials.
#[derive(Debug)]
struct LoopState {
    /// Index of the loop on its connection (offsets its place in the mix).
    id: usize,
    /// Requests issued so far.
    issued: u64,
    /// Reached its stop condition.
    done: bool,
}

/// Runs slot `idx` from its first connection to the end of the run.
pub async fn run_slot(
    shared: Arc<Shared>,
    idx: usize,
    endpoint: quinn::Endpoint,
    first: Established,
) {
    let stats = &shared.stats;
    let mut loops: Vec<LoopState> = (0..shared.concurrency)
        .map(|id| LoopState {
            id,
            issued: 0,
            done: false,
        })
        .collect();
    let mut established = first;
    loop {
        let Established {
            quic,
            driver,
            sender,
        } = established;
        let (dead_tx, mut dead_rx) = watch::channel(false);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let driver_task = tokio::spawn(drive(driver, shutdown_rx, dead_tx));

        let tasks: Vec<_> = loops
            .into_iter()
            .map(|state| {
                let shared = shared.clone();
                let sender = sender.clone();
                let quic = quic.clone();
                let dead = dead_rx.clone();
                tokio::spawn(async move {
                    if state.done {
                        state
                    } else {
                        request_loop(&shared, idx, state, sender, &quic, dead).await
                    }
                })
            })
            .collect();
        loops = Vec::with_capacity(tasks.len());
        for task in tasks {
            loops.push(task.await.expect("request loop panicked"));
        }

        let work_left = loops.iter().any(|l| !l.done) && !shared.past_deadline();
        if work_left {
            // The loops stopped early: the connection is going away. Let the driver say why.
            let _ = tokio::time::timeout(DRIVER_REPORT, dead_rx.wait_for(|d| *d)).await;
        }
        let ended_by_itself = *dead_rx.borrow();
        if !ended_by_itself {
            // Graceful close: GOAWAY, then dropping the last sender closes with H3_NO_ERROR.
            let (ack_tx, ack_rx) = oneshot::channel();
            if shutdown_tx.send(ack_tx).is_ok() {
                let _ = tokio::time::timeout(CLOSE_GRACE, ack_rx).await;
            }
        }
        drop(sender);
        let ended = tokio::time::timeout(CLOSE_GRACE, driver_task).await;
        if ended_by_itself {
            match ended {
                Ok(Ok(e)) if e.is_h3_no_error() => {
                    tracing::info!(conn = idx, "server closed the connection: {e}")
                }
                Ok(Ok(e)) => stats.connection_error(format!("connection {idx}: {e}")),
                Ok(Err(e)) => stats.connection_error(format!("connection {idx}: driver: {e}")),
                Err(_) => stats.connection_error(format!("connection {idx}: driver hung")),
            }
        }
        stats
            .lost_packets
            .fetch_add(quic.stats().path.lost_packets, Relaxed);
        quic.close(Code::H3_NO_ERROR.value().try_into().unwrap(), b"");

        let work_left = loops.iter().any(|l| !l.done) && !shared.past_deadline();
        if !work_left {
            break;
        }
        match redial(&shared, idx, &endpoint).await {
            Some(next) => {
                stats.reconnects.fetch_add(1, Relaxed);
                stats.handshakes.fetch_add(1, Relaxed);
                tracing::info!(conn = idx, "re-dialed");
                established = next;
            }
            None => {
                stats.connection_error(format!(
                    "connection {idx}: gave up re-dialing; {} loop(s) stopped early",
                    loops.iter().filter(|l| !l.done).count()
                ));
                break;
            }
        }
    }
}

/// Polls the h3 connection until it ends. On a message from the slot, sends GOAWAY (and acks);
/// the connection then ends once the slot drops its last sender. Marks `dead` when it ends.
async fn drive(
    mut driver: Driver,
    mut shutdown: oneshot::Receiver<oneshot::Sender<()>>,
    dead: watch::Sender<bool>,
) -> ConnectionError {
    let mut asked = false;
    let error = loop {
        let ack = tokio::select! {
            e = driver.wait_idle() => break e,
            ack = &mut shutdown, if !asked => ack,
        };
        asked = true;
        if let Ok(ack) = ack {
            if let Err(e) = driver.shutdown(0).await {
                tracing::debug!("GOAWAY not sent: {e}");
            }
            let _ = ack.send(());
        }
    };
    dead.send_replace(true);
    error
}

async fn redial(shared: &Shared, idx: usize, endpoint: &quinn::Endpoint) -> Option<Established> {
    let mut failures = 0;
    loop {
        if shared.past_deadline() {
            return None;
        }
        let dialing = dial(
            endpoint,
            &shared.client_config,
            shared.server,
            &shared.server_name,
        );
        let result = match shared.deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), dialing).await {
                Ok(r) => r,
                Err(_) => return None,
            },
            None => dialing.await,
        };
        match result {
            Ok(e) => return Some(e),
            Err(e) => {
                shared
                    .stats
                    .connection_error(format!("connection {idx}: re-dial: {e:#}"));
                failures += 1;
                if shared.deadline.is_none() && failures >= REDIAL_TRIES {
                    return None;
                }
                tokio::time::sleep(REDIAL_PAUSE).await;
            }
        }
    }
}

/// Issues requests one after another on `sender` until the stop condition, or until the
/// connection goes away (then returns with `done` unset, to go on after a re-dial).
async fn request_loop(
    shared: &Shared,
    conn: usize,
    mut state: LoopState,
    mut sender: Sender,
    quic: &quinn::Connection,
    mut dead: watch::Receiver<bool>,
) -> LoopState {
    let stats = &shared.stats;
    loop {
        if shared.past_deadline() || shared.requests_per_loop.is_some_and(|k| state.issued >= k) {
            state.done = true;
            return state;
        }
        if *dead.borrow() || quic.close_reason().is_some() {
            return state;
        }
        let kind = if shared.sizes.small_only {
            request::Kind::SmallGet
        } else {
            MIX[(state.id + state.issued as usize) % MIX.len()]
        };
        let len = match kind {
            request::Kind::SmallGet => shared.sizes.small,
            request::Kind::LargeGet => shared.sizes.large,
            request::Kind::Echo => shared.sizes.post,
        };
        let spec = Spec {
            kind,
            len,
            seed: shared.next_seed(),
        };
        let started = Instant::now();
        let outcome = tokio::select! {
            r = tokio::time::timeout(
                shared.request_timeout,
                request::run(&mut sender, &shared.authority, &spec, stats),
            ) => r.unwrap_or_else(|_| Err(Failure::Request(format!(
                "{}: not complete after {} ms", spec.name(), shared.request_timeout.as_millis()
            )))),
            _ = dead.wait_for(|d| *d) => Err(Failure::Connection(format!(
                "{}: connection lost: {}",
                spec.name(),
                quic.close_reason().map_or_else(|| "driver ended".to_string(), |r| r.to_string())
            ))),
        };
        match outcome {
            Ok(()) => {
                state.issued += 1;
                stats.success(conn, started.elapsed());
            }
            Err(Failure::Refused) => return state,
            Err(Failure::Request(m)) => {
                state.issued += 1;
                stats.failure(conn, format!("connection {conn}: {m}"));
            }
            Err(Failure::Connection(m)) => {
                state.issued += 1;
                stats.failure(conn, format!("connection {conn}: {m}"));
                return state;
            }
        }
    }
}
