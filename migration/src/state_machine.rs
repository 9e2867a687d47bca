//! The life of one migration: Idle -> Preparing -> Transferring -> Completed | Failed.
//!
//! Sans-IO: events come in with the caller's `now`, and a failure returns the rollback the
//! caller must carry out. Every transition is traced and counted; illegal ones are refused.
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ids::{ConnectionId, MigrationBinding, MigrationId, WorkerId};
use crate::metrics::MigrationMetrics;
use crate::protocol::{MigrationError, MigrationParty};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigrationPhase {
    Idle,
    Preparing,
    Transferring,
    Completed,
    Failed,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Preparing => "preparing",
            Self::Transferring => "transferring",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationEvent {
    /// Idle -> Preparing: token verified, source freezes the connection and snapshots it.
    Start,
    /// Preparing -> Transferring: the sealed snapshot is on its way to the target.
    BeginTransfer,
    /// Transferring -> Completed: the target confirmed the connection is live there.
    Complete,
    /// Preparing | Transferring -> Failed.
    Fail(MigrationError),
}

impl MigrationEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::BeginTransfer => "begin_transfer",
            Self::Complete => "complete",
            Self::Fail(_) => "fail",
        }
    }
}

/// What the caller must do after a failure, in this order: nothing may keep routing to a
/// half-built connection on the target, the source resumes serving, then both are checked and
/// everyone is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollbackAction {
    /// Drop whatever the target received or built for this migration.
    CleanTargetPartialState {
        target: WorkerId,
        migration_id: MigrationId,
    },
    /// Unfreeze the connection on the source and point routing back at it.
    RestoreOnSource {
        source: WorkerId,
        connection_id: ConnectionId,
    },
    /// Run the health checker on both workers before they take new migrations.
    HealthCheck { workers: [WorkerId; 2] },
    /// Tell the parties the migration failed, and why.
    Notify {
        parties: [MigrationParty; 3],
        error: MigrationError,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseTimeouts {
    pub preparing: Duration,
    pub transferring: Duration,
}

impl Default for PhaseTimeouts {
    fn default() -> Self {
        Self {
            preparing: Duration::from_secs(5),
            transferring: Duration::from_secs(10),
        }
    }
}

impl PhaseTimeouts {
    pub fn for_phase(&self, phase: MigrationPhase) -> Option<Duration> {
        match phase {
            MigrationPhase::Preparing => Some(self.preparing),
            MigrationPhase::Transferring => Some(self.transferring),
            _ => None,
        }
    }
}

pub struct MigrationStateMachine {
    binding: MigrationBinding,
    phase: MigrationPhase,
    timeouts: PhaseTimeouts,
    started_at: Option<Instant>,
    phase_entered_at: Option<Instant>,
    failure: Option<MigrationError>,
    metrics: Arc<MigrationMetrics>,
}

impl MigrationStateMachine {
    pub fn new(
        binding: MigrationBinding,
        timeouts: PhaseTimeouts,
        metrics: Arc<MigrationMetrics>,
    ) -> Self {
        Self {
            binding,
            phase: MigrationPhase::Idle,
            timeouts,
            started_at: None,
            phase_entered_at: None,
            failure: None,
            metrics,
        }
    }

    pub fn binding(&self) -> &MigrationBinding {
        &self.binding
    }
    pub fn phase(&self) -> MigrationPhase {
        self.phase
    }
    pub fn failure(&self) -> Option<&MigrationError> {
        self.failure.as_ref()
    }
    pub fn timeouts(&self) -> PhaseTimeouts {
        self.timeouts
    }

    /// When the current phase times out, if it can.
    pub fn deadline(&self) -> Option<Instant> {
        Some(self.phase_entered_at? + self.timeouts.for_phase(self.phase)?)
    }

    /// How long the machine has been in its current phase.
    pub fn time_in_phase(&self, now: Instant) -> Duration {
        self.phase_entered_at
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default()
    }

    /// Applies `event`. Returns the rollback actions when it moves to Failed (empty otherwise).
    pub fn handle(
        &mut self,
        event: MigrationEvent,
        now: Instant,
    ) -> Result<Vec<RollbackAction>, MigrationError> {
        use MigrationPhase::*;
        let to = match (self.phase, &event) {
            (Idle, MigrationEvent::Start) => Preparing,
            (Preparing, MigrationEvent::BeginTransfer) => Transferring,
            (Transferring, MigrationEvent::Complete) => Completed,
            (Preparing | Transferring, MigrationEvent::Fail(_)) => Failed,
            (state, event) => {
                let err = MigrationError::IllegalTransition {
                    state,
                    event: event.name().to_string(),
                };
                self.metrics.record_error(err.kind());
                tracing::warn!(migration_id = %self.binding.migration_id, %state, event = event.name(), "illegal migration transition refused");
                return Err(err);
            }
        };
        Ok(self.transition(to, event, now))
    }

    pub fn start(&mut self, now: Instant) -> Result<(), MigrationError> {
        self.handle(MigrationEvent::Start, now).map(drop)
    }
    pub fn begin_transfer(&mut self, now: Instant) -> Result<(), MigrationError> {
        self.handle(MigrationEvent::BeginTransfer, now).map(drop)
    }
    pub fn complete(&mut self, now: Instant) -> Result<(), MigrationError> {
        self.handle(MigrationEvent::Complete, now).map(drop)
    }
    pub fn fail(
        &mut self,
        error: MigrationError,
        now: Instant,
    ) -> Result<Vec<RollbackAction>, MigrationError> {
        self.handle(MigrationEvent::Fail(error), now)
    }

    /// Fails the migration with `Timeout` if the current phase outlived its limit.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Vec<RollbackAction>> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        let limit = self.timeouts.for_phase(self.phase)?;
        let error = MigrationError::Timeout {
            phase: self.phase,
            elapsed_ms: self.time_in_phase(now).as_millis() as u64,
            limit_ms: limit.as_millis() as u64,
        };
        self.fail(error, now).ok()
    }

    fn transition(
        &mut self,
        to: MigrationPhase,
        event: MigrationEvent,
        now: Instant,
    ) -> Vec<RollbackAction> {
        let from = self.phase;
        let spent = self.time_in_phase(now);
        if from != MigrationPhase::Idle {
            self.metrics.observe_phase(from, spent);
        }
        self.metrics.record_transition(from, to);
        self.phase = to;
        self.phase_entered_at = Some(now);
        let b = &self.binding;
        tracing::info!(
            migration_id = %b.migration_id, connection_id = %b.connection_id, source = %b.source, target = %b.target,
            %from, %to, event = event.name(), spent_us = spent.as_micros() as u64,
            "migration transition"
        );
        match to {
            MigrationPhase::Preparing => {
                self.started_at = Some(now);
                Vec::new()
            }
            MigrationPhase::Completed => {
                self.observe_total(now);
                Vec::new()
            }
            MigrationPhase::Failed => {
                let MigrationEvent::Fail(error) = event else {
                    unreachable!("only Fail leads to Failed")
                };
                self.observe_total(now);
                self.metrics.record_error(error.kind());
                tracing::warn!(migration_id = %b.migration_id, failed_in = %from, %error, "migration failed; rolling back");
                self.failure = Some(error.clone());
                vec![
                    RollbackAction::CleanTargetPartialState {
                        target: b.target,
                        migration_id: b.migration_id,
                    },
                    RollbackAction::RestoreOnSource {
                        source: b.source,
                        connection_id: b.connection_id.clone(),
                    },
                    RollbackAction::HealthCheck {
                        workers: [b.source, b.target],
                    },
                    RollbackAction::Notify {
                        parties: [
                            MigrationParty::Controller,
                            MigrationParty::Source,
                            MigrationParty::Target,
                        ],
                        error,
                    },
                ]
            }
            _ => Vec::new(),
        }
    }

    fn observe_total(&self, now: Instant) {
        if let Some(t) = self.started_at {
            self.metrics.observe_total(now.saturating_duration_since(t));
        }
    }
}

impl fmt::Debug for MigrationStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationStateMachine")
            .field("binding", &self.binding)
            .field("phase", &self.phase)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}
