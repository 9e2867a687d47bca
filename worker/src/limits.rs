//! How much a worker holds for its clients (`[limits]` in `worker.toml`): the QUIC windows it
//! grants each connection, and the bytes its services keep per stream, per connection and for the
//! whole worker ([`BufferBudget`]). A service that reads only what fits ([`crate::service::read_within`])
//! leaves the rest in quinn's receive buffer, whose window then stops opening: the client slows
//! down instead of the worker growing.
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Example (the defaults):
/// ```toml
/// [limits]
/// stream_buffer = 1048576          # bytes a service holds per stream: read, not yet written
/// connection_buffer = 4194304      # the same for all streams of one connection together
/// memory_budget = 268435456        # the same for all connections of the worker together
/// receive_window = 8388608         # QUIC: unread bytes quinn buffers per connection
/// stream_receive_window = 1250000  # QUIC: the same per stream
/// send_window = 8388608            # QUIC: bytes written but not yet acknowledged, per connection
/// max_concurrent_streams = 100     # QUIC: bidirectional streams a client may have open at once
/// ```
/// So one connection holds at most about `receive_window + send_window + connection_buffer`
/// (20 MiB with the defaults, a request body of up to 1 MiB more: see [`crate::demo`]), and the
/// services of the whole worker at most `memory_budget`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub stream_buffer: usize,
    pub connection_buffer: usize,
    pub memory_budget: usize,
    pub receive_window: u64,
    pub stream_receive_window: u64,
    pub send_window: u64,
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            stream_buffer: 1 << 20,
            connection_buffer: 4 << 20,
            memory_budget: 256 << 20,
            receive_window: 8 << 20,
            stream_receive_window: 1_250_000,
            send_window: 8 << 20,
            max_concurrent_streams: 100,
        }
    }
}

/// Largest value of a QUIC variable-length integer (the windows are sent as one).
const VARINT_MAX: u64 = (1 << 62) - 1;

impl Limits {
    /// Checks that the limits fit together; the error names the key to change.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("stream_buffer", self.stream_buffer as u64),
            ("connection_buffer", self.connection_buffer as u64),
            ("memory_budget", self.memory_budget as u64),
            ("receive_window", self.receive_window),
            ("stream_receive_window", self.stream_receive_window),
            ("send_window", self.send_window),
            ("max_concurrent_streams", self.max_concurrent_streams.into()),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("limits.{key} is 0: give it a positive size"));
            }
            if v > VARINT_MAX {
                return Err(format!("limits.{key} = {v} is beyond 2^62 - 1"));
            }
        }
        if self.connection_buffer < self.stream_buffer {
            return Err(format!(
                "limits.connection_buffer ({}) is smaller than limits.stream_buffer ({}): one stream could never fill its own buffer",
                self.connection_buffer, self.stream_buffer
            ));
        }
        if self.memory_budget < self.connection_buffer {
            return Err(format!(
                "limits.memory_budget ({}) is smaller than limits.connection_buffer ({})",
                self.memory_budget, self.connection_buffer
            ));
        }
        if self.receive_window < self.stream_receive_window {
            return Err(format!(
                "limits.receive_window ({}) is smaller than limits.stream_receive_window ({})",
                self.receive_window, self.stream_receive_window
            ));
        }
        Ok(())
    }

    /// The QUIC transport settings these limits ask for (quinn's defaults otherwise).
    pub fn transport(&self) -> quinn_proto::TransportConfig {
        let varint = |v: u64| quinn_proto::VarInt::from_u64(v.min(VARINT_MAX)).expect("clamped");
        let mut t = quinn_proto::TransportConfig::default();
        t.receive_window(varint(self.receive_window))
            .stream_receive_window(varint(self.stream_receive_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(self.max_concurrent_streams.into());
        t
    }
}

/// How often at most the worker says again that its budget is used up.
const EXHAUSTED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The bytes all services of one worker hold, against [`Limits::memory_budget`]. Sessions take
/// from it what they read and give back what they wrote (or dropped); when it is used up they stop
/// reading, which pushes back on every client through QUIC flow control.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    /// Times a session wanted to read and the budget had no room.
    exhausted: AtomicU64,
    /// When the worker last logged that the budget is used up (ms since `start`, +1; 0 = never).
    last_logged_ms: AtomicU64,
    start: Instant,
}

impl BufferBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            exhausted: AtomicU64::new(0),
            last_logged_ms: AtomicU64::new(0),
            start: Instant::now(),
        })
    }

    /// A budget that never runs out (tests of other parts).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes that may be taken now.
    pub fn available(&self) -> usize {
        self.limit.saturating_sub(self.used.load(Ordering::Relaxed))
    }

    /// `n` bytes were read into a session. May go past the limit (an imported connection brings
    /// its buffers along; an answer's header is added to its body).
    pub fn take(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.used.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// `n` bytes left a session (written to QUIC, or dropped with their stream or connection).
    pub fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// A session wanted to read and found no room: counted, and logged now and then.
    pub fn note_exhausted(&self) {
        self.exhausted.fetch_add(1, Ordering::Relaxed);
        let now_ms = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        if (last == 0 || now_ms - last >= EXHAUSTED_LOG_INTERVAL.as_millis() as u64)
            && self
                .last_logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                budget = self.limit,
                used = self.used(),
                held_back = self.exhausted_count(),
                "the worker's buffer budget (limits.memory_budget) is used up: clients are slowed down until their data is answered"
            );
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn exhausted_count(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_together_and_mistakes_name_their_key() {
        Limits::default().validate().unwrap();
        let e = Limits {
            connection_buffer: 10,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("limits.connection_buffer"), "{e}");
        let e = Limits {
            send_window: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("limits.send_window"), "{e}");
    }

    #[test]
    fn budget_counts_what_is_taken_and_given_back() {
        let b = BufferBudget::new(100);
        b.take(60);
        assert_eq!(b.available(), 40);
        b.take(50);
        assert_eq!((b.available(), b.used(), b.peak()), (0, 110, 110));
        b.give_back(200);
        assert_eq!((b.available(), b.used(), b.peak()), (100, 0, 110));
        b.note_exhausted();
        b.note_exhausted();
        assert_eq!(b.exhausted_count(), 2);
    }
}
