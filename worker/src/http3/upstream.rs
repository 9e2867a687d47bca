//! The proxy's side towards the upstream servers: one hyper client (with its keep-alive pool)
//! per upstream, round robin over its servers, and the streaming request body handed to it.
//! Its connector ([`UpstreamConnector`]) connects over TCP and, for a TLS pool (`https`, `h2`),
//! runs a rustls handshake on top.
use super::config::{ProxyConfig, UpstreamConfig, UpstreamProtocol, server_host, server_name};
use bytes::Bytes;
use http::Uri;
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
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
    pub client: Client<UpstreamConnector, RequestBody>,
}

impl Upstream {
    /// The pool's client; fails only if its TLS files (checked by `validate`) no longer load.
    pub fn new(config: &UpstreamConfig, proxy: &ProxyConfig) -> anyhow::Result<Self> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(proxy.connect_timeout()));
        tcp.set_nodelay(true);
        // The URIs of TLS pools are https://: the TLS is ours, on top of this connector.
        tcp.enforce_http(false);
        let tls = config
            .client_tls()
            .map_err(|e| anyhow::anyhow!("proxy upstream {}: {e}", config.name))?
            .map(|client| {
                let server_name = config
                    .tls
                    .as_ref()
                    .and_then(|t| t.server_name.as_deref())
                    .map(server_name)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("proxy upstream {}: {e}", config.name))?;
                anyhow::Ok(TlsSetup {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
                    server_name,
                    handshake_timeout: proxy.connect_timeout(),
                })
            })
            .transpose()?;
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(proxy.idle_timeout())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        if config.protocol.is_http2() {
            builder.http2_only(true);
        }
        Ok(Self {
            name: config.name.clone(),
            protocol: config.protocol,
            servers: config.servers.clone(),
            next: AtomicUsize::new(0),
            client: builder.build(UpstreamConnector { tcp, tls }),
        })
    }

    /// The server the next request goes to (round robin).
    pub fn pick(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        &self.servers[i]
    }
}

/// The upstream client's connector: TCP (hyper-util's, with the connect timeout), then for a TLS
/// pool a rustls handshake, bounded by the connect timeout too.
#[derive(Clone)]
pub struct UpstreamConnector {
    tcp: HttpConnector,
    tls: Option<TlsSetup>,
}

#[derive(Clone)]
struct TlsSetup {
    connector: tokio_rustls::TlsConnector,
    /// `tls.server_name`; unset: the host of the server the request goes to.
    server_name: Option<ServerName<'static>>,
    handshake_timeout: Duration,
}

/// Why a connection to an upstream server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP: hyper-util's error, shown as it was before TLS existed.
    #[error(transparent)]
    Tcp(Box<dyn std::error::Error + Send + Sync>),
    /// The handshake failed; `source` is rustls' reason (bad certificate, wrong name, alert...).
    #[error("TLS handshake with {server} as {name:?}")]
    Tls {
        server: String,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {server} as {name:?}: no answer within {timeout_ms} ms")]
    TlsTimeout {
        server: String,
        name: String,
        timeout_ms: u128,
    },
    #[error("TLS to {server}: {reason}")]
    Name { server: String, reason: String },
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.tcp, cx)
            .map_err(|e| ConnectError::Tcp(Box::new(e)))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri.clone());
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = connecting
                .await
                .map_err(|e| ConnectError::Tcp(Box::new(e)))?
                .into_inner();
            let Some(tls) = tls else {
                return Ok(TokioIo::new(UpstreamStream::Plain(tcp)));
            };
            let server = uri
                .authority()
                .map_or_else(|| uri.to_string(), |a| a.to_string());
            let name = match tls.server_name {
                Some(n) => n,
                None => server_name(server_host(&server)).map_err(|reason| ConnectError::Name {
                    server: server.clone(),
                    reason: format!("its host {reason}"),
                })?,
            };
            let shown = name.to_str().into_owned();
            let handshake = tls.connector.connect(name, tcp);
            match tokio::time::timeout(tls.handshake_timeout, handshake).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(UpstreamStream::Tls(Box::new(stream)))),
                Ok(Err(source)) => Err(ConnectError::Tls {
                    server,
                    name: shown,
                    source,
                }),
                Err(_) => Err(ConnectError::TlsTimeout {
                    server,
                    name: shown,
                    timeout_ms: tls.handshake_timeout.as_millis(),
                }),
            }
        })
    }
}

/// A connection to an upstream server: plain TCP, or TLS over TCP.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(tcp) => tcp.connected(),
            UpstreamStream::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
