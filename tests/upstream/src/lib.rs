//! `baton-upstream`: the real upstream HTTP server behind Baton's HTTP/3 proxy in the netns tests,
//! the demo and the bench. The worker (service "proxy", ALPN h3) forwards each client request to it
//! over cleartext TCP, as HTTP/1.1 with keep-alive or as h2c with prior knowledge; this server
//! speaks both on every listener. With `--tls-cert`/`--tls-key` it serves HTTPS instead: HTTP/1.1
//! or HTTP/2 by ALPN ([`tls`], [`server::serve_tls`]), optionally requiring a client certificate.
//!
//! Its endpoints (see the shared HTTP/3 spec; `server` implements them):
//! - `GET /bytes/{n}?seed={s}`: n bytes of the deterministic pattern, with an etag `"n-s"` and
//!   single-range support (`range: bytes=a-b`, `bytes=a-`, `bytes=-n`, and `if-range`);
//! - `/echo` (any method): streams the request body back as it arrives;
//! - `GET /slow/{ms}`: waits before the response head;
//! - `GET /drip/{n}?seed={s}&chunk={c}&interval_ms={t}`: a response that keeps streaming;
//! - `GET /headers`: the request headers, one `name: value` line each;
//! - `GET /status/{code}`: that status, empty body;
//! - `GET /stats`: `{"requests": N, "connections": M}`.
//!
//! The pattern ([`pattern_byte`], [`fill_pattern`]) is the one the HTTP/3 load clients check bodies
//! against, so tests in Rust can build expected bodies from this library.

pub mod server;
pub mod tls;

/// Multiplier of the byte index in the pattern (Knuth's multiplicative hash constant).
pub const INDEX_MUL: u64 = 2_654_435_761;
/// Multiplier of the seed in the pattern.
pub const SEED_MUL: u64 = 40_503;

/// Byte `i` (0-based) of a body with seed `seed`: `((i * 2654435761 + seed * 40503) >> 16) & 0xFF`.
///
/// Defined for `i < 2^32` and `seed < 2^24`, where the u64 arithmetic cannot overflow; outside
/// that range it wraps (still deterministic, but the other implementations may disagree).
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    (i.wrapping_mul(INDEX_MUL)
        .wrapping_add(seed.wrapping_mul(SEED_MUL))
        >> 16) as u8
}

/// Fills `buf` with bytes `offset .. offset + buf.len()` of the pattern with `seed`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    // Incremental form of pattern_byte: the hash of byte i+1 is the hash of byte i plus INDEX_MUL.
    let mut h = offset
        .wrapping_mul(INDEX_MUL)
        .wrapping_add(seed.wrapping_mul(SEED_MUL));
    for b in buf {
        *b = (h >> 16) as u8;
        h = h.wrapping_add(INDEX_MUL);
    }
}

/// Bytes `offset .. offset + len` of the pattern with `seed`, as a new vector.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill_pattern(seed, offset, &mut v);
    v
}

/// What a `range` header asks of a body of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range (absent, malformed, several ranges, or another unit): send all of it.
    Full,
    /// Bytes `start ..= end` (inclusive, `end < len`): a 206.
    Partial { start: u64, end: u64 },
    /// A well-formed single range that no byte satisfies: a 416.
    Unsatisfiable,
}

/// Parses a `range` header value against a body of `len` bytes (RFC 9110 §14.1.2, one range only).
///
/// `bytes=a-b` and `bytes=a-` ask from byte a, `bytes=-n` the last n bytes; an end past the body is
/// clamped to its last byte. Anything this server does not serve as a single range gives `Full`,
/// which RFC 9110 allows (a server may ignore `range`).
pub fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if first.is_empty() {
        // Suffix range: the last n bytes.
        let Some(n) = number(last) else {
            return RangeRequest::Full;
        };
        if n == 0 || len == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Partial {
            start: len.saturating_sub(n),
            end: len - 1,
        };
    }
    let Some(start) = number(first) else {
        return RangeRequest::Full;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match number(last) {
            Some(end) if end >= start => end,
            // "bytes=5-3" is invalid syntax: ignore the header.
            _ => return RangeRequest::Full,
        }
    };
    if start >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Partial {
        start,
        end: end.min(len - 1),
    }
}

/// The value of `key` in a query string (`a=1&b=2`), if present; no percent-decoding (the
/// endpoints take numbers only).
pub fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_known_values() {
        // Worked by hand from the formula.
        assert_eq!(pattern_byte(0, 0), 0);
        // 2654435761 >> 16 = 40503 (0x9E37), & 0xFF = 0x37.
        assert_eq!(pattern_byte(0, 1), 0x37);
        // 2 * 2654435761 = 5308871522 -> >> 16 = 81006 (0x13C6E) -> 0x6E.
        assert_eq!(pattern_byte(0, 2), 0x6E);
        // seed 1 adds 40503 before the shift: 40503 >> 16 = 0.
        assert_eq!(pattern_byte(1, 0), 0);
        // seed 2^16: 40503 * 65536 >> 16 = 40503 -> 0x37.
        assert_eq!(pattern_byte(1 << 16, 0), 0x37);
        // The extremes of the defined domain do not overflow.
        let i = (1u64 << 32) - 1;
        let s = (1u64 << 24) - 1;
        assert_eq!(
            pattern_byte(s, i),
            (((i as u128 * 2654435761 + s as u128 * 40503) >> 16) & 0xFF) as u8
        );
    }

    #[test]
    fn fill_matches_pattern_byte() {
        for &(seed, offset) in &[
            (0, 0),
            (7, 0),
            (12345, 99_999),
            ((1 << 24) - 1, (1 << 32) - 100),
        ] {
            let mut buf = [0u8; 100];
            fill_pattern(seed, offset, &mut buf);
            for (k, b) in buf.iter().enumerate() {
                assert_eq!(
                    *b,
                    pattern_byte(seed, offset + k as u64),
                    "seed {seed} i {}",
                    offset + k as u64
                );
            }
        }
        // Chunks fill the same body as one call.
        let whole = pattern(3, 0, 50_000);
        let mut chunked = Vec::new();
        for start in (0..50_000).step_by(16_384) {
            let n = (50_000 - start).min(16_384);
            chunked.extend(pattern(3, start as u64, n));
        }
        assert_eq!(whole, chunked);
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(pattern(1, 0, 1000), pattern(2, 0, 1000));
    }

    #[test]
    fn range_forms() {
        use RangeRequest::*;
        assert_eq!(
            parse_range("bytes=0-99", 1000),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=100-", 1000),
            Partial {
                start: 100,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-10", 1000),
            Partial {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-5000", 1000),
            Partial { start: 0, end: 999 }
        );
        assert_eq!(
            parse_range("bytes=990-5000", 1000),
            Partial {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            parse_range(" bytes= 5 - 9 ", 1000),
            Partial { start: 5, end: 9 }
        );
        assert_eq!(
            parse_range("bytes=999-999", 1000),
            Partial {
                start: 999,
                end: 999
            }
        );
    }

    #[test]
    fn range_unsatisfiable() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=1000-2000", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-1", 0), Unsatisfiable);
    }

    #[test]
    fn range_ignored() {
        use RangeRequest::*;
        for v in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=5-3",
            "bytes=a-3",
            "bytes=+1-3",
            "bytes=0-99999999999999999999999",
            "bytes=1",
        ] {
            assert_eq!(parse_range(v, 1000), Full, "{v:?}");
        }
    }

    #[test]
    fn query() {
        let q = Some("seed=5&chunk=10&flag&interval_ms=");
        assert_eq!(query_param(q, "seed"), Some("5"));
        assert_eq!(query_param(q, "chunk"), Some("10"));
        assert_eq!(query_param(q, "flag"), Some(""));
        assert_eq!(query_param(q, "interval_ms"), Some(""));
        assert_eq!(query_param(q, "nope"), None);
        assert_eq!(query_param(None, "seed"), None);
    }
}
