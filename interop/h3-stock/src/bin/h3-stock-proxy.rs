//! A plain HTTP/3 reverse proxy from stock crates (quinn + h3 + hyper): the baseline the Baton
//! worker's HTTP/3 proxy is measured against. See README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::{Buf, Bytes};
use clap::Parser;
use h3::error::Code;
use h3::server::RequestStream;
use http::{HeaderMap, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use quinn::crypto::rustls::QuicServerConfig;
use tracing_subscriber::EnvFilter;

use h3_stock::upstream::{BoxError, ForwardError, Upstream};

#[derive(Debug, Parser)]
#[command(name = "h3-stock-proxy", version)]
/// HTTP/3 reverse proxy (quinn + h3 + hyper, as published) in front of one HTTP upstream.
struct Args {
    /// UDP address to serve HTTP/3 on.
    #[arg(long, value_name = "IP:PORT")]
    listen: SocketAddr,
    /// PEM certificate chain.
    #[arg(long, value_name = "CERT.pem")]
    cert: PathBuf,
    /// PEM private key.
    #[arg(long, value_name = "KEY.pem")]
    key: PathBuf,
    /// Upstream HTTP server (cleartext TCP).
    #[arg(long, value_name = "HOST:PORT")]
    upstream: String,
    /// Speak HTTP/2 with prior knowledge to the upstream instead of HTTP/1.1.
    #[arg(long)]
    h2c: bool,
    /// Answer 504 when the upstream's response head takes longer than this.
    #[arg(long, default_value_t = 10_000)]
    response_timeout_ms: u64,
    /// QUIC idle timeout in ms.
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// ALPN protocol served.
    #[arg(long, default_value = "h3")]
    alpn: String,
}

type H3Conn = h3::server::Connection<h3_quinn::Connection, Bytes>;
type Resolver = h3::server::RequestResolver<h3_quinn::Connection, Bytes>;
type RecvHalf = RequestStream<h3_quinn::RecvStream, Bytes>;
type SendHalf = RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Runtime::new()?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let tls = h3_stock::tls::server_config(&args.cert, &args.key, args.alpn.as_bytes())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(tls).context("TLS configuration for QUIC")?,
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(args.idle_timeout_ms))
            .context("--idle-timeout-ms")?,
    ));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(config, args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    let upstream = Arc::new(Upstream::new(
        &args.upstream,
        args.h2c,
        Duration::from_millis(args.response_timeout_ms),
    )?);
    println!("listening {}", endpoint.local_addr()?);
    tracing::info!(listen = %args.listen, upstream = %args.upstream, h2c = args.h2c, "serving");

    while let Some(incoming) = endpoint.accept().await {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(e) = connection(incoming, upstream).await {
                tracing::info!(%remote, "connection ended: {e:#}");
            }
        });
    }
    Ok(())
}

async fn connection(incoming: quinn::Incoming, upstream: Arc<Upstream>) -> Result<()> {
    let quic = incoming.await.context("handshake")?;
    let mut h3: H3Conn = h3::server::Connection::new(h3_quinn::Connection::new(quic))
        .await
        .context("HTTP/3 setup")?;
    loop {
        match h3.accept().await {
            Ok(Some(resolver)) => {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Err(e) = request(resolver, &upstream).await {
                        tracing::debug!("request: {e:#}");
                    }
                });
            }
            Ok(None) => return Ok(()),
            Err(e) if e.is_h3_no_error() => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

async fn request(resolver: Resolver, upstream: &Upstream) -> Result<()> {
    let (req, stream) = resolver.resolve_request().await?;
    let (mut send, recv) = stream.split();
    let (parts, ()) = req.into_parts();
    let body = RequestBody::new(recv, &parts.headers).await?;
    tracing::debug!(method = %parts.method, uri = %parts.uri, "request");

    let response = match upstream.forward(parts, body.boxed_unsync()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("{e}");
            let status = match e {
                ForwardError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                ForwardError::Connect(_) | ForwardError::Other(_) => StatusCode::BAD_GATEWAY,
            };
            return respond_empty(&mut send, status).await;
        }
    };

    let (head, mut body) = response.into_parts();
    let mut out = Response::new(());
    *out.status_mut() = head.status;
    *out.headers_mut() = head.headers;
    send.send_response(out).await?;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // The response is cut short: the client must not take it as complete.
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return Err(anyhow::anyhow!("upstream response body: {e}"));
            }
        };
        match frame.into_data() {
            Ok(data) => send.send_data(data).await?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                    return Ok(());
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

async fn respond_empty(send: &mut SendHalf, status: StatusCode) -> Result<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, 0.into());
    send.send_response(response).await?;
    send.finish().await?;
    Ok(())
}

/// The client's request body, streamed from the h3 request stream as the upstream reads it.
struct RequestBody {
    /// Data read before forwarding (to learn whether there is a body at all).
    first: Option<Bytes>,
    recv: Option<RecvHalf>,
    /// From content-length.
    exact_len: Option<u64>,
}

impl RequestBody {
    /// With a content-length, streams exactly that. Without one, waits for the first data (or
    /// the end of the stream) so that a request without a body goes upstream without one
    /// rather than as a chunked empty body.
    async fn new(mut recv: RecvHalf, headers: &HeaderMap) -> Result<Self> {
        let exact_len = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if exact_len.is_some() {
            return Ok(Self {
                first: None,
                recv: Some(recv),
                exact_len,
            });
        }
        Ok(match recv.recv_data().await? {
            Some(mut data) => Self {
                first: Some(data.copy_to_bytes(data.remaining())),
                recv: Some(recv),
                exact_len: None,
            },
            None => Self {
                first: None,
                recv: None,
                exact_len: Some(0),
            },
        })
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        let Some(recv) = self.recv.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(recv.poll_recv_data(cx)) {
            Ok(Some(mut data)) => {
                Poll::Ready(Some(Ok(Frame::data(data.copy_to_bytes(data.remaining())))))
            }
            Ok(None) => {
                self.recv = None;
                Poll::Ready(None)
            }
            Err(e) => {
                self.recv = None;
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.exact_len == Some(0) || (self.first.is_none() && self.recv.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact_len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
