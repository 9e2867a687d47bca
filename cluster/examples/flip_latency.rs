//! `cargo xtask bench --only cluster`: how long from a migration's flip written to etcd until
//! every LB node has applied it and said so (what a source waits for before it is released),
//! with 2 and 4 nodes, against a real etcd on loopback. Each node is the real follower
//! (`baton_cluster::etcd::follow`, its own etcd client and watch) writing to an in-memory map: the
//! pinned-map write of a real baton-lb (a few microseconds) is not in the figure. Baseline, in
//! the same run: one plain etcd write and read back (the floor any flip pays).
//!
//! Usage: flip_latency [--flips N] [--nodes 2,4]
use baton_cluster::etcd::{Cluster, Dataplane, follow};
use baton_cluster::testing::Etcd;
use baton_cluster::{Action, MigrationRecord, MigrationStage, Node, Prefix, View, WorkerRecord};
use baton_protocol::{Cid, MigrationId};
use std::time::{Duration, Instant};

struct Counting(u64);

impl Dataplane for Counting {
    fn apply(&mut self, _: &Action) {
        self.0 += 1;
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn report(what: &str, mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let (p50, p99) = (pct(&ms, 50.0), pct(&ms, 99.0));
    println!(
        "{what:<28} n={:<5} p50 {p50:>7.3} ms  p99 {p99:>7.3} ms  max {:>7.3} ms",
        ms.len(),
        ms.last().copied().unwrap_or(0.0)
    );
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut flips = 1000usize;
    let mut node_counts = vec![2usize, 4];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--flips" => flips = args.next().and_then(|v| v.parse().ok()).expect("--flips N"),
            "--nodes" => {
                node_counts = args
                    .next()
                    .expect("--nodes 2,4")
                    .split(',')
                    .map(|n| n.parse().expect("a node count"))
                    .collect()
            }
            other => panic!("unknown argument {other:?} (use --flips N --nodes 2,4)"),
        }
    }
    let etcd = Etcd::start("flip-latency");
    let prefix = Prefix::new("/baton/bench").unwrap();
    let cluster = Cluster::connect(&[etcd.endpoint()], prefix.clone())
        .await
        .expect("etcd");
    println!("flip written to etcd -> every LB node applied it ({flips} flips each)");

    // Baseline: a write and a read of one key, the floor of every flip and report.
    let mut client = cluster.client();
    let mut base = Vec::new();
    for i in 0..flips {
        let t = Instant::now();
        client
            .put("/baton/bench-baseline", i.to_string(), None)
            .await
            .unwrap();
        client.get("/baton/bench-baseline", None).await.unwrap();
        base.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (base50, base99) = report("baseline put+get", base);

    for &n in &node_counts {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for k in 0..n {
            let c = Cluster::connect(&[etcd.endpoint()], prefix.clone())
                .await
                .unwrap();
            let stop = stop.clone();
            let name = format!("bench{n}-lb{k}");
            let p = prefix.clone();
            tasks.push(tokio::spawn(async move {
                let mut node = Node::new(p, &name, View::default());
                follow(&c, &mut node, &mut Counting(0), Some(10), stop).await;
            }));
        }
        // The target worker the overrides name must exist for a real node; the model does not
        // care, but keep the state realistic.
        let w = WorkerRecord {
            name: "w2".into(),
            server_id: 2,
            address: "10.0.0.2".parse().unwrap(),
            weight: 1,
            control: None,
            encap: None,
        };
        client
            .put(
                format!("{}workers/w2", prefix.as_str()),
                serde_json::to_vec(&w).unwrap(),
                None,
            )
            .await
            .unwrap();
        // Every node up and reporting before timing.
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster
            .applied()
            .await
            .unwrap()
            .keys()
            .filter(|k| k.starts_with(&format!("bench{n}-")))
            .count()
            < n
        {
            assert!(
                Instant::now() < deadline,
                "{n} nodes did not report within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut took = Vec::new();
        for i in 0..flips {
            let id = MigrationId::random();
            let cid: Cid = format!("{:016x}", (n as u64) << 32 | i as u64)
                .parse()
                .unwrap();
            let record = MigrationRecord {
                id,
                conn: Some(cid),
                driver_lease: None,
                cids: vec![cid],
                from: "w1".into(),
                to: "w2".into(),
                stage: MigrationStage::Flipped,
                flip_revision: None,
            };
            let t = Instant::now();
            let rev = cluster.flip(&record, 60).await.unwrap();
            let done = cluster
                .wait_applied(rev, Duration::from_secs(10))
                .await
                .unwrap();
            took.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(done.is_ok(), "flip {i}: nodes behind: {done:?}");
            // Keep etcd's content small: retire it (not timed).
            cluster.retire_override(&cid).await.unwrap();
            cluster.end_migration(id).await.unwrap();
        }
        let (p50, p99) = report(&format!("flip -> {n} nodes applied"), took);
        println!(
            "RESULT cluster_flip nodes={n} flips={flips} p50_ms={p50:.3} p99_ms={p99:.3} \
             p50_vs_baseline={:.2}x p99_vs_baseline={:.2}x",
            p50 / base50,
            p99 / base99
        );
        stop_tx.send(true).unwrap();
        for t in tasks {
            let _ = t.await;
        }
        // The stopped nodes' reports would count as live until their leases end.
        client
            .delete(
                format!("{}nodes/", prefix.as_str()),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
    }
}
