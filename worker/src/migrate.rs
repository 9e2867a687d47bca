//! Moving connections between worker processes: the source side (token check, freeze, export,
//! seal, send, wait for the target's confirmation, roll back on failure, forward late datagrams)
//! and the target side (token check, open, import, confirm), over the peer channel: quinn with
//! mutual TLS (every worker presents a certificate signed by the deployment's CA).
//!
//! Peer channel streams:
//! - bidirectional, one per migration: `u32 len | header JSON | sealed snapshot` (the header,
//!   `baton_protocol::peer::TransferHeader`, says the snapshot's length); the
//!   target imports the connection *held* (it sends nothing) and answers one envelope line
//!   (`baton_protocol::envelope`, data `peer::Imported`), FIN. The source then writes the
//!   commit byte and FIN: only now may the target send. A FIN without the commit byte (the source
//!   gave up waiting and rolled back), a reset, a lost peer connection or no commit within
//!   [`commit_wait`] make the target discard the import silently. So at most one worker ever sends
//!   for the connection: the source stops at the freeze and resumes only if it never committed.
//! - unidirectional: forwarded client datagrams, `(u8 len | address text | u32 len | bytes)*`.
//!
//! Who may talk: only the workers listed in `[peer] workers`, by the DNS name of their
//! certificate (the CA alone is not enough: the controller's certificate is from the same CA). A
//! transfer's `source` must be the authenticated peer's server ID; its header and token are
//! checked before any of its snapshot is read, and the snapshot is read in pieces against a
//! deadline and a per-peer byte budget. Forwarded datagrams are handled only for connections
//! imported from the peer that forwards them, from their client's address
//! ([`crate::core::WorkerCore::handle_forwarded`]).
use crate::config::PeerWorker;
use crate::io::WorkerHandle;
use anyhow::{Context, Result};
use baton_protocol::peer::{Imported, MAX_HEADER, PEER_ALPN, TransferHeader};
use baton_protocol::worker::{MigrateOut, MigratedOut, SourceState, SourceStatus, TargetRef};
use baton_protocol::{Cid, ErrorKind, Failure, MigrationId};
use migration::{
    ConnectionId, MigrationBinding, MigrationToken, MigrationTokenManager, SnapshotSealer, WorkerId,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, warn};

/// How long the target may take to answer a transfer (an import takes well under 10 ms), plus
/// [`transfer_timeout`]'s allowance for the snapshot's size. A dead target is noticed only by
/// this timeout, and the connection stays frozen that long: keep it short.
const TRANSFER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Test hook (fault tests only, `test-hooks` feature): the target waits this long after receiving
/// a snapshot, so a test can kill it mid-transfer.
#[cfg(feature = "test-hooks")]
const TEST_IMPORT_DELAY_ENV: &str = "BATON_TEST_IMPORT_DELAY_MS";
/// After `release`, the source keeps forwarding until no datagram has reached it for this long;
/// then it forgets the connection. Datagrams in flight through the LB at the flip end at once,
/// but an LB node that still routes by older state (cut off from etcd, so no longer counted as
/// live by the controller) keeps sending them: forwarding goes on while they come.
const RELEASE_GRACE: Duration = Duration::from_millis(250);
/// The longest a source forwards: a migration the controller never releases (it died) is
/// released after this, and no stream of late datagrams keeps one longer.
const RELEASE_DEADLINE: Duration = Duration::from_secs(30);
/// How often a forwarding task checks whether it was released.
const RELEASE_CHECK_EVERY: Duration = Duration::from_millis(20);
/// The byte by which the source hands the connection over (see the module comment).
const COMMIT: u8 = 0xC1;
/// A transfer's header, token and snapshot length must arrive within this of the stream opening.
const HEADER_DEADLINE: Duration = Duration::from_secs(2);
/// Snapshot bytes being received from one peer at once, all its transfers together: a worker
/// that misbehaves (or is compromised) cannot make this one hold more for it.
const PEER_IMPORT_BUDGET: u64 = 256 << 20;
/// Peer-channel connections one worker may hold to this one at once (it needs one; a restart
/// leaves the old one until it times out).
const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// Transfers (bidirectional streams) and forwarded-datagram batches (unidirectional) a peer
/// connection may have open at once: above `baton drain`'s default concurrency of 16.
const PEER_STREAMS: u32 = 64;
/// Handshakes the peer channel runs at once (a refused one costs only its handshake), all
/// sources together and from one IP address.
const MAX_PEER_HANDSHAKES: usize = 64;
const MAX_PEER_HANDSHAKES_PER_IP: usize = 8;
/// A peer-channel handshake must be done within this (workers on one network take milliseconds).
const PEER_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest forwarded-datagram stream: the source holds at most MAX_FORWARD datagrams of
/// MAX_UDP_PAYLOAD; a batch is a fraction of that.
const MAX_FORWARD_STREAM: usize = 8 << 20;
/// A forwarded-datagram stream must be complete within this.
const FORWARD_STREAM_DEADLINE: Duration = Duration::from_secs(5);

/// The peer channel's TLS: server and client side, both demanding a certificate from the CA;
/// the server admits only the certificates of `workers` (by DNS name).
pub fn peer_tls(
    ca: &Path,
    cert: &Path,
    key: &Path,
    workers: &[PeerWorker],
) -> Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(crate::load_roots(ca)?);
    let (certs, key) = crate::load_tls(cert, key)?;
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()?;
    let names: Vec<String> = workers.iter().map(|w| w.name.clone()).collect();
    let verifier = Arc::new(crate::tls::AllowedNames::new(
        inner,
        crate::tls::dns_names(&names, "peer.workers")?,
        "peer.workers",
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .context("the peer certificate and key do not match")?;
    server.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server)?,
    ));
    let mut server_transport = quinn::TransportConfig::default();
    server_transport
        .max_concurrent_bidi_streams(PEER_STREAMS.into())
        .max_concurrent_uni_streams(PEER_STREAMS.into());
    server.transport_config(Arc::new(server_transport));
    server.max_incoming(MAX_PEER_HANDSHAKES);
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client)?,
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    client.transport_config(Arc::new(transport));
    Ok((server, client))
}

/// Who this worker is, as `info` reports it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub name: String,
    pub server_id: u32,
    /// The CID layout it issues (the controller checks it against the LB's).
    pub cid_layout: baton_protocol::worker::CidLayout,
}

/// Everything the control socket and the peer channel share.
pub struct Ctx {
    pub name: String,
    pub server_id: u32,
    pub peer_addr: SocketAddr,
    /// The CID layout this worker issues (reported in `info`; the controller checks it against
    /// the LB's).
    pub cid_layout: baton_protocol::worker::CidLayout,
    pub handle: WorkerHandle,
    pub tokens: Mutex<MigrationTokenManager>,
    pub pipeline: SnapshotSealer,
    pub endpoint: quinn::Endpoint,
    /// `[peer] workers`: who may connect, as which server ID, and where a migration dials.
    workers: Vec<PeerWorker>,
    worker_names: Vec<rustls::pki_types::DnsName<'static>>,
    /// Per peer server ID: its open peer-channel connections and its import byte budget.
    admitted: Mutex<HashMap<u32, (usize, Arc<tokio::sync::Semaphore>)>>,
    /// Keeps refused handshakes from flooding the log.
    refusal_log: crate::admission::LogLimit,
    /// Places for handshakes under way (per source and in all).
    handshakes: Arc<crate::admission::Admission>,
    peers: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// Exported connections whose datagrams are forwarded until released: migration id -> release time.
    released: Mutex<HashMap<MigrationId, Option<Instant>>>,
    /// Migrations whose `migrate_out` is running here (see [`status`]).
    in_flight: Mutex<HashSet<MigrationId>>,
}

/// Marks a migration in flight for as long as it lives.
struct InFlight<'a>(&'a Mutex<HashSet<MigrationId>>, MigrationId);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().remove(&self.1);
    }
}

impl Ctx {
    pub fn new(
        me: Identity,
        handle: WorkerHandle,
        tokens: MigrationTokenManager,
        pipeline: SnapshotSealer,
        endpoint: quinn::Endpoint,
        workers: Vec<PeerWorker>,
    ) -> Result<Arc<Self>> {
        let peer_addr = endpoint.local_addr()?;
        let names: Vec<String> = workers.iter().map(|w| w.name.clone()).collect();
        let worker_names = crate::tls::dns_names(&names, "peer.workers")?;
        let Identity {
            name,
            server_id,
            cid_layout,
        } = me;
        Ok(Arc::new(Self {
            name,
            server_id,
            peer_addr,
            cid_layout,
            handle,
            tokens: Mutex::new(tokens),
            pipeline,
            endpoint,
            workers,
            worker_names,
            admitted: Default::default(),
            refusal_log: crate::admission::LogLimit::default(),
            handshakes: crate::admission::Admission::new(
                MAX_PEER_HANDSHAKES,
                MAX_PEER_HANDSHAKES_PER_IP,
            ),
            peers: Default::default(),
            released: Default::default(),
            in_flight: Default::default(),
        }))
    }

    /// The configured worker an authenticated peer-channel connection comes from (its
    /// certificate passed the handshake's name check, so one matches).
    fn identify(&self, conn: &quinn::Connection) -> Option<PeerWorker> {
        let certs = conn
            .peer_identity()?
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        let i = crate::tls::matching_name(certs.first()?, &self.worker_names)?;
        Some(self.workers[i].clone())
    }

    /// Counts a connection from `peer` in; None if it already has [`MAX_CONNECTIONS_PER_PEER`].
    fn admit(&self, peer: u32) -> Option<Admitted<'_>> {
        let mut a = self.admitted.lock().unwrap();
        let (n, _) = a.entry(peer).or_insert_with(|| {
            (
                0,
                Arc::new(tokio::sync::Semaphore::new(
                    (PEER_IMPORT_BUDGET >> 10) as usize,
                )),
            )
        });
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Admitted { ctx: self, peer })
    }

    fn import_budget(&self, peer: u32) -> Arc<tokio::sync::Semaphore> {
        self.admitted.lock().unwrap()[&peer].1.clone()
    }

    /// The configured worker a migration goes to: the request names it, `[peer] workers` says
    /// where it is (a request cannot send a snapshot anywhere else).
    fn target(&self, t: &TargetRef) -> Result<PeerWorker, Failure> {
        let w = self
            .workers
            .iter()
            .find(|w| w.name == t.name)
            .ok_or_else(|| {
                Failure::new(
                    ErrorKind::Config,
                    format!(
                        "worker {} is not in this worker's [peer] workers: add it there (name, \
                     server_id, peer) on every worker",
                        t.name
                    ),
                )
            })?;
        if w.server_id != t.server_id {
            return Err(Failure::new(
                ErrorKind::Config,
                format!(
                    "the controller says worker {} has server ID {}, [peer] workers says {}: \
                     make migration.toml and the workers' configs agree",
                    t.name, t.server_id, w.server_id
                ),
            ));
        }
        if w.peer != t.peer {
            tracing::debug!(worker = %w.name, configured = %w.peer, requested = %t.peer,
                "dialling the configured peer address, not the controller's");
        }
        Ok(w.clone())
    }

    async fn peer(&self, addr: SocketAddr, name: &str) -> Result<quinn::Connection, Failure> {
        let mut peers = self.peers.lock().await;
        if let Some(c) = peers.get(&addr).filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let unavailable = |e: &dyn std::fmt::Display| {
            Failure::new(
                ErrorKind::TargetUnavailable,
                format!("cannot reach worker {name} at {addr}: {e}"),
            )
        };
        let connecting = self
            .endpoint
            .connect(addr, name)
            .map_err(|e| unavailable(&e))?;
        let conn = tokio::time::timeout(TRANSFER_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                unavailable(&format!(
                    "no answer within {} ms",
                    TRANSFER_TIMEOUT.as_millis()
                ))
            })?
            .map_err(|e| unavailable(&e))?;
        peers.insert(addr, conn.clone());
        Ok(conn)
    }
}

/// A peer-channel connection counted in [`Ctx::admit`]; counted out when dropped.
struct Admitted<'a> {
    ctx: &'a Ctx,
    peer: u32,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Some((n, _)) = self.ctx.admitted.lock().unwrap().get_mut(&self.peer) {
            *n -= 1;
        }
    }
}

fn binding(
    mid: MigrationId,
    conn: &Cid,
    source: u32,
    target: u32,
) -> Result<MigrationBinding, Failure> {
    Ok(MigrationBinding {
        migration_id: mid,
        connection_id: ConnectionId::new(conn.as_bytes())?,
        source: WorkerId(source),
        target: WorkerId(target),
    })
}

fn cids(c: &[Vec<u8>]) -> Vec<Cid> {
    c.iter().filter_map(|c| Cid::new(c).ok()).collect()
}

/// The source side of one migration; returns once the target confirmed the import (or after the
/// rollback). On success the exported connection's datagrams are forwarded until `release`.
pub async fn migrate_out(ctx: &Arc<Ctx>, req: MigrateOut) -> Result<MigratedOut, Failure> {
    let started = Instant::now();
    // Until it returns (after `released` has the migration on success, so a status asked in
    // between never sees neither).
    ctx.in_flight.lock().unwrap().insert(req.migration_id);
    let _in_flight = InFlight(&ctx.in_flight, req.migration_id);
    let target = ctx.target(&req.target)?;
    let b = binding(
        req.migration_id,
        &req.conn,
        ctx.server_id,
        req.target.server_id,
    )?;
    let tok = MigrationToken::from_bytes(req.token.0.clone());
    if req.test_tamper && !cfg!(feature = "test-hooks") {
        return Err(Failure::new(
            ErrorKind::Config,
            "test_tamper is a fault-test hook; this worker is built without the test-hooks feature",
        ));
    }
    // The source checks the token too: nobody without the secret can make it freeze a connection.
    ctx.tokens
        .lock()
        .unwrap()
        .verify(&b, &tok, SystemTime::now())?;
    let Some(id) = ctx
        .handle
        .find(req.conn.as_bytes().to_vec())
        .await
        .map_err(|e| Failure::new(ErrorKind::Output, e))?
    else {
        return Err(Failure::new(
            ErrorKind::UnknownConnection,
            format!("no connection {} on worker {}", req.conn, ctx.name),
        ));
    };
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(2000));
    let exported = ctx
        .handle
        .migrate_out(id, timeout)
        .await
        .map_err(|e| match e {
            crate::core::ExportFailure::Busy(what) => Failure::new(
                ErrorKind::RequestsInFlight,
                format!(
                    "{what} for {} ms: the migration waits for a boundary between requests at \
                     most timeout_ms; the connection carries on here, try again",
                    timeout.as_millis()
                ),
            ),
            e => Failure::new(
                ErrorKind::Timeout,
                format!("the connection could not be exported in time: {e}; it carries on here"),
            ),
        })?;
    let frozen_at = Instant::now();
    let cids = exported.cids.clone();
    let sent = async {
        #[allow(unused_mut)] // the test-hooks tamper hook writes it
        let mut sealed = ctx.pipeline.seal(&b, &exported.state)?;
        #[cfg(feature = "test-hooks")]
        if req.test_tamper {
            warn!(migration_id = %req.migration_id, "test_tamper: corrupting the sealed snapshot (fault tests only)");
            let mid = sealed.len() / 2;
            sealed[mid] ^= 0x04;
        }
        let conn = ctx.peer(target.peer, &target.name).await?;
        let header = TransferHeader {
            migration_id: req.migration_id,
            conn: req.conn,
            source: ctx.server_id,
            target: req.target.server_id,
            token: req.token.clone(),
            snapshot_len: sealed.len() as u64,
        };
        let limit = transfer_timeout(sealed.len());
        // On timeout the stream is dropped, which finishes it without the commit byte: the
        // target discards its held import.
        let (target_id, mut stream) = tokio::time::timeout(limit, transfer(&conn, &header, &sealed))
            .await
            .map_err(|_| Failure::new(ErrorKind::TargetUnavailable, format!("worker {} did not confirm within {} ms", req.target.name, limit.as_millis())))??;
        stream_commit(&mut stream, req.migration_id).await;
        Ok::<_, Failure>((target_id, conn, sealed.len()))
    }
    .await;
    match sent {
        // Committed (or the commit's fate is unknown): this worker never sends for it again.
        Ok((target_id, conn, size)) => {
            let total = started.elapsed();
            info!(migration_id = %req.migration_id, conn = %req.conn, target = %req.target.name, bytes = size,
                  ms = total.as_millis() as u64, "migrated out; forwarding until released");
            ctx.released.lock().unwrap().insert(req.migration_id, None);
            tokio::spawn(forward_until_released(
                ctx.clone(),
                req.migration_id,
                cids.clone(),
                exported.forward_key,
                conn,
            ));
            Ok(MigratedOut {
                cids: self::cids(&cids),
                target_id,
                snapshot_bytes: size as u64,
                freeze_ms: (frozen_at - started).as_secs_f64() * 1000.0,
                total_ms: total.as_secs_f64() * 1000.0,
            })
        }
        Err(f) => {
            if f.kind == ErrorKind::TargetUnavailable {
                // A dead or restarted target: the next migration dials afresh.
                if let Some(c) = ctx.peers.lock().await.remove(&target.peer) {
                    c.close(0u32.into(), b"unavailable");
                }
            }
            // Roll back: the connection comes back here (its own export), with what arrived meanwhile.
            match ctx.handle.import(exported.state).await {
                Ok(id) => {
                    let kept = ctx.handle.take_forward_for(cids).await.unwrap_or_default();
                    let _ = ctx.handle.inject(kept).await;
                    warn!(migration_id = %req.migration_id, conn = %req.conn, kind = %f.kind, id, "migration rolled back: {}", f.message);
                }
                Err(e) => {
                    warn!(migration_id = %req.migration_id, conn = %req.conn, "rollback failed, connection lost: {e}")
                }
            }
            Err(f)
        }
    }
}

/// The base timeout plus 10 ms per MB of snapshot (a slow link must not cause rollbacks).
fn transfer_timeout(bytes: usize) -> Duration {
    TRANSFER_TIMEOUT + Duration::from_millis(10 * (bytes as u64 >> 20))
}

/// How long a target keeps a held import waiting for the commit byte: longer than the source
/// can still be waiting for the target's answer, so a commit sent in time is never refused.
fn commit_wait(bytes: usize) -> Duration {
    transfer_timeout(bytes) + Duration::from_secs(2)
}

/// Writes the commit byte and FIN. Past this point the source never resumes the connection,
/// even if the write fails: the target may have received it, and two senders would reuse AEAD
/// nonces. (If the target did not get it, it discards the import and the connection is lost:
/// the safe side of the trade-off.)
async fn stream_commit(s: &mut quinn::SendStream, mid: MigrationId) {
    let sent = async {
        s.write_all(&[COMMIT]).await?;
        s.finish()?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = sent {
        warn!(migration_id = %mid, "commit may not have reached the target ({e}); the connection is the target's now");
    }
}

/// Sends the snapshot and waits for the target's answer; on success returns the target's id for
/// the connection and the stream on which to commit.
async fn transfer(
    conn: &quinn::Connection,
    header: &TransferHeader,
    sealed: &[u8],
) -> Result<(u64, quinn::SendStream), Failure> {
    let io = |e: &dyn std::fmt::Display| {
        Failure::new(ErrorKind::TargetUnavailable, format!("peer channel: {e}"))
    };
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| io(&e))?;
    let h = serde_json::to_vec(header).expect("serializable");
    let mut msg = Vec::with_capacity(4 + h.len() + sealed.len());
    msg.extend((h.len() as u32).to_be_bytes());
    msg.extend(&h);
    msg.extend(sealed);
    s.write_all(&msg).await.map_err(|e| io(&e))?;
    let answer = r.read_to_end(64 * 1024).await.map_err(|e| io(&e))?;
    match baton_protocol::decode_answer::<Imported>(&answer).map_err(|e| io(&e))? {
        Ok(Imported { id }) => Ok((id, s)),
        Err(f) => Err(Failure::new(
            f.kind,
            format!("the target refused: {}", f.message),
        )),
    }
}

/// Where this worker, as the source, stands in `migration_id`.
pub fn status(ctx: &Ctx, migration_id: MigrationId) -> SourceStatus {
    let state = if ctx.in_flight.lock().unwrap().contains(&migration_id) {
        SourceState::InFlight
    } else if ctx.released.lock().unwrap().contains_key(&migration_id) {
        SourceState::Forwarding
    } else {
        SourceState::Unknown
    };
    SourceStatus {
        migration_id,
        state,
    }
}

/// Marks a migration released (the LB now routes its CIDs to the target).
pub fn release(ctx: &Ctx, migration_id: MigrationId) -> Result<(), Failure> {
    match ctx.released.lock().unwrap().get_mut(&migration_id) {
        Some(r) => {
            r.get_or_insert_with(Instant::now);
            Ok(())
        }
        None => Err(Failure::new(
            ErrorKind::UnknownMigration,
            format!("no migration {migration_id} awaits release here"),
        )),
    }
}

async fn forward_until_released(
    ctx: Arc<Ctx>,
    mid: MigrationId,
    cids: Vec<Vec<u8>>,
    forward_key: u64,
    conn: quinn::Connection,
) {
    let start = Instant::now();
    let mut last_datagram: Option<Instant> = None;
    let mut forwarded = 0usize;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if ctx.handle.subscribe_forward(forward_key, tx).await.is_err() {
        return;
    }
    loop {
        // Datagrams go out as soon as the loop hands them over; the release is checked between.
        match tokio::time::timeout(RELEASE_CHECK_EVERY, rx.recv()).await {
            Ok(Some(mut batch)) => {
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                forwarded += batch.len();
                last_datagram = Some(Instant::now());
                if let Err(e) = send_datagrams(&conn, &batch).await {
                    warn!(migration_id = %mid, "forwarding to the target failed: {e}");
                }
            }
            // The worker loop ended: nothing more will come.
            Ok(None) => tokio::time::sleep(RELEASE_CHECK_EVERY).await,
            Err(_) => {}
        }
        let released = ctx.released.lock().unwrap().get(&mid).copied().flatten();
        let quiet = last_datagram.is_none_or(|t| t.elapsed() >= RELEASE_GRACE);
        let done = start.elapsed() >= RELEASE_DEADLINE
            || released.is_some_and(|t| t.elapsed() >= RELEASE_GRACE && quiet);
        if done {
            break;
        }
    }
    drop(rx);
    ctx.released.lock().unwrap().remove(&mid);
    let _ = ctx.handle.forget_export(forward_key, cids).await;
    info!(migration_id = %mid, forwarded, "released: connection forgotten here");
}

async fn send_datagrams(conn: &quinn::Connection, d: &[(SocketAddr, Vec<u8>)]) -> Result<()> {
    let buf = encode_datagrams(d);
    let mut s = conn.open_uni().await?;
    s.write_all(&buf).await?;
    s.finish()?;
    Ok(())
}

/// The forwarded-datagram stream's bytes (module comment). The address is the client's, as
/// `SocketAddr` prints it: `192.0.2.1:5000` or `[2001:db8::1]:5000` (at most 55 bytes with
/// a scope id, so its length fits the u8).
pub fn encode_datagrams(d: &[(SocketAddr, Vec<u8>)]) -> Vec<u8> {
    let mut buf = Vec::new();
    for (from, data) in d {
        let a = from.to_string();
        buf.push(a.len() as u8);
        buf.extend(a.as_bytes());
        buf.extend((data.len() as u32).to_be_bytes());
        buf.extend(data);
    }
    buf
}

fn parse_datagrams(mut b: &[u8]) -> Option<Vec<(SocketAddr, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let n = *b.first()? as usize;
        let addr: SocketAddr = std::str::from_utf8(b.get(1..1 + n)?).ok()?.parse().ok()?;
        b = &b[1 + n..];
        let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        out.push((addr, b.get(4..4 + len)?.to_vec()));
        b = &b[4 + len..];
    }
    Some(out)
}

/// How long the health check waits for each peer.
const HEALTH_PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// The migration machinery's health: key ids held (never the keys) and whether every configured
/// peer answers on the peer channel (a fresh handshake with each in turn, within
/// [`HEALTH_PEER_TIMEOUT`]).
pub async fn health(ctx: &Arc<Ctx>) -> baton_protocol::worker::Health {
    let (token_secret_ids, token_secret_id) = {
        let t = ctx.tokens.lock().unwrap();
        (t.secret_ids(), t.current_secret_id())
    };
    let keys = &ctx.pipeline.encryption;
    let mut peers = Vec::new();
    for w in ctx.workers.iter().filter(|w| w.server_id != ctx.server_id) {
        let started = Instant::now();
        // A fresh handshake, not the cached connection: that one outlives a dead peer until
        // its idle timeout.
        let dial = async {
            let c = ctx.endpoint.connect(w.peer, &w.name)?.await?;
            c.close(0u32.into(), b"health check");
            anyhow::Ok(())
        };
        let reached = tokio::time::timeout(HEALTH_PEER_TIMEOUT, dial).await;
        let error = match reached {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!(
                "no answer within {} ms",
                HEALTH_PEER_TIMEOUT.as_millis()
            )),
        };
        peers.push(baton_protocol::worker::PeerHealth {
            name: w.name.clone(),
            server_id: w.server_id,
            peer: w.peer,
            error,
            ms: started.elapsed().as_secs_f64() * 1000.0,
        });
    }
    baton_protocol::worker::Health {
        token_secret_ids,
        token_secret_id,
        snapshot_key_ids: keys.key_ids(),
        snapshot_key_id: keys.active_key_id(),
        peers,
    }
}

/// Serves the peer channel: imports from other workers, and datagrams they forward.
pub async fn serve_peer(ctx: Arc<Ctx>) {
    while let Some(incoming) = ctx.endpoint.accept().await {
        let ctx = ctx.clone();
        let remote = incoming.remote_address();
        let Ok((mut handshake, _)) = ctx.handshakes.admit(remote.ip()) else {
            if let Some(left_out) = ctx.refusal_log.allow() {
                warn!(%remote, max = MAX_PEER_HANDSHAKES_PER_IP, left_out, "peer channel: too many handshakes from this source; refused");
            }
            incoming.refuse();
            continue;
        };
        tokio::spawn(async move {
            let conn = tokio::select! {
                c = tokio::time::timeout(PEER_HANDSHAKE_DEADLINE, incoming) => c,
                // Every place was taken and this was the oldest: dropping it ends the handshake.
                () = handshake.cut_off() => return,
            };
            let refused = |why: &dyn std::fmt::Display| {
                if let Some(left_out) = ctx.refusal_log.allow() {
                    warn!(%remote, left_out, "peer channel: {why}");
                }
            };
            let conn = match conn {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return refused(&format_args!(
                        "handshake refused or failed (only the workers in [peer] workers, with certificates from our CA, are admitted): {e}"
                    ));
                }
                Err(_) => {
                    return refused(&format_args!(
                        "handshake not done within {} s; dropped",
                        PEER_HANDSHAKE_DEADLINE.as_secs()
                    ));
                }
            };
            drop(handshake);
            let Some(peer) = ctx.identify(&conn) else {
                // The verifier admitted it, so this is not expected; refuse all the same.
                warn!(%remote, "peer channel: cannot tell which worker this is; closing");
                conn.close(1u32.into(), b"unknown peer");
                return;
            };
            let Some(_admitted) = ctx.admit(peer.server_id) else {
                warn!(%remote, worker = %peer.name, max = MAX_CONNECTIONS_PER_PEER, "peer channel: too many connections from this worker; closing the newest");
                conn.close(2u32.into(), b"too many connections");
                return;
            };
            loop {
                tokio::select! {
                    bi = conn.accept_bi() => match bi {
                        Ok((s, r)) => { tokio::spawn(answer_import(ctx.clone(), peer.clone(), s, r)); }
                        Err(_) => break,
                    },
                    uni = conn.accept_uni() => match uni {
                        Ok(r) => { tokio::spawn(take_forwarded(ctx.clone(), peer.clone(), r)); }
                        Err(_) => break,
                    },
                }
            }
        });
    }
}

/// One forwarded-datagram stream from `peer`: bounded in size and time, then handed to the
/// worker loop, which accepts only what is for connections imported from `peer`.
async fn take_forwarded(ctx: Arc<Ctx>, peer: PeerWorker, mut r: quinn::RecvStream) {
    let read = tokio::time::timeout(FORWARD_STREAM_DEADLINE, r.read_to_end(MAX_FORWARD_STREAM));
    match read.await {
        Ok(Ok(b)) => match parse_datagrams(&b) {
            Some(d) => {
                let _ = ctx.handle.inject_from_peer(peer.server_id, d).await;
            }
            None => warn!(worker = %peer.name, "malformed forwarded datagrams from a peer"),
        },
        Ok(Err(e)) => warn!(worker = %peer.name, "forwarded datagrams cut short or too large: {e}"),
        Err(_) => {
            warn!(worker = %peer.name, "forwarded datagrams not complete within {} s", FORWARD_STREAM_DEADLINE.as_secs())
        }
    }
}

async fn answer_import(
    ctx: Arc<Ctx>,
    peer: PeerWorker,
    mut s: quinn::SendStream,
    mut r: quinn::RecvStream,
) {
    let (reply, held) = match import(&ctx, &peer, &mut r).await {
        Ok((id, mid, size)) => (Ok(Imported { id: id as u64 }), Some((id, mid, size))),
        Err(f) => {
            warn!(worker = %peer.name, kind = %f.kind, "import refused: {}", f.message);
            (Err(f), None)
        }
    };
    let _ = s.write_all(&baton_protocol::encode_answer(&reply)).await;
    let _ = s.finish();
    let Some((id, mid, size)) = held else {
        return;
    };
    let mut byte = [0u8; 1];
    let outcome = tokio::time::timeout(commit_wait(size), r.read_exact(&mut byte)).await;
    match outcome {
        Ok(Ok(())) if byte[0] == COMMIT => match ctx.handle.commit(id).await {
            Ok(true) => info!(migration_id = %mid, id, "committed: the connection is ours"),
            other => {
                warn!(migration_id = %mid, id, "commit for a connection that is not held here: {other:?}")
            }
        },
        outcome => {
            let why = match outcome {
                Ok(Ok(())) => "a byte that is not the commit".to_string(),
                Ok(Err(e)) => format!("no commit ({e})"),
                Err(_) => "no commit in time".to_string(),
            };
            warn!(migration_id = %mid, id, "the source did not commit ({why}): discarding the import; the source keeps the connection");
            let _ = ctx.handle.discard(id).await;
        }
    }
}

/// Reads, checks and imports (held) one transfer from `peer`: returns the connection id, the
/// migration id and the sealed snapshot's size. The header and token are checked before any of
/// the snapshot is read; the snapshot is read in pieces, against a deadline and `peer`'s budget.
async fn import(
    ctx: &Ctx,
    peer: &PeerWorker,
    r: &mut quinn::RecvStream,
) -> Result<(usize, MigrationId, usize), Failure> {
    let io = |e: &dyn std::fmt::Display| {
        Failure::new(
            ErrorKind::StateCorruption,
            format!("transfer cut short: {e}"),
        )
    };
    let opened = tokio::time::Instant::now();
    let late = || {
        Failure::new(
            ErrorKind::Timeout,
            format!(
                "the transfer header did not arrive within {} s",
                HEADER_DEADLINE.as_secs()
            ),
        )
    };
    let (header, len) = tokio::time::timeout_at(opened + HEADER_DEADLINE, async {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await.map_err(|e| io(&e))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_HEADER {
            return Err(io(&format!("header of {len} bytes (at most {MAX_HEADER})")));
        }
        let mut h = vec![0u8; len];
        r.read_exact(&mut h).await.map_err(|e| io(&e))?;
        let header: TransferHeader = serde_json::from_slice(&h).map_err(|e| io(&e))?;
        let len = header.snapshot_len;
        Ok::<_, Failure>((header, len))
    })
    .await
    .map_err(|_| late())??;
    if header.target != ctx.server_id {
        return Err(Failure::new(
            ErrorKind::TargetUnavailable,
            format!(
                "this is worker {} (server ID {}), not server ID {}",
                ctx.name, ctx.server_id, header.target
            ),
        ));
    }
    if header.source != peer.server_id {
        return Err(Failure::new(
            ErrorKind::Unauthorized,
            format!(
                "worker {} (server ID {}) sent a transfer as server ID {}",
                peer.name, peer.server_id, header.source
            ),
        ));
    }
    let b = binding(
        header.migration_id,
        &header.conn,
        header.source,
        header.target,
    )?;
    let token = MigrationToken::from_bytes(header.token.0.clone());
    ctx.tokens
        .lock()
        .unwrap()
        .verify(&b, &token, SystemTime::now())?;
    // Refused before reading (the largest envelope the sealer opens: migration::envelope).
    let max = ctx.pipeline.max_sealed_len() as u64;
    if len > max {
        return Err(Failure::new(
            ErrorKind::SnapshotTooLarge,
            format!("{len} bytes (at most {max})"),
        ));
    }
    let len = len as usize;
    // Held until the import is done: the peer's snapshots in memory stay within its budget.
    let budget = ctx.import_budget(peer.server_id);
    let deadline = opened + transfer_timeout(len);
    let _permits = tokio::time::timeout_at(
        deadline,
        budget.acquire_many_owned(((len >> 10) + 1) as u32),
    )
    .await
    .map_err(|_| {
        Failure::new(
            ErrorKind::RateLimited,
            format!(
                "worker {} has {} MiB of snapshots in transfer already",
                peer.name,
                PEER_IMPORT_BUDGET >> 20
            ),
        )
    })?
    .expect("the budget semaphore is never closed");
    let sealed = tokio::time::timeout_at(deadline, read_snapshot(r, len))
        .await
        .map_err(|_| {
            Failure::new(
                ErrorKind::Timeout,
                format!("the snapshot of {len} bytes did not arrive in time"),
            )
        })?
        .map_err(|e| io(&e))?;
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = std::env::var(TEST_IMPORT_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        warn!(
            ms,
            "{TEST_IMPORT_DELAY_ENV} set: delaying the import (fault tests only)"
        );
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let size = sealed.len();
    let state = ctx.pipeline.open(&b, sealed)?;
    let id = ctx
        .handle
        .import_held_from(state, peer.server_id)
        .await
        .map_err(|e| Failure::new(ErrorKind::InvalidSnapshot, e))?;
    info!(migration_id = %header.migration_id, conn = %header.conn, source = header.source, id, "imported, held until the source commits");
    Ok((id, header.migration_id, size))
}

/// Reads exactly `len` snapshot bytes, growing the buffer as they arrive (not allocating what
/// the header announced up front).
async fn read_snapshot(r: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>> {
    let mut sealed = Vec::with_capacity(len.min(1 << 20));
    while sealed.len() < len {
        let want = (len - sealed.len()).min(64 << 10);
        match r.read_chunk(want, true).await? {
            Some(chunk) => sealed.extend_from_slice(&chunk.bytes),
            None => anyhow::bail!("stream ended after {} of {len} bytes", sealed.len()),
        }
    }
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_datagrams_keep_ipv4_and_ipv6_client_addresses() {
        let d: Vec<(SocketAddr, Vec<u8>)> = vec![
            ("192.0.2.1:5000".parse().unwrap(), vec![0x40, 1, 2, 3]),
            ("[2001:db8::1]:443".parse().unwrap(), vec![0x41; 1200]),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
                    .parse()
                    .unwrap(),
                Vec::new(),
            ),
            ("[::ffff:192.0.2.1]:5001".parse().unwrap(), vec![7]),
        ];
        assert_eq!(parse_datagrams(&encode_datagrams(&d)), Some(d));
        assert_eq!(parse_datagrams(&[]), Some(Vec::new()));
        // Cut short anywhere: refused, never half-read.
        let bytes = encode_datagrams(&[("[2001:db8::1]:443".parse().unwrap(), vec![1, 2, 3])]);
        for cut in 1..bytes.len() {
            assert_eq!(parse_datagrams(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}
