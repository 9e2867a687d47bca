//! The worker's sans-IO core: one quinn-proto endpoint, its connections and their application
//! sessions, plus freeze / export / import of single connections.
use crate::limits::Limits;
use crate::service::{AppSession, Service};
use baton_handoff::capture::{HandoffTls, KeyState};
use baton_handoff::cid::LbCidGenerator;
use baton_handoff::handoff::NotQuiescent;
use bytes::BytesMut;
use lb_common::cid::CidLayout;
use migration::ConnectionState;
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, EndpointEvent, Event,
    ServerConfig,
};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

/// Datagrams kept for exported connections until the importer takes them; beyond this they are
/// dropped (QUIC retransmits), so a flood cannot grow the buffer without bound.
pub const MAX_FORWARD: usize = 4096;

/// A datagram to send.
#[derive(Debug)]
pub struct Outgoing {
    pub destination: SocketAddr,
    pub src_ip: Option<IpAddr>,
    /// ECN codepoint bits to set
    pub ecn: Option<u8>,
    /// With GSO: `data` holds several datagrams of this size (the last may be shorter)
    pub segment_size: Option<usize>,
    pub data: Vec<u8>,
}

impl Outgoing {
    fn from_transmit(t: &quinn_proto::Transmit, buf: &[u8]) -> Self {
        Self {
            destination: t.destination,
            src_ip: t.src_ip,
            ecn: t.ecn.map(|e| e as u8),
            segment_size: t.segment_size,
            data: buf[..t.size].to_vec(),
        }
    }
}

/// A connection as the worker lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub id: usize,
    /// Stable name of the connection (the client's first Initial DCID); survives migrations.
    pub key: Vec<u8>,
    pub remote: SocketAddr,
    /// The VIP the client talks to (every packet of the connection is sent from it).
    pub vip: Option<IpAddr>,
    pub frozen: bool,
    /// Imported, waiting for the source's commit (sends nothing yet).
    pub held: bool,
    /// Local CIDs the client may still use (retired ones are gone): what the LB must route here.
    pub cids: Vec<Vec<u8>>,
}

/// Why a connection could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportFailure {
    #[error("no connection {0}")]
    Unknown(usize),
    #[error("connection is not frozen")]
    NotFrozen,
    #[error("cannot be exported yet: {0}")]
    NotQuiescent(NotQuiescent),
    #[error("keys unavailable")]
    Keys,
    /// The application has work in flight that must finish first (an HTTP request).
    #[error("the application is busy: {0}")]
    Busy(&'static str),
    /// The worker's loop is gone (the worker is shutting down).
    #[error("worker loop ended")]
    LoopEnded,
}

/// Why an import was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImportFailure {
    #[error("bad handoff bytes: {0}")]
    Decode(String),
    #[error(transparent)]
    Restore(#[from] crate::service::RestoreError),
    #[error("quinn refused: {0}")]
    Import(#[from] baton_handoff::handoff::ImportError),
    /// The connection was sent from a VIP this worker does not serve: it could not reply from
    /// the address its client talks to.
    #[error("the connection's VIP {0} is not one of this worker's VIPs ({1})")]
    NotOurVip(IpAddr, String),
}

/// An exported connection: the state for the importer and the CIDs that now route elsewhere.
pub struct Exported {
    /// The QUIC handoff and the application state (secrets included, zeroized on drop): send
    /// only sealed ([`migration::SnapshotSealer`]), over an authenticated channel.
    pub state: ConnectionState,
    pub cids: Vec<Vec<u8>>,
    /// Names this export's buffer of late datagrams ([`WorkerCore::take_forward_of`]).
    pub forward_key: u64,
}

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exported")
            .field("state", &self.state)
            .field("cids", &self.cids.len())
            .finish()
    }
}

struct Live {
    /// See [`ConnInfo::key`].
    key: Vec<u8>,
    conn: Connection,
    keys: Arc<KeyState>,
    app: Box<dyn AppSession>,
    frozen: bool,
    /// Imported but not yet committed by the source: it must not send (the source may still be
    /// the sender), so nothing is transmitted until [`WorkerCore::commit`].
    held: bool,
    /// The timer last queued in [`WorkerCore::timers`] for this connection.
    timer: Option<Instant>,
    /// CIDs this import took out of [`WorkerCore::exported`] (with their forward key); put back
    /// if the import is discarded.
    reclaimed: Vec<(Vec<u8>, u64)>,
}

/// A freeze waiting until the connection can be exported. Packets in flight and unacknowledged
/// data move with it, so this is normally settled at the next drive; what can hold it up is a
/// path validation or stream reset under way, or events the application has not taken yet.
struct PendingExport {
    deadline: Instant,
}

/// How the worker is set up.
pub struct CoreConfig {
    pub server_id: u64,
    pub layout: CidLayout,
    pub certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    /// The VIPs clients talk to (IPv4 and IPv6 alike). Each connection sends from the one its
    /// client addressed; an import from a VIP not listed here is refused.
    pub vips: Vec<IpAddr>,
    /// Whether the socket never fragments (path MTU discovery may then probe upwards)
    pub allow_mtud: bool,
    /// The QUIC windows granted to each connection (`[limits]`; what its services buffer is
    /// the service's to bound, see [`crate::service::AppSession`]).
    pub limits: Limits,
}

/// Largest UDP payload one send may carry, all GSO segments together: an IPv4 packet is at most
/// 65,535 bytes with its 20-byte header and the 8-byte UDP header (IPv6 allows 20 bytes more;
/// the smaller bound serves both). A larger GSO batch is refused with EMSGSIZE as a whole.
pub const MAX_UDP_SEND: usize = 65_535 - 20 - 8;

/// How many datagrams of `segment_size` bytes one send may carry: what GSO takes
/// (`max_gso_segments`) and what fits in [`MAX_UDP_SEND`]; at least one.
pub fn send_batch_limit(max_gso_segments: usize, segment_size: usize) -> usize {
    max_gso_segments
        .min(MAX_UDP_SEND / segment_size.max(1))
        .max(1)
}

/// Everything `conn` may send now, into `out`.
fn transmit(
    conn: &mut Connection,
    now: Instant,
    max_datagrams: usize,
    buf: &mut Vec<u8>,
    out: &mut Vec<Outgoing>,
) {
    // quinn fills a batch with datagrams of the path's current MTU (probes go alone).
    let max_datagrams = send_batch_limit(max_datagrams, conn.current_mtu().into());
    while let Some(t) = conn.poll_transmit(now, max_datagrams, buf) {
        out.push(Outgoing::from_transmit(&t, buf));
        buf.clear();
    }
}

/// Queues `live`'s timer in `timers` if it moved.
fn refresh_timer(
    timers: &mut BinaryHeap<Reverse<(Instant, ConnectionHandle)>>,
    ch: ConnectionHandle,
    live: &mut Live,
) {
    let timer = live.conn.poll_timeout();
    if timer != live.timer {
        live.timer = timer;
        if let Some(t) = timer {
            timers.push(Reverse((t, ch)));
        }
    }
}

pub struct WorkerCore {
    server_id: u64,
    layout: CidLayout,
    vips: Vec<IpAddr>,
    endpoint: Endpoint,
    tls: HandoffTls,
    server_config: ServerConfig,
    service: Arc<dyn Service>,
    conns: HashMap<ConnectionHandle, Live>,
    /// Connections to drive on the next [`poll`](WorkerCore::poll): they received a datagram or
    /// an event, or a command changed them. Only these and those whose timer is due are driven,
    /// so the cost of a poll follows the traffic, not the number of connections.
    dirty: HashSet<ConnectionHandle>,
    /// Connections whose session had data to read and no room in the worker's buffer budget:
    /// driven again at every poll until they have read (their clients wait for flow-control
    /// credit, so no packet of theirs may come to wake them).
    starved: HashSet<ConnectionHandle>,
    /// Connection timers, earliest first. Stale entries (the connection's timer moved) are skipped.
    timers: BinaryHeap<Reverse<(Instant, ConnectionHandle)>>,
    /// Frozen connections waiting until they can be exported, tried again each time they are driven.
    pending_exports: HashMap<ConnectionHandle, PendingExport>,
    /// Outcomes of pending exports, for [`take_export_results`](WorkerCore::take_export_results).
    export_results: Vec<(usize, Result<Exported, ExportFailure>)>,
    /// CIDs of connections exported from here -> their export's forward key; datagrams for them
    /// are kept for the importer, one buffer per export.
    exported: HashMap<Vec<u8>, u64>,
    forward: HashMap<u64, Vec<(SocketAddr, Vec<u8>)>>,
    /// Datagrams held in `forward`, all exports together (bounded by [`MAX_FORWARD`]).
    forward_len: usize,
    next_forward_key: u64,
    /// The CIDs of connections imported from another worker, by which that worker may forward
    /// the datagrams that still reach it: only these, from that worker, from the client's
    /// address, a bounded number for a bounded time (see [`handle_forwarded`](Self::handle_forwarded)).
    forwardable: HashMap<Vec<u8>, Forwardable>,
    /// Forwarded datagrams refused (see `forwardable`): the log says how many so far.
    forwarded_refused: u64,
    /// Connections whose sessions asked to be driven (from their own tasks).
    woken: Arc<Woken>,
}

/// Connections woken by their sessions' own tasks ([`crate::service::AppSession::attach`]),
/// and what tells the I/O loop.
#[derive(Default)]
pub struct Woken {
    pending: std::sync::Mutex<Vec<ConnectionHandle>>,
    /// Notified at each wake; the I/O loop waits on it beside its socket and commands.
    pub notify: tokio::sync::Notify,
}

impl Woken {
    fn wake(&self, ch: ConnectionHandle) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ch);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<ConnectionHandle> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What a peer may forward for one CID of a connection imported from it.
struct Forwardable {
    ch: ConnectionHandle,
    /// The server ID of the worker it was imported from.
    source: u32,
    /// The client's address at the export: the only address forwarded datagrams may claim, so
    /// no peer can make this worker send to an address the client never used.
    client: SocketAddr,
    /// Datagrams still accepted for this CID (the source holds at most [`MAX_FORWARD`] of all
    /// its exports at once, so more than that from one CID is not forwarding).
    left: usize,
    until: Instant,
}

/// How long after an import its source may still forward datagrams: the source forwards until
/// the controller releases it, or at most 30 s (`RELEASE_DEADLINE` in migrate.rs), plus slack.
const FORWARDABLE_FOR: Duration = Duration::from_secs(40);

impl WorkerCore {
    pub fn new(config: CoreConfig, service: Arc<dyn Service>) -> anyhow::Result<Self> {
        let CoreConfig {
            server_id,
            layout,
            certs,
            key,
            vips,
            allow_mtud,
            limits,
        } = config;
        limits.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(!vips.is_empty(), "no VIP: a worker serves at least one");
        LbCidGenerator::new(layout, server_id).map_err(|e| anyhow::anyhow!("server id: {e}"))?;
        let tls = HandoffTls::new(certs, key, &[service.alpn()])?;
        let mut endpoint_config = EndpointConfig::default();
        endpoint_config.cid_generator(move || {
            Box::new(LbCidGenerator::new(layout, server_id).expect("validated"))
        });
        let mut server_config = ServerConfig::with_crypto(tls.endpoint_crypto());
        server_config.transport_config(Arc::new(limits.transport()));
        let endpoint = Endpoint::new(
            Arc::new(endpoint_config),
            Some(Arc::new(server_config.clone())),
            allow_mtud,
            None,
        );
        Ok(Self {
            server_id,
            layout,
            vips,
            endpoint,
            tls,
            server_config,
            service,
            conns: HashMap::new(),
            dirty: HashSet::new(),
            starved: HashSet::new(),
            timers: BinaryHeap::new(),
            pending_exports: HashMap::new(),
            export_results: Vec::new(),
            exported: HashMap::new(),
            forward: HashMap::new(),
            forward_len: 0,
            next_forward_key: 0,
            forwardable: HashMap::new(),
            forwarded_refused: 0,
            woken: Arc::default(),
        })
    }

    /// What the sessions' own tasks wake: the I/O loop waits on its `notify`.
    pub fn woken(&self) -> Arc<Woken> {
        self.woken.clone()
    }

    fn wake_for(&self, ch: ConnectionHandle) -> crate::service::WakeCore {
        let woken = self.woken.clone();
        Arc::new(move || woken.wake(ch))
    }

    pub fn server_id(&self) -> u64 {
        self.server_id
    }

    fn dcid<'a>(&self, data: &'a [u8]) -> Option<&'a [u8]> {
        if *data.first()? & 0x80 != 0 {
            let len = *data.get(5)? as usize;
            data.get(6..6 + len)
        } else {
            data.get(1..1 + self.layout.cid_len())
        }
    }

    /// The VIP a datagram from `remote` was meant for when the receiver does not know: the first
    /// of the same address family.
    fn vip_for(&self, remote: SocketAddr) -> Option<IpAddr> {
        self.vips
            .iter()
            .copied()
            .find(|v| v.is_ipv4() == remote.is_ipv4())
    }

    /// Handles one received datagram from `remote` to `local` (the VIP it was sent to; None: the
    /// first VIP of the remote's address family). A new connection replies from `local` for its
    /// whole life. Endpoint-level answers (version negotiation, refusals) go to `out`.
    pub fn handle(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: Option<IpAddr>,
        ecn: Option<u8>,
        data: BytesMut,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(cid) = self.dcid(&data) {
            if let Some(&key) = self.exported.get(cid) {
                if self.forward_len < MAX_FORWARD {
                    self.forward
                        .entry(key)
                        .or_default()
                        .push((remote, data.to_vec()));
                    self.forward_len += 1;
                } else {
                    debug!("forward buffer full: dropping a datagram for an exported connection");
                }
                return;
            }
        }
        let mut buf = Vec::new();
        let ecn = ecn.and_then(quinn_proto::EcnCodepoint::from_bits);
        let local = local.or_else(|| self.vip_for(remote));
        match self
            .endpoint
            .handle(now, remote, local, ecn, data, &mut buf)
        {
            Some(DatagramEvent::NewConnection(incoming)) => {
                let key = incoming.orig_dst_cid().to_vec();
                let (crypto, keys) = self.tls.connection_crypto();
                let mut config = self.server_config.clone();
                config.crypto = crypto;
                match self
                    .endpoint
                    .accept(incoming, now, &mut buf, Some(Arc::new(config)))
                {
                    Ok((ch, conn)) => {
                        info!(id = ch.0, %remote, vip = ?local, "connection accepted");
                        let mut app = self.service.new_session();
                        app.attach(self.wake_for(ch));
                        self.conns.insert(
                            ch,
                            Live {
                                key,
                                conn,
                                keys,
                                app,
                                frozen: false,
                                held: false,
                                timer: None,
                                reclaimed: Vec::new(),
                            },
                        );
                        self.dirty.insert(ch);
                    }
                    Err(e) => {
                        debug!(%remote, "accept failed: {}", e.cause);
                        if let Some(t) = e.response {
                            out.push(Outgoing::from_transmit(&t, &buf));
                        }
                    }
                }
            }
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(live) = self.conns.get_mut(&ch) {
                    live.conn.handle_event(event);
                    self.dirty.insert(ch);
                }
            }
            Some(DatagramEvent::Response(t)) => {
                out.push(Outgoing::from_transmit(&t, &buf));
            }
            None => {}
        }
    }

    /// Drives the connections that need it (see [`WorkerCore::dirty`] and the timers): timers,
    /// events, the application, transmission, and exports waiting to happen.
    /// `max_datagrams` > 1 lets a transmit carry several datagrams for GSO.
    pub fn poll(&mut self, now: Instant, max_datagrams: usize, out: &mut Vec<Outgoing>) {
        while let Some(&Reverse((at, ch))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.conns.get(&ch).is_some_and(|l| l.timer == Some(at)) {
                self.dirty.insert(ch);
            }
        }
        // Freezes past their deadline are settled even if the connection is idle.
        for (&ch, p) in &self.pending_exports {
            if p.deadline <= now {
                self.dirty.insert(ch);
            }
        }
        self.dirty.extend(self.starved.drain());
        self.dirty.extend(self.woken.take());
        let mut buf = Vec::new();
        for ch in std::mem::take(&mut self.dirty) {
            let Some(live) = self.conns.get_mut(&ch) else {
                continue;
            };
            let mut drained = false;
            if live.conn.poll_timeout().is_some_and(|t| t <= now) {
                live.conn.handle_timeout(now);
            }
            while let Some(ev) = live.conn.poll_endpoint_events() {
                drained |= ev.is_drained();
                if let Some(ev) = self.endpoint.handle_event(ch, ev) {
                    live.conn.handle_event(ev);
                }
            }
            while let Some(ev) = live.conn.poll() {
                if let Event::ConnectionLost { reason } = ev {
                    info!(id = ch.0, "connection closed: {reason}");
                }
            }
            if live.app.drive(&mut live.conn, live.frozen).starved {
                self.starved.insert(ch);
            }
            if !live.held {
                transmit(&mut live.conn, now, max_datagrams, &mut buf, out);
            }
            refresh_timer(&mut self.timers, ch, live);
            if drained {
                self.conns.remove(&ch);
                if self.pending_exports.remove(&ch).is_some() {
                    self.export_results
                        .push((ch.0, Err(ExportFailure::Unknown(ch.0))));
                }
                continue;
            }
            if let Some(p) = self.pending_exports.get(&ch) {
                let deadline = p.deadline;
                match self.export(ch.0, now) {
                    Err(ExportFailure::NotQuiescent(reason)) if now < deadline => {
                        debug!(id = ch.0, %reason, "waiting until the connection can be exported");
                    }
                    Err(ExportFailure::Busy(reason)) if now < deadline => {
                        debug!(id = ch.0, reason, "waiting until the application is done");
                    }
                    result => {
                        self.pending_exports.remove(&ch);
                        if let Err(e) = &result {
                            self.unfreeze(ch.0);
                            warn!(id = ch.0, "migration rolled back: {e}");
                        }
                        self.export_results.push((ch.0, result));
                    }
                }
            }
        }
        // A connection whose timer keeps moving (e.g. the idle timeout, pushed back by every
        // packet of an upload) leaves stale heap entries until their time passes: rebuild the
        // heap from the live timers once they outnumber the connections.
        if self.timers.len() > 2 * self.conns.len() + 1024 {
            self.timers = self
                .conns
                .iter()
                .filter_map(|(&ch, l)| l.timer.map(|t| Reverse((t, ch))))
                .collect();
        }
    }

    /// When [`poll`](Self::poll) must run next at the latest (None: only on input).
    pub fn next_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, ch))) = self.timers.peek() {
            if self.conns.get(&ch).is_some_and(|l| l.timer == Some(at)) {
                break;
            }
            self.timers.pop();
        }
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let deadline = self.pending_exports.values().map(|p| p.deadline).min();
        timer.into_iter().chain(deadline).min()
    }

    /// Whether a datagram, event or command left work for [`poll`](Self::poll).
    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Freezes connection `id` and exports it as soon as it can be (checked each time it is
    /// driven), or un-freezes it at `deadline`. The outcome comes out of
    /// [`take_export_results`](Self::take_export_results). False if there is no such connection
    /// or it is already being exported.
    pub fn begin_export(&mut self, id: usize, deadline: Instant) -> bool {
        let ch = ConnectionHandle(id);
        if self.pending_exports.contains_key(&ch) || !self.freeze(id) {
            return false;
        }
        self.pending_exports.insert(ch, PendingExport { deadline });
        true
    }

    /// Outcomes of exports begun with [`begin_export`](Self::begin_export): (id, result).
    pub fn take_export_results(&mut self) -> Vec<(usize, Result<Exported, ExportFailure>)> {
        std::mem::take(&mut self.export_results)
    }

    pub fn connections(&self) -> Vec<ConnInfo> {
        let mut v: Vec<ConnInfo> = self
            .conns
            .iter()
            .map(|(&ch, l)| ConnInfo {
                id: ch.0,
                key: l.key.clone(),
                remote: l.conn.remote_address(),
                vip: l.conn.local_ip(),
                frozen: l.frozen,
                held: l.held,
                cids: self
                    .endpoint
                    .local_cids(ch)
                    .into_iter()
                    .map(|(_, c)| c.to_vec())
                    .collect(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    fn find(&self, id: usize) -> Option<ConnectionHandle> {
        let ch = ConnectionHandle(id);
        self.conns.contains_key(&ch).then_some(ch)
    }

    /// Stop taking new application work on a connection (it keeps reading and acknowledging).
    pub fn freeze(&mut self, id: usize) -> bool {
        self.set_frozen(id, true)
    }

    fn set_frozen(&mut self, id: usize, frozen: bool) -> bool {
        let ch = ConnectionHandle(id);
        let Some(live) = self.conns.get_mut(&ch) else {
            return false;
        };
        live.frozen = frozen;
        self.dirty.insert(ch);
        true
    }

    /// Undo [`freeze`](Self::freeze) (rollback of a migration that did not happen).
    pub fn unfreeze(&mut self, id: usize) -> bool {
        self.set_frozen(id, false)
    }

    /// Exports a frozen connection if it can be exported now. On success the connection is gone from
    /// this worker and datagrams for its CIDs are kept for [`take_forward`](Self::take_forward).
    pub fn export(&mut self, id: usize, now: Instant) -> Result<Exported, ExportFailure> {
        let ch = self.find(id).ok_or(ExportFailure::Unknown(id))?;
        let live = self.conns.remove(&ch).expect("found");
        if !live.frozen {
            self.conns.insert(ch, live);
            return Err(ExportFailure::NotFrozen);
        }
        if let Err(reason) = live.app.movable() {
            self.conns.insert(ch, live);
            return Err(ExportFailure::Busy(reason));
        }
        // The connection moves out; the rest of `live` stays for the refusal path.
        let conn = live.conn;
        match baton_handoff::export(&mut self.endpoint, ch, conn, &live.keys, now) {
            Ok(handoff) => {
                let cids: Vec<Vec<u8>> = handoff
                    .connection
                    .local_cids
                    .iter()
                    .map(|(_, c)| c.to_vec())
                    .collect();
                let forward_key = self.next_forward_key;
                self.next_forward_key += 1;
                for c in &cids {
                    self.exported.insert(c.clone(), forward_key);
                }
                let state = ConnectionState::new(
                    baton_handoff::wire::encode(&handoff),
                    Zeroizing::new(live.app.capture()),
                );
                info!(
                    id,
                    cids = cids.len(),
                    handoff_bytes = state.handoff.len(),
                    app_bytes = state.app.len(),
                    "connection exported"
                );
                Ok(Exported {
                    state,
                    cids,
                    forward_key,
                })
            }
            Err(e) => {
                let failure = match e.reason() {
                    Some(r) => ExportFailure::NotQuiescent(r.clone()),
                    None => ExportFailure::Keys,
                };
                self.conns.insert(
                    ch,
                    Live {
                        conn: e.into_connection(),
                        ..live
                    },
                );
                Err(failure)
            }
        }
    }

    /// Imports what another worker's [`export`](Self::export) produced, moves the client onto
    /// this worker's CIDs, and resumes the application. Returns the new connection id.
    /// A `held` import sends nothing until [`commit`](Self::commit) (or is dropped silently by
    /// [`discard`](Self::discard)): the source decides who the one sender is.
    pub fn import(
        &mut self,
        state: &ConnectionState,
        now: Instant,
        held: bool,
    ) -> Result<usize, ImportFailure> {
        self.import_from(state, now, held, None)
    }

    /// [`import`](Self::import) of a connection sent by the worker with server ID `source`
    /// (None: this worker's own export, a rollback): `source` may then forward the datagrams
    /// that still reach it for the connection's old CIDs ([`handle_forwarded`](Self::handle_forwarded)).
    pub fn import_from(
        &mut self,
        state: &ConnectionState,
        now: Instant,
        held: bool,
        source: Option<u32>,
    ) -> Result<usize, ImportFailure> {
        let handoff = baton_handoff::wire::decode(&state.handoff)
            .map_err(|e| ImportFailure::Decode(e.to_string()))?;
        if let Some(vip) = handoff.connection.local_ip {
            if !self.vips.contains(&vip) {
                let ours = self.vips.iter().map(|v| v.to_string()).collect::<Vec<_>>();
                return Err(ImportFailure::NotOurVip(vip, ours.join(", ")));
            }
        }
        let mut app = self.service.restore(&state.app)?;
        let (ch, mut conn, keys) = baton_handoff::import(&mut self.endpoint, &handoff, now)?;
        app.attach(self.wake_for(ch));
        let mut reclaimed = Vec::new();
        for (_, c) in &handoff.connection.local_cids {
            if let Some(key) = self.exported.remove(&c[..]) {
                reclaimed.push((c.to_vec(), key));
            }
        }
        conn.rotate_local_cids(now);
        if let Some(source) = source {
            self.forwardable.retain(|_, f| f.until > now);
            for (_, c) in &handoff.connection.local_cids {
                self.forwardable.insert(
                    c.to_vec(),
                    Forwardable {
                        ch,
                        source,
                        client: handoff.connection.remote,
                        left: MAX_FORWARD,
                        until: now + FORWARDABLE_FOR,
                    },
                );
            }
        }
        info!(id = ch.0, remote = %handoff.connection.remote, vip = ?handoff.connection.local_ip, held, "connection imported");
        self.conns.insert(
            ch,
            Live {
                key: handoff.connection.initial_dst_cid.to_vec(),
                conn,
                keys,
                app,
                frozen: false,
                held,
                timer: None,
                reclaimed,
            },
        );
        self.dirty.insert(ch);
        Ok(ch.0)
    }

    /// The source committed a held import: this worker is now the connection's one sender.
    pub fn commit(&mut self, id: usize) -> bool {
        let ch = ConnectionHandle(id);
        let Some(live) = self.conns.get_mut(&ch).filter(|l| l.held) else {
            return false;
        };
        live.held = false;
        live.reclaimed.clear();
        self.dirty.insert(ch);
        info!(id, "import committed: sending");
        true
    }

    /// Drops a held import the source did not commit, without sending anything (the source
    /// carries on as the connection's sender).
    pub fn discard(&mut self, id: usize) -> bool {
        let ch = ConnectionHandle(id);
        if !self.conns.get(&ch).is_some_and(|l| l.held) {
            return false;
        }
        let live = self.conns.remove(&ch).expect("checked");
        self.forwardable.retain(|_, f| f.ch != ch);
        // The endpoint forgets the connection and its CIDs; the connection itself never sent.
        self.endpoint.handle_event(ch, EndpointEvent::drained());
        for (c, key) in live.reclaimed {
            self.exported.insert(c, key);
        }
        info!(id, "uncommitted import discarded");
        true
    }

    /// Datagrams that reached this worker for connections it exported (each connection's in
    /// arrival order).
    pub fn take_forward(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.forward_len = 0;
        self.forward.drain().flat_map(|(_, d)| d).collect()
    }

    /// Like [`take_forward`](Self::take_forward), only the datagrams addressed to `cids` (one
    /// exported connection; others stay kept for their own importer).
    pub fn take_forward_for(&mut self, cids: &[Vec<u8>]) -> Vec<(SocketAddr, Vec<u8>)> {
        match cids.iter().find_map(|c| self.exported.get(c)) {
            Some(&key) => self.take_forward_of(key),
            None => Vec::new(),
        }
    }

    /// The datagrams kept for one export.
    pub fn take_forward_of(&mut self, key: u64) -> Vec<(SocketAddr, Vec<u8>)> {
        let taken = self.forward.remove(&key).unwrap_or_default();
        self.forward_len -= taken.len();
        taken
    }

    /// Exports that have datagrams kept (a buffer exists only while it holds some).
    pub fn forward_pending(&self) -> Vec<u64> {
        self.forward.keys().copied().collect()
    }

    /// The worker-local id of the connection named `key` (see [`ConnInfo::key`]), without
    /// listing every connection.
    pub fn find_by_key(&self, key: &[u8]) -> Option<usize> {
        self.conns
            .iter()
            .find(|(_, l)| l.key == key)
            .map(|(ch, _)| ch.0)
    }

    /// Handles a datagram the worker with server ID `source` forwarded (it reached `source`
    /// after the connection moved here). Accepted only for a CID of a connection imported from
    /// `source`, claiming that connection's client address, within [`FORWARDABLE_FOR`] of the
    /// import and [`MAX_FORWARD`] datagrams; anything else is dropped and counted, never answered
    /// (a peer must not be able to make this worker send to an address of its choosing).
    /// Returns whether it was accepted.
    pub fn handle_forwarded(
        &mut self,
        now: Instant,
        source: u32,
        from: SocketAddr,
        data: BytesMut,
        out: &mut Vec<Outgoing>,
    ) -> bool {
        let ok = match self.dcid(&data).and_then(|c| self.forwardable.get_mut(c)) {
            Some(f) if f.source == source && f.client == from && f.until > now && f.left > 0 => {
                f.left -= 1;
                true
            }
            _ => false,
        };
        if ok {
            self.handle(now, from, None, None, data, out);
        } else {
            self.forwarded_refused += 1;
            if self.forwarded_refused.is_power_of_two() {
                warn!(
                    source,
                    %from,
                    refused = self.forwarded_refused,
                    "dropping a forwarded datagram that is not for a connection imported from \
                     that worker, or claims another client address, or comes too late"
                );
            }
        }
        ok
    }

    /// Stop keeping datagrams for these CIDs (the LB routes them elsewhere; they are retired).
    /// Returns the forward keys of the exports they belonged to.
    pub fn forget_exported(&mut self, cids: &[Vec<u8>]) -> Vec<u64> {
        let mut keys = Vec::new();
        for c in cids {
            match self.exported.remove(c) {
                Some(key) => {
                    self.take_forward_of(key);
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                None => warn!("forgetting a CID that was not exported here"),
            }
        }
        keys
    }

    /// [`Self::forget_exported`] for one export only: those of `cids` that still belong to the
    /// export `key`. A CID the connection brought back here since (moved back, then perhaps
    /// exported again under another key) is left alone, so a late end of an older export's
    /// forwarding never stops a newer one's.
    pub fn forget_export(&mut self, key: u64, cids: &[Vec<u8>]) {
        for c in cids {
            if self.exported.get(c) == Some(&key) {
                self.exported.remove(c);
            }
        }
        self.take_forward_of(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_batches_fit_in_one_udp_send() {
        // quinn-udp's 64 segments of 1,452 bytes would be 92,928 bytes: EMSGSIZE.
        assert_eq!(send_batch_limit(64, 1452), 45);
        const { assert!(45 * 1452 <= MAX_UDP_SEND && 46 * 1452 > MAX_UDP_SEND) };
        // Small datagrams: GSO's own limit binds.
        assert_eq!(send_batch_limit(64, 1200), 54);
        assert_eq!(send_batch_limit(10, 1200), 10);
        // No GSO, or a datagram as large as a send: one at a time.
        assert_eq!(send_batch_limit(1, 1452), 1);
        assert_eq!(send_batch_limit(64, 65_000), 1);
        assert_eq!(send_batch_limit(64, 0), 64);
        for segments in 1..=64 {
            for size in [1200, 1280, 1350, 1452, 1500, 8952, 9000] {
                let n = send_batch_limit(segments, size);
                assert!(n >= 1 && n <= segments);
                assert!(n == 1 || n * size <= MAX_UDP_SEND, "{n} x {size}");
            }
        }
    }
}
