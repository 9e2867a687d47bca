//! Forwarding one request to the upstream HTTP server (HTTP/1.1 keep-alive, or HTTP/2 prior
//! knowledge over cleartext) with hyper-util's pooled client. Bodies stream both ways.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Request, Response, Version};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body handed to the upstream.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Why no upstream response came.
#[derive(Debug)]
pub enum ForwardError {
    /// Could not connect to the upstream (answer 502).
    Connect(BoxError),
    /// No response head within the timeout (answer 504).
    Timeout,
    /// The upstream failed otherwise (answer 502).
    Other(BoxError),
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Connect(e) => write!(f, "upstream connect: {e}"),
            ForwardError::Timeout => write!(f, "upstream response timeout"),
            ForwardError::Other(e) => write!(f, "upstream: {e}"),
        }
    }
}

/// The upstream server and the connection pool to it.
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    authority: Authority,
    h2c: bool,
    response_timeout: Duration,
}

impl Upstream {
    /// `addr` is HOST:PORT; `h2c` picks HTTP/2 prior knowledge instead of HTTP/1.1.
    pub fn new(addr: &str, h2c: bool, response_timeout: Duration) -> Result<Self> {
        let authority: Authority = addr.parse().context("--upstream must be HOST:PORT")?;
        authority.port_u16().context("--upstream needs a port")?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(h2c)
            .build(connector);
        Ok(Self {
            client,
            authority,
            h2c,
            response_timeout,
        })
    }

    /// Sends the request (`parts` as received from the client, `body` streamed) and returns the
    /// upstream's response once its head arrived. The response body streams from the returned
    /// `Incoming`.
    pub async fn forward(
        &self,
        parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Incoming>, ForwardError> {
        let request = self
            .upstream_request(parts, body)
            .map_err(|e| ForwardError::Other(e.into()))?;
        match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
            Err(_) => Err(ForwardError::Timeout),
            Ok(Ok(mut response)) => {
                strip_hop_by_hop(response.headers_mut());
                Ok(response)
            }
            Ok(Err(e)) if e.is_connect() => Err(ForwardError::Connect(e.into())),
            Ok(Err(e)) => Err(ForwardError::Other(e.into())),
        }
    }

    fn upstream_request(
        &self,
        parts: http::request::Parts,
        body: Body,
    ) -> Result<Request<Body>, http::Error> {
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()?;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // The client's authority becomes the Host the upstream sees.
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
        let mut request = Request::builder()
            .method(parts.method)
            .uri(uri)
            .version(if self.h2c {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            })
            .body(body)?;
        *request.headers_mut() = headers;
        Ok(request)
    }
}

/// Headers that belong to one hop (RFC 9110, 7.6.1), and those named by `connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }
}
