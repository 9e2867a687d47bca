//! The worker's sans-IO core: one quinn-proto endpoint, its connections and their application
//! sessions, plus freeze / export / import of single connections.
use crate::service::{AppSession, Service};
use baton_handoff::capture::{HandoffTls, KeyState};
use baton_handoff::cid::LbCidGenerator;
use baton_handoff::handoff::NotQuiescent;
use bytes::BytesMut;
use lb_common::cid::CidLayout;
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, Event, ServerConfig,
};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
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
    pub frozen: bool,
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
    #[error("not quiescent yet: {0}")]
    NotQuiescent(NotQuiescent),
    #[error("keys unavailable")]
    Keys,
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
}

/// An exported connection: the bytes for the importer and the CIDs that now route elsewhere.
pub struct Exported {
    /// Handoff bytes (secrets included): send only over an encrypted, authenticated channel.
    pub bytes: Zeroizing<Vec<u8>>,
    pub cids: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exported")
            .field("bytes", &self.bytes.len())
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
}

/// How the worker is set up.
pub struct CoreConfig {
    pub server_id: u64,
    pub layout: CidLayout,
    pub certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    /// The VIP clients talk to: every packet is sent from it.
    pub vip: IpAddr,
    /// Whether the socket never fragments (path MTU discovery may then probe upwards)
    pub allow_mtud: bool,
}

pub struct WorkerCore {
    server_id: u64,
    layout: CidLayout,
    vip: IpAddr,
    endpoint: Endpoint,
    tls: HandoffTls,
    server_config: ServerConfig,
    service: Arc<dyn Service>,
    conns: HashMap<ConnectionHandle, Live>,
    /// CIDs of connections exported from here; datagrams for them are kept for the importer.
    exported: HashMap<Vec<u8>, ()>,
    forward: Vec<(SocketAddr, Vec<u8>)>,
}

impl WorkerCore {
    pub fn new(config: CoreConfig, service: Arc<dyn Service>) -> anyhow::Result<Self> {
        let CoreConfig {
            server_id,
            layout,
            certs,
            key,
            vip,
            allow_mtud,
        } = config;
        LbCidGenerator::new(layout, server_id).map_err(|e| anyhow::anyhow!("server id: {e}"))?;
        let tls = HandoffTls::new(certs, key, &[service.alpn()])?;
        let mut endpoint_config = EndpointConfig::default();
        endpoint_config.cid_generator(move || {
            Box::new(LbCidGenerator::new(layout, server_id).expect("validated"))
        });
        let server_config = ServerConfig::with_crypto(tls.endpoint_crypto());
        let endpoint = Endpoint::new(
            Arc::new(endpoint_config),
            Some(Arc::new(server_config.clone())),
            allow_mtud,
            None,
        );
        Ok(Self {
            server_id,
            layout,
            vip,
            endpoint,
            tls,
            server_config,
            service,
            conns: HashMap::new(),
            exported: HashMap::new(),
            forward: Vec::new(),
        })
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

    /// Handles one received datagram; endpoint-level answers (version negotiation, refusals) go to `out`.
    pub fn handle(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        ecn: Option<u8>,
        data: &[u8],
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(cid) = self.dcid(data) {
            if self.exported.contains_key(cid) {
                if self.forward.len() < MAX_FORWARD {
                    self.forward.push((remote, data.to_vec()));
                } else {
                    debug!("forward buffer full: dropping a datagram for an exported connection");
                }
                return;
            }
        }
        let mut buf = Vec::new();
        let ecn = ecn.and_then(quinn_proto::EcnCodepoint::from_bits);
        match self.endpoint.handle(
            now,
            remote,
            Some(self.vip),
            ecn,
            BytesMut::from(data),
            &mut buf,
        ) {
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
                        info!(id = ch.0, %remote, "connection accepted");
                        self.conns.insert(
                            ch,
                            Live {
                                key,
                                conn,
                                keys,
                                app: self.service.new_session(),
                                frozen: false,
                            },
                        );
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
                }
            }
            Some(DatagramEvent::Response(t)) => {
                out.push(Outgoing::from_transmit(&t, &buf));
            }
            None => {}
        }
    }

    /// Drives timers, events, the application and transmission of every connection.
    /// `max_datagrams` > 1 lets a transmit carry several datagrams for GSO.
    pub fn poll(&mut self, now: Instant, max_datagrams: usize, out: &mut Vec<Outgoing>) {
        let mut gone = Vec::new();
        for (&ch, live) in self.conns.iter_mut() {
            if live.conn.poll_timeout().is_some_and(|t| t <= now) {
                live.conn.handle_timeout(now);
            }
            while let Some(ev) = live.conn.poll_endpoint_events() {
                let drained = ev.is_drained();
                if let Some(ev) = self.endpoint.handle_event(ch, ev) {
                    live.conn.handle_event(ev);
                }
                if drained {
                    gone.push(ch);
                }
            }
            while let Some(ev) = live.conn.poll() {
                if let Event::ConnectionLost { reason } = ev {
                    info!(id = ch.0, "connection closed: {reason}");
                }
            }
            live.app.drive(&mut live.conn, live.frozen);
            let mut buf = Vec::new();
            while let Some(t) = live.conn.poll_transmit(now, max_datagrams, &mut buf) {
                out.push(Outgoing::from_transmit(&t, &buf));
                buf.clear();
            }
        }
        for ch in gone {
            self.conns.remove(&ch);
        }
    }

    /// When [`poll`](Self::poll) must run next at the latest.
    pub fn next_timeout(&mut self) -> Option<Instant> {
        self.conns
            .values_mut()
            .filter_map(|l| l.conn.poll_timeout())
            .min()
    }

    pub fn connections(&self) -> Vec<ConnInfo> {
        let mut v: Vec<ConnInfo> = self
            .conns
            .iter()
            .map(|(&ch, l)| ConnInfo {
                id: ch.0,
                key: l.key.clone(),
                remote: l.conn.remote_address(),
                frozen: l.frozen,
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
        self.conns.keys().copied().find(|ch| ch.0 == id)
    }

    /// Stop taking new application work on a connection (it keeps reading and acknowledging).
    pub fn freeze(&mut self, id: usize) -> bool {
        self.find(id)
            .and_then(|ch| self.conns.get_mut(&ch))
            .map(|l| l.frozen = true)
            .is_some()
    }

    /// Undo [`freeze`](Self::freeze) (rollback of a migration that did not happen).
    pub fn unfreeze(&mut self, id: usize) -> bool {
        self.find(id)
            .and_then(|ch| self.conns.get_mut(&ch))
            .map(|l| l.frozen = false)
            .is_some()
    }

    /// Exports a frozen connection if it is quiescent. On success the connection is gone from
    /// this worker and datagrams for its CIDs are kept for [`take_forward`](Self::take_forward).
    pub fn export(&mut self, id: usize, now: Instant) -> Result<Exported, ExportFailure> {
        let ch = self.find(id).ok_or(ExportFailure::Unknown(id))?;
        let live = self.conns.remove(&ch).expect("found");
        if !live.frozen {
            self.conns.insert(ch, live);
            return Err(ExportFailure::NotFrozen);
        }
        let Live {
            key,
            conn,
            keys,
            app,
            frozen,
        } = live;
        match baton_handoff::export(&mut self.endpoint, ch, conn, &keys, now) {
            Ok(handoff) => {
                let cids: Vec<Vec<u8>> = handoff
                    .connection
                    .local_cids
                    .iter()
                    .map(|(_, c)| c.to_vec())
                    .collect();
                for c in &cids {
                    self.exported.insert(c.clone(), ());
                }
                let quic = baton_handoff::wire::encode(&handoff);
                let state = app.capture();
                let mut bytes = Zeroizing::new(Vec::with_capacity(8 + quic.len() + state.len()));
                bytes.extend((quic.len() as u64).to_be_bytes());
                bytes.extend_from_slice(&quic);
                bytes.extend_from_slice(&state);
                info!(
                    id,
                    cids = cids.len(),
                    bytes = bytes.len(),
                    "connection exported"
                );
                Ok(Exported { bytes, cids })
            }
            Err(e) => {
                let failure = match e.reason() {
                    Some(r) => ExportFailure::NotQuiescent(r.clone()),
                    None => ExportFailure::Keys,
                };
                self.conns.insert(
                    ch,
                    Live {
                        key,
                        conn: e.into_connection(),
                        keys,
                        app,
                        frozen,
                    },
                );
                Err(failure)
            }
        }
    }

    /// Imports what another worker's [`export`](Self::export) produced, moves the client onto
    /// this worker's CIDs, and resumes the application. Returns the new connection id.
    pub fn import(&mut self, bytes: &[u8], now: Instant) -> Result<usize, ImportFailure> {
        if bytes.len() < 8 {
            return Err(ImportFailure::Decode("truncated".into()));
        }
        let len = u64::from_be_bytes(bytes[..8].try_into().unwrap()) as usize;
        let quic = bytes
            .get(8..8usize.saturating_add(len))
            .ok_or_else(|| ImportFailure::Decode("truncated".into()))?;
        let handoff =
            baton_handoff::wire::decode(quic).map_err(|e| ImportFailure::Decode(e.to_string()))?;
        let app = self.service.restore(&bytes[8 + len..])?;
        let (ch, mut conn, keys) = baton_handoff::import(&mut self.endpoint, &handoff, now)?;
        for (_, c) in &handoff.connection.local_cids {
            self.exported.remove(&c[..]);
        }
        conn.rotate_local_cids(now);
        info!(id = ch.0, remote = %handoff.connection.remote, "connection imported");
        self.conns.insert(
            ch,
            Live {
                key: handoff.connection.initial_dst_cid.to_vec(),
                conn,
                keys,
                app,
                frozen: false,
            },
        );
        Ok(ch.0)
    }

    /// Datagrams that reached this worker for connections it exported, in arrival order.
    pub fn take_forward(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.forward)
    }

    /// Like [`take_forward`](Self::take_forward), only the datagrams addressed to `cids` (one
    /// exported connection; others stay kept for their own importer).
    pub fn take_forward_for(&mut self, cids: &[Vec<u8>]) -> Vec<(SocketAddr, Vec<u8>)> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.forward)
            .into_iter()
            .partition(|(_, d)| self.dcid(d).is_some_and(|c| cids.iter().any(|x| x == c)));
        self.forward = rest;
        mine
    }

    /// Stop keeping datagrams for these CIDs (the LB routes them elsewhere; they are retired).
    pub fn forget_exported(&mut self, cids: &[Vec<u8>]) {
        for c in cids {
            if self.exported.remove(c).is_none() {
                warn!("forgetting a CID that was not exported here");
            }
        }
    }
}
