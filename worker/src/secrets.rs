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
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the secrets file {}", path.display()))?,
        );
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

    /// A fresh secrets file (random keys from the OS).
    pub fn generate_toml() -> Zeroizing<String> {
        use rand_like::fill;
        Zeroizing::new(format!(
            "# Baton migration secrets: keep mode 0600, identical on the controller and every worker.\n\
             token_secret_id = 1\ntoken_secret = \"{}\"\nsnapshot_key_id = 1\nsnapshot_key = \"{}\"\n",
            crate::hex(&fill::<32>()),
            crate::hex(&fill::<32>())
        ))
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
        let e = Secrets::parse("token_secret_id = 1\ntoken_secret = \"abcd\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("32 bytes"), "{e:#}");
    }
}
