//! `baton-worker --config worker.toml`: serves the configured service on every VIP, and (with
//! `control_socket`, `secrets` and `[peer]` set) takes part in live migrations.
//! `baton-worker gen-certs --out DIR --workers w1,w2`: CA, peer certificates, service certificate
//! and secrets for a deployment or a lab (docs/MIGRATION-FLOW.md).
use anyhow::Context;
use baton_worker::config::WorkerConfig;
use baton_worker::core::{CoreConfig, WorkerCore};
use baton_worker::io::{Inbound, spawn};
use baton_worker::udp::VipSockets;
use clap::{Parser, Subcommand};
use lb_common::cid::CidLayout;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "baton-worker", about = "Baton QUIC worker")]
struct Args {
    /// TOML configuration file (needed to run the worker)
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a CA, a peer-channel certificate per worker, the controller's client certificate
    /// (controller.pem, for [control_tls]), the VIP's service certificate and a fresh
    /// secrets.toml into DIR.
    GenCerts {
        #[arg(long)]
        out: std::path::PathBuf,
        /// Worker names, comma separated (each becomes its certificate's DNS name).
        #[arg(long, value_delimiter = ',', required = true)]
        workers: Vec<String>,
        /// DNS name in the service (VIP) certificate clients verify.
        #[arg(long, default_value = "baton.test")]
        service_name: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    if let Some(Cmd::GenCerts {
        out,
        workers,
        service_name,
    }) = args.cmd
    {
        for p in baton_worker::certs::generate(&out, &workers, &service_name)? {
            println!("wrote {}", p.display());
        }
        return Ok(());
    }
    let config_path = args
        .config
        .context("give --config worker.toml (or a subcommand; see --help)")?;
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config =
        WorkerConfig::parse(&text).with_context(|| format!("config {}", config_path.display()))?;
    // Every byte the services hold, all connections together (limits.memory_budget).
    let budget = baton_worker::limits::BufferBudget::new(config.limits.memory_budget);
    let service: Arc<dyn baton_worker::service::Service> = match config.service.as_str() {
        "demo" => Arc::new(baton_worker::demo::DemoService::new(
            config.limits.clone(),
            budget.clone(),
        )),
        "proxy" => {
            let proxy = baton_worker::http3::proxy::ProxyService::new(
                config.proxy.clone().context("[proxy] is required")?,
            )?;
            proxy.log_routes();
            Arc::new(proxy)
        }
        other => anyhow::bail!("unknown service {other:?} (known: demo, proxy)"),
    };
    let layout = CidLayout::new(config.cid_len, config.server_id_len)
        .map_err(|e| anyhow::anyhow!("CID layout: {e}"))?;
    let (certs, key) = baton_worker::load_tls(&config.cert, &config.key)?;
    let mut signals = StopSignals::install()?;
    // Claim the control socket first: a live worker that owns it stops us before we touch the
    // VIP; a stale file left by one that died is replaced (control::bind).
    let listener = match &config.control_socket {
        Some(c) if config.secrets.is_some() && config.peer.is_some() => {
            Some(baton_worker::control::bind(c)?)
        }
        _ => None,
    };
    // In a cluster: register before serving, so a worker whose server ID is held never serves.
    let registration = match &config.cluster {
        Some(cl) => {
            let record = worker_record(&config, cl);
            let cluster = connect_cluster(cl).await?;
            let lease = register(&cluster, &record, cl).await?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(keep_registered(
                cluster,
                record,
                cl.lease_ttl_s,
                lease,
                stopped,
            ));
            Some((stop, task))
        }
        None => None,
    };
    // From here on, leave through `shutdown` so the control socket file goes with us.
    let result = serve(
        &config,
        service,
        budget,
        layout,
        certs,
        key,
        listener,
        &mut signals,
    )
    .await;
    if let Some(c) = &config.control_socket {
        let _ = std::fs::remove_file(c);
    }
    if let Some((stop, task)) = registration {
        // LB nodes drop this worker now rather than when the lease would run out.
        let _ = stop.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    result
}

/// What this worker registers: its name, server ID, address, weight and control API.
fn worker_record(
    config: &WorkerConfig,
    cl: &baton_worker::config::ClusterConfig,
) -> baton_cluster::WorkerRecord {
    baton_cluster::WorkerRecord {
        name: config.name(),
        server_id: config.server_id,
        address: cl.address,
        weight: cl.weight,
        control: config.control_tls.as_ref().map(|t| t.listen.to_string()),
        // Checked when the config was parsed.
        encap: cl.record_encap(config.decap.as_ref()).ok().flatten(),
    }
}

async fn connect_cluster(
    cl: &baton_worker::config::ClusterConfig,
) -> anyhow::Result<baton_cluster::etcd::Cluster> {
    let prefix = baton_cluster::Prefix::new(&cl.prefix)?;
    Ok(baton_cluster::etcd::Cluster::connect(&cl.endpoints, prefix).await?)
}

/// Registers this worker in the cluster's etcd (`[cluster]`): its record under a lease kept
/// alive for as long as the process runs, its server ID claimed. Fails, naming the holder, if
/// another worker holds the ID.
async fn register(
    cluster: &baton_cluster::etcd::Cluster,
    record: &baton_cluster::WorkerRecord,
    cl: &baton_worker::config::ClusterConfig,
) -> anyhow::Result<baton_cluster::etcd::Lease> {
    let lease = cluster
        .register_worker(record, cl.lease_ttl_s)
        .await
        .context("registering in the cluster")?;
    tracing::info!(
        worker = %record.name,
        server_id = record.server_id,
        prefix = %cl.prefix,
        "registered in the cluster"
    );
    Ok(lease)
}

/// Keeps the registration while the worker runs: if etcd let the lease expire (unreachable for
/// longer than its TTL, which took the registration with it), registers again once etcd answers,
/// so LB nodes route new connections here again. Revokes the lease when `stop` turns true.
async fn keep_registered(
    cluster: baton_cluster::etcd::Cluster,
    record: baton_cluster::WorkerRecord,
    ttl: i64,
    mut lease: baton_cluster::etcd::Lease,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut pause = std::time::Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        if !lease.expired() {
            pause = std::time::Duration::from_millis(500);
            continue;
        }
        match cluster.register_worker(&record, ttl).await {
            Ok(l) => {
                tracing::info!(worker = %record.name, "registered in the cluster again after the lease expired");
                lease = l;
            }
            Err(e) => {
                tracing::warn!(worker = %record.name, "registering again after the lease expired: {e}; retrying");
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
    lease.revoke().await;
}

/// SIGINT and SIGTERM (systemd's stop signal) both stop the worker cleanly. The handlers are
/// installed when this is built, so build it before anything a signal could interrupt.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves with the name of the first stop signal received.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &WorkerConfig,
    service: Arc<dyn baton_worker::service::Service>,
    budget: Arc<baton_worker::limits::BufferBudget>,
    layout: CidLayout,
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    listener: Option<tokio::net::UnixListener>,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let mut socket = VipSockets::bind(&config.vips, config.port, config.socket_buffer)?;
    if let Some(decap) = config.decap.as_ref().filter(|d| d.enabled()) {
        let d = baton_worker::decap::Decapsulator::open(decap, &config.vips, config.port)?;
        tracing::info!(gue_port = ?decap.gue_port, ipip = decap.ipip, "receiving encapsulated datagrams");
        socket = socket.with_decap(d);
    }
    let socket = Arc::new(socket);
    for s in socket.sockets() {
        let (rcv, snd) = s.buffer_sizes();
        let vip = s.local_ip();
        tracing::info!(
            %vip,
            requested = config.socket_buffer,
            rcvbuf = rcv,
            sndbuf = snd,
            "VIP socket buffers (as the kernel reports them)"
        );
        if rcv < config.socket_buffer || snd < config.socket_buffer {
            tracing::warn!(
                %vip,
                requested = config.socket_buffer,
                rcvbuf = rcv,
                sndbuf = snd,
                "the kernel granted smaller VIP socket buffers than configured (raise net.core.rmem_max/wmem_max, or run with CAP_NET_ADMIN)"
            );
        }
    }
    let core = WorkerCore::new(
        CoreConfig {
            server_id: config.server_id,
            layout,
            certs,
            key,
            vips: config.vips.clone(),
            allow_mtud: !socket.may_fragment(),
            limits: config.limits.clone(),
        },
        service,
    )?;
    let addrs: Vec<SocketAddr> = config
        .vips
        .iter()
        .map(|&v| SocketAddr::new(v, config.port))
        .collect();
    tracing::info!(vips = ?addrs, server_id = config.server_id, "worker listening");
    // Shared by the control TLS listener (counts) and the metrics page (shows them).
    let control_tls_refusals = config
        .control_tls
        .as_ref()
        .map(|_| Arc::new(baton_worker::control::TlsRefusals::default()));
    let _metrics = match config.metrics {
        Some(addr) => {
            let listener = baton_worker::metrics::bind(addr).await?;
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
            let metrics = baton_worker::metrics::Metrics {
                sockets: socket.clone(),
                budget,
                endpoint: Default::default(),
                control_tls: control_tls_refusals.clone(),
            };
            Some(AbortOnDrop(tokio::spawn(baton_worker::metrics::serve(
                listener, metrics,
            ))))
        }
        None => None,
    };
    let (handle, task) = spawn(core, socket, Inbound::Socket);
    if let (Some(control), Some(secrets), Some(peer)) =
        (&config.control_socket, &config.secrets, &config.peer)
    {
        let secrets_path = secrets.clone();
        let secrets = baton_worker::secrets::Secrets::load(secrets)?;
        let (key_id, key) = secrets
            .snapshot_key
            .context("the secrets file has no snapshot_key/snapshot_key_id (workers need it)")?;
        let mut tokens = migration::MigrationTokenManager::new(
            migration::TokenConfig::default(),
            secrets.token_secret_id,
            secrets.token_secret,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        // The replay cache is in memory: refuse tokens a previous run may have used.
        tokens.refuse_issued_before(std::time::SystemTime::now());
        let pipeline =
            migration::SnapshotSealer::new(migration::EncryptionService::new(key_id, key));
        let (server, client) =
            baton_worker::migrate::peer_tls(&peer.ca, &peer.cert, &peer.key, &peer.workers)?;
        let mut endpoint = quinn::Endpoint::server(server, peer.listen)
            .with_context(|| format!("binding the peer channel on {}", peer.listen))?;
        endpoint.set_default_client_config(client);
        let ctx = baton_worker::migrate::Ctx::new(
            baton_worker::migrate::Identity {
                name: config.name(),
                server_id: u32::try_from(config.server_id)
                    .context("server_id must fit 32 bits to migrate")?,
                cid_layout: baton_protocol::worker::CidLayout {
                    cid_len: config.cid_len,
                    server_id_len: config.server_id_len,
                },
            },
            handle.clone(),
            tokens,
            pipeline,
            endpoint,
            peer.workers.clone(),
        )?;
        let listener = listener.context("control socket not bound")?;
        tokio::spawn(baton_worker::migrate::serve_peer(ctx.clone()));
        if let Some(tls) = &config.control_tls {
            let acceptor = baton_worker::control::tls_acceptor(tls)?;
            let tcp = tokio::net::TcpListener::bind(tls.listen)
                .await
                .with_context(|| format!("binding control_tls.listen {}", tls.listen))?;
            tracing::info!(listen = %tls.listen, clients = ?tls.clients, max_clients = tls.max_clients,
                "control API over mutual TLS");
            tokio::spawn(baton_worker::control::serve_tls(
                tcp,
                acceptor,
                tls.max_clients,
                ctx.clone(),
                control_tls_refusals.clone().unwrap_or_default(),
            ));
        }
        // SIGHUP re-reads secrets.toml into the key rings (rotation without a restart).
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        tokio::spawn(baton_worker::secrets::reload_on_sighup(
            secrets_path.clone(),
            hup,
            ctx.clone(),
        ));
        tokio::spawn(baton_worker::control::serve(listener, ctx));
        tracing::info!(name = %config.name(), control = %control.display(), peer = %peer.listen, "migrations enabled");
    }
    tokio::select! {
        _ = task => {}
        s = signals.recv() => tracing::info!(signal = s, "shutting down"),
    }
    drop(handle);
    Ok(())
}
