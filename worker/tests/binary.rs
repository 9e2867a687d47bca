//! The `baton-worker` binary: TOML config, PEM files, the demo protocol over real UDP.
use baton_worker::demo::{ALPN, KIND_REQUEST};
use std::sync::Arc;
use std::time::Duration;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_serves_the_demo_protocol_from_its_config() {
    let dir = std::env::temp_dir().join(format!("baton-worker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("worker.toml"),
        format!(
            "vip = \"127.0.0.1\"\nport = {port}\nserver_id = 5\ncert = \"{}\"\nkey = \"{}\"\nservice = \"demo\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ),
    )
    .unwrap();
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_baton-worker"))
            .arg("--config")
            .arg(dir.join("worker.toml"))
            .spawn()
            .unwrap(),
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let server = format!("127.0.0.1:{port}").parse().unwrap();
    let mut conn = None;
    for _ in 0..50 {
        match tokio::time::timeout(
            Duration::from_millis(500),
            endpoint.connect(server, "localhost").unwrap(),
        )
        .await
        {
            Ok(Ok(c)) => {
                conn = Some(c);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let conn = conn.expect("worker answers");
    for n in 1..=3u64 {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(&[KIND_REQUEST]).await.unwrap();
        s.write_all(b"hello baton").await.unwrap();
        s.finish().unwrap();
        let answer = r.read_to_end(1024).await.unwrap();
        assert_eq!(u64::from_be_bytes(answer[..8].try_into().unwrap()), n);
        assert_eq!(&answer[8..], b"hello baton");
    }
    conn.close(0u32.into(), b"bye");
    let _ = std::fs::remove_dir_all(&dir);
}
