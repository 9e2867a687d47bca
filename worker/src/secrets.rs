//! Shared migration secrets (`secrets.toml`): the HMAC key of migration tokens and the AES-256-GCM
//! master key of sealed snapshots. Read at start and again on SIGHUP ([`apply`]); never logged
//! (`Debug` is redacted).
use anyhow::{Context, Result};
use migration::{EncryptionKey, TokenSecret};
use serde::Deserialize;
use std::path::Path;
use zeroize::Zeroizing;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    token_secret_id: u32,
    token_secret: String,
    #[serde(default)]
    snapshot_key_id: Option<u32>,
    #[serde(default)]
    snapshot_key: Option<String>,
}

pub struct Secrets {
    pub token_secret_id: u32,
    pub token_secret: TokenSecret,
    /// Workers need it; the controller (which only issues tokens) may leave it out.
    pub snapshot_key: Option<(u32, EncryptionKey)>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

impl Secrets {
    pub fn load(path: &Path) -> Result<Self> {
        // Refused unless 0600 and owned by us (or root): see migration::secret_file.
        let text = migration::secret_file::read_to_string(path).context("the secrets file")?;
        Self::parse(&text).with_context(|| format!("secrets file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        // Deliberately no `{e}` of the TOML error: it can quote the offending line, i.e. a secret.
        let raw: Raw = toml::from_str(text).map_err(|_| {
            anyhow::anyhow!(
                "does not parse: it needs token_secret_id, token_secret (hex), and for workers \
                 snapshot_key_id, snapshot_key (64 hex); `baton-worker gen-certs` writes one"
            )
        })?;
        let (token_hex, key_hex) = (
            Zeroizing::new(raw.token_secret),
            raw.snapshot_key.map(Zeroizing::new),
        );
        let token = crate::unhex(&token_hex)
            .map(Zeroizing::new)
            .context("token_secret is not hex")?;
        let token_secret = TokenSecret::from_bytes(&token).map_err(|e| anyhow::anyhow!("{e}"))?;
        let snapshot_key = match (raw.snapshot_key_id, key_hex) {
            (Some(id), Some(k)) => {
                let k = crate::unhex(&k)
                    .map(Zeroizing::new)
                    .context("snapshot_key is not hex")?;
                Some((
                    id,
                    EncryptionKey::from_bytes(&k)
                        .map_err(|e| anyhow::anyhow!("snapshot_key: {e}"))?,
                ))
            }
            (None, None) => None,
            _ => anyhow::bail!("give both snapshot_key_id and snapshot_key, or neither"),
        };
        Ok(Self {
            token_secret_id: raw.token_secret_id,
            token_secret,
            snapshot_key,
        })
    }

    /// Fresh secrets (random keys from the OS): the workers' file (token secret and snapshot
    /// key) and the controller's (the same token secret, no snapshot key: the CLI host issues
    /// tokens but cannot seal or open snapshots).
    pub fn generate_toml_pair() -> (Zeroizing<String>, Zeroizing<String>) {
        use rand_like::fill;
        let token = Zeroizing::new(crate::hex(&fill::<32>()));
        let key = Zeroizing::new(crate::hex(&fill::<32>()));
        let worker = Zeroizing::new(format!(
            "# Baton migration secrets for WORKERS: mode 0600, identical on every worker.\n\
             # The controller (baton CLI host) gets controller-secrets.toml, without the snapshot key.\n\
             token_secret_id = 1\ntoken_secret = \"{}\"\nsnapshot_key_id = 1\nsnapshot_key = \"{}\"\n",
            &*token, &*key
        ));
        let controller = Zeroizing::new(format!(
            "# Baton migration secrets for the CONTROLLER (baton CLI host): mode 0600.\n\
             # Only the token secret: the controller issues tokens, it never seals snapshots.\n\
             token_secret_id = 1\ntoken_secret = \"{}\"\n",
            &*token
        ));
        (worker, controller)
    }

    /// A fresh workers' secrets file (see [`Self::generate_toml_pair`]).
    pub fn generate_toml() -> Zeroizing<String> {
        Self::generate_toml_pair().0
    }
}

/// What a reload did, by key id (ids only: never key material).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub token_secret: Option<u32>,
    pub snapshot_key: Option<u32>,
    pub retired_token_secrets: Vec<u32>,
    pub retired_snapshot_keys: Vec<u32>,
}

/// Applies a re-read secrets file to a running worker's key rings.
///
/// A new id becomes current (new snapshots are sealed with it) and the one it replaces keeps
/// verifying/opening; ids older than those two are retired. So a rotation is: write the new file
/// on every worker and SIGHUP them all (peers still on the old file keep working with the old
/// keys, which everyone still holds), switch the controller's file, and once in-flight migrations
/// are done (the token lifetime), SIGHUP again with the same file to retire the old ids.
/// Ids are never reused, so a changed key under an unchanged id is refused.
pub fn apply(
    new: Secrets,
    tokens: &std::sync::Mutex<migration::MigrationTokenManager>,
    keys: &migration::EncryptionService,
) -> Result<Applied> {
    let (key_id, key) = new
        .snapshot_key
        .context("the secrets file has no snapshot_key/snapshot_key_id (workers need it)")?;
    let mut applied = Applied::default();
    {
        let mut tokens = tokens.lock().unwrap_or_else(|e| e.into_inner());
        let before = tokens.current_secret_id();
        if new.token_secret_id != before {
            tokens
                .rotate_secret(new.token_secret_id, new.token_secret)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "token_secret_id {}: {e}; give the new secret a new id",
                        new.token_secret_id
                    )
                })?;
            applied.token_secret = Some(new.token_secret_id);
        }
        for id in tokens.secret_ids() {
            if id != new.token_secret_id && id != before {
                tokens
                    .retire_secret(id)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                applied.retired_token_secrets.push(id);
            }
        }
    }
    let before = keys.active_key_id();
    if key_id != before {
        keys.rotate(key_id, key).map_err(|e| {
            anyhow::anyhow!("snapshot_key_id {key_id}: {e}; give the new key a new id")
        })?;
        applied.snapshot_key = Some(key_id);
    }
    for id in keys.key_ids() {
        if id != key_id && id != before {
            keys.retire(id).map_err(|e| anyhow::anyhow!("{e}"))?;
            applied.retired_snapshot_keys.push(id);
        }
    }
    Ok(applied)
}

/// Re-reads `path` on every SIGHUP and [`apply`]s it; a file that does not load (wrong mode,
/// bad syntax, reused id) is logged and the keys in use stay as they are.
pub async fn reload_on_sighup(
    path: std::path::PathBuf,
    mut hup: tokio::signal::unix::Signal,
    ctx: std::sync::Arc<crate::migrate::Ctx>,
) {
    while hup.recv().await.is_some() {
        let result =
            Secrets::load(&path).and_then(|s| apply(s, &ctx.tokens, &ctx.pipeline.encryption));
        match result {
            Ok(a) => tracing::info!(
                file = %path.display(),
                new_token_secret = ?a.token_secret,
                new_snapshot_key = ?a.snapshot_key,
                retired_token_secrets = ?a.retired_token_secrets,
                retired_snapshot_keys = ?a.retired_snapshot_keys,
                "secrets reloaded (SIGHUP)"
            ),
            Err(e) => tracing::error!(
                file = %path.display(),
                error = format!("{e:#}"),
                "secrets NOT reloaded (SIGHUP); the keys in use are unchanged"
            ),
        }
    }
}

mod rand_like {
    /// Random bytes from the OS via ring (already a dependency through rustls).
    pub fn fill<const N: usize>() -> [u8; N] {
        use rustls::crypto::ring::default_provider;
        let mut b = [0u8; N];
        default_provider()
            .secure_random
            .fill(&mut b)
            .expect("the OS random source works");
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_parse_and_do_not_print() {
        let s = Secrets::parse(&Secrets::generate_toml()).unwrap();
        assert!(s.snapshot_key.is_some());
        assert_eq!(format!("{s:?}"), "Secrets(<redacted>)");
        let (w, c) = Secrets::generate_toml_pair();
        let (w, c) = (Secrets::parse(&w).unwrap(), Secrets::parse(&c).unwrap());
        assert!(w.snapshot_key.is_some() && c.snapshot_key.is_none());
        assert_eq!(w.token_secret_id, c.token_secret_id);
        let e = Secrets::parse("token_secret_id = 1\ntoken_secret = \"abcd\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("32 bytes"), "{e:#}");
    }

    fn file(token_id: u32, token: u8, key_id: u32, key: u8) -> Secrets {
        Secrets::parse(&format!(
            "token_secret_id = {token_id}\ntoken_secret = \"{}\"\n\
             snapshot_key_id = {key_id}\nsnapshot_key = \"{}\"\n",
            crate::hex(&[token; 32]),
            crate::hex(&[key; 32])
        ))
        .unwrap()
    }

    #[test]
    fn reload_rotates_keeps_the_previous_keys_and_retires_on_the_next_reload() {
        use migration::{ConnectionId, MigrationBinding, MigrationId, WorkerId};
        use std::time::SystemTime;
        let first = file(1, 1, 1, 1);
        let (kid, key) = first.snapshot_key.unwrap();
        let tokens = std::sync::Mutex::new(
            migration::MigrationTokenManager::new(
                Default::default(),
                first.token_secret_id,
                first.token_secret,
            )
            .unwrap(),
        );
        let keys = migration::EncryptionService::new(kid, key);
        // What a peer still on the old file sends: a token under secret 1, a snapshot under key 1.
        let mut old_controller = migration::MigrationTokenManager::new(
            Default::default(),
            1,
            migration::TokenSecret::from_bytes(&[1; 32]).unwrap(),
        )
        .unwrap();
        let old_peer = migration::EncryptionService::new(
            1,
            migration::EncryptionKey::from_bytes(&[1; 32]).unwrap(),
        );
        let binding = |n: u8| MigrationBinding {
            migration_id: MigrationId([n; 16]),
            connection_id: ConnectionId::new(&[n; 8]).unwrap(),
            source: WorkerId(1),
            target: WorkerId(2),
        };
        let sealed = |svc: &migration::EncryptionService, b: &MigrationBinding| {
            use std::io::Write;
            let mut p = migration::PlaintextBuffer::with_capacity(1);
            p.write_all(b"x").unwrap();
            svc.seal(b, p).unwrap()
        };

        // Reload 1: new ids become current, the old ones keep working.
        let a = apply(file(2, 2, 2, 2), &tokens, &keys).unwrap();
        assert_eq!((a.token_secret, a.snapshot_key), (Some(2), Some(2)));
        assert!(a.retired_token_secrets.is_empty() && a.retired_snapshot_keys.is_empty());
        assert_eq!(keys.active_key_id(), 2);
        let now = SystemTime::now();
        let t = old_controller.issue(&binding(1), now).unwrap();
        tokens.lock().unwrap().verify(&binding(1), &t, now).unwrap();
        assert_eq!(
            keys.open(&binding(1), &sealed(&old_peer, &binding(1)))
                .unwrap(),
            b"x"
        );

        // A reused id with another key is refused and changes nothing.
        let e = apply(file(1, 9, 2, 2), &tokens, &keys).unwrap_err();
        assert!(format!("{e:#}").contains("new id"), "{e:#}");
        assert_eq!(tokens.lock().unwrap().current_secret_id(), 2);

        // Reload 2 with the same file: the old ids are retired.
        let a = apply(file(2, 2, 2, 2), &tokens, &keys).unwrap();
        assert_eq!(a.retired_token_secrets, vec![1]);
        assert_eq!(a.retired_snapshot_keys, vec![1]);
        let t = old_controller.issue(&binding(2), now).unwrap();
        assert!(tokens.lock().unwrap().verify(&binding(2), &t, now).is_err());
        assert!(
            keys.open(&binding(2), &sealed(&old_peer, &binding(2)))
                .is_err()
        );
    }
}
