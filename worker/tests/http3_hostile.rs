//! The proxy service against hostile or broken peers, in one process (the two-worker lab of
//! `common::lab`): clients that break HTTP/3's rules (crafted bytes on a raw QUIC connection
//! with ALPN h3), and upstreams that die mid-response, refuse connections or never answer. Each
//! misbehaviour gets the answer RFC 9114 (or the proxy's documented limits) asks for, on that
//! stream or that connection only: a well-behaved client on the same lab keeps working before
//! and after, byte-exact, and the workers go on.
mod common;

use baton_test_upstream::pattern;
use bytes::{Buf, Bytes};
use common::h3::{Client, client, connect, echo, get, proxy_toml, proxy_with, upstream};
use common::lab::Lab;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous bound on anything that should happen "soon" (a loaded 2-core machine).
const SOON: Duration = Duration::from_secs(30);

// HTTP/3 and QPACK error codes (RFC 9114 section 8.1, RFC 9204 section 6).
const H3_INTERNAL_ERROR: u64 = 0x102;
const H3_STREAM_CREATION_ERROR: u64 = 0x103;
const H3_FRAME_UNEXPECTED: u64 = 0x105;
const QPACK_DECOMPRESSION_FAILED: u64 = 0x200;

// ---------------------------------------------------------------------------------------------
// A raw HTTP/3 client: just enough framing and QPACK to send crafted bytes and read answers.

fn varint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=0x3f => out.push(v as u8),
        0x40..=0x3fff => out.extend((v as u16 | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend((v as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend((v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for &b in &buf[1..len] {
        v = (v << 8) | u64::from(b);
    }
    *buf = &buf[len..];
    Some(v)
}

/// An HTTP/3 frame: type, length, payload.
fn frame(ty: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(ty, &mut out);
    varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

const DATA: u64 = 0x0;
const HEADERS: u64 = 0x1;
const SETTINGS: u64 = 0x4;

/// A QPACK / HPACK prefixed integer (RFC 7541 section 5.1): `flags` in the bits above the
/// `bits`-bit prefix of the first byte.
fn prefix_int(bits: u8, flags: u8, v: u64, out: &mut Vec<u8>) {
    let max = (1u64 << bits) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = v - max;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

fn read_prefix_int(bits: u8, buf: &mut &[u8]) -> Option<u64> {
    let max = (1u64 << bits) - 1;
    let (&first, rest) = buf.split_first()?;
    *buf = rest;
    let mut v = u64::from(first) & max;
    if v < max {
        return Some(v);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v += u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
}

/// A QPACK field section of literal field lines with literal names, no Huffman, no dynamic
/// table (RFC 9204 section 4.5.6): what any decoder must take.
fn field_section(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0, 0]; // Required Insert Count 0, Base 0
    for (name, value) in fields {
        prefix_int(3, 0b0010_0000, name.len() as u64, &mut out);
        out.extend_from_slice(name.as_bytes());
        prefix_int(7, 0, value.len() as u64, &mut out);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A GET request's HEADERS frame for `path`, with `extra` headers.
fn get_headers(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
    ];
    fields.extend_from_slice(extra);
    frame(HEADERS, &field_section(&fields))
}

/// The digits of a Huffman-coded string of digits (RFC 7541 appendix B: '0'-'2' are the 5-bit
/// codes 0-2, '3'-'9' the 6-bit codes 0x19-0x1f); `n` of them.
fn huffman_digits(bytes: &[u8], n: usize) -> Option<String> {
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
    let take = |pos: &mut usize, k: usize| -> Option<u32> {
        if *pos + k > bytes.len() * 8 {
            return None;
        }
        let v = (0..k).fold(0u32, |v, j| (v << 1) | u32::from(bit(*pos + j)));
        *pos += k;
        Some(v)
    };
    let mut pos = 0;
    let mut out = String::new();
    while out.len() < n {
        let five = take(&mut pos, 5)?;
        let digit = match five {
            0..=2 => five,
            0b01100..=0b01111 => match (five << 1) | take(&mut pos, 1)? {
                six @ 0x19..=0x1f => six - 0x16,
                _ => return None,
            },
            _ => return None,
        };
        out.push(char::from_digit(digit, 10)?);
    }
    Some(out)
}

/// The `:status` of a response's field section as h3's encoder writes it (no dynamic table;
/// `:status` first, as an indexed static entry or a static name reference with a literal).
fn status_of(mut block: &[u8]) -> Option<u16> {
    let buf = &mut block;
    read_prefix_int(8, buf)?; // Required Insert Count
    read_prefix_int(7, buf)?; // Base
    let first = *buf.first()?;
    // RFC 9204 appendix A: the static table's `:status` entries.
    let by_index = |i: u64| -> Option<u16> {
        Some(match i {
            24 => 103,
            25 => 200,
            26 => 304,
            27 => 404,
            28 => 503,
            63 => 100,
            64 => 204,
            65 => 206,
            66 => 302,
            67 => 400,
            68 => 403,
            69 => 421,
            70 => 425,
            71 => 500,
            _ => return None,
        })
    };
    if first & 0xc0 == 0xc0 {
        // Indexed field line, static table.
        return by_index(read_prefix_int(6, buf)?);
    }
    if first & 0xf0 == 0x50 {
        // Literal field line with a static name reference.
        let index = read_prefix_int(4, buf)?;
        by_index(index)?; // the name is `:status`
        let huffman = buf.first()? & 0x80 != 0;
        let len = read_prefix_int(7, buf)? as usize;
        let value = buf.get(..len)?;
        let text = if huffman {
            huffman_digits(value, 3)?
        } else {
            String::from_utf8(value.to_vec()).ok()?
        };
        return text.parse().ok();
    }
    None
}

/// What came back on a raw request stream: the status of the first HEADERS frame, the DATA,
/// and how the stream ended (`None`: a clean finish; `Some(code)`: reset).
#[derive(Debug)]
struct RawResponse {
    status: Option<u16>,
    body: Vec<u8>,
    reset: Option<u64>,
}

async fn read_response(recv: &mut quinn::RecvStream) -> RawResponse {
    let mut bytes = Vec::new();
    let reset = loop {
        match tokio::time::timeout(SOON, recv.read_chunk(64 * 1024, true))
            .await
            .expect("the response stream goes on or ends")
        {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk.bytes),
            Ok(None) => break None,
            Err(quinn::ReadError::Reset(code)) => break Some(code.into_inner()),
            Err(e) => panic!("reading the response: {e}"),
        }
    };
    let mut status = None;
    let mut body = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let (Some(ty), Some(len)) = (read_varint(&mut rest), read_varint(&mut rest)) else {
            panic!("truncated frame header in {bytes:?}");
        };
        let payload = rest.get(..len as usize).expect("truncated frame");
        rest = &rest[len as usize..];
        match ty {
            HEADERS if status.is_none() => {
                status = Some(status_of(payload).expect("a :status we can read"))
            }
            DATA => body.extend_from_slice(payload),
            _ => {}
        }
    }
    RawResponse {
        status,
        body,
        reset,
    }
}

/// A QUIC connection with ALPN h3 on which the test writes HTTP/3 itself. Its control stream
/// (with an empty SETTINGS frame) is open and held: a closed control stream is an error.
struct Raw {
    conn: quinn::Connection,
    control: quinn::SendStream,
}

impl Raw {
    async fn open(lab: &Lab) -> Raw {
        let conn = connect(lab).await;
        let mut control = conn.open_uni().await.unwrap();
        let mut bytes = vec![0x00]; // stream type: control
        bytes.extend(frame(SETTINGS, &[]));
        control.write_all(&bytes).await.unwrap();
        Raw { conn, control }
    }

    /// A request stream with `bytes` written on it (and finished if `fin`).
    async fn send(&self, bytes: &[u8], fin: bool) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        if fin {
            send.finish().unwrap();
        }
        (send, recv)
    }

    /// GET `path` (with `extra` headers) and the answer.
    async fn get(&self, path: &str, extra: &[(&str, &str)]) -> RawResponse {
        let (_send, mut recv) = self.send(&get_headers(path, extra), true).await;
        read_response(&mut recv).await
    }

    /// The application error code the server closed the connection with.
    async fn closed_with(&self) -> u64 {
        match tokio::time::timeout(SOON, self.conn.closed())
            .await
            .expect("the server closes the connection")
        {
            quinn::ConnectionError::ApplicationClosed(close) => {
                eprintln!(
                    "closed by the server: {:#x} {:?}",
                    close.error_code.into_inner(),
                    String::from_utf8_lossy(&close.reason)
                );
                close.error_code.into_inner()
            }
            other => panic!("expected an HTTP/3 connection close, got {other}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The well-behaved side.

/// The well-behaved client's check: a GET answered in full, byte-exact, on a connection that is
/// still up; and both workers still answer their control handles.
async fn still_fine(lab: &Lab, c: &mut Client, seed: u64) {
    let (status, body) = get(&mut c.send, &format!("/bytes/30000?seed={seed}")).await;
    assert_eq!(status, 200, "seed {seed}");
    assert!(
        body == pattern(seed, 0, 30_000),
        "seed {seed}: body differs"
    );
    assert!(
        c.conn.close_reason().is_none(),
        "the good client's connection is up"
    );
    assert!(!c.driver.is_finished(), "the good client's h3 driver runs");
    for w in &lab.workers {
        w.connections().await.expect("the worker answers");
    }
}

/// A lab in front of the real upstream, a well-behaved client checked once already.
async fn lab_and_good_client(extra: &str) -> (Lab, Client) {
    let lab = Lab::start(proxy_with(upstream().await, "http1", extra)).await;
    let mut good = client(&lab).await;
    still_fine(&lab, &mut good, 1).await;
    (lab, good)
}

/// A raw connection that breaks the rules with `misbehave` must be closed with `code`, the good
/// client unaffected.
async fn closed_for(lab: &Lab, good: &mut Client, what: &str, code: u64, misbehave: &[u8]) {
    let raw = Raw::open(lab).await;
    // The raw connection works first: its misbehaviour is what closes it.
    let ok = raw.get("/bytes/100?seed=3", &[]).await;
    assert_eq!(ok.status, Some(200), "{what}: {ok:?}");
    assert_eq!(ok.body, pattern(3, 0, 100), "{what}");
    let (_send, _recv) = raw.send(misbehave, false).await;
    assert_eq!(raw.closed_with().await, code, "{what}");
    still_fine(lab, good, 2).await;
}

// ---------------------------------------------------------------------------------------------
// 1. Bad input on HTTP/3.

#[test]
fn huffman_digits_decode_rfc7541_examples() {
    // RFC 7541 C.6.1: ":status: 302" is 0x48 0x82 0x64 0x02; 0x6402 is "302".
    assert_eq!(huffman_digits(&[0x64, 0x02], 3).as_deref(), Some("302"));
    // C.6.2: "307" is 0x640e 0xff (padding).
    assert_eq!(
        huffman_digits(&[0x64, 0x0e, 0xff], 3).as_deref(),
        Some("307")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_before_headers_is_h3_frame_unexpected_for_that_connection_only() {
    let (lab, mut good) = lab_and_good_client("").await;
    // RFC 9114 section 4.1: a request stream starts with HEADERS; "receipt of an invalid
    // sequence of frames MUST be treated as a connection error of type H3_FRAME_UNEXPECTED".
    closed_for(
        &lab,
        &mut good,
        "DATA first",
        H3_FRAME_UNEXPECTED,
        &frame(DATA, b"hello"),
    )
    .await;
    still_fine(&lab, &mut good, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_do_not_decode_are_qpack_decompression_failed() {
    let (lab, mut good) = lab_and_good_client("").await;
    // RFC 9204 section 2.2: a decoder that cannot interpret a field section treats it as a
    // connection error of type QPACK_DECOMPRESSION_FAILED.
    let cases: [(&str, &[u8]); 3] = [
        // An indexed field line whose index integer is cut off.
        ("a truncated field line", &[0x00, 0x00, 0xff]),
        // A static table index past its 99 entries.
        (
            "a static index past the table",
            &[0x00, 0x00, 0xff, 0x89, 0x01],
        ),
        // A dynamic table reference, though this server allows no dynamic table.
        ("a dynamic table reference", &[0x02, 0x00, 0x80]),
    ];
    for (what, block) in cases {
        closed_for(
            &lab,
            &mut good,
            what,
            QPACK_DECOMPRESSION_FAILED,
            &frame(HEADERS, block),
        )
        .await;
    }
    still_fine(&lab, &mut good, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_headers_get_431_and_the_connection_goes_on() {
    let (lab, mut good) = lab_and_good_client("max_header_bytes = 4096").await;
    let raw = Raw::open(&lab).await;
    let big = "b".repeat(8000);
    for round in 0..3u64 {
        // RFC 9114 section 4.2.2 (SETTINGS_MAX_FIELD_SECTION_SIZE) and RFC 6585: 431.
        let refused = raw.get("/bytes/10", &[("x-big", &big)]).await;
        assert_eq!(refused.status, Some(431), "round {round}: {refused:?}");
        assert_eq!(refused.reset, None, "round {round}: the 431 ends cleanly");
        // The same connection goes on.
        let seed = 10 + round;
        let ok = raw.get(&format!("/bytes/5000?seed={seed}"), &[]).await;
        assert_eq!(ok.status, Some(200), "round {round}: {ok:?}");
        assert_eq!(ok.reset, None);
        assert!(
            ok.body == pattern(seed, 0, 5000),
            "round {round}: body differs"
        );
    }
    // Just under the limit is fine.
    let fits = "f".repeat(3000);
    let ok = raw.get("/bytes/10?seed=4", &[("x-fits", &fits)]).await;
    assert_eq!(ok.status, Some(200), "{ok:?}");
    assert!(raw.conn.close_reason().is_none(), "the connection goes on");
    still_fine(&lab, &mut good, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_control_stream_or_settings_on_a_request_stream_close_the_connection() {
    let (lab, mut good) = lab_and_good_client("").await;

    // RFC 9114 section 6.2.1: "receipt of a second stream claiming to be a control stream MUST
    // be treated as a connection error of type H3_STREAM_CREATION_ERROR".
    let raw = Raw::open(&lab).await;
    let ok = raw.get("/bytes/100?seed=3", &[]).await;
    assert_eq!(ok.status, Some(200), "{ok:?}");
    let mut second = raw.conn.open_uni().await.unwrap();
    let mut bytes = vec![0x00];
    bytes.extend(frame(SETTINGS, &[]));
    second.write_all(&bytes).await.unwrap();
    assert_eq!(raw.closed_with().await, H3_STREAM_CREATION_ERROR);
    still_fine(&lab, &mut good, 2).await;

    // Section 7.2.4: "If an endpoint receives a second SETTINGS frame on the control stream, the
    // endpoint MUST respond with a connection error of type H3_FRAME_UNEXPECTED."
    let mut raw = Raw::open(&lab).await;
    let ok = raw.get("/bytes/100?seed=3", &[]).await;
    assert_eq!(ok.status, Some(200), "{ok:?}");
    raw.control.write_all(&frame(SETTINGS, &[])).await.unwrap();
    assert_eq!(raw.closed_with().await, H3_FRAME_UNEXPECTED);
    still_fine(&lab, &mut good, 3).await;

    // Section 7.2.4: "If an endpoint receives a SETTINGS frame on a different stream, the
    // endpoint MUST respond with a connection error of type H3_FRAME_UNEXPECTED." As a request
    // stream's first frame...
    closed_for(
        &lab,
        &mut good,
        "SETTINGS first on a request stream",
        H3_FRAME_UNEXPECTED,
        &frame(SETTINGS, &[]),
    )
    .await;
    // ...and after a request's HEADERS, where its body goes.
    let mut post = frame(
        HEADERS,
        &field_section(&[
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "localhost"),
            (":path", "/echo"),
        ]),
    );
    post.extend(frame(DATA, b"some body"));
    post.extend(frame(SETTINGS, &[]));
    closed_for(
        &lab,
        &mut good,
        "SETTINGS in a request body",
        H3_FRAME_UNEXPECTED,
        &post,
    )
    .await;
    still_fine(&lab, &mut good, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_request_streams_than_the_limit_wait_at_the_client_then_all_complete() {
    let (lab, mut good) = lab_and_good_client("").await;
    let limit = baton_worker::limits::Limits::default().max_concurrent_streams as usize;
    let raw = Raw::open(&lab).await;
    // The limit's worth of request streams opens at once...
    let mut streams = Vec::new();
    for _ in 0..limit {
        let opened = tokio::time::timeout(SOON, raw.conn.open_bi()).await;
        streams.push(opened.expect("within the limit").unwrap());
    }
    // ...and one more cannot open: QUIC's stream limit holds the client back (nothing was sent
    // on the open ones yet, so no stream can have ended and none can be granted).
    let conn = raw.conn.clone();
    let mut extra = tokio::spawn(async move { conn.open_bi().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!extra.is_finished(), "a stream beyond the limit opened");
    // Requests on all of them at once (each waits upstream a little, so they overlap there).
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (mut send, mut recv)) in streams.into_iter().enumerate() {
        tasks.spawn(async move {
            let path = if i % 2 == 0 {
                "/slow/300".to_string()
            } else {
                format!("/bytes/2000?seed={i}")
            };
            send.write_all(&get_headers(&path, &[])).await.unwrap();
            send.finish().unwrap();
            (i, read_response(&mut recv).await)
        });
    }
    // The well-behaved client meanwhile: its connection has limits of its own.
    still_fine(&lab, &mut good, 2).await;
    // When they end, the server grants more streams: the one that waited opens.
    let (mut send, mut recv) = tokio::time::timeout(SOON, &mut extra)
        .await
        .expect("the stream opens once requests end")
        .unwrap();
    send.write_all(&get_headers("/bytes/777?seed=7", &[]))
        .await
        .unwrap();
    send.finish().unwrap();
    let answered = read_response(&mut recv).await;
    assert_eq!(answered.status, Some(200), "{answered:?}");
    assert_eq!(answered.body, pattern(7, 0, 777));
    while let Some(done) = tasks.join_next().await {
        let (i, r) = done.unwrap();
        assert_eq!(r.status, Some(200), "stream {i}: {r:?}");
        assert_eq!(r.reset, None, "stream {i}");
        if i % 2 == 0 {
            assert_eq!(r.body, b"ok", "stream {i}");
        } else {
            assert!(
                r.body == pattern(i as u64, 0, 2000),
                "stream {i}: body differs"
            );
        }
    }
    // And as many again, a full window at once.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..limit as u64 {
        let (mut send, mut recv) = tokio::time::timeout(SOON, raw.conn.open_bi())
            .await
            .expect("streams are granted again")
            .unwrap();
        tasks.spawn(async move {
            send.write_all(&get_headers(&format!("/bytes/1000?seed={i}"), &[]))
                .await
                .unwrap();
            send.finish().unwrap();
            (i, read_response(&mut recv).await)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, r) = done.unwrap();
        assert_eq!(r.status, Some(200), "second round, stream {i}: {r:?}");
        assert!(r.body == pattern(i, 0, 1000), "second round, stream {i}");
    }
    assert!(
        raw.conn.close_reason().is_none(),
        "the busy client is fine too"
    );
    still_fine(&lab, &mut good, 3).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Upstream faults.

/// A TCP "upstream" that answers every request with a response head promising
/// `content-length: 1000000`, sends `sent` bytes of body and closes the socket.
async fn dying_upstream(sent: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n".to_vec();
                out.extend(vec![b'x'; sent]);
                let _ = sock.write_all(&out).await;
                let _ = sock.flush().await;
                // Dropped: the socket closes with the body cut short.
            });
        }
    });
    addr
}

/// A TCP "upstream" that reads whatever it is sent and never answers.
async fn sink_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy with the real upstream at `/` and `special` at `prefix`.
fn two_routes(real: SocketAddr, prefix: &str, special: SocketAddr, extra: &str) -> String {
    format!(
        r#"
        {extra}
        [[upstreams]]
        name = "app"
        servers = ["{real}"]
        [[upstreams]]
        name = "special"
        servers = ["{special}"]
        [[routes]]
        upstream = "app"
        [[routes]]
        path_prefix = "{prefix}"
        upstream = "special"
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_response_resets_the_stream_and_the_connection_goes_on() {
    let config = two_routes(upstream().await, "/cut", dying_upstream(20_000).await, "");
    let lab = Lab::start(proxy_toml(&config)).await;
    let mut good = client(&lab).await;
    still_fine(&lab, &mut good, 1).await;
    let mut c = client(&lab).await;
    for round in 0..3u64 {
        let req = http::Request::get("https://localhost/cut/big")
            .body(())
            .unwrap();
        let mut stream = c.send.send_request(req).await.unwrap();
        stream.finish().await.unwrap();
        // The head may or may not get through before the reset; a clean end never comes.
        let mut got = 0usize;
        let error = match stream.recv_response().await {
            Err(e) => e,
            Ok(resp) => {
                assert_eq!(resp.status(), 200);
                assert_eq!(
                    resp.headers()["content-length"],
                    "1000000",
                    "the promised length is passed on"
                );
                loop {
                    match stream.recv_data().await {
                        Ok(Some(mut chunk)) => got += chunk.copy_to_bytes(chunk.remaining()).len(),
                        Ok(None) => panic!(
                            "round {round}: a clean finish after {got} of 1000000 bytes: a cut \
                             response must not look complete"
                        ),
                        Err(e) => break e,
                    }
                }
            }
        };
        assert!(got <= 20_000, "round {round}: {got} bytes");
        match &error {
            h3::error::StreamError::RemoteTerminate { code, .. } => {
                assert_eq!(code.value(), H3_INTERNAL_ERROR, "round {round}: {error}")
            }
            other => panic!("round {round}: expected the stream reset, got {other}"),
        }
        eprintln!("round {round}: reset ({error}) after {got} body bytes");
        // The same connection goes on.
        let seed = 20 + round;
        let (status, body) = get(&mut c.send, &format!("/bytes/50000?seed={seed}")).await;
        assert_eq!(status, 200);
        assert!(
            body == pattern(seed, 0, 50_000),
            "round {round}: body differs"
        );
        assert!(c.conn.close_reason().is_none());
    }
    still_fine(&lab, &mut good, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_connections_is_502_and_other_routes_go_on() {
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let config = two_routes(upstream().await, "/down", dead_addr, "");
    let lab = Lab::start(proxy_toml(&config)).await;
    let mut good = client(&lab).await;
    still_fine(&lab, &mut good, 1).await;
    let mut c = client(&lab).await;
    for round in 0..3u64 {
        let (status, body) = get(&mut c.send, "/down/x").await;
        assert_eq!(status, 502, "round {round}");
        assert_eq!(body, b"upstream unavailable\n");
        // The upstream also refuses a request with a body (which the proxy began to stream).
        let req = http::Request::post("https://localhost/down/echo")
            .header("content-length", 5)
            .body(())
            .unwrap();
        let mut stream = c.send.send_request(req).await.unwrap();
        stream
            .send_data(Bytes::from_static(b"hello"))
            .await
            .unwrap();
        stream.finish().await.unwrap();
        assert_eq!(stream.recv_response().await.unwrap().status(), 502);
        let seed = 30 + round;
        let (status, body) = get(&mut c.send, &format!("/bytes/20000?seed={seed}")).await;
        assert_eq!(status, 200);
        assert!(body == pattern(seed, 0, 20_000));
    }
    assert!(c.conn.close_reason().is_none());
    still_fine(&lab, &mut good, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_after_the_response_timeout_and_other_requests_go_on() {
    const TIMEOUT_MS: u64 = 5000;
    let (lab, mut good) = lab_and_good_client(&format!("response_timeout_ms = {TIMEOUT_MS}")).await;
    let mut c = client(&lab).await;
    let mut slow_send = c.send.clone();
    let started = Instant::now();
    let slow = tokio::spawn(async move { get(&mut slow_send, "/slow/120000").await });
    // Meanwhile, on the same connection: requests go on (the budget is the whole timeout, for
    // a handful of small requests).
    for i in 0..5u64 {
        let seed = 40 + i;
        let (status, body) = get(&mut c.send, &format!("/bytes/10000?seed={seed}")).await;
        assert_eq!(status, 200);
        assert!(body == pattern(seed, 0, 10_000));
        let posted = pattern(seed, 0, 20_000);
        assert!(echo(&mut c.send, &posted).await == posted);
    }
    assert!(
        !slow.is_finished(),
        "the slow request was answered before its timeout"
    );
    let (status, body) = tokio::time::timeout(SOON + Duration::from_millis(TIMEOUT_MS), slow)
        .await
        .expect("a 504 comes")
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(status, 504);
    assert_eq!(body, b"upstream timed out\n");
    assert!(
        waited >= Duration::from_millis(TIMEOUT_MS - 100),
        "504 after {waited:?}, before the timeout"
    );
    let (status, body) = get(&mut c.send, "/bytes/1000?seed=50").await;
    assert_eq!((status, body), (http::StatusCode::OK, pattern(50, 0, 1000)));
    assert!(c.conn.close_reason().is_none());
    still_fine(&lab, &mut good, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_over_max_body_bytes_is_413() {
    const MAX: usize = 100_000;
    // `/sink` never answers: the proxy streams the body to it until the body passes the limit.
    let config = two_routes(
        upstream().await,
        "/sink",
        sink_upstream().await,
        &format!("max_body_bytes = {MAX}"),
    );
    let lab = Lab::start(proxy_toml(&config)).await;
    let mut good = client(&lab).await;
    still_fine(&lab, &mut good, 1).await;
    let mut c = client(&lab).await;
    for round in 0..2u64 {
        // Declared too large: refused on the head, whatever the client goes on sending.
        let req = http::Request::post("https://localhost/echo")
            .header("content-length", MAX + 1)
            .body(())
            .unwrap();
        let mut stream = c.send.send_request(req).await.unwrap();
        let _ = stream.send_data(Bytes::from(vec![7u8; 16 * 1024])).await;
        let resp = tokio::time::timeout(SOON, stream.recv_response())
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(resp.status(), 413, "round {round}, declared");
        let mut text = Vec::new();
        while let Ok(Some(mut chunk)) = stream.recv_data().await {
            text.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        assert_eq!(text, b"request body too large\n");
        drop(stream);

        // Not declared: counted as it streams, refused once past the limit.
        let req = http::Request::post("https://localhost/sink")
            .body(())
            .unwrap();
        let mut stream = c.send.send_request(req).await.unwrap();
        let body = pattern(round, 0, 3 * MAX);
        for chunk in body.chunks(16 * 1024) {
            // The proxy stops reading (STOP_SENDING) once past the limit: sends may fail.
            if stream
                .send_data(Bytes::copy_from_slice(chunk))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = stream.finish().await;
        let resp = tokio::time::timeout(SOON, stream.recv_response())
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(resp.status(), 413, "round {round}, streamed");
        drop(stream);

        // A body within the limit goes through, on the same connection.
        let posted = pattern(60 + round, 0, MAX);
        assert!(echo(&mut c.send, &posted).await == posted);
    }
    assert!(c.conn.close_reason().is_none());
    still_fine(&lab, &mut good, 2).await;
}
