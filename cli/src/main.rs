//! `baton`: the operator CLI. Reads (and, for overrides, writes) the pinned maps directly, and asks
//! the running baton-lb over its control socket for what only it knows (names, health, mode).
//! `route` runs the XDP program itself on the pinned maps (`lb_user::simulate`).
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use lb_common::{MAGLEV_TABLE_SIZE, TX_SAME_IFACE, WorkerEntry};
use lb_user::config::format_mac;
use lb_user::control::{self, DaemonStatus, Reply, Request};
use lb_user::controller::{WorkerStatus, hex, parse_hex};
use lb_user::dataplane::AttachedMode;
use lb_user::overrides::OverrideWriter;
use lb_user::pinned::{LINK_PIN_NAME, PinnedMaps};
use lb_user::sys;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "Operate a Baton QUIC load balancer: status, workers, routing decisions, CID overrides",
    long_about = "Operate a Baton QUIC load balancer.\n\n\
Works on the maps baton-lb pinned under --pin-dir (what the XDP program really uses), and asks \
the running baton-lb over its control socket for worker names, health and the attach mode. \
`baton route` runs the XDP program itself on a crafted packet (BPF_PROG_TEST_RUN) with those maps \
and private counters, so its answer is the data plane's. Needs root. Output is for people by default; --json prints one JSON document for scripts.",
    after_help = "Examples:\n  baton conns\n  baton migrate <conn> --to w2\n  baton drain w1\n  baton status\n  baton workers --json\n  baton route 01000112345678ab\n  baton override set 01000112345678ab w2\n  baton override del 01000112345678ab"
)]
struct Cli {
    /// bpffs directory baton-lb pinned its maps and link in.
    #[arg(long, env = "BATON_PIN_DIR", default_value = lb_user::DEFAULT_PIN_DIR, global = true)]
    pin_dir: PathBuf,
    /// baton-lb's control socket.
    #[arg(long, env = "BATON_SOCKET", default_value = lb_user::config::DEFAULT_CONTROL_SOCKET, global = true)]
    control_socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Where the workers' control sockets and the secrets file are (for conns, migrate, drain).
    #[arg(long, env = "BATON_MIGRATION_CONFIG", default_value = baton_cli::driver::DEFAULT_MIGRATION_CONFIG, global = true)]
    migration_config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The attached program (interface, mode, ids) and the data plane's counters, summed over CPUs.
    Status,
    /// The workers the data plane knows: slot, server ID, MAC, tx path, health, Maglev share.
    Workers,
    /// Which worker a short-header packet with this destination CID reaches, and why
    /// (exact-CID override, the server ID in the CID, or Maglev hashing). Runs the XDP program
    /// itself on such a packet (BPF_PROG_TEST_RUN) with the live maps, so the answer is the data
    /// plane's; the live counters do not move.
    Route {
        /// The connection ID in hex, e.g. 0100011122334455.
        cid: String,
        /// Ask about a QUIC v1 Initial with this DCID instead (a DCID of another length than
        /// the configured one always is: only a long header carries it).
        #[arg(long)]
        initial: bool,
        /// The VIP and port the packet goes to, e.g. 192.0.2.1:443 or [2001:db8::1]:443
        /// (default: the first enabled VIP).
        #[arg(long)]
        vip: Option<std::net::SocketAddr>,
    },
    /// Exact-CID overrides: send one connection ID to a chosen worker (migrated connections).
    Override {
        #[command(subcommand)]
        action: OverrideCmd,
    },
    /// Every connection on every worker: its key (the `conn` to migrate), worker, state, CIDs.
    Conns,
    /// Check the migration machinery: every worker answers, speaks this protocol version and
    /// issues the LB's CID layout, accepts this controller's tokens, holds the snapshot keys the
    /// others seal with, and reaches its peers. Exits 1 on any problem, naming it.
    Check,
    /// Move one live connection to another worker (zero downtime). Prints the error kind and
    /// exits 1 if it failed; a failure before the LB flip is rolled back.
    Migrate {
        /// The connection key from `baton conns`.
        conn: String,
        /// Target worker name (from the migration config).
        #[arg(long)]
        to: String,
        /// How long the source may wait for the connection to quiesce before giving up (ms).
        #[arg(long, default_value_t = 2000)]
        quiesce_timeout_ms: u64,
        #[command(flatten)]
        faults: baton_cli::driver::Faults,
    },
    /// Finish or roll back the migrations of a `baton` that died mid-way (cluster only). Each
    /// migration in flight is recorded in etcd under its driver's lease; once that lease ended,
    /// this asks both workers how far it got: a committed one is flipped (if it was not), waited
    /// for on every LB node and its source released; one that never committed only loses its
    /// record. `baton migrate` and `baton drain` do this first by themselves. Exits 1 if any is
    /// still undecided (run it again) or failed.
    Recover,
    /// Move every connection off WORKER, several at a time, with progress and a summary.
    Drain {
        worker: String,
        /// Target worker (default: spread over all the other workers).
        #[arg(long)]
        to: Option<String>,
        /// Migrations in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// How long each source may wait for its connection to quiesce (ms). An HTTP/3
        /// connection waits here for its requests in flight to finish.
        #[arg(long, default_value_t = 2000)]
        quiesce_timeout_ms: u64,
        /// Times a connection still busy with requests after a whole quiesce timeout
        /// (`requests_in_flight`) is tried again, after every other connection was tried.
        #[arg(long, default_value_t = 3)]
        busy_retries: usize,
    },
}

#[derive(Subcommand)]
enum OverrideCmd {
    /// Route CID to WORKER (a worker name, or its server ID as a number).
    Set {
        /// The connection ID in hex; exactly the configured cid.length bytes.
        cid: String,
        /// A worker name from `baton workers` (needs baton-lb running) or a server ID (decimal or 0x-hex).
        worker: String,
    },
    /// Remove the override for CID (it routes by its server ID again).
    Del {
        /// The connection ID in hex.
        cid: String,
    },
    /// List every override.
    List,
}

fn main() {
    // Behave like other CLI tools in pipelines (`baton status | head`): exit quietly on a closed pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    // Warnings (a failed release, an override that could not be removed) on stderr; BATON_LOG
    // (e.g. `info`: each migration's phases) for more. stdout stays the answer (`--json`).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Err(e) = run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    sys::require_root("baton")?;
    match &cli.command {
        Cmd::Status => status(cli),
        Cmd::Workers => workers(cli),
        Cmd::Route { cid, initial, vip } => route(cli, cid, *initial, *vip),
        Cmd::Override { action } => match action {
            OverrideCmd::Set { cid, worker } => override_set(cli, cid, worker),
            OverrideCmd::Del { cid } => override_del(cli, cid),
            OverrideCmd::List => override_list(cli),
        },
        Cmd::Conns => conns(cli),
        Cmd::Check => check(cli),
        Cmd::Recover => recover(cli),
        Cmd::Migrate {
            conn,
            to,
            quiesce_timeout_ms,
            faults,
        } => migrate(cli, conn, to, *quiesce_timeout_ms, *faults),
        Cmd::Drain {
            worker,
            to,
            concurrency,
            quiesce_timeout_ms,
            busy_retries,
        } => drain(
            cli,
            worker,
            to.as_deref(),
            *concurrency,
            *quiesce_timeout_ms,
            *busy_retries,
        ),
    }
}

fn orchestrator(cli: &Cli) -> Result<baton_cli::driver::Orchestrator> {
    let cfg = baton_cli::driver::MigrationConfig::load(&cli.migration_config)?;
    baton_cli::driver::Orchestrator::new(cfg, &cli.control_socket, &cli.pin_dir)
}

fn check(cli: &Cli) -> Result<()> {
    let o = orchestrator(cli)?;
    let r = o.check();
    if cli.json {
        print_json(&r)?;
    } else {
        match r.lb_layout {
            Some(l) => println!(
                "load balancer: routes {l}; tokens issued with secret id {}",
                r.token_secret_id
            ),
            None => println!(
                "load balancer: CID layout unknown (no baton-lb answers and no pinned maps); tokens issued with secret id {}",
                r.token_secret_id
            ),
        }
        for w in &r.workers {
            let what = match (&w.info, &w.health) {
                (Some(i), Some(h)) => format!(
                    "server ID {}, {}, seals with key {}, {} of {} peers reachable",
                    i.server_id,
                    i.cid,
                    h.snapshot_key_id,
                    h.peers.iter().filter(|p| p.error.is_none()).count(),
                    h.peers.len()
                ),
                _ => "unreachable".into(),
            };
            let verdict = if w.problems.is_empty() {
                "ok"
            } else {
                "PROBLEM"
            };
            println!("{:<10} {verdict:<8} {what}", w.worker);
            for p in &w.problems {
                println!("           - {p}");
            }
        }
        for p in &r.problems {
            println!("PROBLEM: {p}");
        }
        println!(
            "{}",
            if r.ok {
                "migrations can run between every pair of workers"
            } else {
                "migrations will fail where a problem is listed"
            }
        );
    }
    if !r.ok {
        std::process::exit(1);
    }
    Ok(())
}

fn conns(cli: &Cli) -> Result<()> {
    let o = orchestrator(cli)?;
    let (rows, down) = o.conns();
    // A worker that is running but did not answer (stalled, timed out, bad answer) must never look
    // like a worker with no connections: print what the others answered, say the list is
    // incomplete and which workers are missing, and exit 1. A worker that is not running at all
    // (no one listens on its control socket) holds no connections: a warning, the list is complete.
    let mut silent = Vec::new();
    for (w, f) in &down {
        if f.not_running {
            eprintln!(
                "warning: worker {w} is not running, so it holds no connections: {}",
                f.failure.message
            );
        } else {
            eprintln!(
                "warning: worker {w} did not answer ({}): {}",
                f.failure.kind, f.failure.message
            );
            silent.push(w.as_str());
        }
    }
    let incomplete = || {
        if !silent.is_empty() {
            eprintln!(
                "warning: the list is INCOMPLETE: {} of {} workers did not answer ({}); their connections are missing",
                silent.len(),
                o.worker_names().len(),
                silent.join(", ")
            );
            std::process::exit(1);
        }
    };
    if cli.json {
        print_json(&rows)?;
        incomplete();
        return Ok(());
    }
    println!(
        "{:<42} {:<10} {:<10} {:<24} {:>9}  CIDS",
        "CONN", "WORKER", "STATE", "CLIENT", "OVERRIDES"
    );
    for r in &rows {
        println!(
            "{:<42} {:<10} {:<10} {:<24} {:>9}  {}",
            r.conn,
            r.worker,
            r.state,
            r.remote,
            r.overrides,
            join(&r.cids)
        );
    }
    println!("{} connections", rows.len());
    incomplete();
    Ok(())
}

fn recover(cli: &Cli) -> Result<()> {
    use baton_cli::driver::RecoveryOutcome as O;
    let o = orchestrator(cli)?;
    let rows = o.recover()?;
    let settled = rows
        .iter()
        .all(|r| !matches!(r.outcome, O::Undecided | O::Failed));
    if cli.json {
        print_json(&json!({"ok": settled, "migrations": rows}))?;
    } else {
        for r in &rows {
            println!("{r}");
        }
        println!("{} migrations in flight in etcd", rows.len());
    }
    if !settled {
        std::process::exit(1);
    }
    Ok(())
}

/// What `migrate` and `drain` do first in a cluster: recover the migrations of drivers that
/// died, saying so on stderr (stdout stays the command's own answer).
fn recover_first(o: &baton_cli::driver::Orchestrator) {
    use baton_cli::driver::RecoveryOutcome as O;
    if !o.in_cluster() {
        return;
    }
    match o.recover() {
        Ok(rows) => {
            for r in rows.iter().filter(|r| r.outcome != O::DriverAlive) {
                let outcome = serde_json::to_value(r.outcome).unwrap_or_default();
                eprintln!(
                    "recovered migration {} of connection {} ({} -> {}), whose driver died: {}{}",
                    r.migration_id,
                    r.conn.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
                    r.from,
                    r.to,
                    outcome.as_str().unwrap_or("?"),
                    r.detail
                        .as_ref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                );
            }
        }
        // The command's own etcd calls report it properly.
        Err(f) => tracing::debug!("looking for migrations to recover: {}", f.message),
    }
}

fn migrate(
    cli: &Cli,
    conn: &str,
    to: &str,
    quiesce_ms: u64,
    faults: baton_cli::driver::Faults,
) -> Result<()> {
    let mut o = match orchestrator(cli) {
        Ok(o) => o,
        // `--json` promises a JSON answer for every failure, also one before any worker was asked
        // (an unreadable config, or a baton-lb that went away while answering): nothing moved.
        Err(e) if cli.json => {
            let kind = e
                .downcast_ref::<baton_protocol::Failure>()
                .map_or(baton_protocol::ErrorKind::Setup, |f| f.kind);
            print_json(
                &json!({"ok": false, "conn": conn, "to": to, "kind": kind, "error": format!("{e:#}")}),
            )?;
            std::process::exit(1);
        }
        Err(e) => return Err(e),
    };
    o.quiesce_timeout = std::time::Duration::from_millis(quiesce_ms);
    o.faults = faults;
    recover_first(&o);
    let result = conn
        .parse::<baton_protocol::Cid>()
        .map_err(|e| {
            baton_protocol::Failure::new(
                baton_protocol::ErrorKind::Config,
                format!("{conn:?} is not a connection key ({e}); see `baton conns`"),
            )
        })
        .and_then(|c| o.locate(&c).and_then(|from| o.migrate(&c, &from, to)));
    match result {
        Ok(r) => {
            let left = o.retire(std::slice::from_ref(&r), std::time::Duration::from_secs(5));
            if cli.json {
                let mut v = serde_json::to_value(&r)?;
                v["ok"] = json!(true);
                v["phase"] = json!(baton_orchestrator::Phase::Completed);
                v["overrides_left"] = json!(left);
                return print_json(&v);
            }
            println!(
                "migrated {} {} -> {} in {:.1} ms (freeze {:.1} ms, snapshot {} bytes, {} CIDs flipped)",
                r.conn,
                r.from,
                r.to,
                r.total_ms,
                r.freeze_ms,
                r.snapshot_bytes,
                r.cids.len()
            );
            if left.is_empty() {
                println!("old CIDs retired: overrides removed");
            } else {
                println!(
                    "{} old CIDs still in use: their overrides stay ({})",
                    left.len(),
                    join(&left)
                );
            }
            Ok(())
        }
        Err(f) => {
            if cli.json {
                print_json(
                    &json!({"ok": false, "phase": baton_orchestrator::Phase::Failed, "conn": conn, "to": to, "kind": f.kind, "error": f.message}),
                )?;
                std::process::exit(1);
            }
            bail!("migration failed ({}): {}", f.kind, f.message)
        }
    }
}

fn drain(
    cli: &Cli,
    worker: &str,
    to: Option<&str>,
    concurrency: usize,
    quiesce_ms: u64,
    busy_retries: usize,
) -> Result<()> {
    let mut o = orchestrator(cli)?;
    o.quiesce_timeout = std::time::Duration::from_millis(quiesce_ms);
    recover_first(&o);
    let json_out = cli.json;
    let progress = move |done: usize,
                         total: usize,
                         r: &std::result::Result<
        baton_cli::driver::Report,
        baton_cli::driver::Failure,
    >| {
        if let Err(f) = r {
            eprintln!("[{done}/{total}] failed ({}): {}", f.kind, f.message);
        } else if !json_out && (done.is_multiple_of(25) || done == total) {
            eprintln!("[{done}/{total}] migrated");
        }
    };
    let retry = baton_cli::driver::BusyRetry {
        retries: busy_retries,
        ..Default::default()
    };
    let s = baton_cli::driver::drain(&o, worker, to, concurrency, retry, &progress)?;
    if cli.json {
        print_json(&s)?;
    } else {
        println!(
            "drained {}: {} of {} connections moved, {} failed, in {:.0} ms ({:.0} connections/s); old CIDs retired after {:.0} ms, {} overrides left",
            s.worker,
            s.moved,
            s.total,
            s.failed,
            s.moved_ms,
            s.moved as f64 / (s.moved_ms / 1000.0).max(1e-9),
            s.total_ms,
            s.overrides_left
        );
        println!(
            "  per migration: {:.1} ms median, {:.1} ms p99 (of which the freeze: {:.1} ms median, {:.1} ms p99)",
            s.migration_ms_p50, s.migration_ms_p99, s.freeze_ms_p50, s.freeze_ms_p99
        );
        for (kind, n) in &s.errors {
            println!("  {n} failed with {kind}");
        }
        if s.retried > 0 {
            println!(
                "  {} connections had requests in flight and were tried again: {} moved, {} still busy{}",
                s.retried,
                s.retried_moved,
                s.busy.len(),
                if s.busy.is_empty() {
                    String::new()
                } else {
                    let busy: Vec<String> = s.busy.iter().map(|c| c.to_string()).collect();
                    format!(" ({}; they stay on {})", busy.join(", "), s.worker)
                }
            );
        }
    }
    if s.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// The running baton-lb's status, for what only it knows (names, health, mode). `None` when no
/// daemon answers: every read-only command then answers from the pinned maps, saying why.
fn daemon(cli: &Cli) -> Option<DaemonStatus> {
    match control::ask(&cli.control_socket, &Request::Status {}) {
        Ok(Reply::Answered(v)) => serde_json::from_value(v).ok(),
        Ok(Reply::NotRunning) => None,
        Ok(Reply::WentAway(why)) => {
            eprintln!("note: {why}; answering from the pinned maps");
            None
        }
        Err(e) => {
            eprintln!("warning: {e}; answering from the pinned maps");
            None
        }
    }
}

fn open_maps(cli: &Cli) -> Result<PinnedMaps> {
    PinnedMaps::open(&cli.pin_dir)
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn status(cli: &Cli) -> Result<()> {
    let link = sys::pinned_link_info(&cli.pin_dir.join(LINK_PIN_NAME))?;
    let maps = open_maps(cli).map_err(|e| {
        if link.is_none() {
            e.context("nothing is attached (no pinned link): start baton-lb")
        } else {
            e
        }
    })?;
    let lbc = maps.lb_config()?;
    let stats = maps.stats()?;
    let d = daemon(cli);
    let prog_name = link.and_then(|l| {
        aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == l.prog_id)
            .and_then(|p| p.name_as_str().map(str::to_string))
    });
    let local = local_interface(link);
    let interface = d
        .as_ref()
        .map(|d| d.interface.clone())
        .or_else(|| local.as_ref().map(|(name, _)| name.clone()))
        .unwrap_or_else(|| {
            link.map(|l| format!("ifindex {} (another network namespace)", l.ifindex))
                .unwrap_or_default()
        });
    // The daemon knows the mode; without it, ask the kernel if the interface is visible here.
    let mode = d.as_ref().map(|d| d.mode.clone()).or_else(|| {
        local
            .as_ref()
            .map(|(_, m)| *m)
            .filter(|m| *m != AttachedMode::Unknown)
            .map(|m| m.to_string())
    });
    // Which derived array mirrors the program uses instead of hash lookups (lb_common::fastpath).
    let fastpath = maps.fastpath.as_ref().map(|fp| {
        use lb_common::fastpath::{FP_OVERRIDE_COUNTS, FP_SERVER_ID_TABLE, FP_VIP_TABLE};
        let st = fp.state();
        let layout_ok = st.cid_len == lbc.cid_len && st.server_id_len == lbc.server_id_len;
        vec![
            ("vip_table", st.flags & FP_VIP_TABLE != 0),
            (
                "server_id_table",
                st.flags & FP_SERVER_ID_TABLE != 0 && layout_ok,
            ),
            (
                "override_counts",
                st.flags & FP_OVERRIDE_COUNTS != 0 && layout_ok,
            ),
        ]
    });
    if cli.json {
        let counters: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(s, v)| (s.name().to_string(), json!(v)))
            .collect();
        return print_json(&json!({
            "attached": link.is_some(),
            "interface": interface,
            "mode": mode,
            "program": prog_name,
            "prog_id": link.map(|l| l.prog_id),
            "link_id": link.map(|l| l.id),
            "pin_dir": cli.pin_dir,
            "ready": lbc.ready != 0,
            "cid_len": lbc.cid_len,
            "server_id_len": lbc.server_id_len,
            "maglev_size": lbc.maglev_size,
            "fastpath": fastpath.as_ref().map(|v| {
                v.iter().map(|(n, on)| (n.to_string(), json!(on))).collect::<serde_json::Map<String, serde_json::Value>>()
            }),
            "daemon": d.as_ref().map(|d| json!({"pid": d.pid, "uptime_secs": d.uptime_secs, "config": d.config, "readopted": d.readopted})),
            "counters": counters,
        }));
    }
    match link {
        Some(l) => println!(
            "program   {} (prog id {}, link id {}) on {} in {} mode",
            prog_name.as_deref().unwrap_or("?"),
            l.prog_id,
            l.id,
            interface,
            mode.as_deref().unwrap_or("unknown (baton-lb not running)")
        ),
        None => println!(
            "program   NOT ATTACHED (maps are pinned under {} but no link is)",
            cli.pin_dir.display()
        ),
    }
    match &d {
        Some(d) => println!(
            "daemon    baton-lb pid {} up {}s, config {}",
            d.pid,
            d.uptime_secs,
            d.config.display()
        ),
        None => println!("daemon    not running (forwarding continues on the pinned program)"),
    }
    println!(
        "tables    {} (CIDs {} bytes, server ID {} bytes, Maglev {} slots)",
        if lbc.ready != 0 {
            "ready"
        } else {
            "NOT READY: every packet passes"
        },
        lbc.cid_len,
        lbc.server_id_len,
        lbc.maglev_size
    );
    if let Some(parts) = &fastpath {
        let on: Vec<&str> = parts
            .iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        println!(
            "fast path {}",
            if on.is_empty() {
                "off (hash maps only)".to_string()
            } else {
                on.join(", ")
            }
        );
    }
    println!("counters  (summed over CPUs)");
    for (s, v) in stats {
        println!("  {:<18} {v}", s.name());
    }
    Ok(())
}

#[derive(Serialize)]
struct WorkerRow {
    index: u32,
    name: Option<String>,
    server_id: u64,
    mac: String,
    tx: String,
    in_use: bool,
    healthy: bool,
    maglev_slots: u32,
    address: Option<String>,
    /// "none" (layer 2), or the encapsulation its datagrams get (`BATON_WORKER_ENCAP`).
    encap: String,
}

/// One line for a `BATON_WORKER_ENCAP` entry: mode, outer source > destination, MTU.
fn describe_encap(e: &lb_common::encap::EncapEntry) -> String {
    use lb_common::encap::{ENCAP_GUE, ENCAP_IPIP, ENCAP_NONE};
    let addr = |b: &[u8; 16]| -> std::net::IpAddr {
        if e.family == lb_common::AF_INET6 {
            std::net::Ipv6Addr::from(*b).into()
        } else {
            std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
        }
    };
    let (src, dst) = (addr(&e.src), addr(&e.dst));
    match e.mode {
        ENCAP_NONE => "none".into(),
        ENCAP_IPIP => format!("ipip {src} > {dst} mtu {}", e.mtu),
        ENCAP_GUE => format!("gue {src} > {dst}:{} mtu {}", e.gue_port, e.mtu),
        m => format!("unknown mode {m}"),
    }
}

/// The interface the pinned link is attached to, if it is in *this* network namespace. A link
/// only records an ifindex, which may name an unrelated interface here when baton-lb runs in
/// another namespace; the program attached to it must be the link's to count.
fn local_interface(link: Option<sys::LinkInfo>) -> Option<(String, AttachedMode)> {
    let l = link?;
    let name = sys::if_indextoname(l.ifindex)?;
    let (mode, prog) = lb_user::dataplane::query_xdp(&name);
    (prog == Some(l.prog_id)).then_some((name, mode))
}

fn worker_rows(cli: &Cli, maps: &PinnedMaps) -> Result<Vec<WorkerRow>> {
    // Devmap ifindexes can only be named here if the data plane lives in this namespace.
    let same_netns =
        local_interface(sys::pinned_link_info(&cli.pin_dir.join(LINK_PIN_NAME))?).is_some();
    let d = daemon(cli);
    let by_index: std::collections::HashMap<u32, WorkerStatus> = d
        .map(|d| d.workers.into_iter().map(|w| (w.index, w)).collect())
        .unwrap_or_default();
    let lbc = maps.lb_config()?;
    let mut slots = std::collections::HashMap::<u32, u32>::new();
    if lbc.maglev_size > 0 && by_index.is_empty() {
        // No daemon to ask: count the table ourselves.
        for i in 0..lbc.maglev_size.min(MAGLEV_TABLE_SIZE) {
            *slots.entry(maps.maglev.get(&i, 0)?).or_default() += 1;
        }
    }
    Ok(maps
        .workers()?
        .into_iter()
        .map(|(i, e): (u32, WorkerEntry)| {
            let ds = by_index.get(&i);
            WorkerRow {
                index: i,
                name: ds.map(|w| w.name.clone()),
                server_id: e.server_id,
                mac: format_mac(&e.mac),
                tx: if e.tx_port == TX_SAME_IFACE {
                    "XDP_TX".into()
                } else {
                    let ifname = ds.map(|w| w.tx_interface.clone()).or_else(|| {
                        let ifindex = maps.tx_ports.get(e.tx_port, 0).ok()?.if_index;
                        Some(if same_netns {
                            sys::if_indextoname(ifindex)
                                .unwrap_or_else(|| format!("ifindex {ifindex}"))
                        } else {
                            format!("ifindex {ifindex}")
                        })
                    });
                    format!(
                        "redirect devmap[{}] {}",
                        e.tx_port,
                        ifname.unwrap_or_default()
                    )
                },
                in_use: e.flags & lb_common::WORKER_IN_USE != 0,
                healthy: e.flags & lb_common::WORKER_HEALTHY != 0,
                maglev_slots: ds
                    .map(|w| w.maglev_slots)
                    .unwrap_or_else(|| slots.get(&i).copied().unwrap_or(0)),
                address: ds.map(|w| w.address.clone()),
                encap: maps
                    .worker_encap(i)
                    .map(|e| describe_encap(&e))
                    .unwrap_or_else(|e| format!("unreadable: {e}")),
            }
        })
        .collect())
}

fn workers(cli: &Cli) -> Result<()> {
    let maps = open_maps(cli)?;
    let rows = worker_rows(cli, &maps)?;
    if cli.json {
        return print_json(&rows);
    }
    println!(
        "{:<5} {:<12} {:>10} {:<17} {:<16} {:<8} {:>7}  TX",
        "SLOT", "NAME", "SERVER_ID", "MAC", "ADDRESS", "HEALTH", "MAGLEV"
    );
    for r in rows {
        println!(
            "{:<5} {:<12} {:>10} {:<17} {:<16} {:<8} {:>6.1}%  {}",
            r.index,
            r.name.as_deref().unwrap_or("-"),
            r.server_id,
            r.mac,
            r.address.as_deref().unwrap_or("-"),
            if r.healthy { "healthy" } else { "DOWN" },
            100.0 * r.maglev_slots as f64 / MAGLEV_TABLE_SIZE as f64,
            if r.encap == "none" {
                r.tx
            } else {
                format!("{} ({})", r.tx, r.encap)
            }
        );
    }
    Ok(())
}

fn parse_cid(s: &str) -> Result<Vec<u8>> {
    let cid = parse_hex(s)
        .with_context(|| format!("{s:?} is not a hex connection ID (e.g. 0100011122334455)"))?;
    if cid.len() > lb_common::MAX_CID_LEN {
        bail!(
            "a QUIC connection ID is at most 20 bytes; {s:?} is {}",
            cid.len()
        );
    }
    Ok(cid)
}

fn route(cli: &Cli, cid_hex: &str, initial: bool, vip: Option<std::net::SocketAddr>) -> Result<()> {
    let cid = parse_cid(cid_hex)?;
    let object = lb_user::object::try_bytes().ok_or_else(|| {
        anyhow::anyhow!(
            "this baton was built with AYA_BUILD_SKIP=1: it embeds no XDP program to ask (rebuild without it)"
        )
    })?;
    let q = lb_user::simulate::RouteQuery { cid, initial, vip };
    let report = lb_user::simulate::route(object, &cli.pin_dir, &q)?;
    let names = names_by_index(cli);
    let mut ans = report.answer;
    ans.worker = ans.worker_index.and_then(|i| names.get(&i).cloned());
    // On stderr in both modes: e.g. that the attached program is another build.
    for n in &report.notes {
        eprintln!("{n}");
    }
    if cli.json {
        return print_json(&ans);
    }
    match ans.worker_index {
        Some(i) => println!(
            "{} -> worker {} (slot {i}, server ID {}, MAC {}) by {}: {}",
            ans.cid,
            ans.worker.as_deref().unwrap_or("?"),
            ans.server_id.unwrap_or(0),
            ans.mac.as_deref().unwrap_or("?"),
            ans.reason,
            ans.detail
        ),
        None if ans.reason == "pass" => println!("{} -> passed: {}", ans.cid, ans.detail),
        None => println!("{} -> dropped: {}", ans.cid, ans.detail),
    }
    Ok(())
}

/// CIDs as the text lists show them: hex, comma-separated.
fn join(cids: &[baton_protocol::Cid]) -> String {
    cids.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn names_by_index(cli: &Cli) -> std::collections::HashMap<u32, String> {
    daemon(cli)
        .map(|d| d.workers.into_iter().map(|w| (w.index, w.name)).collect())
        .unwrap_or_default()
}

/// A worker name (via the daemon) or a server ID (decimal or 0x-hex, via the maps) -> slot.
fn resolve_worker(cli: &Cli, maps: &PinnedMaps, worker: &str) -> Result<u32> {
    if let Some(d) = daemon(cli) {
        if let Some(w) = d.workers.iter().find(|w| w.name == worker) {
            return Ok(w.index);
        }
    }
    let sid = if let Some(h) = worker.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        worker.parse().ok()
    };
    if let Some(sid) = sid {
        if let Ok(w) = maps
            .server_ids
            .get(&lb_common::ServerIdKey { server_id: sid }, 0)
        {
            return Ok(w.worker);
        }
    }
    bail!(
        "no worker {worker:?}: give a worker name (needs baton-lb running, see `baton workers`) or a server ID \
         that `baton workers` lists"
    )
}

fn override_set(cli: &Cli, cid_hex: &str, worker: &str) -> Result<()> {
    let cid = parse_cid(cid_hex)?;
    let idx = resolve_worker(cli, &open_maps(cli)?, worker)?;
    OverrideWriter::new(&cli.control_socket, &cli.pin_dir).set(&cid, idx)?;
    if cli.json {
        return print_json(&json!({"cid": hex(&cid), "worker": worker, "worker_index": idx}));
    }
    println!("{} -> {worker} (slot {idx})", hex(&cid));
    Ok(())
}

fn override_del(cli: &Cli, cid_hex: &str) -> Result<()> {
    let cid = parse_cid(cid_hex)?;
    let (removed, _) = OverrideWriter::new(&cli.control_socket, &cli.pin_dir).remove(&cid)?;
    if !removed {
        bail!("there is no override for {}", hex(&cid));
    }
    if cli.json {
        return print_json(&json!({"cid": hex(&cid), "deleted": true}));
    }
    println!("override for {} removed", hex(&cid));
    Ok(())
}

fn override_list(cli: &Cli) -> Result<()> {
    let maps = open_maps(cli)?;
    let names = names_by_index(cli);
    let list = maps.overrides()?;
    if cli.json {
        let v: Vec<_> = list
            .iter()
            .map(|(k, w)| json!({"cid": hex(k.as_slice()), "worker_index": w.worker, "worker": names.get(&w.worker)}))
            .collect();
        return print_json(&v);
    }
    if list.is_empty() {
        println!("no overrides");
    }
    for (k, w) in list {
        println!(
            "{} -> {} (slot {})",
            hex(k.as_slice()),
            names.get(&w.worker).map(String::as_str).unwrap_or("?"),
            w.worker
        );
    }
    Ok(())
}
