//! The worker's control API over TCP with mutual TLS (`[control_tls]`): a real `baton-worker` on
//! 127.0.0.1 (host namespace, free ports), the real `baton` CLI as the controller, and raw TLS
//! clients for what the CLI cannot send. Checks that the controller certificate works; that
//! another worker's certificate (right CA, name not allowed), a certificate from another CA and
//! no certificate are refused before any request is answered, and logged; that idle connections
//! take no client slot; that the concurrent client limit and the request line limit hold; and
//! that the worker keeps serving. Needs no root or namespace: everything is on 127.0.0.1 with
//! free ports.
mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{PATIENCE, bin_dir, gen_certs, worker_bin};

const MAX_CLIENTS: usize = 4;
/// Read and write timeout of the test's own sockets to the worker.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One worker `w1` with `[control_tls]` on 127.0.0.1; killed (and its files removed) on drop.
struct Worker {
    dir: PathBuf,
    child: Child,
    control: SocketAddr,
}

impl Worker {
    fn start() -> Worker {
        let dir = std::env::temp_dir().join(format!("baton-ctltls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        gen_certs(&dir, "w1,w2", &[]);
        gen_certs(&dir.join("other"), "w1", &[]);
        let control: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let d = dir.display();
        let cfg = format!(
            r#"vip = "127.0.0.1"
port = {vip_port}
server_id = 1
cert = "{d}/service.pem"
key = "{d}/service.key"
name = "w1"
control_socket = "{d}/w1.sock"
secrets = "{d}/secrets.toml"
[peer]
listen = "127.0.0.1:{peer_port}"
ca = "{d}/ca.pem"
cert = "{d}/w1.pem"
key = "{d}/w1.key"
workers = [{{ name = "w2", server_id = 2, peer = "127.0.0.1:1" }}]
[control_tls]
listen = "{control}"
ca = "{d}/ca.pem"
cert = "{d}/w1.pem"
key = "{d}/w1.key"
clients = ["baton-controller"]
max_clients = {MAX_CLIENTS}
"#,
            vip_port = free_udp_port(),
            peer_port = free_udp_port(),
        );
        std::fs::write(dir.join("w1.toml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("w1.log")).unwrap();
        let child = Command::new(worker_bin())
            .arg("--config")
            .arg(dir.join("w1.toml"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut w = Worker {
            dir,
            child,
            control,
        };
        let start = Instant::now();
        while TcpStream::connect(control).is_err() {
            assert!(
                w.child.try_wait().unwrap().is_none(),
                "worker exited:\n{}",
                w.log()
            );
            assert!(start.elapsed() < PATIENCE, "worker not up:\n{}", w.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        w
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("w1.log")).unwrap_or_default()
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// A migration config reaching w1 over TLS at `addr` with these client files.
    fn migration_config(&self, file: &str, addr: SocketAddr, ca: &str, cert: &str) -> PathBuf {
        let d = self.dir.display();
        let key = cert.replace(".pem", ".key");
        let text = format!(
            "secrets = \"{d}/controller-secrets.toml\"\n\
             [control_tls]\nca = \"{d}/{ca}\"\ncert = \"{d}/{cert}\"\nkey = \"{d}/{key}\"\n\
             [[workers]]\nname = \"w1\"\ncontrol_tls = \"{addr}\"\n"
        );
        let p = self.dir.join(file);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `baton --json conns` with this migration config (no baton-lb: its socket and pins absent).
    fn baton_conns(&self, config: &Path) -> Output {
        Command::new(bin_dir().join("baton"))
            .arg("--migration-config")
            .arg(config)
            .arg("--control-socket")
            .arg(self.path("no-lb.sock"))
            .arg("--pin-dir")
            .arg(self.path("no-pins"))
            .args(["--json", "conns"])
            .output()
            .unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- w1 log ----\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw TLS 1.3 client (ALPN baton-control/1) trusting `ca`, presenting `client` if given.
fn tls_client(
    ca: &Path,
    client: Option<(&Path, &Path)>,
    addr: SocketAddr,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"baton-control/1".to_vec()];
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("w1").unwrap()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    // Generous: a loaded machine must not turn a slow answer into an error (the refusals are
    // checked by what the worker answers, not by how fast).
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Sends `req` and reads one answer line; Err with what happened if there is none.
fn request(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    req: &[u8],
) -> Result<Value, String> {
    s.write_all(req).map_err(|e| format!("write: {e}"))?;
    s.flush().map_err(|e| format!("flush: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.contains(&b'\n') {
        match s.read(&mut buf) {
            Ok(0) => return Err("closed without answering".into()),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    serde_json::from_slice(&answer).map_err(|e| format!("unreadable answer: {e}"))
}

fn wait_for_log(w: &Worker, needle: &str, count: usize) {
    let start = Instant::now();
    while w.log().matches(needle).count() < count {
        assert!(
            start.elapsed() < PATIENCE,
            "the worker did not log {needle:?} {count} times:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn control_api_over_mutual_tls() {
    let mut w = Worker::start();
    let dir = w.dir.clone();
    let pair = |n: &str| (dir.join(format!("{n}.pem")), dir.join(format!("{n}.key")));
    let ca = w.path("ca.pem");

    // The controller certificate: `baton conns` (info + conns) works over TLS.
    let good = w.migration_config("good.toml", w.control, "ca.pem", "controller.pem");
    let out = w.baton_conns(&good);
    assert!(
        out.status.success(),
        "baton conns over mTLS: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows, Value::Array(vec![]), "no connections yet");
    let (c, k) = pair("controller");
    let mut s = tls_client(&ca, Some((&c, &k)), w.control);
    let info = request(&mut s, b"{\"cmd\":\"info\"}\n").unwrap();
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["data"]["name"], "w1", "{info}");
    assert_eq!(info["data"]["server_id"], 1, "{info}");
    // Several requests on one connection; a bad one is answered, not fatal.
    let bad = request(&mut s, b"{\"cmd\":\"nope\"}\n").unwrap();
    assert_eq!(bad["ok"], false, "{bad}");
    let conns = request(&mut s, b"{\"cmd\":\"conns\"}\n").unwrap();
    assert_eq!(conns["ok"], true, "{conns}");
    // An over-long request line is answered with an error and the connection closed.
    let long = vec![b'x'; 100 * 1024];
    let e = request(&mut s, &long).unwrap();
    assert!(e["error"].as_str().unwrap().contains("longer than"), "{e}");
    assert!(request(&mut s, b"{\"cmd\":\"info\"}\n").is_err());
    drop(s);

    // Another worker's certificate: signed by the CA, but its name (w2) is not allowed.
    let as_w2 = w.migration_config("as-w2.toml", w.control, "ca.pem", "w2.pem");
    let out = w.baton_conns(&as_w2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("client certificate") && err.contains("w1"),
        "baton should say our certificate was refused: {err}"
    );
    wait_for_log(&w, "not in control_tls.clients", 1);
    let (c, k) = pair("w2");
    let mut s = tls_client(&ca, Some((&c, &k)), w.control);
    let e = request(&mut s, b"{\"cmd\":\"info\"}\n").unwrap_err();
    assert!(!e.contains("\"ok\""), "{e}");
    wait_for_log(&w, "not in control_tls.clients", 2);

    // A controller certificate from another CA.
    let other = w.migration_config("other.toml", w.control, "ca.pem", "other/controller.pem");
    let out = w.baton_conns(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("client certificate"), "{err}");
    let c = w.path("other/controller.pem");
    let k = w.path("other/controller.key");
    let mut s = tls_client(&ca, Some((&c, &k)), w.control);
    request(&mut s, b"{\"cmd\":\"info\"}\n").unwrap_err();

    // No client certificate at all.
    let mut s = tls_client(&ca, None, w.control);
    let e = request(&mut s, b"{\"cmd\":\"info\"}\n").unwrap_err();
    assert!(!e.contains("\"ok\""), "{e}");

    // The controller trusts the wrong CA: it refuses the worker, and says so.
    let wrong_ca = w.migration_config("wrong-ca.toml", w.control, "other/ca.pem", "controller.pem");
    let out = w.baton_conns(&wrong_ca);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("control_tls.ca"), "{err}");

    // Nothing listens: the worker is not running (a warning; the list is complete).
    let nobody: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let gone = w.migration_config("gone.toml", nobody, "ca.pem", "controller.pem");
    let out = w.baton_conns(&gone);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("not running") && err.contains("nothing listens"),
        "{err}"
    );

    // Every refusal is logged with the client's address, and no key material is.
    // (as-w2 x2, other CA x2, no certificate, and the worker's side of the wrong-CA handshake)
    wait_for_log(&w, "not in control_tls.clients", 2);
    wait_for_log(&w, "invalid peer certificate: BadSignature", 2);
    wait_for_log(&w, "peer sent no certificates", 1);
    wait_for_log(&w, "received fatal alert", 1);
    let log = w.log();
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    let secrets = std::fs::read_to_string(w.path("secrets.toml")).unwrap();
    for line in secrets
        .lines()
        .filter(|l| l.contains("secret =") || l.contains("key ="))
    {
        let value = line.split('"').nth(1).unwrap_or_default();
        assert!(
            value.is_empty() || !log.contains(value),
            "a secret was logged"
        );
    }

    // Idle connections that never handshake take no client slot: with more of them than
    // MAX_CLIENTS held open (they sit in the worker's pending handshakes, apart from the
    // clients; fewer than the 8 one address may hold), the controller is still served.
    let idle: Vec<TcpStream> = (0..MAX_CLIENTS + 2)
        .map(|_| TcpStream::connect(w.control).unwrap())
        .collect();
    let out = w.baton_conns(&good);
    assert!(
        out.status.success(),
        "idle connections kept the controller out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(idle);
    // At most MAX_CLIENTS authenticated clients at once: with that many connected, the next is
    // answered busy; once one leaves, it is served again.
    let (c, k) = pair("controller");
    let mut held: Vec<_> = (0..MAX_CLIENTS)
        .map(|_| {
            let mut s = tls_client(&ca, Some((&c, &k)), w.control);
            assert_eq!(
                request(&mut s, b"{\"cmd\":\"info\"}\n").unwrap()["ok"],
                true
            );
            s
        })
        .collect();
    let out = w.baton_conns(&good);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a client beyond max_clients was served: {err}"
    );
    assert!(err.contains("max_clients"), "{err}");
    wait_for_log(&w, "too many clients", 1);
    held.pop();
    let start = Instant::now();
    loop {
        let out = w.baton_conns(&good);
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "slots were not released: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);

    // The worker kept serving: alive, and both transports still answer.
    assert!(w.child_alive(), "the worker died:\n{}", w.log());
    let (c, k) = pair("controller");
    let mut s = tls_client(&ca, Some((&c, &k)), w.control);
    assert_eq!(
        request(&mut s, b"{\"cmd\":\"info\"}\n").unwrap()["ok"],
        true
    );
    let unix = std::os::unix::net::UnixStream::connect(w.path("w1.sock")).unwrap();
    unix.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (&unix).write_all(b"{\"cmd\":\"info\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&unix), &mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["data"]["name"], "w1", "{v}");
}

impl Worker {
    fn child_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}
