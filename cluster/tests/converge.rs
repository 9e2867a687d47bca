//! LB nodes converging from a simulated etcd (revisions, watches that resume, compaction,
//! sessions that drop), in the spirit of quinn-proto's `Pair`: every step is explicit and seeded,
//! so a failing case replays exactly. Each node's "maps" are a model that applies the node's
//! actions; after any history, once a node is connected and has drained its watch, its maps equal
//! what the store says, and it reported the revision it applied.
use baton_cluster::{
    Action, Input, Key, Node, OverrideRecord, Prefix, View, WatchEvent, WorkerRecord,
};
use baton_protocol::{Cid, MigrationId};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// The store: keys with values, the history of changes by revision, the compaction point.
#[derive(Default)]
struct Store {
    revision: i64,
    kvs: BTreeMap<String, Vec<u8>>,
    history: Vec<WatchEvent>,
    compacted: i64,
}

impl Store {
    fn put(&mut self, key: String, value: Vec<u8>) {
        self.revision += 1;
        self.kvs.insert(key.clone(), value.clone());
        self.history.push(WatchEvent {
            revision: self.revision,
            key,
            value: Some(value),
        });
    }

    fn delete(&mut self, key: &str) {
        if self.kvs.remove(key).is_some() {
            self.revision += 1;
            self.history.push(WatchEvent {
                revision: self.revision,
                key: key.to_string(),
                value: None,
            });
        }
    }

    fn compact(&mut self) {
        self.compacted = self.revision;
    }

    /// The view a correct node must end with.
    fn expected(&self, prefix: &Prefix) -> View {
        let mut v = View::default();
        for (k, val) in &self.kvs {
            match prefix.parse(k) {
                Ok(Key::Worker(name)) => {
                    if let Ok(w) = serde_json::from_slice::<WorkerRecord>(val) {
                        if w.name == name {
                            v.workers.insert(name, w);
                        }
                    }
                }
                Ok(Key::Override(cid)) => {
                    if let Ok(o) = serde_json::from_slice::<OverrideRecord>(val) {
                        v.overrides.insert(cid, o);
                    }
                }
                _ => {}
            }
        }
        v
    }
}

/// An LB node, its driver's watch position and its model maps.
struct Sim {
    node: Node,
    connected: bool,
    /// Where the driver's watch is (None: no watch open).
    watch_from: Option<i64>,
    maps: View,
    reported: Vec<i64>,
}

impl Sim {
    fn new(prefix: &Prefix, name: &str) -> Sim {
        Sim {
            node: Node::new(prefix.clone(), name, View::default()),
            connected: false,
            watch_from: None,
            maps: View::default(),
            reported: Vec::new(),
        }
    }

    /// Carries out the node's actions against `store`.
    fn run_actions(&mut self, store: &Store) {
        while let Some(a) = self.node.poll_action() {
            match a {
                Action::Resync => {
                    if self.connected {
                        let kvs = store
                            .kvs
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        self.node.handle(Input::Snapshot {
                            revision: store.revision,
                            kvs,
                        });
                    }
                }
                Action::Watch { from_revision } => {
                    if from_revision <= store.compacted {
                        self.watch_from = None;
                        self.node.handle(Input::Compacted {
                            compact_revision: store.compacted,
                        });
                    } else {
                        self.watch_from = Some(from_revision);
                    }
                }
                Action::Workers(ws) => {
                    self.maps.workers = ws.into_iter().map(|w| (w.name.clone(), w)).collect();
                }
                Action::SetOverride { cid, record } => {
                    self.maps.overrides.insert(cid, record);
                }
                Action::DelOverride { cid } => {
                    self.maps.overrides.remove(&cid);
                }
                Action::ReportApplied { revision } => {
                    assert_eq!(
                        self.maps,
                        *self.node.view(),
                        "every map change is done before the revision is reported"
                    );
                    self.reported.push(revision);
                }
            }
        }
    }

    /// Delivers up to `n` watch events (and, with `repeat`, some already delivered again).
    fn deliver(&mut self, store: &Store, n: usize, repeat: bool) {
        let Some(from) = self.watch_from else { return };
        if !self.connected || !self.node.is_watching() {
            return;
        }
        let start = if repeat { (from - 3).max(1) } else { from };
        let batch: Vec<WatchEvent> = store
            .history
            .iter()
            .filter(|e| e.revision >= start)
            .take(n)
            .cloned()
            .collect();
        if let Some(last) = batch.last() {
            self.watch_from = Some(last.revision + 1);
        }
        self.node.handle(Input::Events(batch));
    }

    fn connect(&mut self, store: &Store) {
        self.connected = true;
        self.node.handle(Input::Connected);
        self.run_actions(store);
    }

    fn disconnect(&mut self) {
        self.connected = false;
        self.watch_from = None;
        self.node.handle(Input::Disconnected);
    }

    /// Connected, and every event delivered.
    fn catch_up(&mut self, store: &Store) {
        if !self.connected {
            self.connect(store);
        }
        for _ in 0..1000 {
            self.run_actions(store);
            if self.watch_from.is_some_and(|f| f > store.revision) {
                return;
            }
            self.deliver(store, 5, false);
        }
        panic!("the node never caught up");
    }
}

fn prefix() -> Prefix {
    Prefix::new("/baton/sim").unwrap()
}

fn worker(i: u8, weight: u32) -> (String, Vec<u8>) {
    let w = WorkerRecord {
        name: format!("w{i}"),
        server_id: i as u64,
        address: format!("10.0.0.{i}").parse().unwrap(),
        weight,
        control: None,
        encap: None,
    };
    (
        prefix().key(&Key::Worker(w.name.clone())),
        serde_json::to_vec(&w).unwrap(),
    )
}

fn cid(i: u8) -> Cid {
    Cid::new(&[i, 0, 0, 0, 0, 0, 0, 1]).unwrap()
}

fn override_kv(c: u8, to: u8) -> (String, Vec<u8>) {
    let r = OverrideRecord {
        worker: format!("w{to}"),
        migration: MigrationId([c; 16]),
    };
    (
        prefix().key(&Key::Override(cid(c))),
        serde_json::to_vec(&r).unwrap(),
    )
}

#[derive(Clone, Debug)]
enum Op {
    PutWorker(u8, u32),
    DelWorker(u8),
    PutOverride(u8, u8),
    DelOverride(u8),
    /// Junk at a key of the schema, or a key outside it.
    Junk(u8),
    /// Another node reports its applied revision (in the same prefix).
    OtherReport,
    Compact,
    /// Node n: drop its session / reconnect / deliver k events / deliver with repeats.
    Disconnect(usize),
    Connect(usize),
    Deliver(usize, usize),
    DeliverRepeat(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..5, 1u32..3).prop_map(|(i, w)| Op::PutWorker(i, w)),
        1 => (0u8..5).prop_map(Op::DelWorker),
        4 => (0u8..8, 0u8..5).prop_map(|(c, t)| Op::PutOverride(c, t)),
        2 => (0u8..8).prop_map(Op::DelOverride),
        1 => (0u8..4).prop_map(Op::Junk),
        1 => Just(Op::OtherReport),
        1 => Just(Op::Compact),
        1 => (0usize..2).prop_map(Op::Disconnect),
        1 => (0usize..2).prop_map(Op::Connect),
        4 => (0usize..2, 1usize..6).prop_map(|(n, k)| Op::Deliver(n, k)),
        1 => (0usize..2, 1usize..6).prop_map(|(n, k)| Op::DeliverRepeat(n, k)),
    ]
}

fn run(ops: &[Op]) -> (Store, Vec<Sim>) {
    let p = prefix();
    let mut store = Store::default();
    let mut nodes = vec![Sim::new(&p, "lb-a"), Sim::new(&p, "lb-b")];
    for n in &mut nodes {
        n.connect(&store);
    }
    for op in ops {
        match op {
            Op::PutWorker(i, w) => {
                let (k, v) = worker(*i, *w);
                store.put(k, v);
            }
            Op::DelWorker(i) => store.delete(&worker(*i, 1).0),
            Op::PutOverride(c, t) => {
                let (k, v) = override_kv(*c, *t);
                store.put(k, v);
            }
            Op::DelOverride(c) => store.delete(&override_kv(*c, 0).0),
            Op::Junk(which) => {
                let (k, v) = match which {
                    0 => (worker(1, 1).0, b"{not json".to_vec()),
                    1 => (override_kv(1, 1).0, b"[]".to_vec()),
                    2 => (format!("{}nonsense/x", p.as_str()), b"x".to_vec()),
                    _ => (
                        worker(2, 1).0,
                        serde_json::to_vec(&worker_named("w3")).unwrap(),
                    ),
                };
                store.put(k, v);
            }
            Op::OtherReport => {
                let rev = store.revision;
                store.put(
                    p.key(&Key::Applied("lb-z".into())),
                    format!("{{\"revision\":{rev}}}").into_bytes(),
                );
            }
            Op::Compact => store.compact(),
            Op::Disconnect(n) => nodes[*n].disconnect(),
            Op::Connect(n) => {
                if !nodes[*n].connected {
                    nodes[*n].connect(&store);
                }
            }
            Op::Deliver(n, k) => nodes[*n].deliver(&store, *k, false),
            Op::DeliverRepeat(n, k) => nodes[*n].deliver(&store, *k, true),
        }
        for n in &mut nodes {
            n.run_actions(&store);
        }
    }
    (store, nodes)
}

fn worker_named(name: &str) -> WorkerRecord {
    WorkerRecord {
        name: name.into(),
        server_id: 9,
        address: "10.0.0.9".parse().unwrap(),
        weight: 1,
        control: None,
        encap: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever happened, a node that catches up holds exactly the store's state, its reports
    /// never go backwards, and two nodes agree.
    #[test]
    fn nodes_converge_to_the_store(ops in proptest::collection::vec(op(), 0..80)) {
        let (store, mut nodes) = run(&ops);
        let want = store.expected(&prefix());
        for n in &mut nodes {
            n.catch_up(&store);
            prop_assert_eq!(&n.maps, &want);
            prop_assert_eq!(n.node.view(), &want);
            prop_assert!(n.reported.windows(2).all(|w| w[0] <= w[1]), "{:?}", n.reported);
        }
        prop_assert_eq!(&nodes[0].maps, &nodes[1].maps);
    }

    /// While a node has no session, its maps do not change, whatever the store does.
    #[test]
    fn an_offline_node_keeps_forwarding_on_its_last_state(ops in proptest::collection::vec(op(), 0..40)) {
        let p = prefix();
        let mut store = Store::default();
        let mut sim = Sim::new(&p, "lb-a");
        let (k, v) = worker(1, 1);
        store.put(k, v);
        sim.catch_up(&store);
        let before = sim.maps.clone();
        sim.disconnect();
        for op in &ops {
            match op {
                Op::PutWorker(i, w) => { let (k, v) = worker(*i, *w); store.put(k, v); }
                Op::DelWorker(i) => store.delete(&worker(*i, 1).0),
                Op::PutOverride(c, t) => { let (k, v) = override_kv(*c, *t); store.put(k, v); }
                Op::DelOverride(c) => store.delete(&override_kv(*c, 0).0),
                Op::Compact => store.compact(),
                _ => {}
            }
            sim.deliver(&store, 5, false);
            sim.run_actions(&store);
            prop_assert_eq!(&sim.maps, &before);
        }
        sim.catch_up(&store);
        prop_assert_eq!(&sim.maps, &store.expected(&p));
    }
}

/// A flip followed by other nodes' reports: the node reports once, at the flip, and the reports
/// of others (which change no map) make it write nothing more.
#[test]
fn reports_follow_map_changes_only() {
    let p = prefix();
    let mut store = Store::default();
    let mut a = Sim::new(&p, "lb-a");
    a.catch_up(&store);
    assert_eq!(a.reported, vec![0]);
    let (k, v) = override_kv(1, 2);
    store.put(k, v);
    let flip = store.revision;
    a.catch_up(&store);
    assert_eq!(a.reported, vec![0, flip]);
    for _ in 0..5 {
        let rev = store.revision;
        store.put(
            p.key(&Key::Applied("lb-b".into())),
            format!("{{\"revision\":{rev}}}").into_bytes(),
        );
        a.catch_up(&store);
    }
    assert_eq!(a.reported, vec![0, flip], "no echo of other nodes' reports");
    assert_eq!(a.node.applied(), store.revision);
}

/// A node restarted with maps that already hold part of the state writes only the difference.
#[test]
fn a_restarted_node_writes_only_the_difference() {
    let p = prefix();
    let mut store = Store::default();
    for i in 1..=2 {
        let (k, v) = worker(i, 1);
        store.put(k, v);
    }
    for c in 0..4 {
        let (k, v) = override_kv(c, 1);
        store.put(k, v);
    }
    let mut current = store.expected(&p);
    current.overrides.remove(&cid(3));
    current.overrides.insert(
        cid(7),
        OverrideRecord {
            worker: "w1".into(),
            migration: MigrationId([7; 16]),
        },
    );
    let mut node = Node::new(p.clone(), "lb-a", current);
    node.handle(Input::Connected);
    assert_eq!(node.poll_action(), Some(Action::Resync));
    node.handle(Input::Snapshot {
        revision: store.revision,
        kvs: store.kvs.clone().into_iter().collect(),
    });
    let actions: Vec<Action> = std::iter::from_fn(|| node.poll_action()).collect();
    let (_, v3) = override_kv(3, 1);
    let record3: OverrideRecord = serde_json::from_slice(&v3).unwrap();
    assert_eq!(
        actions,
        vec![
            Action::SetOverride {
                cid: cid(3),
                record: record3
            },
            Action::DelOverride { cid: cid(7) },
            Action::ReportApplied {
                revision: store.revision
            },
            Action::Watch {
                from_revision: store.revision + 1
            },
        ]
    );
}
