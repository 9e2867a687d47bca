//! The proxy's side towards the upstream servers: one hyper client (with its keep-alive pool)
//! per upstream, round robin over its servers, and the streaming request body handed to it.
use super::config::{ProxyConfig, UpstreamConfig, UpstreamProtocol};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A request body on its way to an upstream: nothing, or the chunks read from the client's
/// request stream as they arrive (a bounded channel: the client is read only as fast as the
/// upstream takes the body).
pub enum RequestBody {
    Empty,
    Streaming {
        rx: mpsc::Receiver<Result<Bytes, BodyError>>,
        /// The client's `content-length`, if it sent one.
        len: Option<u64>,
    },
}

/// The client's request body broke off (stream reset, or past `max_body_bytes`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Streaming { rx, .. } => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| c.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, RequestBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Streaming { len: Some(n), .. } => SizeHint::with_exact(*n),
            RequestBody::Streaming { len: None, .. } => SizeHint::default(),
        }
    }
}

/// One upstream pool.
pub struct Upstream {
    pub name: String,
    pub protocol: UpstreamProtocol,
    servers: Vec<String>,
    next: AtomicUsize,
    pub client: Client<HttpConnector, RequestBody>,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, proxy: &ProxyConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(proxy.connect_timeout()));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(proxy.idle_timeout())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        if config.protocol == UpstreamProtocol::H2c {
            builder.http2_only(true);
        }
        Self {
            name: config.name.clone(),
            protocol: config.protocol,
            servers: config.servers.clone(),
            next: AtomicUsize::new(0),
            client: builder.build(connector),
        }
    }

    /// The server the next request goes to (round robin).
    pub fn pick(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        &self.servers[i]
    }
}
