//! [`Migration`]: one connection's move from a source worker to a target worker.
//!
//! The steps ([`Step`]) and what each waits for:
//! 1. **resolve**: both workers' `info` (server ID, peer address, protocol version, CID layout;
//!    each checked against the LB's layout) and the target's LB slot;
//! 2. **authorize**: a single-use token bound to (migration, connection, source, target);
//! 3. **transfer**: `migrate_out` on the source, which freezes, exports, seals, transfers, waits
//!    for the target's held import and commits. It answers only then; a refusal or failure
//!    anywhere in it has been rolled back by the source (the connection carries on there);
//! 4. **flip**: the LB override of every CID the client may use, to the target's slot;
//! 5. **release**: the source stops forwarding late datagrams and forgets the connection.
//!
//! Retiring the overrides once the client stopped using the old CIDs is the driver's later,
//! batched work (it needs the target's connection list, not one migration's state).
use baton_protocol::daemon::{MigrationRecord, Step};
use baton_protocol::worker::{CidLayout, Info, MigrateOut, MigratedOut, TargetRef};
use baton_protocol::{Cid, ErrorKind, Failure, HexBytes, MigrationId, PROTOCOL_VERSION};
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a migration is run.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the source may wait for the connection to quiesce before exporting it.
    pub quiesce_timeout: Duration,
    /// What `migrate_out` may take beyond the quiesce wait (seal, transfer, import, commit).
    pub transfer_slack: Duration,
    /// Limit of every other step (one control request each, or one per CID for the flip).
    pub step_timeout: Duration,
    /// The CID layout the LB routes by; `None` when it cannot be read (then only the two workers
    /// are checked against each other).
    pub lb_layout: Option<CidLayout>,
    /// Test hook (fault tests): ask the source to corrupt the sealed snapshot.
    pub tamper_snapshot: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            quiesce_timeout: Duration::from_secs(2),
            transfer_slack: Duration::from_secs(10),
            step_timeout: Duration::from_secs(5),
            lb_layout: None,
            tamper_snapshot: false,
        }
    }
}

/// What the driver must do next. Each is answered with the [`Event`] named.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Ask `worker` for its [`Info`]: answer [`Event::Info`].
    AskInfo { worker: String },
    /// Find the LB slot of `worker` (server ID `server_id`): answer [`Event::Slot`].
    FindSlot { worker: String, server_id: u32 },
    /// Issue a token for this binding: answer [`Event::Token`].
    IssueToken {
        migration_id: MigrationId,
        conn: Cid,
        source: u32,
        target: u32,
    },
    /// Send `request` to the source `worker`, waiting at most `timeout`: answer
    /// [`Event::MigratedOut`].
    MigrateOut {
        worker: String,
        request: MigrateOut,
        timeout: Duration,
    },
    /// Route `cid` to LB slot `slot`: answer [`Event::OverrideSet`].
    SetOverride { cid: Cid, slot: u32 },
    /// Tell the source `worker` the flip is done: answer [`Event::Released`].
    Release {
        worker: String,
        migration_id: MigrationId,
    },
}

/// What happened to an [`Action`].
#[derive(Clone, Debug)]
pub enum Event {
    Info {
        worker: String,
        result: Result<Info, Failure>,
    },
    Slot(Result<u32, Failure>),
    Token(Result<HexBytes, Failure>),
    MigratedOut(Result<MigratedOut, Failure>),
    OverrideSet {
        cid: Cid,
        result: Result<(), Failure>,
    },
    Released(Result<(), Failure>),
}

/// The coarse view of a migration (what `baton`'s output, logs and metrics label it with).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Created, nothing asked yet.
    Idle,
    /// Resolving the workers and authorising.
    Preparing,
    /// Transferring, flipping, releasing.
    Transferring,
    Completed,
    Failed,
}

/// A connection that moved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub conn: Cid,
    pub from: String,
    pub to: String,
    pub migration_id: MigrationId,
    /// The CIDs now overridden to the target (to retire later).
    pub cids: Vec<Cid>,
    pub snapshot_bytes: u64,
    pub freeze_ms: f64,
    pub total_ms: f64,
    /// Milliseconds in each step, in order.
    pub steps: Vec<(Step, f64)>,
    /// The release failed: the source forgets the connection by itself later (the move stands).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_warning: Option<String>,
}

/// How a migration ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Moved(Report),
    Failed {
        failure: Failure,
        /// The step that failed.
        step: Step,
        /// The source had committed: the connection lives on the target (this was not a
        /// rollback), but not every override could be written.
        committed: bool,
    },
}

#[derive(Debug)]
enum State {
    Idle,
    Resolving {
        source: Option<Info>,
        target: Option<Info>,
        asked_slot: bool,
    },
    Authorizing,
    Transferring,
    Flipping {
        left: Vec<Cid>,
    },
    Releasing,
    Done,
}

/// One migration's orchestration. See the module documentation for the steps.
#[derive(Debug)]
pub struct Migration {
    conn: Cid,
    from: String,
    to: String,
    id: MigrationId,
    opts: Options,
    state: State,
    actions: VecDeque<Action>,
    started: Instant,
    step: Step,
    step_started: Instant,
    deadline: Instant,
    steps: Vec<(Step, f64)>,
    source: Option<Info>,
    target: Option<Info>,
    slot: u32,
    moved: Option<MigratedOut>,
    release_warning: Option<String>,
    outcome: Option<Outcome>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Migration {
    /// A migration of `conn` from worker `from` to worker `to`, starting at `now`.
    pub fn new(
        conn: Cid,
        from: &str,
        to: &str,
        id: MigrationId,
        opts: Options,
        now: Instant,
    ) -> Self {
        let deadline = now + opts.step_timeout;
        let mut m = Self {
            conn,
            from: from.into(),
            to: to.into(),
            id,
            opts,
            state: State::Idle,
            actions: VecDeque::new(),
            started: now,
            step: Step::Resolve,
            step_started: now,
            deadline,
            steps: Vec::new(),
            source: None,
            target: None,
            slot: 0,
            moved: None,
            release_warning: None,
            outcome: None,
        };
        if from == to {
            m.fail(
                Failure::new(
                    ErrorKind::Config,
                    format!("connection {conn} is already on {to}"),
                ),
                now,
            );
            return m;
        }
        m.state = State::Resolving {
            source: None,
            target: None,
            asked_slot: false,
        };
        m.actions.push_back(Action::AskInfo {
            worker: m.from.clone(),
        });
        m.actions.push_back(Action::AskInfo {
            worker: m.to.clone(),
        });
        m
    }

    pub fn id(&self) -> MigrationId {
        self.id
    }

    pub fn conn(&self) -> Cid {
        self.conn
    }

    /// The next thing to do, if any. Drain it after every [`Self::handle`].
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called, unless an event comes first.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.outcome.is_none()).then_some(self.deadline)
    }

    /// The step under way (the last one, once finished).
    pub fn step(&self) -> Step {
        self.step
    }

    pub fn phase(&self) -> Phase {
        match (&self.state, &self.outcome) {
            (_, Some(Outcome::Moved(_))) => Phase::Completed,
            (_, Some(Outcome::Failed { .. })) => Phase::Failed,
            (State::Idle, None) => Phase::Idle,
            (State::Resolving { .. } | State::Authorizing, None) => Phase::Preparing,
            _ => Phase::Transferring,
        }
    }

    /// How it ended; `None` while it runs.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    pub fn into_outcome(self) -> Option<Outcome> {
        self.outcome
    }

    /// The figures of a finished migration, for the orchestrating process's metrics.
    pub fn record(&self) -> MigrationRecord {
        let total_ms = match &self.outcome {
            Some(Outcome::Moved(r)) => r.total_ms,
            _ => self.steps.iter().map(|(_, t)| t).sum(),
        };
        MigrationRecord {
            failed: match &self.outcome {
                Some(Outcome::Failed { failure, .. }) => Some(failure.kind),
                _ => None,
            },
            steps: self.steps.clone(),
            snapshot_bytes: self.moved.as_ref().map_or(0, |m| m.snapshot_bytes),
            total_ms,
        }
    }

    /// The step's deadline passed without its answer.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_some() || now < self.deadline {
            return;
        }
        let limit = self.deadline - self.step_started;
        let what = match self.step {
            Step::Transfer => format!(
                "the source {} did not answer migrate_out within {} ms; whether it committed is \
                 unknown (see `baton conns`: a connection still on {} was rolled back)",
                self.from,
                limit.as_millis(),
                self.from
            ),
            s => format!(
                "step {} got no answer within {} ms",
                s.as_str(),
                limit.as_millis()
            ),
        };
        self.fail(Failure::new(ErrorKind::Timeout, what), now);
    }

    /// Feeds the answer to an action. Answers that do not belong to the step under way (late, or
    /// after the end) are ignored.
    pub fn handle(&mut self, event: Event, now: Instant) {
        if self.outcome.is_some() {
            return;
        }
        let state = std::mem::replace(&mut self.state, State::Done);
        // Each step's answer: a failure ends the migration, success moves to the next step.
        let next = match (state, event) {
            (
                State::Resolving {
                    source,
                    target,
                    asked_slot: false,
                },
                Event::Info { worker, result },
            ) => result.and_then(|info| self.on_info(source, target, worker, info)),
            (
                State::Resolving {
                    source: Some(s),
                    target: Some(t),
                    asked_slot: true,
                },
                Event::Slot(result),
            ) => result.map(|slot| self.on_slot(s, t, slot, now)),
            (State::Authorizing, Event::Token(result)) => result.map(|t| self.on_token(t, now)),
            // A failure here has been rolled back by the source: the map is untouched.
            (State::Transferring, Event::MigratedOut(result)) => {
                result.map(|done| self.on_committed(done, now))
            }
            (State::Flipping { left }, Event::OverrideSet { cid, result }) => {
                self.on_override(left, cid, result, now)
            }
            (State::Releasing, Event::Released(result)) => {
                if let Err(f) = result {
                    self.release_warning = Some(format!(
                        "release failed (the source forgets the connection by itself later): {}",
                        f.message
                    ));
                }
                self.finish(now);
                Ok(State::Done)
            }
            (state, event) => {
                tracing::debug!(migration_id = %self.id, ?event, "event out of order, ignored");
                Ok(state)
            }
        };
        match next {
            Ok(state) => {
                if self.outcome.is_none() {
                    self.state = state;
                }
            }
            Err(f) => self.fail(f, now),
        }
    }

    /// One worker's `info`: checked, then, once both are in, the target's slot is asked for.
    fn on_info(
        &mut self,
        mut source: Option<Info>,
        mut target: Option<Info>,
        worker: String,
        info: Info,
    ) -> Result<State, Failure> {
        self.check(&worker, &info)?;
        if worker == self.from && source.is_none() {
            source = Some(info);
        } else if worker == self.to && target.is_none() {
            target = Some(info);
        }
        let asked_slot = match (&source, &target) {
            (Some(s), Some(t)) => {
                if s.cid != t.cid {
                    return Err(Failure::new(
                        ErrorKind::Config,
                        format!(
                            "workers {} and {} issue different CIDs ({} and {}): give both the \
                             LB's [cid] layout",
                            self.from, self.to, s.cid, t.cid
                        ),
                    ));
                }
                self.actions.push_back(Action::FindSlot {
                    worker: self.to.clone(),
                    server_id: t.server_id,
                });
                true
            }
            _ => false,
        };
        Ok(State::Resolving {
            source,
            target,
            asked_slot,
        })
    }

    /// Resolved: authorise.
    fn on_slot(&mut self, s: Info, t: Info, slot: u32, now: Instant) -> State {
        self.slot = slot;
        self.actions.push_back(Action::IssueToken {
            migration_id: self.id,
            conn: self.conn,
            source: s.server_id,
            target: t.server_id,
        });
        self.source = Some(s);
        self.target = Some(t);
        self.enter(Step::Authorize, self.opts.step_timeout, now);
        State::Authorizing
    }

    /// Authorised: ask the source to move the connection.
    fn on_token(&mut self, token: HexBytes, now: Instant) -> State {
        let target = self.target.as_ref().expect("resolved");
        let request = MigrateOut {
            conn: self.conn,
            migration_id: self.id,
            token,
            target: TargetRef {
                name: self.to.clone(),
                server_id: target.server_id,
                peer: target.peer,
            },
            timeout_ms: Some(self.opts.quiesce_timeout.as_millis() as u64),
            test_tamper: self.opts.tamper_snapshot,
        };
        let timeout = self.opts.quiesce_timeout + self.opts.transfer_slack;
        self.actions.push_back(Action::MigrateOut {
            worker: self.from.clone(),
            request,
            timeout,
        });
        self.enter(Step::Transfer, timeout, now);
        State::Transferring
    }

    /// Committed: from here on the target owns the connection; flip every CID to it.
    fn on_committed(&mut self, done: MigratedOut, now: Instant) -> State {
        for cid in &done.cids {
            self.actions.push_back(Action::SetOverride {
                cid: *cid,
                slot: self.slot,
            });
        }
        let left = done.cids.clone();
        self.moved = Some(done);
        self.enter(Step::Flip, self.opts.step_timeout, now);
        if left.is_empty() {
            self.release(now)
        } else {
            State::Flipping { left }
        }
    }

    /// One CID flipped (or not: after the commit that is a failure, never a rollback).
    fn on_override(
        &mut self,
        mut left: Vec<Cid>,
        cid: Cid,
        result: Result<(), Failure>,
        now: Instant,
    ) -> Result<State, Failure> {
        if let Err(f) = result {
            return Err(Failure::new(
                ErrorKind::Override,
                format!(
                    "connection moved to {} but the override flip of CID {cid} failed: {}; the \
                     source forwards its datagrams until it gives up (30 s)",
                    self.to, f.message
                ),
            ));
        }
        left.retain(|c| *c != cid);
        Ok(if left.is_empty() {
            self.release(now)
        } else {
            State::Flipping { left }
        })
    }

    /// A worker's info must speak our protocol and issue the LB's CIDs.
    fn check(&self, worker: &str, info: &Info) -> Result<(), Failure> {
        if info.protocol != PROTOCOL_VERSION {
            return Err(Failure::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "worker {worker} speaks control protocol version {}, this baton speaks {}: \
                     run the same Baton version on both",
                    info.protocol, PROTOCOL_VERSION
                ),
            ));
        }
        if let Some(lb) = self.opts.lb_layout
            && lb != info.cid
        {
            return Err(Failure::new(
                ErrorKind::Config,
                format!(
                    "worker {worker} issues {} but the load balancer routes {}: make the worker's \
                     cid_len/server_id_len match the LB's [cid] length/server_id_length",
                    info.cid, lb
                ),
            ));
        }
        Ok(())
    }

    fn enter(&mut self, step: Step, limit: Duration, now: Instant) {
        self.close_step(now);
        self.step = step;
        self.step_started = now;
        self.deadline = now + limit;
    }

    fn close_step(&mut self, now: Instant) {
        self.steps.push((
            self.step,
            ms(now.saturating_duration_since(self.step_started)),
        ));
    }

    fn release(&mut self, now: Instant) -> State {
        self.actions.push_back(Action::Release {
            worker: self.from.clone(),
            migration_id: self.id,
        });
        self.enter(Step::Release, self.opts.step_timeout, now);
        State::Releasing
    }

    fn finish(&mut self, now: Instant) {
        self.close_step(now);
        let done = self.moved.take().expect("transferred");
        self.outcome = Some(Outcome::Moved(Report {
            conn: self.conn,
            from: self.from.clone(),
            to: self.to.clone(),
            migration_id: self.id,
            cids: done.cids.clone(),
            snapshot_bytes: done.snapshot_bytes,
            freeze_ms: done.freeze_ms,
            total_ms: ms(now.saturating_duration_since(self.started)),
            steps: self.steps.clone(),
            release_warning: self.release_warning.take(),
        }));
        self.moved = Some(done);
        self.state = State::Done;
    }

    fn fail(&mut self, failure: Failure, now: Instant) {
        self.close_step(now);
        let committed = matches!(self.step, Step::Flip | Step::Release);
        tracing::debug!(migration_id = %self.id, step = self.step.as_str(), committed, kind = %failure.kind, "migration failed: {}", failure.message);
        self.actions.clear();
        self.outcome = Some(Outcome::Failed {
            failure,
            step: self.step,
            committed,
        });
        self.state = State::Done;
    }
}
