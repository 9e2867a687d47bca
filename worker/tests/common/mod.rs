//! Shared by the worker's integration tests: the demo client (baton-load's), worker configs, ports.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;

pub mod h3;
pub mod lab;

/// The demo client (baton-load's library): TLS, endpoints, checked requests, [`client::Traffic`].
pub use baton_load::client;

/// The CA certificates in a PEM file, as trust roots.
pub fn roots_from_pem(path: &Path) -> rustls::RootCertStore {
    client::roots_from_pem_file(path).unwrap()
}

/// A demo client endpoint on loopback, trusting `roots`.
pub fn demo_client_endpoint(roots: rustls::RootCertStore) -> quinn::Endpoint {
    client::endpoint("127.0.0.1:0".parse().unwrap(), roots).unwrap()
}

/// A worker core serving the demo (default CID layout and limits, no MTU discovery) as server
/// `server_id` on `vips`, with the `gen-certs` service certificate from `dir`.
pub fn demo_core(
    server_id: u64,
    vips: Vec<std::net::IpAddr>,
    dir: &Path,
) -> baton_worker::core::WorkerCore {
    let (certs, key) =
        baton_worker::load_tls(&dir.join("service.pem"), &dir.join("service.key")).unwrap();
    baton_worker::core::WorkerCore::new(
        baton_worker::core::CoreConfig {
            server_id,
            layout: lb_common::cid::CidLayout::default(),
            certs,
            key,
            vips,
            allow_mtud: false,
            limits: Default::default(),
        },
        std::sync::Arc::new(baton_worker::demo::DemoService::default()),
    )
    .unwrap()
}

/// The config of a worker that takes part in migrations, as the tests run it: `w1` (server ID 1)
/// serving the demo on 127.0.0.1:`port` with `gen-certs` files from `dir`, its control socket
/// `dir/w1.sock`, its peer channel on 127.0.0.1:`peer_port` with w2 as its one configured peer
/// (at a port nobody listens on). `top` goes before the tables (e.g. `metrics = ..`), `tables`
/// after `[peer]` (e.g. a `[control_tls]` table).
pub fn migrating_worker_config(
    dir: &Path,
    port: u16,
    peer_port: u16,
    top: &str,
    tables: &str,
) -> String {
    let d = dir.display();
    format!(
        r#"vip = "127.0.0.1"
port = {port}
server_id = 1
cert = "{d}/service.pem"
key = "{d}/service.key"
name = "w1"
control_socket = "{d}/w1.sock"
secrets = "{d}/secrets.toml"
{top}
[peer]
listen = "127.0.0.1:{peer_port}"
ca = "{d}/ca.pem"
cert = "{d}/w1.pem"
key = "{d}/w1.key"
workers = [
  {{ name = "w1", server_id = 1, peer = "127.0.0.1:{peer_port}" }},
  {{ name = "w2", server_id = 2, peer = "127.0.0.1:1" }},
]
{tables}"#
    )
}

/// `N` distinct free UDP ports on 127.0.0.1: every socket is held until all ports are known, so
/// two of them can never be the same.
pub fn free_udp_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::UdpSocket; N] =
        std::array::from_fn(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    held.map(|s| s.local_addr().unwrap().port())
}

/// The VIP the sans-IO tests' client talks to, and the client's address.
pub const VIP: &str = "10.99.0.1:443";
pub const CLIENT: &str = "10.99.0.2:40000";

/// Delivers the client's datagrams to `core`, polls it, and returns what it sent.
pub fn exchange(
    client: &mut SansIoClient,
    core: &mut baton_worker::core::WorkerCore,
    now: std::time::Instant,
) -> Vec<baton_worker::core::Outgoing> {
    let mut out = Vec::new();
    for d in client.transmit(now) {
        core.handle(
            now,
            CLIENT.parse().unwrap(),
            None,
            None,
            d.as_slice().into(),
            &mut out,
        );
    }
    core.poll(now, 1, &mut out);
    out
}

/// A demo client on quinn-proto itself, driven by hand beside a `WorkerCore` (no sockets, no
/// clock: the tests pass `now`).
pub struct SansIoClient {
    pub endpoint: quinn_proto::Endpoint,
    pub ch: quinn_proto::ConnectionHandle,
    pub conn: quinn_proto::Connection,
}

impl SansIoClient {
    /// Starts a handshake with the VIP, trusting the CA in `ca` (the `gen-certs` one).
    pub fn connect(ca: &Path, now: std::time::Instant) -> Self {
        let tls = client::client_tls(roots_from_pem(ca));
        let config = quinn_proto::ClientConfig::new(std::sync::Arc::new(
            quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let mut endpoint = quinn_proto::Endpoint::new(
            std::sync::Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        );
        let (ch, conn) = endpoint
            .connect(now, config, VIP.parse().unwrap(), "localhost")
            .unwrap();
        Self { endpoint, ch, conn }
    }

    /// Everything the client wants to send now.
    pub fn transmit(&mut self, now: std::time::Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = self.conn.poll_transmit(now, 1, &mut buf) {
            out.push(buf[..t.size].to_vec());
            buf.clear();
        }
        out
    }

    /// Handles the worker's datagrams and the client's timers; reads nothing from the streams.
    pub fn receive(
        &mut self,
        now: std::time::Instant,
        datagrams: Vec<baton_worker::core::Outgoing>,
    ) {
        for d in datagrams {
            let mut buf = Vec::new();
            let event = self.endpoint.handle(
                now,
                VIP.parse().unwrap(),
                None,
                None,
                bytes::BytesMut::from(&d.data[..]),
                &mut buf,
            );
            if let Some(quinn_proto::DatagramEvent::ConnectionEvent(ch, ev)) = event {
                assert_eq!(ch, self.ch);
                self.conn.handle_event(ev);
            }
        }
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
        }
        while let Some(ev) = self.conn.poll_endpoint_events() {
            if let Some(ev) = self.endpoint.handle_event(self.ch, ev) {
                self.conn.handle_event(ev);
            }
        }
        while self.conn.poll().is_some() {}
    }

    /// Opens a stream and sends one demo request on it.
    pub fn request(&mut self, n: u8) {
        let id = self
            .conn
            .streams()
            .open(quinn_proto::Dir::Bi)
            .expect("stream credit");
        self.conn
            .send_stream(id)
            .write(&[lb_common::demo::KIND_REQUEST, n])
            .unwrap();
        self.conn.send_stream(id).finish().unwrap();
    }
}
