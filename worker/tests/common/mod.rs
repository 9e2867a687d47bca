//! Shared by the worker's integration tests: the demo client (baton-load's), worker configs, ports.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;

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
