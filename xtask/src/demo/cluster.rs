//! `cargo xtask demo --lb-nodes N` (N > 1): the demo's load and migrations across the LB nodes of
//! a cluster on etcd.
//!
//! Brings the cluster lab up (`cargo xtask lab up --lb-nodes N`, `lab/src/cluster.rs`: a router
//! spreading the VIP's flows over the nodes with ECMP on their ports, the workers and etcd on one
//! switched segment), starts etcd in its namespace, N `baton-lb` cluster nodes (each with its own
//! pins and control socket, following etcd), both workers registering themselves in etcd (with
//! `[control_tls]`, so `baton` reaches them from the client host), and `baton-load` in the client
//! namespace over the IPv4 VIP (the cluster lab routes no IPv6). While the load runs every
//! connection moves w1 -> w2 -> w1, `--rounds` times, by `baton migrate` run in the client
//! namespace with a cluster migration config (etcd and the workers' control API only): each flip
//! is written once to etcd and the source is released only after every live node applied it.
//! The report adds each node's share of the VIP's datagrams (its data plane's `ipv4` counter
//! over the load) and the revision it applied; the verdict also needs every node to have routed
//! at least [`MIN_SHARE_OF_FAIR`] of a fair share (10% with two nodes).
use super::{
    Options, ReportExtra, Run, STATE_DIR, baton_lb_binary, lb_status, load_args, print_outcome,
    say, stop_processes, vip_target, wait_until,
};
use crate::lab;
use anyhow::{Context, Result, bail};
use baton_lab::cluster::{ClusterTopology, MAX_LB_NODES};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workers' peer channel, on their segment address.
const PEER_PORT: u16 = 4470;
/// The workers' control API (mutual TLS) on their segment address.
const CONTROL_PORT: u16 = 4480;
/// etcd's peer URL (one member, in its namespace).
const ETCD_PEER: &str = "http://127.0.0.1:2380";
/// Each node must route at least this fraction of a fair share (1/N) of the VIP's datagrams.
/// The router hashes each flow's ports, which the client picks at random: with two nodes and the
/// demo's sizes (32 connections with `--small`, 64 without), a node below 10% would need at most
/// 3 (or 6) of the flows, a draw of about 3 in a million (or less than 1 in 10^11).
const MIN_SHARE_OF_FAIR: f64 = 0.2;
/// How long anything the demo starts may take to be ready (a loaded 2-core machine).
const READY: Duration = Duration::from_secs(60);

/// The names (state directory `<name>.log`, `.pid`) of the processes this module starts beside
/// the workers and the load: the LB nodes and etcd.
pub(crate) fn processes() -> Vec<String> {
    (1..=MAX_LB_NODES)
        .map(|k| format!("lb{k}"))
        .chain(["etcd".to_string()])
        .collect()
}

/// One LB node of the run.
struct Node {
    name: String,
    ns: String,
    socket: PathBuf,
    pin_dir: PathBuf,
    config: PathBuf,
}

impl Node {
    /// `baton --json status` of this node (its pins and socket): the data plane's counters.
    fn counters(&self, bins: &Path) -> Result<Value> {
        let out = Command::new(bins.join("baton"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--control-socket")
            .arg(&self.socket)
            .args(["--json", "status"])
            .output()
            .context("running baton status")?;
        if !out.status.success() {
            bail!(
                "baton status of {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("parsing baton status")?;
        Ok(v["counters"].clone())
    }

    /// The registered workers this node routes new connections to (healthy, with Maglev slots).
    fn routed_workers(&self) -> usize {
        lb_status(&self.socket)
            .and_then(|s| {
                s["workers"].as_array().map(|a| {
                    a.iter()
                        .filter(|w| w["healthy"] == true && w["maglev_slots"].as_u64() > Some(0))
                        .count()
                })
            })
            .unwrap_or(0)
    }

    /// The etcd revision the node's maps reflect (`status` → `cluster.applied_revision`).
    fn applied_revision(&self) -> Option<i64> {
        lb_status(&self.socket).and_then(|s| s["cluster"]["applied_revision"].as_i64())
    }

    /// Takes the node's program off and removes its pins (`baton-lb detach`, which first stops a
    /// baton-lb still answering on the node's socket).
    fn detach(&self, bins: Option<&Path>) {
        detach_node(bins, &self.pin_dir, &self.socket);
    }
}

fn detach_node(bins: Option<&Path>, pin_dir: &Path, socket: &Path) {
    if !pin_dir.exists() {
        return;
    }
    let Some(lb) = baton_lb_binary(bins) else {
        say(format!(
            "no baton-lb binary found to detach {}: run `baton-lb detach --pin-dir {}`",
            pin_dir.display(),
            pin_dir.display()
        ));
        return;
    };
    match Command::new(lb)
        .arg("detach")
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--control-socket")
        .arg(socket)
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => say(format!(
            "baton-lb detach --pin-dir {}: {}",
            pin_dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => say(format!("running baton-lb detach: {e}")),
    }
}

/// Fails if an LB node of a cluster demo answers (a `--keep` run, or another demo).
pub(crate) fn refuse_running_nodes() -> Result<()> {
    for k in 0..MAX_LB_NODES {
        let socket = lab::cluster_node_socket(k);
        if lb_status(&socket).is_some() {
            bail!(
                "a cluster LB node is already running on {} (a `--keep` demo with --lb-nodes?): \
                 stop it first (`cargo xtask demo --down`)",
                socket.display()
            );
        }
    }
    Ok(())
}

/// `--down`: after the processes are stopped, removes every cluster node's pins and the cluster
/// lab's namespaces.
pub(crate) fn remove_lab() -> Result<()> {
    for k in 0..MAX_LB_NODES {
        detach_node(None, &lab::cluster_pin_dir(k), &lab::cluster_node_socket(k));
    }
    let _ = std::fs::remove_dir_all(Path::new(STATE_DIR).join("etcd"));
    lab::cluster_down_quiet()
}

/// The etcd server binary `cargo xtask setup` installs (Debian's `etcd-server`).
fn etcd_binary() -> Result<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("etcd is not installed: run `cargo xtask setup` (Debian's etcd-server)")
}

pub(crate) struct Cluster {
    topo: ClusterTopology,
    nodes: Vec<Node>,
    etcd_bin: PathBuf,
}

/// The cluster demo; `connections`, `rounds` and `duration` as [`super::run`] resolved them.
pub(crate) fn run(
    opts: &Options,
    bins: PathBuf,
    connections: usize,
    rounds: u32,
    duration: u64,
) -> Result<()> {
    if opts.http3 {
        bail!("--lb-nodes runs the demo protocol only: leave out --http3");
    }
    if !opts.encap.is_empty() {
        bail!("--lb-nodes reaches the workers on the cluster lab's segment: leave out --encap");
    }
    let cluster = Cluster::up(&bins, opts.lb_nodes)?;
    let mut run = cluster.new_run(&bins);
    run.keep = opts.keep;
    run.request_interval_ms = opts.request_interval_ms;
    run.settle = opts.settle;

    let outcome = cluster.demo(&mut run, opts, connections, rounds, duration);
    if let Err(e) = &outcome {
        say(format!("error: {e:#}"));
        run.show_logs();
    }
    if opts.keep {
        run.children.clear(); // keep them running; their pids are in the state dir
        cluster.keep_hints(&bins);
    } else {
        cluster.teardown(&mut run)?;
    }
    print_outcome(outcome)
}

impl Cluster {
    /// The cluster lab with `lb_nodes` nodes, up (namespaces, links, routes); nothing started in
    /// it yet. Stale pins of an earlier run are removed first.
    pub(crate) fn up(bins: &Path, lb_nodes: usize) -> Result<Cluster> {
        let etcd_bin = etcd_binary()?;
        // Checked before anything starts: the topology refuses a size the lab cannot build.
        let topo = lab::cluster_topology(lb_nodes)?;
        let nodes: Vec<Node> = (0..lb_nodes)
            .map(|k| Node {
                name: format!("lb{}", k + 1),
                ns: topo.lbs[k].clone(),
                socket: lab::cluster_node_socket(k),
                pin_dir: lab::cluster_pin_dir(k),
                config: Path::new(STATE_DIR).join(format!("lb{}.toml", k + 1)),
            })
            .collect();
        for node in &nodes {
            if node.pin_dir.exists() {
                say(format!(
                    "removing stale pins in {} left by an earlier run (`baton-lb detach`)",
                    node.pin_dir.display()
                ));
                node.detach(Some(bins));
            }
        }
        say(format!(
            "bringing the cluster lab up: {lb_nodes} LB nodes behind router {} (ECMP on ports), etcd and the workers on one segment",
            topo.router
        ));
        let topo = lab::cluster_up_quiet(lb_nodes)?;
        Ok(Cluster {
            topo,
            nodes,
            etcd_bin,
        })
    }

    /// A [`Run`] in this cluster: the load in its client namespace, the workers' peers on their
    /// segment, and `baton` where an operator's would run, on the client host, reaching etcd and
    /// the workers' control API through the router (it needs no pins and no socket of a node).
    pub(crate) fn new_run(&self, bins: &Path) -> Run {
        let mut run = Run::new(bins.to_path_buf());
        run.client_ns = self.topo.client.clone();
        run.worker_peers = [0, 1].map(|i| format!("{}:{PEER_PORT}", self.topo.worker_addr4(i)));
        run.baton_netns = Some(self.topo.client.clone());
        run
    }

    /// A fresh state directory and its files, then etcd, the LB nodes and both workers, until
    /// every node routes to both registered workers.
    pub(crate) fn start(&self, run: &mut Run) -> Result<()> {
        let _ = std::fs::remove_dir_all(&run.state);
        std::fs::create_dir_all(&run.state)
            .with_context(|| format!("creating {}", run.state.display()))?;
        run.prepare_files(true)?;
        self.write_files(run)?;
        self.start_etcd(run)?;
        self.start_nodes(run)?;
        run.start_workers(self.topo.workers.each_ref().map(String::as_str), true)?;
        for node in &self.nodes {
            wait_until(
                READY,
                &format!("{} routing to both registered workers", node.name),
                || {
                    run.check_children()?;
                    Ok(node.routed_workers() == 2)
                },
            )?;
        }
        say(format!(
            "every node follows etcd and routes to both workers (etcd at revision {})",
            self.etcd_revision().unwrap_or(0)
        ));
        Ok(())
    }

    fn etcd_endpoint(&self) -> String {
        lab::cluster_etcd_endpoint(&self.topo)
    }

    /// `etcdctl ARGS` in etcd's namespace.
    fn etcdctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.topo.etcd, "etcdctl"])
            .args(["--endpoints", &self.etcd_endpoint()])
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null());
        c
    }

    /// etcd's current revision (None if it does not answer).
    fn etcd_revision(&self) -> Option<i64> {
        let out = self
            .etcdctl(&["endpoint", "status", "--write-out", "json"])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v[0]["Status"]["header"]["revision"].as_i64()
    }

    /// The workers' `[cluster]` and `[control_tls]` tables (appended to the configs
    /// [`Run::prepare_files`] wrote), the nodes' configs, and the client host's migration config,
    /// which knows etcd and the controller's credentials only.
    fn write_files(&self, run: &Run) -> Result<()> {
        let s = &run.state;
        let pki = s.join("pki");
        let p = pki.display();
        let endpoint = self.etcd_endpoint();
        let prefix = lab::CLUSTER_PREFIX;
        for i in 0..2 {
            let name = format!("w{}", i + 1);
            let path = s.join(format!("{name}.toml"));
            let mut text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let addr = self.topo.worker_addr4(i);
            text.push_str(&format!(
                "[cluster]\nendpoints = [\"{endpoint}\"]\nprefix = \"{prefix}\"\naddress = \"{addr}\"\n\
                 [control_tls]\nlisten = \"{addr}:{CONTROL_PORT}\"\nca = \"{p}/ca.pem\"\n\
                 cert = \"{p}/{name}.pem\"\nkey = \"{p}/{name}.key\"\nclients = [\"baton-controller\"]\n"
            ));
            std::fs::write(&path, text)?;
        }
        std::fs::write(
            s.join("migration.toml"),
            format!(
                "# The client host's migration config: etcd and the workers' control API only.\n\
                 secrets = \"{p}/controller-secrets.toml\"\n\
                 [control_tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/controller.pem\"\nkey = \"{p}/controller.key\"\n\
                 [cluster]\nendpoints = [\"{endpoint}\"]\nprefix = \"{prefix}\"\napplied_timeout_ms = 10000\n"
            ),
        )?;
        let written = lab::write_cluster_node_configs(
            &self.topo,
            s,
            &format!("`cargo xtask demo --lb-nodes {}`", self.nodes.len()),
        )?;
        debug_assert!(written.iter().zip(&self.nodes).all(|(w, n)| *w == n.config));
        Ok(())
    }

    fn start_etcd(&self, run: &mut Run) -> Result<()> {
        say(format!(
            "starting etcd in namespace {} ({})",
            self.topo.etcd,
            self.etcd_endpoint()
        ));
        let mut etcd = Command::new("ip");
        etcd.args(["netns", "exec", &self.topo.etcd])
            .arg(&self.etcd_bin)
            .args(["--name", "baton-lab", "--data-dir"])
            .arg(run.state.join("etcd"))
            .args(["--listen-client-urls", "http://0.0.0.0:2379"])
            .args(["--advertise-client-urls", &self.etcd_endpoint()])
            .args(["--listen-peer-urls", ETCD_PEER])
            .args(["--initial-advertise-peer-urls", ETCD_PEER])
            .args(["--initial-cluster", &format!("baton-lab={ETCD_PEER}")])
            // One member: fast elections.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null());
        run.spawn("etcd", &mut etcd)?;
        wait_until(READY, "etcd", || {
            run.check_children()?;
            Ok(self
                .etcdctl(&["endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()))
        })
    }

    fn start_nodes(&self, run: &mut Run) -> Result<()> {
        for node in &self.nodes {
            say(format!(
                "starting baton-lb cluster node {} in namespace {} (pins {}, socket {})",
                node.name,
                node.ns,
                node.pin_dir.display(),
                node.socket.display()
            ));
            let mut lb = Command::new(run.bins.join("baton-lb"));
            lb.args(["--netns", &node.ns, "--pin-dir"])
                .arg(&node.pin_dir)
                .arg("--config")
                .arg(&node.config)
                .env("BATON_LOG", "info");
            run.spawn(&node.name, &mut lb)?;
            wait_until(READY, &format!("{}'s control socket", node.name), || {
                run.check_children()?;
                Ok(lb_status(&node.socket).is_some())
            })?;
        }
        Ok(())
    }

    /// Every node's data-plane counters.
    fn counters(&self, bins: &Path) -> Result<Vec<Value>> {
        self.nodes.iter().map(|n| n.counters(bins)).collect()
    }

    fn demo(
        &self,
        run: &mut Run,
        opts: &Options,
        connections: usize,
        rounds: u32,
        duration: u64,
    ) -> Result<(bool, String)> {
        let started = Instant::now();
        if !run.migration_cli_available() {
            bail!(
                "the cluster demo needs the migration CLI (`baton migrate`, `baton-worker gen-certs`) in {}",
                run.bins.display()
            );
        }
        let migrations = !opts.no_migrate;
        self.start(run)?;

        let before = self.counters(&run.bins)?;
        say(format!(
            "starting baton-load in namespace {}: {connections} connections over IPv4 to {}, {}",
            self.topo.client,
            vip_target(lab::VIP4),
            match opts.path.flags() {
                Some(f) => format!("on an emulated path ({f})"),
                None => "on the lab's own path (veth, no loss)".into(),
            }
        ));
        let load = run.start_load_to(
            &[vip_target(lab::VIP4)],
            &load_args(opts, connections),
            true,
        )?;
        let load_started = Instant::now();
        let result = run.drive(
            |run: &mut Run| run.wait_ready(&load, connections, READY, say).map(drop),
            connections,
            rounds,
            duration,
            opts,
            migrations,
            started,
            load_started,
        );
        let summary = run.stop_load(load, READY);
        let migrated = result?;
        let summary = summary?;
        let after = self.counters(&run.bins)?;
        run.extra = self.shares(&before, &after);
        Ok(run.report(&summary, &migrated, started.elapsed()))
    }

    /// Each node's share of the VIP's datagrams over the load, the revision it applied, and the
    /// verdict's condition on the shares.
    fn shares(&self, before: &[Value], after: &[Value]) -> ReportExtra {
        let delta = |k: usize, key: &str| {
            after[k][key]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(before[k][key].as_u64().unwrap_or(0))
        };
        let vip: Vec<u64> = (0..self.nodes.len()).map(|k| delta(k, "ipv4")).collect();
        let total: u64 = vip.iter().sum();
        let pct = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 * 100.0 / total as f64
            }
        };
        let min_pct = 100.0 * MIN_SHARE_OF_FAIR / self.nodes.len() as f64;
        let mut extra = ReportExtra {
            result_head: format!("lb_nodes={} ", self.nodes.len()),
            ..ReportExtra::default()
        };
        extra.lines.push(format!(
            "LB nodes         {} behind router {} (ECMP over them for {}, hashing each flow's ports), following etcd {}; IPv4 only",
            self.nodes.len(),
            self.topo.router,
            lab::VIP4,
            self.etcd_endpoint()
        ));
        let mut low = Vec::new();
        for (k, node) in self.nodes.iter().enumerate() {
            let routed =
                ["routed_override", "routed_server_id", "routed_hash"].map(|key| delta(k, key));
            let applied = node.applied_revision();
            extra.lines.push(format!(
                "  {:<14} {} VIP datagrams ({:.1}%): by override {}, by server ID {}, by hash {}; applied etcd revision {}",
                node.name,
                vip[k],
                pct(vip[k]),
                routed[0],
                routed[1],
                routed[2],
                applied.map_or_else(|| "? (no answer)".into(), |r| r.to_string())
            ));
            extra.result_tail.push_str(&format!(
                " node{n}_vip_datagrams={} node{n}_share_pct={:.1} node{n}_applied_revision={}",
                vip[k],
                pct(vip[k]),
                applied.unwrap_or(0),
                n = k + 1
            ));
            if total == 0 || pct(vip[k]) < min_pct {
                low.push(format!("{} {:.1}%", node.name, pct(vip[k])));
            }
        }
        extra.lines.push(format!(
            "  {:<14} revision {} at the end (a node reports a revision only when it changed its maps)",
            "etcd",
            self.etcd_revision()
                .map_or_else(|| "? (no answer)".into(), |r| r.to_string())
        ));
        if !low.is_empty() {
            extra.failure = Some(format!(
                "VIP datagrams below {min_pct:.1}% on a node: {}",
                low.join(", ")
            ));
        }
        extra
    }

    /// Stops the load, workers, nodes and etcd (last: the workers revoke their leases as they
    /// stop), removes the nodes' pins, etcd's data and the cluster lab.
    pub(crate) fn teardown(&self, run: &mut Run) -> Result<()> {
        say("tearing down: load, workers, LB nodes, etcd, cluster lab");
        let etcd = run
            .children
            .iter()
            .position(|(n, _)| n == "etcd")
            .map(|i| run.children.remove(i));
        let state = run.state.clone();
        stop_processes(&state, Some(&mut *run));
        if let Some((_, mut etcd)) = etcd {
            // SAFETY: kill(2) on a child we started.
            unsafe { libc::kill(etcd.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while etcd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        for node in &self.nodes {
            node.detach(Some(&run.bins));
        }
        let _ = std::fs::remove_dir_all(state.join("etcd"));
        lab::cluster_down_quiet()
    }

    fn keep_hints(&self, bins: &Path) {
        say("--keep: the cluster lab, etcd, the LB nodes and the workers stay up. Try:");
        let b = bins.display();
        for node in &self.nodes {
            eprintln!(
                "  sudo {b}/baton --pin-dir {} --control-socket {} status",
                node.pin_dir.display(),
                node.socket.display()
            );
        }
        eprintln!(
            "  sudo ip netns exec {} env BATON_MIGRATION_CONFIG={STATE_DIR}/migration.toml {b}/baton conns",
            self.topo.client
        );
        eprintln!(
            "  sudo ip netns exec {} env ETCDCTL_API=3 etcdctl --endpoints {} get --prefix --keys-only {}/",
            self.topo.etcd,
            self.etcd_endpoint(),
            lab::CLUSTER_PREFIX
        );
        eprintln!("  logs: {STATE_DIR}/*.log     remove it all: sudo cargo xtask demo --down");
    }
}
