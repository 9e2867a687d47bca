//! `cargo xtask demo`: the mission end to end on real processes in the netns lab.
//!
//! Brings the lab up (`cargo xtask lab up`), makes certificates, secrets and worker configs under
//! [`STATE_DIR`], starts `baton-lb` (XDP on the LB namespace's client-facing veth) and two
//! `baton-worker`s (one per worker namespace), runs `baton-load` in the client namespace, and
//! while the load runs moves every connection from w1 to w2 and back, `--rounds` times, with
//! `baton migrate`. Then it stops the load, checks what the client saw and prints a report ending
//! with the `RESULT ...` line. Exits non-zero if anything failed. Tears everything down unless
//! `--keep` (then `cargo xtask demo --down` does). `--rtt`, `--loss` and the other path options
//! go to baton-load, which emulates that path at the client (the lab's veth is ~0.1 ms, lossless).
//! `--http3` runs the same scenario with HTTP/3 instead of the demo protocol ([`http3`]).
//! `--lb-nodes 2` runs it across the LB nodes of a cluster on etcd ([`cluster`]).
pub(crate) mod cluster;
mod http3;

use crate::lab;
use crate::util::{cargo, require_root, workspace_root};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Configs, certificates, sockets, logs and pid files of a demo run.
pub const STATE_DIR: &str = "/run/baton/lab";
pub(crate) const LB_SOCKET: &str = "/run/baton/baton.sock";
pub(crate) const PIN_DIR: &str = "/sys/fs/bpf/baton";
pub(crate) const SERVICE_NAME: &str = "baton.lab";
/// How many more times a connection busy with requests is tried in a round.
const BUSY_RETRIES: usize = 5;
pub(crate) const WORKERS: [(&str, &str, u64, &str); 2] = [
    ("w1", "baton-w1", 1, "10.200.11.2:4470"),
    ("w2", "baton-w2", 2, "10.200.12.2:4470"),
];

#[derive(clap::Args)]
pub struct Options {
    /// Concurrent client connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Migration rounds; each moves every connection on w1 to w2, then every connection back to w1.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Shortest time the load runs, in seconds (it runs on until the migrations are done).
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Seconds of plain load before the first and after the last migration.
    #[arg(long, default_value_t = 2)]
    pub settle: u64,
    /// Migrations run at the same time (parallel `baton migrate` commands).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub request_size: usize,
    /// Pause between a request's answer and the next request on a connection, in ms. The load is
    /// closed-loop: more connections or a shorter pause than the machine can serve shows up as
    /// stalls that have nothing to do with migrations.
    #[arg(long, default_value_t = 5)]
    pub request_interval_ms: u64,
    /// Bytes per second each connection writes on its long-lived stream.
    #[arg(long, default_value_t = 32 * 1024)]
    pub stream_rate: u64,
    /// A smaller run for tests: 16 connections (with `--lb-nodes N`: 16 per node), 2 rounds, 6 s
    /// (replaces only those left at their defaults).
    #[arg(long)]
    pub small: bool,
    /// Leave the lab, baton-lb and the workers running afterwards (inspect with `baton`,
    /// `bpftool`); `cargo xtask demo --down` removes them.
    #[arg(long)]
    pub keep: bool,
    /// Only tear down what a `--keep` run left (workers, baton-lb and its pins, the lab; with
    /// `--lb-nodes`, also etcd, the LB nodes and their pins, the cluster lab).
    #[arg(long)]
    pub down: bool,
    /// Use the binaries in this directory instead of building them (release) first.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Run without migrations (load only) even if the migration CLI is available.
    #[arg(long)]
    pub no_migrate: bool,
    /// HTTP/3 instead of the demo protocol: a real upstream HTTP server (`baton-upstream`) beside
    /// each worker, both workers serving Baton's HTTP/3 reverse proxy (`service = "proxy"`), and
    /// `h3-load` (h3 over crates.io quinn, not Baton's code) issuing GETs of 1 kB and 500 kB and
    /// 64 KiB POSTs through the VIPs, every body checked, while every connection moves. Its
    /// default size is 16 connections (`--small`: 8), each with two request loops.
    #[arg(long)]
    pub http3: bool,
    /// How baton-lb reaches the workers: `none` (layer-2 direct server return, the default),
    /// `ipip` or `gue` over IPv4, `ipip6` or `gue6` over IPv6. One value for both workers or one
    /// per worker (`--encap gue,ipip6`). An encapsulated worker is addressed at its routed
    /// address (a subnet of its own, reached through a gateway) and takes the outer header off
    /// itself (its `[decap]` table); replies still go straight to the client from the VIP.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub encap: Vec<EncapMode>,
    /// LB nodes. 1 (the default) is the single-node lab. More runs the demo on the cluster lab
    /// (`cargo xtask lab up --lb-nodes N`): etcd in a namespace of its own, N `baton-lb` cluster
    /// nodes behind a router that spreads the VIP's flows over them with ECMP, both workers
    /// registering themselves in etcd, the load over IPv4 only (the cluster lab routes only the
    /// IPv4 VIP; 32 connections per node, at least 64; `--small`: 16 per node), and every
    /// migration driven from the client host by `baton migrate` with a cluster migration config
    /// (etcd and the workers' mutual-TLS control API). The report adds each node's share of the
    /// VIP's datagrams and the etcd revision it applied; the verdict also needs every node to have
    /// routed at least a fifth of a fair share of them (10% with two nodes). `--keep` and
    /// `--down` work as for one node.
    #[arg(long, default_value_t = 1)]
    pub lb_nodes: usize,
    #[command(flatten)]
    pub path: crate::netpath::PathOptions,
}

/// `--encap`: how baton-lb forwards to one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EncapMode {
    None,
    Ipip,
    Ipip6,
    Gue,
    Gue6,
}

/// The worker's `[decap] gue_port` and the LB's `gue_port` in the demo.
const DEMO_GUE_PORT: u16 = 6080;

impl EncapMode {
    /// The mode of each of the two workers from `--encap`'s values.
    fn per_worker(values: &[EncapMode]) -> Result<[EncapMode; 2]> {
        match values {
            [] => Ok([EncapMode::None; 2]),
            [one] => Ok([*one; 2]),
            [a, b] => Ok([*a, *b]),
            _ => bail!("--encap takes one mode, or one per worker (two)"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            EncapMode::None => "layer 2 (MAC rewrite)",
            EncapMode::Ipip => "IPIP over IPv4",
            EncapMode::Ipip6 => "IPIP over IPv6",
            EncapMode::Gue => "GUE over IPv4",
            EncapMode::Gue6 => "GUE over IPv6",
        }
    }

    /// The worker's `[decap]` table ("" for layer 2).
    fn decap_table(self) -> String {
        match self {
            EncapMode::None => String::new(),
            EncapMode::Ipip | EncapMode::Ipip6 => "[decap]\nipip = true\n".into(),
            EncapMode::Gue | EncapMode::Gue6 => format!("[decap]\ngue_port = {DEMO_GUE_PORT}\n"),
        }
    }

    /// The LB's `[[workers]]` table for worker `i` (0-based) of the fixed lab.
    fn lb_worker_table(self, i: usize, name: &str, server_id: u64) -> String {
        let lab = baton_lab::Topology::fixed();
        let (address, encap) = match self {
            EncapMode::None => (lab.worker_addr4(i), "none"),
            EncapMode::Ipip => (lab.worker_routed_addr4(i), "ipip"),
            EncapMode::Ipip6 => (lab.worker_routed_addr6(i), "ipip"),
            EncapMode::Gue => (lab.worker_routed_addr4(i), "gue"),
            EncapMode::Gue6 => (lab.worker_routed_addr6(i), "gue"),
        };
        let mut t = format!(
            "[[workers]]\nname = \"{name}\"\nserver_id = {server_id}\naddress = \"{address}\"\nencap = \"{encap}\"\n"
        );
        if encap == "gue" {
            t.push_str(&format!("gue_port = {DEMO_GUE_PORT}\n"));
        }
        t
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[demo] {}", msg.as_ref());
}

fn say_str(msg: &str) {
    say(msg)
}

pub fn run(opts: &Options) -> Result<()> {
    require_root("cargo xtask demo")?;
    crate::setup::ensure("cargo xtask demo")?;
    let state = PathBuf::from(STATE_DIR);
    if opts.down {
        teardown_everything(&state, None)?;
        return cluster::remove_lab();
    }
    interrupt::install();
    // HTTP/3 connections each carry two request loops with 500 kB responses: fewer of them.
    let default_connections = match (opts.http3, opts.small) {
        (false, false) => 64,
        (false, true) => 16,
        (true, false) => 16,
        (true, true) => 8,
    };
    // The cluster's ECMP spreads flows by their ports: more of them make an even share likelier.
    let default_connections = match (opts.lb_nodes, opts.small) {
        (1, _) => default_connections,
        (n, true) => 16 * n,
        (n, false) => (32 * n).max(64),
    };
    let (connections, rounds, duration) = if opts.small {
        (
            if opts.connections == 64 {
                default_connections
            } else {
                opts.connections
            },
            if opts.rounds == 3 { 2 } else { opts.rounds },
            if opts.duration == 20 {
                6
            } else {
                opts.duration
            },
        )
    } else if opts.connections == 64 {
        (default_connections, opts.rounds, opts.duration)
    } else {
        (opts.connections, opts.rounds, opts.duration)
    };
    if connections == 0 {
        bail!("--connections must be at least 1");
    }
    opts.path.check()?;
    if opts.http3 {
        opts.path.relay_args()?;
    }

    let bins = match &opts.bin_dir {
        Some(d) => d.clone(),
        None if opts.http3 => {
            say("building baton-lb, baton, baton-worker, baton-load, baton-upstream (release)");
            build_release_packages(&[
                "lb-user",
                "baton-cli",
                "baton-worker",
                "baton-load",
                "baton-test-upstream",
            ])?
        }
        None => build_release()?,
    };
    preflight(&bins, say_str)?;
    if opts.lb_nodes > 1 {
        return cluster::run(opts, bins, connections, rounds, duration);
    }
    let h3_load = if opts.http3 {
        http3::preflight(&bins)?;
        Some(http3::build_h3_load(&bins)?)
    } else {
        None
    };

    say("bringing the lab up");
    lab::up_quiet()?;

    let mut run = Run::new(bins.clone());
    run.encap = EncapMode::per_worker(&opts.encap)?;
    run.keep = opts.keep;
    run.request_interval_ms = opts.request_interval_ms;
    run.settle = opts.settle;
    let outcome = match h3_load {
        Some(h3_load) => run.demo_http3(opts, &h3_load, connections, rounds, duration),
        None => run.demo(opts, connections, rounds, duration),
    };
    if let Err(e) = &outcome {
        say(format!("error: {e:#}"));
        run.show_logs();
    }
    if opts.keep {
        run.children.clear(); // keep them running; their pids are in the state dir
        say("--keep: the lab, baton-lb and the workers stay up. Try:");
        let b = bins.display();
        eprintln!("  sudo {b}/baton status");
        eprintln!("  sudo {b}/baton workers");
        eprintln!("  sudo BATON_MIGRATION_CONFIG={STATE_DIR}/migration.toml {b}/baton conns");
        eprintln!("  sudo bpftool map dump pinned {PIN_DIR}/BATON_CID_OVERRIDE");
        eprintln!("  sudo ip netns exec baton-lb curl -s http://127.0.0.1:9650/metrics");
        eprintln!("  logs: {STATE_DIR}/*.log     remove it all: sudo cargo xtask demo --down");
    } else {
        teardown_everything(&state, Some(&mut run))?;
    }
    print_outcome(outcome)
}

/// Prints the report of a run that ended, last (so the RESULT line is the last line of the
/// output); exits 1 if the run found failures.
fn print_outcome(outcome: Result<(bool, String)>) -> Result<()> {
    match outcome {
        Ok((ok, report)) => {
            print!("{report}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            if ok {
                Ok(())
            } else {
                eprintln!("[demo] the demo found failures (see the report)");
                std::process::exit(1);
            }
        }
        Err(e) => Err(e),
    }
}

/// Checks that `bins` holds the binaries a lab run needs and that no baton-lb runs already;
/// removes stale pins an earlier run left.
pub(crate) fn preflight(bins: &Path, say: fn(&str)) -> Result<()> {
    for b in ["baton-lb", "baton", "baton-worker", "baton-load"] {
        if !bins.join(b).is_file() {
            bail!(
                "{} is missing (build with `cargo build --release -p lb-user -p baton-worker -p baton-load`)",
                bins.join(b).display()
            );
        }
    }
    cluster::refuse_running_nodes()?;
    if lb_answers() {
        bail!(
            "a baton-lb is already running on {LB_SOCKET} (another lab or demo?): stop it first \
             (`cargo xtask demo --down`, or `baton-lb detach` for a hand-started one)"
        );
    }
    if Path::new(PIN_DIR).exists() {
        say(&format!(
            "removing stale pins in {PIN_DIR} left by an earlier run (`baton-lb detach`)"
        ));
        let _ = Command::new(bins.join("baton-lb")).arg("detach").output();
    }
    Ok(())
}

/// `cargo build --release` of the binaries the demo runs; returns the directory they are in.
pub(crate) fn build_release() -> Result<PathBuf> {
    say("building baton-lb, baton, baton-worker and baton-load (release)");
    build_release_packages(&["lb-user", "baton-cli", "baton-worker", "baton-load"])
}

/// Builds these workspace packages (release); returns the directory of the binaries.
pub(crate) fn build_release_packages(packages: &[&str]) -> Result<PathBuf> {
    let root = workspace_root();
    let status = cargo()
        .args(["build", "--release"])
        .args(packages.iter().flat_map(|p| ["-p", p]))
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    Ok(target.join("release"))
}

pub(crate) fn lb_answers() -> bool {
    lb_status(Path::new(LB_SOCKET)).is_some()
}

/// baton-lb's `status` through its control socket `socket` (its `data`); None if it does not
/// answer.
pub(crate) fn lb_status(socket: &Path) -> Option<Value> {
    use std::io::Write;
    let s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    (&s).write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).ok()?;
    let v: Value = serde_json::from_str(&line).ok()?;
    (v["ok"] == true).then(|| v["data"].clone())
}

pub(crate) struct Run {
    pub(crate) state: PathBuf,
    pub(crate) bins: PathBuf,
    pub(crate) children: Vec<(String, Child)>,
    keep: bool,
    request_interval_ms: u64,
    /// `baton override list` length after the last migration and the settle time.
    overrides_left: Option<usize>,
    settle: u64,
    /// Connections tried again because they were busy with requests (see [`Run::move_all`]).
    busy_retried: std::sync::atomic::AtomicUsize,
    /// The workers serve this `[proxy]` config (`service = "proxy"`) instead of the demo service.
    proxy: Option<&'static str>,
    /// `baton migrate --quiesce-timeout-ms`: how long a source waits for requests in flight.
    quiesce_ms: Option<u64>,
    /// How baton-lb reaches each worker (`--encap`).
    encap: [EncapMode; 2],
    /// The data plane's `encapsulated` and `encap_too_big` counters after the load.
    encap_counters: Option<(u64, u64)>,
    /// The namespace baton-load runs in.
    client_ns: String,
    /// Each worker's `[peer] listen` address.
    worker_peers: [String; 2],
    /// `baton` (conns, migrate) runs in this namespace (None: where the demo runs).
    baton_netns: Option<String>,
    /// What the cluster demo adds to the report.
    extra: ReportExtra,
}

/// What a variant of the demo adds to the report: lines before the verdict, a failure the
/// verdict must show, fields after `RESULT ` and at the end of the RESULT line.
#[derive(Default)]
pub(crate) struct ReportExtra {
    lines: Vec<String>,
    failure: Option<String>,
    result_head: String,
    result_tail: String,
}

/// A running baton-load (the process itself is in the run's children).
pub(crate) struct Load {
    rx: mpsc::Receiver<String>,
    relays: Vec<std::thread::JoinHandle<()>>,
    stop_file: PathBuf,
    summary_file: PathBuf,
}

/// What one `baton migrate` reported.
pub(crate) struct Migration {
    pub(crate) conn: String,
    pub(crate) ok: bool,
    /// The error kind `baton migrate --json` gave (empty on success).
    pub(crate) code: String,
    pub(crate) ms: f64,
    /// `freeze_ms` of a successful migration (the source's freeze to export), else 0.
    pub(crate) freeze_ms: f64,
    pub(crate) kind: String,
}

impl Run {
    /// A run with the lab's state directory and the binaries in `bins`; nothing started yet.
    pub(crate) fn new(bins: PathBuf) -> Run {
        Run {
            state: PathBuf::from(STATE_DIR),
            bins,
            children: Vec::new(),
            keep: false,
            request_interval_ms: 0,
            overrides_left: None,
            settle: 0,
            busy_retried: Default::default(),
            proxy: None,
            quiesce_ms: None,
            encap: [EncapMode::None; 2],
            encap_counters: None,
            client_ns: lab::CLIENT_NS.into(),
            worker_peers: WORKERS.map(|w| w.3.to_string()),
            baton_netns: None,
            extra: ReportExtra::default(),
        }
    }

    /// The baton-lb config of this run: lab/lb.toml, or (with `--encap`) a copy whose worker
    /// tables say how each worker is reached, written into the state directory.
    fn lb_config(&self) -> Result<PathBuf> {
        let lab_config = workspace_root().join("lab/lb.toml");
        if self.encap == [EncapMode::None; 2] {
            return Ok(lab_config);
        }
        let text = std::fs::read_to_string(&lab_config)
            .with_context(|| format!("reading {}", lab_config.display()))?;
        let mut text = crate::lab::without_workers(&text, &["w1", "w2"])?;
        for (i, ((name, _, sid, _), mode)) in WORKERS.iter().zip(self.encap).enumerate() {
            text.push_str(&mode.lb_worker_table(i, name, *sid));
        }
        let path = self.state.join("lb.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// A fresh state directory with certificates, secrets and configs, then baton-lb (with
    /// `lb_config`, or this run's own: see [`Run::lb_config`]) and both workers, waiting until each answers. The lab must be up.
    pub(crate) fn bring_up(&mut self, lb_config: Option<&Path>, migrations: bool) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.state);
        std::fs::create_dir_all(&self.state)
            .with_context(|| format!("creating {}", self.state.display()))?;
        self.prepare_files(migrations)?;
        let lb_config = match lb_config {
            Some(c) => c.to_path_buf(),
            None => self.lb_config()?,
        };
        self.start_lb_and_workers(&lb_config, migrations)
    }

    /// Starts baton-lb with `lb_config` and both workers; waits until they answer.
    fn start_lb_and_workers(&mut self, lb_config: &Path, migrations: bool) -> Result<()> {
        say("starting baton-lb in namespace baton-lb");
        let mut lb = Command::new(self.bins.join("baton-lb"));
        lb.args(["--netns", lab::LB_NS, "--config"])
            .arg(lb_config)
            .env("BATON_LOG", "info");
        self.spawn("baton-lb", &mut lb)?;
        wait_until(Duration::from_secs(60), "baton-lb's control socket", || {
            self.check_children()?;
            Ok(lb_answers())
        })?;
        self.start_workers(WORKERS.map(|w| w.1), migrations)
    }

    /// Starts both workers, in `namespaces`; with `migrations`, waits until their control
    /// sockets exist.
    fn start_workers(&mut self, namespaces: [&str; 2], migrations: bool) -> Result<()> {
        for ((name, ..), ns) in WORKERS.into_iter().zip(namespaces) {
            say(format!("starting baton-worker {name} in namespace {ns}"));
            let mut w = Command::new("ip");
            w.args(["netns", "exec", ns])
                .arg(self.bins.join("baton-worker"))
                .arg("--config")
                .arg(self.state.join(format!("{name}.toml")))
                // BATON_LAB_WORKER_LOG (a tracing filter) makes the workers chattier for debugging.
                .env(
                    "RUST_LOG",
                    std::env::var("BATON_LAB_WORKER_LOG").unwrap_or_else(|_| "info".into()),
                )
                .env("BATON_LOG", "info");
            self.spawn(name, &mut w)?;
        }
        if migrations {
            wait_until(
                Duration::from_secs(30),
                "the workers' control sockets",
                || {
                    self.check_children()?;
                    Ok(WORKERS
                        .iter()
                        .all(|(n, ..)| self.state.join(format!("{n}.sock")).exists()))
                },
            )?;
        }
        Ok(())
    }

    fn log(&self, name: &str) -> Result<std::fs::File> {
        let p = self.state.join(format!("{name}.log"));
        std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))
    }

    pub(crate) fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let log = self.log(name)?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        std::fs::write(
            self.state.join(format!("{name}.pid")),
            child.id().to_string(),
        )?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Starts `baton-load` in the client namespace against the IPv4 VIP with the lab's CA, a stop
    /// file, a summary file and `--print-conn-ids`, plus `args`. Its stderr (progress) is
    /// relayed; so is the rest of its stdout (the text summary) if `echo_stdout`.
    pub(crate) fn start_load(&mut self, args: &[String], echo_stdout: bool) -> Result<Load> {
        self.start_load_to(&[vip_target(lab::VIP4)], args, echo_stdout)
    }

    /// [`Run::start_load`] against `targets` (baton-load alternates its connections between them).
    pub(crate) fn start_load_to(
        &mut self,
        targets: &[SocketAddr],
        args: &[String],
        echo_stdout: bool,
    ) -> Result<Load> {
        let stop_file = self.state.join("load.stop");
        let summary_file = self.state.join("load-summary.json");
        let _ = std::fs::remove_file(&stop_file);
        let mut load = Command::new("ip");
        load.args(["netns", "exec", &self.client_ns])
            .arg(self.bins.join("baton-load"))
            .args(
                targets
                    .iter()
                    .flat_map(|t| ["--target".to_string(), t.to_string()]),
            )
            .arg("--stop-file")
            .arg(&stop_file)
            .arg("--summary-file")
            .arg(&summary_file)
            .arg("--print-conn-ids")
            .arg("--ca")
            .arg(self.state.join("pki/ca.pem"))
            .args(["--server-name", SERVICE_NAME])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = load.spawn().context("starting baton-load")?;
        let (tx, rx) = mpsc::channel::<String>();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let relays = vec![
            std::thread::spawn(move || {
                // `conn`/`ready` lines go to the caller.
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.starts_with("conn ") || line.starts_with("ready ") {
                        let _ = tx.send(line);
                    } else if echo_stdout {
                        eprintln!("{line}");
                    }
                }
            }),
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                }
            }),
        ];
        self.children.push(("baton-load".into(), child));
        Ok(Load {
            rx,
            relays,
            stop_file,
            summary_file,
        })
    }

    /// Waits for baton-load's `ready` line (every connection up), noting progress every 5 s;
    /// returns client address -> connection index from its `conn` lines.
    pub(crate) fn wait_ready(
        &mut self,
        load: &Load,
        connections: usize,
        limit: Duration,
        note: impl Fn(String),
    ) -> Result<std::collections::HashMap<String, usize>> {
        let deadline = Instant::now() + limit;
        let mut locals = std::collections::HashMap::new();
        let mut last_note = Instant::now();
        loop {
            self.check_children()?;
            match load.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.starts_with("ready ") => break,
                Ok(l) => {
                    // conn <index> local=<addr>[ reconnect=<n>]
                    let mut it = l.split_whitespace().skip(1);
                    let index = it.next().and_then(|i| i.parse::<usize>().ok());
                    let local = it.next().and_then(|a| a.strip_prefix("local="));
                    if let (Some(i), Some(a)) = (index, local) {
                        locals.insert(a.to_string(), i);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("baton-load stopped before its connections were up")
                }
            }
            if last_note.elapsed() > Duration::from_secs(5) {
                note(format!("{} of {connections} connections up", locals.len()));
                last_note = Instant::now();
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {connections} connections came up within {} s",
                    locals.len(),
                    limit.as_secs()
                );
            }
        }
        Ok(locals)
    }

    /// Creates the stop file, waits for baton-load to finish (up to `limit`) and returns its
    /// JSON summary.
    pub(crate) fn stop_load(&mut self, load: Load, limit: Duration) -> Result<Value> {
        std::fs::write(&load.stop_file, b"stop\n")?;
        let status = self.wait_stopped("baton-load", limit, "the stop file", |_| {})?;
        for r in load.relays {
            let _ = r.join();
        }
        let text = std::fs::read_to_string(&load.summary_file).with_context(|| {
            format!(
                "baton-load ({status}) left no summary in {}",
                load.summary_file.display()
            )
        })?;
        serde_json::from_str(&text).context("parsing baton-load's summary")
    }

    /// Takes child `name` out of the run, does `stop` to it and waits up to `limit` for it to
    /// exit (then kills it and fails, naming `how` it was asked to stop).
    pub(crate) fn wait_stopped(
        &mut self,
        name: &str,
        limit: Duration,
        how: &str,
        stop: impl FnOnce(&Child),
    ) -> Result<std::process::ExitStatus> {
        let pos = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("{name} is not running"))?;
        let (_, mut child) = self.children.remove(pos);
        stop(&child);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} did not stop within {} s of {how}", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn check_children(&mut self) -> Result<()> {
        if interrupt::happened() {
            bail!("interrupted (a second Ctrl-C quits without tearing down)");
        }
        for (name, c) in &mut self.children {
            if let Some(status) = c.try_wait()? {
                if name == "baton-load" {
                    bail!("baton-load exited early ({status}); its output is above");
                }
                bail!(
                    "{name} exited unexpectedly ({status}); see {}/{name}.log",
                    self.state.display()
                );
            }
        }
        Ok(())
    }

    pub(crate) fn show_logs(&self) {
        let names = ["baton-lb", "w1", "w2"]
            .into_iter()
            .chain(
                self.proxy
                    .is_some()
                    .then_some(http3::PROCESSES)
                    .into_iter()
                    .flatten(),
            )
            .map(String::from)
            .chain(cluster::processes());
        for name in names {
            let p = self.state.join(format!("{name}.log"));
            if let Ok(text) = std::fs::read_to_string(&p) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(15)..];
                if !tail.is_empty() {
                    eprintln!("---- last lines of {} ----", p.display());
                    for l in tail {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }

    /// `baton --json ARGS`, parsed; fails with its stderr when it exits non-zero.
    pub(crate) fn baton_json(&self, args: &[&str]) -> Result<Value> {
        let out = self
            .baton()
            .arg("--json")
            .args(args)
            .output()
            .with_context(|| format!("running baton {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "baton {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing the output of `baton --json {}`", args.join(" ")))
    }

    pub(crate) fn baton(&self) -> Command {
        let mut c = match &self.baton_netns {
            None => Command::new(self.bins.join("baton")),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(self.bins.join("baton"));
                c
            }
        };
        c.env("BATON_MIGRATION_CONFIG", self.state.join("migration.toml"));
        c
    }

    /// Whether the binaries know the migration flow (docs/MIGRATION-FLOW.md).
    fn migration_cli_available(&self) -> bool {
        let ok = |mut c: Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let mut gen_certs = Command::new(self.bins.join("baton-worker"));
        gen_certs.args(["gen-certs", "--help"]);
        let mut migrate = self.baton();
        migrate.args(["migrate", "--help"]);
        ok(gen_certs) && ok(migrate)
    }

    /// Certificates, secrets and configs. With the migration flow: `baton-worker gen-certs` and
    /// the full worker config; without it: a self-signed service certificate from openssl.
    fn prepare_files(&self, migrations: bool) -> Result<()> {
        let s = &self.state;
        let pki = s.join("pki");
        std::fs::create_dir_all(&pki)?;
        if migrations {
            let out = Command::new(self.bins.join("baton-worker"))
                .args(["gen-certs", "--out"])
                .arg(&pki)
                .args(["--workers", "w1,w2", "--service-name", SERVICE_NAME])
                .output()
                .context("running baton-worker gen-certs")?;
            if !out.status.success() {
                bail!(
                    "baton-worker gen-certs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        } else {
            let out = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                ])
                .args(["-days", "7", "-subj", &format!("/CN={SERVICE_NAME}")])
                .args(["-addext", &format!("subjectAltName=DNS:{SERVICE_NAME}")])
                .args(["-addext", "basicConstraints=critical,CA:FALSE"])
                .arg("-keyout")
                .arg(pki.join("service.key"))
                .arg("-out")
                .arg(pki.join("service.pem"))
                .output()
                .context("running openssl to make the service certificate")?;
            if !out.status.success() {
                bail!(
                    "openssl req failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::fs::copy(pki.join("service.pem"), pki.join("ca.pem"))?;
        }
        // openssl keeps an older file's mode: private keys must be 0600 or the worker refuses them.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                pki.join("service.key"),
                std::fs::Permissions::from_mode(0o600),
            )?;
        }
        // The CLI gets the token secret only: it issues tokens, it never seals snapshots.
        let mut migration = format!(
            "secrets = \"{}\"\n",
            pki.join("controller-secrets.toml").display()
        );
        // Every worker's [peer] workers: the same list everywhere, only these are admitted.
        let peers = WORKERS
            .iter()
            .zip(&self.worker_peers)
            .map(|((name, _, sid, _), peer)| {
                format!("{{ name = \"{name}\", server_id = {sid}, peer = \"{peer}\" }}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        for ((name, _ns, server_id, _), peer) in WORKERS.into_iter().zip(&self.worker_peers) {
            let mut cfg = format!(
                "vips = [\"{vip4}\", \"{vip6}\"]\nport = 4433\nserver_id = {server_id}\ncid_len = 8\nserver_id_len = 2\n\
                 cert = \"{cert}\"\nkey = \"{key}\"\nservice = \"{service}\"\n",
                service = if self.proxy.is_some() {
                    "proxy"
                } else {
                    "demo"
                },
                vip4 = lab::VIP4,
                vip6 = lab::VIP6,
                cert = pki.join("service.pem").display(),
                key = pki.join("service.key").display(),
            );
            if migrations {
                cfg.push_str(&format!(
                    "name = \"{name}\"\ncontrol_socket = \"{sock}\"\nsecrets = \"{secrets}\"\n\
                     [peer]\nlisten = \"{peer}\"\nca = \"{ca}\"\ncert = \"{pcert}\"\nkey = \"{pkey}\"\n\
                     workers = [{peers}]\n",
                    sock = s.join(format!("{name}.sock")).display(),
                    secrets = pki.join("secrets.toml").display(),
                    ca = pki.join("ca.pem").display(),
                    pcert = pki.join(format!("{name}.pem")).display(),
                    pkey = pki.join(format!("{name}.key")).display(),
                ));
            }
            if let Some(proxy) = self.proxy {
                cfg.push_str(proxy);
            }
            let i = WORKERS
                .iter()
                .position(|w| w.0 == name)
                .expect("a lab worker");
            cfg.push_str(&self.encap[i].decap_table());
            std::fs::write(s.join(format!("{name}.toml")), cfg)?;
            migration.push_str(&format!(
                "[[workers]]\nname = \"{name}\"\ncontrol = \"{}\"\n",
                s.join(format!("{name}.sock")).display()
            ));
        }
        std::fs::write(s.join("migration.toml"), migration)?;
        Ok(())
    }

    fn demo(
        &mut self,
        opts: &Options,
        connections: usize,
        rounds: u32,
        duration: u64,
    ) -> Result<(bool, String)> {
        let started = Instant::now();
        let migrations = !opts.no_migrate && self.migration_cli_available();
        if !migrations && !opts.no_migrate {
            say(
                "the migration CLI (`baton migrate`, `baton-worker gen-certs`) is not in these binaries: load only",
            );
        }
        self.bring_up(None, migrations)?;

        // The load.
        say(format!(
            "starting baton-load in namespace {}: {connections} connections, {}",
            lab::CLIENT_NS,
            match opts.path.flags() {
                Some(f) => format!("on an emulated path ({f})"),
                None => "on the lab's own path (veth, RTT ~0.1 ms, no loss)".into(),
            }
        ));
        let args = load_args(opts, connections);
        // Half the connections over IPv4, half over IPv6 (baton-load alternates the targets).
        let targets = [vip_target(lab::VIP4), vip_target(lab::VIP6)];
        let load = self.start_load_to(&targets, &args, true)?;
        let load_started = Instant::now();
        let result = self.drive(
            |run: &mut Run| {
                run.wait_ready(&load, connections, Duration::from_secs(60), say)
                    .map(drop)
            },
            connections,
            rounds,
            duration,
            opts,
            migrations,
            started,
            load_started,
        );
        // Stop the load whatever happened, and collect its summary.
        let summary = self.stop_load(load, Duration::from_secs(60));
        let migrated = result?;
        let summary = summary?;
        Ok(self.report(&summary, &migrated, started.elapsed()))
    }

    #[allow(clippy::too_many_arguments)]
    fn drive(
        &mut self,
        wait_ready: impl FnOnce(&mut Run) -> Result<()>,
        connections: usize,
        rounds: u32,
        duration: u64,
        opts: &Options,
        migrations: bool,
        started: Instant,
        load_started: Instant,
    ) -> Result<Vec<Migration>> {
        // Wait until every connection is up.
        wait_ready(self)?;
        say(format!(
            "all {connections} connections are up; load running"
        ));
        std::thread::sleep(Duration::from_secs(opts.settle));
        let mut done = Vec::new();
        if migrations {
            for round in 1..=rounds {
                for (from, to) in [("w1", "w2"), ("w2", "w1")] {
                    self.check_children()?;
                    let t0 = load_started.elapsed().as_secs_f64();
                    let moved = self.move_all(from, to, opts.concurrency, connections)?;
                    let t1 = load_started.elapsed().as_secs_f64();
                    let ok: Vec<f64> = moved.iter().filter(|m| m.ok).map(|m| m.ms).collect();
                    let failed = moved.len() - ok.len();
                    say(format!(
                        "round {round}/{rounds} {from} -> {to} (load clock t={t0:.1}-{t1:.1} s): {} moved, {failed} failed, p50 {:.1} ms, max {:.1} ms",
                        ok.len(),
                        percentile(&ok, 50.0),
                        ok.iter().copied().fold(0.0, f64::max),
                    ));
                    for m in moved.iter().filter(|m| !m.ok).take(5) {
                        say(format!("  migration failed: {}", m.kind));
                    }
                    if failed > 5 {
                        say(format!("  ... and {} more failed migrations", failed - 5));
                    }
                    done.extend(moved);
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
        // Let the load run its minimum duration, plus a settle period after the last migration.
        let until = (started + Duration::from_secs(duration))
            .max(Instant::now() + Duration::from_secs(opts.settle));
        while Instant::now() < until {
            self.check_children()?;
            std::thread::sleep(Duration::from_millis(200));
        }
        if self.encap != [EncapMode::None; 2] {
            let status = self.baton().args(["--json", "status"]).output();
            self.encap_counters = status
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .map(|v| {
                    let c = |k: &str| v["counters"][k].as_u64().unwrap_or(0);
                    (c("encapsulated"), c("encap_too_big"))
                });
        }
        if migrations {
            let out = self.baton().args(["--json", "override", "list"]).output();
            self.overrides_left = out
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .and_then(|v| v.as_array().map(Vec::len));
        }
        say("stopping the load");
        Ok(done)
    }

    /// Every connection `baton conns` shows on `from` moves to `to`, `concurrency` at a time.
    /// A connection `baton conns` did not list cannot be moved: each one missing from the listing
    /// counts as a failed migration (the demo promised to move every connection).
    fn move_all(
        &self,
        from: &str,
        to: &str,
        concurrency: usize,
        expected: usize,
    ) -> Result<Vec<Migration>> {
        let out = self
            .baton()
            .args(["--json", "conns"])
            .output()
            .context("running baton conns")?;
        if !out.status.success() {
            bail!(
                "baton conns failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let list: Value =
            serde_json::from_slice(&out.stdout).context("parsing `baton conns --json`")?;
        let all = list
            .as_array()
            .context("`baton conns --json` is not an array")?;
        let conns: Vec<String> = all
            .iter()
            .filter(|c| c["worker"] == from)
            .filter_map(|c| c["conn"].as_str().map(String::from))
            .collect();
        let mut missing = Vec::new();
        if all.len() < expected {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            say(format!(
                "baton conns listed {} of {expected} connections{}",
                all.len(),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                }
            ));
            for _ in all.len()..expected {
                missing.push(Migration {
                    conn: String::new(),
                    code: "not_listed".into(),
                    ok: false,
                    ms: 0.0,
                    freeze_ms: 0.0,
                    kind: format!(
                        "a connection missing from `baton conns` could not be moved {from} -> {to}"
                    ),
                });
            }
        }
        let mut results = self.migrate_each(conns, to, concurrency);
        // A connection that kept requests in flight for a whole quiesce timeout (HTTP/3 moves
        // only between requests) rolled back; it is tried again, as `baton drain` does.
        for _ in 0..BUSY_RETRIES {
            let (busy, done): (Vec<Migration>, Vec<Migration>) = results
                .into_iter()
                .partition(|m| m.code == "requests_in_flight");
            results = done;
            if busy.is_empty() {
                break;
            }
            self.busy_retried
                .fetch_add(busy.len(), std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(200));
            results.extend(self.migrate_each(
                busy.into_iter().map(|m| m.conn).collect(),
                to,
                concurrency,
            ));
        }
        results.extend(missing);
        Ok(results)
    }

    /// `baton migrate` of each of `conns` to `to`, `concurrency` at a time.
    fn migrate_each(&self, conns: Vec<String>, to: &str, concurrency: usize) -> Vec<Migration> {
        let queue = std::sync::Mutex::new(conns);
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..concurrency.max(1) {
                scope.spawn(|| {
                    loop {
                        let Some(conn) = queue.lock().unwrap().pop() else {
                            break;
                        };
                        let m = self.migrate(&conn, to);
                        results.lock().unwrap().push(m);
                    }
                });
            }
        });
        results.into_inner().unwrap()
    }

    pub(crate) fn migrate(&self, conn: &str, to: &str) -> Migration {
        let t = Instant::now();
        let mut cmd = self.baton();
        cmd.args(["--json", "migrate", conn, "--to", to]);
        if let Some(ms) = self.quiesce_ms {
            cmd.args(["--quiesce-timeout-ms", &ms.to_string()]);
        }
        let out = cmd.output();
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        match out {
            Err(e) => Migration {
                conn: conn.into(),
                code: "cli".into(),
                ok: false,
                ms: wall,
                freeze_ms: 0.0,
                kind: format!("cannot run baton migrate: {e}"),
            },
            Ok(o) => {
                let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
                if o.status.success() && v["ok"] == true {
                    Migration {
                        conn: conn.into(),
                        code: String::new(),
                        ok: true,
                        ms: v["total_ms"].as_f64().unwrap_or(wall),
                        freeze_ms: v["freeze_ms"].as_f64().unwrap_or(0.0),
                        kind: String::new(),
                    }
                } else {
                    let kind = v["kind"].as_str().unwrap_or("error");
                    let detail = v["error"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| String::from_utf8_lossy(&o.stderr).trim().to_string());
                    Migration {
                        conn: conn.into(),
                        code: kind.into(),
                        ok: false,
                        ms: wall,
                        freeze_ms: 0.0,
                        kind: format!("{conn}: {kind}: {detail}"),
                    }
                }
            }
        }
    }

    fn report(&self, s: &Value, migrated: &[Migration], elapsed: Duration) -> (bool, String) {
        let mut out = String::new();
        macro_rules! w {
            ($($t:tt)*) => {{ out.push_str(&format!($($t)*)); out.push('\n'); }};
        }
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
        let connections = n("connections");
        let not_up = connections.saturating_sub(n("established"));
        // A failure is anything a client would notice beyond a pause: a failed request, a broken
        // session counter, a long stream that did not come back byte-exact, a connection that
        // never came up or broke.
        let failed = n("failed") + n("streams_not_exact") + not_up + n("connection_errors");
        let figures = MigrationFigures::of(migrated);
        let migration_failed = figures.failed;
        let reconnects = n("reconnects");
        w!("");
        w!("Baton demo report ({:.1} s)", elapsed.as_secs_f64());
        w!(
            "  client load      {connections} QUIC connections from namespace {}: {} over IPv4 to {}, {} over IPv6 to {}",
            self.client_ns,
            n("ipv4_connections"),
            vip_target(lab::VIP4),
            n("ipv6_connections"),
            vip_target(lab::VIP6)
        );
        let path = &s["path"];
        if path.is_object() {
            let dir = |d: &Value| {
                format!(
                    "{} datagrams, {} dropped, {} held back",
                    d["packets"], d["dropped"], d["held_back"]
                )
            };
            w!(
                "  path             emulated at the client: {} (seed {}); up: {}; down: {}",
                path["description"].as_str().unwrap_or("?"),
                path["seed"],
                dir(&path["up"]),
                dir(&path["down"])
            );
        } else {
            w!(
                "  path             the lab's own (veth, RTT ~0.1 ms, no loss; --rtt/--loss emulate others)"
            );
        }
        w!(
            "  requests         {} completed, {} failed, {} session-counter breaks",
            n("requests"),
            n("failed"),
            n("counter_breaks")
        );
        w!(
            "  long streams     {:.2} MB sent, {:.2} MB echoed and verified byte for byte, {} not byte-exact",
            n("stream_bytes_sent") as f64 / 1e6,
            n("stream_bytes_verified") as f64 / 1e6,
            n("streams_not_exact")
        );
        w!(
            "  connections      {} established, {} connection errors, {} reconnects",
            n("established"),
            n("connection_errors"),
            reconnects
        );
        w!(
            "  stall            largest gap between two completed requests on a connection: max {:.1} ms \
             (conn {}, ended at load clock t={:.1} s), p50 {:.1} ms, p99 {:.1} ms (includes the {} ms pause between requests{})",
            f("max_stall_ms"),
            n("max_stall_conn"),
            f("max_stall_at_s"),
            f("p50_stall_ms"),
            f("p99_stall_ms"),
            self.request_interval_ms,
            if path.is_object() {
                " and the emulated path's round trip"
            } else {
                ""
            }
        );
        w!(
            "  client QUIC      {} packets declared lost and retransmitted, {} congestion events",
            n("lost_packets"),
            n("congestion_events")
        );
        w!("  migrations       {}", figures.line(""));
        if self.encap != [EncapMode::None; 2] {
            w!(
                "  workers reached  w1: {}, w2: {} ({})",
                self.encap[0].label(),
                self.encap[1].label(),
                match self.encap_counters {
                    Some((n, too_big)) => format!(
                        "{n} datagrams encapsulated by XDP, {too_big} too big for the path after encapsulation"
                    ),
                    None => "baton status gave no counters".into(),
                }
            );
        }
        if let Some(left) = self.overrides_left {
            w!(
                "  LB overrides     {left} left {} s after the last migration (each goes once the client retires the CID)",
                self.settle
            );
        }
        if let Some(per) = s["per_connection"].as_array() {
            for c in per
                .iter()
                .filter(|c| !c["last_error"].is_null() || c["stream_exact"] == false)
            {
                w!(
                    "  problem          conn {} ({}): {}",
                    c["index"],
                    c["local_addr"].as_str().unwrap_or("?"),
                    c["last_error"]
                        .as_str()
                        .unwrap_or("long stream not byte-exact")
                );
            }
        }
        for line in &self.extra.lines {
            w!("  {line}");
        }
        let ok = failed == 0
            && migration_failed == 0
            && reconnects == 0
            && connections > 0
            && self.extra.failure.is_none();
        w!(
            "  verdict          {}",
            match (&self.extra.failure, ok) {
                (_, true) =>
                    "PASS: every request answered, every byte verified, no reconnect".into(),
                (Some(why), false) => format!("FAIL ({why})"),
                (None, false) => "FAIL".to_string(),
            }
        );
        // On an emulated path the RESULT line also says which (extra keys at the end).
        let emulated = if path.is_object() {
            let pf = |k: &str| path[k].as_f64().unwrap_or(0.0);
            format!(
                " emulated_rtt_ms={} emulated_loss_up_pct={} emulated_loss_down_pct={}",
                pf("rtt_ms"),
                pf("up_loss_pct"),
                pf("down_loss_pct")
            )
        } else {
            String::new()
        };
        // With --encap, the data plane's encapsulation counters too.
        let emulated = match self.encap_counters {
            Some((n, too_big)) => format!("{emulated} encapsulated={n} encap_too_big={too_big}"),
            None => emulated,
        };
        w!(
            "RESULT {}connections={connections} requests={} failed={failed} migrations={} migration_failed={migration_failed} \
             reconnects={reconnects} max_stall_ms={:.1} p50_migration_ms={:.1} p99_migration_ms={:.1}{emulated} \
             ipv4_connections={} ipv6_connections={}{}",
            self.extra.result_head,
            n("requests"),
            figures.ok,
            f("max_stall_ms"),
            figures.p50,
            figures.p99,
            n("ipv4_connections"),
            n("ipv6_connections"),
            self.extra.result_tail,
        );
        (ok, out)
    }
}

/// baton-load's arguments for `connections` connections with the options' request size, stream
/// rate, pause and emulated path.
fn load_args(opts: &Options, connections: usize) -> Vec<String> {
    let mut args: Vec<String> = [
        "--connections",
        &connections.to_string(),
        "--request-size",
        &opts.request_size.to_string(),
        "--stream-rate",
        &opts.stream_rate.to_string(),
        "--request-interval",
        &format!("{}ms", opts.request_interval_ms),
        "--progress-interval",
        "2s",
    ]
    .map(String::from)
    .to_vec();
    args.extend(opts.path.load_args());
    args
}

/// What a run's migrations came to, for the report and the RESULT line.
pub(crate) struct MigrationFigures {
    pub(crate) ok: usize,
    pub(crate) failed: usize,
    /// Time per successful migration, ms.
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl MigrationFigures {
    pub(crate) fn of(migrated: &[Migration]) -> MigrationFigures {
        let ok_ms: Vec<f64> = migrated.iter().filter(|m| m.ok).map(|m| m.ms).collect();
        MigrationFigures {
            ok: ok_ms.len(),
            failed: migrated.len() - ok_ms.len(),
            p50: percentile(&ok_ms, 50.0),
            p99: percentile(&ok_ms, 99.0),
            max: ok_ms.iter().copied().fold(0.0, f64::max),
        }
    }

    /// The report's migrations line (after its label); `extra` follows the failed count.
    pub(crate) fn line(&self, extra: &str) -> String {
        if self.ok + self.failed == 0 {
            return "none (load only)".into();
        }
        format!(
            "{} done, {} failed{extra}; time per migration p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.ok, self.failed, self.p50, self.p99, self.max
        )
    }
}

/// The lab's service address on `vip` (port 4433); an IPv6 one prints as `[addr]:4433`.
pub(crate) fn vip_target(vip: &str) -> SocketAddr {
    SocketAddr::new(vip.parse().expect("the lab's VIPs are IP addresses"), 4433)
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.keep {
            for (_, c) in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub(crate) fn wait_until(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f()? {
        if Instant::now() > deadline {
            bail!("{what} not ready within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Nearest-rank percentile: the one definition, in lb-common (which needs nothing generated).
pub(crate) use lb_common::percentile;

/// Stops what a demo started (its own children, or the pids a `--keep` run recorded), removes
/// baton-lb's pins and the lab.
pub(crate) fn teardown_everything(state: &Path, run: Option<&mut Run>) -> Result<()> {
    let bins = run.as_ref().map(|r| r.bins.clone());
    say("tearing down: load, workers, baton-lb, lab");
    stop_processes(state, run);
    let Some(lb) = baton_lb_binary(bins.as_deref()) else {
        if Path::new(PIN_DIR).exists() {
            say(format!(
                "no baton-lb binary found to detach {PIN_DIR}: run `baton-lb detach`"
            ));
        }
        return lab::down_quiet();
    };
    if Path::new(PIN_DIR).exists() {
        let out = Command::new(lb)
            .arg("detach")
            .output()
            .context("running baton-lb detach")?;
        if !out.status.success() {
            say(format!(
                "baton-lb detach: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    lab::down_quiet()?;
    Ok(())
}

/// Stops the run's children (SIGTERM, then SIGKILL after 5 s), or without a run the processes a
/// `--keep` run recorded in `state` (each still the program started: pids get reused).
fn stop_processes(state: &Path, run: Option<&mut Run>) {
    if let Some(run) = run {
        for (_, c) in &mut run.children {
            // SAFETY: kill(2) on a child we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for (_, c) in &mut run.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        run.children.clear();
    } else {
        let names = ["baton-load", "w1", "w2", "baton-lb"]
            .into_iter()
            .chain(http3::PROCESSES)
            .map(String::from)
            .chain(cluster::processes());
        for name in names {
            let Ok(pid) = std::fs::read_to_string(state.join(format!("{name}.pid"))) else {
                continue;
            };
            let Ok(pid) = pid.trim().parse::<i32>() else {
                continue;
            };
            // Only signal it if it still is the program we started (pids get reused).
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim().starts_with("baton") || ["h3-load", "etcd"].contains(&comm.trim()) {
                // SAFETY: kill(2) on a pid we recorded, checked to still be a baton process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `baton-lb`, for `baton-lb detach`: in `bins`, or where a run would have built it.
fn baton_lb_binary(bins: Option<&Path>) -> Option<PathBuf> {
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let candidates = [
        bins.map(|b| b.join("baton-lb")),
        Some(target.join("release/baton-lb")),
        Some(root.join("target/release/baton-lb")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Ctrl-C (SIGINT), SIGTERM and SIGHUP during a demo: the first one is noted, and the demo's
/// next check of its processes ends the run so it tears everything down as after a failure
/// (the processes it started, in the same process group, get a Ctrl-C too); a second one quits
/// at once.
mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static HAPPENED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        // Only async-signal-safe operations here: an atomic swap and _exit.
        if HAPPENED.swap(true, Ordering::SeqCst) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
    }

    pub(crate) fn install() {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler only does async-signal-safe operations.
            unsafe {
                libc::signal(
                    sig,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
        }
    }

    pub(crate) fn happened() -> bool {
        HAPPENED.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's workers are the fixed lab's (namespaces, peer-channel addresses).
    #[test]
    fn workers_are_the_labs() {
        let lab = baton_lab::Topology::fixed();
        for (i, (name, ns, server_id, peer)) in WORKERS.into_iter().enumerate() {
            assert_eq!(name, format!("w{}", i + 1));
            assert_eq!(server_id, i as u64 + 1);
            assert_eq!(ns, lab.workers[i]);
            assert_eq!(peer, format!("{}:4470", lab.worker_addr4(i)));
        }
    }
}
