//! The worker control API: what `baton` (the orchestrator) asks a `baton-worker`, and the
//! answers. JSON lines, one [`Request`] per line, each answered by one
//! [`envelope`](crate::envelope) line. Over TCP the API needs mutual TLS and ALPN [`CONTROL_ALPN`].
use crate::cid::{Cid, MigrationId};
use crate::hex::HexBytes;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

/// ALPN of the control API over TLS. Required by the worker.
pub const CONTROL_ALPN: &[u8] = b"baton-control/1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answered with [`Info`]. (Empty struct variants, not unit ones: serde lets a unit
    /// variant of a tagged enum through with any fields.)
    Info {},
    /// Answered with a list of [`Conn`].
    Conns {},
    /// Answered with [`MigratedOut`] once the target confirmed (or with the failure, after the
    /// rollback).
    MigrateOut(MigrateOut),
    /// Answered with [`Released`].
    Release { migration_id: MigrationId },
    /// Answered with [`Health`]: the worker's migration machinery (keys, peers).
    Health {},
    /// Answered with [`SourceStatus`]: where this worker, as the source, stands in a
    /// migration (for a driver that resumes the migration of one that died).
    MigrationStatus { migration_id: MigrationId },
}

impl Request {
    /// The `cmd` tag, for messages about the request.
    pub fn cmd(&self) -> &'static str {
        match self {
            Request::Info {} => "info",
            Request::Conns {} => "conns",
            Request::MigrateOut(_) => "migrate_out",
            Request::Release { .. } => "release",
            Request::Health {} => "health",
            Request::MigrationStatus { .. } => "migration_status",
        }
    }
}

/// Whether a worker can take part in migrations: the keys it holds and the peers it reaches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Token secrets it verifies with (ids only), and the current one.
    pub token_secret_ids: Vec<u32>,
    pub token_secret_id: u32,
    /// Snapshot keys it opens with (ids only), and the one it seals with.
    pub snapshot_key_ids: Vec<u32>,
    pub snapshot_key_id: u32,
    /// Every worker of its `[peer] workers`, dialled on the peer channel.
    pub peers: Vec<PeerHealth>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerHealth {
    pub name: String,
    pub server_id: u32,
    pub peer: SocketAddr,
    /// `None`: reachable (handshake done or connection up); else why not.
    pub error: Option<String>,
    /// How long reaching it took, milliseconds.
    pub ms: f64,
}

/// The layout of the CIDs a party issues or routes: `cid_len` bytes, the first octet, then
/// `server_id_len` bytes of server ID. The LB and every worker must agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidLayout {
    pub cid_len: u8,
    pub server_id_len: u8,
}

impl std::fmt::Display for CidLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-byte CIDs with a {}-byte server ID",
            self.cid_len, self.server_id_len
        )
    }
}

/// Who a worker is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Info {
    /// [`crate::PROTOCOL_VERSION`] of the worker.
    pub protocol: u16,
    pub name: String,
    pub server_id: u32,
    /// Its peer-channel address (where other workers send it connections).
    pub peer: SocketAddr,
    pub cid: CidLayout,
}

/// One connection a worker holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conn {
    /// Stable name of the connection (the client's first Initial DCID); survives migrations.
    pub conn: Cid,
    /// The worker's local handle (changes with every move).
    pub id: u64,
    pub remote: SocketAddr,
    /// The VIP the client talks to (the connection's replies come from it).
    pub vip: Option<IpAddr>,
    /// Frozen for export: a migration of it is under way.
    pub frozen: bool,
    /// Imported, waiting for the source's commit.
    pub held: bool,
    /// Local CIDs the client may still use: what the LB must route here.
    pub cids: Vec<Cid>,
}

/// Where a connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRef {
    pub name: String,
    pub server_id: u32,
    pub peer: SocketAddr,
}

/// Move connection `conn` to `target`: freeze, export, seal, transfer, wait for the target's
/// held import, commit. The token authorises exactly this migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateOut {
    pub conn: Cid,
    pub migration_id: MigrationId,
    pub token: HexBytes,
    pub target: TargetRef,
    /// How long the connection may take to quiesce for export (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Test hook (fault tests): flip one bit of the sealed snapshot before sending it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub test_tamper: bool,
}

/// A connection that left: the target confirmed and the commit was sent. Its datagrams are
/// forwarded to the target until [`Request::Release`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigratedOut {
    /// Every CID the client may use for it: the LB overrides these to the target.
    pub cids: Vec<Cid>,
    /// The connection's handle on the target.
    pub target_id: u64,
    pub snapshot_bytes: u64,
    /// Request to frozen-and-exported (the quiesce wait).
    pub freeze_ms: f64,
    /// Request to commit, on the source.
    pub total_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Released {
    pub released: MigrationId,
}

/// A source's side of one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// `migrate_out` is still running: the outcome is not known yet.
    InFlight,
    /// Committed: the target holds the connection; this worker forwards its late datagrams
    /// until released.
    Forwarding,
    /// Nothing here: never asked, rolled back (the connection carried on here), or released
    /// and forgotten.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceStatus {
    pub migration_id: MigrationId,
    pub state: SourceState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_and_refuse_unknown_fields() {
        let r: Request = serde_json::from_str(r#"{"cmd":"info"}"#).unwrap();
        assert_eq!(r, Request::Info {});
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"cmd":"info"}"#);
        let m = MigrateOut {
            conn: "00aa".parse().unwrap(),
            migration_id: MigrationId([1; 16]),
            token: HexBytes(vec![9, 9]),
            target: TargetRef {
                name: "w2".into(),
                server_id: 2,
                peer: "10.0.0.2:4470".parse().unwrap(),
            },
            timeout_ms: None,
            test_tamper: false,
        };
        let j = serde_json::to_string(&Request::MigrateOut(m.clone())).unwrap();
        assert!(
            !j.contains("test_tamper") && !j.contains("timeout_ms"),
            "{j}"
        );
        assert_eq!(
            serde_json::from_str::<Request>(&j).unwrap(),
            Request::MigrateOut(m)
        );
        let status = Request::MigrationStatus {
            migration_id: MigrationId([1; 16]),
        };
        let sj = serde_json::to_string(&status).unwrap();
        assert!(
            sj.starts_with(r#"{"cmd":"migration_status","migration_id":""#),
            "{sj}"
        );
        assert_eq!(serde_json::from_str::<Request>(&sj).unwrap(), status);
        let answer = SourceStatus {
            migration_id: MigrationId([1; 16]),
            state: SourceState::InFlight,
        };
        let aj = serde_json::to_string(&answer).unwrap();
        assert!(aj.ends_with(r#""state":"in_flight"}"#), "{aj}");
        // A renamed or unknown field is an error, not a default.
        let e = serde_json::from_str::<Request>(&j.replace("\"conn\"", "\"connection\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field") || e.contains("missing field"),
            "{e}"
        );
        let e = serde_json::from_str::<Request>(r#"{"cmd":"info","verbose":true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        for r in [Request::Info {}, Request::Conns {}, Request::Health {}] {
            let j = serde_json::to_value(&r).unwrap();
            assert_eq!(j["cmd"], r.cmd(), "cmd() is the serde tag");
        }
        let e = serde_json::from_str::<Request>(
            &j.replace("\"token\"", "\"token\":\"00\",\"timeout\":1,\"x\""),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
