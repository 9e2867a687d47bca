//! `baton-lb` as one node of a cluster (`[cluster]`): it follows the cluster's prefix in etcd
//! (`baton_cluster::etcd::follow`) and writes what it says into this node's pinned maps, through
//! the same [`Controller`] and override writer a single node uses. The worker set comes from the
//! workers' own registrations, the overrides from the migrations' flips.
//!
//! Until the first full read, the controller holds the worker maps as pinned
//! ([`Controller::hold_workers`]): a node restarted while etcd is down keeps forwarding exactly
//! as before. The node's first view is what its pinned maps hold, so its first read writes only
//! the difference.
use crate::config::{ClusterSettings, Encap, MacSetting, Worker};
use crate::controller::Controller;
use crate::overrides::OverrideWriter;
use crate::pinned::PinnedMaps;
use baton_cluster::etcd::{Cluster, Dataplane};
use baton_cluster::{Action, HealthRecord, Node, OverrideRecord, View, WorkerRecord};
use baton_protocol::{Cid, MigrationId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// What `/metrics` and `baton status` show of the node's convergence.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// The revision the maps reflect.
    pub applied: AtomicI64,
    /// Whether the node follows etcd now (false: forwarding on the last applied state).
    pub watching: AtomicBool,
    /// Map changes that could not be written (logged).
    pub apply_errors: AtomicU64,
}

impl ClusterStats {
    pub fn status(&self, settings: &ClusterSettings) -> baton_protocol::daemon::ClusterStatus {
        baton_protocol::daemon::ClusterStatus {
            node: settings.node.clone(),
            prefix: settings.prefix.as_str().to_string(),
            applied_revision: self.applied.load(Ordering::Relaxed),
            watching: self.watching.load(Ordering::Relaxed),
            apply_errors: self.apply_errors.load(Ordering::Relaxed),
        }
    }
}

/// The name a pinned entry has in the node's first view: not a valid worker name, so it never
/// equals a record read from etcd, and the first read replaces it.
fn pinned_name(slot: u32) -> String {
    format!("pinned slot {slot}")
}

/// What this node's pinned maps hold, as a view: the first read writes only what differs.
pub fn pinned_view(maps: &PinnedMaps) -> anyhow::Result<View> {
    let mut view = View::default();
    for (slot, entry) in maps.workers()? {
        if entry.flags & lb_common::WORKER_IN_USE != 0 {
            let name = pinned_name(slot);
            view.workers.insert(
                name.clone(),
                WorkerRecord {
                    name,
                    server_id: entry.server_id,
                    address: std::net::Ipv4Addr::UNSPECIFIED.into(),
                    weight: 0,
                    control: None,
                    encap: None,
                },
            );
        }
    }
    for (key, wref) in maps.overrides()? {
        if let Ok(cid) = Cid::new(key.as_slice()) {
            view.overrides.insert(
                cid,
                OverrideRecord {
                    worker: pinned_name(wref.worker),
                    migration: MigrationId([0; 16]),
                },
            );
        }
    }
    Ok(view)
}

/// A registered worker as the controller configures it: its MAC (its own, or the gateway's when
/// encapsulated) from the neighbour table, its interface and outer source from the route to its
/// address (registrations carry no link-layer detail).
fn worker_of(r: &WorkerRecord) -> Worker {
    Worker {
        name: r.name.clone(),
        server_id: r.server_id,
        address: r.address,
        mac: MacSetting::Auto,
        interface: None,
        weight: r.weight.clamp(1, 1000),
        encap: match r.encap {
            None => Encap::None,
            Some(baton_cluster::RecordEncap::Ipip) => Encap::Ipip,
            Some(baton_cluster::RecordEncap::Gue { port }) => Encap::Gue { port },
        },
        mtu: None,
        encap_source: None,
    }
}

/// The node's maps, as [`follow`](baton_cluster::etcd::follow) changes them.
pub struct ClusterMaps {
    ctl: Arc<Mutex<Controller>>,
    pin_dir: PathBuf,
    stats: Arc<ClusterStats>,
    /// Each worker's health verdict and since when (Unix ms), as published.
    health: BTreeMap<String, HealthRecord>,
    health_changed: Arc<Notify>,
}

impl ClusterMaps {
    pub fn new(ctl: Arc<Mutex<Controller>>, pin_dir: PathBuf, stats: Arc<ClusterStats>) -> Self {
        let health_changed = Arc::new(Notify::new());
        ctl.lock().unwrap().health_changed = Some(health_changed.clone());
        Self {
            ctl,
            pin_dir,
            stats,
            health: BTreeMap::new(),
            health_changed,
        }
    }

    fn set_workers(&mut self, records: &[WorkerRecord]) -> anyhow::Result<()> {
        let mut cfg = self.ctl.lock().unwrap().cfg.clone();
        cfg.workers = records.iter().map(worker_of).collect();
        let maps = PinnedMaps::open(&self.pin_dir)?;
        // Resolving MACs may wait for ARP: off the async threads.
        let next = tokio::task::block_in_place(|| Controller::new(cfg, maps, false))?;
        let mut c = self.ctl.lock().unwrap();
        let mut next = next;
        next.health_changed = c.health_changed.take();
        *c = next;
        c.sync()?;
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        tracing::info!(workers = ?names, "worker set from etcd applied");
        Ok(())
    }

    fn set_override(&mut self, cid: &Cid, record: &OverrideRecord) -> anyhow::Result<()> {
        let mut c = self.ctl.lock().unwrap();
        let slot = c
            .workers
            .iter()
            .find(|w| w.cfg.name == record.worker)
            .map(|w| w.index)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "override of CID {cid} names worker {:?}, which is not registered",
                    record.worker
                )
            })?;
        let cid_len = c.cfg.layout.cid_len();
        OverrideWriter::write(&mut c.maps, cid_len, cid.as_bytes(), slot)?;
        tracing::debug!(%cid, worker = %record.worker, slot, migration = %record.migration, "override from etcd");
        Ok(())
    }
}

impl Dataplane for ClusterMaps {
    /// Every worker the node routes to, healthy or not by its checks (always healthy without
    /// checks), since when this node has thought so.
    fn health(&mut self) -> Option<BTreeMap<String, HealthRecord>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let view: Vec<(String, bool)> = {
            let c = self.ctl.lock().unwrap();
            if c.hold_workers {
                return None;
            }
            c.workers
                .iter()
                .map(|w| (w.cfg.name.clone(), w.healthy))
                .collect()
        };
        self.health
            .retain(|name, _| view.iter().any(|(n, _)| n == name));
        for (name, healthy) in view {
            let r = self.health.entry(name).or_insert(HealthRecord {
                healthy,
                since_unix_ms: now,
            });
            if r.healthy != healthy {
                *r = HealthRecord {
                    healthy,
                    since_unix_ms: now,
                };
            }
        }
        Some(self.health.clone())
    }

    fn health_changed(&self) -> Option<Arc<Notify>> {
        Some(self.health_changed.clone())
    }

    fn apply(&mut self, action: &Action) {
        let result = match action {
            Action::Workers(records) => self.set_workers(records),
            Action::SetOverride { cid, record } => self.set_override(cid, record),
            Action::DelOverride { cid } => {
                let mut c = self.ctl.lock().unwrap();
                OverrideWriter::erase(&mut c.maps, cid.as_bytes()).map(drop)
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.stats.apply_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("applying a change from etcd to the maps failed: {e:#}");
        }
    }

    fn progress(&mut self, applied: i64, watching: bool) {
        self.stats.applied.store(applied, Ordering::Relaxed);
        self.stats.watching.store(watching, Ordering::Relaxed);
    }
}

/// Follows the cluster until `stop`: connects (retrying while etcd is unreachable: the maps keep
/// forwarding meanwhile), then drives the node's convergence.
pub async fn run(
    settings: ClusterSettings,
    ctl: Arc<Mutex<Controller>>,
    pin_dir: PathBuf,
    stats: Arc<ClusterStats>,
    mut stop: watch::Receiver<bool>,
) {
    let initial = {
        let c = ctl.lock().unwrap();
        pinned_view(&c.maps).unwrap_or_else(|e| {
            tracing::warn!("reading the pinned maps for the first view: {e:#}");
            View::default()
        })
    };
    let mut node = Node::new(settings.prefix.clone(), &settings.node, initial);
    let mut backoff = Duration::from_millis(200);
    let cluster = loop {
        match Cluster::connect(&settings.endpoints, settings.prefix.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(node = %settings.node, "{e}: forwarding on the pinned state, retrying in {} ms", backoff.as_millis());
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    tracing::info!(node = %settings.node, prefix = %settings.prefix.as_str(), "following the cluster in etcd");
    let mut maps = ClusterMaps::new(ctl, pin_dir, stats);
    baton_cluster::etcd::follow(
        &cluster,
        &mut node,
        &mut maps,
        Some(settings.lease_ttl_s),
        stop,
    )
    .await;
}
