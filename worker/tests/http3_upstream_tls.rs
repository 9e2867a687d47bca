//! The proxy service to upstreams over TLS, in one process: an h3 client (h3-quinn over quinn)
//! through the two-worker lab (`common::lab`) to `baton-upstream`'s server serving HTTPS
//! (`serve_tls`) on loopback, with certificates made here with rcgen. Pools with
//! `protocol = "https"` (HTTP/1.1, ALPN http/1.1) and `"h2"` (ALPN h2): bodies byte-exact both ways;
//! a server whose certificate is from another CA, or not for the configured name, gets the client
//! a 502 and a log line naming the upstream and the TLS reason, and the worker serves on; mutual
//! TLS with `tls.cert`/`tls.key`.
mod common;

use baton_test_upstream::pattern;
use baton_test_upstream::server::{Stats, serve_tls};
use bytes::Buf;
use common::h3::{Sender, client, echo, proxy_toml};
use common::lab::Lab;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// A CA of its own in a directory of its own; issues certificates into it.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("baton-upstream-tls-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("test CA {tag}"));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `sans` (DNS names or IP addresses) and its key (written 0600, as the
    /// worker reads keys): `file.pem`, `file.key`.
    fn issue(
        &self,
        file: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, sans[0]);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        migration::secret_file::write(&key_path, key.serialize_pem().as_bytes()).unwrap();
        (cert_path, key_path)
    }

    /// A server certificate for `upstream.test` and 127.0.0.1.
    fn server(&self, file: &str) -> (PathBuf, PathBuf) {
        self.issue(
            file,
            &["upstream.test", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `baton-upstream`'s server over TLS on a loopback port; with `client_ca`, it requires client
/// certificates from that CA.
async fn tls_upstream(cert: &Path, key: &Path, client_ca: Option<&Path>) -> SocketAddr {
    let config = baton_test_upstream::tls::server_config(cert, key, client_ca).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_tls(
        listener,
        Arc::new(Stats::default()),
        tokio_rustls::TlsAcceptor::from(config),
    ));
    addr
}

/// One `[[upstreams]]` table of a TLS pool (`tls` lines: `tls.ca = ...` and so on).
fn upstream_toml(name: &str, server: SocketAddr, protocol: &str, tls: &[(&str, &Path)]) -> String {
    let mut t = format!(
        "[[upstreams]]\nname = \"{name}\"\nservers = [\"{server}\"]\nprotocol = \"{protocol}\"\n"
    );
    for (key, path) in tls {
        t.push_str(&format!("tls.{key} = \"{}\"\n", path.display()));
    }
    t
}

/// Everything the worker logs at warn and above, from every test of this file (each names its
/// upstreams apart).
fn log() -> &'static Mutex<String> {
    static LOG: OnceLock<Mutex<String>> = OnceLock::new();
    LOG.get_or_init(|| {
        struct Capture;
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                log()
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(buf));
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
        Mutex::new(String::new())
    })
}

/// The logged lines that mention `upstream=name`.
fn logged_about(name: &str) -> Vec<String> {
    let needle = format!("upstream={name} ");
    log()
        .lock()
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// GET `path`: status, `via` header, body.
async fn get(send: &mut Sender, path: &str) -> (u16, String, Vec<u8>) {
    let req = http::Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    stream.finish().await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    let via = resp
        .headers()
        .get("via")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    (resp.status().as_u16(), via, body)
}

/// 1 KB and ~500 KB GETs and a 70 KB echo, byte-exact, through the upstream behind `/`; `via`
/// the upstream's HTTP version (`1.1` or `2`).
async fn check_bodies(send: &mut Sender, seed: u64, http_version: &str, what: &str) {
    let (status, via, body) = get(send, &format!("/bytes/1024?seed={seed}")).await;
    assert_eq!(status, 200, "{what}");
    assert_eq!(body, pattern(seed, 0, 1024), "{what}");
    assert!(
        via.starts_with(&format!("{http_version} baton")),
        "{what}: via {via:?}"
    );
    let (status, _, body) = get(send, &format!("/bytes/500000?seed={seed}")).await;
    assert_eq!(status, 200, "{what}");
    assert_eq!(body.len(), 500_000, "{what}");
    assert!(
        body == pattern(seed, 0, 500_000),
        "{what}: large body differs"
    );
    let posted = pattern(seed + 1000, 0, 70_000);
    let echoed = echo(send, &posted).await;
    assert!(echoed == posted, "{what}: echo differs");
    // An empty POST body, too.
    assert_eq!(echo(send, &[]).await, Vec::<u8>::new(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_h2_upstreams_carry_every_byte() {
    let pki = Pki::new("ok");
    let (cert, key) = pki.server("server");
    let addr = tls_upstream(&cert, &key, None).await;
    let ca = pki.ca_pem();
    // https with the default name (the server's IP, checked against the IP SAN); h2 with a DNS
    // name in tls.server_name.
    for (protocol, name, version) in [("https", None, "1.1"), ("h2", Some("upstream.test"), "2")] {
        let server_name_line = match name {
            Some(n) => format!("tls.server_name = \"{n}\"\n"),
            None => String::new(),
        };
        let text = format!(
            "{}{server_name_line}[[routes]]\nupstream = \"app\"\n",
            upstream_toml("app", addr, protocol, &[("ca", &ca)])
        );
        let lab = Lab::start(proxy_toml(&text)).await;
        let mut c = client(&lab).await;
        for round in 0..3u64 {
            check_bodies(
                &mut c.send,
                round + 1,
                version,
                &format!("{protocol} round {round}"),
            )
            .await;
        }
        assert!(c.conn.close_reason().is_none(), "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_from_another_ca_or_for_another_name_is_502_and_serving_goes_on() {
    log();
    let pki = Pki::new("trusted");
    let rogue_pki = Pki::new("rogue");
    let (cert, key) = pki.server("server");
    let good = tls_upstream(&cert, &key, None).await;
    let (rogue_cert, rogue_key) = rogue_pki.server("rogue");
    let rogue = tls_upstream(&rogue_cert, &rogue_key, None).await;
    let ca = pki.ca_pem();
    for protocol in ["https", "h2"] {
        let (r, m) = (format!("rogue-{protocol}"), format!("misnamed-{protocol}"));
        let text = format!(
            "{}{}{}tls.server_name = \"other.test\"\n\
             [[routes]]\nupstream = \"good\"\n\
             [[routes]]\npath_prefix = \"/rogue/\"\nupstream = \"{r}\"\n\
             [[routes]]\npath_prefix = \"/misnamed/\"\nupstream = \"{m}\"\n",
            upstream_toml("good", good, protocol, &[("ca", &ca)]),
            // Trusts the good CA; the server's certificate is from the rogue one.
            upstream_toml(&r, rogue, protocol, &[("ca", &ca)]),
            // The right CA, but the certificate is for upstream.test and 127.0.0.1.
            upstream_toml(&m, good, protocol, &[("ca", &ca)]),
        );
        let lab = Lab::start(proxy_toml(&text)).await;
        let mut c = client(&lab).await;
        for round in 0..3u64 {
            let what = format!("{protocol} round {round}");
            assert_eq!(get(&mut c.send, "/rogue/bytes/10").await.0, 502, "{what}");
            assert_eq!(
                get(&mut c.send, "/misnamed/bytes/10").await.0,
                502,
                "{what}"
            );
            let (status, _, body) = get(&mut c.send, &format!("/bytes/1024?seed={round}")).await;
            assert_eq!(status, 200, "{what}");
            assert_eq!(body, pattern(round, 0, 1024), "{what}");
        }
        check_bodies(
            &mut c.send,
            7,
            if protocol == "h2" { "2" } else { "1.1" },
            protocol,
        )
        .await;
        assert!(c.conn.close_reason().is_none(), "{protocol}");
        assert!(!c.driver.is_finished(), "{protocol}");

        // The 502s' log lines name the upstream, the server and rustls' reason.
        let lines = logged_about(&r);
        eprintln!("{}", lines.join("\n"));
        assert!(
            lines.iter().any(|l| l.contains("502")
                && l.contains(&rogue.to_string())
                && l.contains("TLS handshake")
                && l.contains("UnknownIssuer")),
            "{r}: {lines:#?}"
        );
        let lines = logged_about(&m);
        assert!(
            lines.iter().any(|l| l.contains("502")
                && l.contains("TLS handshake")
                && l.contains("other.test")
                && l.contains("not valid for name")),
            "{m}: {lines:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_certificate() {
    log();
    let pki = Pki::new("mtls");
    let (cert, key) = pki.server("server");
    let ca = pki.ca_pem();
    // The upstream asks for a client certificate from the same CA.
    let addr = tls_upstream(&cert, &key, Some(&ca)).await;
    let (client_cert, client_key) = pki.issue(
        "proxy-client",
        &["baton-proxy"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    for (protocol, version) in [("https", "1.1"), ("h2", "2")] {
        let anon = format!("anonymous-{protocol}");
        let text = format!(
            "{}{}[[routes]]\nupstream = \"app\"\n[[routes]]\npath_prefix = \"/anon/\"\nupstream = \"{anon}\"\n",
            upstream_toml(
                "app",
                addr,
                protocol,
                &[("ca", &ca), ("cert", &client_cert), ("key", &client_key)]
            ),
            upstream_toml(&anon, addr, protocol, &[("ca", &ca)]),
        );
        let lab = Lab::start(proxy_toml(&text)).await;
        let mut c = client(&lab).await;
        for round in 0..2u64 {
            check_bodies(
                &mut c.send,
                round + 20,
                version,
                &format!("mTLS {protocol} round {round}"),
            )
            .await;
            // Without a client certificate the upstream refuses: 502, and serving goes on.
            assert_eq!(
                get(&mut c.send, "/anon/bytes/10").await.0,
                502,
                "{protocol}"
            );
        }
        assert!(c.conn.close_reason().is_none(), "{protocol}");
        assert!(!logged_about(&anon).is_empty(), "{anon}: a log line");
    }
}
