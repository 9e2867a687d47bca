//! The migration model's tests: a simulated world (two workers, the LB's slots, the token issuer)
//! drives [`Migration`] the way the CLI does, with faults injected at every step. What is
//! asserted is what an operator relies on: no override is written unless the source committed,
//! every failure before the commit leaves the map untouched, a failure after it is reported as
//! such, and each outcome names its kind.
use baton_orchestrator::machine::Options;
use baton_orchestrator::{Action, Event, Migration, Outcome, Phase};
use baton_protocol::daemon::Step;
use baton_protocol::worker::{CidLayout, Info, MigratedOut};
use baton_protocol::{Cid, ErrorKind, Failure, HexBytes, MigrationId, PROTOCOL_VERSION};
use proptest::prelude::*;
use std::time::{Duration, Instant};

const LAYOUT: CidLayout = CidLayout {
    cid_len: 8,
    server_id_len: 2,
};

fn info(name: &str, sid: u32) -> Info {
    Info {
        protocol: PROTOCOL_VERSION,
        name: name.into(),
        server_id: sid,
        peer: format!("10.0.0.{sid}:4470").parse().unwrap(),
        cid: LAYOUT,
    }
}

fn cid(n: u8) -> Cid {
    Cid::new(&[1, 0, 2, n, n, n, n, n]).unwrap()
}

/// Where the simulated world misbehaves.
#[derive(Clone, Debug, Default)]
struct Faults {
    info: Option<(&'static str, Result<Info, Failure>)>,
    slot: Option<Failure>,
    token: Option<Failure>,
    migrate: Option<Failure>,
    /// The action of this kind never gets an answer (0: AskInfo, 1: FindSlot, 2: IssueToken,
    /// 3: MigrateOut, 4: SetOverride, 5: Release).
    silent: Option<usize>,
    /// The n-th override write fails.
    override_fails: Option<usize>,
    release: Option<Failure>,
}

/// Everything the world saw, in order.
#[derive(Debug, Default)]
struct Seen {
    actions: Vec<Action>,
    overrides: Vec<(Cid, u32)>,
    /// Index in `actions` of the MigrateOut that was answered Ok.
    committed_at: Option<usize>,
    phases: Vec<Phase>,
}

fn kind_of(a: &Action) -> usize {
    match a {
        Action::AskInfo { .. } => 0,
        Action::FindSlot { .. } => 1,
        Action::IssueToken { .. } => 2,
        Action::MigrateOut { .. } => 3,
        Action::SetOverride { .. } => 4,
        Action::Release { .. } => 5,
    }
}

/// Runs `m` to its end against the world; time advances 1 ms per answer, and jumps to the
/// deadline when nothing is left to answer.
fn run(mut m: Migration, f: &Faults, mut now: Instant) -> (Migration, Seen) {
    let mut seen = Seen::default();
    let cids = vec![cid(1), cid(2), cid(3)];
    let mut overrides_tried = 0;
    loop {
        seen.phases.push(m.phase());
        let mut answered = false;
        while let Some(a) = m.poll_action() {
            seen.actions.push(a.clone());
            if f.silent == Some(kind_of(&a)) {
                continue;
            }
            now += Duration::from_millis(1);
            let ev = match a {
                Action::AskInfo { worker } => {
                    let result = match &f.info {
                        Some((w, r)) if *w == worker => r.clone(),
                        _ if worker == "w1" => Ok(info("w1", 1)),
                        _ => Ok(info("w2", 2)),
                    };
                    Event::Info { worker, result }
                }
                Action::FindSlot { worker, server_id } => {
                    assert_eq!((worker.as_str(), server_id), ("w2", 2));
                    Event::Slot(f.slot.clone().map_or(Ok(7), Err))
                }
                Action::IssueToken {
                    source,
                    target,
                    conn,
                    ..
                } => {
                    assert_eq!((source, target, conn), (1, 2, cid(0)));
                    Event::Token(f.token.clone().map_or(Ok(HexBytes(vec![0xaa; 8])), Err))
                }
                Action::MigrateOut {
                    worker, request, ..
                } => {
                    assert_eq!(worker, "w1");
                    assert_eq!(request.target.server_id, 2);
                    assert_eq!(request.token, HexBytes(vec![0xaa; 8]));
                    let r = match &f.migrate {
                        Some(e) => Err(e.clone()),
                        None => {
                            seen.committed_at = Some(seen.actions.len() - 1);
                            Ok(MigratedOut {
                                cids: cids.clone(),
                                target_id: 9,
                                snapshot_bytes: 1500,
                                freeze_ms: 0.5,
                                total_ms: 3.0,
                            })
                        }
                    };
                    Event::MigratedOut(r)
                }
                Action::SetOverride { cid, slot } => {
                    overrides_tried += 1;
                    let result = if f.override_fails == Some(overrides_tried) {
                        Err(Failure::new(ErrorKind::Override, "map full"))
                    } else {
                        seen.overrides.push((cid, slot));
                        Ok(())
                    };
                    Event::OverrideSet { cid, result }
                }
                Action::Release { .. } => Event::Released(f.release.clone().map_or(Ok(()), Err)),
            };
            m.handle(ev, now);
            seen.phases.push(m.phase());
            answered = true;
        }
        if m.outcome().is_some() {
            seen.phases.push(m.phase());
            return (m, seen);
        }
        if !answered {
            now = m
                .poll_timeout()
                .expect("a running migration has a deadline");
            m.handle_timeout(now);
        }
    }
}

fn start(opts: Options) -> (Migration, Instant) {
    let now = Instant::now();
    let m = Migration::new(cid(0), "w1", "w2", MigrationId([5; 16]), opts, now);
    (m, now)
}

fn opts() -> Options {
    Options {
        lb_layout: Some(LAYOUT),
        ..Options::default()
    }
}

fn failed(m: &Migration) -> (&Failure, Step, bool) {
    match m.outcome() {
        Some(Outcome::Failed {
            failure,
            step,
            committed,
        }) => (failure, *step, *committed),
        o => panic!("expected a failure, got {o:?}"),
    }
}

#[test]
fn a_migration_runs_its_steps_in_order_and_flips_only_after_the_commit() {
    let (m, now) = start(opts());
    assert_eq!(m.phase(), Phase::Preparing);
    let (m, seen) = run(m, &Faults::default(), now);
    let kinds: Vec<usize> = seen.actions.iter().map(kind_of).collect();
    assert_eq!(kinds, [0, 0, 1, 2, 3, 4, 4, 4, 5]);
    assert_eq!(seen.overrides, [(cid(1), 7), (cid(2), 7), (cid(3), 7)]);
    assert!(seen.phases.contains(&Phase::Preparing));
    assert!(seen.phases.contains(&Phase::Transferring));
    assert_eq!(m.phase(), Phase::Completed);
    let Some(Outcome::Moved(r)) = m.outcome() else {
        panic!("{:?}", m.outcome())
    };
    assert_eq!((r.from.as_str(), r.to.as_str()), ("w1", "w2"));
    assert_eq!(r.cids, [cid(1), cid(2), cid(3)]);
    assert_eq!((r.snapshot_bytes, r.freeze_ms), (1500, 0.5));
    let steps: Vec<Step> = r.steps.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, Step::ALL);
    assert!(r.total_ms > 0.0 && r.release_warning.is_none());
    let rec = m.record();
    assert_eq!((rec.failed, rec.snapshot_bytes), (None, 1500));
    assert!(
        m.poll_timeout().is_none(),
        "a finished migration has no timer"
    );
}

#[test]
fn a_connection_already_on_the_target_is_refused_before_anything_is_asked() {
    let now = Instant::now();
    let mut m = Migration::new(cid(0), "w2", "w2", MigrationId([5; 16]), opts(), now);
    assert!(m.poll_action().is_none());
    let (f, step, committed) = failed(&m);
    assert_eq!(
        (f.kind, step, committed),
        (ErrorKind::Config, Step::Resolve, false)
    );
    assert!(f.message.contains("already on w2"), "{}", f.message);
}

/// Every way to fail before the source commits: the map is never written, and the outcome is
/// a failure of that step with that kind, not committed.
#[test]
fn every_failure_before_the_commit_leaves_the_map_untouched() {
    let down = Failure::new(ErrorKind::TargetUnavailable, "w2: connection refused");
    let mut old = info("w2", 2);
    old.protocol = PROTOCOL_VERSION + 1;
    let mut other_layout = info("w2", 2);
    other_layout.cid.cid_len = 12;
    let cases: Vec<(Faults, ErrorKind, Step, &str)> = vec![
        (
            Faults {
                info: Some(("w2", Err(down.clone()))),
                ..Faults::default()
            },
            ErrorKind::TargetUnavailable,
            Step::Resolve,
            "connection refused",
        ),
        (
            Faults {
                info: Some(("w2", Ok(old))),
                ..Faults::default()
            },
            ErrorKind::UnsupportedVersion,
            Step::Resolve,
            "version 2, this baton speaks 1",
        ),
        (
            Faults {
                info: Some(("w2", Ok(other_layout))),
                ..Faults::default()
            },
            ErrorKind::Config,
            Step::Resolve,
            "issues 12-byte CIDs with a 2-byte server ID but the load balancer routes 8-byte CIDs",
        ),
        (
            Faults {
                slot: Some(Failure::new(
                    ErrorKind::Config,
                    "no worker with server ID 2",
                )),
                ..Faults::default()
            },
            ErrorKind::Config,
            Step::Resolve,
            "server ID 2",
        ),
        (
            Faults {
                token: Some(Failure::new(ErrorKind::ReplayCacheFull, "full")),
                ..Faults::default()
            },
            ErrorKind::ReplayCacheFull,
            Step::Authorize,
            "full",
        ),
        (
            Faults {
                migrate: Some(Failure::new(ErrorKind::InvalidToken, "token expired")),
                ..Faults::default()
            },
            ErrorKind::InvalidToken,
            Step::Transfer,
            "expired",
        ),
        (
            Faults {
                migrate: Some(Failure::new(ErrorKind::StateCorruption, "tag mismatch")),
                ..Faults::default()
            },
            ErrorKind::StateCorruption,
            Step::Transfer,
            "tag",
        ),
        (
            Faults {
                migrate: Some(Failure::new(ErrorKind::Timeout, "did not quiesce")),
                ..Faults::default()
            },
            ErrorKind::Timeout,
            Step::Transfer,
            "quiesce",
        ),
        (
            Faults {
                silent: Some(0),
                ..Faults::default()
            },
            ErrorKind::Timeout,
            Step::Resolve,
            "step resolve got no answer within 5000 ms",
        ),
        (
            Faults {
                silent: Some(2),
                ..Faults::default()
            },
            ErrorKind::Timeout,
            Step::Authorize,
            "no answer",
        ),
        (
            Faults {
                silent: Some(3),
                ..Faults::default()
            },
            ErrorKind::Timeout,
            Step::Transfer,
            "did not answer migrate_out within 12000 ms; whether it committed is unknown",
        ),
    ];
    for (faults, kind, at, says) in cases {
        let (m, now) = start(opts());
        let (m, seen) = run(m, &faults, now);
        let (f, step, committed) = failed(&m);
        assert_eq!(
            (f.kind, step, committed),
            (kind, at, false),
            "{faults:?}: {f:?}"
        );
        assert!(f.message.contains(says), "{faults:?}: {}", f.message);
        assert!(seen.overrides.is_empty(), "{faults:?}: the map was written");
        assert!(
            !seen.actions.iter().any(|a| kind_of(a) >= 4),
            "{faults:?}: flip or release asked: {:?}",
            seen.actions
        );
        assert_eq!(m.phase(), Phase::Failed);
        assert_eq!(m.record().failed, Some(kind));
    }
}

#[test]
fn workers_that_disagree_on_the_cid_layout_are_refused_naming_both() {
    let mut w2 = info("w2", 2);
    w2.cid.server_id_len = 3;
    let (m, now) = start(Options::default()); // no LB layout known
    let (m, seen) = run(
        m,
        &Faults {
            info: Some(("w2", Ok(w2))),
            ..Faults::default()
        },
        now,
    );
    let (f, _, _) = failed(&m);
    assert_eq!(f.kind, ErrorKind::Config);
    assert!(
        f.message.contains("2-byte server ID") && f.message.contains("3-byte server ID"),
        "{}",
        f.message
    );
    assert!(seen.overrides.is_empty());
}

#[test]
fn an_override_that_fails_after_the_commit_is_reported_as_committed_not_rolled_back() {
    let (m, now) = start(opts());
    let (m, seen) = run(
        m,
        &Faults {
            override_fails: Some(2),
            ..Faults::default()
        },
        now,
    );
    let (f, step, committed) = failed(&m);
    assert_eq!(
        (f.kind, step, committed),
        (ErrorKind::Override, Step::Flip, true)
    );
    assert!(
        f.message.contains("connection moved to w2"),
        "{}",
        f.message
    );
    // The first CID stays flipped (it points at the connection's one live copy).
    assert_eq!(seen.overrides, [(cid(1), 7)]);
    assert!(!seen.actions.iter().any(|a| kind_of(a) == 5));
}

#[test]
fn a_flip_that_never_answers_times_out_as_committed() {
    let (m, now) = start(opts());
    let (m, _) = run(
        m,
        &Faults {
            silent: Some(4),
            ..Faults::default()
        },
        now,
    );
    let (f, step, committed) = failed(&m);
    assert_eq!(
        (f.kind, step, committed),
        (ErrorKind::Timeout, Step::Flip, true)
    );
}

#[test]
fn a_failed_release_is_a_warning_on_a_completed_move() {
    let (m, now) = start(opts());
    let (m, _) = run(
        m,
        &Faults {
            release: Some(Failure::new(ErrorKind::TargetUnavailable, "w1 went away")),
            ..Faults::default()
        },
        now,
    );
    let Some(Outcome::Moved(r)) = m.outcome() else {
        panic!("{:?}", m.outcome())
    };
    assert!(
        r.release_warning
            .as_deref()
            .unwrap()
            .contains("w1 went away")
    );
}

#[test]
fn a_commit_reported_after_the_timeout_flips_nothing() {
    let (mut m, now) = start(opts());
    let mut t = now;
    // Resolve and authorise by hand, then let the transfer time out.
    let mut migrate = None;
    while migrate.is_none() {
        let a = m.poll_action().expect("an action");
        t += Duration::from_millis(1);
        let ev = match a {
            Action::AskInfo { worker } => Event::Info {
                result: Ok(info(&worker, if worker == "w1" { 1 } else { 2 })),
                worker,
            },
            Action::FindSlot { .. } => Event::Slot(Ok(3)),
            Action::IssueToken { .. } => Event::Token(Ok(HexBytes(vec![1]))),
            a @ Action::MigrateOut { .. } => {
                migrate = Some(a);
                continue;
            }
            a => panic!("{a:?}"),
        };
        m.handle(ev, t);
    }
    let deadline = m.poll_timeout().unwrap();
    m.handle_timeout(deadline - Duration::from_millis(1));
    assert!(m.outcome().is_none(), "not before the deadline");
    m.handle_timeout(deadline);
    assert_eq!(failed(&m).0.kind, ErrorKind::Timeout);
    m.handle(
        Event::MigratedOut(Ok(MigratedOut {
            cids: vec![cid(1)],
            target_id: 1,
            snapshot_bytes: 1,
            freeze_ms: 0.0,
            total_ms: 0.0,
        })),
        deadline + Duration::from_millis(1),
    );
    assert!(
        m.poll_action().is_none(),
        "a late commit must not flip the map"
    );
    assert_eq!(m.phase(), Phase::Failed);
}

#[test]
fn answers_out_of_order_are_ignored() {
    let (mut m, now) = start(opts());
    // A token or a commit before the workers are resolved.
    m.handle(Event::Token(Ok(HexBytes(vec![1]))), now);
    m.handle(
        Event::MigratedOut(Ok(MigratedOut {
            cids: vec![cid(1)],
            target_id: 1,
            snapshot_bytes: 1,
            freeze_ms: 0.0,
            total_ms: 0.0,
        })),
        now,
    );
    let kinds: Vec<usize> = std::iter::from_fn(|| m.poll_action())
        .map(|a| kind_of(&a))
        .collect();
    assert_eq!(kinds, [0, 0], "only the two info requests");
    assert_eq!(m.phase(), Phase::Preparing);
}

proptest! {
    /// Whatever fails, and wherever an answer is missing: overrides are written only after the
    /// source answered migrate_out with its commit, and the run always ends.
    #[test]
    fn no_override_is_ever_written_before_the_commit(
        silent in proptest::option::of(0usize..6),
        migrate_fails in any::<bool>(),
        override_fails in proptest::option::of(1usize..4),
        token_fails in any::<bool>(),
    ) {
        let faults = Faults {
            silent,
            migrate: migrate_fails.then(|| Failure::new(ErrorKind::StateCorruption, "x")),
            override_fails,
            token: token_fails.then(|| Failure::new(ErrorKind::InvalidKey, "x")),
            ..Faults::default()
        };
        let (m, now) = start(opts());
        let (m, seen) = run(m, &faults, now);
        let first_override = seen.actions.iter().position(|a| kind_of(a) == 4);
        if let Some(i) = first_override {
            prop_assert!(seen.committed_at.is_some_and(|c| c < i));
        }
        match m.outcome().unwrap() {
            Outcome::Moved(r) => prop_assert_eq!(r.cids.len(), seen.overrides.len()),
            Outcome::Failed { committed, .. } => {
                prop_assert_eq!(*committed, seen.committed_at.is_some());
            }
        }
    }
}
