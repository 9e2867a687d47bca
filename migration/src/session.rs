//! Live connections, which worker owns each, and the migration (if any) moving it.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::ids::{ConnectionId, MigrationBinding, MigrationId, WorkerId};
use crate::metrics::MigrationMetrics;
use crate::protocol::MigrationError;
use crate::state_machine::{MigrationStateMachine, PhaseTimeouts, RollbackAction};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    pub timeouts: PhaseTimeouts,
    /// Migrations in flight at once; more are refused with `TargetUnavailable`.
    pub max_concurrent_migrations: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            timeouts: PhaseTimeouts::default(),
            max_concurrent_migrations: 64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub owner: WorkerId,
    pub registered_at: Instant,
    /// The migration moving this connection right now.
    pub migration: Option<MigrationId>,
    pub completed_migrations: u32,
}

#[derive(Debug)]
pub struct SessionManager {
    config: SessionConfig,
    metrics: Arc<MigrationMetrics>,
    sessions: HashMap<ConnectionId, Session>,
    migrations: HashMap<MigrationId, MigrationStateMachine>,
}

impl SessionManager {
    pub fn new(config: SessionConfig, metrics: Arc<MigrationMetrics>) -> Self {
        Self {
            config,
            metrics,
            sessions: HashMap::new(),
            migrations: HashMap::new(),
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<MigrationMetrics> {
        &self.metrics
    }

    /// Records a connection served by `owner` (idempotent for the same owner).
    pub fn register(
        &mut self,
        connection_id: ConnectionId,
        owner: WorkerId,
        now: Instant,
    ) -> Result<(), MigrationError> {
        match self.sessions.get_mut(&connection_id) {
            Some(s) if s.migration.is_some() => {
                Err(MigrationError::AlreadyMigrating(connection_id))
            }
            Some(s) => {
                s.owner = owner;
                Ok(())
            }
            None => {
                self.sessions.insert(
                    connection_id,
                    Session {
                        owner,
                        registered_at: now,
                        migration: None,
                        completed_migrations: 0,
                    },
                );
                Ok(())
            }
        }
    }

    /// Forgets a closed connection. Refused while it is migrating: fail the migration first.
    pub fn remove(&mut self, connection_id: &ConnectionId) -> Result<Session, MigrationError> {
        match self.sessions.get(connection_id) {
            None => Err(MigrationError::UnknownConnection(connection_id.clone())),
            Some(s) if s.migration.is_some() => {
                Err(MigrationError::AlreadyMigrating(connection_id.clone()))
            }
            Some(_) => Ok(self.sessions.remove(connection_id).expect("present")),
        }
    }

    pub fn session(&self, connection_id: &ConnectionId) -> Option<&Session> {
        self.sessions.get(connection_id)
    }

    pub fn connection_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn migration(&self, id: &MigrationId) -> Option<&MigrationStateMachine> {
        self.migrations.get(id)
    }

    pub fn active_migrations(&self) -> impl Iterator<Item = &MigrationStateMachine> {
        self.migrations.values()
    }

    /// Starts moving `connection_id` to `target` (the machine enters Preparing). Returns the
    /// binding to issue a token and seal the snapshot for.
    pub fn begin_migration(
        &mut self,
        connection_id: &ConnectionId,
        target: WorkerId,
        now: Instant,
    ) -> Result<MigrationBinding, MigrationError> {
        let result = self.try_begin(connection_id, target, now);
        if let Err(e) = &result {
            self.metrics.record_error(e.kind());
        }
        result
    }

    fn try_begin(
        &mut self,
        connection_id: &ConnectionId,
        target: WorkerId,
        now: Instant,
    ) -> Result<MigrationBinding, MigrationError> {
        if self.migrations.len() >= self.config.max_concurrent_migrations {
            return Err(MigrationError::TargetUnavailable {
                target,
                reason: format!(
                    "{} migrations already in flight (max_concurrent_migrations)",
                    self.migrations.len()
                ),
            });
        }
        let session = self
            .sessions
            .get_mut(connection_id)
            .ok_or_else(|| MigrationError::UnknownConnection(connection_id.clone()))?;
        if session.migration.is_some() {
            return Err(MigrationError::AlreadyMigrating(connection_id.clone()));
        }
        if session.owner == target {
            return Err(MigrationError::TargetUnavailable {
                target,
                reason: "it already owns the connection".into(),
            });
        }
        let binding = MigrationBinding {
            migration_id: MigrationId::random(),
            connection_id: connection_id.clone(),
            source: session.owner,
            target,
        };
        let mut machine =
            MigrationStateMachine::new(binding.clone(), self.config.timeouts, self.metrics.clone());
        machine.start(now)?;
        session.migration = Some(binding.migration_id);
        self.migrations.insert(binding.migration_id, machine);
        Ok(binding)
    }

    fn machine(&mut self, id: &MigrationId) -> Result<&mut MigrationStateMachine, MigrationError> {
        self.migrations
            .get_mut(id)
            .ok_or(MigrationError::UnknownMigration(*id))
    }

    pub fn begin_transfer(&mut self, id: &MigrationId, now: Instant) -> Result<(), MigrationError> {
        self.machine(id)?.begin_transfer(now)
    }

    /// The target confirmed: it now owns the connection.
    pub fn complete(&mut self, id: &MigrationId, now: Instant) -> Result<(), MigrationError> {
        self.machine(id)?.complete(now)?;
        let machine = self.migrations.remove(id).expect("present");
        let b = machine.binding();
        if let Some(s) = self.sessions.get_mut(&b.connection_id) {
            s.owner = b.target;
            s.migration = None;
            s.completed_migrations += 1;
        }
        Ok(())
    }

    /// Fails the migration; the connection stays with the source. Returns the rollback to run.
    pub fn fail(
        &mut self,
        id: &MigrationId,
        error: MigrationError,
        now: Instant,
    ) -> Result<Vec<RollbackAction>, MigrationError> {
        let actions = self.machine(id)?.fail(error, now)?;
        self.finish_failed(id);
        Ok(actions)
    }

    /// Fails every migration whose phase timed out.
    pub fn poll_timeouts(&mut self, now: Instant) -> Vec<(MigrationId, Vec<RollbackAction>)> {
        let mut out = Vec::new();
        for (id, machine) in self.migrations.iter_mut() {
            if let Some(actions) = machine.poll_timeout(now) {
                out.push((*id, actions));
            }
        }
        for (id, _) in &out {
            self.finish_failed(id);
        }
        out
    }

    fn finish_failed(&mut self, id: &MigrationId) {
        let Some(machine) = self.migrations.remove(id) else {
            return;
        };
        if let Some(s) = self.sessions.get_mut(&machine.binding().connection_id) {
            s.migration = None;
        }
    }
}
