//! Baton's QUIC worker: a sans-IO core ([`core::WorkerCore`]) driving quinn-proto with live
//! connection handoff, a tokio I/O loop ([`io`]), the application service trait ([`service`]) and
//! the demo service ([`demo`]).
pub mod config;
pub mod core;
pub mod demo;
pub mod io;
pub mod service;
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
    let key = PrivateKeyDer::from_pem_file(key)?;
    Ok((certs, key))
}
