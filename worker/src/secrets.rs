//! Shared migration secrets (`secrets.toml`): the HMAC key of migration tokens and the AES-256-GCM
//! master key of sealed snapshots. Read once at start; never logged (`Debug` is redacted).
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
}
