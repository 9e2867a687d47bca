mod common;

use common::binding;
use migration::token::{TOKEN_LEN, TokenConfig, TokenSecret};
use migration::{
    ConnectionId, MigrationError, MigrationId, MigrationToken, MigrationTokenManager,
    TokenRejection, WorkerId,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn manager(config: TokenConfig) -> MigrationTokenManager {
    MigrationTokenManager::new(config, 1, TokenSecret::from_bytes(&[1; 32]).unwrap()).unwrap()
}

fn rejected(r: Result<(), MigrationError>) -> TokenRejection {
    match r {
        Err(MigrationError::InvalidToken(why)) => why,
        other => panic!("expected InvalidToken, got {other:?}"),
    }
}

#[test]
fn issued_token_verifies_once() {
    let mut m = manager(TokenConfig::default());
    let token = m.issue(&binding(), t0()).unwrap();
    assert_eq!(token.as_bytes().len(), TOKEN_LEN);
    assert_eq!(
        format!("{token:?}"),
        format!("MigrationToken(<{TOKEN_LEN} bytes>)")
    );
    m.verify(&binding(), &token, t0() + Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        rejected(m.verify(&binding(), &token, t0() + Duration::from_secs(2))),
        TokenRejection::Replayed
    );
}

#[test]
fn forged_or_rebound_tokens_fail() {
    let mut m = manager(TokenConfig::default());
    let token = m.issue(&binding(), t0()).unwrap();
    // Every single-bit change anywhere in the token.
    for i in 0..TOKEN_LEN {
        let mut t = token.as_bytes().to_vec();
        t[i] ^= 0x04;
        let why = rejected(m.verify(&binding(), &MigrationToken::from_bytes(t), t0()));
        assert!(
            matches!(
                why,
                TokenRejection::BadMac
                    | TokenRejection::UnsupportedVersion
                    | TokenRejection::UnknownSecret
            ),
            "byte {i}: {why:?}"
        );
    }
    // The genuine token for another migration, connection, source or target.
    let b = binding();
    let others = [
        migration::MigrationBinding {
            migration_id: MigrationId([0; 16]),
            ..b.clone()
        },
        migration::MigrationBinding {
            connection_id: ConnectionId::new(b"other").unwrap(),
            ..b.clone()
        },
        migration::MigrationBinding {
            source: WorkerId(9),
            ..b.clone()
        },
        migration::MigrationBinding {
            target: WorkerId(9),
            ..b.clone()
        },
    ];
    for other in &others {
        assert_eq!(
            rejected(m.verify(other, &token, t0())),
            TokenRejection::BadMac
        );
    }
    // A token signed with another secret under the same id.
    let mut forger = MigrationTokenManager::new(
        TokenConfig::default(),
        1,
        TokenSecret::from_bytes(&[2; 32]).unwrap(),
    )
    .unwrap();
    let forged = forger.issue(&b, t0()).unwrap();
    assert_eq!(
        rejected(m.verify(&b, &forged, t0())),
        TokenRejection::BadMac
    );
    // Wrong lengths.
    assert_eq!(
        rejected(m.verify(&b, &MigrationToken::from_bytes(vec![]), t0())),
        TokenRejection::Malformed
    );
    assert_eq!(
        rejected(m.verify(
            &b,
            &MigrationToken::from_bytes(vec![1; TOKEN_LEN + 1]),
            t0()
        )),
        TokenRejection::Malformed
    );
    // The genuine token still works after all of that.
    m.verify(&b, &token, t0()).unwrap();
}

#[test]
fn expiry_and_future_tokens() {
    let config = TokenConfig {
        ttl: Duration::from_secs(10),
        clock_skew: Duration::from_secs(2),
        ..TokenConfig::default()
    };
    let mut m = manager(config);
    let b = binding();
    let token = m.issue(&b, t0()).unwrap();
    assert_eq!(
        rejected(m.verify(&b, &token, t0() + Duration::from_secs(10))),
        TokenRejection::Expired
    );
    let token = m.issue(&b, t0()).unwrap();
    m.verify(&b, &token, t0() + Duration::from_millis(9_999))
        .unwrap();
    // Issued by a controller whose clock runs ahead: tolerated within the skew only.
    let ahead = m.issue(&b, t0() + Duration::from_secs(5)).unwrap();
    assert_eq!(
        rejected(m.verify(&b, &ahead, t0())),
        TokenRejection::NotYetValid
    );
    let slightly = m.issue(&b, t0() + Duration::from_secs(1)).unwrap();
    m.verify(&b, &slightly, t0()).unwrap();
}

#[test]
fn lifetime_cap() {
    let long = TokenConfig {
        ttl: Duration::from_secs(600),
        max_ttl: Duration::from_secs(600),
        ..TokenConfig::default()
    };
    let mut issuer = manager(long);
    let mut verifier = manager(TokenConfig {
        max_ttl: Duration::from_secs(60),
        ttl: Duration::from_secs(30),
        ..TokenConfig::default()
    });
    let token = issuer.issue(&binding(), t0()).unwrap();
    assert_eq!(
        rejected(verifier.verify(&binding(), &token, t0())),
        TokenRejection::LifetimeTooLong
    );
}

#[test]
fn rate_limit_per_source() {
    let mut m = manager(TokenConfig {
        max_requests_per_second: 5,
        ..TokenConfig::default()
    });
    let b = binding();
    for _ in 0..5 {
        m.issue(&b, t0()).unwrap();
    }
    let err = m.issue(&b, t0()).unwrap_err();
    assert_eq!(
        err,
        MigrationError::RateLimited {
            worker: WorkerId(1),
            limit: 5,
            retry_after_ms: 200
        }
    );
    assert!(err.to_string().contains("retry in 200 ms"));
    // Another source has its own budget.
    let other = migration::MigrationBinding {
        source: WorkerId(3),
        ..b.clone()
    };
    m.issue(&other, t0()).unwrap();
    // One request's worth refills after 200 ms, not before.
    assert!(m.issue(&b, t0() + Duration::from_millis(199)).is_err());
    m.issue(&b, t0() + Duration::from_millis(200)).unwrap();
    assert!(m.issue(&b, t0() + Duration::from_millis(200)).is_err());
    // A full second refills the burst.
    for _ in 0..5 {
        m.issue(&b, t0() + Duration::from_millis(1200)).unwrap();
    }
}

#[test]
fn rate_limiter_memory_is_bounded() {
    let mut m = manager(TokenConfig {
        max_requests_per_second: 1,
        max_tracked_sources: 2,
        ..TokenConfig::default()
    });
    let b = binding();
    let with = |s| migration::MigrationBinding {
        source: WorkerId(s),
        ..b.clone()
    };
    m.issue(&with(1), t0()).unwrap();
    m.issue(&with(2), t0()).unwrap();
    assert!(matches!(
        m.issue(&with(3), t0()),
        Err(MigrationError::RateLimited { .. })
    ));
    // Once the tracked sources' buckets refill, they are forgotten and room is made.
    m.issue(&with(3), t0() + Duration::from_secs(1)).unwrap();
}

#[test]
fn replay_cache_is_bounded_and_fails_closed() {
    let mut m = manager(TokenConfig {
        replay_cache_capacity: 3,
        ttl: Duration::from_secs(10),
        ..TokenConfig::default()
    });
    let b = binding();
    let tokens: Vec<_> = (0..4).map(|_| m.issue(&b, t0()).unwrap()).collect();
    for t in &tokens[..3] {
        m.verify(&b, t, t0()).unwrap();
    }
    assert_eq!(
        m.verify(&b, &tokens[3], t0()),
        Err(MigrationError::ReplayCacheFull { capacity: 3 })
    );
    assert_eq!(m.replay_cache_len(), 3);
    // After the used tokens expire they are evicted and new ones are accepted.
    let later = t0() + Duration::from_secs(11);
    let fresh = m.issue(&b, later).unwrap();
    m.verify(&b, &fresh, later).unwrap();
    assert_eq!(m.replay_cache_len(), 1);
}

#[test]
fn secret_rotation() {
    let mut m = manager(TokenConfig::default());
    let b = binding();
    let old = m.issue(&b, t0()).unwrap();
    m.rotate_secret(2, TokenSecret::generate()).unwrap();
    let new = m.issue(&b, t0()).unwrap();
    assert_eq!(&new.as_bytes()[1..5], &2u32.to_be_bytes());
    m.verify(&b, &old, t0()).unwrap();
    let old2 = {
        // Another old-secret token, issued before rotation by a second manager sharing secret 1.
        let mut peer = manager(TokenConfig::default());
        peer.issue(&b, t0()).unwrap()
    };
    assert!(matches!(m.retire_secret(2), Err(MigrationError::Config(_))));
    m.retire_secret(1).unwrap();
    assert_eq!(
        rejected(m.verify(&b, &old2, t0())),
        TokenRejection::UnknownSecret
    );
    m.verify(&b, &new, t0()).unwrap();
    assert!(m.rotate_secret(1, TokenSecret::generate()).is_err());
    assert!(TokenSecret::from_bytes(&[0; 16]).is_err());
    assert!(!format!("{m:?}").contains("[1, 1"));
}

#[test]
fn a_restarted_verifier_refuses_tokens_used_before_the_restart() {
    let mut controller = manager(TokenConfig::default());
    let token = controller.issue(&binding(), t0()).unwrap();
    let mut target = manager(TokenConfig::default());
    target.refuse_issued_before(t0() - Duration::from_secs(60));
    target.verify(&binding(), &token, t0()).unwrap();
    // The target restarts 1 s later: a new manager, an empty replay cache, the same secret.
    let restart = t0() + Duration::from_secs(1);
    let mut target = manager(TokenConfig::default());
    target.refuse_issued_before(restart);
    assert_eq!(
        rejected(target.verify(&binding(), &token, restart + Duration::from_millis(5))),
        TokenRejection::IssuedBeforeRestart
    );
    // Tokens issued after the restart are accepted (once).
    let fresh = controller.issue(&binding(), restart).unwrap();
    target.verify(&binding(), &fresh, restart).unwrap();
    assert_eq!(
        rejected(target.verify(&binding(), &fresh, restart)),
        TokenRejection::Replayed
    );
    // A forged token still reads as a bad MAC, not as a restart artefact.
    let mut forged = token.as_bytes().to_vec();
    forged[40] ^= 1;
    assert_eq!(
        rejected(target.verify(&binding(), &MigrationToken::from_bytes(forged), restart)),
        TokenRejection::BadMac
    );
}
