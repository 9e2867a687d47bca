//! The HTTP server: one accept loop per TCP listener, each connection served by hyper-util's auto
//! builder (HTTP/1.1 with keep-alive, or h2c when the client opens with the HTTP/2 preface; over
//! TLS with [`serve_tls`], the same two by ALPN), and the endpoints of the crate's documentation. Response bodies are streamed: the pattern is
//! generated frame by frame, and `/echo` sends each request frame back as it arrives.
use crate::{RangeRequest, fill_pattern, parse_range, query_param};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

/// Size of the frames the pattern bodies are generated in.
pub const FRAME: usize = 16 * 1024;
/// Largest body `/bytes` and `/drip` serve: the pattern is defined for indices below 2^32.
pub const MAX_BODY: u64 = 1 << 32;
/// Longest wait `/slow` and `/drip` accept (10 minutes), so a typo cannot hang a test forever.
pub const MAX_WAIT_MS: u64 = 600_000;
/// `/drip` defaults.
pub const DRIP_CHUNK: u64 = 1024;
pub const DRIP_INTERVAL_MS: u64 = 100;

/// What `/stats` reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests served, `/stats` itself excluded (so polling it does not disturb a count).
    pub requests: AtomicU64,
    /// TCP connections accepted since start.
    pub connections: AtomicU64,
}

/// Accepts connections on `listener` forever, serving each on its own task.
pub async fn serve(listener: TcpListener, stats: Arc<Stats>) -> std::io::Result<()> {
    accept_loop(listener, stats, None).await
}

/// [`serve`] over TLS: each connection's handshake first (`acceptor`'s configuration, e.g.
/// [`crate::tls::server_config`]), then HTTP/1.1 or HTTP/2, whichever the client speaks (ALPN
/// `http/1.1` or `h2`).
pub async fn serve_tls(
    listener: TcpListener,
    stats: Arc<Stats>,
    acceptor: TlsAcceptor,
) -> std::io::Result<()> {
    accept_loop(listener, stats, Some(acceptor)).await
}

/// Longest a TLS client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_loop(
    listener: TcpListener,
    stats: Arc<Stats>,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "connection");
        let builder = builder.clone();
        let stats = stats.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(builder, TokioIo::new(stream), peer, stats).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(builder, TokioIo::new(stream), peer, stats).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<I>(
    builder: auto::Builder<TokioExecutor>,
    io: I,
    peer: SocketAddr,
    stats: Arc<Stats>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let stats = stats.clone();
        async move { Ok::<_, Infallible>(handle(req, &stats).await) }
    });
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(%peer, "connection ended: {e}");
    } else {
        tracing::debug!(%peer, "connection closed");
    }
}

/// The body of every response.
pub enum UpBody {
    Empty,
    Full(Full<Bytes>),
    Pattern(PatternBody),
    Drip(DripBody),
    Echo(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|never| match never {}))),
            UpBody::Pattern(p) => Poll::Ready(p.next_frame().map(|b| Ok(Frame::data(b)))),
            UpBody::Drip(d) => d.poll_frame(cx).map(|f| f.map(|b| Ok(Frame::data(b)))),
            UpBody::Echo(incoming) => Pin::new(incoming).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Full(full) => full.is_end_stream(),
            UpBody::Pattern(p) => p.offset >= p.end,
            UpBody::Drip(d) => d.pattern.offset >= d.pattern.end,
            UpBody::Echo(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Full(full) => full.size_hint(),
            UpBody::Pattern(p) => SizeHint::with_exact(p.end - p.offset),
            UpBody::Drip(d) => SizeHint::with_exact(d.pattern.end - d.pattern.offset),
            UpBody::Echo(incoming) => incoming.size_hint(),
        }
    }
}

/// Bytes `offset .. end` of the pattern with `seed`, generated `frame` bytes at a time.
pub struct PatternBody {
    seed: u64,
    offset: u64,
    end: u64,
    frame: usize,
}

impl PatternBody {
    pub fn new(seed: u64, offset: u64, end: u64, frame: usize) -> Self {
        PatternBody {
            seed,
            offset,
            end,
            frame: frame.max(1),
        }
    }

    fn next_frame(&mut self) -> Option<Bytes> {
        if self.offset >= self.end {
            return None;
        }
        let n = (self.end - self.offset).min(self.frame as u64) as usize;
        let mut buf = vec![0; n];
        fill_pattern(self.seed, self.offset, &mut buf);
        self.offset += n as u64;
        Some(Bytes::from(buf))
    }
}

/// The pattern sent one chunk per interval: the first chunk at once, each next one `interval`
/// after the previous one.
pub struct DripBody {
    pattern: PatternBody,
    interval: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl DripBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.pattern.offset >= self.pattern.end {
            return Poll::Ready(None);
        }
        if let Some(sleep) = self.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
        }
        let next = tokio::time::Instant::now() + self.interval;
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(next),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(next))),
        }
        Poll::Ready(self.pattern.next_frame())
    }
}

fn response(status: StatusCode, body: UpBody) -> Response<UpBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<UpBody> {
    let body: Bytes = body.into();
    let mut resp = response(status, UpBody::Full(Full::new(body.clone())));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}

fn not_found() -> Response<UpBody> {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// A request this server cannot serve as asked: a 400 with this message.
pub struct BadRequest(String);

fn bad_request(BadRequest(msg): BadRequest) -> Response<UpBody> {
    text(StatusCode::BAD_REQUEST, msg + "\n")
}

/// A number from the path or the query, or the 400 that names what is wrong.
fn number(what: &str, s: Option<&str>, default: Option<u64>) -> Result<u64, BadRequest> {
    match (s, default) {
        (None, Some(d)) => Ok(d),
        (Some(s), _) => s
            .parse()
            .map_err(|_| BadRequest(format!("{what}: not a number: {s:?}"))),
        (None, None) => Err(BadRequest(format!("{what} is missing"))),
    }
}

/// Serves one request.
pub async fn handle(req: Request<Incoming>, stats: &Stats) -> Response<UpBody> {
    let path = req.uri().path().to_owned();
    let is_stats = path == "/stats";
    if !is_stats {
        stats.requests.fetch_add(1, Ordering::Relaxed);
    }
    let resp = route(req, &path, stats).await.unwrap_or_else(bad_request);
    tracing::debug!(path, status = resp.status().as_u16(), "request");
    resp
}

async fn route(
    req: Request<Incoming>,
    path: &str,
    stats: &Stats,
) -> Result<Response<UpBody>, BadRequest> {
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let first = segments.next().unwrap_or("");
    let arg = segments.next();
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    let query = req.uri().query();
    Ok(match (first, arg) {
        ("echo", None) => echo(req),
        _ if !read => not_found(),
        ("bytes", Some(n)) => {
            let n = number("n", Some(n), None)?;
            let seed = number("seed", query_param(query, "seed"), Some(0))?;
            bytes(&req, n, seed)?
        }
        ("slow", Some(ms)) => {
            let ms = number("ms", Some(ms), None)?.min(MAX_WAIT_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, "ok")
        }
        ("drip", Some(n)) => {
            let n = number("n", Some(n), None)?;
            let seed = number("seed", query_param(query, "seed"), Some(0))?;
            let chunk = number("chunk", query_param(query, "chunk"), Some(DRIP_CHUNK))?;
            let interval = number(
                "interval_ms",
                query_param(query, "interval_ms"),
                Some(DRIP_INTERVAL_MS),
            )?;
            drip(n, seed, chunk, interval)?
        }
        ("headers", None) => {
            let mut out = String::new();
            // HTTP/2 carries the host in the :authority pseudo-header, not in the header map.
            if req.version() == hyper::Version::HTTP_2 {
                if let Some(authority) = req.uri().authority() {
                    out.push_str(":authority: ");
                    out.push_str(authority.as_str());
                    out.push('\n');
                }
            }
            for (name, value) in req.headers() {
                // HeaderName is lower-case already.
                out.push_str(name.as_str());
                out.push_str(": ");
                out.push_str(&String::from_utf8_lossy(value.as_bytes()));
                out.push('\n');
            }
            text(StatusCode::OK, out)
        }
        ("status", Some(code)) => {
            let code = number("code", Some(code), None)?;
            match u16::try_from(code)
                .ok()
                .filter(|c| (200..=599).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(status) => {
                    let mut resp = response(status, UpBody::Empty);
                    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
                        resp.headers_mut()
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                    }
                    resp
                }
                None => return Err(BadRequest(format!("status {code}: not 200..=599"))),
            }
        }
        ("stats", None) => {
            let body = format!(
                "{{\"requests\": {}, \"connections\": {}}}\n",
                stats.requests.load(Ordering::Relaxed),
                stats.connections.load(Ordering::Relaxed)
            );
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => not_found(),
    })
}

/// `/echo`: the request body back, frame by frame as it arrives, with its content-type and (when
/// the request had one) its content-length.
fn echo(req: Request<Incoming>) -> Response<UpBody> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let content_length = req.headers().get(header::CONTENT_LENGTH).cloned();
    let mut resp = response(StatusCode::OK, UpBody::Echo(req.into_body()));
    let h = resp.headers_mut();
    if let Some(ct) = content_type {
        h.insert(header::CONTENT_TYPE, ct);
    }
    if let Some(cl) = content_length {
        h.insert(header::CONTENT_LENGTH, cl);
    }
    resp
}

/// `/bytes/{n}?seed={s}`, with `range` and `if-range`.
fn bytes(req: &Request<Incoming>, n: u64, seed: u64) -> Result<Response<UpBody>, BadRequest> {
    if n > MAX_BODY {
        return Err(BadRequest(format!("n {n}: larger than {MAX_BODY}")));
    }
    let etag = format!("\"{n}-{seed}\"");
    let etag_value = HeaderValue::from_str(&etag).expect("digits and quotes");
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    // if-range: the range applies only if the representation is still the one named (strong
    // comparison; a date never matches, as this server sends no last-modified).
    let if_range_ok = req
        .headers()
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == etag.as_bytes());
    let wanted = match range {
        Some(r) if if_range_ok => parse_range(r, n),
        _ => RangeRequest::Full,
    };
    let mut resp = match wanted {
        RangeRequest::Full => {
            let mut resp = response(
                StatusCode::OK,
                UpBody::Pattern(PatternBody::new(seed, 0, n, FRAME)),
            );
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            resp
        }
        RangeRequest::Partial { start, end } => {
            let mut resp = response(
                StatusCode::PARTIAL_CONTENT,
                UpBody::Pattern(PatternBody::new(seed, start, end + 1, FRAME)),
            );
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end + 1 - start));
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{n}")).expect("digits"),
            );
            resp
        }
        RangeRequest::Unsatisfiable => {
            let mut resp = response(StatusCode::RANGE_NOT_SATISFIABLE, UpBody::Empty);
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{n}")).expect("digits"),
            );
            resp
        }
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag_value);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}

/// `/drip/{n}?seed&chunk&interval_ms`.
fn drip(n: u64, seed: u64, chunk: u64, interval_ms: u64) -> Result<Response<UpBody>, BadRequest> {
    if n > MAX_BODY {
        return Err(BadRequest(format!("n {n}: larger than {MAX_BODY}")));
    }
    if chunk == 0 || chunk > FRAME as u64 * 64 {
        return Err(BadRequest(format!(
            "chunk {chunk}: not 1..={}",
            FRAME as u64 * 64
        )));
    }
    let body = DripBody {
        pattern: PatternBody::new(seed, 0, n, chunk as usize),
        interval: Duration::from_millis(interval_ms.min(MAX_WAIT_MS)),
        sleep: None,
    };
    let mut resp = response(StatusCode::OK, UpBody::Drip(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}
