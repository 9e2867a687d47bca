//! System and per-migration health, as a status plus the issues behind it.
use std::time::Instant;

use crate::metrics::MigrationMetrics;
use crate::protocol::ErrorKind;
use crate::session::SessionManager;
use crate::state_machine::{MigrationPhase, MigrationStateMachine};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Unhealthy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthIssue {
    pub severity: HealthStatus,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// The worst severity among the issues (Healthy when there are none).
    pub status: HealthStatus,
    pub issues: Vec<HealthIssue>,
}

impl HealthReport {
    fn from_issues(issues: Vec<HealthIssue>) -> Self {
        let status = issues
            .iter()
            .map(|i| i.severity)
            .max()
            .unwrap_or(HealthStatus::Healthy);
        Self { status, issues }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthThresholds {
    /// Below this success rate the system is Degraded; below half of it, Unhealthy.
    pub min_success_rate: f64,
    /// Finished migrations needed before the success rate is judged.
    pub min_finished: u64,
    /// A migration past this fraction of its phase timeout is reported as slow.
    pub slow_phase_fraction: f64,
    /// In-flight migrations above this fraction of the maximum are reported.
    pub busy_fraction: f64,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            min_success_rate: 0.95,
            min_finished: 20,
            slow_phase_fraction: 0.8,
            busy_fraction: 0.9,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct HealthChecker {
    thresholds: HealthThresholds,
}

impl HealthChecker {
    pub fn new(thresholds: HealthThresholds) -> Self {
        Self { thresholds }
    }

    pub fn check_system(
        &self,
        sessions: &SessionManager,
        metrics: &MigrationMetrics,
        now: Instant,
    ) -> HealthReport {
        let t = &self.thresholds;
        let mut issues = Vec::new();
        let finished = metrics.completed() + metrics.failed();
        if let Some(rate) = metrics
            .success_rate()
            .filter(|_| finished >= t.min_finished)
        {
            if rate < t.min_success_rate {
                let severity = if rate < t.min_success_rate / 2.0 {
                    HealthStatus::Unhealthy
                } else {
                    HealthStatus::Degraded
                };
                issues.push(HealthIssue {
                    severity,
                    message: format!(
                        "migration success rate {:.1}% over {finished} migrations is below {:.1}%; check errors_total by kind",
                        rate * 100.0,
                        t.min_success_rate * 100.0
                    ),
                });
            }
        }
        let corruption = metrics.errors(ErrorKind::StateCorruption);
        if corruption > 0 {
            issues.push(HealthIssue {
                severity: HealthStatus::Degraded,
                message: format!("{corruption} snapshot(s) failed integrity checks; check that all workers share the key ring and run compatible versions"),
            });
        }
        let max = sessions.config().max_concurrent_migrations;
        let active = sessions.active_migrations().count();
        if active as f64 > max as f64 * t.busy_fraction {
            issues.push(HealthIssue {
                severity: HealthStatus::Degraded,
                message: format!(
                    "{active} of at most {max} migrations in flight; new ones will soon be refused"
                ),
            });
        }
        for m in sessions.active_migrations() {
            issues.extend(self.check_migration(m, now).issues);
        }
        HealthReport::from_issues(issues)
    }

    pub fn check_migration(&self, m: &MigrationStateMachine, now: Instant) -> HealthReport {
        let mut issues = Vec::new();
        let id = m.binding().migration_id;
        match m.phase() {
            MigrationPhase::Failed => issues.push(HealthIssue {
                severity: HealthStatus::Unhealthy,
                message: format!(
                    "migration {id} failed: {}",
                    m.failure()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "unknown error".into())
                ),
            }),
            phase @ (MigrationPhase::Preparing | MigrationPhase::Transferring) => {
                let limit = m
                    .timeouts()
                    .for_phase(phase)
                    .expect("active phases have timeouts");
                let spent = m.time_in_phase(now);
                if spent >= limit {
                    issues.push(HealthIssue {
                        severity: HealthStatus::Unhealthy,
                        message: format!("migration {id} is past its {phase} timeout ({spent:?} of {limit:?}); poll_timeouts has not run"),
                    });
                } else if spent.as_secs_f64()
                    > limit.as_secs_f64() * self.thresholds.slow_phase_fraction
                {
                    issues.push(HealthIssue {
                        severity: HealthStatus::Degraded,
                        message: format!("migration {id} has spent {spent:?} of {limit:?} in {phase}; check {} is responsive", m.binding().target),
                    });
                }
            }
            MigrationPhase::Idle | MigrationPhase::Completed => {}
        }
        HealthReport::from_issues(issues)
    }
}
