mod common;

use common::{binding, cid};
use migration::health::{HealthChecker, HealthThresholds};
use migration::session::SessionConfig;
use migration::state_machine::{MigrationEvent, PhaseTimeouts};
use migration::{
    HealthStatus, MigrationError, MigrationMetrics, MigrationParty, MigrationPhase,
    MigrationStateMachine, RollbackAction, SessionManager, WorkerId,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PHASES: [MigrationPhase; 5] = [
    MigrationPhase::Idle,
    MigrationPhase::Preparing,
    MigrationPhase::Transferring,
    MigrationPhase::Completed,
    MigrationPhase::Failed,
];

fn events() -> Vec<MigrationEvent> {
    vec![
        MigrationEvent::Start,
        MigrationEvent::BeginTransfer,
        MigrationEvent::Complete,
        MigrationEvent::Fail(MigrationError::TargetUnavailable {
            target: WorkerId(2),
            reason: "test".into(),
        }),
    ]
}

fn timeouts() -> PhaseTimeouts {
    PhaseTimeouts {
        preparing: Duration::from_secs(1),
        transferring: Duration::from_secs(2),
    }
}

/// A machine driven into `phase` through legal events.
fn machine_in(
    phase: MigrationPhase,
    now: Instant,
    metrics: &Arc<MigrationMetrics>,
) -> MigrationStateMachine {
    let mut m = MigrationStateMachine::new(binding(), timeouts(), metrics.clone());
    let path: &[MigrationEvent] = match phase {
        MigrationPhase::Idle => &[],
        MigrationPhase::Preparing => &[MigrationEvent::Start],
        MigrationPhase::Transferring => &[MigrationEvent::Start, MigrationEvent::BeginTransfer],
        MigrationPhase::Completed => &[
            MigrationEvent::Start,
            MigrationEvent::BeginTransfer,
            MigrationEvent::Complete,
        ],
        MigrationPhase::Failed => &[
            MigrationEvent::Start,
            MigrationEvent::Fail(MigrationError::Config("x".into())),
        ],
    };
    for e in path {
        m.handle(e.clone(), now).unwrap();
    }
    assert_eq!(m.phase(), phase);
    m
}

fn legal(from: MigrationPhase, event: &MigrationEvent) -> Option<MigrationPhase> {
    use MigrationPhase::*;
    match (from, event) {
        (Idle, MigrationEvent::Start) => Some(Preparing),
        (Preparing, MigrationEvent::BeginTransfer) => Some(Transferring),
        (Transferring, MigrationEvent::Complete) => Some(Completed),
        (Preparing | Transferring, MigrationEvent::Fail(_)) => Some(Failed),
        _ => None,
    }
}

#[test]
fn every_state_event_pair() {
    let now = Instant::now();
    let mut illegal = 0;
    for from in PHASES {
        for event in events() {
            let metrics = Arc::new(MigrationMetrics::new());
            let mut m = machine_in(from, now, &metrics);
            let refused_before = metrics.errors(migration::ErrorKind::IllegalTransition);
            let result = m.handle(event.clone(), now + Duration::from_millis(10));
            match legal(from, &event) {
                Some(to) => {
                    assert!(result.is_ok(), "{from} + {}: {result:?}", event.name());
                    assert_eq!(m.phase(), to);
                    assert_eq!(metrics.transitions(from, to), 1);
                }
                None => {
                    illegal += 1;
                    let err = result.unwrap_err();
                    assert_eq!(
                        err,
                        MigrationError::IllegalTransition {
                            state: from,
                            event: event.name().into()
                        }
                    );
                    assert_eq!(m.phase(), from, "refused event must not move the machine");
                    assert_eq!(
                        metrics.errors(migration::ErrorKind::IllegalTransition),
                        refused_before + 1
                    );
                }
            }
        }
    }
    assert_eq!(illegal, 5 * 4 - 5);
}

#[test]
fn happy_path_counts_and_times_phases() {
    let metrics = Arc::new(MigrationMetrics::new());
    let t = Instant::now();
    let mut m = MigrationStateMachine::new(binding(), timeouts(), metrics.clone());
    assert_eq!(m.deadline(), None);
    m.start(t).unwrap();
    assert_eq!(m.deadline(), Some(t + Duration::from_secs(1)));
    m.begin_transfer(t + Duration::from_millis(300)).unwrap();
    assert_eq!(m.deadline(), Some(t + Duration::from_millis(2300)));
    assert_eq!(m.poll_timeout(t + Duration::from_millis(2299)), None);
    m.complete(t + Duration::from_millis(500)).unwrap();
    assert_eq!(m.poll_timeout(t + Duration::from_secs(100)), None);
    assert_eq!(
        (metrics.started(), metrics.completed(), metrics.failed()),
        (1, 1, 0)
    );
    assert_eq!(metrics.success_rate(), Some(1.0));
    let text = metrics.render_prometheus();
    assert!(
        text.contains("baton_migration_phase_duration_seconds_sum{phase=\"preparing\"} 0.3"),
        "{text}"
    );
    assert!(
        text.contains("baton_migration_phase_duration_seconds_sum{phase=\"transferring\"} 0.2")
    );
    assert!(text.contains("baton_migration_phase_duration_seconds_sum{phase=\"total\"} 0.5"));
}

#[test]
fn failure_returns_rollback_in_order() {
    let metrics = Arc::new(MigrationMetrics::new());
    let t = Instant::now();
    let mut m = machine_in(MigrationPhase::Transferring, t, &metrics);
    let err = MigrationError::TargetUnavailable {
        target: WorkerId(2),
        reason: "gone".into(),
    };
    let actions = m.fail(err.clone(), t).unwrap();
    let b = binding();
    assert_eq!(
        actions,
        vec![
            RollbackAction::CleanTargetPartialState {
                target: WorkerId(2),
                migration_id: b.migration_id
            },
            RollbackAction::RestoreOnSource {
                source: WorkerId(1),
                connection_id: b.connection_id.clone()
            },
            RollbackAction::HealthCheck {
                workers: [WorkerId(1), WorkerId(2)]
            },
            RollbackAction::Notify {
                parties: [
                    MigrationParty::Controller,
                    MigrationParty::Source,
                    MigrationParty::Target
                ],
                error: err.clone()
            },
        ]
    );
    assert_eq!(m.failure(), Some(&err));
    assert_eq!(metrics.errors(migration::ErrorKind::TargetUnavailable), 1);
}

#[test]
fn each_phase_times_out_on_its_own_limit() {
    let t = Instant::now();
    for (phase, limit) in [
        (MigrationPhase::Preparing, 1000u64),
        (MigrationPhase::Transferring, 2000),
    ] {
        let metrics = Arc::new(MigrationMetrics::new());
        let mut m = machine_in(phase, t, &metrics);
        assert_eq!(m.poll_timeout(t + Duration::from_millis(limit - 1)), None);
        let actions = m
            .poll_timeout(t + Duration::from_millis(limit + 5))
            .expect("timed out");
        assert_eq!(m.phase(), MigrationPhase::Failed);
        assert_eq!(
            m.failure(),
            Some(&MigrationError::Timeout {
                phase,
                elapsed_ms: limit + 5,
                limit_ms: limit
            })
        );
        assert_eq!(actions.len(), 4);
        assert_eq!(metrics.errors(migration::ErrorKind::Timeout), 1);
        assert_eq!(metrics.transitions(phase, MigrationPhase::Failed), 1);
        // Terminal: no second timeout.
        assert_eq!(m.poll_timeout(t + Duration::from_secs(60)), None);
    }
}

fn sessions(max: usize) -> SessionManager {
    SessionManager::new(
        SessionConfig {
            timeouts: timeouts(),
            max_concurrent_migrations: max,
        },
        Arc::new(MigrationMetrics::new()),
    )
}

#[test]
fn session_manager_moves_ownership_on_completion_only() {
    let t = Instant::now();
    let mut s = sessions(4);
    s.register(cid(1), WorkerId(1), t).unwrap();
    s.register(cid(2), WorkerId(1), t).unwrap();
    assert_eq!(s.connection_count(), 2);

    let b = s.begin_migration(&cid(1), WorkerId(2), t).unwrap();
    assert_eq!((b.source, b.target), (WorkerId(1), WorkerId(2)));
    assert_eq!(
        s.migration(&b.migration_id).unwrap().phase(),
        MigrationPhase::Preparing
    );
    assert_eq!(
        s.begin_migration(&cid(1), WorkerId(3), t),
        Err(MigrationError::AlreadyMigrating(cid(1)))
    );
    assert!(matches!(
        s.remove(&cid(1)),
        Err(MigrationError::AlreadyMigrating(_))
    ));
    s.begin_transfer(&b.migration_id, t).unwrap();
    s.complete(&b.migration_id, t).unwrap();
    assert_eq!(s.session(&cid(1)).unwrap().owner, WorkerId(2));
    assert_eq!(s.session(&cid(1)).unwrap().completed_migrations, 1);
    assert_eq!(
        s.complete(&b.migration_id, t),
        Err(MigrationError::UnknownMigration(b.migration_id))
    );

    // A failed migration leaves the connection with its source.
    let b2 = s.begin_migration(&cid(2), WorkerId(3), t).unwrap();
    let actions = s
        .fail(&b2.migration_id, MigrationError::Config("test".into()), t)
        .unwrap();
    assert_eq!(actions.len(), 4);
    assert_eq!(s.session(&cid(2)).unwrap().owner, WorkerId(1));
    assert_eq!(s.session(&cid(2)).unwrap().migration, None);
    s.remove(&cid(2)).unwrap();

    assert!(matches!(
        s.begin_migration(&cid(9), WorkerId(3), t),
        Err(MigrationError::UnknownConnection(_))
    ));
    assert!(matches!(
        s.begin_migration(&cid(1), WorkerId(2), t),
        Err(MigrationError::TargetUnavailable { .. })
    ));
}

#[test]
fn session_manager_limits_and_times_out() {
    let t = Instant::now();
    let mut s = sessions(2);
    for n in 0..3 {
        s.register(cid(n), WorkerId(1), t).unwrap();
    }
    let a = s.begin_migration(&cid(0), WorkerId(2), t).unwrap();
    let b = s
        .begin_migration(&cid(1), WorkerId(2), t + Duration::from_millis(500))
        .unwrap();
    let err = s.begin_migration(&cid(2), WorkerId(2), t).unwrap_err();
    assert!(
        matches!(err, MigrationError::TargetUnavailable { .. })
            && err.to_string().contains("max_concurrent_migrations"),
        "{err}"
    );

    let timed_out = s.poll_timeouts(t + Duration::from_millis(1200));
    assert_eq!(timed_out.len(), 1);
    assert_eq!(timed_out[0].0, a.migration_id);
    assert!(s.migration(&a.migration_id).is_none());
    assert!(s.migration(&b.migration_id).is_some());
    assert_eq!(s.session(&cid(0)).unwrap().migration, None);
    assert_eq!(s.metrics().errors(migration::ErrorKind::Timeout), 1);
}

#[test]
fn health_reports_issues() {
    let t = Instant::now();
    let checker = HealthChecker::new(HealthThresholds {
        min_finished: 4,
        ..HealthThresholds::default()
    });
    let mut s = sessions(10);
    assert_eq!(
        checker.check_system(&s, &s.metrics().clone(), t).status,
        HealthStatus::Healthy
    );

    for n in 0..4 {
        s.register(cid(n), WorkerId(1), t).unwrap();
        let b = s.begin_migration(&cid(n), WorkerId(2), t).unwrap();
        if n == 0 {
            s.begin_transfer(&b.migration_id, t).unwrap();
            s.complete(&b.migration_id, t).unwrap();
        } else {
            s.fail(&b.migration_id, MigrationError::Config("x".into()), t)
                .unwrap();
        }
    }
    let report = checker.check_system(&s, &s.metrics().clone(), t);
    assert_eq!(report.status, HealthStatus::Unhealthy, "{report:?}");
    assert!(
        report
            .issues
            .iter()
            .any(|i| i.message.contains("success rate 25.0%")),
        "{report:?}"
    );

    // A slow migration is flagged as degraded before its timeout, unhealthy after.
    s.register(cid(9), WorkerId(1), t).unwrap();
    let b = s.begin_migration(&cid(9), WorkerId(2), t).unwrap();
    let m = s.migration(&b.migration_id).unwrap();
    assert_eq!(
        checker
            .check_migration(m, t + Duration::from_millis(100))
            .status,
        HealthStatus::Healthy
    );
    assert_eq!(
        checker
            .check_migration(m, t + Duration::from_millis(900))
            .status,
        HealthStatus::Degraded
    );
    let late = checker.check_migration(m, t + Duration::from_millis(1500));
    assert_eq!(late.status, HealthStatus::Unhealthy);
    assert!(late.issues[0].message.contains("timeout"));
}
