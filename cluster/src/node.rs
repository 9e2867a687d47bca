//! One LB node's convergence from etcd, as a sans-IO state machine in quinn-proto's style: the
//! driver (which owns the etcd client and the pinned maps) feeds it what etcd said
//! ([`Node::handle`]) and carries out the [`Action`]s it asks for ([`Node::poll_action`]), in
//! order. It never does I/O.
//!
//! What it guarantees, whatever the driver sees (reconnects, duplicate or stale watch responses,
//! compactions, junk records):
//! - changes reach the data plane in revision order, each once; nothing older than what was
//!   applied is applied again;
//! - while etcd is unreachable nothing changes: the maps keep forwarding with the last applied
//!   state;
//! - after a reconnect the watch resumes just past the last applied revision; if etcd compacted
//!   that history away, a full read of the prefix replaces the view, and only the difference to
//!   what the maps hold is written;
//! - the view is a function of the store's current content only, never of the history a node
//!   saw, so every node holds the same one: a record that does not decode counts as absent (it
//!   is counted and logged), exactly as a full read would treat it;
//! - the node reports the revision it has applied ([`Action::ReportApplied`]) only after the map
//!   changes up to it, and only when the data plane changed (other nodes' reports, in the same
//!   prefix, must not make it write again, or the nodes would echo each other forever).
use crate::keys::{Key, Prefix};
use crate::records::{OverrideRecord, WorkerRecord};
use baton_protocol::Cid;
use std::collections::{BTreeMap, VecDeque};
use tracing::{debug, warn};

/// What the data plane holds: the registered workers (by name) and the overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub workers: BTreeMap<String, WorkerRecord>,
    pub overrides: BTreeMap<Cid, OverrideRecord>,
}

/// One change of a key, as a watch reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The revision of the change (etcd's `mod_revision`; for a delete, the delete's).
    pub revision: i64,
    pub key: String,
    /// `None`: deleted (or its lease expired).
    pub value: Option<Vec<u8>>,
}

/// What the driver tells the node.
#[derive(Clone, Debug)]
pub enum Input {
    /// The etcd session is up (first time, or again).
    Connected,
    /// The session is gone; the driver reconnects.
    Disconnected,
    /// A full read of the prefix at `revision`: every key and value.
    Snapshot {
        revision: i64,
        kvs: Vec<(String, Vec<u8>)>,
    },
    /// One watch response: its events, in revision order.
    Events(Vec<WatchEvent>),
    /// A watch progress notice: nothing in the prefix changed up to `revision`.
    Progress { revision: i64 },
    /// The watch cannot start where asked: etcd compacted history up to `compact_revision`.
    Compacted { compact_revision: i64 },
}

/// What the node asks the driver to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read the whole prefix and hand it back as [`Input::Snapshot`].
    Resync,
    /// Watch the prefix from this revision on.
    Watch {
        from_revision: i64,
    },
    /// The worker set changed: rebuild the worker table and the Maglev table from these (sorted
    /// by name; Maglev is a function of this set only, so every node builds the same table).
    Workers(Vec<WorkerRecord>),
    SetOverride {
        cid: Cid,
        record: OverrideRecord,
    },
    DelOverride {
        cid: Cid,
    },
    /// Write `nodes/<this node>/applied`: every map change up to here is done.
    ReportApplied {
        revision: i64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No session.
    Offline,
    /// Waiting for the full read asked for.
    Reading,
    /// Watching from past `applied`.
    Watching,
}

/// One LB node's view of the cluster and where it stands.
pub struct Node {
    prefix: Prefix,
    name: String,
    phase: Phase,
    /// What the maps hold (after the actions handed out).
    view: View,
    /// The last revision whose changes the view holds (0: never read).
    applied: i64,
    actions: VecDeque<Action>,
    rejected: u64,
}

impl Node {
    /// A node called `name` (its `nodes/<name>/applied` key) whose maps hold `current` (what the
    /// pinned maps had when the controller started: a restart writes only the difference).
    pub fn new(prefix: Prefix, name: &str, current: View) -> Node {
        Node {
            prefix,
            name: name.to_string(),
            phase: Phase::Offline,
            view: current,
            applied: 0,
            actions: VecDeque::new(),
            rejected: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The revision the maps reflect (0 before the first read).
    pub fn applied(&self) -> i64 {
        self.applied
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// Records that did not decode (or keys outside the schema), since the start.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Whether the node follows etcd now (false: forwarding on the last applied state).
    pub fn is_watching(&self) -> bool {
        self.phase == Phase::Watching
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Connected => {
                if self.applied > 0 {
                    self.phase = Phase::Watching;
                    self.actions.push_back(Action::Watch {
                        from_revision: self.applied + 1,
                    });
                } else {
                    self.phase = Phase::Reading;
                    self.actions.push_back(Action::Resync);
                }
            }
            Input::Disconnected => {
                // Map changes already handed out stand; nothing else happens until reconnected.
                self.phase = Phase::Offline;
            }
            Input::Compacted { compact_revision } => {
                if self.phase == Phase::Offline {
                    return;
                }
                debug!(
                    node = %self.name,
                    applied = self.applied,
                    compact_revision,
                    "etcd compacted past the applied revision: reading the prefix afresh"
                );
                self.phase = Phase::Reading;
                self.actions.push_back(Action::Resync);
            }
            Input::Snapshot { revision, kvs } => {
                if self.phase != Phase::Reading {
                    debug!(node = %self.name, revision, "a full read nobody asked for: ignored");
                    return;
                }
                if revision < self.applied {
                    // Older than what the maps hold (a lagging etcd member): ask again.
                    self.actions.push_back(Action::Resync);
                    return;
                }
                let mut next = View::default();
                for (key, value) in kvs {
                    self.put(&mut next, &key, &value);
                }
                self.switch_to(next);
                self.applied = revision;
                self.phase = Phase::Watching;
                self.actions.push_back(Action::ReportApplied { revision });
                self.actions.push_back(Action::Watch {
                    from_revision: revision + 1,
                });
            }
            Input::Events(events) => {
                if self.phase != Phase::Watching {
                    return;
                }
                let mut next = self.view.clone();
                let mut last = self.applied;
                for e in events {
                    if e.revision <= self.applied {
                        continue; // seen already (a watch resumed or repeated)
                    }
                    if e.revision < last {
                        warn!(node = %self.name, "watch events out of revision order: ignored");
                        continue;
                    }
                    last = e.revision;
                    match &e.value {
                        Some(v) => self.put(&mut next, &e.key, v),
                        None => self.delete(&mut next, &e.key),
                    }
                }
                if last > self.applied {
                    let changed = next != self.view;
                    self.switch_to(next);
                    self.applied = last;
                    if changed {
                        self.actions
                            .push_back(Action::ReportApplied { revision: last });
                    }
                }
            }
            Input::Progress { revision } => {
                if self.phase == Phase::Watching && revision > self.applied {
                    self.applied = revision;
                }
            }
        }
    }

    /// Applies a put of `key` to `view`; an undecodable value takes the key's effect away.
    fn put(&mut self, view: &mut View, key: &str, value: &[u8]) {
        let parsed = match self.prefix.parse(key) {
            Ok(k) => k,
            Err(e) => {
                self.reject(key, &e.to_string());
                return;
            }
        };
        match parsed {
            Key::Worker(name) => match serde_json::from_slice::<WorkerRecord>(value) {
                Ok(w) if w.name == name => {
                    view.workers.insert(name, w);
                }
                Ok(w) => {
                    view.workers.remove(&name);
                    self.reject(key, &format!("the record names worker {:?}", w.name));
                }
                Err(e) => {
                    view.workers.remove(&name);
                    self.reject(key, &e.to_string());
                }
            },
            Key::Override(cid) => match serde_json::from_slice::<OverrideRecord>(value) {
                Ok(o) => {
                    view.overrides.insert(cid, o);
                }
                Err(e) => {
                    view.overrides.remove(&cid);
                    self.reject(key, &e.to_string());
                }
            },
            // Health, claims, migrations and applied revisions are not map state.
            Key::ServerId(_) | Key::Health { .. } | Key::Migration(_) | Key::Applied(_) => {}
        }
    }

    fn delete(&mut self, view: &mut View, key: &str) {
        match self.prefix.parse(key) {
            Ok(Key::Worker(name)) => {
                view.workers.remove(&name);
            }
            Ok(Key::Override(cid)) => {
                view.overrides.remove(&cid);
            }
            Ok(_) => {}
            Err(e) => self.reject(key, &e.to_string()),
        }
    }

    fn reject(&mut self, key: &str, why: &str) {
        self.rejected += 1;
        warn!(node = %self.name, key, "ignoring a record that does not decode: {why}");
    }

    /// Hands out the map changes from the view to `next` and makes it the view. The worker
    /// table goes first (an override may name a worker that just registered), removed overrides
    /// last.
    fn switch_to(&mut self, next: View) {
        if next.workers != self.view.workers {
            self.actions
                .push_back(Action::Workers(next.workers.values().cloned().collect()));
        }
        for (cid, rec) in &next.overrides {
            if self.view.overrides.get(cid) != Some(rec) {
                self.actions.push_back(Action::SetOverride {
                    cid: *cid,
                    record: rec.clone(),
                });
            }
        }
        for cid in self.view.overrides.keys() {
            if !next.overrides.contains_key(cid) {
                self.actions.push_back(Action::DelOverride { cid: *cid });
            }
        }
        self.view = next;
    }
}
