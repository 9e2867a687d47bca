//! baton-lb as a cluster node (`[cluster]`), in the netns lab with a real etcd (in the LB's
//! namespace, reachable from every host of the lab): the workers register themselves and the
//! node routes to them; `baton migrate` runs on the *client* host, which has no baton-lb, no
//! pins and no worker sockets: it finds the workers' control API (mutual TLS) in etcd and writes
//! each flip there, and the node applies it. Then etcd is SIGKILLed under load: forwarding never
//! stops, a migration asked for meanwhile fails with the etcd error, and once etcd is back the
//! node catches up and migrations succeed again. In between, drivers die mid-migration and
//! `baton recover` finishes or rolls back what they left.
mod support;

use baton_cluster::testing::{Etcd, NETNS_CLIENT_PORT};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::Duration;
use support::cluster::{
    PREFIX, baton_in, cluster_member_configs, etcd_keys, etcd_overrides, json_of,
};
use support::*;

const NODE: &str = "lb1";
const PATIENCE: Duration = Duration::from_secs(60);
const CONNECTIONS: usize = 6;

/// The lab's two workers as cluster members (etcd at their gateway, their own lab address);
/// returns the migration config of the client host (etcd at its gateway).
fn cluster_configs(lab: &Lab, dir: &Path) -> PathBuf {
    write_worker_configs(dir);
    let endpoints = [0, 1].map(|i| {
        format!(
            "http://{}.1{}.1:{NETNS_CLIENT_PORT}",
            baton_lab::PRIVATE.net4,
            i + 1
        )
    });
    let driver = format!("http://{}:{NETNS_CLIENT_PORT}", lab.net.client_gateway4());
    cluster_member_configs(
        dir,
        &endpoints,
        &[0, 1].map(|i| lab.net.worker_addr4(i)),
        &driver,
    )
}

fn baton_on_client(lab: &Lab, mc: &Path, args: &[&str]) -> Output {
    baton_in(&lab.client, mc, args)
}

/// The node's view through its control socket: (applied revision, watching, healthy workers).
fn node_state(lab: &Lab) -> (i64, bool, Vec<String>) {
    support::cluster::node_state(&lab.status_via_socket().unwrap_or(Value::Null))
}

/// The CIDs etcd holds overrides for, and the ones the node's map holds.
fn overrides(lab: &Lab, etcd: &Etcd) -> (BTreeSet<String>, BTreeSet<String>) {
    let in_etcd = etcd_overrides(etcd);
    let in_map = lab
        .baton_json(&["override", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["cid"].as_str().map(String::from))
        .collect();
    (in_etcd, in_map)
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Moves every connection to the other worker from the client host; returns the flips' count.
fn migrate_all(lab: &Lab, mc: &Path, round: usize) -> usize {
    let rows = json_of(&baton_on_client(lab, mc, &["conns"]), "baton conns");
    let rows = rows.as_array().unwrap().clone();
    assert_eq!(rows.len(), CONNECTIONS, "round {round}: {rows:?}");
    for r in &rows {
        let conn = r["conn"].as_str().unwrap();
        let to = if r["worker"] == "w1" { "w2" } else { "w1" };
        let v = json_of(
            &baton_on_client(lab, mc, &["migrate", conn, "--to", to]),
            &format!("round {round}: baton migrate {conn} --to {to}"),
        );
        assert_eq!(v["ok"], true, "round {round}: {v}");
        assert!(
            v["release_warning"].is_null(),
            "round {round}: the source was released only after the node applied the flip: {v}"
        );
    }
    rows.len()
}

/// Three drivers die mid-migration (after writing the record, after the commit, after the
/// flip); `baton recover` then rolls the first back and finishes the other two: the connections
/// end where each migration got to, the load sees nothing, and no record is left. Returns the
/// migrations that completed.
fn drivers_that_die_are_recovered(lab: &Lab, mc: &Path, etcd: &Etcd) -> usize {
    let rows = json_of(&baton_on_client(lab, mc, &["conns"]), "baton conns");
    let rows = rows.as_array().unwrap();
    let mut expected = Vec::new();
    // What became of each: `baton recover` says, or a later `baton migrate` that recovered one
    // first (a driver's lease may end before the next one starts) said so on stderr.
    let mut outcomes: BTreeMap<String, String> = BTreeMap::new();
    let mut note = |stderr: &str| {
        for line in stderr.lines() {
            if let Some(rest) = line.split("recovered migration ").nth(1) {
                let conn = rest
                    .split(" of connection ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next());
                let outcome = rest.rsplit(": ").next();
                if let (Some(c), Some(o)) = (conn, outcome) {
                    outcomes.insert(c.into(), o.into());
                }
            }
        }
    };
    for (r, step) in rows.iter().zip(["begin", "transfer", "flip"]) {
        let conn = r["conn"].as_str().unwrap().to_string();
        let from = r["worker"].as_str().unwrap().to_string();
        let to = if from == "w1" { "w2" } else { "w1" };
        let out = baton_on_client(
            lab,
            mc,
            &["migrate", &conn, "--to", to, "--die-after", step],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(137),
            "the driver dies after {step}: {stderr}"
        );
        note(&stderr);
        let ends_on = if step == "begin" {
            from.clone()
        } else {
            to.into()
        };
        let outcome = if step == "begin" {
            "rolled_back"
        } else {
            "completed"
        };
        expected.push((conn, step, ends_on, outcome));
    }
    // Until a dead driver's lease ends (2 s) its migration is its own: left alone.
    let report = std::cell::RefCell::new(Value::Null);
    wait_for(
        "baton recover to settle the three dead drivers' migrations",
        || {
            let r = json_of(&baton_on_client(lab, mc, &["recover"]), "baton recover");
            assert_eq!(r["ok"], true, "{r}");
            let m = r["migrations"].as_array().unwrap().clone();
            *report.borrow_mut() = r;
            for row in &m {
                assert!(row["detail"].is_null(), "nothing was left over: {row}");
                if row["outcome"] != "driver_alive" {
                    outcomes.insert(
                        row["conn"].as_str().unwrap().into(),
                        row["outcome"].as_str().unwrap().into(),
                    );
                }
            }
            m.is_empty() && outcomes.len() == 3
        },
        || format!("{}", report.borrow()),
    );
    for (conn, step, _, outcome) in &expected {
        assert_eq!(
            outcomes.get(conn).map(String::as_str),
            Some(*outcome),
            "the driver died after {step}: {outcomes:?}"
        );
    }
    let now = json_of(&baton_on_client(lab, mc, &["conns"]), "baton conns");
    for (conn, step, ends_on, _) in &expected {
        let row = now
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["conn"] == conn.as_str());
        assert_eq!(
            row.map(|r| r["worker"].clone()),
            Some(Value::from(ends_on.as_str())),
            "the driver died after {step}: {now}"
        );
    }
    assert_eq!(
        etcd_keys(etcd, "migrations"),
        Default::default(),
        "no migration left in flight after the recovery"
    );
    let again = json_of(&baton_on_client(lab, mc, &["recover"]), "baton recover");
    assert_eq!(again["migrations"], Value::Array(vec![]), "{again}");
    2
}

#[test]
fn a_cluster_node_follows_etcd_through_migrations_and_an_etcd_crash() {
    let mut lab = Lab::new(LabOptions {
        cluster: Some(format!(
            "endpoints = [\"http://127.0.0.1:{NETNS_CLIENT_PORT}\"]\nprefix = \"{PREFIX}\"\n\
             node = \"{NODE}\"\nlease_ttl_s = 4"
        )),
        ..Default::default()
    });
    let mut etcd = Etcd::start_in_netns("cluster-netns", &lab.lb);
    lab.start_lb();
    let (_, _, workers) = node_state(&lab);
    assert!(
        workers.is_empty(),
        "no worker before any registers: {workers:?}"
    );
    wait_for(
        "the node to follow etcd",
        || node_state(&lab).1,
        || format!("{:?}\n{}", node_state(&lab), tail(&lab.log_text(), 20)),
    );

    let dir = std::env::temp_dir().join(format!("baton-cluster-netns-{}", std::process::id()));
    let mc = cluster_configs(&lab, &dir);
    // Short driver leases: a driver that dies is recovered after 2 s ([cluster] is last).
    let text = std::fs::read_to_string(&mc).unwrap();
    std::fs::write(&mc, text + "driver_lease_s = 2\n").unwrap();
    let _workers = Workers((0..2).map(|i| spawn_worker(&lab, &dir, i, &[])).collect());
    wait_for(
        "the node to route to both registered workers",
        || node_state(&lab).2.len() == 2,
        || format!("{:?}\n{}", node_state(&lab), tail(&lab.log_text(), 20)),
    );

    let mut load = Load::start(&lab, &dir, "cluster", vip(false), CONNECTIONS, PATIENCE);
    let mut flips = 0;
    for round in 1..=2 {
        let before = node_state(&lab).0;
        let moved = migrate_all(&lab, &mc, round);
        // Each flip (one transaction for all of a connection's CIDs) and each retirement is a
        // revision the node applied before the source was released.
        let after = node_state(&lab).0;
        assert!(
            after >= before + moved as i64,
            "round {round}: the node applied {moved} flips from etcd: revision {before} -> {after}"
        );
        flips += moved;
    }
    // Overrides whose old CIDs the clients still use stay; the rest were retired, in both.
    let (in_etcd, in_map) = overrides(&lab, &etcd);
    assert_eq!(in_etcd, in_map, "the node's override map is etcd's");
    assert_eq!(
        etcd_keys(&etcd, "migrations"),
        Default::default(),
        "no migration left in flight"
    );

    flips += drivers_that_die_are_recovered(&lab, &mc, &etcd);

    // etcd dies under load: the data plane keeps forwarding on what it applied.
    let some = json_of(&baton_on_client(&lab, &mc, &["conns"]), "baton conns");
    let conn = some[0]["conn"].as_str().unwrap().to_string();
    etcd.kill();
    let down = baton_on_client(&lab, &mc, &["migrate", &conn, "--to", "w1"]);
    assert!(
        !down.status.success(),
        "a migration with etcd down must fail"
    );
    let v: Value = serde_json::from_slice(&down.stdout).unwrap_or(Value::Null);
    assert!(
        v["kind"] == "cluster_unavailable"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("etcd is unreachable")),
        "the failure says etcd is unreachable: {v} {}",
        String::from_utf8_lossy(&down.stderr)
    );
    wait_for(
        "the node to notice etcd is gone",
        || !node_state(&lab).1,
        || format!("{:?}", node_state(&lab)),
    );
    let before = load.requests_per_connection();
    wait_for(
        "every connection to carry on while etcd is down",
        || {
            let now = load.requests_per_connection();
            now.iter().zip(&before).all(|(n, b)| *n >= b + 20)
        },
        || format!("{before:?} -> {:?}", load.requests_per_connection()),
    );
    etcd.restart();
    wait_for(
        "the node to follow etcd again",
        || node_state(&lab).1,
        || format!("{:?}\n{}", node_state(&lab), tail(&lab.log_text(), 20)),
    );
    // The workers' registrations outlived the outage (etcd extends every lease when it starts).
    wait_for(
        "both workers registered and routed again",
        || node_state(&lab).2.len() == 2,
        || format!("{:?}", node_state(&lab)),
    );
    flips += migrate_all(&lab, &mc, 3);
    let (in_etcd, in_map) = overrides(&lab, &etcd);
    assert_eq!(
        in_etcd, in_map,
        "after etcd came back the node's maps are etcd's"
    );

    let summary = load.stop(PATIENCE);
    support::cluster::assert_load_clean(&summary, CONNECTIONS);
    let n = |k: &str| summary[k].as_u64().unwrap_or(u64::MAX);
    let (applied, _, _) = node_state(&lab);
    eprintln!(
        "RESULT cluster_node connections={CONNECTIONS} migrations={flips} requests={} applied_revision={applied}",
        n("requests")
    );
    drop(load);
    let _ = std::fs::remove_dir_all(&dir);
}
