//! The driver of live migrations, run by the `baton` CLI (`migrate`, `drain`, `conns`): it carries
//! out what `baton_orchestrator::Migration` (the model of one migration: resolve, authorize,
//! transfer, flip, release) asks for, with blocking I/O: the workers' control API (Unix socket or
//! mutual TLS, `baton_protocol::worker` messages), the token issuer, the LB's override map (through
//! the running baton-lb, else the pinned maps). It also retires the overrides once the targets
//! report the old CIDs unused, and reports every finished migration to baton-lb's `/metrics`.
//! Contract and files: `docs/MIGRATION-FLOW.md`.
use crate::cluster::{ClusterClient, ClusterLink};
use anyhow::{Context, Result, bail};
pub use baton_orchestrator::Report;
use baton_orchestrator::{Action, Event, Migration, Options, Outcome};
pub use baton_protocol::Failure;
use baton_protocol::worker::{self as api, CONTROL_ALPN, CidLayout, Info};
use baton_protocol::{Cid, ErrorKind, HexBytes, MigrationId};
use lb_common::percentile;
use lb_user::control::{self, Reply, Request};
use lb_user::overrides::OverrideWriter;
use lb_user::pinned::PinnedMaps;
use migration::{ConnectionId, MigrationBinding, MigrationTokenManager, TokenConfig, WorkerId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub const DEFAULT_MIGRATION_CONFIG: &str = "/etc/baton/migration.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// The controller's secrets file: the token secret, and no snapshot key
    /// (`controller-secrets.toml` from `baton-worker gen-certs`; docs/DEPLOYMENT.md).
    pub secrets: PathBuf,
    /// The controller's side of the workers' control API over mutual TLS; needed when a worker
    /// is reached through `control_tls`.
    #[serde(default)]
    pub control_tls: Option<ControlTlsClient>,
    /// The workers this host reaches. With `[cluster]`, the registered workers whose control API
    /// listens on the network are added (through `[control_tls]`); list one here to reach it
    /// otherwise (e.g. its Unix socket).
    #[serde(default)]
    pub workers: Vec<WorkerEndpoint>,
    /// The cluster (etcd) the LB nodes follow: the flip is written there, and the workers are
    /// found there.
    #[serde(default)]
    pub cluster: Option<ClusterClient>,
}

/// `[control_tls]` of the migration config: what the controller trusts and presents.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlTlsClient {
    /// CA certificate(s) that sign the workers' control certificates.
    pub ca: PathBuf,
    /// The controller's client certificate chain and key (`baton-worker gen-certs` writes
    /// `controller.pem`/`controller.key`, name `baton-controller`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One worker: its control API on this host (`control`, a Unix socket) or over the network
/// (`control_tls`, TCP with mutual TLS).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEndpoint {
    pub name: String,
    /// The worker's control socket.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// The worker's `[control_tls] listen` address, `host:port`.
    #[serde(default)]
    pub control_tls: Option<String>,
    /// The name the worker's TLS certificate must carry (default: the worker's name).
    #[serde(default)]
    pub server_name: Option<String>,
}

impl MigrationConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the migration config {} (give --migration-config; see docs/MIGRATION-FLOW.md)",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("migration config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text)?;
        if c.workers.is_empty() && c.cluster.is_none() {
            bail!(
                "list the workers ([[workers]] name, control or control_tls), or give the \
                 [cluster] (etcd endpoints, prefix) where they register"
            );
        }
        for w in &c.workers {
            let name = &w.name;
            match (&w.control, &w.control_tls) {
                (Some(_), Some(_)) => bail!(
                    "worker {name}: give either control (a Unix socket) or control_tls (host:port), not both"
                ),
                (None, None) => bail!(
                    "worker {name}: give control (its Unix socket) or control_tls (host:port of its [control_tls] listener)"
                ),
                (Some(_), None) if w.server_name.is_some() => {
                    bail!("worker {name}: server_name only applies with control_tls")
                }
                (Some(_), None) => {}
                (None, Some(addr)) => {
                    let port = addr.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
                    if !matches!(port, Some((h, Ok(p))) if !h.is_empty() && p != 0) {
                        bail!("worker {name}: control_tls = {addr:?} is not host:port");
                    }
                    let sn = w.server_name.as_deref().unwrap_or(name);
                    if rustls::pki_types::ServerName::try_from(sn).is_err() {
                        bail!(
                            "worker {name}: {sn:?} is not usable as a TLS server name (set server_name)"
                        );
                    }
                    if c.control_tls.is_none() {
                        bail!(
                            "worker {name} uses control_tls, so a [control_tls] table (ca, cert, key) is needed"
                        );
                    }
                }
            }
        }
        Ok(c)
    }
}

/// The client TLS configuration for `[control_tls]`: TLS 1.3, the workers' CA, our certificate.
fn control_tls_config(c: &ControlTlsClient) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&c.ca)
        .with_context(|| format!("control_tls.ca: cannot read {}", c.ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("control_tls.ca: {}", c.ca.display()))?)
            .with_context(|| format!("control_tls.ca: {}", c.ca.display()))?;
    }
    if roots.is_empty() {
        bail!("control_tls.ca: {} holds no certificate", c.ca.display());
    }
    let certs = CertificateDer::pem_file_iter(&c.cert)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .with_context(|| format!("control_tls.cert: cannot read {}", c.cert.display()))?;
    if certs.is_empty() {
        bail!(
            "control_tls.cert: {} holds no certificate",
            c.cert.display()
        );
    }
    // Refused unless 0600 and ours (migration::secret_file); no `{e}` detail from the key itself.
    let pem = migration::secret_file::read(&c.key)
        .map_err(|e| anyhow::anyhow!("control_tls.key: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        anyhow::anyhow!(
            "control_tls.key: cannot read a private key from {}",
            c.key.display()
        )
    })?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .context("control_tls: the certificate and key do not match")?;
    config.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    Ok(std::sync::Arc::new(config))
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
    // Refused unless 0600 and ours (or root's): see migration::secret_file.
    let text = migration::secret_file::read_to_string(path).context("the secrets file")?;
    // No `{e}`: a TOML error can quote the line, i.e. the secret.
    let raw: RawSecrets = toml::from_str(&text).map_err(|_| {
        anyhow::anyhow!(
            "{}: needs token_secret_id and token_secret (hex)",
            path.display()
        )
    })?;
    let bytes = baton_protocol::hex::decode(&raw.token_secret)
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

/// A worker that could not be asked: why, and whether it is running at all. Nobody listening on
/// its control socket (no file, or connecting is refused) means the worker process is not
/// running, so it holds no connections; a worker that is running but does not answer in time is
/// not that: its connections exist and are unaccounted for.
#[derive(Debug, Clone)]
pub struct Unanswered {
    pub failure: Failure,
    pub not_running: bool,
}

impl From<Failure> for Unanswered {
    fn from(failure: Failure) -> Self {
        Self {
            failure,
            not_running: false,
        }
    }
}

impl From<Unanswered> for Failure {
    fn from(u: Unanswered) -> Self {
        u.failure
    }
}

/// How long a short request on a worker's control socket (`info`, `conns`, `release`) may take:
/// connecting, writing the request and reading the whole answer, end to end. A worker whose loop
/// is stalled answers late or not at all; that worker is then reported, never taken as empty.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// A `migrate_out` may take the quiesce timeout it is given plus this (snapshot, transfer to the
/// target, its import).
pub const MIGRATE_SLACK: Duration = Duration::from_secs(10);

/// Where a worker's control API is reached.
enum Target<'a> {
    Unix(&'a Path),
    Tls {
        addr: &'a str,
        server_name: rustls::pki_types::ServerName<'static>,
        config: std::sync::Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "worker control socket {}", path.display()),
            Target::Tls { addr, .. } => write!(f, "worker control_tls {addr}"),
        }
    }
}

/// A connected control channel: the Unix socket, or TLS over TCP.
enum Channel {
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Channel {
    /// Read and write timeout of the underlying socket.
    fn set_timeout(&self, d: Duration) -> std::io::Result<()> {
        match self {
            Channel::Unix(s) => {
                s.set_read_timeout(Some(d))?;
                s.set_write_timeout(Some(d))
            }
            Channel::Tls(s) => {
                s.sock.set_read_timeout(Some(d))?;
                s.sock.set_write_timeout(Some(d))
            }
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Channel::Unix(s) => s.read(buf),
            Channel::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Channel::Unix(s) => s.write(buf),
            Channel::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Channel::Unix(s) => s.flush(),
            Channel::Tls(s) => s.flush(),
        }
    }
}

/// An I/O error as something to act on: TLS failures say which side refused what and what to
/// check. `Some(kind)` when it is a configuration problem (certificates) rather than reachability.
fn explain(e: &std::io::Error, target: &Target<'_>) -> (String, Option<ErrorKind>) {
    use rustls::{AlertDescription as A, CertificateError as C};
    let server_name = match target {
        Target::Tls { server_name, .. } => server_name.to_str().into_owned(),
        Target::Unix(_) => String::new(),
    };
    let refused_us = "the worker refused our client certificate: control_tls.cert must be signed \
                      by the CA in the worker's control_tls.ca and carry a name listed in its \
                      control_tls.clients (the worker logs why)";
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::ConnectionRefused if matches!(target, Target::Tls { .. }) => (
                "connection refused: nothing listens there (is the worker running, with \
                 [control_tls] listen on this address?)"
                    .into(),
                None,
            ),
            _ => (e.to_string(), None),
        };
    };
    let text = match tls {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the worker's certificate is not signed by our control_tls.ca (wrong CA?): {tls}"
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => {
            format!(
                "the worker's certificate is not valid for the name {server_name:?} \
                 (set server_name to the name in its certificate): {tls}"
            )
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the worker's certificate was refused: {tls}")
        }
        rustls::Error::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied
            | A::DecryptError,
        ) => format!("{refused_us} ({tls})"),
        rustls::Error::AlertReceived(A::NoApplicationProtocol | A::ProtocolVersion) => format!(
            "the TLS endpoint is not a baton-worker control API (TLS 1.3, ALPN baton-control/1): {tls}"
        ),
        _ => format!("TLS: {tls}"),
    };
    (text, Some(ErrorKind::Config))
}

/// TLS handshakes this process has in progress with one worker at most. A worker takes only a
/// few pending handshakes from one address (`MAX_PENDING_PER_SOURCE` there, 8) and resets the
/// rest, so a drain's many migrations at once must not open all their channels together.
const HANDSHAKES_PER_WORKER: usize = 4;

/// A place among the [`HANDSHAKES_PER_WORKER`] handshakes to one address, freed on drop.
struct HandshakeGate {
    addr: String,
}

static HANDSHAKES: (Mutex<Option<HashMap<String, usize>>>, std::sync::Condvar) =
    (Mutex::new(None), std::sync::Condvar::new());

impl HandshakeGate {
    /// Waits (at most `limit`) for a place.
    fn enter(addr: &str, limit: Duration) -> std::io::Result<HandshakeGate> {
        let deadline = Instant::now() + limit;
        let mut map = HANDSHAKES.0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let n = map
                .get_or_insert_with(HashMap::new)
                .entry(addr.to_string())
                .or_default();
            if *n < HANDSHAKES_PER_WORKER {
                *n += 1;
                return Ok(HandshakeGate {
                    addr: addr.to_string(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {} ms (waiting to open a channel)",
                        limit.as_millis()
                    ),
                ));
            }
            map = HANDSHAKES
                .1
                .wait_timeout(map, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for HandshakeGate {
    fn drop(&mut self) {
        let mut map = HANDSHAKES.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.as_mut().and_then(|m| m.get_mut(&self.addr)) {
            *n -= 1;
        }
        HANDSHAKES.1.notify_all();
    }
}

/// Connects within `timeout` and, for TLS, completes the handshake within it too.
fn open(target: &Target<'_>, timeout: Duration) -> std::io::Result<Channel> {
    match target {
        Target::Unix(path) => connect(path, timeout).map(Channel::Unix),
        Target::Tls {
            addr,
            server_name,
            config,
        } => {
            let deadline = Instant::now() + timeout;
            let left = || {
                deadline
                    .checked_duration_since(Instant::now())
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {} ms", timeout.as_millis()),
                        )
                    })
            };
            // From the connect (the worker counts a handshake from its accept) to the handshake's end.
            let gate = HandshakeGate::enter(addr, left()?)?;
            let mut last = None;
            let mut sock = None;
            for a in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, left()?) {
                    Ok(s) => {
                        sock = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let mut sock = sock.ok_or_else(|| {
                last.unwrap_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{addr} resolves to no address"),
                    )
                })
            })?;
            let _ = sock.set_nodelay(true);
            let mut tls = rustls::ClientConnection::new(config.clone(), server_name.clone())
                .map_err(std::io::Error::other)?;
            while tls.is_handshaking() {
                let d = left()?;
                sock.set_read_timeout(Some(d))?;
                sock.set_write_timeout(Some(d))?;
                tls.complete_io(&mut sock)?;
            }
            drop(gate);
            Ok(Channel::Tls(Box::new(rustls::StreamOwned::new(tls, sock))))
        }
    }
}

/// One call on a worker's control API, all of it (connect, TLS handshake, write, read) within
/// `timeout`. Outer error: the worker cannot be reached or did not answer in time
/// (`target_unavailable`), or refused our TLS credentials / we refused its (`config`).
fn call(
    target: &Target<'_>,
    req: &api::Request,
    timeout: Duration,
) -> std::result::Result<Value, Unanswered> {
    let fail = |e: &std::io::Error| {
        let (text, kind) = explain(e, target);
        Failure::new(
            kind.unwrap_or(ErrorKind::TargetUnavailable),
            format!("{target}: {text}"),
        )
    };
    let unavailable = |e: &dyn std::fmt::Display| {
        Failure::new(ErrorKind::TargetUnavailable, format!("{target}: {e}"))
    };
    let timed_out = || unavailable(&format!("no answer within {} ms", timeout.as_millis()));
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)
    };
    let is_timeout = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    let mut s = open(target, timeout).map_err(|e| {
        if is_timeout(&e) {
            return timed_out().into();
        }
        Unanswered {
            not_running: matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) && e.get_ref().is_none_or(|i| !i.is::<rustls::Error>()),
            failure: fail(&e),
        }
    })?;
    // After a TLS 1.3 handshake the worker may still refuse our certificate: its alert arrives
    // on the first read, or the connection is reset under our request.
    let reset = |e: &std::io::Error| {
        if matches!(target, Target::Tls { .. })
            && matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            Failure::new(
                ErrorKind::Config,
                format!(
                    "{target}: the worker closed the connection ({e}); it may have refused our \
                     client certificate (see its log)"
                ),
            )
        } else {
            fail(e)
        }
    };
    s.set_timeout(left()?).map_err(|e| fail(&e))?;
    let mut line = serde_json::to_vec(req).expect("serializable");
    line.push(b'\n');
    s.write_all(&line).and_then(|_| s.flush()).map_err(|e| {
        if is_timeout(&e) {
            timed_out()
        } else {
            reset(&e)
        }
    })?;
    // Read until the newline, re-arming the read timeout with what is left of the deadline (a
    // per-read timeout alone would let a slowly trickling answer run on forever).
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        s.set_timeout(left()?).map_err(|e| fail(&e))?;
        match s.read(&mut buf) {
            Ok(0) if matches!(target, Target::Tls { .. }) && answer.is_empty() => {
                return Err(reset(&std::io::ErrorKind::UnexpectedEof.into()).into());
            }
            Ok(0) => return Err(unavailable(&"closed without answering").into()),
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if buf[..n].contains(&b'\n') {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(timed_out().into()),
            Err(e) => return Err(reset(&e).into()),
        }
    }
    if let Channel::Tls(t) = &mut s {
        // Say goodbye properly (close_notify); the answer is in, so failures do not matter.
        t.conn.send_close_notify();
        let _ = t.flush();
    }
    match baton_protocol::decode_answer::<Value>(&answer) {
        Ok(answer) => Ok(answer?),
        Err(e) => Err(unavailable(&format!("unreadable answer ({e})")).into()),
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

/// One connection, as `baton conns` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRow {
    pub conn: Cid,
    pub worker: String,
    pub server_id: u32,
    pub id: u64,
    pub remote: String,
    /// The VIP the client talks to (the connection's replies come from it); empty from a worker
    /// that does not say.
    pub vip: String,
    /// `live`, `migrating` (frozen for export) or `importing` (held, waiting for the commit).
    pub state: String,
    /// The migration phase this shows (`idle`, or `transferring` while frozen or held).
    pub phase: baton_orchestrator::Phase,
    pub cids: Vec<Cid>,
    /// How many of its CIDs the LB still routes by exact-CID override (a recent migration whose
    /// old CIDs are not retired yet); filled by [`Orchestrator::conns`].
    pub overrides: usize,
}

/// A migration [`Orchestrator::recover`] found in etcd, and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct Recovered {
    pub migration_id: MigrationId,
    pub conn: Option<Cid>,
    pub from: String,
    pub to: String,
    /// Where its record stood (`started` or `flipped`).
    pub stage: baton_cluster::MigrationStage,
    pub outcome: RecoveryOutcome,
    /// Why it is undecided or failed, or what is left (a source not released).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl std::fmt::Display for Recovered {
    /// One line: "<id> <conn> <from> -> <to> (<stage>): <outcome>[: <detail>]".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conn = self.conn.map(|c| c.to_string());
        let outcome = serde_json::to_value(self.outcome).unwrap_or_default();
        write!(
            f,
            "{} {} {} -> {} ({:?}): {}",
            self.migration_id,
            conn.as_deref().unwrap_or("?"),
            self.from,
            self.to,
            self.stage,
            outcome.as_str().unwrap_or("?")
        )?;
        match &self.detail {
            Some(d) => write!(f, ": {d}"),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryOutcome {
    /// Its driver still runs it: left alone.
    DriverAlive,
    /// Committed: flipped (if it was not), every LB node caught up, the source released.
    Completed,
    /// Never committed: the connection carries on at the source; the record is gone.
    RolledBack,
    /// Not known yet (still running at the source, or a worker does not answer): run again.
    Undecided,
    /// Another driver took it over first.
    TakenElsewhere,
    /// etcd or the LB nodes failed it; the record stays for another try.
    Failed,
}

/// One worker in [`Orchestrator::check`].
#[derive(Clone, Debug, Serialize)]
pub struct WorkerCheck {
    pub worker: String,
    pub info: Option<Info>,
    pub health: Option<api::Health>,
    /// What stops migrations from or to it; empty when none.
    pub problems: Vec<String>,
}

/// What `baton check` found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// No problem anywhere.
    pub ok: bool,
    /// The token secret id this controller issues with.
    pub token_secret_id: u32,
    /// The CID layout the data plane routes by; `None` when neither baton-lb nor the pinned
    /// maps could say.
    pub lb_layout: Option<CidLayout>,
    pub workers: Vec<WorkerCheck>,
    /// Problems between workers (keys one seals with and another cannot open).
    pub problems: Vec<String>,
}

/// Test hooks of the fault tests: hidden `baton migrate` flags, compiled only with the
/// `test-hooks` feature (which `cargo xtask test` enables for the binaries it tests and release
/// builds do not). Without it this is empty and every hook is off.
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct Faults {
    /// Test hook: send a token with a corrupted MAC.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    pub forge_token: bool,
    /// Test hook: send a token that expired ten minutes ago.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    pub expired_token: bool,
    /// Test hook: the source corrupts the sealed snapshot it sends.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    pub tamper_snapshot: bool,
    /// Test hook (cluster): the driver dies (exit without any clean-up, as a SIGKILL would
    /// leave it) right after this step, leaving its migration to `baton recover`.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true, value_enum)]
    pub die_after: Option<DieAfter>,
}

/// Where the `die_after` test hook ends the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DieAfter {
    /// The record of the migration is written; the source was not asked.
    Begin,
    /// The source reported the commit; the flip is not written.
    Transfer,
    /// The flip is written; the source is not released.
    Flip,
}

impl Faults {
    fn forge_token(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.forge_token;
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    fn token_age(&self) -> Option<Duration> {
        #[cfg(feature = "test-hooks")]
        return self.expired_token.then_some(Duration::from_secs(600));
        #[cfg(not(feature = "test-hooks"))]
        None
    }

    fn tamper_snapshot(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.tamper_snapshot;
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// Ends the process here if the `die_after` hook names `step`.
    fn die_after(&self, _step: DieAfter) {
        #[cfg(feature = "test-hooks")]
        if self.die_after == Some(_step) {
            eprintln!("die_after {_step:?}: the driver exits here (fault tests only)");
            std::process::exit(137);
        }
    }
}

pub struct Orchestrator {
    cfg: MigrationConfig,
    tokens: Mutex<MigrationTokenManager>,
    pin_dir: PathBuf,
    /// Worker name -> slot in BATON_WORKERS, from the running baton-lb (None: no daemon).
    slots: Option<HashMap<String, u32>>,
    /// The CID layout the data plane routes by (from baton-lb, else the pinned config).
    lb_layout: Option<CidLayout>,
    maps: Mutex<Option<PinnedMaps>>,
    /// Every override flip and retirement goes through it (through the daemon only if one
    /// answered at start).
    overrides: OverrideWriter,
    /// baton-lb's control socket (migration records for its metrics).
    lb_socket: PathBuf,
    /// Workers' `info`, asked once per worker: it is fixed by the worker's config, and a drain
    /// would otherwise ask twice per connection.
    infos: Mutex<HashMap<String, Info>>,
    pub faults: Faults,
    pub quiesce_timeout: Duration,
    /// Limit of short control-socket requests ([`CONTROL_TIMEOUT`] by default).
    pub control_timeout: Duration,
    /// Client TLS configuration from `[control_tls]` (workers reached through `control_tls`).
    control_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// `[cluster]`: flips go to etcd, which every LB node follows, instead of local maps.
    cluster: Option<ClusterLink>,
}

impl Orchestrator {
    pub fn new(mut cfg: MigrationConfig, lb_socket: &Path, pin_dir: &Path) -> Result<Self> {
        let tokens = token_manager(&cfg.secrets)?;
        let cluster = match cfg.cluster.clone() {
            None => None,
            Some(settings) => {
                // The failure itself (its kind says etcd is unreachable), not only its text.
                let link = ClusterLink::connect(settings)?;
                add_registered_workers(&mut cfg, &link.workers()?)?;
                Some(link)
            }
        };
        let control_tls = cfg
            .control_tls
            .as_ref()
            .map(control_tls_config)
            .transpose()?;
        // A daemon that went away while answering (restarting) leaves the pinned maps, which
        // the program keeps using: the migration goes through them, as with no daemon.
        let mut lb_layout = None;
        // A cluster's flips go to etcd: no local daemon or maps are involved.
        let ask_daemon = cluster.is_none();
        let slots = match ask_daemon.then(|| control::ask(lb_socket, &Request::Status {})) {
            None => None,
            Some(answer) => match answer {
            Ok(Reply::Answered(v)) => Some(v),
            Ok(Reply::NotRunning) => None,
            Ok(Reply::WentAway(why)) => {
                eprintln!("note: {why}; using the pinned maps");
                None
            }
            Err(e) => {
                eprintln!("warning: {e}; using the pinned maps");
                None
            }
            },
        }
        .map(|v| {
            let status: control::DaemonStatus = serde_json::from_value(v)
                .context("baton-lb answered `status` with something this baton cannot read (another version?)")?;
            lb_layout = Some(status.cid);
            anyhow::Ok(
                status
                    .workers
                    .into_iter()
                    .map(|w| (w.name, w.index))
                    .collect::<HashMap<_, _>>(),
            )
        })
        .transpose()?;
        // Without a daemon, the pinned config says how the data plane parses CIDs.
        if lb_layout.is_none()
            && ask_daemon
            && let Ok(c) = PinnedMaps::open(pin_dir).and_then(|m| m.lb_config())
        {
            lb_layout = Some(CidLayout {
                cid_len: c.cid_len,
                server_id_len: c.server_id_len,
            });
        }
        Ok(Self {
            cfg,
            tokens: Mutex::new(tokens),
            pin_dir: pin_dir.into(),
            lb_socket: lb_socket.into(),
            overrides: match slots {
                Some(_) => OverrideWriter::new(lb_socket, pin_dir),
                None => OverrideWriter::pins_only(pin_dir),
            },
            slots,
            maps: Mutex::new(None),
            infos: Mutex::new(HashMap::new()),
            faults: Faults::default(),
            lb_layout,
            quiesce_timeout: Duration::from_secs(2),
            control_timeout: CONTROL_TIMEOUT,
            control_tls,
            cluster,
        })
    }

    /// One request to a worker's control API, over its Unix socket or mutual TLS; the answer is
    /// read as the type the request names.
    fn call<T: DeserializeOwned>(
        &self,
        ep: &WorkerEndpoint,
        req: &api::Request,
        timeout: Duration,
    ) -> std::result::Result<T, Unanswered> {
        let config = |e: &dyn std::fmt::Display| {
            Failure::new(ErrorKind::Config, format!("worker {}: {e}", ep.name))
        };
        let target = match (&ep.control, &ep.control_tls, &self.control_tls) {
            (Some(path), _, _) => Target::Unix(path),
            (None, Some(addr), Some(tls)) => Target::Tls {
                addr,
                server_name: rustls::pki_types::ServerName::try_from(
                    ep.server_name.as_deref().unwrap_or(&ep.name),
                )
                .map_err(|e| config(&e))?
                .to_owned(),
                config: tls.clone(),
            },
            _ => {
                return Err(config(
                    &"no control socket, or control_tls without a [control_tls] table",
                )
                .into());
            }
        };
        let v = call(&target, req, timeout)?;
        serde_json::from_value(v).map_err(|e| {
            Failure::new(
                ErrorKind::Output,
                format!(
                    "worker {} answered `{}` with something this baton cannot read (another \
                     version?): {e}",
                    ep.name,
                    req.cmd()
                ),
            )
            .into()
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
                    ErrorKind::Config,
                    format!(
                        "no worker {name:?} in the migration config (known: {})",
                        known.join(", ")
                    ),
                )
            })
    }

    fn info(&self, name: &str) -> Result<Info, Unanswered> {
        if let Some(i) = self.infos.lock().unwrap().get(name) {
            return Ok(i.clone());
        }
        let info: Info = self.call(
            self.endpoint(name)?,
            &api::Request::Info {},
            self.control_timeout,
        )?;
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
    pub fn conns_of(&self, name: &str) -> Result<Vec<ConnRow>, Unanswered> {
        let ep = self.endpoint(name)?;
        let info = self.info(name)?;
        // Anything but a list is an error, never "no connections".
        let list: Vec<api::Conn> = self
            .call(ep, &api::Request::Conns {}, self.control_timeout)
            .map_err(|mut u| {
                if u.failure.kind == ErrorKind::Output {
                    u.failure.message = format!(
                        "worker {name} answered `conns` with something that is not a list of \
                         connections: {}",
                        u.failure.message
                    );
                }
                u
            })?;
        Ok(list
            .into_iter()
            .map(|c| ConnRow {
                conn: c.conn,
                worker: name.into(),
                server_id: info.server_id,
                id: c.id,
                remote: c.remote.to_string(),
                vip: c.vip.map(|v| v.to_string()).unwrap_or_default(),
                state: if c.frozen {
                    "migrating"
                } else if c.held {
                    "importing"
                } else {
                    "live"
                }
                .into(),
                phase: if c.frozen || c.held {
                    baton_orchestrator::Phase::Transferring
                } else {
                    baton_orchestrator::Phase::Idle
                },
                cids: c.cids,
                overrides: 0,
            })
            .collect())
    }

    /// Connections of every worker; the workers that could not be asked are in the second list.
    pub fn conns(&self) -> (Vec<ConnRow>, Vec<(String, Unanswered)>) {
        let mut rows = Vec::new();
        let mut down = Vec::new();
        for w in &self.cfg.workers {
            match self.conns_of(&w.name) {
                Ok(r) => rows.extend(r),
                Err(f) => down.push((w.name.clone(), f)),
            }
        }
        let overridden: HashSet<Vec<u8>> = match &self.cluster {
            Some(c) => c
                .overrides()
                .map(|l| l.iter().map(|(cid, _)| cid.as_bytes().to_vec()).collect())
                .unwrap_or_default(),
            None => PinnedMaps::open(&self.pin_dir)
                .and_then(|m| m.overrides())
                .map(|l| l.iter().map(|(k, _)| k.as_slice().to_vec()).collect())
                .unwrap_or_default(),
        };
        for r in &mut rows {
            r.overrides = r
                .cids
                .iter()
                .filter(|c| overridden.contains(c.as_bytes()))
                .count();
        }
        (rows, down)
    }

    fn slot_of(&self, name: &str, server_id: u32) -> Result<u32, Failure> {
        if self.cluster.is_some() {
            // A cluster's override names the worker; each LB node maps it to its own slot.
            return Ok(server_id);
        }
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
                    ErrorKind::Config,
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
                    .map_err(|e| Failure::new(ErrorKind::Override, format!("{e:#}")))?,
            );
        }
        Ok(m.as_mut().unwrap())
    }

    /// Through the one override writer: the running baton-lb if one answered, else the pinned maps.
    fn set_override(&self, cid: &Cid, slot: u32) -> Result<(), Failure> {
        self.overrides
            .set(cid.as_bytes(), slot)
            .map(drop)
            .map_err(|e| Failure::new(ErrorKind::Override, format!("{e:#}")))
    }

    fn remove_override(&self, cid: &Cid) -> Result<(), Failure> {
        if let Some(c) = &self.cluster {
            return c.retire(cid);
        }
        self.overrides
            .remove(cid.as_bytes())
            .map(drop)
            .map_err(|e| Failure::new(ErrorKind::Override, format!("{e:#}")))
    }

    /// Finds which worker holds `conn`.
    pub fn locate(&self, conn: &Cid) -> Result<String, Failure> {
        let (rows, down) = self.conns();
        rows.into_iter().find(|r| r.conn == *conn).map(|r| r.worker).ok_or_else(|| {
            let silent: Vec<&str> = down.iter().filter(|(_, f)| !f.not_running).map(|(w, _)| w.as_str()).collect();
            if silent.is_empty() {
                Failure::new(ErrorKind::UnknownConnection, format!("no worker holds connection {conn} (see `baton conns`)"))
            } else {
                Failure::new(
                    ErrorKind::UnknownConnection,
                    format!(
                        "no worker that answered holds connection {conn}; {} did not answer and may hold it",
                        silent.join(", ")
                    ),
                )
            }
        })
    }

    /// Moves one connection by driving its [`Migration`] to the end; on success the overrides
    /// point at the target and the source is released. The caller removes the overrides later
    /// with [`Self::retire`]. The outcome is reported to baton-lb's metrics when it runs.
    pub fn migrate(&self, conn: &Cid, from: &str, to: &str) -> Result<Report, Failure> {
        let opts = Options {
            quiesce_timeout: self.quiesce_timeout,
            transfer_slack: MIGRATE_SLACK,
            step_timeout: self.control_timeout,
            lb_layout: self.lb_layout,
            tamper_snapshot: self.faults.tamper_snapshot(),
        };
        let mut m = Migration::new(*conn, from, to, MigrationId::random(), opts, Instant::now());
        // Every action is carried out at once and answered (each call has its own timeout), so
        // the machine never waits for its timer here.
        let mut phase = m.phase();
        let mut flip_revision = None;
        let mut carried: std::collections::VecDeque<Action> = Default::default();
        while let Some(action) = carried.pop_front().or_else(|| m.poll_action()) {
            match (&self.cluster, action) {
                (Some(c), Action::SetOverride { cid, .. }) => {
                    // The machine asks for every CID at once: a cluster flips them in one write.
                    let mut cids = vec![cid];
                    while let Some(next) = m.poll_action() {
                        match next {
                            Action::SetOverride { cid, .. } => cids.push(cid),
                            other => carried.push_back(other),
                        }
                    }
                    let result = c.flip(m.id(), conn, from, to, &cids);
                    if let Ok(rev) = result {
                        flip_revision = Some(rev);
                        self.faults.die_after(DieAfter::Flip);
                    }
                    for cid in cids {
                        let result = result.as_ref().map(drop).map_err(Clone::clone);
                        m.handle(Event::OverrideSet { cid, result }, Instant::now());
                    }
                }
                (Some(c), action) => {
                    let event = match action {
                        Action::MigrateOut { .. } => match c.begin(m.id(), conn, from, to) {
                            Ok(()) => {
                                self.faults.die_after(DieAfter::Begin);
                                let event = self.perform(action);
                                if matches!(event, Event::MigratedOut(Ok(_))) {
                                    self.faults.die_after(DieAfter::Transfer);
                                }
                                event
                            }
                            Err(f) => Event::MigratedOut(Err(f)),
                        },
                        // The source forwards late datagrams until it is released: only once
                        // every live LB node routes by the flip.
                        Action::Release { .. } => {
                            match flip_revision.map_or(Ok(()), |rev| c.wait_applied(rev)) {
                                Ok(()) => self.perform(action),
                                Err(f) => Event::Released(Err(f)),
                            }
                        }
                        action => self.perform(action),
                    };
                    m.handle(event, Instant::now());
                }
                (None, action) => {
                    let event = self.perform(action);
                    m.handle(event, Instant::now());
                }
            }
            if m.phase() != phase {
                phase = m.phase();
                tracing::info!(migration_id = %m.id(), conn = %conn, from, to, ?phase, step = m.step().as_str(), "migration phase");
            }
        }
        if let Some(c) = &self.cluster {
            c.end(m.id());
        }
        let record = m.record();
        if self.slots.is_some() {
            // Best effort: the metrics must never fail a migration.
            if let Err(e) = control::ask(&self.lb_socket, &Request::MigrationDone(record)) {
                tracing::debug!("could not report the migration to baton-lb: {e}");
            }
        }
        match m.into_outcome() {
            Some(Outcome::Moved(r)) => {
                if let Some(w) = &r.release_warning {
                    tracing::warn!(conn = %conn, from, "{w}");
                }
                Ok(r)
            }
            Some(Outcome::Failed { failure, .. }) => Err(failure),
            None => Err(Failure::new(
                ErrorKind::Output,
                "the migration stopped without an outcome (a bug: please report it)",
            )),
        }
    }

    /// Whether flips go to etcd (`[cluster]`).
    pub fn in_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Looks for migrations whose driver died (their record's lease ended) and finishes what
    /// they started: a committed one gets its flip, the LB nodes' catch-up and the source's
    /// release; one that never committed only loses its record; one still running at the
    /// source is left for a later look (see [`baton_orchestrator::recovery`]). Migrations whose
    /// driver lives are listed, untouched. Without `[cluster]` there is nothing to look at.
    pub fn recover(&self) -> Result<Vec<Recovered>, Failure> {
        let Some(c) = &self.cluster else {
            return Err(Failure::new(
                ErrorKind::Config,
                "recovery reads the migrations in flight from etcd: the migration config has no                  [cluster] table (a single LB node keeps no record a driver could resume)",
            ));
        };
        let mut out = Vec::new();
        for (record, seen) in c.migrations()? {
            let alive = match record.driver_lease {
                Some(lease) if lease == c.lease_id() => true,
                Some(lease) => c.lease_alive(lease)?,
                None => false,
            };
            let mut row = Recovered {
                migration_id: record.id,
                conn: record.conn,
                from: record.from.clone(),
                to: record.to.clone(),
                stage: record.stage,
                outcome: RecoveryOutcome::DriverAlive,
                detail: None,
            };
            if !alive {
                let (outcome, detail) = self.recover_one(c, record, seen);
                row.outcome = outcome;
                row.detail = detail;
            }
            match row.outcome {
                RecoveryOutcome::DriverAlive => {}
                RecoveryOutcome::Failed => {
                    tracing::warn!(migration_id = %row.migration_id, detail = ?row.detail, "could not recover the migration")
                }
                o => {
                    tracing::info!(migration_id = %row.migration_id, conn = ?row.conn, from = %row.from, to = %row.to, outcome = ?o, "recovered a dead driver's migration")
                }
            }
            out.push(row);
        }
        Ok(out)
    }

    fn recover_one(
        &self,
        c: &ClusterLink,
        mut record: baton_cluster::MigrationRecord,
        seen: i64,
    ) -> (RecoveryOutcome, Option<String>) {
        use baton_orchestrator::recovery::{Resolution, TargetView, resolve};
        let id = record.id;
        let flipped = record.stage == baton_cluster::MigrationStage::Flipped;
        let source = self
            .endpoint(&record.from)
            .map_err(Unanswered::from)
            .and_then(|ep| {
                self.call::<api::SourceStatus>(
                    ep,
                    &api::Request::MigrationStatus { migration_id: id },
                    self.control_timeout,
                )
            })
            .map(|s| s.state)
            .ok();
        let target = match self
            .endpoint(&record.to)
            .map_err(Unanswered::from)
            .and_then(|ep| {
                self.call::<Vec<api::Conn>>(ep, &api::Request::Conns {}, self.control_timeout)
            }) {
            Err(_) => TargetView::Silent,
            Ok(list) => match list.into_iter().find(|x| Some(x.conn) == record.conn) {
                None => TargetView::Absent,
                Some(x) if x.held => TargetView::Held,
                Some(x) => TargetView::Live { cids: x.cids },
            },
        };
        let resolution = resolve(flipped, source, &target);
        if let Resolution::Undecided { why } = resolution {
            return (RecoveryOutcome::Undecided, Some(why.into()));
        }
        // Take it over (under this driver's lease) before acting, so two drivers never both do.
        if flipped && record.flip_revision.is_none() {
            record.flip_revision = Some(seen);
        }
        record.driver_lease = Some(c.lease_id());
        match c.adopt(&record, seen) {
            Ok(true) => {}
            Ok(false) => {
                return (
                    RecoveryOutcome::TakenElsewhere,
                    Some("another driver took it over meanwhile".into()),
                );
            }
            Err(f) => return (RecoveryOutcome::Failed, Some(f.message)),
        }
        let (flip, release) = match resolution {
            Resolution::RolledBack => {
                c.end(id);
                return (RecoveryOutcome::RolledBack, None);
            }
            Resolution::Complete { flip, release } => (flip, release),
            Resolution::Undecided { .. } => unreachable!("answered above"),
        };
        let revision = match flip {
            Some(cids) => {
                record.cids = cids;
                match c.flip_record(&record) {
                    Ok(rev) => Some(rev),
                    Err(f) => return (RecoveryOutcome::Failed, Some(f.message)),
                }
            }
            None => record.flip_revision,
        };
        // The source forwards until released: only once every live LB node routes by the flip.
        if let Some(rev) = revision
            && let Err(f) = c.wait_applied(rev)
        {
            return (RecoveryOutcome::Failed, Some(f.message));
        }
        let mut detail = None;
        if release {
            let released = self
                .endpoint(&record.from)
                .map_err(Unanswered::from)
                .and_then(|ep| {
                    self.call::<api::Released>(
                        ep,
                        &api::Request::Release { migration_id: id },
                        self.control_timeout,
                    )
                });
            match released {
                Ok(_) => {}
                // It gave up forwarding by itself meanwhile: nothing left to release.
                Err(u) if u.failure.kind == ErrorKind::UnknownMigration => {}
                Err(u) => {
                    detail = Some(format!(
                        "the source was not released ({}): it forwards until its own deadline",
                        u.failure.message
                    ))
                }
            }
        }
        c.end(id);
        (RecoveryOutcome::Completed, detail)
    }

    /// Carries out one action of a [`Migration`] and says what came of it.
    fn perform(&self, action: Action) -> Event {
        match action {
            Action::AskInfo { worker } => Event::Info {
                result: self.info(&worker).map_err(Failure::from),
                worker,
            },
            Action::FindSlot { worker, server_id } => Event::Slot(self.slot_of(&worker, server_id)),
            Action::IssueToken {
                migration_id,
                conn,
                source,
                target,
            } => Event::Token(self.issue(migration_id, &conn, source, target)),
            Action::MigrateOut {
                worker,
                request,
                timeout,
            } => Event::MigratedOut(self.endpoint(&worker).and_then(|ep| {
                self.call(ep, &api::Request::MigrateOut(request), timeout)
                    .map_err(Failure::from)
            })),
            Action::SetOverride { cid, slot } => Event::OverrideSet {
                result: self.set_override(&cid, slot),
                cid,
            },
            Action::Release {
                worker,
                migration_id,
            } => Event::Released(self.endpoint(&worker).and_then(|ep| {
                self.call::<api::Released>(
                    ep,
                    &api::Request::Release { migration_id },
                    self.control_timeout,
                )
                .map(|_| ())
                .map_err(Failure::from)
            })),
        }
    }

    /// A single-use token for exactly this migration (the fault hooks forge or age it).
    fn issue(
        &self,
        migration_id: MigrationId,
        conn: &Cid,
        source: u32,
        target: u32,
    ) -> Result<HexBytes, Failure> {
        let binding = MigrationBinding {
            migration_id,
            connection_id: ConnectionId::new(conn.as_bytes())?,
            source: WorkerId(source),
            target: WorkerId(target),
        };
        let now = match self.faults.token_age() {
            // Issued so long ago that it has already expired.
            Some(age) => SystemTime::now() - age - Duration::from_secs(1),
            None => SystemTime::now(),
        };
        let token = self.tokens.lock().unwrap().issue(&binding, now)?;
        let mut token = token.as_bytes().to_vec();
        if self.faults.forge_token() {
            *token.last_mut().unwrap() ^= 1;
        }
        Ok(HexBytes(token))
    }

    /// The migration machinery's health, as every migration needs it: each worker answers, speaks
    /// our protocol and issues the LB's CIDs; it accepts the tokens this controller issues; every
    /// worker can open what every other seals; every worker reaches its peers.
    pub fn check(&self) -> CheckReport {
        let token_secret_id = self.tokens.lock().unwrap().current_secret_id();
        let mut problems = Vec::new();
        let mut workers = Vec::new();
        for ep in &self.cfg.workers {
            let name = ep.name.clone();
            let mut w = WorkerCheck {
                worker: name.clone(),
                info: None,
                health: None,
                problems: Vec::new(),
            };
            match self.info(&name) {
                Ok(info) => {
                    if info.protocol != baton_protocol::PROTOCOL_VERSION {
                        w.problems.push(format!(
                            "speaks control protocol version {}, this baton speaks {}",
                            info.protocol,
                            baton_protocol::PROTOCOL_VERSION
                        ));
                    }
                    if let Some(lb) = self.lb_layout
                        && lb != info.cid
                    {
                        w.problems.push(format!(
                            "issues {} but the load balancer routes {}",
                            info.cid, lb
                        ));
                    }
                    w.info = Some(info);
                }
                Err(u) => w
                    .problems
                    .push(format!("does not answer `info`: {}", u.failure.message)),
            }
            if w.info.is_some() {
                match self.call::<api::Health>(ep, &api::Request::Health {}, self.control_timeout) {
                    Ok(h) => {
                        if !h.token_secret_ids.contains(&token_secret_id) {
                            w.problems.push(format!(
                                "refuses the tokens this controller issues (token secret id \
                                 {token_secret_id}; it holds {:?}): give the controller and the \
                                 workers the same token secret",
                                h.token_secret_ids
                            ));
                        }
                        for p in &h.peers {
                            if let Some(e) = &p.error {
                                w.problems.push(format!(
                                    "cannot reach peer {} ({}): {e}",
                                    p.name, p.peer
                                ));
                            }
                        }
                        w.health = Some(h);
                    }
                    Err(u) => w
                        .problems
                        .push(format!("does not answer `health`: {}", u.failure.message)),
                }
            }
            workers.push(w);
        }
        // A source seals with its current key; every target must hold that key.
        for a in &workers {
            let Some(ha) = &a.health else { continue };
            for b in &workers {
                let Some(hb) = &b.health else { continue };
                if a.worker != b.worker && !hb.snapshot_key_ids.contains(&ha.snapshot_key_id) {
                    problems.push(format!(
                        "{} seals snapshots with key id {}, which {} does not hold ({:?}): \
                         migrations {} -> {} would fail; give every worker the same secrets file",
                        a.worker,
                        ha.snapshot_key_id,
                        b.worker,
                        hb.snapshot_key_ids,
                        a.worker,
                        b.worker
                    ));
                }
            }
        }
        let ok = problems.is_empty() && workers.iter().all(|w| w.problems.is_empty());
        CheckReport {
            ok,
            token_secret_id,
            lb_layout: self.lb_layout,
            workers,
            problems,
        }
    }

    /// Removes the overrides of migrated connections once their target no longer lists the old
    /// CIDs (the client retired them), waiting up to `timeout`. Returns the CIDs still overridden
    /// (still in use: removing them would strand the client).
    pub fn retire(&self, moved: &[Report], timeout: Duration) -> Vec<Cid> {
        let mut pending: BTreeMap<String, Vec<(Cid, HashSet<Cid>)>> = BTreeMap::new();
        for r in moved {
            pending
                .entry(r.to.clone())
                .or_default()
                .push((r.conn, r.cids.iter().copied().collect()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            for (worker, list) in pending.iter_mut() {
                let Ok(rows) = self.conns_of(worker) else {
                    continue;
                };
                let live: HashMap<Cid, HashSet<Cid>> = rows
                    .iter()
                    .map(|r| (r.conn, r.cids.iter().copied().collect()))
                    .collect();
                for (conn, old) in list.iter_mut() {
                    let in_use = live.get(conn);
                    old.retain(|cid| {
                        if in_use.is_some_and(|l| l.contains(cid)) {
                            return true;
                        }
                        match self.remove_override(cid) {
                            Err(f) => {
                                tracing::warn!(%cid, "could not remove the override: {}", f.message);
                                true
                            }
                            Ok(()) => false,
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
    /// Connections that had requests in flight for a whole quiesce timeout and were tried
    /// again (an HTTP/3 connection moves only between requests), and how many of them moved
    /// in the end.
    pub retried: usize,
    pub retried_moved: usize,
    /// The connections still busy after every retry: they stay on the worker.
    pub busy: Vec<Cid>,
}

/// How a drain treats connections that were busy (`requests_in_flight`): tried again up to
/// `retries` more times, `pause` apart.
#[derive(Debug, Clone, Copy)]
pub struct BusyRetry {
    pub retries: usize,
    pub pause: Duration,
}

impl Default for BusyRetry {
    fn default() -> Self {
        Self {
            retries: 3,
            pause: Duration::from_millis(200),
        }
    }
}

/// Moves every connection off `worker` (to `to`, or spread over the other workers), at most
/// `concurrency` at a time; `progress` is called after each migration. Connections busy with
/// requests for a whole quiesce timeout are tried again as `retry` says.
pub fn drain(
    o: &Orchestrator,
    worker: &str,
    to: Option<&str>,
    concurrency: usize,
    retry: BusyRetry,
    progress: Progress<'_>,
) -> Result<DrainSummary> {
    let started = Instant::now();
    let conns = o.conns_of(worker).map_err(|u| {
        anyhow::anyhow!(
            "cannot list the connections of worker {worker} ({}): {}",
            u.failure.kind,
            u.failure.message
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
    let mut pending: Vec<(usize, Cid)> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| (i, c.conn))
        .collect();
    let mut results: Vec<(Cid, Result<Report, Failure>)> = Vec::new();
    let mut retried = std::collections::BTreeSet::new();
    for pass in 0..=retry.retries {
        if pending.is_empty() {
            break;
        }
        if pass > 0 {
            std::thread::sleep(retry.pause);
            retried.extend(pending.iter().map(|&(_, c)| c));
        }
        let queue = Mutex::new(std::mem::take(&mut pending));
        let outcomes = Mutex::new(Vec::new());
        let width = concurrency.max(1).min(queue.lock().unwrap().len().max(1));
        std::thread::scope(|s| {
            for _ in 0..width {
                s.spawn(|| {
                    loop {
                        let Some((i, conn)) = queue.lock().unwrap().pop() else {
                            break;
                        };
                        let r = o.migrate(&conn, worker, &targets[i % targets.len()]);
                        let mut out = outcomes.lock().unwrap();
                        out.push((i, conn, r.clone()));
                        let last_try = pass == retry.retries;
                        let busy = r
                            .as_ref()
                            .is_err_and(|f| f.kind == ErrorKind::RequestsInFlight);
                        // A busy connection tried again is not done yet: no progress line.
                        if !busy || last_try {
                            progress(results.len() + out.len(), total, &r);
                        }
                    }
                });
            }
        });
        for (i, conn, r) in outcomes.into_inner().unwrap() {
            let busy = r
                .as_ref()
                .is_err_and(|f| f.kind == ErrorKind::RequestsInFlight);
            if busy && pass < retry.retries {
                pending.push((i, conn));
            } else {
                results.push((conn, r));
            }
        }
    }
    let moved_ms = started.elapsed().as_secs_f64() * 1000.0;
    let moved: Vec<Report> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().cloned())
        .collect();
    let mut errors = BTreeMap::new();
    for f in results.iter().filter_map(|(_, r)| r.as_ref().err()) {
        *errors.entry(f.kind.as_str().to_string()).or_default() += 1;
    }
    let busy: Vec<Cid> = results
        .iter()
        .filter(|(_, r)| {
            r.as_ref()
                .is_err_and(|f| f.kind == ErrorKind::RequestsInFlight)
        })
        .map(|&(c, _)| c)
        .collect();
    let retried_moved = results
        .iter()
        .filter(|(c, r)| r.is_ok() && retried.contains(c))
        .count();
    let left = o.retire(&moved, Duration::from_secs(10));
    let migration_ms: Vec<f64> = moved.iter().map(|r| r.total_ms).collect();
    let freeze_ms: Vec<f64> = moved.iter().map(|r| r.freeze_ms).collect();
    Ok(DrainSummary {
        worker: worker.into(),
        total,
        moved: moved.len(),
        failed: total - moved.len(),
        moved_ms,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        migration_ms_p50: percentile(&migration_ms, 50.0),
        migration_ms_p99: percentile(&migration_ms, 99.0),
        freeze_ms_p50: percentile(&freeze_ms, 50.0),
        freeze_ms_p99: percentile(&freeze_ms, 99.0),
        errors,
        overrides_left: left.len(),
        retried: retried.len(),
        retried_moved,
        busy,
    })
}

/// Adds the cluster's registered workers that the config does not list, reached through their
/// registered control address over `[control_tls]`.
fn add_registered_workers(
    cfg: &mut MigrationConfig,
    registered: &[baton_cluster::WorkerRecord],
) -> Result<()> {
    for r in registered {
        if cfg.workers.iter().any(|w| w.name == r.name) {
            continue;
        }
        let Some(addr) = &r.control else {
            tracing::warn!(worker = %r.name, "registered without a network control API ([control_tls] in its config): list it under [[workers]] to migrate its connections from here");
            continue;
        };
        if cfg.control_tls.is_none() {
            bail!(
                "worker {} registers its control API at {addr}: a [control_tls] table (ca, cert, \
                 key) is needed to reach it",
                r.name
            );
        }
        cfg.workers.push(WorkerEndpoint {
            name: r.name.clone(),
            control: None,
            control_tls: Some(addr.clone()),
            server_name: None,
        });
    }
    if cfg.workers.is_empty() {
        bail!("no worker is registered in the cluster, and the config lists none");
    }
    Ok(())
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
                r#"{"ok":true,"data":{"protocol":1,"name":"w","server_id":1,"peer":"127.0.0.1:1","cid":{"cid_len":8,"server_id_len":2}}}"#.to_string()
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
        migration::secret_file::write(
            dir.join("secrets.toml"),
            format!(
                "token_secret_id = 1\ntoken_secret = \"{}\"\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        fake_worker(&dir.join("ok.sock"), |r| {
            info_then(
                r#"{"ok":true,"data":[{"conn":"00aa","id":3,"remote":"10.0.0.1:5000","vip":null,"frozen":false,"held":false,"cids":["0100"]}]}"#,
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
                control: Some(dir.join(format!("{n}.sock"))),
                control_tls: None,
                server_name: None,
            })
            .collect();
        let cfg = MigrationConfig {
            secrets: dir.join("secrets.toml"),
            control_tls: None,
            workers,
            cluster: None,
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
            (rows[0].worker.as_str(), rows[0].conn.to_string().as_str()),
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
            down[1]
                .1
                .failure
                .message
                .contains("no answer within 300 ms"),
            "{:?}",
            down[1].1
        );
        assert_eq!(down[1].1.failure.kind, ErrorKind::TargetUnavailable);
        assert!(
            down[2].1.failure.message.contains("not a list"),
            "{:?}",
            down[2].1
        );
        let e = drain(
            &o,
            "stuck",
            Some("ok"),
            1,
            BusyRetry::default(),
            &|_, _, _| {},
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("worker stuck"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cluster_config_finds_its_workers_in_etcd() {
        let base = "secrets = \"/s.toml\"\n";
        let cluster =
            "[cluster]\nendpoints = [\"http://10.0.0.5:2379\"]\nprefix = \"/baton/prod\"\n";
        let e = MigrationConfig::parse(base).unwrap_err().to_string();
        assert!(e.contains("[cluster]"), "{e}");
        let mut c = MigrationConfig::parse(&format!("{base}{cluster}")).unwrap();
        assert!(c.workers.is_empty());
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!((cl.override_ttl_s, cl.applied_timeout_ms), (600, 5000));
        let record = |name: &str, control: Option<&str>| baton_cluster::WorkerRecord {
            name: name.into(),
            server_id: 1,
            address: "10.0.0.11".parse().unwrap(),
            weight: 1,
            control: control.map(String::from),
            encap: None,
        };
        // A registered control API needs the [control_tls] identity to be reached.
        let e = add_registered_workers(&mut c, &[record("w1", Some("10.0.0.11:4480"))])
            .unwrap_err()
            .to_string();
        assert!(e.contains("[control_tls]") && e.contains("w1"), "{e}");
        let mut c = MigrationConfig::parse(&format!(
            "{base}[control_tls]\nca = \"/ca\"\ncert = \"/c\"\nkey = \"/k\"\n\
             [[workers]]\nname = \"w2\"\ncontrol = \"/w2.sock\"\n{cluster}"
        ))
        .unwrap();
        add_registered_workers(
            &mut c,
            &[
                record("w1", Some("10.0.0.11:4480")),
                record("w2", Some("10.0.0.12:4480")),
                record("w3", None),
            ],
        )
        .unwrap();
        let names: Vec<(&str, Option<&str>)> = c
            .workers
            .iter()
            .map(|w| (w.name.as_str(), w.control_tls.as_deref()))
            .collect();
        // The listed w2 keeps its socket; w3 has no network control API and is left out.
        assert_eq!(names, [("w2", None), ("w1", Some("10.0.0.11:4480"))]);
    }

    #[test]
    fn endpoints_are_a_socket_or_a_tls_address_with_the_client_table() {
        let tls =
            "[control_tls]\nca = \"ca.pem\"\ncert = \"controller.pem\"\nkey = \"controller.key\"\n";
        let c = MigrationConfig::parse(&format!(
            "secrets = \"s.toml\"\n{tls}\
             [[workers]]\nname = \"w1\"\ncontrol = \"/run/w1.sock\"\n\
             [[workers]]\nname = \"w2\"\ncontrol_tls = \"10.0.0.5:7400\"\n\
             [[workers]]\nname = \"w3\"\ncontrol_tls = \"w3.example:7400\"\nserver_name = \"w3.pki\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.workers[0].control.as_deref(),
            Some(Path::new("/run/w1.sock"))
        );
        assert_eq!(c.workers[1].control_tls.as_deref(), Some("10.0.0.5:7400"));
        assert_eq!(c.workers[2].server_name.as_deref(), Some("w3.pki"));
        assert_eq!(c.control_tls.unwrap().cert, Path::new("controller.pem"));
        let err = |text: String| format!("{:#}", MigrationConfig::parse(&text).unwrap_err());
        let w =
            |body: &str| format!("secrets = \"s.toml\"\n{tls}[[workers]]\nname = \"w1\"\n{body}");
        let e = err(w(
            "control = \"/a.sock\"\ncontrol_tls = \"10.0.0.5:7400\"\n",
        ));
        assert!(e.contains("not both"), "{e}");
        let e = err(w(""));
        assert!(e.contains("give control") && e.contains("w1"), "{e}");
        let e = err(w("control_tls = \"10.0.0.5\"\n"));
        assert!(e.contains("not host:port"), "{e}");
        let e = err(w("control_tls = \"10.0.0.5:0\"\n"));
        assert!(e.contains("not host:port"), "{e}");
        let e = err(w("control = \"/a.sock\"\nserver_name = \"w1\"\n"));
        assert!(e.contains("only applies with control_tls"), "{e}");
        let e = err(w(
            "control_tls = \"10.0.0.5:7400\"\nserver_name = \"not a name!\"\n",
        ));
        assert!(e.contains("server name"), "{e}");
        let e = err(
            "secrets = \"s.toml\"\n[[workers]]\nname = \"w1\"\ncontrol_tls = \"10.0.0.5:7400\"\n"
                .to_string(),
        );
        assert!(e.contains("[control_tls] table"), "{e}");
        let e = err(w("control_tls = \"10.0.0.5:7400\"\ncontrl = 1\n"));
        assert!(e.contains("unknown field"), "{e}");
        // In the [control_tls] table too.
        let e = err(w("control = \"/a.sock\"\n").replace("key = ", "cafile = \"x\"\nkey = "));
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn tls_client_files_errors_name_the_setting() {
        let dir = std::env::temp_dir().join(format!("baton-ctltls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let c = |ca: &str, cert: &str| ControlTlsClient {
            ca: dir.join(ca),
            cert: dir.join(cert),
            key: dir.join("missing.key"),
        };
        let e = format!(
            "{:#}",
            control_tls_config(&c("missing.pem", "x")).unwrap_err()
        );
        assert!(e.contains("control_tls.ca"), "{e}");
        let e = format!(
            "{:#}",
            control_tls_config(&c("empty.pem", "x")).unwrap_err()
        );
        assert!(
            e.contains("control_tls.ca") && e.contains("no certificate"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Over TLS, "nothing listens" is a worker that is not running; a listener that never
    /// completes the handshake is reported within the timeout, and is not "not running".
    #[test]
    fn tls_call_refused_is_not_running_and_a_silent_listener_times_out() {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let target = |addr: &str| Target::Tls {
            addr: Box::leak(addr.to_string().into_boxed_str()),
            server_name: rustls::pki_types::ServerName::try_from("w1").unwrap(),
            config: config.clone(),
        };
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let f = call(
            &target(&addr),
            &api::Request::Info {},
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(f.not_running, "{f:?}");
        assert!(f.failure.message.contains("nothing listens"), "{f:?}");
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let started = Instant::now();
        let f = call(
            &target(&addr),
            &api::Request::Info {},
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            !f.not_running && f.failure.message.contains("no answer within 300 ms"),
            "{f:?}"
        );
        assert_eq!(f.failure.kind, ErrorKind::TargetUnavailable);
        drop(silent);
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
        assert!(
            format!("{:#}", MigrationConfig::load(&cfg).unwrap_err())
                .contains(&cfg.display().to_string())
        );
        let secrets = dir.join("secrets.toml");
        migration::secret_file::write(
            &secrets,
            "token_secret_id = 1\ntoken_secret = \"c0ffee-not-hex-SECRETVALUE\"\n",
        )
        .unwrap();
        let e = format!("{:#}", token_manager(&secrets).err().unwrap());
        assert!(e.contains("not hex") && !e.contains("SECRETVALUE"), "{e}");
        migration::secret_file::write(
            &secrets,
            "token_secret_id = 1\ntoken_secret = SECRETVALUE\n",
        )
        .unwrap();
        let e = format!("{:#}", token_manager(&secrets).err().unwrap());
        assert!(
            e.contains("token_secret") && !e.contains("SECRETVALUE"),
            "{e}"
        );
        migration::secret_file::write(
            &secrets,
            format!(
                "token_secret_id = 1\ntoken_secret = \"{}\"\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        token_manager(&secrets).unwrap();
        // Readable by others: refused, naming the file and the fix.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", token_manager(&secrets).err().unwrap());
        assert!(
            e.contains(&format!("chmod 600 {}", secrets.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
