//! The cluster against a real etcd (Debian's, on loopback): server-ID claims, LB nodes that
//! follow the prefix and agree, etcd SIGKILLed and restarted under them, a node whose watch
//! history was compacted away. The nodes' maps are a model that applies their actions (the
//! pinned-map side is baton-lb's); everything else is the real code path.
use baton_cluster::etcd::{Cluster, ClusterError, Dataplane, follow};
use baton_cluster::testing::Etcd;
use baton_cluster::{
    Action, AppliedRecord, Key, MigrationStage, Node, OverrideRecord, Prefix, View, WorkerRecord,
};
use baton_protocol::{Cid, MigrationId};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

fn prefix() -> Prefix {
    Prefix::new("/baton/test").unwrap()
}

fn worker(name: &str, server_id: u64) -> WorkerRecord {
    WorkerRecord {
        name: name.into(),
        server_id,
        address: format!("10.0.0.{server_id}").parse().unwrap(),
        weight: 1,
        control: None,
        encap: None,
    }
}

/// An LB node's maps, as the test sees them.
#[derive(Clone, Default)]
struct Maps(Arc<Mutex<View>>);

impl Dataplane for Maps {
    fn apply(&mut self, action: &Action) {
        let mut v = self.0.lock().unwrap();
        match action {
            Action::Workers(ws) => {
                v.workers = ws.iter().map(|w| (w.name.clone(), w.clone())).collect()
            }
            Action::SetOverride { cid, record } => {
                v.overrides.insert(*cid, record.clone());
            }
            Action::DelOverride { cid } => {
                v.overrides.remove(cid);
            }
            other => panic!("not a map action: {other:?}"),
        }
    }
}

struct Follower {
    maps: Maps,
    stop: watch::Sender<bool>,
    task: JoinHandle<Node>,
}

fn spawn_follower(cluster: &Cluster, node: Node) -> Follower {
    let maps = Maps(Arc::new(Mutex::new(node.view().clone())));
    let (stop, stopped) = watch::channel(false);
    let cluster = cluster.clone();
    let mut dataplane = maps.clone();
    let task = tokio::spawn(async move {
        let mut node = node;
        follow(&cluster, &mut node, &mut dataplane, None, stopped).await;
        node
    });
    Follower { maps, stop, task }
}

impl Follower {
    fn view(&self) -> View {
        self.maps.0.lock().unwrap().clone()
    }

    async fn stop(self) -> Node {
        self.stop.send(true).unwrap();
        self.task.await.unwrap()
    }
}

async fn connect(etcd: &Etcd) -> Cluster {
    Cluster::connect(&[etcd.endpoint()], prefix())
        .await
        .unwrap()
}

fn override_record(n: u8, to: &str) -> OverrideRecord {
    OverrideRecord {
        worker: to.into(),
        migration: MigrationId([n; 16]),
    }
}

fn cid(n: u8) -> Cid {
    Cid::new(&[n, 1, 2, 3, 4, 5, 6, 7]).unwrap()
}

/// Writes workers and overrides as a migration driver would; returns the view they make.
async fn write_state(cluster: &Cluster, workers: &[(&str, u64)], overrides: &[(u8, &str)]) -> View {
    let mut client = cluster.client();
    let p = cluster.prefix();
    let mut view = View::default();
    for (name, sid) in workers {
        let w = worker(name, *sid);
        client
            .put(
                p.key(&Key::Worker(w.name.clone())),
                serde_json::to_vec(&w).unwrap(),
                None,
            )
            .await
            .unwrap();
        view.workers.insert(w.name.clone(), w);
    }
    for (n, to) in overrides {
        let r = override_record(*n, to);
        client
            .put(
                p.key(&Key::Override(cid(*n))),
                serde_json::to_vec(&r).unwrap(),
                None,
            )
            .await
            .unwrap();
        view.overrides.insert(cid(*n), r);
    }
    view
}

/// The revision etcd is at now.
async fn revision(cluster: &Cluster) -> i64 {
    let r = cluster.client().get("/", None).await.unwrap();
    r.header().unwrap().revision()
}

async fn applied(cluster: &Cluster, node: &str) -> Option<i64> {
    let r = cluster
        .client()
        .get(cluster.prefix().key(&Key::Applied(node.into())), None)
        .await
        .ok()?;
    let kv = r.kvs().first()?;
    serde_json::from_slice::<AppliedRecord>(kv.value())
        .ok()
        .map(|a| a.revision)
}

/// Until every follower's maps are `want` (up to 30 s, a loaded machine's margin).
async fn until_converged(followers: &[&Follower], want: &View, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if followers.iter().all(|f| f.view() == *want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the nodes did not converge:\nwant {want:?}\n{:?}",
            followers.iter().map(|f| f.view()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_claiming_a_held_server_id_is_refused_naming_the_holder() {
    let etcd = Etcd::start("claims");
    let cluster = connect(&etcd).await;
    let w1 = cluster.register_worker(&worker("w1", 1), 30).await.unwrap();

    let err = cluster
        .register_worker(&worker("w2", 1), 30)
        .await
        .err()
        .expect("a held server ID is refused");
    match &err {
        ClusterError::ServerIdHeld(msg) => {
            assert!(msg.contains("held by worker \"w1\""), "{msg}");
            assert!(msg.contains("\"w2\""), "{msg}");
        }
        other => panic!("wrong error: {other}"),
    }
    // The same name under another server ID is refused too.
    let err = cluster
        .register_worker(&worker("w1", 2), 30)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClusterError::NameHeld { server_id: 1, .. }),
        "{err}"
    );
    // w1 restarted while its old lease lives: it takes its registration over.
    let again = cluster.register_worker(&worker("w1", 1), 30).await.unwrap();
    assert_ne!(again.id(), w1.id());
    drop(w1);
    // Its lease revoked, the ID is free for another worker.
    again.revoke().await;
    let w2 = cluster.register_worker(&worker("w2", 1), 30).await.unwrap();
    let r = cluster
        .client()
        .get(prefix().key(&Key::ServerId(1)), None)
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), br#"{"worker":"w2"}"#);
    assert_eq!(r.kvs()[0].lease(), w2.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_follow_etcd_and_agree() {
    let etcd = Etcd::start("follow");
    let cluster = connect(&etcd).await;
    let a = spawn_follower(&cluster, Node::new(prefix(), "lb-a", View::default()));
    let b = spawn_follower(&cluster, Node::new(prefix(), "lb-b", View::default()));

    let overrides: Vec<(u8, &str)> = (0..40)
        .map(|n| (n, if n % 2 == 0 { "w1" } else { "w2" }))
        .collect();
    let mut want = write_state(&cluster, &[("w1", 1), ("w2", 2)], &overrides).await;
    // Some overrides retire (their connection's old CIDs are gone), one worker leaves.
    let mut client = cluster.client();
    for n in 0..10u8 {
        client
            .delete(prefix().key(&Key::Override(cid(n))), None)
            .await
            .unwrap();
        want.overrides.remove(&cid(n));
    }
    let last_change = client
        .delete(prefix().key(&Key::Worker("w2".into())), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    want.workers.remove("w2");
    // Other records in the prefix change no map.
    let m = baton_cluster::MigrationRecord {
        id: MigrationId([1; 16]),
        conn: None,
        driver_lease: None,
        cids: vec![cid(1)],
        from: "w1".into(),
        to: "w2".into(),
        stage: MigrationStage::Flipped,
        flip_revision: Some(3),
    };
    client
        .put(
            prefix().key(&Key::Migration(m.id)),
            serde_json::to_vec(&m).unwrap(),
            None,
        )
        .await
        .unwrap();
    until_converged(&[&a, &b], &want, "after 53 changes").await;

    // Both report a revision at or past the last map change.
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in ["lb-a", "lb-b"] {
        loop {
            if applied(&cluster, node)
                .await
                .is_some_and(|r| r >= last_change)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{node} never reported revision {last_change}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_keep_their_maps_while_etcd_is_down_and_catch_up_after() {
    let mut etcd = Etcd::start("restart");
    let cluster = connect(&etcd).await;
    let a = spawn_follower(&cluster, Node::new(prefix(), "lb-a", View::default()));
    let b = spawn_follower(&cluster, Node::new(prefix(), "lb-b", View::default()));
    let before = write_state(&cluster, &[("w1", 1), ("w2", 2)], &[(1, "w2"), (2, "w1")]).await;
    until_converged(&[&a, &b], &before, "before the kill").await;

    etcd.kill();
    // What a migration asks of etcd fails, saying etcd is unreachable.
    let err = cluster.lease(10).await.err().expect("etcd is down");
    assert!(matches!(err, ClusterError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("etcd is unreachable"), "{err}");
    // The maps stay as they were: forwarding goes on with the last applied state.
    for _ in 0..20 {
        assert_eq!(a.view(), before);
        assert_eq!(b.view(), before);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    etcd.restart();
    // Writes go through again once the client reconnects.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = cluster.client();
    let r = override_record(3, "w1");
    loop {
        match client
            .put(
                prefix().key(&Key::Override(cid(3))),
                serde_json::to_vec(&r).unwrap(),
                None,
            )
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "etcd never came back: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut after = before.clone();
    after.overrides.insert(cid(3), r);
    client
        .delete(prefix().key(&Key::Override(cid(1))), None)
        .await
        .unwrap();
    after.overrides.remove(&cid(1));
    until_converged(&[&a, &b], &after, "after the restart").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_history_was_compacted_reads_afresh() {
    let etcd = Etcd::start("compact");
    let cluster = connect(&etcd).await;
    let a = spawn_follower(&cluster, Node::new(prefix(), "lb-a", View::default()));
    let first = write_state(&cluster, &[("w1", 1)], &[(1, "w1"), (2, "w1")]).await;
    until_converged(&[&a], &first, "first").await;
    // The node goes away (a controller restart keeps its maps and, here, its node state) ...
    let node = a.stop().await;
    let behind = node.applied();
    // ... while things change and etcd compacts its history past the node's revision.
    let mut client = cluster.client();
    client
        .delete(prefix().key(&Key::Override(cid(1))), None)
        .await
        .unwrap();
    let mut want = write_state(&cluster, &[("w2", 2)], &[(5, "w2")]).await;
    want.workers.insert("w1".into(), worker("w1", 1));
    want.overrides.insert(cid(2), override_record(2, "w1"));
    let now = revision(&cluster).await;
    assert!(now > behind + 1);
    client.compact(now, None).await.unwrap();

    let a = spawn_follower(&cluster, node);
    until_converged(&[&a], &want, "after the compaction").await;
    let node = a.stop().await;
    assert!(node.applied() >= now, "{} < {now}", node.applied());
}

/// What a driver resuming a dead driver's migration relies on: the records are listed with the
/// revision they were written at (a flip's is the flip's own), a dead driver's lease reads as
/// dead, and only one driver can adopt a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_drivers_migration_is_found_and_adopted_once() {
    let etcd = Etcd::start("recover");
    let cluster = connect(&etcd).await;
    let driver = cluster.lease(2).await.unwrap();
    let record = baton_cluster::MigrationRecord {
        id: MigrationId([7; 16]),
        conn: Some(cid(7)),
        driver_lease: Some(driver.id()),
        cids: vec![cid(7)],
        from: "w1".into(),
        to: "w2".into(),
        stage: MigrationStage::Started,
        flip_revision: None,
    };
    cluster.begin_migration(&record).await.unwrap();
    let flip = cluster.flip(&record, 30).await.unwrap();
    let found = cluster.migrations().await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0.stage, MigrationStage::Flipped);
    assert_eq!(
        found[0].1, flip,
        "a flipped record's revision is the flip's"
    );
    assert!(cluster.lease_alive(driver.id()).await.unwrap());
    // The driver dies: its lease stops being renewed and ends.
    drop(driver);
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster
        .lease_alive(record.driver_lease.unwrap())
        .await
        .unwrap()
    {
        assert!(Instant::now() < deadline, "the lease outlived its TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The record itself stays (it is not under the lease).
    assert_eq!(cluster.migrations().await.unwrap().len(), 1);
    let mine = cluster.lease(10).await.unwrap();
    let mut adopted = found[0].0.clone();
    adopted.driver_lease = Some(mine.id());
    adopted.flip_revision = Some(flip);
    assert!(cluster.adopt_migration(&adopted, flip).await.unwrap());
    // A second driver that read the same revision loses.
    assert!(!cluster.adopt_migration(&adopted, flip).await.unwrap());
    let now = cluster.migrations().await.unwrap();
    assert_eq!(now[0].0.driver_lease, Some(mine.id()));
    assert_eq!(now[0].0.flip_revision, Some(flip));
    cluster.end_migration(record.id).await.unwrap();
    assert!(cluster.migrations().await.unwrap().is_empty());
}
