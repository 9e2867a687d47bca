//! The record stored at each key of the schema ([`crate::keys`]): one serde type per kind of key,
//! JSON in etcd (readable with `etcdctl get --prefix`), used by every writer and reader.
use baton_protocol::{Cid, MigrationId};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// A worker, registered by itself under its lease: it disappears when the worker stops renewing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRecord {
    pub name: String,
    /// The QUIC-LB server ID its CIDs carry; held by the claim at `server-ids/<id>`.
    pub server_id: u64,
    /// Where LB nodes send its datagrams (layer 2: on their segment; encapsulated: anywhere).
    pub address: IpAddr,
    /// Relative share of new connections (Maglev weight).
    #[serde(default = "one")]
    pub weight: u32,
    /// The worker's control API (mutual TLS), for `baton migrate` / `drain` from any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
    /// How LB nodes reach it when it is not on their segment (it takes the outer header off
    /// itself); absent: layer 2. Absent from a layer-2 record's JSON, so those stay readable by
    /// nodes older than encapsulation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encap: Option<RecordEncap>,
}

/// A worker's encapsulation, as it registers it (its `[decap]` must accept it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum RecordEncap {
    /// IP in IP to `address`.
    Ipip,
    /// GUE to `address`, this UDP port.
    Gue { port: u16 },
}

fn one() -> u32 {
    1
}

/// The claim on a server ID, created in a transaction only if the key does not exist, so two
/// workers can never hold one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerIdClaim {
    /// The worker holding the ID.
    pub worker: String,
}

impl ServerIdClaim {
    /// What a worker is told when the ID it asked for is held already.
    pub fn conflict(&self, server_id: u64, wanted_by: &str) -> String {
        format!(
            "server ID {server_id} is held by worker {:?}; worker {wanted_by:?} cannot take it: \
             give it another server_id, or stop {:?} first (its claim goes with its lease)",
            self.worker, self.worker
        )
    }
}

/// A worker's health as one LB node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthRecord {
    pub healthy: bool,
    /// When the node last changed its verdict (Unix ms).
    pub since_unix_ms: u64,
}

/// An exact-CID override: datagrams for `cid` go to `worker`, whatever its server ID says. It is
/// written with a lease no longer than the old CIDs can live, so none outlives its connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideRecord {
    pub worker: String,
    /// The migration that wrote it.
    pub migration: MigrationId,
}

/// Where a migration in flight stands, so a driver that restarts resumes or rolls it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStage {
    /// Asked of the source; nothing is committed: a restarted driver rolls it back.
    Started,
    /// The target confirmed and the override flip is written (at the record's `flip_revision`):
    /// the source forwards late datagrams until every live LB node has applied that revision.
    Flipped,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationRecord {
    pub id: MigrationId,
    /// The connection that moves (what a driver resuming the migration looks for on the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn: Option<Cid>,
    /// The lease of the driver running it: while that lives nobody else touches the migration;
    /// once it ended (the driver died) the next driver resumes or rolls it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_lease: Option<i64>,
    /// The connection's CIDs the overrides cover.
    pub cids: Vec<Cid>,
    pub from: String,
    pub to: String,
    pub stage: MigrationStage,
    /// The etcd revision of the flip (stage `flipped`), once a driver that resumed the migration
    /// rewrote the record; before that it is the record's own modification revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip_revision: Option<i64>,
}

/// The revision an LB node has applied to its maps, under the node's lease (a node that dies
/// stops counting as live when its lease ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedRecord {
    pub revision: i64,
}

/// Whether every live LB node has applied `revision`: the source of a flipped migration stops
/// forwarding only then. `applied` holds each live node's record.
pub fn all_applied<'a>(
    applied: impl IntoIterator<Item = &'a AppliedRecord>,
    revision: i64,
) -> bool {
    applied.into_iter().all(|a| a.revision >= revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_json_and_refuse_unknown_fields() {
        let w = WorkerRecord {
            name: "w1".into(),
            server_id: 1,
            address: "10.0.0.2".parse().unwrap(),
            weight: 1,
            control: None,
            encap: None,
        };
        let text = serde_json::to_string(&w).unwrap();
        assert_eq!(
            text,
            r#"{"name":"w1","server_id":1,"address":"10.0.0.2","weight":1}"#
        );
        assert_eq!(serde_json::from_str::<WorkerRecord>(&text).unwrap(), w);
        let defaulted: WorkerRecord =
            serde_json::from_str(r#"{"name":"w1","server_id":1,"address":"10.0.0.2"}"#).unwrap();
        assert_eq!(defaulted.weight, 1);
        assert!(
            serde_json::from_str::<WorkerRecord>(
                r#"{"name":"w1","server_id":1,"address":"10.0.0.2","srever_id":2}"#
            )
            .is_err()
        );
        let m = MigrationRecord {
            id: MigrationId([1; 16]),
            conn: Some("0102".parse().unwrap()),
            driver_lease: Some(7),
            cids: vec!["0102".parse().unwrap()],
            from: "w1".into(),
            to: "w2".into(),
            stage: MigrationStage::Flipped,
            flip_revision: Some(42),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains(r#""stage":"flipped""#), "{text}");
        assert_eq!(serde_json::from_str::<MigrationRecord>(&text).unwrap(), m);
    }

    #[test]
    fn a_conflict_names_the_holder() {
        let claim = ServerIdClaim {
            worker: "w1".into(),
        };
        let msg = claim.conflict(3, "w9");
        assert!(msg.contains("held by worker \"w1\""), "{msg}");
        assert!(msg.contains("\"w9\""), "{msg}");
    }

    #[test]
    fn forwarding_ends_when_every_live_node_caught_up() {
        let nodes = [
            AppliedRecord { revision: 10 },
            AppliedRecord { revision: 7 },
        ];
        assert!(all_applied(&nodes, 7));
        assert!(!all_applied(&nodes, 8));
        assert!(all_applied(&[], 8));
    }
}
