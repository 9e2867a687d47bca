//! The cluster's key schema: every key lives under one prefix per cluster, and [`Key`] is the one
//! definition of what each key is, for every writer (workers, LB nodes, the CLI) and reader.
//!
//! Layout under the prefix `P` (always ending in `/`):
//!
//! | key | record | written by |
//! |---|---|---|
//! | `P` `workers/<name>` | [`WorkerRecord`](crate::WorkerRecord) | the worker, with its lease |
//! | `P` `server-ids/<id>` | [`ServerIdClaim`](crate::ServerIdClaim) | the worker, in the claiming transaction, with its lease |
//! | `P` `health/<node>/<worker>` | [`HealthRecord`](crate::HealthRecord) | LB node `<node>` |
//! | `P` `overrides/<cid hex>` | [`OverrideRecord`](crate::OverrideRecord) | the migration's driver, with a lease that outlives the old CIDs no longer than needed |
//! | `P` `migrations/<id hex>` | [`MigrationRecord`](crate::MigrationRecord) | the migration's driver |
//! | `P` `nodes/<node>/applied` | [`AppliedRecord`](crate::AppliedRecord) | LB node `<node>`, with its lease |
//!
//! Names are restricted to `[A-Za-z0-9._-]` (1 to 64 bytes) so a name can never contain the
//! separator or climb out of its directory.
use baton_protocol::{Cid, MigrationId};
use std::fmt;

/// A cluster's key prefix, e.g. `/baton/prod/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the cluster key prefix must start with '/' and contain no empty segment, got {0:?} (e.g. \"/baton/prod\")"
    )]
    BadPrefix(String),
    #[error(
        "{0:?} is not a valid name: use 1 to 64 of A-Z a-z 0-9 . _ - (and not \".\" or \"..\")"
    )]
    BadName(String),
    #[error("{0:?} is not under the cluster prefix {1:?}")]
    OutsidePrefix(String, String),
    #[error("{0:?} is not a key of the cluster schema")]
    Unknown(String),
}

/// One key of the schema, decoded.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Worker(String),
    ServerId(u64),
    Health { node: String, worker: String },
    Override(Cid),
    Migration(MigrationId),
    Applied(String),
}

/// Checks a worker or node name (see the module docs).
pub fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadName(name.to_string()))
    }
}

impl Prefix {
    /// `/baton/prod` or `/baton/prod/`: normalised to end in one `/`.
    pub fn new(prefix: &str) -> Result<Prefix, KeyError> {
        let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
        let bad = || KeyError::BadPrefix(prefix.to_string());
        let rest = trimmed.strip_prefix('/').ok_or_else(bad)?;
        if rest.is_empty()
            || rest
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(bad());
        }
        Ok(Prefix(format!("{trimmed}/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The whole text of `key` under this prefix.
    pub fn key(&self, key: &Key) -> String {
        format!("{}{key}", self.0)
    }

    /// Decodes a key read from etcd.
    pub fn parse(&self, raw: &str) -> Result<Key, KeyError> {
        let rest = raw
            .strip_prefix(self.0.as_str())
            .ok_or_else(|| KeyError::OutsidePrefix(raw.to_string(), self.0.clone()))?;
        let unknown = || KeyError::Unknown(raw.to_string());
        let parts: Vec<&str> = rest.split('/').collect();
        let key = match parts.as_slice() {
            ["workers", name] => {
                check_name(name)?;
                Key::Worker(name.to_string())
            }
            ["server-ids", id] => {
                // Canonical decimal only, so one ID has one key.
                let v: u64 = id.parse().map_err(|_| unknown())?;
                if v.to_string() != *id {
                    return Err(unknown());
                }
                Key::ServerId(v)
            }
            ["health", node, worker] => {
                check_name(node)?;
                check_name(worker)?;
                Key::Health {
                    node: node.to_string(),
                    worker: worker.to_string(),
                }
            }
            ["overrides", cid] => {
                let c: Cid = cid.parse().map_err(|_| unknown())?;
                if c.to_string() != *cid {
                    return Err(unknown());
                }
                Key::Override(c)
            }
            ["migrations", id] => {
                let m: MigrationId = id.parse().map_err(|_| unknown())?;
                if m.to_string() != *id {
                    return Err(unknown());
                }
                Key::Migration(m)
            }
            ["nodes", node, "applied"] => {
                check_name(node)?;
                Key::Applied(node.to_string())
            }
            _ => return Err(unknown()),
        };
        Ok(key)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Worker(n) => write!(f, "workers/{n}"),
            Key::ServerId(id) => write!(f, "server-ids/{id}"),
            Key::Health { node, worker } => write!(f, "health/{node}/{worker}"),
            Key::Override(cid) => write!(f, "overrides/{cid}"),
            Key::Migration(id) => write!(f, "migrations/{id}"),
            Key::Applied(node) => write!(f, "nodes/{node}/applied"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefixes_are_normalised_and_checked() {
        assert_eq!(Prefix::new("/baton/prod").unwrap().as_str(), "/baton/prod/");
        assert_eq!(
            Prefix::new("/baton/prod/").unwrap().as_str(),
            "/baton/prod/"
        );
        for bad in ["", "/", "baton", "/baton//prod", "/baton/../x", "//"] {
            assert!(Prefix::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_round_trip_and_strangers_are_refused() {
        let p = Prefix::new("/baton/test").unwrap();
        let cid: Cid = "0102030405060708".parse().unwrap();
        let keys = [
            Key::Worker("w1".into()),
            Key::ServerId(7),
            Key::Health {
                node: "lb-a".into(),
                worker: "w1".into(),
            },
            Key::Override(cid),
            Key::Migration(MigrationId([9; 16])),
            Key::Applied("lb-a".into()),
        ];
        for k in keys {
            assert_eq!(p.parse(&p.key(&k)).unwrap(), k);
        }
        assert_eq!(
            p.key(&Key::Override(cid)),
            "/baton/test/overrides/0102030405060708"
        );
        for bad in [
            "/baton/other/workers/w1",
            "/baton/test/workers/",
            "/baton/test/workers/a/b",
            "/baton/test/workers/..",
            "/baton/test/server-ids/007",
            "/baton/test/server-ids/x",
            "/baton/test/overrides/0G",
            "/baton/test/overrides/0A",
            "/baton/test/nodes/lb-a",
            "/baton/test/elsewhere",
        ] {
            assert!(p.parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_valid_name_round_trips(name in "[A-Za-z0-9._-]{1,64}", id in any::<u64>()) {
            prop_assume!(name != "." && name != "..");
            let p = Prefix::new("/c").unwrap();
            for k in [Key::Worker(name.clone()), Key::Applied(name.clone()), Key::ServerId(id)] {
                prop_assert_eq!(p.parse(&p.key(&k)).unwrap(), k);
            }
        }

        #[test]
        fn parsing_never_panics(raw in ".{0,80}") {
            let p = Prefix::new("/c").unwrap();
            let _ = p.parse(&raw);
            let _ = p.parse(&format!("/c/{raw}"));
        }
    }
}
