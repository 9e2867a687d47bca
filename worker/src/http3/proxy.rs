//! The `proxy` service (ALPN `h3`): terminates HTTP/3 with h3 over the worker's own connections
//! ([`super::bridge`]) and forwards each request to an upstream pool with hyper, streaming both
//! bodies. A connection moves between requests: its session carries the bridge's record of the
//! HTTP/3 control and QPACK streams, and the target's h3 resumes from it.
use super::bridge::{Bridge, BridgeConnection, Captured};
use super::config::{Forwarded, ProxyConfig};
use super::upstream::{BodyError, RequestBody, Upstream};
use crate::service::{AppSession, Drive, RestoreError, Service, WakeCore};
use bytes::{Buf, Bytes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use quinn_proto::Connection;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub const ALPN: &[u8] = b"h3";
/// Version of the captured session state.
const STATE_VERSION: u8 = 1;

type H3Server = h3::server::Connection<BridgeConnection, Bytes>;
type H3Resolver = h3::server::RequestResolver<BridgeConnection, Bytes>;
type SendHalf = h3::server::RequestStream<super::bridge::BridgeSend, Bytes>;
type RecvHalf = h3::server::RequestStream<super::bridge::BridgeRecv, Bytes>;

/// What every session of the service shares.
struct Proxy {
    config: ProxyConfig,
    upstreams: HashMap<String, Upstream>,
    runtime: tokio::runtime::Handle,
    /// What the HTTP/3 settings this worker sends depend on: a connection resumes only on a
    /// worker that would send the same.
    fingerprint: u64,
}

pub struct ProxyService {
    proxy: Arc<Proxy>,
}

impl ProxyService {
    /// Checks `config` and builds the upstream clients; must run inside the tokio runtime the
    /// sessions' tasks are to run on.
    pub fn new(config: ProxyConfig) -> anyhow::Result<Self> {
        config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("the proxy service needs a tokio runtime"))?;
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Ok((u.name.clone(), Upstream::new(u, &config)?)))
            .collect::<anyhow::Result<_>>()?;
        let fingerprint = fingerprint(&config);
        Ok(Self {
            proxy: Arc::new(Proxy {
                config,
                upstreams,
                runtime,
                fingerprint,
            }),
        })
    }
}

/// FNV-1a of what goes into this worker's SETTINGS frame.
fn fingerprint(config: &ProxyConfig) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let settings = format!(
        "h3-0.0.8;grease=0;max_field_section_size={}",
        config.max_header_bytes
    );
    for b in settings.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl Service for ProxyService {
    fn alpn(&self) -> &'static [u8] {
        ALPN
    }

    fn new_session(&self) -> Box<dyn AppSession> {
        Box::new(ProxySession::new(Bridge::new(), self.proxy.clone()))
    }

    fn restore(&self, state: &[u8]) -> Result<Box<dyn AppSession>, RestoreError> {
        let (&version, rest) = state
            .split_first()
            .ok_or(RestoreError("empty HTTP/3 state"))?;
        if version != STATE_VERSION {
            return Err(RestoreError("HTTP/3 state of another version"));
        }
        if rest.len() < 8 {
            return Err(RestoreError("truncated HTTP/3 state"));
        }
        let (print, rest) = rest.split_at(8);
        if u64::from_be_bytes(print.try_into().unwrap()) != self.proxy.fingerprint {
            return Err(RestoreError(
                "the source worker sends other HTTP/3 settings (proxy.max_header_bytes differs)",
            ));
        }
        let (captured, rest) = Captured::decode(rest).map_err(RestoreError)?;
        if !rest.is_empty() {
            return Err(RestoreError("trailing bytes after the HTTP/3 state"));
        }
        Ok(Box::new(ProxySession::new(
            Bridge::resume(captured),
            self.proxy.clone(),
        )))
    }
}

struct ProxySession {
    bridge: Arc<Bridge>,
    proxy: Arc<Proxy>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProxySession {
    fn new(bridge: Arc<Bridge>, proxy: Arc<Proxy>) -> Self {
        Self {
            bridge,
            proxy,
            task: None,
        }
    }
}

impl AppSession for ProxySession {
    fn drive(&mut self, conn: &mut Connection, frozen: bool) -> Drive {
        self.bridge.drive(conn, frozen);
        Drive::default()
    }

    fn capture(&self) -> Vec<u8> {
        let mut out = vec![STATE_VERSION];
        out.extend(self.proxy.fingerprint.to_be_bytes());
        self.bridge.capture().encode(&mut out);
        out
    }

    fn movable(&self) -> Result<(), &'static str> {
        self.bridge.movable()
    }

    fn attach(&mut self, wake: WakeCore) {
        self.bridge.set_wake(wake);
        let conn = self.bridge.connection();
        let task = serve(conn, self.proxy.clone(), self.bridge.clone());
        self.task = Some(self.proxy.runtime.spawn(task));
    }
}

impl Drop for ProxySession {
    /// The connection moved away, was discarded or is gone: its HTTP/3 side goes without
    /// touching it (h3 closes a connection it drops).
    fn drop(&mut self) {
        self.bridge.detach();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One connection's HTTP/3 server: accepts requests, each in a task of its own (aborted with
/// this one).
async fn serve(conn: BridgeConnection, proxy: Arc<Proxy>, bridge: Arc<Bridge>) {
    let mut builder = h3::server::builder();
    builder
        .max_field_section_size(proxy.config.max_header_bytes)
        .send_grease(false);
    let mut h3: H3Server = match builder.build(conn).await {
        Ok(c) => c,
        Err(e) => {
            debug!("HTTP/3 set-up failed: {e}");
            return;
        }
    };
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    requests.spawn(handle(resolver, proxy.clone(), bridge.remote()));
                }
                Ok(None) => break,
                Err(e) => {
                    if e.is_h3_no_error() {
                        debug!("HTTP/3 connection closed");
                    } else {
                        debug!("HTTP/3 connection ended: {e}");
                    }
                    break;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    while requests.join_next().await.is_some() {}
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(n);
    }
}

/// Appends `value` to a comma-separated header.
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(old) => format!("{old}, {value}"),
        None => value.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

fn forwarding_headers(
    headers: &mut HeaderMap,
    config: &ProxyConfig,
    client: Option<SocketAddr>,
    authority: &str,
) {
    let xff = matches!(config.forwarded, Forwarded::XForwarded | Forwarded::Both);
    let rfc = matches!(config.forwarded, Forwarded::Forwarded | Forwarded::Both);
    if xff {
        if let Some(c) = client {
            append(
                headers,
                HeaderName::from_static("x-forwarded-for"),
                &c.ip().to_string(),
            );
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        if let Ok(v) = HeaderValue::from_str(authority) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), v);
        }
    }
    if rfc {
        let node = match client.map(|c| c.ip()) {
            Some(std::net::IpAddr::V6(ip)) => format!("\"[{ip}]\""),
            Some(ip) => ip.to_string(),
            None => "unknown".into(),
        };
        append(
            headers,
            header::FORWARDED,
            &format!("for={node};proto=https;host=\"{authority}\""),
        );
    }
    append(headers, header::VIA, &format!("3 {}", config.via));
}

/// Answers with a status and a short text body (the proxy's own responses).
async fn respond(send: &mut SendHalf, status: StatusCode, text: &str) {
    let response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, text.len())
        .body(())
        .expect("valid response");
    if send.send_response(response).await.is_ok()
        && send
            .send_data(Bytes::copy_from_slice(text.as_bytes()))
            .await
            .is_ok()
    {
        let _ = send.finish().await;
    }
}

/// One request: routed, forwarded, its response streamed back.
async fn handle(resolver: H3Resolver, proxy: Arc<Proxy>, client: Option<SocketAddr>) {
    // A malformed request is refused by h3 itself, with the code RFC 9114 asks for.
    let (request, stream) = match resolver.resolve_request().await {
        Ok(r) => r,
        Err(e) => {
            debug!("request refused: {e}");
            return;
        }
    };
    let (mut send, recv) = stream.split();
    let config = &proxy.config;
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let path = request.uri().path().to_string();
    let Some(route) = config.route(
        Some(&authority)
            .filter(|a| !a.is_empty())
            .map(|a| a.as_str()),
        &path,
    ) else {
        debug!(%authority, %path, "no route");
        respond(
            &mut send,
            StatusCode::NOT_FOUND,
            "no route for this request\n",
        )
        .await;
        return;
    };
    let upstream = &proxy.upstreams[&route.upstream];
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_body_bytes) {
        respond(
            &mut send,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large\n",
        )
        .await;
        return;
    }
    let too_large = Arc::new(AtomicBool::new(false));
    let Some(body) = request_body(recv, declared, config.max_body_bytes, too_large.clone()).await
    else {
        // The client reset its request: nobody waits for an answer.
        return;
    };
    let server = upstream.pick().to_string();
    let (parts, ()) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let scheme = upstream.protocol.scheme();
    let uri = match format!("{scheme}://{server}{path_and_query}").parse::<http::Uri>() {
        Ok(u) => u,
        Err(_) => {
            respond(&mut send, StatusCode::BAD_REQUEST, "bad request target\n").await;
            return;
        }
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    forwarding_headers(&mut headers, config, client, &authority);
    if !upstream.protocol.is_http2() {
        if let Ok(v) = HeaderValue::from_str(&authority) {
            headers.insert(header::HOST, v);
        }
    } else {
        headers.remove(header::HOST);
    }
    let mut forwarded = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(if upstream.protocol.is_http2() {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        })
        .body(body)
        .expect("valid request");
    *forwarded.headers_mut() = headers;
    let sent = tokio::time::timeout(
        config.response_timeout(),
        upstream.client.request(forwarded),
    )
    .await;
    let response = match sent {
        Err(_) => {
            warn!(
                upstream = %upstream.name,
                %server,
                timeout_ms = config.response_timeout_ms,
                "upstream did not answer in time: 504"
            );
            respond(
                &mut send,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream timed out\n",
            )
            .await;
            return;
        }
        Ok(Err(_)) if too_large.load(Ordering::Relaxed) => {
            respond(
                &mut send,
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            let what = if e.is_connect() {
                "cannot connect"
            } else {
                "failed"
            };
            warn!(upstream = %upstream.name, %server, error = %error_chain(&e), "upstream {what}: 502");
            respond(&mut send, StatusCode::BAD_GATEWAY, "upstream unavailable\n").await;
            return;
        }
        Ok(Ok(r)) => r,
    };
    let (mut parts, mut body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let version = match parts.version {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    append(
        &mut parts.headers,
        header::VIA,
        &format!("{version} {}", config.via),
    );
    let mut head = Response::new(());
    *head.status_mut() = parts.status;
    *head.headers_mut() = parts.headers;
    if let Err(e) = send.send_response(head).await {
        debug!("client went away before the response: {e}");
        return;
    }
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() && send.send_data(data).await.is_err() {
                            // The client cancelled: dropping the body closes the upstream side.
                            return;
                        }
                        continue;
                    }
                    Err(frame) => frame,
                };
                if let Ok(trailers) = frame.into_trailers() {
                    // Trailers end the response (they carry the stream's FIN).
                    let _ = send.send_trailers(trailers).await;
                    return;
                }
            }
            Some(Err(e)) => {
                warn!(upstream = %upstream.name, %server, error = %e, "upstream response cut short: resetting the stream");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
        }
    }
    if let Err(e) = send.finish().await {
        debug!("finishing the response: {e}");
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The request body, read from the client as the upstream takes it: `None` if the client reset
/// the stream before its body began.
async fn request_body(
    mut recv: RecvHalf,
    declared: Option<u64>,
    max: u64,
    too_large: Arc<AtomicBool>,
) -> Option<RequestBody> {
    let first = match recv.recv_data().await {
        Ok(None) => return Some(RequestBody::Empty),
        Ok(Some(mut b)) => b.copy_to_bytes(b.remaining()),
        Err(e) => {
            debug!("request stream broke off: {e}");
            return None;
        }
    };
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut total = 0u64;
        let mut next = Some(first);
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => match recv.recv_data().await {
                    Ok(None) => return,
                    Ok(Some(mut b)) => b.copy_to_bytes(b.remaining()),
                    Err(e) => {
                        let _ = tx
                            .send(Err(BodyError(format!("client request body: {e}"))))
                            .await;
                        return;
                    }
                },
            };
            total += chunk.len() as u64;
            if total > max {
                too_large.store(true, Ordering::Relaxed);
                let _ = tx
                    .send(Err(BodyError("request body too large".into())))
                    .await;
                recv.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
                return;
            }
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    Some(RequestBody::Streaming { rx, len: declared })
}

impl ProxyService {
    /// Logs what the service forwards where (at start-up).
    pub fn log_routes(&self) {
        for r in &self.proxy.config.routes {
            let u = &self
                .proxy
                .config
                .upstreams
                .iter()
                .find(|u| u.name == r.upstream);
            info!(
                authority = r.authority.as_deref().unwrap_or("*"),
                path_prefix = %r.path_prefix,
                upstream = %r.upstream,
                servers = ?u.map(|u| &u.servers),
                "proxy route"
            );
        }
    }
}
