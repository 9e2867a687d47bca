//! `cargo xtask bench --only cluster-drain`: the drain rate of a cluster with 2 LB nodes beside
//! one with 1, in the same run (issue 13).
//!
//! Each size is the cluster lab of `cargo xtask demo --lb-nodes N` (the router's ECMP over the
//! nodes, etcd, both workers registered with `[control_tls]`). `baton-load --idle` opens
//! `--cluster-drain-connections` connections over the VIP; then `baton drain` of the worker
//! holding most of them runs from the client host with the cluster migration config, which writes
//! each flip to etcd once and releases each source only after every live node applied the flip.
//! Its wall time gives connections/s. Afterwards every connection makes one more request on the
//! connection it started with: nothing may fail or reconnect. The ratio (2 nodes / 1 node) is
//! what the second node costs a drain: one more applied report to wait for per flip.
use crate::demo::cluster::Cluster;
use crate::demo::vip_target;
use crate::lab;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const TAG: &str = "cluster-drain";
/// How long the idle connections may take to come up, and the load to stop.
const PATIENCE: Duration = Duration::from_secs(150);

#[derive(clap::Args, Clone, Debug)]
pub struct ClusterDrainOptions {
    /// cluster-drain: idle connections opened, then drained, per cluster size.
    #[arg(
        long = "cluster-drain-connections",
        id = "cluster-drain-connections",
        value_name = "N",
        default_value_t = 300
    )]
    pub connections: usize,
    /// cluster-drain: migrations in flight at once (`baton drain --concurrency`).
    #[arg(
        long = "cluster-drain-concurrency",
        id = "cluster-drain-concurrency",
        value_name = "N",
        default_value_t = 16
    )]
    pub concurrency: usize,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[bench {TAG}] {}", msg.as_ref());
}

/// One size's figures.
struct Drained {
    lb_nodes: usize,
    moved: u64,
    secs: f64,
}

impl Drained {
    fn rate(&self) -> f64 {
        self.moved as f64 / self.secs.max(1e-9)
    }
}

pub fn run(bins: &Path, opts: &ClusterDrainOptions) -> Result<()> {
    if opts.connections == 0 || opts.concurrency == 0 {
        bail!("--cluster-drain-connections and --cluster-drain-concurrency must be at least 1");
    }
    crate::demo::cluster::refuse_running_nodes()?;
    let mut results = Vec::new();
    for lb_nodes in [1, 2] {
        results.push(measure(bins, lb_nodes, opts)?);
    }
    println!("{}", report(opts, &results));
    Ok(())
}

/// A cluster of `lb_nodes` nodes up, the idle load, the timed drain, the check, the teardown.
fn measure(bins: &Path, lb_nodes: usize, opts: &ClusterDrainOptions) -> Result<Drained> {
    let cluster = Cluster::up(bins, lb_nodes)?;
    let mut run = cluster.new_run(bins);
    let result = (|| {
        cluster.start(&mut run)?;
        let n = opts.connections;
        let args = super::drain::idle_load_args(n);
        let t = Instant::now();
        let load = run.start_load_to(&[vip_target(lab::VIP4)], &args, false)?;
        run.wait_ready(&load, n, PATIENCE, say)?;
        say(format!(
            "{lb_nodes} LB node(s): {n} idle connections up in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
        let worker = busiest(&run.baton_json(&["conns"])?)?;
        say(format!(
            "$ baton drain {worker} --concurrency {} ({lb_nodes} LB node(s))",
            opts.concurrency
        ));
        let t = Instant::now();
        let drained = run.baton_json(&[
            "drain",
            &worker,
            "--concurrency",
            &opts.concurrency.to_string(),
        ])?;
        let secs = t.elapsed().as_secs_f64();
        let moved = drained["moved"].as_u64().unwrap_or(0);
        let failed = drained["failed"].as_u64().unwrap_or(u64::MAX);
        say(format!(
            "moved {moved}, failed {failed} in {:.0} ms ({:.0} connections/s)",
            secs * 1000.0,
            moved as f64 / secs.max(1e-9)
        ));
        let summary = run.stop_load(load, PATIENCE)?;
        let count = |k: &str| summary[k].as_u64().unwrap_or(u64::MAX);
        if failed != 0 || moved == 0 {
            bail!("the drain moved {moved} and failed {failed}: {drained}");
        }
        if count("failed") != 0 || count("reconnects") != 0 || count("connection_errors") != 0 {
            bail!("the load saw failures after the drain: {summary}");
        }
        Ok(Drained {
            lb_nodes,
            moved,
            secs,
        })
    })();
    if result.is_err() {
        run.show_logs();
    }
    cluster.teardown(&mut run)?;
    result
}

/// The worker `baton conns` lists most connections on.
fn busiest(conns: &Value) -> Result<String> {
    let mut by_worker = BTreeMap::<String, usize>::new();
    for r in conns.as_array().context("`baton conns` gave no list")? {
        *by_worker
            .entry(r["worker"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    by_worker
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(w, _)| w)
        .context("`baton conns` lists no connection")
}

fn report(opts: &ClusterDrainOptions, results: &[Drained]) -> String {
    let mut out = format!(
        "\ncluster drain rate ({} idle connections per size, `baton drain --concurrency {}` from the client host)\n",
        opts.connections, opts.concurrency
    );
    for d in results {
        out.push_str(&format!(
            "  {} LB node(s)   {:>5} moved in {:>7.0} ms   {:>6.0} connections/s\n",
            d.lb_nodes,
            d.moved,
            d.secs * 1000.0,
            d.rate()
        ));
    }
    if let [one, two] = results {
        out.push_str(&format!(
            "  ratio         2 nodes / 1 node = {:.2}\n",
            two.rate() / one.rate().max(1e-9)
        ));
        out.push_str(&format!(
            "RESULT cluster_drain connections={} one_node_per_s={:.0} two_nodes_per_s={:.0} ratio={:.2}",
            opts.connections,
            one.rate(),
            two.rate(),
            two.rate() / one.rate().max(1e-9)
        ));
    }
    out
}
