//! Single-use HMAC-SHA256 migration tokens.
//!
//! Token bytes: `version (1) | secret id (u32 BE) | issued at (u64 BE, Unix ms) |
//! expires at (u64 BE, Unix ms) | token id (16 random bytes) | MAC (32)`.
//! MAC = HMAC-SHA256(secret, label | the 37 bytes before the MAC | migration binding), so the
//! token is bound to the migration id, connection id, source and target without carrying them.
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::{MigrationBinding, WorkerId};
use crate::protocol::{MigrationError, TokenRejection};

pub const TOKEN_VERSION: u8 = 1;
const BODY_LEN: usize = 1 + 4 + 8 + 8 + 16;
const MAC_LEN: usize = 32;
pub const TOKEN_LEN: usize = BODY_LEN + MAC_LEN;
const MAC_LABEL: &[u8] = b"baton/migration/token/v1";

/// An opaque bearer token. `Debug` does not print it; `==` compares in constant time.
#[derive(Clone, Serialize, Deserialize)]
pub struct MigrationToken(#[serde(with = "serde_bytes")] Vec<u8>);

impl PartialEq for MigrationToken {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for MigrationToken {}

impl MigrationToken {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for MigrationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationToken(<{} bytes>)", self.0.len())
    }
}

/// A token-signing secret (at least 32 bytes), zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct TokenSecret(Vec<u8>);

impl TokenSecret {
    pub fn generate() -> Self {
        let mut s = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut s);
        Self(s)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MigrationError> {
        if bytes.len() < 32 {
            return Err(MigrationError::InvalidKey(format!(
                "a token secret needs at least 32 bytes, got {}; generate it with a CSPRNG",
                bytes.len()
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenConfig {
    /// Lifetime of issued tokens.
    pub ttl: Duration,
    /// Tokens claiming a longer lifetime are refused.
    pub max_ttl: Duration,
    /// How far in the future `issued at` may be (clock disagreement between controller and target).
    pub clock_skew: Duration,
    /// Per source worker, sustained rate of tokens issued (also the burst size).
    pub max_requests_per_second: u32,
    /// Live (unexpired, used) tokens remembered for replay detection. When full, verification
    /// fails closed with `ReplayCacheFull`.
    pub replay_cache_capacity: usize,
    /// Source workers tracked by the rate limiter.
    pub max_tracked_sources: usize,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(300),
            clock_skew: Duration::from_secs(2),
            max_requests_per_second: 100,
            replay_cache_capacity: 100_000,
            max_tracked_sources: 4096,
        }
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Issues and verifies tokens; holds the secrets, the replay cache and the rate limiter.
pub struct MigrationTokenManager {
    config: TokenConfig,
    secrets: BTreeMap<u32, TokenSecret>,
    retired: BTreeSet<u32>,
    current: u32,
    used: ReplayCache,
    limiter: RateLimiter,
    /// Tokens issued before this instant (Unix ms) are refused; see [`Self::refuse_issued_before`].
    not_before_ms: u64,
}

impl MigrationTokenManager {
    pub fn new(
        config: TokenConfig,
        secret_id: u32,
        secret: TokenSecret,
    ) -> Result<Self, MigrationError> {
        if config.max_requests_per_second == 0
            || config.replay_cache_capacity == 0
            || config.max_tracked_sources == 0
        {
            return Err(MigrationError::Config(
                "max_requests_per_second, replay_cache_capacity and max_tracked_sources must be positive".into(),
            ));
        }
        if config.ttl.is_zero() || config.ttl > config.max_ttl {
            return Err(MigrationError::Config(format!(
                "token ttl {:?} must be positive and at most max_ttl {:?}",
                config.ttl, config.max_ttl
            )));
        }
        let mut secrets = BTreeMap::new();
        secrets.insert(secret_id, secret);
        Ok(Self {
            config,
            secrets,
            retired: BTreeSet::new(),
            current: secret_id,
            used: ReplayCache::new(config.replay_cache_capacity),
            limiter: RateLimiter::new(config.max_requests_per_second, config.max_tracked_sources),
            not_before_ms: 0,
        })
    }

    /// Refuses every token issued before `start` (a verifier calls it with its process start).
    ///
    /// Why: the replay cache lives in memory, so a restarted target would re-accept a token it
    /// used before the restart, for the rest of the token's lifetime. Rather than journal used
    /// ids to disk (an fsync on every import, and a file that can be lost, corrupted or left on a
    /// tmpfs), a verifier accepts only tokens issued after it started: every token it could have
    /// used before is older than that. The cost is that a migration whose token was issued just
    /// before the target restarted fails with `IssuedBeforeRestart` and is retried with a fresh
    /// token. `issued at` is the controller's clock: a controller running ahead of the target by
    /// `d` could replay tokens used in the last `d` before the restart, so keep clocks in sync
    /// (NTP); `clock_skew` bounds how far ahead the controller may be at all.
    pub fn refuse_issued_before(&mut self, start: SystemTime) {
        self.not_before_ms = unix_ms(start);
    }

    /// New tokens are signed with `secret`; tokens under older secrets verify until retired.
    pub fn rotate_secret(
        &mut self,
        secret_id: u32,
        secret: TokenSecret,
    ) -> Result<(), MigrationError> {
        if self.secrets.contains_key(&secret_id) || self.retired.contains(&secret_id) {
            return Err(MigrationError::Config(format!(
                "token secret id {secret_id} was already used"
            )));
        }
        self.secrets.insert(secret_id, secret);
        self.current = secret_id;
        tracing::info!(secret_id, "token secret rotated");
        Ok(())
    }

    /// Forgets an old secret: tokens signed with it stop verifying.
    pub fn retire_secret(&mut self, secret_id: u32) -> Result<(), MigrationError> {
        if secret_id == self.current {
            return Err(MigrationError::Config(format!(
                "token secret {secret_id} is current; rotate to a new one before retiring it"
            )));
        }
        if self.secrets.remove(&secret_id).is_none() {
            return Err(MigrationError::Config(format!(
                "token secret id {secret_id} is not held"
            )));
        }
        self.retired.insert(secret_id);
        tracing::info!(secret_id, "token secret retired");
        Ok(())
    }

    /// Issues a token for exactly this migration, subject to the source's rate limit.
    pub fn issue(
        &mut self,
        binding: &MigrationBinding,
        now: SystemTime,
    ) -> Result<MigrationToken, MigrationError> {
        let now_ms = unix_ms(now);
        self.limiter.admit(binding.source, now_ms)?;
        let expires = now_ms.saturating_add(self.config.ttl.as_millis() as u64);
        let mut token = Vec::with_capacity(TOKEN_LEN);
        token.push(TOKEN_VERSION);
        token.extend_from_slice(&self.current.to_be_bytes());
        token.extend_from_slice(&now_ms.to_be_bytes());
        token.extend_from_slice(&expires.to_be_bytes());
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        token.extend_from_slice(&id);
        let secret = &self.secrets[&self.current];
        let mac = compute_mac(secret, &token, binding);
        token.extend_from_slice(&mac.finalize().into_bytes());
        tracing::debug!(migration_id = %binding.migration_id, source = %binding.source, target = %binding.target, "migration token issued");
        Ok(MigrationToken(token))
    }

    /// Checks the MAC (constant time), the validity window, and marks the token used.
    pub fn verify(
        &mut self,
        binding: &MigrationBinding,
        token: &MigrationToken,
        now: SystemTime,
    ) -> Result<(), MigrationError> {
        let result = self.check(binding, token, unix_ms(now));
        if let Err(e) = &result {
            tracing::warn!(migration_id = %binding.migration_id, source = %binding.source, target = %binding.target, error = %e, "migration token rejected");
        }
        result
    }

    fn check(
        &mut self,
        binding: &MigrationBinding,
        token: &MigrationToken,
        now_ms: u64,
    ) -> Result<(), MigrationError> {
        let reject = |r| Err(MigrationError::InvalidToken(r));
        let t = token.as_bytes();
        if t.len() != TOKEN_LEN {
            return reject(TokenRejection::Malformed);
        }
        if t[0] != TOKEN_VERSION {
            return reject(TokenRejection::UnsupportedVersion);
        }
        let field = |at: usize| u64::from_be_bytes(t[at..at + 8].try_into().expect("8 bytes"));
        let secret_id = u32::from_be_bytes(t[1..5].try_into().expect("4 bytes"));
        let (issued, expires) = (field(5), field(13));
        let id: [u8; 16] = t[21..37].try_into().expect("16 bytes");
        let Some(secret) = self.secrets.get(&secret_id) else {
            return reject(TokenRejection::UnknownSecret);
        };
        // `verify_slice` compares in constant time.
        if compute_mac(secret, &t[..BODY_LEN], binding)
            .verify_slice(&t[BODY_LEN..])
            .is_err()
        {
            return reject(TokenRejection::BadMac);
        }
        if expires <= issued || expires - issued > self.config.max_ttl.as_millis() as u64 {
            return reject(TokenRejection::LifetimeTooLong);
        }
        if issued > now_ms.saturating_add(self.config.clock_skew.as_millis() as u64) {
            return reject(TokenRejection::NotYetValid);
        }
        if now_ms >= expires {
            return reject(TokenRejection::Expired);
        }
        if issued < self.not_before_ms {
            return reject(TokenRejection::IssuedBeforeRestart);
        }
        self.used.insert(id, expires, now_ms)
    }

    /// The id of the secret new tokens are signed with.
    pub fn current_secret_id(&self) -> u32 {
        self.current
    }

    /// The ids of the secrets tokens verify under (the current one among them).
    pub fn secret_ids(&self) -> Vec<u32> {
        self.secrets.keys().copied().collect()
    }

    pub fn replay_cache_len(&self) -> usize {
        self.used.len()
    }
}

impl fmt::Debug for MigrationTokenManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationTokenManager")
            .field("config", &self.config)
            .field("current_secret_id", &self.current)
            .field("secret_ids", &self.secrets.keys().collect::<Vec<_>>())
            .field("used_tokens", &self.used.len())
            .finish_non_exhaustive()
    }
}

fn compute_mac(secret: &TokenSecret, body: &[u8], binding: &MigrationBinding) -> Hmac<Sha256> {
    let mut mac = secret.mac();
    mac.update(MAC_LABEL);
    mac.update(body);
    let mut b = Vec::with_capacity(45);
    binding.encode_into(&mut b);
    mac.update(&b);
    mac
}

/// Used token ids until they expire (after which the expiry check refuses them anyway).
struct ReplayCache {
    capacity: usize,
    by_id: HashMap<[u8; 16], u64>,
    by_expiry: BTreeSet<(u64, [u8; 16])>,
}

impl ReplayCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            by_id: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn insert(&mut self, id: [u8; 16], expires: u64, now_ms: u64) -> Result<(), MigrationError> {
        while let Some(&(exp, old)) = self.by_expiry.first() {
            if exp > now_ms {
                break;
            }
            self.by_expiry.pop_first();
            self.by_id.remove(&old);
        }
        if self.by_id.contains_key(&id) {
            return Err(MigrationError::InvalidToken(TokenRejection::Replayed));
        }
        if self.by_id.len() >= self.capacity {
            return Err(MigrationError::ReplayCacheFull {
                capacity: self.capacity,
            });
        }
        self.by_id.insert(id, expires);
        self.by_expiry.insert((expires, id));
        Ok(())
    }
}

/// Token bucket per source worker: `rate` per second sustained, `rate` burst.
struct RateLimiter {
    rate: u32,
    max_sources: usize,
    buckets: HashMap<WorkerId, Bucket>,
}

struct Bucket {
    /// Thousandths of a request, so refill stays exact in integers.
    milli_tokens: u64,
    last_ms: u64,
}

impl RateLimiter {
    fn new(rate: u32, max_sources: usize) -> Self {
        Self {
            rate,
            max_sources,
            buckets: HashMap::new(),
        }
    }

    fn admit(&mut self, source: WorkerId, now_ms: u64) -> Result<(), MigrationError> {
        let full = self.rate as u64 * 1000;
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.max_sources {
            // Forget sources whose buckets have refilled: they carry no state worth keeping.
            let rate = self.rate as u64;
            self.buckets
                .retain(|_, b| b.milli_tokens + now_ms.saturating_sub(b.last_ms) * rate < full);
            if self.buckets.len() >= self.max_sources {
                return Err(MigrationError::RateLimited {
                    worker: source,
                    limit: self.rate,
                    retry_after_ms: 1000,
                });
            }
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            milli_tokens: full,
            last_ms: now_ms,
        });
        // `rate` requests per 1000 ms = `rate` milli-requests per ms.
        let refill = now_ms.saturating_sub(b.last_ms) * self.rate as u64;
        b.milli_tokens = (b.milli_tokens + refill).min(full);
        b.last_ms = b.last_ms.max(now_ms);
        if b.milli_tokens < 1000 {
            let retry_after_ms = (1000 - b.milli_tokens).div_ceil(self.rate as u64);
            return Err(MigrationError::RateLimited {
                worker: source,
                limit: self.rate,
                retry_after_ms,
            });
        }
        b.milli_tokens -= 1000;
        Ok(())
    }
}
