//! The controller side of live migrations, run by the `baton` CLI (`migrate`, `drain`, `conns`):
//! issues the token, asks the source worker to migrate (it sends the sealed snapshot to the target
//! over the peer channel and relays the target's confirmation), THEN flips the LB overrides for
//! every CID of the connection to the target, tells the source to release (forward what it
//! buffered, forget the connection), and removes the overrides once the target reports the old
//! CIDs retired. A failure before the flip has been rolled back by the source; the map is untouched.
//! Contract and files: `docs/MIGRATION-FLOW.md`.
use crate::control::{self, Request};
use crate::controller::{hex, override_key, parse_hex};
use crate::pinned::PinnedMaps;
use anyhow::{Context, Result, bail};
use migration::{
    ConnectionId, MigrationBinding, MigrationId, MigrationToken, MigrationTokenManager,
    TokenConfig, WorkerId,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub const DEFAULT_MIGRATION_CONFIG: &str = "/etc/baton/migration.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// `secrets.toml` (the token secret; see docs/MIGRATION-FLOW.md).
    pub secrets: PathBuf,
    pub workers: Vec<WorkerEndpoint>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEndpoint {
    pub name: String,
    /// The worker's control socket.
    pub control: PathBuf,
}

impl MigrationConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the migration config {} (give --migration-config; see docs/MIGRATION-FLOW.md)",
                path.display()
            )
        })?;
        let c: Self = toml::from_str(&text)
            .with_context(|| format!("migration config {}", path.display()))?;
        if c.workers.is_empty() {
            bail!(
                "{}: list the workers ([[workers]] name, control)",
                path.display()
            );
        }
        Ok(c)
    }
}

#[derive(Deserialize)]
struct RawSecrets {
    token_secret_id: u32,
    token_secret: String,
    #[serde(default)]
    #[allow(dead_code)]
    snapshot_key_id: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    snapshot_key: Option<String>,
}

fn token_manager(path: &Path) -> Result<MigrationTokenManager> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the secrets file {}", path.display()))?;
    // No `{e}`: a TOML error can quote the line, i.e. the secret.
    let raw: RawSecrets = toml::from_str(&text).map_err(|_| {
        anyhow::anyhow!(
            "{}: needs token_secret_id and token_secret (hex)",
            path.display()
        )
    })?;
    let bytes = parse_hex(&raw.token_secret)
        .with_context(|| format!("{}: token_secret is not hex", path.display()))?;
    let secret = migration::TokenSecret::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let config = TokenConfig {
        max_requests_per_second: 100_000,
        ..TokenConfig::default()
    };
    MigrationTokenManager::new(config, raw.token_secret_id, secret)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A failed migration: the error kind (migration crate's `ErrorKind` names, plus `override`) and why.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub kind: String,
    pub error: String,
    /// Nobody listens on the worker's control socket (no file, or connecting is refused): the
    /// worker process is not running, so it holds no connections. A worker that is running but
    /// does not answer in time is not this: its connections exist and are unaccounted for.
    #[serde(skip)]
    pub not_running: bool,
}

impl Failure {
    fn new(kind: &str, error: impl std::fmt::Display) -> Self {
        Self {
            kind: kind.into(),
            error: error.to_string(),
            not_running: false,
        }
    }
}

/// How long a short request on a worker's control socket (`info`, `conns`, `release`) may take:
/// connecting, writing the request and reading the whole answer, end to end. A worker whose loop
/// is stalled answers late or not at all; that worker is then reported, never taken as empty.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// A `migrate_out` may take the quiesce timeout it is given plus this (snapshot, transfer to the
/// target, its import).
pub const MIGRATE_SLACK: Duration = Duration::from_secs(10);

/// One call on a worker's control socket, all of it (connect, write, read) within `timeout`.
/// Outer error: the worker cannot be reached or did not answer in time (`target_unavailable`).
fn call(path: &Path, req: &Value, timeout: Duration) -> std::result::Result<Value, Failure> {
    let unavailable = |e: &dyn std::fmt::Display| {
        Failure::new(
            "target_unavailable",
            format!("worker control socket {}: {e}", path.display()),
        )
    };
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| unavailable(&format!("no answer within {} ms", timeout.as_millis())))
    };
    let s = connect(path, timeout).map_err(|e| Failure {
        not_running: matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ),
        ..unavailable(&e)
    })?;
    s.set_write_timeout(Some(left()?))
        .map_err(|e| unavailable(&e))?;
    let mut line = serde_json::to_vec(req).expect("serializable");
    line.push(b'\n');
    (&s).write_all(&line).map_err(|e| unavailable(&e))?;
    // Read until the newline, re-arming the read timeout with what is left of the deadline (a
    // per-read timeout alone would let a slowly trickling answer run on forever).
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        s.set_read_timeout(Some(left()?))
            .map_err(|e| unavailable(&e))?;
        match (&s).read(&mut buf) {
            Ok(0) => return Err(unavailable(&"closed without answering")),
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if buf[..n].contains(&b'\n') {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(unavailable(&format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                )));
            }
            Err(e) => return Err(unavailable(&e)),
        }
    }
    let v: Value = serde_json::from_slice(&answer)
        .map_err(|e| unavailable(&format!("unreadable answer ({e})")))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["data"].clone())
    } else {
        Err(Failure::new(
            v["kind"].as_str().unwrap_or("output"),
            v["error"].as_str().unwrap_or("refused"),
        ))
    }
}

/// Connects within `timeout`. A Unix-socket connect blocks while the listener's backlog is full
/// (a worker that stopped accepting), so it runs on a helper thread that is left behind on timeout.
fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(p));
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect did not complete within {} ms", timeout.as_millis()),
        ))
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnRow {
    pub conn: String,
    pub worker: String,
    pub server_id: u32,
    pub id: u64,
    pub remote: String,
    pub state: String,
    pub cids: Vec<String>,
    /// How many of its CIDs the LB still routes by exact-CID override (a recent migration whose
    /// old CIDs are not retired yet); filled by [`Orchestrator::conns`].
    pub overrides: usize,
}

#[derive(Clone, Debug)]
struct WorkerInfo {
    server_id: u32,
    peer: String,
}

/// Test hooks for the fault tests (hidden CLI flags).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Flip a bit of the token's MAC.
    pub forge_token: bool,
    /// Issue tokens that expired this long ago.
    pub expire_token: Option<Duration>,
    /// Ask the source to corrupt the sealed snapshot it sends.
    pub tamper_snapshot: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub conn: String,
    pub from: String,
    pub to: String,
    pub migration_id: String,
    pub cids: Vec<String>,
    pub snapshot_bytes: u64,
    pub freeze_ms: f64,
    pub total_ms: f64,
}

pub struct Orchestrator {
    cfg: MigrationConfig,
    tokens: Mutex<MigrationTokenManager>,
    lb_socket: PathBuf,
    pin_dir: PathBuf,
    /// Worker name -> slot in BATON_WORKERS, from the running baton-lb (None: no daemon).
    slots: Option<HashMap<String, u32>>,
    maps: Mutex<Option<PinnedMaps>>,
    /// Workers' `info` (server ID, peer address), asked once per worker: they are fixed by the
    /// worker's config, and a drain would otherwise ask twice per connection.
    infos: Mutex<HashMap<String, WorkerInfo>>,
    pub faults: Faults,
    pub quiesce_timeout: Duration,
    /// Limit of short control-socket requests ([`CONTROL_TIMEOUT`] by default).
    pub control_timeout: Duration,
}

impl Orchestrator {
    pub fn new(cfg: MigrationConfig, lb_socket: &Path, pin_dir: &Path) -> Result<Self> {
        let tokens = token_manager(&cfg.secrets)?;
        let slots = control::request(lb_socket, &Request::Workers)?.map(|v| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|w| {
                            Some((w["name"].as_str()?.to_string(), w["index"].as_u64()? as u32))
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        Ok(Self {
            cfg,
            tokens: Mutex::new(tokens),
            lb_socket: lb_socket.into(),
            pin_dir: pin_dir.into(),
            slots,
            maps: Mutex::new(None),
            infos: Mutex::new(HashMap::new()),
            faults: Faults::default(),
            quiesce_timeout: Duration::from_secs(2),
            control_timeout: CONTROL_TIMEOUT,
        })
    }

    fn endpoint(&self, name: &str) -> Result<&WorkerEndpoint, Failure> {
        self.cfg
            .workers
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.cfg.workers.iter().map(|w| w.name.as_str()).collect();
                Failure::new(
                    "config",
                    format!(
                        "no worker {name:?} in the migration config (known: {})",
                        known.join(", ")
                    ),
                )
            })
    }

    fn info(&self, name: &str) -> Result<WorkerInfo, Failure> {
        if let Some(i) = self.infos.lock().unwrap().get(name) {
            return Ok(i.clone());
        }
        let v = call(
            &self.endpoint(name)?.control,
            &json!({"cmd": "info"}),
            self.control_timeout,
        )?;
        let info = WorkerInfo {
            server_id: v["server_id"].as_u64().unwrap_or(0) as u32,
            peer: v["peer"].as_str().unwrap_or_default().to_string(),
        };
        self.infos
            .lock()
            .unwrap()
            .insert(name.to_string(), info.clone());
        Ok(info)
    }

    pub fn worker_names(&self) -> Vec<String> {
        self.cfg.workers.iter().map(|w| w.name.clone()).collect()
    }

    /// Connections of one worker.
    pub fn conns_of(&self, name: &str) -> Result<Vec<ConnRow>, Failure> {
        let ep = self.endpoint(name)?;
        let info = self.info(name)?;
        let v = call(&ep.control, &json!({"cmd": "conns"}), self.control_timeout)?;
        // Anything but a list is an error, never "no connections".
        let list = v.as_array().ok_or_else(|| {
            Failure::new(
                "output",
                format!("worker {name} answered `conns` with something that is not a list"),
            )
        })?;
        Ok(list
            .iter()
            .map(|c| ConnRow {
                conn: c["conn"].as_str().unwrap_or_default().into(),
                worker: name.into(),
                server_id: info.server_id,
                id: c["id"].as_u64().unwrap_or(0),
                remote: c["remote"].as_str().unwrap_or_default().into(),
                state: if c["frozen"].as_bool() == Some(true) {
                    "migrating"
                } else {
                    "live"
                }
                .into(),
                cids: c["cids"]
                    .as_array()
                    .map(|x| {
                        x.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                overrides: 0,
            })
            .collect())
    }

    /// Connections of every worker; unreachable workers are reported in the second list.
    pub fn conns(&self) -> (Vec<ConnRow>, Vec<(String, Failure)>) {
        let mut rows = Vec::new();
        let mut down = Vec::new();
        for w in &self.cfg.workers {
            match self.conns_of(&w.name) {
                Ok(r) => rows.extend(r),
                Err(f) => down.push((w.name.clone(), f)),
            }
        }
        let overridden: HashSet<String> = PinnedMaps::open(&self.pin_dir)
            .and_then(|m| m.overrides())
            .map(|l| l.iter().map(|(k, _)| hex(k.as_slice())).collect())
            .unwrap_or_default();
        for r in &mut rows {
            r.overrides = r.cids.iter().filter(|c| overridden.contains(*c)).count();
        }
        (rows, down)
    }

    fn slot_of(&self, name: &str, server_id: u32) -> Result<u32, Failure> {
        if let Some(slot) = self.slots.as_ref().and_then(|s| s.get(name)) {
            return Ok(*slot);
        }
        let mut maps = self.maps.lock().unwrap();
        let maps = self.open_maps(&mut maps)?;
        maps.server_ids
            .get(
                &lb_common::ServerIdKey {
                    server_id: server_id as u64,
                },
                0,
            )
            .map(|w| w.worker)
            .map_err(|_| {
                Failure::new(
                    "config",
                    format!(
                        "the load balancer knows no worker with server ID {server_id} ({name})"
                    ),
                )
            })
    }

    fn open_maps<'a>(&self, m: &'a mut Option<PinnedMaps>) -> Result<&'a mut PinnedMaps, Failure> {
        if m.is_none() {
            *m = Some(
                PinnedMaps::open(&self.pin_dir)
                    .map_err(|e| Failure::new("override", format!("{e:#}")))?,
            );
        }
        Ok(m.as_mut().unwrap())
    }

    /// Through the running baton-lb (serialised with its own writes), else the pinned maps directly;
    /// both end in `PinnedMaps::set_override`, which keeps the fast path's counts.
    fn set_override(&self, cid: &[u8], slot: u32) -> Result<(), Failure> {
        let fail = |e: anyhow::Error| Failure::new("override", format!("{e:#}"));
        if self.slots.is_some() {
            control::request(
                &self.lb_socket,
                &Request::OverrideSet {
                    cid: hex(cid),
                    worker: slot,
                },
            )
            .map_err(fail)?;
            return Ok(());
        }
        let mut maps = self.maps.lock().unwrap();
        let maps = self.open_maps(&mut maps)?;
        let len = maps.lb_config().map_err(fail)?.cid_len as usize;
        maps.set_override(override_key(cid, len).map_err(fail)?, slot)
            .map_err(fail)
    }

    fn remove_override(&self, cid: &[u8]) -> Result<(), Failure> {
        let fail = |e: anyhow::Error| Failure::new("override", format!("{e:#}"));
        if self.slots.is_some() {
            control::request(&self.lb_socket, &Request::OverrideDel { cid: hex(cid) })
                .map_err(fail)?;
            return Ok(());
        }
        let mut maps = self.maps.lock().unwrap();
        let maps = self.open_maps(&mut maps)?;
        let key =
            lb_common::CidKey::new(cid).ok_or_else(|| Failure::new("override", "CID too long"))?;
        maps.remove_override(&key).map(|_| ()).map_err(fail)
    }

    /// Finds which worker holds `conn`.
    pub fn locate(&self, conn: &str) -> Result<String, Failure> {
        let (rows, down) = self.conns();
        rows.into_iter().find(|r| r.conn == conn).map(|r| r.worker).ok_or_else(|| {
            let silent: Vec<&str> = down.iter().filter(|(_, f)| !f.not_running).map(|(w, _)| w.as_str()).collect();
            if silent.is_empty() {
                Failure::new("unknown_connection", format!("no worker holds connection {conn} (see `baton conns`)"))
            } else {
                Failure::new(
                    "unknown_connection",
                    format!(
                        "no worker that answered holds connection {conn}; {} did not answer and may hold it",
                        silent.join(", ")
                    ),
                )
            }
        })
    }

    /// Moves one connection; on success the overrides point at the target and the source is
    /// released. The caller removes the overrides later with [`Self::retire`].
    pub fn migrate(&self, conn: &str, from: &str, to: &str) -> Result<Report, Failure> {
        if from == to {
            return Err(Failure::new(
                "config",
                format!("connection {conn} is already on {to}"),
            ));
        }
        let started = Instant::now();
        let src = self.endpoint(from)?.clone();
        let (src_info, dst_info) = (self.info(from)?, self.info(to)?);
        let key = parse_hex(conn).ok_or_else(|| {
            Failure::new("config", format!("{conn:?} is not a hex connection key"))
        })?;
        let migration_id = MigrationId::random();
        let binding = MigrationBinding {
            migration_id,
            connection_id: ConnectionId::new(&key)
                .map_err(|e| Failure::new(e.kind().as_str(), e))?,
            source: WorkerId(src_info.server_id),
            target: WorkerId(dst_info.server_id),
        };
        let slot = self.slot_of(to, dst_info.server_id)?;
        let token = {
            let mut tokens = self.tokens.lock().unwrap();
            let now = match self.faults.expire_token {
                // Issued so long ago that it has already expired.
                Some(age) => SystemTime::now() - age - Duration::from_secs(1),
                None => SystemTime::now(),
            };
            tokens
                .issue(&binding, now)
                .map_err(|e| Failure::new(e.kind().as_str(), e))?
        };
        let mut token = token.as_bytes().to_vec();
        if self.faults.forge_token {
            *token.last_mut().unwrap() ^= 1;
        }
        let token = MigrationToken::from_bytes(token);
        let req = json!({
            "cmd": "migrate_out",
            "conn": conn,
            "migration_id": migration_id.to_string(),
            "token": hex(token.as_bytes()),
            "target": {"name": to, "server_id": dst_info.server_id, "peer": dst_info.peer},
            "timeout_ms": self.quiesce_timeout.as_millis() as u64,
            "test_tamper": self.faults.tamper_snapshot,
        });
        let done = call(&src.control, &req, self.quiesce_timeout + MIGRATE_SLACK)?;
        // The target confirmed: only now does the data plane move.
        let cids: Vec<String> = done["cids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for c in &cids {
            let cid = parse_hex(c)
                .ok_or_else(|| Failure::new("output", "the source sent a non-hex CID"))?;
            if let Err(f) = self.set_override(&cid, slot) {
                // The target already serves the connection; the source keeps forwarding for a while.
                return Err(Failure::new(
                    "override",
                    format!("connection moved but the override flip failed: {}", f.error),
                ));
            }
        }
        if let Err(f) = call(
            &src.control,
            &json!({"cmd": "release", "migration_id": migration_id.to_string()}),
            self.control_timeout,
        ) {
            tracing::warn!(
                conn,
                from,
                "release failed (the source forgets the connection by itself later): {}",
                f.error
            );
        }
        Ok(Report {
            conn: conn.into(),
            from: from.into(),
            to: to.into(),
            migration_id: migration_id.to_string(),
            cids,
            snapshot_bytes: done["snapshot_bytes"].as_u64().unwrap_or(0),
            freeze_ms: done["freeze_ms"].as_f64().unwrap_or(0.0),
            total_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Removes the overrides of migrated connections once their target no longer lists the old
    /// CIDs (the client retired them), waiting up to `timeout`. Returns the CIDs still overridden
    /// (still in use: removing them would strand the client).
    pub fn retire(&self, moved: &[Report], timeout: Duration) -> Vec<String> {
        let mut pending: BTreeMap<String, Vec<(String, HashSet<String>)>> = BTreeMap::new();
        for r in moved {
            pending
                .entry(r.to.clone())
                .or_default()
                .push((r.conn.clone(), r.cids.iter().cloned().collect()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            for (worker, list) in pending.iter_mut() {
                let Ok(rows) = self.conns_of(worker) else {
                    continue;
                };
                let live: HashMap<&str, HashSet<&str>> = rows
                    .iter()
                    .map(|r| (r.conn.as_str(), r.cids.iter().map(String::as_str).collect()))
                    .collect();
                for (conn, old) in list.iter_mut() {
                    let in_use = live.get(conn.as_str());
                    old.retain(|cid| {
                        if in_use.is_some_and(|l| l.contains(cid.as_str())) {
                            return true;
                        }
                        match parse_hex(cid).map(|c| self.remove_override(&c)) {
                            Some(Err(f)) => {
                                tracing::warn!(cid, "could not remove the override: {}", f.error);
                                true
                            }
                            _ => false,
                        }
                    });
                }
                list.retain(|(_, old)| !old.is_empty());
            }
            pending.retain(|_, l| !l.is_empty());
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        pending
            .into_values()
            .flatten()
            .flat_map(|(_, c)| c)
            .collect()
    }
}

/// Called after each migration of a drain: (done, total, outcome).
pub type Progress<'a> = &'a (dyn Fn(usize, usize, &Result<Report, Failure>) + Sync);

/// Summary of a drain.
#[derive(Debug, Serialize)]
pub struct DrainSummary {
    pub worker: String,
    pub total: usize,
    pub moved: usize,
    pub failed: usize,
    /// Until the last migration finished (what the drain rate is measured on).
    pub moved_ms: f64,
    /// Including the wait for the clients to retire the old CIDs (override removal).
    pub total_ms: f64,
    /// Per migration, as the CLI saw it (token to release): median and 99th percentile.
    pub migration_ms_p50: f64,
    pub migration_ms_p99: f64,
    /// Per migration, how long the source waited for the frozen connection to quiesce.
    pub freeze_ms_p50: f64,
    pub freeze_ms_p99: f64,
    pub errors: BTreeMap<String, usize>,
    pub overrides_left: usize,
}

/// The `p`-th percentile (0..=100) of `v`, nearest rank; 0 when empty.
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Moves every connection off `worker` (to `to`, or spread over the other workers), at most
/// `concurrency` at a time; `progress` is called after each migration.
pub fn drain(
    o: &Orchestrator,
    worker: &str,
    to: Option<&str>,
    concurrency: usize,
    progress: Progress<'_>,
) -> Result<DrainSummary> {
    let started = Instant::now();
    let conns = o.conns_of(worker).map_err(|f| {
        anyhow::anyhow!(
            "cannot list the connections of worker {worker} ({}): {}",
            f.kind,
            f.error
        )
    })?;
    let targets: Vec<String> = match to {
        Some(t) => vec![t.to_string()],
        None => o
            .worker_names()
            .into_iter()
            .filter(|w| w != worker)
            .collect(),
    };
    if targets.is_empty() {
        bail!("no other worker to drain {worker} to");
    }
    let total = conns.len();
    let queue = Mutex::new(conns.into_iter().enumerate().collect::<Vec<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1).min(total.max(1)) {
            s.spawn(|| {
                loop {
                    let Some((i, c)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let r = o.migrate(&c.conn, worker, &targets[i % targets.len()]);
                    let mut res = results.lock().unwrap();
                    res.push(r.clone());
                    progress(res.len(), total, &r);
                }
            });
        }
    });
    let moved_ms = started.elapsed().as_secs_f64() * 1000.0;
    let results = results.into_inner().unwrap();
    let moved: Vec<Report> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    let mut errors = BTreeMap::new();
    for f in results.iter().filter_map(|r| r.as_ref().err()) {
        *errors.entry(f.kind.clone()).or_default() += 1;
    }
    let left = o.retire(&moved, Duration::from_secs(10));
    Ok(DrainSummary {
        worker: worker.into(),
        total,
        moved: moved.len(),
        failed: total - moved.len(),
        moved_ms,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        migration_ms_p50: percentile(moved.iter().map(|r| r.total_ms).collect(), 50.0),
        migration_ms_p99: percentile(moved.iter().map(|r| r.total_ms).collect(), 99.0),
        freeze_ms_p50: percentile(moved.iter().map(|r| r.freeze_ms).collect(), 50.0),
        freeze_ms_p99: percentile(moved.iter().map(|r| r.freeze_ms).collect(), 99.0),
        errors,
        overrides_left: left.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake worker control socket: `answer(request line)` gives the answer line, or `None` to
    /// keep the connection open without answering (a stalled worker).
    fn fake_worker(path: &Path, answer: fn(&str) -> Option<String>) {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    use std::io::BufRead;
                    let mut line = String::new();
                    let _ = std::io::BufReader::new(&s).read_line(&mut line);
                    match answer(&line) {
                        Some(a) => {
                            let _ = s.write_all(format!("{a}\n").as_bytes());
                        }
                        None => std::thread::sleep(Duration::from_secs(30)),
                    }
                });
            }
        });
    }

    fn info_then(conns: &'static str) -> impl Fn(&str) -> Option<String> {
        move |req: &str| {
            Some(if req.contains("\"info\"") {
                r#"{"ok":true,"data":{"name":"w","server_id":1,"peer":"127.0.0.1:1"}}"#.to_string()
            } else {
                conns.to_string()
            })
        }
    }

    /// A worker that is gone, stalls, or answers `conns` with something other than a list is
    /// reported by name, never listed as a worker with no connections; the others still list.
    #[test]
    fn conns_reports_workers_that_do_not_answer_instead_of_listing_them_empty() {
        let dir = std::env::temp_dir().join(format!("baton-conns-down-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("secrets.toml"),
            format!(
                "token_secret_id = 1\ntoken_secret = \"{}\"\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        fake_worker(&dir.join("ok.sock"), |r| {
            info_then(
                r#"{"ok":true,"data":[{"conn":"00aa","id":3,"remote":"10.0.0.1:5000","frozen":false,"cids":["0100"]}]}"#,
            )(r)
        });
        fake_worker(&dir.join("stuck.sock"), |r| {
            if r.contains("\"info\"") {
                info_then("")(r)
            } else {
                None
            }
        });
        fake_worker(&dir.join("bad.sock"), |r| {
            info_then(r#"{"ok":true,"data":null}"#)(r)
        });
        let workers = ["ok", "gone", "stuck", "bad"]
            .iter()
            .map(|n| WorkerEndpoint {
                name: n.to_string(),
                control: dir.join(format!("{n}.sock")),
            })
            .collect();
        let cfg = MigrationConfig {
            secrets: dir.join("secrets.toml"),
            workers,
        };
        let mut o = Orchestrator::new(cfg, &dir.join("no-lb.sock"), &dir.join("no-pins")).unwrap();
        o.control_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let (rows, down) = o.conns();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the stalled worker was not timed out"
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].worker.as_str(), rows[0].conn.as_str()),
            ("ok", "00aa")
        );
        let names: Vec<&str> = down.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(names, ["gone", "stuck", "bad"]);
        let not_running: Vec<bool> = down.iter().map(|(_, f)| f.not_running).collect();
        assert_eq!(
            not_running,
            [true, false, false],
            "only the gone worker is known not to run"
        );
        assert!(
            down[1].1.error.contains("no answer within 300 ms"),
            "{:?}",
            down[1].1
        );
        assert_eq!(down[1].1.kind, "target_unavailable");
        assert!(down[2].1.error.contains("not a list"), "{:?}", down[2].1);
        let e = drain(&o, "stuck", Some("ok"), 1, &|_, _, _| {}).unwrap_err();
        assert!(format!("{e:#}").contains("worker stuck"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_and_secrets_errors_say_what_to_fix_without_quoting_secrets() {
        let dir = std::env::temp_dir().join(format!("baton-migcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("migration.toml");
        std::fs::write(
            &cfg,
            "secrets = \"s.toml\"\n[[workers]]\nname = \"w1\"\ncontrol = \"/run/w1.sock\"\n",
        )
        .unwrap();
        assert_eq!(MigrationConfig::load(&cfg).unwrap().workers[0].name, "w1");
        std::fs::write(&cfg, "secrets = \"s.toml\"\nworkers = []\n").unwrap();
        assert!(
            format!("{:#}", MigrationConfig::load(&cfg).unwrap_err()).contains("list the workers")
        );
        let secrets = dir.join("secrets.toml");
        std::fs::write(
            &secrets,
            "token_secret_id = 1\ntoken_secret = \"c0ffee-not-hex-SECRETVALUE\"\n",
        )
        .unwrap();
        let e = format!("{:#}", token_manager(&secrets).err().unwrap());
        assert!(e.contains("not hex") && !e.contains("SECRETVALUE"), "{e}");
        std::fs::write(
            &secrets,
            "token_secret_id = 1\ntoken_secret = SECRETVALUE\n",
        )
        .unwrap();
        let e = format!("{:#}", token_manager(&secrets).err().unwrap());
        assert!(
            e.contains("token_secret") && !e.contains("SECRETVALUE"),
            "{e}"
        );
        std::fs::write(
            &secrets,
            format!(
                "token_secret_id = 1\ntoken_secret = \"{}\"\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        token_manager(&secrets).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
