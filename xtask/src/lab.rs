//! `cargo xtask lab up|down`: the network-namespace lab for Baton, the fixed instance of the
//! topology in the `baton-lab` crate (`lab/src/lib.rs`, which draws it): namespaces
//! `baton-client`, `baton-lb`, `baton-w1`, `baton-w2`, addresses under 10.200/16 and
//! fd00:200::/32, interfaces `bt-*`. With `--lb-nodes N` (N > 1) it builds the cluster topology
//! instead (`lab/src/cluster.rs`): a router spreading the VIP over N LB nodes with ECMP, the
//! workers and an etcd on one switched segment, namespaces `baton-c-*`, and writes each node's
//! config.
use crate::util::{require_root, workspace_root};
use anyhow::Result;
use baton_lab::Topology;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum Action {
    /// Create the namespaces, links, addresses and routes (idempotent: re-running repairs).
    Up {
        /// LB nodes: 1 is the single-node lab; more builds the cluster lab (a router with an
        /// ECMP route over the nodes, hashing on ports; etcd in a namespace of its own).
        #[arg(long, default_value_t = 1)]
        lb_nodes: usize,
    },
    /// Remove the namespaces the lab made (and with them its interfaces).
    Down,
}

pub const CLIENT_NS: &str = baton_lab::FIXED_CLIENT_NS;
pub const LB_NS: &str = baton_lab::FIXED_LB_NS;
pub const VIP4: &str = baton_lab::FIXED.vip4;
pub const VIP6: &str = baton_lab::FIXED.vip6;

pub fn run(action: Action) -> Result<()> {
    require_root("cargo xtask lab")?;
    match action {
        Action::Up { lb_nodes: 1 } => up(),
        Action::Up { lb_nodes } => cluster_up(lb_nodes),
        Action::Down => down(),
    }
}

fn up() -> Result<()> {
    up_quiet()?;
    print_summary();
    Ok(())
}

/// `lab up` without the summary (for `cargo xtask demo`).
pub fn up_quiet() -> Result<()> {
    Topology::fixed().up()
}

/// The cluster lab's namespaces (`baton-c-*`, the fixed addresses).
pub(crate) fn cluster_topology(lb_nodes: usize) -> Result<baton_lab::cluster::ClusterTopology> {
    baton_lab::cluster::ClusterTopology::new("baton-c", lb_nodes, baton_lab::FIXED)
}

/// The etcd prefix of the cluster lab.
pub(crate) const CLUSTER_PREFIX: &str = "/baton/lab";

/// Where the cluster lab's etcd answers (in its namespace, on the worker segment).
pub(crate) fn cluster_etcd_endpoint(t: &baton_lab::cluster::ClusterTopology) -> String {
    format!("http://{}:2379", t.etcd_addr())
}

/// LB node `k`'s (0-based) control socket.
pub(crate) fn cluster_node_socket(k: usize) -> PathBuf {
    PathBuf::from(format!("/run/baton/lb{}.sock", k + 1))
}

/// LB node `k`'s pin directory.
pub(crate) fn cluster_pin_dir(k: usize) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/baton-lb{}", k + 1))
}

/// Writes each LB node's config, `lb<k>.toml`, into `dir` (a comment says `made_by` wrote it);
/// returns their paths.
pub(crate) fn write_cluster_node_configs(
    t: &baton_lab::cluster::ClusterTopology,
    dir: &Path,
    made_by: &str,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let etcd = cluster_etcd_endpoint(t);
    let mut paths = Vec::new();
    for k in 0..t.lbs.len() {
        let name = format!("lb{}", k + 1);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "# LB node {name} of the cluster lab ({made_by}).\n\
                 interface = \"{uplink}\"\nxdp_mode = \"skb\"\n[cid]\nlength = 8\nserver_id_length = 2\n\
                 [[vips]]\naddress = \"{VIP4}\"\nports = [4433]\n[health]\nkind = \"none\"\n\
                 [control]\nsocket = \"{socket}\"\n\
                 [cluster]\nendpoints = [\"{etcd}\"]\nprefix = \"{CLUSTER_PREFIX}\"\nnode = \"{name}\"\n",
                uplink = t.lb_uplink_dev(k),
                socket = cluster_node_socket(k).display(),
            ),
        )?;
        paths.push(config);
    }
    Ok(paths)
}

/// Builds the cluster lab with `lb_nodes` nodes (idempotent); its topology.
pub(crate) fn cluster_up_quiet(lb_nodes: usize) -> Result<baton_lab::cluster::ClusterTopology> {
    let t = cluster_topology(lb_nodes)?;
    t.up()?;
    Ok(t)
}

fn cluster_up(lb_nodes: usize) -> Result<()> {
    let t = cluster_up_quiet(lb_nodes)?;
    let dir = workspace_root().join("target/lab-cluster");
    let configs = write_cluster_node_configs(
        &t,
        &dir,
        &format!("`cargo xtask lab up --lb-nodes {lb_nodes}`"),
    )?;
    let etcd = cluster_etcd_endpoint(&t);
    println!(
        "Baton cluster lab is up: {lb_nodes} LB nodes behind {} (ECMP over them for {VIP4}, hashing on ports)",
        t.router
    );
    for k in 0..lb_nodes {
        println!(
            "  {:<13} uplink {} {}  segment {} {}",
            t.lbs[k],
            t.lb_uplink_dev(k),
            t.lb_uplink_addr(k),
            t.lb_segment_dev(k),
            t.lb_segment_addr(k)
        );
    }
    for i in 0..2 {
        println!("  {:<13} {} (VIP on lo)", t.workers[i], t.worker_addr4(i));
    }
    println!(
        "  {:<13} {}  client {}",
        t.etcd,
        t.etcd_addr(),
        t.client_addr()
    );
    println!();
    println!("Next (docs/CLUSTER.md; `cargo xtask demo --lb-nodes {lb_nodes}` does it all):");
    println!(
        "  sudo ip netns exec {} etcd --data-dir /tmp/baton-lab-etcd --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls {etcd} &",
        t.etcd
    );
    for (k, config) in configs.iter().enumerate() {
        println!(
            "  sudo target/release/baton-lb --netns {} --pin-dir {} --config {} &",
            t.lbs[k],
            cluster_pin_dir(k).display(),
            config.display()
        );
    }
    println!(
        "  workers: a [cluster] table (endpoints = [\"{etcd}\"], prefix = \"{CLUSTER_PREFIX}\", address = their segment address) registers them"
    );
    Ok(())
}

/// Removes the cluster lab's namespaces (whatever its size), saying which.
pub(crate) fn cluster_down_quiet() -> Result<()> {
    for ns in cluster_topology(baton_lab::cluster::MAX_LB_NODES)?.namespaces() {
        if baton_lab::ns_exists(ns) {
            baton_lab::sh(&["ip", "netns", "del", ns])?;
            println!("removed namespace {ns}");
        }
    }
    Ok(())
}

fn down() -> Result<()> {
    down_quiet()?;
    cluster_down_quiet()?;
    if std::path::Path::new("/sys/fs/bpf/baton").exists() {
        println!(
            "note: /sys/fs/bpf/baton still holds baton-lb's pins (the lab did not make them): \
             `baton-lb detach` removes them"
        );
    }
    Ok(())
}

/// Removes the lab's namespaces, saying which.
pub fn down_quiet() -> Result<()> {
    let removed = Topology::fixed().down()?;
    for ns in &removed {
        println!("removed namespace {ns}");
    }
    if removed.is_empty() {
        println!("no lab namespaces were present");
    }
    Ok(())
}

fn print_summary() {
    println!("Baton lab is up:");
    for p in &Topology::fixed().pairs() {
        for e in [&p.a, &p.b] {
            println!(
                "  {:<13} {:<9} {:<15} {:<18} {}",
                e.ns, e.dev, e.v4, e.v6, e.mac
            );
        }
    }
    println!(
        "  VIP {VIP4} and {VIP6} (UDP 4433) on lo in {} and {}",
        baton_lab::FIXED_WORKER_NS[0],
        baton_lab::FIXED_WORKER_NS[1]
    );
    let cfg = workspace_root().join("lab/lb.toml");
    println!();
    println!("Next:");
    println!("  cargo build --release -p lb-user");
    println!(
        "  sudo target/release/baton-lb --netns {LB_NS} --config {}",
        cfg.display()
    );
    println!("  sudo target/release/baton status");
    println!("  sudo bpftool map dump pinned /sys/fs/bpf/baton/BATON_WORKERS");
    println!("  (`ip netns exec` would hide the host's bpffs from baton-lb: use --netns)");
}

/// `lb_toml` (lab/lb.toml's text) without the `[[workers]]` tables named in `names`; each must
/// be there.
pub(crate) fn without_workers(lb_toml: &str, names: &[&str]) -> Result<String> {
    let mut out = String::new();
    let mut block: Option<String> = None;
    let mut removed = Vec::new();
    let named = |b: &str| {
        names.iter().copied().find(|name| {
            b.lines()
                .any(|l| l.trim().replace(' ', "") == format!("name=\"{name}\""))
        })
    };
    let mut flush = |block: &mut Option<String>, out: &mut String| {
        if let Some(b) = block.take() {
            match named(&b) {
                Some(name) => removed.push(name),
                None => out.push_str(&b),
            }
        }
    };
    for line in lb_toml.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            flush(&mut block, &mut out);
            if t.starts_with("[[workers]]") {
                block = Some(String::new());
            }
        }
        match &mut block {
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    flush(&mut block, &mut out);
    if let Some(missing) = names.iter().find(|n| !removed.contains(n)) {
        anyhow::bail!("lab/lb.toml has no [[workers]] table named {missing}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_named_worker_tables() {
        let toml = "interface = \"x\"\n[cid]\nlength = 8\n\n[[workers]]\nname = \"w1\"\nserver_id = 1\n\n[[workers]]\nname = \"w2\"\nserver_id = 2\n# note\n\n[health]\nkind = \"none\"\n";
        let out = without_workers(toml, &["w2"]).unwrap();
        assert!(out.contains("name = \"w1\"") && !out.contains("w2") && out.contains("[health]"));
        let out = without_workers(toml, &["w1", "w2"]).unwrap();
        assert!(
            !out.contains("[[workers]]") && out.contains("[health]"),
            "{out}"
        );
        assert!(without_workers(toml, &["w3"]).is_err());
    }
}
