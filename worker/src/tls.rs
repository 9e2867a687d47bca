//! Client-certificate checks shared by the worker's mutual-TLS listeners (the peer channel and
//! the control API over TLS): the CA's verdict first, then the certificate's DNS names against
//! the configured list of who may call.
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, DnsName, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use std::sync::Arc;

/// A client verifier that admits only certificates signed by the CA (`inner`) whose DNS names
/// include one of `allowed`. `config_key` names the setting that lists them, for the refusal.
#[derive(Debug)]
pub struct AllowedNames {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<DnsName<'static>>,
    config_key: &'static str,
}

impl AllowedNames {
    pub fn new(
        inner: Arc<dyn ClientCertVerifier>,
        allowed: Vec<DnsName<'static>>,
        config_key: &'static str,
    ) -> Self {
        Self {
            inner,
            allowed,
            config_key,
        }
    }
}

/// Parses `names` as DNS names; the error names `config_key` and the bad entry.
pub fn dns_names(names: &[String], config_key: &str) -> anyhow::Result<Vec<DnsName<'static>>> {
    names
        .iter()
        .map(|n| {
            DnsName::try_from(n.as_str())
                .map(|d| d.to_owned())
                .map_err(|_| anyhow::anyhow!("{config_key}: {n:?} is not a DNS name"))
        })
        .collect()
}

/// Which of `names` the certificate `end_entity` is valid for (the first that matches), or
/// None. For a peer that already passed [`AllowedNames`]: it says who the peer is.
pub fn matching_name(end_entity: &CertificateDer<'_>, names: &[DnsName<'_>]) -> Option<usize> {
    let cert = rustls::server::ParsedCertificate::try_from(end_entity).ok()?;
    names.iter().position(|n| {
        rustls::client::verify_server_name(&cert, &ServerName::DnsName(n.to_owned())).is_ok()
    })
}

struct NameNotAllowed {
    presented: Vec<String>,
    config_key: &'static str,
}

// rustls prints the inner error of `CertificateError::Other` with `{:?}`: make that readable.
impl std::fmt::Debug for NameNotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for NameNotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client certificate names [{}] are not in {}",
            self.presented.join(", "),
            self.config_key
        )
    }
}

impl std::error::Error for NameNotAllowed {}

impl ClientCertVerifier for AllowedNames {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let mut presented = Vec::new();
        for name in &self.allowed {
            let name = ServerName::DnsName(name.clone());
            match rustls::client::verify_server_name(&cert, &name) {
                Ok(()) => return Ok(ClientCertVerified::assertion()),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { presented: p, .. },
                )) => presented = p,
                Err(_) => {}
            }
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(NameNotAllowed {
                presented,
                config_key: self.config_key,
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
