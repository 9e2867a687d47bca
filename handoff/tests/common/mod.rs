//! The sans-IO harness shared by the handoff tests and benchmarks: an unmodified quinn-proto
//! client, two worker endpoints (server IDs 1 and 2) running an echo application, an LB model
//! (route by CID server ID, per-CID overrides) and a wire with a one-way delay, optional seeded
//! random loss, and a client address that can change (a NAT rebinding).
#![allow(dead_code)]
use baton_handoff::Handoff;
use baton_handoff::capture::{HandoffTls, KeyState};
use baton_handoff::cid::LbCidGenerator;
use bytes::BytesMut;
use lb_common::cid::CidLayout;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    Event, ServerConfig, StreamEvent, StreamId,
};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 4433);
pub const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 40000);
/// The default one-way delay (`Sim::one_way` sets another).
pub const ONE_WAY: Duration = Duration::from_millis(5);
pub const STEP: Duration = Duration::from_millis(1);
pub const ALPN: &[u8] = b"baton-echo/1";

/// The bytes the client sends on a stream, by offset: the server echoes them, so the client checks
/// every byte it gets back against the same function.
pub fn pattern(seed: u64, offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (x >> 29) as u8 ^ (offset as u8)
}

pub fn fill(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(seed, offset + i)).collect()
}

pub fn dcid(layout: CidLayout, datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.is_empty() {
        return None;
    }
    if datagram[0] & 0x80 != 0 {
        let len = *datagram.get(5)? as usize;
        Some(datagram.get(6..6 + len)?.to_vec())
    } else {
        Some(datagram.get(1..1 + layout.cid_len())?.to_vec())
    }
}

// ---------------------------------------------------------------- server side (a worker model)

/// The demo application's per-connection state: an echo of every client stream. This is what
/// moves along with the QUIC snapshot.
#[derive(Default)]
pub struct EchoApp {
    pub streams: HashMap<StreamId, Echo>,
    pub frozen: bool,
}

#[derive(Default)]
pub struct Echo {
    pub pending: VecDeque<u8>,
    pub fin_received: bool,
    pub fin_sent: bool,
}

impl EchoApp {
    pub fn drive(&mut self, conn: &mut Connection) {
        while let Some(id) = conn.streams().accept(Dir::Bi) {
            self.streams.entry(id).or_default();
        }
        for (&id, echo) in self.streams.iter_mut() {
            if !echo.fin_received {
                if let Ok(mut chunks) = conn.recv_stream(id).read(true) {
                    loop {
                        match chunks.next(usize::MAX) {
                            Ok(Some(chunk)) => echo.pending.extend(&chunk.bytes[..]),
                            Ok(None) => {
                                echo.fin_received = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let _ = chunks.finalize();
                }
            }
            if self.frozen || echo.fin_sent {
                continue;
            }
            while !echo.pending.is_empty() {
                let (a, _) = echo.pending.as_slices();
                match conn.send_stream(id).write(a) {
                    Ok(n) if n > 0 => {
                        echo.pending.drain(..n);
                    }
                    _ => break,
                }
            }
            if echo.pending.is_empty() && echo.fin_received {
                conn.send_stream(id).finish().unwrap();
                echo.fin_sent = true;
            }
        }
    }
}

pub struct Live {
    pub conn: Connection,
    pub keys: Arc<KeyState>,
    pub app: EchoApp,
}

pub struct Worker {
    pub server_id: u64,
    pub endpoint: Endpoint,
    pub tls: HandoffTls,
    pub server_config: ServerConfig,
    pub conns: HashMap<ConnectionHandle, Live>,
    /// CIDs of connections exported from here: datagrams for them are kept for the importer.
    pub exported: Vec<Vec<u8>>,
    pub forward: Vec<Vec<u8>>,
    /// Every datagram this worker sent, with the time.
    pub sent: Vec<(Instant, Vec<u8>)>,
    pub responses: usize,
    pub accepted: usize,
    pub layout: CidLayout,
}

impl Worker {
    pub fn new(
        server_id: u64,
        layout: CidLayout,
        tls_material: &(Vec<rustls::pki_types::CertificateDer<'static>>, Vec<u8>),
    ) -> Self {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(tls_material.1.clone().into());
        let tls = HandoffTls::new(tls_material.0.clone(), key, &[ALPN]).unwrap();
        let mut endpoint_config = EndpointConfig::default();
        endpoint_config
            .cid_generator(move || Box::new(LbCidGenerator::new(layout, server_id).unwrap()));
        let mut server_config = ServerConfig::with_crypto(tls.endpoint_crypto());
        let mut transport = quinn_proto::TransportConfig::default();
        transport.max_concurrent_bidi_streams(256u32.into());
        server_config.transport = Arc::new(transport);
        let endpoint = Endpoint::new(
            Arc::new(endpoint_config),
            Some(Arc::new(server_config.clone())),
            false,
            None,
        );
        Self {
            server_id,
            endpoint,
            tls,
            server_config,
            conns: HashMap::new(),
            exported: Vec::new(),
            forward: Vec::new(),
            sent: Vec::new(),
            responses: 0,
            accepted: 0,
            layout,
        }
    }

    pub fn receive(&mut self, now: Instant, remote: SocketAddr, data: Vec<u8>) {
        if let Some(cid) = dcid(self.layout, &data) {
            if self.exported.contains(&cid) {
                self.forward.push(data);
                return;
            }
        }
        let mut buf = Vec::new();
        match self.endpoint.handle(
            now,
            remote,
            Some(VIP.ip()),
            None,
            BytesMut::from(&data[..]),
            &mut buf,
        ) {
            Some(DatagramEvent::NewConnection(incoming)) => {
                let (crypto, keys) = self.tls.connection_crypto();
                let mut config = self.server_config.clone();
                config.crypto = crypto;
                let (ch, conn) = self
                    .endpoint
                    .accept(incoming, now, &mut buf, Some(Arc::new(config)))
                    .unwrap();
                self.accepted += 1;
                self.conns.insert(
                    ch,
                    Live {
                        conn,
                        keys,
                        app: EchoApp::default(),
                    },
                );
            }
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                self.conns
                    .get_mut(&ch)
                    .expect("routed to a live connection")
                    .conn
                    .handle_event(event);
            }
            Some(DatagramEvent::Response(t)) => {
                self.responses += 1;
                self.sent.push((now, buf[..t.size].to_vec()));
            }
            None => {}
        }
    }

    pub fn poll(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) {
        for (&ch, live) in self.conns.iter_mut() {
            if live.conn.poll_timeout().is_some_and(|t| t <= now) {
                live.conn.handle_timeout(now);
            }
            while let Some(ev) = live.conn.poll_endpoint_events() {
                if let Some(ev) = self.endpoint.handle_event(ch, ev) {
                    live.conn.handle_event(ev);
                }
            }
            while let Some(ev) = live.conn.poll() {
                if let Event::ConnectionLost { reason } = ev {
                    panic!("server {} lost the connection: {reason}", self.server_id);
                }
            }
            live.app.drive(&mut live.conn);
            let mut buf = Vec::new();
            while let Some(t) = live.conn.poll_transmit(now, 1, &mut buf) {
                assert_eq!(
                    t.src_ip,
                    Some(VIP.ip()),
                    "the importer must send from the VIP"
                );
                self.sent.push((now, buf[..t.size].to_vec()));
                out.push(buf[..t.size].to_vec());
                buf.clear();
            }
        }
    }

    pub fn only(&self) -> ConnectionHandle {
        assert_eq!(self.conns.len(), 1);
        *self.conns.keys().next().unwrap()
    }
}

// ---------------------------------------------------------------- client side

pub struct Request {
    pub len: u64,
    pub sent: u64,
    pub received: u64,
    pub done: bool,
    pub fin_sent: bool,
    /// Never finished: the stream stays open (benchmarks of connections with many streams).
    pub keep_open: bool,
}

pub struct Client {
    pub endpoint: Endpoint,
    pub ch: ConnectionHandle,
    pub conn: Connection,
    pub connected: usize,
    pub long: Option<StreamId>,
    pub long_sent: u64,
    pub long_received: u64,
    pub long_fin_sent: bool,
    pub long_done: bool,
    pub stop_long: bool,
    pub requests: HashMap<StreamId, Request>,
    pub completed: u64,
    pub verified: u64,
    /// Destination CIDs the client used, in order of first use.
    pub dcids: Vec<Vec<u8>>,
}

impl Client {
    /// A client whose own CIDs are `cid_len` bytes long (0: zero-length CIDs, for which quinn
    /// advertises `active_connection_id_limit = 2`).
    pub fn new(
        now: Instant,
        root: rustls::pki_types::CertificateDer<'static>,
        cid_len: usize,
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let config = ClientConfig::new(Arc::new(crypto));
        let mut endpoint_config = EndpointConfig::default();
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::RandomConnectionIdGenerator::new(cid_len))
        });
        let mut endpoint = Endpoint::new(Arc::new(endpoint_config), None, false, None);
        let (ch, conn) = endpoint.connect(now, config, VIP, "localhost").unwrap();
        Self {
            endpoint,
            ch,
            conn,
            connected: 0,
            long: None,
            long_sent: 0,
            long_received: 0,
            long_fin_sent: false,
            long_done: false,
            stop_long: false,
            requests: HashMap::new(),
            completed: 0,
            verified: 0,
            dcids: Vec::new(),
        }
    }

    pub fn receive(&mut self, now: Instant, data: Vec<u8>) {
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, VIP, None, None, BytesMut::from(&data[..]), &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                assert_eq!(ch, self.ch);
                self.conn.handle_event(ev);
            }
            Some(other) => panic!(
                "client endpoint produced {:?}",
                matches!(other, DatagramEvent::Response(_))
            ),
            None => {}
        }
    }

    pub fn start_request(&mut self, len: u64) {
        let id = self.conn.streams().open(Dir::Bi).expect("stream credit");
        self.requests.insert(
            id,
            Request {
                len,
                sent: 0,
                received: 0,
                done: false,
                fin_sent: false,
                keep_open: false,
            },
        );
    }

    /// Opens `n` streams that carry a few bytes each way and stay open.
    pub fn open_held(&mut self, n: usize) {
        for _ in 0..n {
            let id = self.conn.streams().open(Dir::Bi).expect("stream credit");
            self.requests.insert(
                id,
                Request {
                    len: 16,
                    sent: 0,
                    received: 0,
                    done: false,
                    fin_sent: false,
                    keep_open: true,
                },
            );
        }
    }

    pub fn poll(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) {
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
        }
        while let Some(ev) = self.conn.poll_endpoint_events() {
            if let Some(ev) = self.endpoint.handle_event(self.ch, ev) {
                self.conn.handle_event(ev);
            }
        }
        while let Some(ev) = self.conn.poll() {
            match ev {
                Event::Connected => self.connected += 1,
                Event::ConnectionLost { reason } => panic!("client lost the connection: {reason}"),
                Event::Stream(StreamEvent::Stopped { id, .. }) => panic!("stream {id} stopped"),
                _ => {}
            }
        }
        if self.connected > 0 {
            self.drive_streams();
        }
        let mut buf = Vec::new();
        while let Some(t) = self.conn.poll_transmit(now, 1, &mut buf) {
            assert_eq!(t.destination, VIP);
            let datagram = buf[..t.size].to_vec();
            if datagram[0] & 0x80 == 0 {
                let d = datagram[1..9].to_vec();
                if self.dcids.last() != Some(&d) {
                    self.dcids.push(d);
                }
            }
            out.push(datagram);
            buf.clear();
        }
    }

    pub fn read_echo(
        conn: &mut Connection,
        id: StreamId,
        seed: u64,
        received: &mut u64,
        verified: &mut u64,
    ) -> bool {
        let mut fin = false;
        if let Ok(mut chunks) = conn.recv_stream(id).read(true) {
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(chunk)) => {
                        assert_eq!(chunk.offset, *received);
                        for (i, &b) in chunk.bytes.iter().enumerate() {
                            assert_eq!(
                                b,
                                pattern(seed, *received + i as u64),
                                "stream {id} byte {} differs",
                                *received + i as u64
                            );
                        }
                        *received += chunk.bytes.len() as u64;
                        *verified += chunk.bytes.len() as u64;
                    }
                    Ok(None) => {
                        fin = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let _ = chunks.finalize();
        }
        fin
    }

    pub fn drive_streams(&mut self) {
        if self.long.is_none() {
            self.long = Some(self.conn.streams().open(Dir::Bi).unwrap());
        }
        let long = self.long.unwrap();
        let seed = u64::from(quinn_proto::VarInt::from(long));
        if !self.stop_long {
            let chunk = fill(seed, self.long_sent, 1500);
            if let Ok(n) = self.conn.send_stream(long).write(&chunk) {
                self.long_sent += n as u64;
            }
        } else if !self.long_fin_sent {
            self.conn.send_stream(long).finish().unwrap();
            self.long_fin_sent = true;
        }
        if Self::read_echo(
            &mut self.conn,
            long,
            seed,
            &mut self.long_received,
            &mut self.verified,
        ) {
            assert_eq!(
                self.long_received, self.long_sent,
                "long stream echo complete"
            );
            self.long_done = true;
        }
        let ids: Vec<StreamId> = self.requests.keys().copied().collect();
        for id in ids {
            let seed = u64::from(quinn_proto::VarInt::from(id));
            let r = self.requests.get_mut(&id).unwrap();
            if r.done {
                continue;
            }
            if r.sent < r.len {
                let chunk = fill(seed, r.sent, (r.len - r.sent).min(4000) as usize);
                if let Ok(n) = self.conn.send_stream(id).write(&chunk) {
                    r.sent += n as u64;
                }
            }
            if r.sent == r.len && !r.keep_open && !r.fin_sent {
                self.conn.send_stream(id).finish().unwrap();
                r.fin_sent = true;
            }
            if Self::read_echo(
                &mut self.conn,
                id,
                seed,
                &mut r.received,
                &mut self.verified,
            ) {
                assert_eq!(r.received, r.len, "response to stream {id} is complete");
                r.done = true;
                self.completed += 1;
            }
        }
    }
}

// ---------------------------------------------------------------- the network and the LB model

pub struct Sim {
    pub now: Instant,
    pub layout: CidLayout,
    pub client: Client,
    pub workers: [Worker; 2],
    /// (deliver at, to: None = client / Some(worker index), datagram)
    pub wire: Vec<(Instant, Option<usize>, Vec<u8>)>,
    /// One-way delay of the path, each direction
    pub one_way: Duration,
    /// Probability that a datagram is lost, each direction (after the handshake)
    pub loss: f64,
    /// Up to this much extra delay per datagram, drawn at random: datagrams overtake each other
    pub jitter: Duration,
    /// Datagrams the path lost
    pub lost: u64,
    rng: u64,
    /// The client's address as the workers see it (changes at a NAT rebinding)
    pub client_addr: SocketAddr,
    /// At each export, lose every datagram then in flight, both ways
    pub lose_in_flight_at_export: bool,
    /// Packets the exporter had in flight at the last export
    pub carried_in_flight: usize,
    /// The key update under way at the last export, if any
    pub carried_key_update: Option<baton_handoff::handoff::KeyUpdateSnapshot>,
    /// Per-CID routing overrides set at a handoff (like the LB's override map).
    pub overrides: HashMap<Vec<u8>, usize>,
    pub step_count: u64,
    pub key_updates_forced: u64,
    pub handoff_bytes: usize,
    pub refusals: HashMap<String, u64>,
    pub cwnd_max: u64,
}

impl Sim {
    pub fn new() -> Self {
        Self::with_client_cid_len(8)
    }

    /// A simulation whose client issues CIDs of `cid_len` bytes (see [`Client::new`]).
    pub fn with_client_cid_len(cid_len: usize) -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = certified.cert.der().clone();
        let material = (vec![cert.clone()], certified.key_pair.serialize_der());
        let layout = CidLayout::default();
        let now = Instant::now();
        Self {
            now,
            layout,
            client: Client::new(now, cert, cid_len),
            workers: [
                Worker::new(1, layout, &material),
                Worker::new(2, layout, &material),
            ],
            wire: Vec::new(),
            one_way: ONE_WAY,
            loss: 0.0,
            jitter: Duration::ZERO,
            lost: 0,
            rng: 0x2545_f491_4f6c_dd1d,
            client_addr: CLIENT,
            lose_in_flight_at_export: false,
            carried_in_flight: 0,
            carried_key_update: None,
            overrides: HashMap::new(),
            step_count: 0,
            key_updates_forced: 0,
            handoff_bytes: 0,
            refusals: HashMap::new(),
            cwnd_max: 0,
        }
    }

    /// The LB: an override for the CID, else the server ID in the CID, else (Initials) worker A.
    pub fn route(&self, datagram: &[u8]) -> usize {
        let cid = dcid(self.layout, datagram).unwrap_or_default();
        if let Some(&w) = self.overrides.get(&cid) {
            return w;
        }
        if datagram[0] & 0x80 == 0 {
            match self.layout.decode_server_id(&cid) {
                Some(1) => return 0,
                Some(2) => return 1,
                _ => {}
            }
        }
        0
    }

    pub fn step(&mut self) {
        self.step_count += 1;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.wire)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.wire = later;
        for (_, to, data) in due {
            match to {
                None => self.client.receive(now, data),
                Some(w) => self.workers[w].receive(now, self.client_addr, data),
            }
        }
        let mut out = Vec::new();
        self.client.poll(now, &mut out);
        for d in out.drain(..) {
            if self.chance_lost() {
                continue;
            }
            let w = self.route(&d);
            let at = now + self.one_way + self.extra_delay();
            self.wire.push((at, Some(w), d));
        }
        for w in 0..2 {
            self.workers[w].poll(now, &mut out);
            for d in out.drain(..) {
                if self.chance_lost() {
                    continue;
                }
                let at = now + self.one_way + self.extra_delay();
                self.wire.push((at, None, d));
            }
        }
        self.now += STEP;
    }

    /// Uniform in [0, 1) from a seeded xorshift64*: every run sees the same path.
    fn random(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (x as f64) / ((1u64 << 53) as f64)
    }

    /// Random loss, only once the handshake is done.
    fn chance_lost(&mut self) -> bool {
        if self.loss <= 0.0 || self.client.connected == 0 {
            return false;
        }
        let lost = self.random() < self.loss;
        self.lost += lost as u64;
        lost
    }

    fn extra_delay(&mut self) -> Duration {
        if self.jitter.is_zero() || self.client.connected == 0 {
            return Duration::ZERO;
        }
        // Whole steps: the wire is looked at once per step.
        let steps = (self.random() * self.jitter.as_millis() as f64) as u64;
        STEP * steps as u32
    }

    pub fn run(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step();
        }
    }

    pub fn owner(&self) -> usize {
        if self.workers[0].conns.is_empty() {
            1
        } else {
            0
        }
    }

    pub fn generation(&self) -> u64 {
        let w = &self.workers[self.owner()];
        w.conns[&w.only()].keys.generation().unwrap()
    }

    /// A client-initiated key update, then a server-initiated one, each completed. quinn ignores a
    /// forced update while the previous keys are still kept (about 3 PTOs), so retry until it lands.
    pub fn key_updates(&mut self) {
        for by_client in [true, false] {
            let before = self.generation();
            let mut waited = 0;
            while self.generation() == before {
                if waited % 50 == 0 {
                    if by_client {
                        self.client.conn.force_key_update();
                    } else {
                        let owner = self.owner();
                        let ch = self.workers[owner].only();
                        self.workers[owner]
                            .conns
                            .get_mut(&ch)
                            .unwrap()
                            .conn
                            .force_key_update();
                    }
                }
                self.step();
                waited += 1;
                assert!(waited < 2_000, "key update never happened");
            }
            assert_eq!(self.generation(), before + 1);
            self.key_updates_forced += 1;
        }
    }

    /// Freezes the owner's application and steps until the connection is quiescent; returns the steps.
    pub fn quiesce(&mut self) -> u64 {
        let owner = self.owner();
        let ch = self.workers[owner].only();
        self.workers[owner].conns.get_mut(&ch).unwrap().app.frozen = true;
        let mut steps = 0;
        while self.workers[owner].conns[&ch].conn.quiescence().is_err() {
            self.step();
            steps += 1;
            assert!(steps < 5_000, "never quiescent");
        }
        steps
    }

    /// Freeze the owner's connection until it can be exported, export it, import it into the other worker,
    /// flip the routing, forward what reached the source meanwhile, and move the client onto the
    /// target's CIDs. Returns (steps frozen, key-update generation at export, the CIDs that moved).
    pub fn migrate(&mut self) -> (u64, u64, Vec<Vec<u8>>) {
        let from = self.owner();
        let to = 1 - from;
        let ch = self.workers[from].only();
        self.workers[from].conns.get_mut(&ch).unwrap().app.frozen = true;
        let mut frozen_steps = 0;
        let handoff = loop {
            let live = self.workers[from].conns.remove(&ch).unwrap();
            let Live { conn, keys, app } = live;
            match baton_handoff::export(&mut self.workers[from].endpoint, ch, conn, &keys, self.now)
            {
                Ok(handoff) => break (handoff, app),
                Err(e) => {
                    assert!(e.reason().is_some(), "{e}");
                    let reason = format!("{:?}", e.reason().unwrap());
                    let reason = reason.split('(').next().unwrap().to_string();
                    *self.refusals.entry(reason).or_default() += 1;
                    self.workers[from].conns.insert(
                        ch,
                        Live {
                            conn: e.into_connection(),
                            keys,
                            app,
                        },
                    );
                    frozen_steps += 1;
                    assert!(frozen_steps < 2000, "never quiescent");
                    self.step();
                }
            }
        };
        let (handoff, mut app): (Handoff, EchoApp) = handoff;
        let generation = handoff.secrets.generation;
        self.carried_in_flight = handoff.connection.recovery.sent.len();
        self.carried_key_update = handoff.connection.key_update;
        if self.lose_in_flight_at_export {
            self.lost += self.wire.len() as u64;
            self.wire.clear();
        }
        // From here on the source keeps (for forwarding) whatever reaches it for these CIDs.
        let cids: Vec<Vec<u8>> = handoff
            .connection
            .local_cids
            .iter()
            .map(|(_, c)| c.to_vec())
            .collect();
        self.workers[from].exported = cids.clone();
        let exported_at = self.now;
        let sent_before = self.workers[from].sent.len();

        // Across processes the handoff travels as bytes: go through the byte form every time.
        let bytes = baton_handoff::wire::encode(&handoff);
        let handoff = baton_handoff::wire::decode(&bytes).unwrap();
        assert_eq!(
            &baton_handoff::wire::encode(&handoff)[..],
            &bytes[..],
            "byte form round-trips"
        );
        self.handoff_bytes = self.handoff_bytes.max(bytes.len());
        let (ch_b, mut conn, keys) =
            baton_handoff::import(&mut self.workers[to].endpoint, &handoff, self.now).unwrap();
        // Import is complete: now the LB sends these CIDs to the target.
        for c in &cids {
            self.overrides.insert(c.clone(), to);
        }
        for d in std::mem::take(&mut self.workers[from].forward) {
            self.wire.push((self.now, Some(to), d));
        }
        // The congestion window carried over (quinn's default controller is Cubic). The import
        // declares lost what is already overdue (the source was about to), which may shrink it.
        let (window, _) = handoff
            .connection
            .congestion_state
            .expect("Cubic state carried");
        let stats = conn.stats();
        if stats.path.congestion_events == 0 {
            assert_eq!(stats.path.cwnd, window, "congestion window carried over");
        } else {
            assert!(
                stats.path.cwnd <= window,
                "congestion window grew at import"
            );
        }
        self.cwnd_max = self.cwnd_max.max(window);
        conn.rotate_local_cids(self.now);
        app.frozen = false;
        self.workers[to]
            .conns
            .insert(ch_b, Live { conn, keys, app });

        // Let traffic flow; anything that was still in flight to the source gets forwarded
        // (for a one-way delay and more: what the client sent just before the flip).
        let settle = 30 + 2 * self.one_way.as_millis() as u64;
        for _ in 0..settle {
            self.step();
            for d in std::mem::take(&mut self.workers[from].forward) {
                self.wire.push((self.now, Some(to), d));
            }
        }
        // Single sender: the source emitted nothing after the export.
        assert_eq!(
            self.workers[from].sent.len(),
            sent_before,
            "source sent after export"
        );
        assert!(
            self.workers[from]
                .sent
                .iter()
                .all(|(at, _)| *at < exported_at)
        );
        (frozen_steps, generation, cids)
    }
}
