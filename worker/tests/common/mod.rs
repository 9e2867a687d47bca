//! Shared by the worker's integration tests: a client for the demo service.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::sync::Arc;

/// The CA certificates in a PEM file, as trust roots.
pub fn roots_from_pem(path: &Path) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(path).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// TLS 1.3 for the demo service's ALPN, trusting `roots`.
pub fn demo_client_tls(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![baton_worker::demo::ALPN.to_vec()];
    tls
}

/// A quinn client endpoint on loopback speaking to the demo service, trusting `roots`.
pub fn demo_client_endpoint(roots: rustls::RootCertStore) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(demo_client_tls(roots)).unwrap(),
    )));
    endpoint
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
