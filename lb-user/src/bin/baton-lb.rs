//! `baton-lb`: the Baton controller daemon.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_user::config::{Config, XdpModeSetting};
use lb_user::control::{self, Request, Shared};
use lb_user::controller::Controller;
use lb_user::dataplane::{self, Dataplane};
use lb_user::pinned::PinnedMaps;
use lb_user::{health, metrics, sys};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "baton-lb",
    version,
    about = "Baton QUIC load balancer controller: attaches the XDP router and keeps its maps in sync",
    long_about = "Baton QUIC load balancer controller.\n\n\
Loads the XDP program onto the configured interface, pins its maps and link under the pin \
directory, and writes VIPs, workers, the Maglev table and the device map from the TOML config. \
It health-checks workers (unhealthy ones leave the Maglev table), serves Prometheus metrics and \
a control socket for the `baton` CLI.\n\n\
SIGHUP reloads the config (workers, VIPs, health) without touching the program. \
Restarting baton-lb never interrupts forwarding: the link stays pinned, and a new baton-lb \
re-adopts the pinned maps and swaps its program into the existing link atomically. Removing \
the program is explicit: `baton-lb detach`.",
    after_help = "Examples:\n  baton-lb --config /etc/baton/lb.toml\n  baton-lb --config lab/lb.toml --netns baton-lb\n  baton-lb check-config --config /etc/baton/lb.toml\n  baton-lb detach"
)]
struct Cli {
    /// The TOML config (see docs/OPERATING.md for every field).
    #[arg(
        long,
        short,
        env = "BATON_CONFIG",
        default_value = "/etc/baton/lb.toml",
        global = true
    )]
    config: PathBuf,
    /// bpffs directory for the pinned maps and link. Use a separate one per instance (tests do).
    #[arg(long, env = "BATON_PIN_DIR", default_value = lb_user::DEFAULT_PIN_DIR, global = true)]
    pin_dir: PathBuf,
    /// Run in this network namespace (a name from `ip netns list`, or a path). Prefer this over
    /// `ip netns exec`, which hides the host's bpffs so pins would not survive a restart.
    #[arg(long, env = "BATON_NETNS", global = true)]
    netns: Option<String>,
    /// Override the config's xdp_mode: native, skb or auto.
    #[arg(long)]
    xdp_mode: Option<XdpModeSetting>,
    /// Override the config's control socket path.
    #[arg(long, env = "BATON_SOCKET", global = true)]
    control_socket: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller (the default when no subcommand is given).
    Run,
    /// Take the XDP program off the interface and remove every pin. Forwarding stops. Stops a
    /// running baton-lb first (through its control socket).
    Detach,
    /// Parse and validate the config, print what it describes, and exit.
    CheckConfig,
}

fn main() {
    let cli = Cli::parse();
    // Before any thread exists: every thread created later inherits this namespace.
    if let Some(ns) = &cli.netns {
        if let Err(e) = sys::enter_netns(ns) {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| "info".into());
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match cli.command {
        None | Some(Cmd::Run) => run(&cli),
        Some(Cmd::Detach) => detach(&cli),
        Some(Cmd::CheckConfig) => check_config(&cli),
    };
    if let Err(e) = result {
        // One line for people; JSON logging keeps the error in the structured stream instead.
        if cli.log_json {
            tracing::error!("{e:#}");
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(1);
    }
}

fn check_config(cli: &Cli) -> Result<()> {
    let cfg = Config::load(&cli.config)?;
    println!("{}: OK", cli.config.display());
    println!("  interface {} (xdp_mode {})", cfg.interface, cfg.xdp_mode);
    println!(
        "  CIDs {} bytes, server ID {} bytes",
        cfg.layout.cid_len(),
        cfg.layout.server_id_len()
    );
    for v in &cfg.vips {
        println!("  VIP {} ports {:?}", v.address, v.ports);
    }
    for w in &cfg.workers {
        println!(
            "  worker {} server_id {} at {} weight {}",
            w.name, w.server_id, w.address, w.weight
        );
    }
    Ok(())
}

fn socket_path(cli: &Cli, cfg: Option<&Config>) -> PathBuf {
    cli.control_socket
        .clone()
        .or_else(|| cfg.map(|c| c.control_socket.clone()))
        .unwrap_or_else(|| lb_user::config::DEFAULT_CONTROL_SOCKET.into())
}

fn detach(cli: &Cli) -> Result<()> {
    sys::require_root("baton-lb detach")?;
    let cfg = Config::load(&cli.config).ok();
    let sock = socket_path(cli, cfg.as_ref());
    // A running daemon would keep writing maps that are about to disappear: stop it first.
    let asked = control::request(&sock, &Request::Shutdown {})?.is_some();
    if asked {
        tracing::info!(socket = %sock.display(), "asked the running baton-lb to exit");
    }
    // The pin directory's lock is free once no controller runs on it.
    let mut _lock = None;
    if cli.pin_dir.exists() {
        let start = Instant::now();
        loop {
            if let Some(l) = sys::try_lock_pin_dir(&cli.pin_dir)? {
                _lock = Some(l);
                break;
            }
            if !asked || start.elapsed() > Duration::from_secs(10) {
                anyhow::bail!(
                    "a baton-lb still runs on {} and did not stop through {}: stop it first (or pass its --control-socket)",
                    cli.pin_dir.display(),
                    sock.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let removed = dataplane::detach(&cli.pin_dir)?;
    if removed.is_empty() {
        println!(
            "nothing was pinned under {}: nothing to detach",
            cli.pin_dir.display()
        );
    } else {
        for p in &removed {
            println!("removed {}", p.display());
        }
        println!("XDP program detached; forwarding through Baton has stopped");
    }
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    sys::require_root("baton-lb")?;
    let mut cfg = Config::load(&cli.config)?;
    if let Some(m) = cli.xdp_mode {
        cfg.xdp_mode = m;
    }
    if let Some(s) = &cli.control_socket {
        cfg.control_socket = s.clone();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pin_dir_existed = cli.pin_dir.exists();
    let result = rt.block_on(async_run(cli, cfg));
    if result.is_err()
        && !pin_dir_existed
        && !cli.pin_dir.join(lb_user::pinned::LINK_PIN_NAME).exists()
    {
        // A first start that failed leaves no half-made pins behind.
        let _ = lb_user::pinned::unpin_all(&cli.pin_dir);
    }
    result
}

/// Re-reads the config and brings the maps in line with it (workers, VIPs, CID layout, health
/// settings), without touching the program or the link. What needs a restart is refused or named.
fn reload(
    cli: &Cli,
    ctl: &Arc<Mutex<Controller>>,
    attach: &dataplane::AttachInfo,
    socket: &std::path::Path,
    metrics: Option<std::net::SocketAddr>,
) -> Result<()> {
    let mut cfg = Config::load(&cli.config)?;
    if let Some(m) = cli.xdp_mode {
        cfg.xdp_mode = m;
    }
    if let Some(s) = &cli.control_socket {
        cfg.control_socket = s.clone();
    }
    if cfg.interface != attach.interface {
        anyhow::bail!(
            "`interface` changed from {} to {}: moving the program needs `baton-lb detach` and a new start",
            attach.interface,
            cfg.interface
        );
    }
    if cfg.control_socket != socket || cfg.metrics != metrics {
        tracing::warn!(
            "control.socket and control.metrics changes take effect at the next restart"
        );
    }
    let running_cluster = ctl.lock().unwrap().cfg.cluster.clone();
    if cfg.cluster != running_cluster {
        anyhow::bail!(
            "[cluster] changed: joining, leaving or changing a cluster needs a restart of baton-lb \
             (forwarding goes on through it)"
        );
    }
    let (held, known) = {
        let c = ctl.lock().unwrap();
        (c.hold_workers, c.cfg.workers.clone())
    };
    if cfg.cluster.is_some() {
        // A cluster node's workers come from etcd, not the file: keep the ones it follows.
        cfg.workers = known;
    }
    let maps = PinnedMaps::open(&cli.pin_dir)?;
    let mut next = tokio::task::block_in_place(|| Controller::new(cfg, maps, false))?;
    next.hold_workers = held;
    let mut c = ctl.lock().unwrap();
    next.health_changed = c.health_changed.take();
    *c = next;
    c.sync()
}

async fn async_run(cli: &Cli, cfg: Config) -> Result<()> {
    // Handlers first: a SIGHUP or SIGTERM during start-up must not kill us with the default action.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut hup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::hangup())?,
    );
    // Refuse early if another instance owns the socket (before touching any map).
    let socket_path = cfg.control_socket.clone();
    let listener = control::bind(&socket_path)?;
    let started = start(cli, cfg, listener).await;
    let shared = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&socket_path);
            return Err(e);
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); break }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT"); break }
            _ = shared.shutdown.notified() => break,
            _ = hup.recv() => match reload(cli, &shared.ctl, &shared.attach, &socket_path, shared.metrics) {
                Ok(()) => tracing::info!(config = %cli.config.display(), "SIGHUP: config reloaded"),
                Err(e) => tracing::error!("SIGHUP: reload failed, the running state is unchanged: {e:#}"),
            },
        }
    }
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!(
        "exiting; the XDP program stays attached and keeps forwarding (pinned under {}). `baton-lb detach` removes it",
        cli.pin_dir.display()
    );
    Ok(())
}

/// Everything from loading the object to serving: returns once baton-lb is running. The pin
/// directory lock and the loaded object live as long as the returned state.
async fn start(cli: &Cli, cfg: Config, listener: tokio::net::UnixListener) -> Result<Arc<Shared>> {
    sys::ensure_pin_dir(&cli.pin_dir)?;
    // Held until exit: one controller per pin directory, whatever control socket each one uses.
    let pin_lock = sys::try_lock_pin_dir(&cli.pin_dir)?.with_context(|| {
        format!(
            "another baton-lb is running on {} (it holds the pin directory's lock): stop it first",
            cli.pin_dir.display()
        )
    })?;
    let object = lb_user::object::try_bytes()
        .context("this baton-lb was built with AYA_BUILD_SKIP=1 and carries no XDP program: rebuild it without that")?;
    let mut dp = Dataplane::load(object, &cli.pin_dir)?;
    let logger = dp.take_logger();
    // Decide about the link before writing anything: a misconfigured second instance must not
    // overwrite the maps a running data plane uses.
    let plan = dp.plan(&cfg.interface)?;
    let fresh = !matches!(plan, dataplane::LinkPlan::Readopt { .. });
    let maps = PinnedMaps::open(&cli.pin_dir)?;
    let interface = cfg.interface.clone();
    let mode = cfg.xdp_mode;
    let metrics_addr = cfg.metrics;
    let socket_path = cfg.control_socket.clone();
    let cluster = cfg.cluster.clone();
    let mut ctl = tokio::task::block_in_place(|| Controller::new(cfg, maps, fresh))?;
    // A cluster node's workers come from etcd: until it has read them, the pinned ones route.
    ctl.hold_workers = cluster.is_some();
    let ctl = Arc::new(Mutex::new(ctl));
    if fresh {
        health::initial_round(&ctl).await;
    }
    ctl.lock()
        .unwrap()
        .sync()
        .context("writing the initial state into the maps failed")?;
    let attach = dp.attach(&interface, mode, plan)?;
    if attach.readopted {
        tracing::info!(
            interface = %attach.interface, mode = %attach.mode, link_id = attach.link_id, prog_id = attach.prog_id,
            "re-adopted the pinned XDP link: swapped the new program in without detaching"
        );
    }
    for w in ctl.lock().unwrap().status() {
        tracing::info!(worker = %w.name, server_id = w.server_id, mac = ?w.mac, tx = %w.tx_interface, healthy = w.healthy, slots = w.maglev_slots, "worker");
    }

    let shared = Arc::new(Shared {
        ctl: ctl.clone(),
        attach: attach.clone(),
        config_path: cli.config.clone(),
        pin_dir: cli.pin_dir.clone(),
        started: Instant::now(),
        shutdown: tokio::sync::Notify::new(),
        metrics: metrics_addr,
        keep: Mutex::new(vec![Box::new(dp), Box::new(pin_lock)]),
        migrations: Default::default(),
        cluster: Default::default(),
    });
    tokio::spawn(control::serve(listener, shared.clone()));
    if let Some(addr) = metrics_addr {
        tokio::spawn(metrics::serve(addr, shared.clone()));
    }
    tokio::spawn(health::run(ctl.clone()));
    if let Some(settings) = cluster {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        // Dropped with the shared state at exit: the follower stops then.
        shared.keep.lock().unwrap().push(Box::new(stop_tx));
        tokio::spawn(lb_user::cluster::run(
            settings,
            ctl.clone(),
            cli.pin_dir.clone(),
            shared.cluster.clone(),
            stop,
        ));
    }
    if let Some(logger) = logger {
        // aya-log records arrive through a ring buffer: flush it whenever it becomes readable.
        tokio::spawn(async move {
            // SAFETY: the logger owns its ring-buffer fd and keeps it open while the AsyncFd owns it.
            match unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            } {
                Ok(mut fd) => loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        break;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot poll the XDP program's log ring buffer")
                }
            }
        });
    }
    tracing::info!(
        interface = %attach.interface, mode = %attach.mode, pin_dir = %cli.pin_dir.display(),
        socket = %socket_path.display(), "baton-lb is running"
    );
    Ok(shared)
}
