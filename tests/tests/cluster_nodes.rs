//! Two LB nodes behind an ECMP router, following one etcd (issue 13): client flows spread over
//! both nodes, which route them identically (the same Maglev table from the same worker set, the
//! same overrides from the same flips). Every connection is moved by `baton drain`, run on the
//! client host, three times under load; then one node's baton-lb is SIGKILLed and the router
//! stops sending to it (its BGP session would end): its flows reach the other node, which routes
//! them to the same workers, and a last drain moves them all again. Nothing fails, nothing
//! reconnects, every stream is byte-exact.
mod support;

use std::time::{Duration, Instant};
use support::cluster::{ClusterLab, assert_load_clean, carry_on, etcd_health};
use support::*;

const CONNECTIONS: usize = 32;
const LOAD_PATIENCE: Duration = Duration::from_secs(90);

#[test]
fn two_lb_nodes_share_flows_and_route_them_identically_through_drains_and_a_dead_node() {
    let mut lab = ClusterLab::up(2);
    lab.nodes_agree("at the start");
    // Each node publishes each worker's health as its checks see it (none here: healthy).
    let every = |healthy: bool| -> std::collections::BTreeMap<String, bool> {
        ["lb1/w1", "lb1/w2", "lb2/w1", "lb2/w2"]
            .map(|k| (k.to_string(), healthy))
            .into_iter()
            .collect()
    };
    wait_for(
        "both nodes' health records of both workers",
        || etcd_health(&lab.etcd) == every(true),
        || format!("{:?}", etcd_health(&lab.etcd)),
    );
    let before = lab.vip_packets();
    let mut load = Load::start_in(
        &lab.net.client,
        &lab.dir,
        "cluster2",
        &[lab.vip()],
        CONNECTIONS,
        &["--request-interval", "50ms", "--stream-rate", "16384"],
        LOAD_PATIENCE,
    );
    carry_on(&load, "before the drains");
    let mut drains = Vec::new();
    for worker in ["w1", "w2", "w1"] {
        let held = lab
            .baton_json(&["conns"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["worker"] == worker)
            .count();
        if held == 0 {
            continue;
        }
        let started = Instant::now();
        let s = lab.drain(worker);
        assert_eq!(
            s["moved"].as_u64(),
            Some(held as u64),
            "drain {worker}: {s}"
        );
        drains.push((worker, held, started.elapsed()));
        carry_on(&load, &format!("after draining {worker}"));
        lab.nodes_agree(&format!("after draining {worker}"));
    }
    let seen: Vec<u64> = lab
        .vip_packets()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let total: u64 = seen.iter().sum();
    for (k, n) in seen.iter().enumerate() {
        // 32 flows hashed over 2 next hops: fewer than 10% on one node is a one-in-a-million draw.
        assert!(
            *n * 10 >= total,
            "lb{} routed a fair share of the VIP's datagrams: {seen:?}",
            k + 1
        );
    }

    // lb2 dies: its process goes, and the router stops sending to it (its BGP session ended).
    lab.nodes[1].kill();
    lab.net.route_through(&[0]).unwrap();
    // Its health records go with its lease.
    wait_for(
        "lb2's health records to go with its lease",
        || etcd_health(&lab.etcd).keys().all(|k| k.starts_with("lb1/")),
        || format!("{:?}", etcd_health(&lab.etcd)),
    );
    let on_lb1 = lab.vip_packets()[0];
    carry_on(&load, "after lb2 died");
    assert!(lab.vip_packets()[0] > on_lb1, "lb1 routes lb2's flows");
    // The survivor is the only live node once lb2's lease ended: drains wait for it alone.
    let conns = lab.baton_json(&["conns"]);
    let worker = conns[0]["worker"].as_str().unwrap().to_string();
    lab.drain(&worker);
    carry_on(&load, "after the drain with one node");

    let summary = load.stop(LOAD_PATIENCE);
    assert_load_clean(&summary, CONNECTIONS);
    let n = |k: &str| summary[k].as_u64().unwrap_or(u64::MAX);
    for (w, held, took) in &drains {
        eprintln!(
            "RESULT cluster2 drain={w} moved={held} ms={}",
            took.as_millis()
        );
    }
    eprintln!(
        "RESULT cluster2 connections={CONNECTIONS} vip_datagrams_per_node={seen:?} requests={}",
        n("requests")
    );
}
