//! The etcd side of a cluster (`etcd-client`): a client bound to one cluster prefix, leases kept
//! alive, a worker's registration (its server ID claimed in a transaction, so two workers can
//! never hold one), and [`follow`], the loop that drives an LB node's [`Node`] from the watch and
//! carries out its actions on the node's [`Dataplane`].
use crate::keys::{Key, Prefix};
use crate::node::{Action, Input, Node, WatchEvent};
use crate::records::{
    AppliedRecord, HealthRecord, MigrationRecord, MigrationStage, OverrideRecord, ServerIdClaim,
    WorkerRecord,
};
use baton_protocol::{Cid, MigrationId};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How long one etcd request may take before the caller treats etcd as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause between two reconnection attempts of [`follow`].
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "etcd is unreachable at {endpoints}: {source} (is etcd running, and are [cluster] \
         endpoints right?)"
    )]
    Unreachable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// The server ID is held by another worker (the message names it).
    #[error("{0}")]
    ServerIdHeld(String),
    #[error(
        "worker name {name:?} is registered already with server ID {server_id}: give this worker \
         another name, or stop the other one first"
    )]
    NameHeld { name: String, server_id: u64 },
    #[error("{key} in etcd does not decode: {why}")]
    BadRecord { key: String, why: String },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// An etcd client for one cluster's prefix.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    prefix: Prefix,
    endpoints: String,
}

impl Cluster {
    /// Connects to `endpoints` (e.g. `http://10.0.0.5:2379`) and checks etcd answers.
    pub async fn connect(endpoints: &[String], prefix: Prefix) -> Result<Cluster, ClusterError> {
        let shown = endpoints.join(",");
        let unreachable = |source| ClusterError::Unreachable {
            endpoints: shown.clone(),
            source,
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(unreachable)?;
        client.status().await.map_err(unreachable)?;
        Ok(Cluster {
            client,
            prefix,
            endpoints: shown,
        })
    }

    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// The underlying client (for what this module does not wrap).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn unreachable(&self, source: etcd_client::Error) -> ClusterError {
        ClusterError::Unreachable {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// A lease of `ttl` seconds, kept alive until the [`Lease`] is dropped or revoked.
    pub async fn lease(&self, ttl: i64) -> Result<Lease, ClusterError> {
        let mut client = self.client.clone();
        let id = client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| self.unreachable(e))?
            .id();
        let keeper = tokio::spawn(keep_alive(client.clone(), id, ttl));
        Ok(Lease { id, keeper, client })
    }

    /// Registers `record` under a fresh lease of `ttl` seconds: claims `server-ids/<id>` and
    /// writes `workers/<name>` in one transaction that succeeds only if neither exists. A claim
    /// held by a worker of the same name (this worker before a restart, its lease not yet over)
    /// is taken over; one held by another worker is refused with a message naming it.
    pub async fn register_worker(
        &self,
        record: &WorkerRecord,
        ttl: i64,
    ) -> Result<Lease, ClusterError> {
        crate::keys::check_name(&record.name).map_err(|e| ClusterError::BadRecord {
            key: "workers/".into(),
            why: e.to_string(),
        })?;
        let claim_key = self.prefix.key(&Key::ServerId(record.server_id));
        let worker_key = self.prefix.key(&Key::Worker(record.name.clone()));
        let claim = serde_json::to_vec(&ServerIdClaim {
            worker: record.name.clone(),
        })
        .expect("a claim serializes");
        let body = serde_json::to_vec(record).expect("a worker record serializes");
        let lease = self.lease(ttl).await?;
        let put =
            |k: &str, v: &[u8]| TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease.id())));
        let mut client = self.client.clone();
        let first = Txn::new()
            .when([
                Compare::create_revision(claim_key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(worker_key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([put(&claim_key, &claim), put(&worker_key, &body)])
            .or_else([
                TxnOp::get(claim_key.as_str(), None),
                TxnOp::get(worker_key.as_str(), None),
            ]);
        let resp = client.txn(first).await.map_err(|e| self.unreachable(e))?;
        if resp.succeeded() {
            info!(worker = %record.name, server_id = record.server_id, lease = lease.id(), "registered in etcd");
            return Ok(lease);
        }
        let mut found = resp.op_responses().into_iter().map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        });
        let held_claim = found.next().flatten();
        let held_worker = found.next().flatten();
        if let Some((value, _)) = &held_claim {
            let holder: ServerIdClaim = match serde_json::from_slice(value) {
                Ok(h) => h,
                Err(e) => {
                    lease.revoke().await;
                    return Err(ClusterError::BadRecord {
                        key: claim_key.clone(),
                        why: e.to_string(),
                    });
                }
            };
            if holder.worker != record.name {
                lease.revoke().await;
                return Err(ClusterError::ServerIdHeld(
                    holder.conflict(record.server_id, &record.name),
                ));
            }
        }
        if let Some((value, _)) = &held_worker {
            let other: WorkerRecord = match serde_json::from_slice(value) {
                Ok(o) => o,
                Err(e) => {
                    lease.revoke().await;
                    return Err(ClusterError::BadRecord {
                        key: worker_key.clone(),
                        why: e.to_string(),
                    });
                }
            };
            if other.server_id != record.server_id {
                lease.revoke().await;
                return Err(ClusterError::NameHeld {
                    name: record.name.clone(),
                    server_id: other.server_id,
                });
            }
        }
        // Our own earlier registration: take it over if nobody changed it meanwhile.
        let unchanged = |key: &str, seen: &Option<(Vec<u8>, i64)>| match seen {
            Some((_, rev)) => Compare::mod_revision(key, CompareOp::Equal, *rev),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        };
        let takeover = Txn::new()
            .when([
                unchanged(&claim_key, &held_claim),
                unchanged(&worker_key, &held_worker),
            ])
            .and_then([put(&claim_key, &claim), put(&worker_key, &body)]);
        let resp = client
            .txn(takeover)
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.succeeded() {
            lease.revoke().await;
            return Err(ClusterError::ServerIdHeld(format!(
                "server ID {} changed hands while worker {:?} was registering: try again",
                record.server_id, record.name
            )));
        }
        info!(worker = %record.name, server_id = record.server_id, "registered in etcd, taking over its earlier registration");
        Ok(lease)
    }
}

/// A lease kept alive by a task of its own; dropping it stops the renewals (the keys under it go
/// when its TTL runs out), [`Lease::revoke`] removes them at once.
pub struct Lease {
    id: i64,
    keeper: JoinHandle<()>,
    client: Client,
}

impl Lease {
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Whether etcd let it expire (the keep-alive task ended: its keys are gone).
    pub fn expired(&self) -> bool {
        self.keeper.is_finished()
    }

    /// Ends the lease now; its keys are deleted. Best effort: etcd may be unreachable, and then
    /// the TTL ends it.
    pub async fn revoke(mut self) {
        self.keeper.abort();
        if let Err(e) = self.client.lease_revoke(self.id).await {
            debug!(lease = self.id, "revoking the lease: {e} (its TTL ends it)");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Renews lease `id` every third of its TTL, reopening the keep-alive stream after an error.
async fn keep_alive(mut client: Client, id: i64, ttl: i64) {
    let every = Duration::from_millis((ttl.max(1) as u64 * 1000) / 3);
    loop {
        match client.lease_keep_alive(id).await {
            Ok((mut keeper, mut stream)) => loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() <= 0 => {
                        warn!(
                            lease = id,
                            "the lease expired in etcd (unreachable longer than its TTL): its keys are gone"
                        );
                        return;
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
                tokio::time::sleep(every).await;
            },
            Err(e) => debug!(lease = id, "lease keep-alive: {e}"),
        }
        tokio::time::sleep(every.min(Duration::from_millis(500))).await;
    }
}

/// What an LB node's maps do with the node's map actions ([`Action::Workers`],
/// [`Action::SetOverride`], [`Action::DelOverride`]).
pub trait Dataplane {
    fn apply(&mut self, action: &Action);
    /// Where the node stands after each round: the revision its maps reflect, and whether it
    /// follows etcd now (false: forwarding on the last applied state). For status and metrics.
    fn progress(&mut self, _applied: i64, _watching: bool) {}
    /// The workers' health as this node's checks see it now (worker name -> record), published
    /// under `health/<node>/<worker>` with the node's lease; `None`: nothing to publish.
    fn health(&mut self) -> Option<BTreeMap<String, HealthRecord>> {
        None
    }
    /// Notified when [`Self::health`] may have changed, so it is published without waiting for
    /// the next watch event.
    fn health_changed(&self) -> Option<Arc<Notify>> {
        None
    }
}

/// Brings `health/<node>/...` in etcd to `view` under lease `lease`: what changed is written,
/// what went is deleted. `published` is what etcd holds (as far as this node wrote it).
async fn publish_health(
    cluster: &Cluster,
    node: &str,
    view: &BTreeMap<String, HealthRecord>,
    published: &mut BTreeMap<String, HealthRecord>,
    lease: i64,
) {
    let mut client = cluster.client.clone();
    let key = |worker: &str| {
        cluster.prefix.key(&Key::Health {
            node: node.to_string(),
            worker: worker.to_string(),
        })
    };
    for (worker, record) in view {
        if published.get(worker) == Some(record) {
            continue;
        }
        let body = serde_json::to_vec(record).expect("a health record serializes");
        match client
            .put(key(worker), body, Some(PutOptions::new().with_lease(lease)))
            .await
        {
            Ok(_) => {
                published.insert(worker.clone(), record.clone());
            }
            Err(e) => {
                warn!(node, worker = %worker, "publishing the worker's health: {e}");
                return;
            }
        }
    }
    let gone: Vec<String> = published
        .keys()
        .filter(|w| !view.contains_key(*w))
        .cloned()
        .collect();
    for worker in gone {
        match client.delete(key(&worker), None).await {
            Ok(_) => {
                published.remove(&worker);
            }
            Err(e) => {
                warn!(node, worker = %worker, "removing the worker's health record: {e}");
                return;
            }
        }
    }
}

/// Drives `node` from etcd until `stop` turns true: reads and watches the prefix, hands every
/// map action to `dataplane` in order, writes the node's applied revision (under a lease of
/// `lease_ttl` seconds that this loop keeps, so a dead node stops counting). When etcd goes away
/// the node keeps its maps and this loop retries with a growing pause; when it returns, the watch
/// resumes past the applied revision. A lease that expired meanwhile (etcd away longer than its
/// TTL took the report with it) is granted afresh and the report written again at once, so a
/// node that routes always counts as live.
pub async fn follow(
    cluster: &Cluster,
    node: &mut Node,
    dataplane: &mut impl Dataplane,
    lease_ttl: Option<i64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = cluster.client.clone();
    let prefix = cluster.prefix.as_str().to_string();
    let applied_key = cluster.prefix.key(&Key::Applied(node.name().to_string()));
    let mut backoff = Duration::from_millis(100);
    let mut stream: Option<WatchStream> = None;
    let mut lease: Option<Lease> = None;
    // The applied revision must be (re)written even without a map change: first start, a new
    // lease.
    let mut report_due = true;
    // The health records this node wrote, and under which lease (a new lease: write them again).
    let health_changed = dataplane.health_changed();
    let mut published_health: BTreeMap<String, HealthRecord> = BTreeMap::new();
    let mut health_lease: Option<i64> = None;
    node.handle(Input::Connected);
    loop {
        if *stop.borrow() {
            return;
        }
        let mut failed: Option<String> = None;
        while let Some(action) = node.poll_action() {
            match action {
                Action::Resync => {
                    match client
                        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                        .await
                    {
                        Ok(r) => {
                            let revision = r.header().map_or(0, |h| h.revision());
                            let kvs = r
                                .kvs()
                                .iter()
                                .map(|kv| {
                                    (
                                        String::from_utf8_lossy(kv.key()).into_owned(),
                                        kv.value().to_vec(),
                                    )
                                })
                                .collect();
                            node.handle(Input::Snapshot { revision, kvs });
                        }
                        Err(e) => {
                            failed = Some(format!("reading the prefix: {e}"));
                            break;
                        }
                    }
                }
                Action::Watch { from_revision } => {
                    let options = WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from_revision)
                        .with_progress_notify();
                    match client.watch(prefix.as_str(), Some(options)).await {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            failed = Some(format!("opening the watch: {e}"));
                            break;
                        }
                    }
                }
                Action::ReportApplied { revision } => {
                    report_due =
                        !report_applied(cluster, &applied_key, revision, lease_ttl, &mut lease)
                            .await;
                }
                map_action => dataplane.apply(&map_action),
            }
        }
        if failed.is_none() && stream.is_none() {
            failed = Some("no watch open".into());
        }
        if failed.is_none()
            && node.is_watching()
            && (report_due || lease.as_ref().is_some_and(Lease::expired))
        {
            report_due =
                !report_applied(cluster, &applied_key, node.applied(), lease_ttl, &mut lease).await;
        }
        if failed.is_none() {
            if let (Some(l), Some(view)) =
                (lease.as_ref().filter(|l| !l.expired()), dataplane.health())
            {
                if health_lease != Some(l.id()) {
                    published_health.clear();
                    health_lease = Some(l.id());
                }
                publish_health(cluster, node.name(), &view, &mut published_health, l.id()).await;
            }
        }
        dataplane.progress(node.applied(), failed.is_none() && node.is_watching());
        if let (None, Some(s)) = (&failed, stream.as_mut()) {
            let health_wake = async {
                match &health_changed {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => continue,
                () = health_wake => continue,
                m = s.message() => match m {
                    Ok(Some(resp)) => {
                        backoff = Duration::from_millis(100);
                        if resp.compact_revision() > 0 {
                            stream = None;
                            node.handle(Input::Compacted { compact_revision: resp.compact_revision() });
                        } else if resp.canceled() {
                            failed = Some(format!("the watch was cancelled: {}", resp.cancel_reason()));
                        } else if resp.events().is_empty() {
                            if !resp.created() {
                                let revision = resp.header().map_or(0, |h| h.revision());
                                node.handle(Input::Progress { revision });
                            }
                        } else {
                            let events = resp
                                .events()
                                .iter()
                                .filter_map(|e| {
                                    let kv = e.kv()?;
                                    Some(WatchEvent {
                                        revision: kv.mod_revision(),
                                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                                        value: (e.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                                    })
                                })
                                .collect();
                            node.handle(Input::Events(events));
                        }
                    }
                    Ok(None) => failed = Some("etcd closed the watch".into()),
                    Err(e) => failed = Some(format!("watching: {e}")),
                },
            }
        }
        if let Some(why) = failed {
            warn!(
                node = node.name(),
                applied = node.applied(),
                "etcd unreachable ({why}): forwarding on the last applied state, retrying in {} ms",
                backoff.as_millis()
            );
            stream = None;
            node.handle(Input::Disconnected);
            dataplane.progress(node.applied(), false);
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            node.handle(Input::Connected);
        }
    }
}

/// Writes `nodes/<node>/applied` under the node's lease (granted here when there is none, or
/// when the last one expired). Returns whether it was written; a failure is logged (the maps are
/// right; the report is tried again).
async fn report_applied(
    cluster: &Cluster,
    key: &str,
    revision: i64,
    lease_ttl: Option<i64>,
    lease: &mut Option<Lease>,
) -> bool {
    if lease.as_ref().is_some_and(Lease::expired) {
        *lease = None;
    }
    let options = match lease_ttl {
        None => None,
        Some(ttl) => {
            if lease.is_none() {
                match cluster.lease(ttl).await {
                    Ok(l) => *lease = Some(l),
                    Err(e) => {
                        warn!(revision, "reporting the applied revision: {e}");
                        return false;
                    }
                }
            }
            lease.as_ref().map(|l| PutOptions::new().with_lease(l.id()))
        }
    };
    let body = serde_json::to_vec(&AppliedRecord { revision }).expect("a revision serializes");
    let mut client = cluster.client.clone();
    match client.put(key, body, options).await {
        Ok(_) => true,
        Err(e) => {
            // Perhaps the lease is gone (etcd away longer than its TTL): a new one next time.
            *lease = None;
            warn!(revision, "reporting the applied revision: {e}");
            false
        }
    }
}

/// What a migration's driver (`baton migrate`, `baton drain`, from any host) reads and writes:
/// the registered workers, the migration's record, the flip and its retirement, and the wait
/// for every live LB node to have applied the flip.
impl Cluster {
    /// Every registered worker (records that do not decode are skipped, as LB nodes skip them).
    pub async fn workers(&self) -> Result<Vec<WorkerRecord>, ClusterError> {
        let mut out = Vec::new();
        for (key, value) in self.list("workers/").await? {
            match serde_json::from_slice::<WorkerRecord>(&value) {
                Ok(w) => out.push(w),
                Err(e) => warn!(%key, "a worker record that does not decode: {e}"),
            }
        }
        Ok(out)
    }

    /// Every override in etcd.
    pub async fn overrides(&self) -> Result<Vec<(Cid, OverrideRecord)>, ClusterError> {
        let mut out = Vec::new();
        for (key, value) in self.list("overrides/").await? {
            if let (Ok(Key::Override(cid)), Ok(r)) = (
                self.prefix.parse(&key),
                serde_json::from_slice::<OverrideRecord>(&value),
            ) {
                out.push((cid, r));
            }
        }
        Ok(out)
    }

    /// Each live LB node's applied revision (a node whose lease ended is not listed).
    pub async fn applied(&self) -> Result<BTreeMap<String, i64>, ClusterError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list("nodes/").await? {
            if let (Ok(Key::Applied(node)), Ok(r)) = (
                self.prefix.parse(&key),
                serde_json::from_slice::<AppliedRecord>(&value),
            ) {
                out.insert(node, r.revision);
            }
        }
        Ok(out)
    }

    /// Records a migration about to start (stage `started`): a driver that dies leaves it for
    /// the next one to see. Nothing is committed yet.
    pub async fn begin_migration(&self, record: &MigrationRecord) -> Result<(), ClusterError> {
        let key = self.prefix.key(&Key::Migration(record.id));
        let body = serde_json::to_vec(record).expect("a migration record serializes");
        let mut client = self.client.clone();
        client
            .put(key, body, None)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    /// The flip, written once: every override of `record.cids` to `record.to` (under a lease of
    /// `override_ttl` seconds that is not renewed, so no override outlives the old CIDs by more)
    /// and the migration's stage `flipped`, in one transaction. Returns the flip's revision.
    pub async fn flip(
        &self,
        record: &MigrationRecord,
        override_ttl: i64,
    ) -> Result<i64, ClusterError> {
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(override_ttl, None)
            .await
            .map_err(|e| self.unreachable(e))?
            .id();
        let body = serde_json::to_vec(&OverrideRecord {
            worker: record.to.clone(),
            migration: record.id,
        })
        .expect("an override serializes");
        let mut ops: Vec<TxnOp> = record
            .cids
            .iter()
            .map(|cid| {
                TxnOp::put(
                    self.prefix.key(&Key::Override(*cid)),
                    body.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        let mut flipped = record.clone();
        flipped.stage = MigrationStage::Flipped;
        ops.push(TxnOp::put(
            self.prefix.key(&Key::Migration(record.id)),
            serde_json::to_vec(&flipped).expect("a migration record serializes"),
            None,
        ));
        let resp = client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Waits until every live LB node has applied `revision` (the flip), at most `timeout`:
    /// reads the nodes' reports once, then follows them with a watch (a node's report changing,
    /// or going with its lease). On timeout, returns the nodes still behind and where they are.
    pub async fn wait_applied(
        &self,
        revision: i64,
        timeout: Duration,
    ) -> Result<Result<(), BTreeMap<String, i64>>, ClusterError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let behind = |applied: &BTreeMap<String, i64>| -> BTreeMap<String, i64> {
            applied
                .iter()
                .filter(|(_, r)| **r < revision)
                .map(|(n, r)| (n.clone(), *r))
                .collect()
        };
        let dir = format!("{}nodes/", self.prefix.as_str());
        let mut client = self.client.clone();
        // The watch first, from now on (a watch from a past revision is served late, in etcd's
        // catch-up batches), then one read: nothing between the two is missed.
        let mut stream = client
            .watch(dir.as_str(), Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        // The client does not wait for etcd to confirm the watch: do, so the read below is after it.
        loop {
            let created = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return self.applied().await.map(|a| Err(behind(&a))),
                m = stream.message() => m.map_err(|e| self.unreachable(e))?,
            };
            match created {
                Some(r) if r.created() => break,
                Some(_) => {}
                None => {
                    return Err(ClusterError::Unreachable {
                        endpoints: self.endpoints.clone(),
                        source: etcd_client::Error::WatchError("etcd closed the watch".into()),
                    });
                }
            }
        }
        let resp = client
            .get(dir.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut applied = BTreeMap::new();
        for kv in resp.kvs() {
            self.note_applied(&mut applied, kv.key(), Some(kv.value()));
        }
        if behind(&applied).is_empty() {
            return Ok(Ok(()));
        }
        loop {
            let message = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(Err(behind(&applied))),
                m = stream.message() => m,
            };
            match message {
                Ok(Some(resp)) => {
                    for e in resp.events() {
                        if let Some(kv) = e.kv() {
                            let value = (e.event_type() == EventType::Put).then(|| kv.value());
                            self.note_applied(&mut applied, kv.key(), value);
                        }
                    }
                    if behind(&applied).is_empty() {
                        return Ok(Ok(()));
                    }
                }
                Ok(None) => {
                    return Err(ClusterError::Unreachable {
                        endpoints: self.endpoints.clone(),
                        source: etcd_client::Error::WatchError("etcd closed the watch".into()),
                    });
                }
                Err(e) => return Err(self.unreachable(e)),
            }
        }
    }

    /// One node's report (`value` `None`: gone with its lease) into `applied`.
    fn note_applied(&self, applied: &mut BTreeMap<String, i64>, key: &[u8], value: Option<&[u8]>) {
        let Ok(Key::Applied(node)) = self.prefix.parse(&String::from_utf8_lossy(key)) else {
            return;
        };
        match value.map(serde_json::from_slice::<AppliedRecord>) {
            Some(Ok(r)) => {
                applied.insert(node, r.revision);
            }
            // A report that does not decode counts as absent, as for the LB nodes.
            Some(Err(_)) | None => {
                applied.remove(&node);
            }
        }
    }

    /// Every migration record in flight, each with its key's modification revision (of a
    /// flipped record no driver has rewritten since: the flip's revision). A record that does
    /// not decode is reported, not skipped: a driver must not lose track of a migration.
    pub async fn migrations(&self) -> Result<Vec<(MigrationRecord, i64)>, ClusterError> {
        let mut client = self.client.clone();
        let dir = format!("{}migrations/", self.prefix.as_str());
        let resp = client
            .get(dir.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.unreachable(e))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice::<MigrationRecord>(kv.value())
                    .map(|r| (r, kv.mod_revision()))
                    .map_err(|e| ClusterError::BadRecord {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        why: e.to_string(),
                    })
            })
            .collect()
    }

    /// Whether lease `id` is still alive (its holder renews it).
    pub async fn lease_alive(&self, id: i64) -> Result<bool, ClusterError> {
        let mut client = self.client.clone();
        // etcd answers an expired or unknown lease with TTL -1.
        let r = client
            .lease_time_to_live(id, None)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(r.ttl() > 0)
    }

    /// Takes over a migration whose driver died: rewrites its record as `record` (naming this
    /// driver's lease) only if nobody changed it since revision `seen`. `false`: another driver
    /// got there first, and this one leaves it alone.
    pub async fn adopt_migration(
        &self,
        record: &MigrationRecord,
        seen: i64,
    ) -> Result<bool, ClusterError> {
        let key = self.prefix.key(&Key::Migration(record.id));
        let body = serde_json::to_vec(record).expect("a migration record serializes");
        let mut client = self.client.clone();
        let resp = client
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, seen)])
                    .and_then([TxnOp::put(key.as_str(), body, None)]),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(resp.succeeded())
    }

    /// Forgets a migration's record (done, or rolled back).
    pub async fn end_migration(&self, id: MigrationId) -> Result<(), ClusterError> {
        let mut client = self.client.clone();
        client
            .delete(self.prefix.key(&Key::Migration(id)), None)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    /// Removes the override of `cid` (the client no longer uses it).
    pub async fn retire_override(&self, cid: &Cid) -> Result<(), ClusterError> {
        let mut client = self.client.clone();
        client
            .delete(self.prefix.key(&Key::Override(*cid)), None)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(())
    }

    /// Every key and value under `P` `dir`.
    async fn list(&self, dir: &str) -> Result<Vec<(String, Vec<u8>)>, ClusterError> {
        let mut client = self.client.clone();
        let resp = client
            .get(
                format!("{}{dir}", self.prefix.as_str()),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }
}
