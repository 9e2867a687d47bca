//! `baton-load`: a load client for Baton's demo service (`docs/DEMO-PROTOCOL.md`).
//!
//! Each connection runs a request/response loop and one long-lived bidirectional stream whose
//! bytes are deterministic pseudo-random data checked on echo. Per connection it records the
//! largest gap between two completed requests (the stall a migration causes), failed requests,
//! connection errors, reconnects and whether the long stream came back byte-exact.
//!
//! This library part holds what the binary and its tests share: the byte pattern, the duration
//! and percentage parsers, the summary (JSON) types, the emulated path ([`impair`]), and the demo
//! client itself ([`client`]: TLS and endpoints, requests and their checks, a checked long stream
//! plus request loop), which the worker's and the netns tests use as well.
pub mod client;
pub mod impair;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The demo protocol's constants (ALPN, stream kinds, largest request): one definition, in
/// lb-common, shared with the server.
pub use lb_common::demo::{ALPN, KIND_REQUEST, KIND_STREAM, MAX_REQUEST};
/// Nearest-rank percentile (`p` in 0..=100; 0 for an empty slice): one definition, in lb-common.
pub use lb_common::percentile;

pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Deterministic pseudo-random bytes: `fill(seed, offset, out)` writes the bytes at
/// `offset..offset + out.len()` of the infinite stream named by `seed`. Any slice of the stream can
/// be produced independently, so the reader checks echoed bytes without keeping what was sent.
pub fn fill(seed: u64, offset: u64, out: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < out.len() {
        let word = splitmix64(seed ^ (pos / 8).wrapping_mul(0xd6e8_feb8_6659_fd93));
        let bytes = word.to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(out.len() - i);
        out[i..i + n].copy_from_slice(&bytes[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// Offset of the first byte of `got` (at stream offset `offset`) that differs from the pattern.
pub fn first_mismatch(seed: u64, offset: u64, got: &[u8]) -> Option<u64> {
    let mut want = vec![0u8; got.len()];
    fill(seed, offset, &mut want);
    if got == want.as_slice() {
        return None; // the common case, one memcmp (also fast in a debug build)
    }
    got.iter()
        .zip(&want)
        .position(|(a, b)| a != b)
        .map(|i| offset + i as u64)
}

/// Parses `250ms`, `30s`, `2m`, `1h`, `500us` or a plain number of seconds (`45`, `1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, "s"),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let secs = match unit {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1000.0,
        "s" | "sec" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use us, ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Like [`parse_duration`] but with the unit required (`40ms`, not `40`, which would be 40 s);
/// only `0` may go without one. For the emulated path's delays.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let bare = !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
    if bare && t.parse::<f64>().is_ok_and(|v| v != 0.0) {
        return Err(format!("{text:?}: give the unit (e.g. {t}ms)"));
    }
    parse_duration(t)
}

/// Parses a percentage as a fraction: `1%`, `0.5%`, or a plain number of percent (`2` is 2%).
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let num = t.strip_suffix('%').unwrap_or(t).trim();
    match num.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v / 100.0),
        _ => Err(format!(
            "{text:?} is not a percentage from 0 to 100 (e.g. 1%, 0.5%)"
        )),
    }
}

/// What one client connection slot saw over the whole run (across reconnects).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnSummary {
    /// Index of the connection slot (0..connections).
    pub index: usize,
    /// The client's UDP address for this slot: what a worker reports as the connection's peer
    /// (with --rebind-every: the last one).
    pub local_addr: String,
    /// The service address this slot connected to (one of the --target flags).
    #[serde(default)]
    pub target: String,
    /// Connections made for this slot (1 + reconnects when all went well).
    pub connections_made: u64,
    pub requests: u64,
    pub failed: u64,
    /// Largest gap between two completed requests (or between the start of the loop and its first
    /// completion), in milliseconds.
    pub max_stall_ms: f64,
    /// When that largest gap ended, in seconds since the run started.
    #[serde(default)]
    pub max_stall_at_s: f64,
    /// Times the session's request counter did not continue (a lost session).
    pub counter_breaks: u64,
    pub connection_errors: u64,
    pub reconnects: u64,
    /// Failed handshakes before the slot's first connection was up.
    pub connect_retries: u64,
    pub stream_bytes_sent: u64,
    pub stream_bytes_verified: u64,
    /// Packets the client's QUIC stack declared lost (then retransmitted), summed over the slot's
    /// connections: reordering or loss around migrations shows up here and in the stalls.
    #[serde(default)]
    pub lost_packets: u64,
    /// The client's congestion events (loss or ECN) over the slot's connections.
    #[serde(default)]
    pub congestion_events: u64,
    /// `--rebind-every`: times the slot's endpoint moved to a new local UDP port.
    #[serde(default)]
    pub rebinds: u64,
    /// `--key-update-every`: key updates asked of quinn on the slot's connections.
    #[serde(default)]
    pub key_updates: u64,
    /// Every long stream of this slot came back complete (FIN) and byte-exact.
    pub stream_exact: bool,
    /// `--idle`: the request made when the run stopped was answered on the connection that made
    /// the first request, with the session counter continuing (the connection survived).
    #[serde(default)]
    pub final_request_ok: bool,
    /// Last error seen, if any.
    pub last_error: Option<String>,
    /// Latency of this slot's answered requests (open to answer), in microseconds; merged into
    /// the summary's percentiles.
    #[serde(skip)]
    pub request_latency: Option<Histogram<u64>>,
}

impl ConnSummary {
    /// Counts one answered request that took `latency`.
    pub fn record_latency(&mut self, latency: Duration) {
        let h = self
            .request_latency
            .get_or_insert_with(new_latency_histogram);
        h.saturating_record(latency.as_micros().min(u64::MAX as u128) as u64);
    }
}

/// Microseconds from 1 to an hour, two significant digits (1% resolution, a few KiB).
fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

/// The run's result: totals and every slot.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// The --target addresses, comma-separated.
    pub target: String,
    pub duration_s: f64,
    pub connections: usize,
    /// Slots whose first connection came up.
    pub established: usize,
    pub requests: u64,
    pub failed: u64,
    pub counter_breaks: u64,
    pub connection_errors: u64,
    pub reconnects: u64,
    pub connect_retries: u64,
    pub max_stall_ms: f64,
    /// When the largest stall of all ended (seconds since the start) and on which connection.
    #[serde(default)]
    pub max_stall_at_s: f64,
    #[serde(default)]
    pub max_stall_conn: usize,
    /// Percentiles of the per-connection largest stalls.
    pub p50_stall_ms: f64,
    pub p99_stall_ms: f64,
    /// Latency of every answered request of the run (all slots), opening the stream to the
    /// answer's end: median, 99th percentile and worst, in milliseconds (0 without requests).
    #[serde(default)]
    pub request_p50_ms: f64,
    #[serde(default)]
    pub request_p99_ms: f64,
    #[serde(default)]
    pub request_max_ms: f64,
    pub stream_bytes_sent: u64,
    pub stream_bytes_verified: u64,
    #[serde(default)]
    pub lost_packets: u64,
    #[serde(default)]
    pub congestion_events: u64,
    /// Slots whose long streams were not complete and byte-exact.
    pub streams_not_exact: usize,
    /// `--idle`: slots whose final request was answered on their original connection.
    #[serde(default)]
    pub final_requests_ok: usize,
    /// Slots whose target was an IPv4 address, and an IPv6 one.
    #[serde(default)]
    pub ipv4_connections: usize,
    #[serde(default)]
    pub ipv6_connections: usize,
    /// `--rebind-every`: local port changes, all slots.
    #[serde(default)]
    pub rebinds: u64,
    /// `--key-update-every`: key updates asked for, all slots.
    #[serde(default)]
    pub key_updates: u64,
    /// `--rtt`, `--loss`, ...: the emulated path and what it did to the datagrams.
    #[serde(default)]
    pub path: Option<impair::PathReport>,
    /// Everything checked out: every slot connected once, no failure, no reconnect, every stream
    /// byte-exact, every request counter continuous.
    pub ok: bool,
    pub per_connection: Vec<ConnSummary>,
}

impl Summary {
    /// Totals over `per_connection`.
    pub fn from_connections(
        target: String,
        duration: Duration,
        per_connection: Vec<ConnSummary>,
    ) -> Summary {
        let stalls: Vec<f64> = per_connection.iter().map(|c| c.max_stall_ms).collect();
        let mut latency = new_latency_histogram();
        for h in per_connection
            .iter()
            .filter_map(|c| c.request_latency.as_ref())
        {
            // Same bounds, so adding cannot fail.
            let _ = latency.add(h);
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let has_requests = !latency.is_empty();
        let mut s = Summary {
            target,
            duration_s: duration.as_secs_f64(),
            connections: per_connection.len(),
            established: per_connection
                .iter()
                .filter(|c| c.connections_made > 0)
                .count(),
            max_stall_ms: stalls.iter().copied().fold(0.0, f64::max),
            p50_stall_ms: percentile(&stalls, 50.0),
            p99_stall_ms: percentile(&stalls, 99.0),
            request_p50_ms: if has_requests {
                ms(latency.value_at_quantile(0.5))
            } else {
                0.0
            },
            request_p99_ms: if has_requests {
                ms(latency.value_at_quantile(0.99))
            } else {
                0.0
            },
            request_max_ms: if has_requests { ms(latency.max()) } else { 0.0 },
            streams_not_exact: per_connection.iter().filter(|c| !c.stream_exact).count(),
            final_requests_ok: per_connection.iter().filter(|c| c.final_request_ok).count(),
            ipv6_connections: per_connection
                .iter()
                .filter(|c| c.target.starts_with('['))
                .count(),
            ipv4_connections: per_connection
                .iter()
                .filter(|c| !c.target.is_empty() && !c.target.starts_with('['))
                .count(),
            ..Default::default()
        };
        if let Some(worst) = per_connection
            .iter()
            .max_by(|a, b| a.max_stall_ms.total_cmp(&b.max_stall_ms))
        {
            s.max_stall_at_s = worst.max_stall_at_s;
            s.max_stall_conn = worst.index;
        }
        for c in &per_connection {
            s.requests += c.requests;
            s.failed += c.failed;
            s.counter_breaks += c.counter_breaks;
            s.connection_errors += c.connection_errors;
            s.reconnects += c.reconnects;
            s.connect_retries += c.connect_retries;
            s.stream_bytes_sent += c.stream_bytes_sent;
            s.stream_bytes_verified += c.stream_bytes_verified;
            s.lost_packets += c.lost_packets;
            s.congestion_events += c.congestion_events;
            s.rebinds += c.rebinds;
            s.key_updates += c.key_updates;
        }
        s.ok = s.established == s.connections
            && s.failed == 0
            && s.counter_breaks == 0
            && s.connection_errors == 0
            && s.reconnects == 0
            && s.streams_not_exact == 0;
        s.per_connection = per_connection;
        s
    }

    /// A few lines for people.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let mb = |b: u64| b as f64 / 1e6;
        out.push_str(&format!(
            "baton-load summary ({} for {:.1} s)\n",
            self.target, self.duration_s
        ));
        out.push_str(&format!(
            "  connections   {} ({} established, {} reconnects, {} connection errors, {} handshake retries)\n",
            self.connections, self.established, self.reconnects, self.connection_errors, self.connect_retries
        ));
        if self.ipv4_connections > 0 && self.ipv6_connections > 0 {
            out.push_str(&format!(
                "  families      {} IPv4, {} IPv6\n",
                self.ipv4_connections, self.ipv6_connections
            ));
        }
        if self.rebinds > 0 || self.key_updates > 0 {
            out.push_str(&format!(
                "  events        {} rebinds to a new local port, {} key updates asked for\n",
                self.rebinds, self.key_updates
            ));
        }
        out.push_str(&format!(
            "  requests      {} completed, {} failed, {} session-counter breaks\n",
            self.requests, self.failed, self.counter_breaks
        ));
        if self.requests > 0 {
            out.push_str(&format!(
                "  latency       request p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms\n",
                self.request_p50_ms, self.request_p99_ms, self.request_max_ms
            ));
        }
        out.push_str(&format!(
            "  stall         largest gap between completed requests: max {:.1} ms (conn {} at t={:.1} s), p50 {:.1} ms, p99 {:.1} ms over connections\n",
            self.max_stall_ms, self.max_stall_conn, self.max_stall_at_s, self.p50_stall_ms, self.p99_stall_ms
        ));
        out.push_str(&format!(
            "  long streams  {:.2} MB sent, {:.2} MB echoed and verified, {} not byte-exact\n",
            mb(self.stream_bytes_sent),
            mb(self.stream_bytes_verified),
            self.streams_not_exact
        ));
        out.push_str(&format!(
            "  client QUIC   {} packets declared lost (retransmitted), {} congestion events\n",
            self.lost_packets, self.congestion_events
        ));
        if let Some(p) = &self.path {
            out.push_str(&p.human());
        }
        for c in self
            .per_connection
            .iter()
            .filter(|c| c.last_error.is_some() || !c.stream_exact || c.failed > 0)
        {
            out.push_str(&format!(
                "  conn {:>4} {}: failed={} reconnects={} stream_exact={} error={}\n",
                c.index,
                c.local_addr,
                c.failed,
                c.reconnects,
                c.stream_exact,
                c.last_error.as_deref().unwrap_or("-")
            ));
        }
        out.push_str(if self.ok {
            "  verdict       OK\n"
        } else {
            "  verdict       FAILED\n"
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_sliceable() {
        let mut whole = vec![0u8; 100];
        fill(7, 3, &mut whole);
        let mut a = vec![0u8; 13];
        let mut b = vec![0u8; 87];
        fill(7, 3, &mut a);
        fill(7, 16, &mut b);
        assert_eq!([a, b].concat(), whole);
        let mut other = vec![0u8; 100];
        fill(8, 3, &mut other);
        assert_ne!(other, whole);
        assert_eq!(first_mismatch(7, 3, &whole), None);
        whole[40] ^= 1;
        assert_eq!(first_mismatch(7, 3, &whole), Some(43));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("0.1ms").unwrap(), Duration::from_micros(100));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_delay("40ms").unwrap(), Duration::from_millis(40));
        assert_eq!(parse_delay("0").unwrap(), Duration::ZERO);
        assert!(parse_delay("40").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn percentages_parse() {
        assert_eq!(parse_percent("1%").unwrap(), 0.01);
        assert_eq!(parse_percent("0.5%").unwrap(), 0.005);
        assert_eq!(parse_percent("2").unwrap(), 0.02);
        assert_eq!(parse_percent("0").unwrap(), 0.0);
        assert_eq!(parse_percent("100%").unwrap(), 1.0);
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("-1").is_err());
        assert!(parse_percent("lots").is_err());
    }

    #[test]
    fn summary_totals_and_verdict() {
        let good = ConnSummary {
            index: 0,
            connections_made: 1,
            requests: 10,
            max_stall_ms: 5.0,
            stream_exact: true,
            ..Default::default()
        };
        let s = Summary::from_connections(
            "x".into(),
            Duration::from_secs(1),
            vec![good.clone(), good.clone()],
        );
        assert!(s.ok);
        assert_eq!(s.requests, 20);
        let bad = ConnSummary {
            reconnects: 1,
            connections_made: 2,
            max_stall_ms: 900.0,
            ..good.clone()
        };
        let s = Summary::from_connections("x".into(), Duration::from_secs(1), vec![good, bad]);
        assert!(!s.ok);
        assert_eq!(s.max_stall_ms, 900.0);
        assert_eq!(s.p50_stall_ms, 5.0);
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
