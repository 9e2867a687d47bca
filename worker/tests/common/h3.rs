//! HTTP/3 through the in-process lab: the proxy service in front of `baton-upstream`'s server,
//! and an h3 client (h3-quinn over quinn) with checked GETs and echoes.
use super::lab::Lab;
use baton_test_upstream::server::{Stats, serve};
use baton_worker::http3::config::ProxyConfig;
use baton_worker::http3::proxy::ProxyService;
use bytes::{Buf, Bytes};
use std::net::SocketAddr;
use std::sync::Arc;

pub type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// `baton-upstream`'s server on a loopback port.
pub async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, Arc::new(Stats::default())));
    addr
}

/// The proxy service with one upstream pool (`protocol`: `http1` or `h2c`) for every request.
pub fn proxy(upstream: SocketAddr, protocol: &str) -> Arc<ProxyService> {
    proxy_with(upstream, protocol, "")
}

/// [`proxy`] with more top-level `[proxy]` keys (`extra`, TOML lines such as
/// `response_timeout_ms = 500`).
pub fn proxy_with(upstream: SocketAddr, protocol: &str, extra: &str) -> Arc<ProxyService> {
    proxy_toml(&format!(
        r#"
        {extra}
        [[upstreams]]
        name = "app"
        servers = ["{upstream}"]
        protocol = "{protocol}"
        [[routes]]
        upstream = "app"
        "#
    ))
}

/// The proxy service from a whole `[proxy]` table's TOML (several upstreams and routes).
pub fn proxy_toml(text: &str) -> Arc<ProxyService> {
    let config: ProxyConfig = toml::from_str(text).unwrap();
    Arc::new(ProxyService::new(config).unwrap())
}

/// An HTTP/3 client connection: quinn's, h3's request handle, h3's connection driver task.
pub struct Client {
    pub conn: quinn::Connection,
    pub send: Sender,
    pub driver: tokio::task::JoinHandle<h3::error::ConnectionError>,
}

/// A QUIC connection to the lab's VIP with ALPN h3 (trusting its certificate), no HTTP/3 on it
/// yet.
pub async fn connect(lab: &Lab) -> quinn::Connection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(lab.cert.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    endpoint
        .connect(lab.vip, "localhost")
        .unwrap()
        .await
        .unwrap()
}

/// Connects to the lab's VIP (ALPN h3, trusting its certificate).
pub async fn client(lab: &Lab) -> Client {
    let conn = connect(lab).await;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .unwrap();
    let driver = tokio::spawn(async move { driver.wait_idle().await });
    Client { conn, send, driver }
}

/// GET `path` and the whole body.
pub async fn get(send: &mut Sender, path: &str) -> (http::StatusCode, Vec<u8>) {
    let req = http::Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    stream.finish().await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    (resp.status(), body)
}

/// POST `body` to /echo and the answer.
pub async fn echo(send: &mut Sender, body: &[u8]) -> Vec<u8> {
    let req = http::Request::post("https://localhost/echo")
        .header("content-length", body.len())
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    for chunk in body.chunks(16 * 1024) {
        stream
            .send_data(Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    stream.finish().await.unwrap();
    let resp = stream.recv_response().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut out = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    out
}
