//! Baton's QUIC worker: a sans-IO core ([`core::WorkerCore`]) driving quinn-proto with live
//! connection handoff, a tokio I/O loop ([`io`]), the application service trait ([`service`]) and
//! the demo service ([`demo`]).
pub mod admission;
pub mod config;
pub mod core;
pub mod decap;
pub mod demo;
pub mod http3;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod service;
pub mod tls;
pub mod udp;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Reads a PEM certificate chain and private key.
pub fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", cert.display());
    // The key file must be 0600 and ours (migration::secret_file); the same bytes are parsed.
    let pem = migration::secret_file::read(key)?;
    // No `{e}` detail from the key file beyond its path.
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| anyhow::anyhow!("cannot read a PEM private key from {}", key.display()))?;
    Ok((certs, key))
}

/// Reads the PEM CA certificate(s) a TLS peer's certificate must chain to.
pub fn load_roots(ca: &std::path::Path) -> anyhow::Result<rustls::RootCertStore> {
    use anyhow::Context;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading the CA {}", ca.display()))?
    {
        roots.add(c?)?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{} holds no CA certificate",
        ca.display()
    );
    Ok(roots)
}

pub mod certs;
pub mod control;
pub mod migrate;
pub mod secrets;

/// Lower-case hex, and its parser (optionally `0x`-prefixed; `None` if it is not an even number
/// of hex digits): the one definition in lb-common.
pub use lb_common::{hex, unhex};
