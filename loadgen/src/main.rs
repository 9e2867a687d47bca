//! `baton-load`: drive Baton's demo service with many QUIC connections and check every byte.
use anyhow::{Context, Result, bail};
use baton_load::client::{self, check_answer, request};
use baton_load::impair::{DirectionConfig, ImpairedSocket, PathConfig, PathReport, PathStats};
use baton_load::{
    ConnSummary, KIND_STREAM, MAX_REQUEST, Summary, fill, first_mismatch, parse_delay,
    parse_duration, parse_percent,
};
use clap::Parser;
use quinn::crypto::rustls::QuicClientConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "baton-load",
    version,
    about = "Load client for Baton's demo service (ALPN baton-demo/1): many QUIC connections, each with a \
request/response loop and one long-lived echo stream whose bytes are checked",
    long_about = "Load client for Baton's demo service (ALPN baton-demo/1, docs/DEMO-PROTOCOL.md).\n\n\
Opens --connections QUIC connections to --target, each from its own UDP socket (so the client \
address names the connection on the worker side). With several --target flags (e.g. an IPv4 and \
an IPv6 VIP) the connections alternate between them: connection i goes to target i mod n. Every connection runs a request/response loop \
(request body of --request-size bytes, checked on the answer together with the session's request \
counter) and one long-lived bidirectional stream carrying deterministic pseudo-random bytes that \
are checked as they are echoed. It records per connection the largest gap between two completed \
requests (stall), failed requests, connection errors and reconnects (a new connection had to be \
made), and whether the long stream came back byte-exact.\n\n\
It runs for --duration, or until --stop-file exists, or until SIGINT/SIGTERM; then it closes every \
long stream, waits for the last echoed byte and prints a summary (text, or JSON with --json). \
Progress goes to stderr once per --progress-interval. Exit status: 0 when everything checked out, \
1 when anything failed, 2 on a usage or setup error.\n\n\
Emulated path: --rtt, --delay-up/--delay-down, --jitter, --loss, --loss-up/--loss-down and \
--reorder impair every connection's UDP socket inside this process (for a lab whose kernel has no \
netem), on top of whatever the real path does. Each datagram is decided on its own (also each \
segment of a GSO/GRO batch): dropped with the direction's loss probability, else delivered after \
the direction's delay plus a uniform random extra from 0 to --jitter, plus --reorder-delay for the \
--reorder share of datagrams (so later ones overtake them). Without jitter and reordering the order \
is kept. Delays run on tokio timers (1 ms resolution: never shorter than asked, up to ~1 ms longer) \
and never block the sender. The summary reports the path and how many datagrams were dropped, \
delayed and held back in each direction.\n\n\
Client events: --rebind-every moves each connection's endpoint to a fresh local UDP port \
periodically (the server sees a NAT rebinding: a new client address on the same connection, \
which it validates), and --key-update-every makes each connection start a QUIC key update \
periodically. The summary counts both.",
    after_help = "Examples:\n  \
baton-load --target 10.200.100.1:4433 --ca /etc/baton/ca.pem --connections 100 --duration 30s\n  \
baton-load --target 10.200.100.1:4433 --insecure-skip-verify --stop-file /tmp/stop --print-conn-ids --json\n  \
baton-load --target 10.200.100.1:4433 --ca ca.pem --rtt 40ms --loss 1% --duration 30s   (a 40 ms, 1% loss path)\n  \
baton-load --target 10.200.100.1:4433 --target '[fd00:200:100::1]:4433' --ca ca.pem --connections 20   (10 IPv4, 10 IPv6)\n  \
baton-load --target 10.200.100.1:4433 --ca ca.pem --rebind-every 300ms --key-update-every 50ms\n  \
baton-load --target 10.200.100.1:4433 --ca ca.pem --delay-up 5ms --delay-down 45ms --jitter 2ms --reorder 1% --impair-seed 7"
)]
struct Args {
    /// The service address: VIP and port (an IPv6 one as [addr]:port). Repeat it for several:
    /// connection i goes to target i mod n (e.g. half IPv4, half IPv6).
    #[arg(long, short, required = true)]
    target: Vec<SocketAddr>,
    /// Concurrent connections.
    #[arg(long, short, default_value_t = 10)]
    connections: usize,
    /// How long to run (500ms, 30s, 2m). Without it: until --stop-file appears or a signal.
    #[arg(long, short, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop (gracefully) as soon as this file exists.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Request body size in bytes (0 to 1 MiB).
    #[arg(long, default_value_t = 256)]
    request_size: usize,
    /// Pause between a request's answer and the next request on a connection (0 = back to back).
    #[arg(long, value_parser = parse_duration, default_value = "10ms")]
    request_interval: Duration,
    /// A request not answered within this time counts as failed.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    request_timeout: Duration,
    /// Bytes per second each connection writes on its long-lived stream (0: no long stream).
    #[arg(long, default_value_t = 32 * 1024)]
    stream_rate: u64,
    /// PEM file with the CA certificate(s) that signed the workers' certificate.
    #[arg(long, conflicts_with = "insecure_skip_verify")]
    ca: Option<PathBuf>,
    /// Accept any server certificate (lab use only: anyone on the path could impersonate the service).
    #[arg(long)]
    insecure_skip_verify: bool,
    /// Server name sent in TLS SNI and checked against the certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Time allowed for a handshake.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    connect_timeout: Duration,
    /// Handshake attempts per connection before its first success (the service may still be starting).
    #[arg(long, default_value_t = 20)]
    connect_attempts: u32,
    /// Delay between opening two connections at start-up.
    #[arg(long, value_parser = parse_duration, default_value = "2ms")]
    ramp: Duration,
    /// Print a line per connection as it comes up: `conn <index> local=<ip:port>` (the client
    /// address a worker reports for it, usable to pick connections for `baton migrate`), and
    /// `ready connections=<n>` once every connection is up.
    #[arg(long)]
    print_conn_ids: bool,
    /// Print the final summary as one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    summary_file: Option<PathBuf>,
    /// How often to print a progress line to stderr (0 = never).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    progress_interval: Duration,
    /// Write a line per completed request to this file: `<connection index> <unix time in
    /// microseconds>` (wall clock, so it lines up with timestamps taken by other processes on the
    /// host, e.g. a benchmark's migration windows). Flushed every 100 ms and at the end.
    #[arg(long)]
    gap_log: Option<PathBuf>,
    /// Idle connections: each connection makes one request to prove it is up, then sends nothing
    /// but keep-alives until the run stops, when it makes one more request on the same connection
    /// to prove it survived (a connection that broke and was remade counts as a reconnect). No
    /// long stream (--stream-rate and --request-interval are ignored). With --print-conn-ids the
    /// `conn` line of a connection comes after its first request.
    #[arg(long)]
    idle: bool,
    /// Length in bytes of the connection IDs this client issues (quinn's default is 8). 0 gives
    /// zero-length CIDs, as many mobile clients use; quinn then advertises
    /// `active_connection_id_limit = 2`, the smallest RFC 9000 allows, so a server may keep only
    /// two of its CIDs at the client at a time (a migration's CID rotation must live with that).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(0..=20))]
    local_cid_len: u8,
    /// Round-trip time added to the path: half of it delays each direction (40ms: 20 ms up,
    /// 20 ms down). --delay-up and --delay-down override one direction each.
    #[arg(long, value_parser = parse_delay, help_heading = PATH_HEADING)]
    rtt: Option<Duration>,
    /// One-way delay added to every datagram the client sends (overrides half of --rtt).
    #[arg(long, value_parser = parse_delay, help_heading = PATH_HEADING)]
    delay_up: Option<Duration>,
    /// One-way delay added to every datagram the client receives (overrides half of --rtt).
    #[arg(long, value_parser = parse_delay, help_heading = PATH_HEADING)]
    delay_down: Option<Duration>,
    /// Random extra delay per datagram, uniform from 0 to this, both directions. Datagrams closer
    /// together than the jitter can overtake each other.
    #[arg(long, value_parser = parse_delay, default_value = "0ms", help_heading = PATH_HEADING)]
    jitter: Duration,
    /// Share of datagrams lost at random, each direction (1%, 0.5%; a plain number is percent).
    /// --loss-up and --loss-down override one direction each.
    #[arg(long, value_parser = parse_percent, help_heading = PATH_HEADING)]
    loss: Option<f64>,
    /// Share of the datagrams the client sends that are lost (overrides --loss).
    #[arg(long, value_parser = parse_percent, help_heading = PATH_HEADING)]
    loss_up: Option<f64>,
    /// Share of the datagrams the client receives that are lost (overrides --loss).
    #[arg(long, value_parser = parse_percent, help_heading = PATH_HEADING)]
    loss_down: Option<f64>,
    /// Share of datagrams, each direction, held back by --reorder-delay beyond their delay, so
    /// the ones after them overtake them (e.g. 1%).
    #[arg(long, value_parser = parse_percent, default_value = "0", help_heading = PATH_HEADING)]
    reorder: f64,
    /// How long a reordered datagram is held back.
    #[arg(long, value_parser = parse_delay, default_value = "5ms", help_heading = PATH_HEADING)]
    reorder_delay: Duration,
    /// Seed of the path's random decisions (loss, jitter, reordering): with the same seed each
    /// connection's socket makes the same sequence of decisions. Default: a random seed, printed
    /// at the start and in the summary.
    #[arg(long, help_heading = PATH_HEADING)]
    impair_seed: Option<u64>,
    /// NAT rebinding: every this often (e.g. 300ms) each connection's endpoint moves to a fresh
    /// local UDP port on the same address (on the emulated path too), so the server sees the
    /// connection come from a new client address. Counted as `rebinds` in the summary. The
    /// `conn` lines of --print-conn-ids give the first address only.
    #[arg(long, value_parser = parse_duration, help_heading = EVENTS_HEADING)]
    rebind_every: Option<Duration>,
    /// Key updates: every this often (e.g. 50ms) each connection starts a QUIC key update
    /// (quinn's `force_key_update`; quinn skips one asked for before the peer confirmed the last).
    /// Counted as `key_updates` (asked for) in the summary.
    #[arg(long, value_parser = parse_duration, help_heading = EVENTS_HEADING)]
    key_update_every: Option<Duration>,
}

const PATH_HEADING: &str = "Emulated path (client-side impairment)";
const EVENTS_HEADING: &str = "Client events during the run";

impl Args {
    /// The target of connection slot `index`: the targets in turn.
    fn target_of(&self, index: usize) -> SocketAddr {
        self.target[index % self.target.len()]
    }

    /// The emulated path the impairment options describe.
    fn path(&self) -> PathConfig {
        let half = self.rtt.unwrap_or_default() / 2;
        let loss = self.loss.unwrap_or(0.0);
        PathConfig {
            up: DirectionConfig {
                delay: self.delay_up.unwrap_or(half),
                loss: self.loss_up.unwrap_or(loss),
            },
            down: DirectionConfig {
                delay: self.delay_down.unwrap_or(half),
                loss: self.loss_down.unwrap_or(loss),
            },
            jitter: self.jitter,
            reorder: self.reorder,
            reorder_delay: self.reorder_delay,
            seed: self.impair_seed.unwrap_or_else(random_seed),
        }
    }
}

fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Counters every connection task updates, read by the progress reporter.
#[derive(Default)]
struct Totals {
    up: AtomicUsize,
    requests: AtomicU64,
    failed: AtomicU64,
    reconnects: AtomicU64,
    conn_errors: AtomicU64,
    stream_sent: AtomicU64,
    stream_verified: AtomicU64,
    stream_bad: AtomicU64,
    /// Largest stall so far, in microseconds.
    max_stall_us: AtomicU64,
    rebinds: AtomicU64,
    key_updates: AtomicU64,
}

struct Ctx {
    args: Args,
    client_config: quinn::ClientConfig,
    stop: watch::Receiver<bool>,
    totals: Totals,
    stdout: Mutex<()>,
    started: Instant,
    /// Connections announced with --print-conn-ids (for the `ready` line).
    announced: AtomicUsize,
    /// --gap-log: completion times of requests.
    gap_log: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    /// The emulated path (`--rtt`, `--loss`, ...) and what it did.
    path: PathConfig,
    path_stats: Arc<PathStats>,
}

impl Ctx {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
    fn say(&self, line: &str) {
        let _g = self.stdout.lock().unwrap();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// `--print-conn-ids`: the `conn` line of a connection slot, and `ready` once every slot
    /// announced itself.
    fn announce(&self, index: usize, local: &str, reconnects: u64) {
        if !self.args.print_conn_ids {
            return;
        }
        if reconnects > 0 {
            self.say(&format!(
                "conn {index} local={local} reconnect={reconnects}"
            ));
            return;
        }
        self.say(&format!("conn {index} local={local}"));
        if self.announced.fetch_add(1, Ordering::SeqCst) + 1 == self.args.connections {
            self.say(&format!("ready connections={}", self.args.connections));
        }
    }

    /// `--gap-log`: one line per completed request.
    fn log_completion(&self, index: usize) {
        if let Some(log) = &self.gap_log {
            let us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0);
            let _ = writeln!(log.lock().unwrap(), "{index} {us}");
        }
    }

    fn flush_gap_log(&self) -> std::io::Result<()> {
        match &self.gap_log {
            Some(log) => log.lock().unwrap().flush(),
            None => Ok(()),
        }
    }
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("baton-load: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("baton-load: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn client_config(args: &Args) -> Result<quinn::ClientConfig> {
    let tls = if args.insecure_skip_verify {
        client::insecure_client_tls()
    } else {
        let Some(ca) = &args.ca else {
            bail!(
                "give --ca <PEM file> with the CA that signed the workers' certificate, or --insecure-skip-verify in a lab"
            );
        };
        client::client_tls(client::roots_from_pem_file(ca)?)
    };
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("30 s fits a VarInt"),
    ));
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

async fn run(args: Args) -> Result<bool> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.request_size > MAX_REQUEST {
        bail!(
            "--request-size {} is over the demo service's limit of {MAX_REQUEST} bytes",
            args.request_size
        );
    }
    if args.duration.is_none() && args.stop_file.is_none() {
        eprintln!("baton-load: no --duration or --stop-file: running until SIGINT/SIGTERM");
    }
    if let Some(f) = &args.stop_file
        && f.exists()
    {
        bail!(
            "the stop file {} exists already: remove it first",
            f.display()
        );
    }
    let client_config = client_config(&args)?;
    let gap_log = match &args.gap_log {
        Some(p) => Some(Mutex::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        ))),
        None => None,
    };
    let path = args.path();
    if path.is_impaired() {
        eprintln!(
            "baton-load: emulated path: {} (seed {}; --impair-seed {} repeats its decisions)",
            path.describe(),
            path.seed,
            path.seed
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        args,
        client_config,
        stop: stop_rx,
        totals: Totals::default(),
        stdout: Mutex::new(()),
        started,
        announced: AtomicUsize::new(0),
        gap_log,
        path,
        path_stats: Arc::new(PathStats::default()),
    });
    if ctx.gap_log.is_some() {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let _ = ctx.flush_gap_log();
            }
        });
    }

    // Stop conditions: duration, stop file, signals.
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let deadline = ctx.args.duration.map(|d| tokio::time::Instant::now() + d);
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => { eprintln!("baton-load: SIGINT, stopping"); break; }
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
                        eprintln!("baton-load: SIGTERM, stopping"); break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) { break; }
                        if ctx.args.stop_file.as_ref().is_some_and(|f| f.exists()) {
                            eprintln!("baton-load: stop file found, stopping"); break;
                        }
                    }
                }
            }
            let _ = stop_tx.send(true);
        });
    }

    // Progress.
    let progress = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if ctx.args.progress_interval.is_zero() {
                return;
            }
            let mut stop = ctx.stop.clone();
            let mut last = 0u64;
            let mut tick = tokio::time::interval(ctx.args.progress_interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped(&mut stop) => return,
                }
                let t = &ctx.totals;
                let path = if ctx.path.is_impaired() {
                    let (up, down) = (ctx.path_stats.up.counts(), ctx.path_stats.down.counts());
                    format!(" path dropped up={} down={}", up.dropped, down.dropped)
                } else {
                    String::new()
                };
                let mut events = String::new();
                if ctx.args.rebind_every.is_some() {
                    events.push_str(&format!(" rebinds={}", t.rebinds.load(Ordering::Relaxed)));
                }
                if ctx.args.key_update_every.is_some() {
                    events.push_str(&format!(
                        " key_updates={}",
                        t.key_updates.load(Ordering::Relaxed)
                    ));
                }
                let req = t.requests.load(Ordering::Relaxed);
                let rate = (req - last) as f64 / ctx.args.progress_interval.as_secs_f64();
                last = req;
                eprintln!(
                    "[load] t={:>6.1}s up={}/{} requests={} ({:.0}/s) failed={} reconnects={} conn_errors={} \
                     max_stall={:.1}ms stream sent={:.2}MB verified={:.2}MB bad={}{events}{path}",
                    started.elapsed().as_secs_f64(),
                    t.up.load(Ordering::Relaxed),
                    ctx.args.connections,
                    req,
                    rate,
                    t.failed.load(Ordering::Relaxed),
                    t.reconnects.load(Ordering::Relaxed),
                    t.conn_errors.load(Ordering::Relaxed),
                    t.max_stall_us.load(Ordering::Relaxed) as f64 / 1000.0,
                    t.stream_sent.load(Ordering::Relaxed) as f64 / 1e6,
                    t.stream_verified.load(Ordering::Relaxed) as f64 / 1e6,
                    t.stream_bad.load(Ordering::Relaxed),
                );
            }
        })
    };

    // The connections.
    let mut tasks = Vec::with_capacity(ctx.args.connections);
    for index in 0..ctx.args.connections {
        if ctx.stopping() {
            break;
        }
        let ctx2 = ctx.clone();
        tasks.push(tokio::spawn(
            async move { connection_slot(ctx2, index).await },
        ));
        if !ctx.args.ramp.is_zero() {
            tokio::time::sleep(ctx.args.ramp).await;
        }
    }
    let mut per_connection = Vec::with_capacity(tasks.len());
    for (index, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(s) => per_connection.push(s),
            Err(e) => per_connection.push(ConnSummary {
                index,
                last_error: Some(format!("connection task panicked: {e}")),
                ..Default::default()
            }),
        }
    }
    progress.abort();
    if let Some(p) = &ctx.args.gap_log {
        ctx.flush_gap_log()
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let targets: Vec<String> = ctx.args.target.iter().map(|t| t.to_string()).collect();
    let mut summary =
        Summary::from_connections(targets.join(","), started.elapsed(), per_connection);
    if ctx.path.is_impaired() {
        summary.path = Some(PathReport::new(&ctx.path, &ctx.path_stats));
    }
    let json = serde_json::to_string(&summary)?;
    if let Some(f) = &ctx.args.summary_file {
        std::fs::write(f, format!("{json}\n"))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    if ctx.args.json {
        ctx.say(&json);
    } else {
        ctx.say(summary.human().trim_end());
    }
    Ok(summary.ok)
}

/// One connection slot: connect (retrying at start-up), run the session, and if the connection
/// breaks before the run ends, reconnect and go on (counted as a reconnect).
async fn connection_slot(ctx: Arc<Ctx>, index: usize) -> ConnSummary {
    let mut s = ConnSummary {
        index,
        stream_exact: true,
        ..Default::default()
    };
    // Bind the address the route to the target leaves from (not the wildcard), so the local
    // address printed for this connection is exactly the peer address a worker reports.
    let target = ctx.args.target_of(index);
    s.target = target.to_string();
    let bind = SocketAddr::new(source_ip_for(target), 0);
    let mut endpoint = match client_endpoint(&ctx, bind, index as u64) {
        Ok(e) => e,
        Err(e) => {
            s.last_error = Some(format!("cannot open a UDP socket: {e}"));
            s.stream_exact = false;
            return s;
        }
    };
    endpoint.set_default_client_config(ctx.client_config.clone());
    s.local_addr = endpoint
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut attempts = 0u32;
    let mut generation = 0u64;
    let rebinds = Arc::new(AtomicU64::new(0));
    let key_updates = Arc::new(AtomicU64::new(0));
    let mut rebinder: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if ctx.stopping() {
            break;
        }
        let conn = match connect(&ctx, &endpoint, target).await {
            Ok(c) => c,
            Err(e) => {
                if s.connections_made == 0 {
                    attempts += 1;
                    s.connect_retries += 1;
                    tracing::debug!(index, attempts, "handshake failed: {e:#}");
                    if attempts >= ctx.args.connect_attempts {
                        s.last_error =
                            Some(format!("no connection after {attempts} attempts: {e:#}"));
                        s.stream_exact = false;
                        break;
                    }
                } else {
                    s.connection_errors += 1;
                    ctx.totals.conn_errors.fetch_add(1, Ordering::Relaxed);
                    s.last_error = Some(format!("reconnect failed: {e:#}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if s.connections_made > 0 {
            s.reconnects += 1;
            ctx.totals.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        s.connections_made += 1;
        let local = endpoint
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        s.local_addr = local.clone();
        if s.connections_made == 1 {
            ctx.totals.up.fetch_add(1, Ordering::Relaxed);
            if let Some(every) = ctx.args.rebind_every {
                rebinder = Some(tokio::spawn(rebind_loop(
                    ctx.clone(),
                    endpoint.clone(),
                    bind,
                    index,
                    every,
                    rebinds.clone(),
                )));
            }
        }
        if !ctx.args.idle {
            ctx.announce(index, &local, s.reconnects);
        }
        let seed = ((index as u64) << 20) ^ generation;
        generation += 1;
        let key_updater = ctx.args.key_update_every.map(|every| {
            tokio::spawn(key_update_loop(
                ctx.clone(),
                conn.clone(),
                every,
                key_updates.clone(),
            ))
        });
        let result = if ctx.args.idle {
            idle_session(&ctx, &conn, seed, &mut s).await
        } else {
            session(&ctx, &conn, seed, &mut s).await
        };
        if let Some(k) = key_updater {
            k.abort();
            let _ = k.await;
        }
        let stats = conn.stats();
        s.lost_packets += stats.path.lost_packets;
        s.congestion_events += stats.path.congestion_events;
        match result {
            Ok(()) => {
                conn.close(0u32.into(), b"done");
                break;
            }
            Err(e) => {
                s.connection_errors += 1;
                ctx.totals.conn_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(index, local = %s.local_addr, "connection failed: {e:#}");
                s.last_error = Some(format!("{e:#}"));
                conn.close(1u32.into(), b"client gave up");
            }
        }
    }
    if let Some(r) = rebinder {
        r.abort();
        let _ = r.await;
    }
    s.rebinds = rebinds.load(Ordering::Relaxed);
    s.key_updates = key_updates.load(Ordering::Relaxed);
    if let Ok(a) = endpoint.local_addr() {
        s.local_addr = a.to_string();
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    s
}

/// `--key-update-every`: until the run stops or `conn` closes, asks quinn for a key update on
/// `conn` every `every`, counting each in `count` and the totals.
async fn key_update_loop(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    every: Duration,
    count: Arc<AtomicU64>,
) {
    let mut stop = ctx.stop.clone();
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return,
            _ = conn.closed() => return,
        }
        conn.force_key_update();
        count.fetch_add(1, Ordering::Relaxed);
        ctx.totals.key_updates.fetch_add(1, Ordering::Relaxed);
    }
}

/// `--rebind-every`: until the run stops, moves `endpoint` to a fresh UDP socket on `bind`'s
/// address (a new port) every `every`, counting each move in `count` and the totals.
async fn rebind_loop(
    ctx: Arc<Ctx>,
    endpoint: quinn::Endpoint,
    bind: SocketAddr,
    index: usize,
    every: Duration,
    count: Arc<AtomicU64>,
) {
    let mut stop = ctx.stop.clone();
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let n = count.load(Ordering::Relaxed) + 1;
        // Each socket of the emulated path makes its own sequence of random decisions.
        let stream = index as u64 | (n << 32);
        match rebind(&ctx, &endpoint, bind, stream) {
            Ok(()) => {
                count.store(n, Ordering::Relaxed);
                ctx.totals.rebinds.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(index, local = ?endpoint.local_addr(), "rebound");
            }
            Err(e) => tracing::warn!(index, "rebinding to a new UDP port failed: {e}"),
        }
    }
}

/// Moves `endpoint` to a new UDP socket on `bind` (on the emulated path when there is one).
fn rebind(
    ctx: &Ctx,
    endpoint: &quinn::Endpoint,
    bind: SocketAddr,
    stream: u64,
) -> std::io::Result<()> {
    let socket = std::net::UdpSocket::bind(bind)?;
    if !ctx.path.is_impaired() {
        return endpoint.rebind(socket);
    }
    endpoint.rebind_abstract(ImpairedSocket::new(
        socket,
        &ctx.path,
        stream,
        ctx.path_stats.clone(),
    )?)
}

/// A client endpoint on `bind`, on the emulated path when one is asked for.
fn client_endpoint(ctx: &Ctx, bind: SocketAddr, stream: u64) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    let cid_len = usize::from(ctx.args.local_cid_len);
    config.cid_generator(move || Box::new(quinn_proto::RandomConnectionIdGenerator::new(cid_len)));
    let socket = std::net::UdpSocket::bind(bind)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    if !ctx.path.is_impaired() {
        return quinn::Endpoint::new(config, None, socket, runtime);
    }
    let socket = ImpairedSocket::new(socket, &ctx.path, stream, ctx.path_stats.clone())?;
    quinn::Endpoint::new_with_abstract_socket(config, None, socket, runtime)
}

/// Resolves once the run is stopping (holds no watch guard across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The local address the kernel would use towards `target` (the wildcard if it cannot tell).
fn source_ip_for(target: SocketAddr) -> std::net::IpAddr {
    let unspecified: std::net::IpAddr = if target.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    std::net::UdpSocket::bind(SocketAddr::new(unspecified, 0))
        .and_then(|s| {
            s.connect(target)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(unspecified)
}

async fn connect(
    ctx: &Ctx,
    endpoint: &quinn::Endpoint,
    target: SocketAddr,
) -> Result<quinn::Connection> {
    let connecting = endpoint
        .connect(target, &ctx.args.server_name)
        .with_context(|| format!("connecting to {target} as {:?}", ctx.args.server_name))?;
    match tokio::time::timeout(ctx.args.connect_timeout, connecting).await {
        Ok(r) => Ok(r.context("handshake")?),
        Err(_) => bail!("no handshake within {:?}", ctx.args.connect_timeout),
    }
}

/// Runs the request loop and the long stream on `conn` until the run stops (Ok) or the
/// connection breaks (Err).
async fn session(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    seed: u64,
    s: &mut ConnSummary,
) -> Result<()> {
    let stream_ok = Arc::new(AtomicBool::new(true));
    let long = if ctx.args.stream_rate > 0 {
        let (send, recv) = conn
            .open_bi()
            .await
            .context("opening the long-lived stream")?;
        let (ctx2, ok) = (ctx.clone(), stream_ok.clone());
        Some(tokio::spawn(async move {
            long_stream(ctx2, send, recv, seed, ok).await
        }))
    } else {
        None
    };
    let requests = request_loop(ctx, conn, seed, s).await;
    let stream_result = match long {
        Some(t) => match t.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("long stream task panicked: {e}")),
        },
        None => Ok((0, 0)),
    };
    match &stream_result {
        Ok((sent, verified)) => {
            s.stream_bytes_sent += sent;
            s.stream_bytes_verified += verified;
        }
        Err(_) => s.stream_exact = false,
    }
    if !stream_ok.load(Ordering::Relaxed) {
        s.stream_exact = false;
    }
    requests?;
    stream_result.map(|_| ())
}

async fn request_loop(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    seed: u64,
    s: &mut ConnSummary,
) -> Result<()> {
    let run_start = ctx.started;
    let size = ctx.args.request_size;
    let mut body = vec![0u8; size];
    let mut expected_counter = 1u64;
    let mut last_done = Instant::now();
    let mut n = 0u64;
    while !ctx.stopping() {
        fill(seed ^ 0x5eed_0000_0000_0000 ^ n, 0, &mut body);
        n += 1;
        match counted_request(ctx, conn, &body, Some(expected_counter), s).await {
            Ok(counter) => {
                expected_counter = counter + 1;
                let now = Instant::now();
                let gap = now - last_done;
                last_done = now;
                let gap_ms = gap.as_secs_f64() * 1000.0;
                if gap_ms > s.max_stall_ms {
                    s.max_stall_ms = gap_ms;
                    s.max_stall_at_s = (now - run_start).as_secs_f64();
                    ctx.totals
                        .max_stall_us
                        .fetch_max(gap.as_micros() as u64, Ordering::Relaxed);
                }
            }
            Err(e) => {
                s.last_error = Some(format!("request: {e:#}"));
                if let Some(reason) = conn.close_reason() {
                    return Err(anyhow::anyhow!("connection lost: {reason}"));
                }
                tracing::warn!("request failed: {e:#}");
            }
        }
        if !ctx.args.request_interval.is_zero() {
            let mut stop = ctx.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(ctx.args.request_interval) => {}
                _ = stopped(&mut stop) => {}
            }
        }
    }
    Ok(())
}

/// `--idle`: one request to prove the connection, keep-alives only until the run stops, then one
/// request on the same connection to prove it survived. Ok when both were answered correctly
/// with a continuous session counter; Err when the connection broke (the slot reconnects).
async fn idle_session(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    seed: u64,
    s: &mut ConnSummary,
) -> Result<()> {
    let mut body = vec![0u8; ctx.args.request_size];
    fill(seed ^ 0x1d1e_0000_0000_0000, 0, &mut body);
    let first = counted_request(ctx, conn, &body, None, s).await;
    if let Err(e) = &first {
        if let Some(reason) = conn.close_reason() {
            return Err(anyhow::anyhow!("connection lost: {reason}"));
        }
        s.last_error = Some(format!("first request: {e:#}"));
        // Still up: wait for the stop like the others, the failure is counted.
    }
    let local = s.local_addr.clone();
    ctx.announce(s.index, &local, s.reconnects);
    let mut stop = ctx.stop.clone();
    tokio::select! {
        _ = stopped(&mut stop) => {}
        reason = conn.closed() => return Err(anyhow::anyhow!("connection lost while idle: {reason}")),
    }
    let expected = first.as_ref().ok().map(|c| c + 1);
    fill(seed ^ 0x1d1e_0000_0000_0000 ^ 1, 0, &mut body);
    match counted_request(ctx, conn, &body, expected, s).await {
        Ok(counter) => {
            s.final_request_ok = expected == Some(counter);
            Ok(())
        }
        Err(e) => {
            s.last_error = Some(format!("final request: {e:#}"));
            if let Some(reason) = conn.close_reason() {
                return Err(anyhow::anyhow!("connection lost: {reason}"));
            }
            Ok(())
        }
    }
}

/// One request on `conn` with `body`, its answer checked and counted: a request, or a failure;
/// an answer whose session counter is not `expected` (when given) also counts as a failure and a
/// counter break. Returns the answer's session counter.
async fn counted_request(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    body: &[u8],
    expected: Option<u64>,
    s: &mut ConnSummary,
) -> Result<u64> {
    let asked = Instant::now();
    let answer = match tokio::time::timeout(ctx.args.request_timeout, request(conn, body)).await {
        Ok(Ok(answer)) => check_answer(&answer, body, expected.unwrap_or(0)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!(
            "no answer within {:?}",
            ctx.args.request_timeout
        )),
    };
    match answer {
        Ok(counter) => {
            if let Some(expected) = expected
                && counter != expected
            {
                s.counter_breaks += 1;
                s.failed += 1;
                ctx.totals.failed.fetch_add(1, Ordering::Relaxed);
                s.last_error = Some(format!(
                    "session counter went from {} to {counter}",
                    expected - 1
                ));
            }
            s.requests += 1;
            s.record_latency(asked.elapsed());
            ctx.totals.requests.fetch_add(1, Ordering::Relaxed);
            ctx.log_completion(s.index);
            Ok(counter)
        }
        Err(e) => {
            s.failed += 1;
            ctx.totals.failed.fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// Writes pattern bytes at `--stream-rate` until the run stops, then FIN; reads and checks every
/// echoed byte until the server's FIN. Returns (sent, verified).
async fn long_stream(
    ctx: Arc<Ctx>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    seed: u64,
    ok: Arc<AtomicBool>,
) -> Result<(u64, u64)> {
    send.write_all(&[KIND_STREAM])
        .await
        .context("writing the stream kind")?;
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let (ctx, sent) = (ctx.clone(), sent.clone());
        tokio::spawn(async move {
            const TICK: Duration = Duration::from_millis(10);
            let per_tick = (ctx.args.stream_rate as f64 * TICK.as_secs_f64()).max(1.0) as usize;
            let mut buf = vec![0u8; per_tick];
            let mut offset = 0u64;
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stop = ctx.stop.clone();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped(&mut stop) => break,
                }
                fill(seed, offset, &mut buf);
                send.write_all(&buf)
                    .await
                    .context("writing the long stream")?;
                offset += buf.len() as u64;
                sent.store(offset, Ordering::Relaxed);
                ctx.totals
                    .stream_sent
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
            send.finish().context("finishing the long stream")?;
            anyhow::Ok(offset)
        })
    };
    let mut verified = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    // While running the reader has no deadline; once the run stops, the echo must end in time.
    let read_result = {
        let reader = async {
            loop {
                match recv
                    .read(&mut buf)
                    .await
                    .context("reading the long stream's echo")?
                {
                    Some(n) => {
                        if let Some(at) = first_mismatch(seed, verified, &buf[..n]) {
                            ok.store(false, Ordering::Relaxed);
                            ctx.totals.stream_bad.fetch_add(1, Ordering::Relaxed);
                            bail!("echoed byte at offset {at} differs from what was sent");
                        }
                        verified += n as u64;
                        ctx.totals
                            .stream_verified
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    None => return anyhow::Ok(()),
                }
            }
        };
        let mut stop = ctx.stop.clone();
        let mut reader = std::pin::pin!(reader);
        tokio::select! {
            r = &mut reader => r,
            _ = stopped(&mut stop) => {
                match tokio::time::timeout(Duration::from_secs(10), &mut reader).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("the long stream's echo did not end within 10 s of the stop")),
                }
            }
        }
    };
    let total = match writer.await {
        Ok(r) => r?,
        Err(e) => bail!("long stream writer panicked: {e}"),
    };
    if let Err(e) = read_result {
        ok.store(false, Ordering::Relaxed);
        return Err(e);
    }
    if verified != total {
        ok.store(false, Ordering::Relaxed);
        ctx.totals.stream_bad.fetch_add(1, Ordering::Relaxed);
        bail!("long stream: sent {total} bytes but {verified} came back before FIN");
    }
    Ok((total, verified))
}
