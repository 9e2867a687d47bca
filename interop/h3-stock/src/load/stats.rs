//! Counters shared by every connection and loop, and the JSON lines made from them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::gaplog::GapLog;

/// How many error messages the summary keeps.
const KEPT_ERRORS: usize = 10;

#[derive(Debug, Default)]
pub struct ConnStats {
    pub requests: AtomicU64,
    pub failed: AtomicU64,
    /// When its last request completed, and the largest gap so far between two consecutive
    /// completions (the stall a user of the connection saw, e.g. while it moved).
    completions: Mutex<(Option<Instant>, Duration)>,
}

impl ConnStats {
    fn completed(&self, at: Instant) {
        let mut c = self.completions.lock().unwrap();
        if let Some(last) = c.0 {
            c.1 = c.1.max(at.saturating_duration_since(last));
        }
        c.0 = Some(c.0.map_or(at, |last| last.max(at)));
    }

    fn max_stall(&self) -> Duration {
        self.completions.lock().unwrap().1
    }
}

#[derive(Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub failed: AtomicU64,
    /// Response body bytes received (failed requests included).
    pub bytes: AtomicU64,
    pub handshakes: AtomicU64,
    pub reconnects: AtomicU64,
    pub connection_errors: AtomicU64,
    /// Packets quinn declared lost, summed over the connections that ended.
    pub lost_packets: AtomicU64,
    pub per_connection: Vec<ConnStats>,
    /// `--gap-log`: a line per successful request.
    gap_log: Option<GapLog>,
    /// Latency of every successful request, in microseconds.
    latencies_us: Mutex<Vec<u64>>,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    pub fn new(connections: usize) -> Self {
        Self {
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connection_errors: AtomicU64::new(0),
            lost_packets: AtomicU64::new(0),
            per_connection: (0..connections).map(|_| ConnStats::default()).collect(),
            gap_log: None,
            latencies_us: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// Logs every successful request's completion to `log` too.
    pub fn with_gap_log(mut self, log: GapLog) -> Self {
        self.gap_log = Some(log);
        self
    }

    pub fn gap_log(&self) -> Option<&GapLog> {
        self.gap_log.as_ref()
    }

    pub fn success(&self, conn: usize, latency: Duration) {
        self.success_at(conn, latency, Instant::now());
    }

    fn success_at(&self, conn: usize, latency: Duration, at: Instant) {
        self.requests.fetch_add(1, Relaxed);
        self.per_connection[conn].requests.fetch_add(1, Relaxed);
        self.per_connection[conn].completed(at);
        if let Some(log) = &self.gap_log {
            log.completed(conn);
        }
        self.latencies_us
            .lock()
            .unwrap()
            .push(latency.as_micros() as u64);
    }

    pub fn failure(&self, conn: usize, message: String) {
        self.requests.fetch_add(1, Relaxed);
        self.failed.fetch_add(1, Relaxed);
        let c = &self.per_connection[conn];
        c.requests.fetch_add(1, Relaxed);
        c.failed.fetch_add(1, Relaxed);
        tracing::warn!(conn, "request failed: {message}");
        self.error(message);
    }

    pub fn connection_error(&self, message: String) {
        self.connection_errors.fetch_add(1, Relaxed);
        tracing::warn!("connection error: {message}");
        self.error(message);
    }

    fn error(&self, message: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < KEPT_ERRORS {
            errors.push(message);
        }
    }

    pub fn progress(&self, elapsed: Duration) -> Progress {
        Progress {
            elapsed_ms: elapsed.as_millis() as u64,
            requests: self.requests.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            connection_errors: self.connection_errors.load(Relaxed),
        }
    }

    pub fn summary(&self, elapsed: Duration) -> Summary {
        let mut lat = self.latencies_us.lock().unwrap().clone();
        lat.sort_unstable();
        Summary {
            requests: self.requests.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            connections: self.per_connection.len(),
            handshakes: self.handshakes.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            connection_errors: self.connection_errors.load(Relaxed),
            lost_packets: self.lost_packets.load(Relaxed),
            duration_s: elapsed.as_secs_f64(),
            p50_ms: percentile_ms(&lat, 50.0),
            p99_ms: percentile_ms(&lat, 99.0),
            max_ms: lat.last().map_or(0.0, |&us| us as f64 / 1000.0),
            max_stall_ms: self
                .per_connection
                .iter()
                .map(|c| ms(c.max_stall()))
                .fold(0.0, f64::max),
            errors: self.errors.lock().unwrap().clone(),
            per_connection: self
                .per_connection
                .iter()
                .map(|c| PerConnection {
                    requests: c.requests.load(Relaxed),
                    failed: c.failed.load(Relaxed),
                    max_stall_ms: ms(c.max_stall()),
                })
                .collect(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// Nearest-rank percentile of sorted microsecond samples, in ms (0 when there is none).
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[idx] as f64 / 1000.0
}

#[derive(Debug, Serialize)]
pub struct Progress {
    pub elapsed_ms: u64,
    pub requests: u64,
    pub failed: u64,
    pub bytes: u64,
    pub reconnects: u64,
    pub connection_errors: u64,
}

#[derive(Debug, Serialize)]
pub struct PerConnection {
    pub requests: u64,
    pub failed: u64,
    /// Largest gap between two consecutive successful completions on this connection.
    pub max_stall_ms: f64,
}

/// The one line printed on stdout at the end.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub failed: u64,
    pub bytes: u64,
    pub connections: usize,
    pub handshakes: u64,
    pub reconnects: u64,
    pub connection_errors: u64,
    /// Packets quinn declared lost on the run's connections.
    pub lost_packets: u64,
    /// From the moment every connection was up to the end of the run.
    pub duration_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The largest [`PerConnection::max_stall_ms`].
    pub max_stall_ms: f64,
    pub errors: Vec<String>,
    pub per_connection: Vec<PerConnection>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&[7000], 99.0), 7.0);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
    }

    #[test]
    fn summary_keeps_ten_errors_and_counts_per_connection() {
        let s = Stats::new(2);
        s.success(0, Duration::from_millis(3));
        for i in 0..12 {
            s.failure(1, format!("e{i}"));
        }
        let sum = s.summary(Duration::from_secs(1));
        assert_eq!((sum.requests, sum.failed), (13, 12));
        assert_eq!(sum.errors.len(), 10);
        assert_eq!(sum.per_connection[0].requests, 1);
        assert_eq!(sum.per_connection[1].failed, 12);
        assert_eq!(sum.p50_ms, 3.0);
    }

    #[test]
    fn stall_is_the_largest_gap_between_completions_on_one_connection() {
        let s = Stats::new(2);
        let t = Instant::now();
        let d = Duration::from_millis(1);
        for (conn, at_ms) in [(0, 0), (1, 5), (0, 10), (0, 12), (1, 50), (0, 30)] {
            s.success_at(conn, d, t + Duration::from_millis(at_ms));
        }
        let sum = s.summary(Duration::from_secs(1));
        assert_eq!(sum.per_connection[0].max_stall_ms, 18.0);
        assert_eq!(sum.per_connection[1].max_stall_ms, 45.0);
        assert_eq!(sum.max_stall_ms, 45.0);
    }

    #[test]
    fn the_gap_log_has_a_line_per_successful_request_only() {
        let bytes = crate::load::gaplog::tests::Shared::default();
        let s = Stats::new(2).with_gap_log(GapLog::to(Box::new(bytes.clone())));
        s.success(1, Duration::from_millis(1));
        s.failure(0, "refused".into());
        s.success(0, Duration::from_millis(1));
        s.gap_log().unwrap().flush().unwrap();
        let text = String::from_utf8(bytes.0.lock().unwrap().clone()).unwrap();
        let conns: Vec<&str> = text
            .lines()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(conns, ["1", "0"], "{text}");
    }
}
