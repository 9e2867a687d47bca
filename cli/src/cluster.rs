//! The migration driver's link to a cluster (`[cluster]` in the migration config): etcd holds the
//! workers' registrations (where their control API listens), the flips and the LB nodes' applied
//! revisions, so `baton migrate` and `baton drain` run from any host that reaches etcd and the
//! workers, not only an LB host. Blocking wrappers over `baton_cluster::etcd::Cluster` (the one
//! place that talks to etcd), on a small runtime of their own: the driver is blocking code, and
//! a drain calls these from several threads at once.
use baton_cluster::etcd::{Cluster, ClusterError, Lease};
use baton_cluster::{MigrationRecord, MigrationStage, OverrideRecord, Prefix, WorkerRecord};
use baton_protocol::{Cid, ErrorKind, Failure, MigrationId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// `[cluster]` of the migration config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterClient {
    /// etcd's client URLs, e.g. `["http://10.0.0.5:2379"]`.
    pub endpoints: Vec<String>,
    /// The cluster's key prefix (the one its LB nodes and workers use).
    pub prefix: String,
    /// Seconds an override lives at most (its lease is not renewed): longer than a client keeps
    /// using a moved connection's old CIDs. The driver removes it earlier once the target
    /// reports them unused.
    #[serde(default = "default_override_ttl")]
    pub override_ttl_s: i64,
    /// How long the release of a source waits for every live LB node to apply the flip. Until
    /// then the source forwards late datagrams; past it the source is not released (it forwards
    /// until it gives up by itself) and the migration reports which nodes lag.
    #[serde(default = "default_applied_timeout")]
    pub applied_timeout_ms: u64,
    /// Seconds the lease of this driver's migration records lasts after the driver stops
    /// renewing it (it died): then another `baton` run resumes or rolls them back.
    #[serde(default = "default_driver_lease")]
    pub driver_lease_s: i64,
}

fn default_driver_lease() -> i64 {
    10
}

fn default_override_ttl() -> i64 {
    600
}

fn default_applied_timeout() -> u64 {
    5000
}

/// An etcd error as a migration reports it.
fn failure(e: ClusterError) -> Failure {
    match e {
        e @ ClusterError::Unreachable { .. } => Failure::new(
            ErrorKind::ClusterUnavailable,
            format!("{e}; the data plane keeps forwarding, but migrations need etcd"),
        ),
        e => Failure::new(ErrorKind::ClusterUnavailable, e.to_string()),
    }
}

pub struct ClusterLink {
    rt: tokio::runtime::Runtime,
    cluster: Cluster,
    /// This driver's lease, named by each migration record it writes; renewed by a task on
    /// `rt` while the driver lives.
    lease: Lease,
    pub settings: ClusterClient,
}

impl ClusterLink {
    /// Connects to etcd; fails with the etcd error (and what to check) when it does not answer.
    pub fn connect(settings: ClusterClient) -> Result<Self, Failure> {
        let config = |m: String| Failure::new(ErrorKind::Config, format!("[cluster] {m}"));
        if settings.endpoints.is_empty() {
            return Err(config("endpoints: list etcd's client URLs".into()));
        }
        if settings.override_ttl_s < 10 {
            return Err(config(
                "override_ttl_s must be at least 10 (seconds)".into(),
            ));
        }
        if settings.driver_lease_s < 2 {
            return Err(config("driver_lease_s must be at least 2 (seconds)".into()));
        }
        let prefix = Prefix::new(&settings.prefix).map_err(|e| config(format!("prefix: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Failure::new(ErrorKind::Setup, format!("a runtime for etcd: {e}")))?;
        let cluster = rt
            .block_on(Cluster::connect(&settings.endpoints, prefix))
            .map_err(failure)?;
        let lease = rt
            .block_on(cluster.lease(settings.driver_lease_s))
            .map_err(failure)?;
        Ok(Self {
            rt,
            cluster,
            lease,
            settings,
        })
    }

    pub fn workers(&self) -> Result<Vec<WorkerRecord>, Failure> {
        self.rt.block_on(self.cluster.workers()).map_err(failure)
    }

    pub fn overrides(&self) -> Result<Vec<(Cid, OverrideRecord)>, Failure> {
        self.rt.block_on(self.cluster.overrides()).map_err(failure)
    }

    /// The live LB nodes and the revision each has applied.
    pub fn applied(&self) -> Result<BTreeMap<String, i64>, Failure> {
        self.rt.block_on(self.cluster.applied()).map_err(failure)
    }

    /// Records the migration in flight (stage `started`, under this driver's lease) before
    /// the source is asked.
    pub fn begin(&self, id: MigrationId, conn: &Cid, from: &str, to: &str) -> Result<(), Failure> {
        let record = MigrationRecord {
            id,
            conn: Some(*conn),
            driver_lease: Some(self.lease.id()),
            cids: Vec::new(),
            from: from.into(),
            to: to.into(),
            stage: MigrationStage::Started,
            flip_revision: None,
        };
        self.rt
            .block_on(self.cluster.begin_migration(&record))
            .map_err(failure)
    }

    /// Writes the flip of `cids` to `to` once; returns its revision.
    pub fn flip(
        &self,
        id: MigrationId,
        conn: &Cid,
        from: &str,
        to: &str,
        cids: &[Cid],
    ) -> Result<i64, Failure> {
        self.flip_record(&MigrationRecord {
            id,
            conn: Some(*conn),
            driver_lease: Some(self.lease.id()),
            cids: cids.to_vec(),
            from: from.into(),
            to: to.into(),
            stage: MigrationStage::Flipped,
            flip_revision: None,
        })
    }

    /// Writes the flip of `record.cids` to `record.to`; returns its revision.
    pub fn flip_record(&self, record: &MigrationRecord) -> Result<i64, Failure> {
        self.rt
            .block_on(self.cluster.flip(record, self.settings.override_ttl_s))
            .map_err(failure)
    }

    /// This driver's lease (named by the records it writes).
    pub fn lease_id(&self) -> i64 {
        self.lease.id()
    }

    /// Every migration record in etcd, with its modification revision.
    pub fn migrations(&self) -> Result<Vec<(MigrationRecord, i64)>, Failure> {
        self.rt.block_on(self.cluster.migrations()).map_err(failure)
    }

    /// Whether the driver holding lease `id` still lives.
    pub fn lease_alive(&self, id: i64) -> Result<bool, Failure> {
        self.rt
            .block_on(self.cluster.lease_alive(id))
            .map_err(failure)
    }

    /// Takes over a dead driver's migration (`record` names this driver's lease) if nobody
    /// changed it since revision `seen`; `false`: another driver took it.
    pub fn adopt(&self, record: &MigrationRecord, seen: i64) -> Result<bool, Failure> {
        self.rt
            .block_on(self.cluster.adopt_migration(record, seen))
            .map_err(failure)
    }

    /// Waits until every live LB node has applied `revision`; on timeout, says which lag.
    pub fn wait_applied(&self, revision: i64) -> Result<(), Failure> {
        let timeout = Duration::from_millis(self.settings.applied_timeout_ms);
        match self
            .rt
            .block_on(self.cluster.wait_applied(revision, timeout))
            .map_err(failure)?
        {
            Ok(()) => Ok(()),
            Err(behind) => {
                let list: Vec<String> = behind
                    .iter()
                    .map(|(node, rev)| format!("{node} (at {rev})"))
                    .collect();
                Err(Failure::new(
                    ErrorKind::Timeout,
                    format!(
                        "LB nodes {} had not applied the flip (revision {revision}) after {} ms: \
                         the source was not released and forwards late datagrams until it gives \
                         up by itself",
                        list.join(", "),
                        timeout.as_millis()
                    ),
                ))
            }
        }
    }

    /// Forgets the migration's record (best effort: a leftover record is only information).
    pub fn end(&self, id: MigrationId) {
        if let Err(e) = self.rt.block_on(self.cluster.end_migration(id)) {
            tracing::warn!(migration_id = %id, "removing the migration's record from etcd: {e}");
        }
    }

    pub fn retire(&self, cid: &Cid) -> Result<(), Failure> {
        self.rt
            .block_on(self.cluster.retire_override(cid))
            .map_err(failure)
    }
}
