//! The `[proxy]` section of `worker.toml` (service `proxy`): upstream pools, routes, timeouts,
//! size limits and forwarding headers. Checked whole at start-up; every error names the key.
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Example:
/// ```toml
/// service = "proxy"
///
/// [proxy]
/// via = "baton"                 # the pseudonym in `via: 3 baton`
/// forwarded = "x-forwarded"     # "x-forwarded" (x-forwarded-for/-proto/-host), "forwarded", "both", "none"
/// max_header_bytes = 16384      # HTTP/3 SETTINGS_MAX_FIELD_SECTION_SIZE: larger requests get 431
/// max_body_bytes = 67108864     # request bodies beyond this get 413
/// connect_timeout_ms = 2000     # TCP connect to an upstream server: 502 after this
/// response_timeout_ms = 30000   # until the upstream's response head: 504 after this
/// idle_timeout_ms = 90000       # an idle pooled upstream connection is closed after this
///
/// [[proxy.upstreams]]
/// name = "app"
/// servers = ["10.0.3.10:8080", "10.0.3.11:8080"]   # round robin
/// protocol = "http1"            # or "h2c" (HTTP/2 with prior knowledge), "https", "h2"
///
/// [[proxy.upstreams]]
/// name = "secure"
/// servers = ["app.internal:8443"]
/// protocol = "h2"               # HTTP/2 over TLS (ALPN h2); "https": HTTP/1.1 over TLS
/// tls.ca = "/etc/baton/upstream-ca.pem"   # required: the CA bundle the servers' certificates chain to
/// tls.server_name = "app.internal"        # optional: default, each server's host (a name or an IP)
/// tls.cert = "/etc/baton/proxy-client.pem" # optional, with tls.key: a client certificate (mutual TLS)
/// tls.key = "/etc/baton/proxy-client.key"
///
/// [[proxy.routes]]
/// authority = "www.example.com" # optional: any authority
/// path_prefix = "/"             # the longest matching prefix wins
/// upstream = "app"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_via")]
    pub via: String,
    #[serde(default)]
    pub forwarded: Forwarded,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u64,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
}

/// Which forwarding headers the proxy adds (it always adds `via`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarded {
    /// `x-forwarded-for` (appended), `x-forwarded-proto`, `x-forwarded-host`.
    #[default]
    XForwarded,
    /// RFC 7239 `forwarded: for=...;proto=https;host=...` (appended).
    Forwarded,
    Both,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` of each server (an IP address or a name the worker's resolver knows).
    pub servers: Vec<String>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// How the servers of a TLS pool (`https`, `h2`) are verified, and the client certificate.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with a keep-alive pool.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge.
    H2c,
    /// HTTP/1.1 over TLS (ALPN `http/1.1`) with a keep-alive pool.
    Https,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
}

impl UpstreamProtocol {
    /// The name in `worker.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
            Self::Https => "https",
            Self::H2 => "h2",
        }
    }

    /// Whether the servers speak TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Https | Self::H2)
    }

    /// Whether requests go out as HTTP/2 (else HTTP/1.1).
    pub fn is_http2(self) -> bool {
        matches!(self, Self::H2c | Self::H2)
    }

    /// The scheme of the URIs the proxy hands its upstream client.
    pub fn scheme(self) -> &'static str {
        if self.is_tls() { "https" } else { "http" }
    }

    /// The ALPN protocol a TLS pool offers (and the only one: the pool's protocol is fixed).
    pub fn alpn(self) -> Option<&'static [u8]> {
        match self {
            Self::Https => Some(b"http/1.1"),
            Self::H2 => Some(b"h2"),
            Self::Http1 | Self::H2c => None,
        }
    }
}

/// `tls.*` of an upstream pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM CA certificate(s) the servers' certificates must chain to (required: the worker does
    /// not read the system's trust store).
    pub ca: Option<PathBuf>,
    /// The name the servers' certificates are checked against, and the SNI sent. Unset: the host
    /// part of each server's address (an IP address is checked against the certificate's IP
    /// address SANs, and sends no SNI).
    pub server_name: Option<String>,
    /// PEM client certificate chain, for servers that ask for one (mutual TLS); with `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (a secret file: mode 0600, owned by the worker's user or root).
    pub key: Option<PathBuf>,
}

impl UpstreamConfig {
    /// The TLS client configuration of a TLS pool (`None` for a cleartext one), with every file
    /// read and checked. Errors say which `tls.*` key to fix, without the upstream's name.
    pub fn client_tls(&self) -> Result<Option<rustls::ClientConfig>, String> {
        let protocol = self.protocol.name();
        let Some(alpn) = self.protocol.alpn() else {
            if self.tls.is_some() {
                return Err(format!(
                    "has tls settings but protocol {protocol:?} is cleartext: set protocol = \
                     \"https\" (HTTP/1.1 over TLS) or \"h2\" (HTTP/2 over TLS), or remove tls.*"
                ));
            }
            return Ok(None);
        };
        let tls = self.tls.clone().unwrap_or_default();
        let Some(ca) = &tls.ca else {
            return Err(format!(
                "protocol {protocol:?} needs tls.ca = \"/path/to/ca.pem\": the PEM CA bundle the \
                 servers' certificates chain to (the system trust store is not used)"
            ));
        };
        let roots = read_roots(ca)?;
        match &tls.server_name {
            Some(name) => {
                server_name(name).map_err(|e| format!("tls.server_name {name:?} {e}"))?;
            }
            None => {
                for s in &self.servers {
                    let host = server_host(s);
                    server_name(host).map_err(|e| {
                        format!(
                            "server {s:?}: its host {host:?} {e}; set tls.server_name to the name \
                             in the servers' certificates"
                        )
                    })?;
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots);
        let mut config = match (&tls.cert, &tls.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err("tls.cert is set without tls.key: add tls.key = \
                            \"/path/to/client.key\", the client certificate's PEM private key"
                    .into());
            }
            (None, Some(_)) => {
                return Err("tls.key is set without tls.cert: add tls.cert = \
                            \"/path/to/client.pem\", the PEM client certificate chain of that key"
                    .into());
            }
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "tls.cert")?;
                let key_der = read_key(key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| match e {
                        rustls::Error::InconsistentKeys(_) => format!(
                            "tls.key {} is not the key of the certificate in tls.cert {}",
                            key.display(),
                            cert.display()
                        ),
                        e => format!(
                            "tls.cert {} / tls.key {}: {e}",
                            cert.display(),
                            key.display()
                        ),
                    })?
            }
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Some(config))
    }
}

/// The host of `host:port` or `[v6]:port`, brackets removed.
pub fn server_host(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A DNS name or an IP address, as rustls checks a certificate against it.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|_| "is neither a DNS name nor an IP address".to_string())
}

fn read_file(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM file (at least one).
fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(path, key)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(path, "tls.ca")? {
        roots.add(c).map_err(|e| {
            format!(
                "tls.ca: {} holds a certificate that is not a usable CA: {e}",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// The client key: a secret file (the same rule as the worker's other keys).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = migration::secret_file::read(path).map_err(|e| format!("tls.key: {e}"))?;
    // No detail from the key file beyond its path.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        format!(
            "tls.key: {} holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC)",
            path.display()
        )
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Matches the request's `:authority` (port ignored, case-insensitive); unset: any.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    pub upstream: String,
}

fn default_via() -> String {
    "baton".into()
}
fn default_max_header_bytes() -> u64 {
    16 * 1024
}
fn default_max_body_bytes() -> u64 {
    64 << 20
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_response_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    90_000
}
fn default_path_prefix() -> String {
    "/".into()
}

impl ProxyConfig {
    /// Checks that routes name upstreams that exist, servers are `host:port`, values are sane.
    pub fn validate(&self) -> Result<(), String> {
        if self.upstreams.is_empty() {
            return Err(
                "proxy.upstreams is empty: add an [[proxy.upstreams]] with name and servers".into(),
            );
        }
        if self.routes.is_empty() {
            return Err(
                "proxy.routes is empty: add a [[proxy.routes]] with path_prefix and upstream"
                    .into(),
            );
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.name.is_empty() {
                return Err(format!("proxy.upstreams[{i}].name is empty"));
            }
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return Err(format!(
                    "proxy.upstreams[{i}]: a second upstream named {:?}",
                    u.name
                ));
            }
            if u.servers.is_empty() {
                return Err(format!(
                    "proxy.upstreams[{i}] ({}) lists no servers",
                    u.name
                ));
            }
            for s in &u.servers {
                let ok = s.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if !ok {
                    return Err(format!(
                        "proxy.upstreams[{i}] ({}): server {s:?} is not host:port",
                        u.name
                    ));
                }
            }
            u.client_tls()
                .map_err(|e| format!("proxy.upstreams[{i}] ({}): {e}", u.name))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !r.path_prefix.starts_with('/') {
                return Err(format!(
                    "proxy.routes[{i}].path_prefix {:?} does not start with /",
                    r.path_prefix
                ));
            }
            if !self.upstreams.iter().any(|u| u.name == r.upstream) {
                let known: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
                return Err(format!(
                    "proxy.routes[{i}] names upstream {:?}, which is not defined (upstreams: {})",
                    r.upstream,
                    known.join(", ")
                ));
            }
        }
        for (key, v) in [
            ("max_header_bytes", self.max_header_bytes),
            ("max_body_bytes", self.max_body_bytes),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("proxy.{key} is 0: give it a positive value"));
            }
        }
        if self.via.is_empty() || !self.via.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "proxy.via {:?} must be a non-empty token without spaces",
                self.via
            ));
        }
        Ok(())
    }

    /// The route for a request, by authority and path: the longest matching prefix, routes
    /// with an authority before those without.
    pub fn route(&self, authority: Option<&str>, path: &str) -> Option<&RouteConfig> {
        let host = authority.map(|a| strip_port(a).to_ascii_lowercase());
        self.routes
            .iter()
            .filter(|r| match (&r.authority, &host) {
                (None, _) => true,
                (Some(want), Some(host)) => want.eq_ignore_ascii_case(host),
                (Some(_), None) => false,
            })
            .filter(|r| path.starts_with(&r.path_prefix))
            .max_by_key(|r| (r.authority.is_some(), r.path_prefix.len()))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

/// `host` of `host:port`, `[v6]:port`, `[v6]` or `host`.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ProxyConfig {
        toml::from_str(text).unwrap()
    }

    const BASE: &str = r#"
        [[upstreams]]
        name = "app"
        servers = ["10.0.0.1:8080"]
        [[upstreams]]
        name = "static"
        servers = ["files.internal:80"]
        protocol = "h2c"
        [[routes]]
        upstream = "app"
        [[routes]]
        path_prefix = "/static/"
        upstream = "static"
        [[routes]]
        authority = "Admin.Example"
        path_prefix = "/"
        upstream = "static"
    "#;

    #[test]
    fn routes_by_authority_then_longest_prefix() {
        let c = parse(BASE);
        c.validate().unwrap();
        assert_eq!(c.upstreams[1].protocol, UpstreamProtocol::H2c);
        assert_eq!(
            c.route(Some("www.example:443"), "/x").unwrap().upstream,
            "app"
        );
        assert_eq!(
            c.route(Some("www.example"), "/static/a.css")
                .unwrap()
                .upstream,
            "static"
        );
        assert_eq!(
            c.route(Some("admin.example:443"), "/x").unwrap().upstream,
            "static"
        );
        assert_eq!(c.route(None, "/x").unwrap().upstream, "app");
        assert_eq!(strip_port("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(strip_port("example"), "example");
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = parse(BASE);
        c.routes[0].upstream = "nope".into();
        assert!(
            c.validate()
                .unwrap_err()
                .contains("proxy.routes[0] names upstream \"nope\"")
        );
        let mut c = parse(BASE);
        c.upstreams[0].servers = vec!["10.0.0.1".into()];
        assert!(c.validate().unwrap_err().contains("not host:port"));
        let mut c = parse(BASE);
        c.response_timeout_ms = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .contains("proxy.response_timeout_ms")
        );
        assert!(toml::from_str::<ProxyConfig>("upstreams = []\nroutes = []\nbogus = 1").is_err());
    }

    /// A CA, a server certificate and a client certificate with its key (0600), in a fresh
    /// directory.
    struct Files {
        dir: std::path::PathBuf,
    }

    impl Files {
        fn new(tag: &str) -> Files {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let dir = std::env::temp_dir()
                .join(format!("baton-proxy-config-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = p.self_signed(&ca_key).unwrap();
            std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
            for name in ["client", "other"] {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(vec![name.to_string()])
                    .unwrap()
                    .signed_by(&key, &ca, &ca_key)
                    .unwrap();
                std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
                migration::secret_file::write(
                    dir.join(format!("{name}.key")),
                    key.serialize_pem().as_bytes(),
                )
                .unwrap();
            }
            std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
            Files { dir }
        }

        /// A config with one upstream of `protocol` on `server` and these extra upstream lines.
        fn config(&self, protocol: &str, server: &str, lines: &str) -> ProxyConfig {
            let lines = lines.replace("DIR", &self.dir.display().to_string());
            parse(&format!(
                "[[upstreams]]\nname = \"app\"\nservers = [\"{server}\"]\nprotocol = \"{protocol}\"\n\
                 {lines}\n[[routes]]\nupstream = \"app\"\n"
            ))
        }

        fn error(&self, protocol: &str, server: &str, lines: &str) -> String {
            self.config(protocol, server, lines).validate().unwrap_err()
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn tls_pools_load_their_files() {
        let f = Files::new("ok");
        let c = f.config("h2", "app.internal:8443", "tls.ca = \"DIR/ca.pem\"");
        c.validate().unwrap();
        let tls = c.upstreams[0].client_tls().unwrap().unwrap();
        assert_eq!(tls.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(!tls.client_auth_cert_resolver.has_certs());
        assert_eq!(c.upstreams[0].protocol.scheme(), "https");
        assert!(c.upstreams[0].protocol.is_http2());
        // An IP address as the default name (checked against IP SANs), a v6 one, a set name.
        f.config("https", "10.0.0.1:443", "tls.ca = \"DIR/ca.pem\"")
            .validate()
            .unwrap();
        f.config("https", "[2001:db8::1]:443", "tls.ca = \"DIR/ca.pem\"")
            .validate()
            .unwrap();
        let c = f.config(
            "https",
            "10.0.0.1:443",
            "tls.ca = \"DIR/ca.pem\"\ntls.server_name = \"app.internal\"\n\
             tls.cert = \"DIR/client.pem\"\ntls.key = \"DIR/client.key\"",
        );
        c.validate().unwrap();
        let tls = c.upstreams[0].client_tls().unwrap().unwrap();
        assert_eq!(tls.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(tls.client_auth_cert_resolver.has_certs());
        // The same as a [proxy.upstreams.tls] table.
        let c = f.config(
            "https",
            "10.0.0.1:443",
            "[upstreams.tls]\nca = \"DIR/ca.pem\"",
        );
        c.validate().unwrap();
        // Cleartext pools need nothing, as before.
        assert!(parse(BASE).upstreams[0].client_tls().unwrap().is_none());
    }

    #[test]
    fn tls_errors_say_what_to_fix() {
        let f = Files::new("errors");
        let host = "app.internal:443";
        let e = f.error("https", host, "");
        assert!(
            e.contains("proxy.upstreams[0] (app): protocol \"https\" needs tls.ca"),
            "{e}"
        );
        let e = f.error("h2", host, "tls.server_name = \"app.internal\"");
        assert!(e.contains("needs tls.ca"), "{e}");
        let e = f.error("http1", host, "tls.ca = \"DIR/ca.pem\"");
        assert!(
            e.contains("cleartext") && e.contains("protocol = \"https\""),
            "{e}"
        );
        let e = f.error("h2c", host, "tls.ca = \"DIR/ca.pem\"");
        assert!(e.contains("cleartext"), "{e}");
        let e = f.error("https", host, "tls.ca = \"DIR/missing.pem\"");
        assert!(
            e.contains("tls.ca: cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        let e = f.error("https", host, "tls.ca = \"DIR/garbage.pem\"");
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = f.error(
            "https",
            host,
            "tls.ca = \"DIR/ca.pem\"\ntls.cert = \"DIR/client.pem\"",
        );
        assert!(e.contains("tls.cert is set without tls.key"), "{e}");
        let e = f.error(
            "https",
            host,
            "tls.ca = \"DIR/ca.pem\"\ntls.key = \"DIR/client.key\"",
        );
        assert!(e.contains("tls.key is set without tls.cert"), "{e}");
        let e = f.error(
            "https",
            host,
            "tls.ca = \"DIR/ca.pem\"\ntls.cert = \"DIR/client.pem\"\ntls.key = \"DIR/other.key\"",
        );
        assert!(e.contains("is not the key of the certificate"), "{e}");
        let e = f.error(
            "https",
            host,
            "tls.ca = \"DIR/ca.pem\"\ntls.cert = \"DIR/garbage.pem\"\ntls.key = \"DIR/client.key\"",
        );
        assert!(
            e.contains("tls.cert:") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        // A key is a secret file: 0600, and a PEM key.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            f.dir.join("other.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = f.error(
            "https",
            host,
            "tls.ca = \"DIR/ca.pem\"\ntls.cert = \"DIR/other.pem\"\ntls.key = \"DIR/other.key\"",
        );
        assert!(e.contains("tls.key:") && e.contains("chmod 600"), "{e}");
        migration::secret_file::write(f.dir.join("bad.key"), b"no key here\n").unwrap();
        let e = f.error(
            "https",
            host,
            "tls.ca = \"DIR/ca.pem\"\ntls.cert = \"DIR/client.pem\"\ntls.key = \"DIR/bad.key\"",
        );
        assert!(e.contains("holds no PEM private key"), "{e}");
        let e = f.error(
            "https",
            host,
            "tls.ca = \"DIR/ca.pem\"\ntls.server_name = \"not a name\"",
        );
        assert!(
            e.contains("tls.server_name \"not a name\" is neither a DNS name nor an IP address"),
            "{e}"
        );
        let e = f.error("https", "bad_host!:443", "tls.ca = \"DIR/ca.pem\"");
        assert!(e.contains("set tls.server_name"), "{e}");
        // Unknown tls keys and protocols are refused when parsed.
        let unknown = "[[upstreams]]\nname = \"a\"\nservers = [\"h:1\"]\nprotocol = \"https\"\n\
                       tls.bogus = 1\n[[routes]]\nupstream = \"a\"\n";
        assert!(toml::from_str::<ProxyConfig>(unknown).is_err());
        let unknown = "[[upstreams]]\nname = \"a\"\nservers = [\"h:1\"]\nprotocol = \"h3\"\n\
                       [[routes]]\nupstream = \"a\"\n";
        assert!(toml::from_str::<ProxyConfig>(unknown).is_err());
    }
}
