//! One request of the mix, sent on its own request stream and checked byte by byte.

use std::sync::atomic::Ordering::Relaxed;

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use http::{Method, Request, StatusCode, header};

use super::stats::Stats;
use crate::pattern::{self, Verifier};

pub type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// Request bodies go out in chunks of this size.
const SEND_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SmallGet,
    LargeGet,
    Echo,
}

/// The round-robin order of the mix.
pub const MIX: [Kind; 3] = [Kind::SmallGet, Kind::LargeGet, Kind::Echo];

/// What to ask for: a GET of `len` pattern bytes, or a POST /echo of `len` pattern bytes.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub kind: Kind,
    pub len: u64,
    pub seed: u64,
}

impl Spec {
    pub fn method(&self) -> Method {
        match self.kind {
            Kind::SmallGet | Kind::LargeGet => Method::GET,
            Kind::Echo => Method::POST,
        }
    }

    pub fn path(&self) -> String {
        match self.kind {
            Kind::SmallGet | Kind::LargeGet => format!("/bytes/{}?seed={}", self.len, self.seed),
            Kind::Echo => "/echo".to_string(),
        }
    }

    /// How the request is named in messages.
    pub fn name(&self) -> String {
        match self.kind {
            Kind::Echo => format!("POST /echo ({} bytes, seed {})", self.len, self.seed),
            _ => format!("GET {}", self.path()),
        }
    }
}

/// Why a request did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// This request failed (status, body, stream reset, timeout); the connection may be fine.
    Request(String),
    /// The connection under it failed.
    Connection(String),
    /// Not sent: the server is closing the connection (GOAWAY).
    Refused,
}

fn stream_failure(what: &str, e: StreamError) -> Failure {
    match e {
        StreamError::RemoteClosing { .. } => Failure::Refused,
        StreamError::ConnectionError { 0: c, .. } => Failure::Connection(format!("{what}: {c}")),
        other => Failure::Request(format!("{what}: {other}")),
    }
}

/// Sends the request of `spec` and checks the response: status 200 and the exact body.
pub async fn run(
    sender: &mut Sender,
    authority: &str,
    spec: &Spec,
    stats: &Stats,
) -> Result<(), Failure> {
    let name = spec.name();
    let mut builder = Request::builder()
        .method(spec.method())
        .uri(format!("https://{authority}{}", spec.path()));
    let body = if spec.kind == Kind::Echo {
        builder = builder
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, spec.len);
        Bytes::from(pattern::body(spec.len as usize, spec.seed))
    } else {
        Bytes::new()
    };
    let request = builder
        .body(())
        .map_err(|e| Failure::Request(format!("{name}: bad request: {e}")))?;

    let stream = sender
        .send_request(request)
        .await
        .map_err(|e| stream_failure(&name, e))?;
    let (mut send, mut recv) = stream.split();

    let sending = async {
        let mut rest = body;
        while !rest.is_empty() {
            let chunk = rest.split_to(rest.len().min(SEND_CHUNK));
            send.send_data(chunk).await?;
        }
        send.finish().await
    };
    let sending = async {
        match sending.await {
            Ok(()) => Ok(()),
            // A server may answer in full, then stop the rest of the request (RFC 9114, 4.1).
            Err(StreamError::RemoteTerminate {
                code: Code::H3_NO_ERROR,
                ..
            }) => Ok(()),
            Err(e) => Err(stream_failure(&format!("{name}: sending"), e)),
        }
    };

    let receiving = async {
        let response = recv
            .recv_response()
            .await
            .map_err(|e| stream_failure(&format!("{name}: response"), e))?;
        if response.status() != StatusCode::OK {
            return Err(Failure::Request(format!(
                "{name}: status {}",
                response.status()
            )));
        }
        let mut verifier = Verifier::new(spec.len, spec.seed);
        while let Some(mut data) = recv
            .recv_data()
            .await
            .map_err(|e| stream_failure(&format!("{name}: body"), e))?
        {
            stats.bytes.fetch_add(data.remaining() as u64, Relaxed);
            while data.has_remaining() {
                let chunk = data.chunk();
                let n = chunk.len();
                verifier
                    .feed(chunk)
                    .map_err(|e| Failure::Request(format!("{name}: {e}")))?;
                data.advance(n);
            }
        }
        verifier
            .finish()
            .map_err(|e| Failure::Request(format!("{name}: {e}")))
    };

    tokio::try_join!(sending, receiving).map(|_| ())
}
