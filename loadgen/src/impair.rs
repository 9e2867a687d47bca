//! Emulated network paths for `baton-load`: one-way delay, jitter, random loss and reordering in
//! each direction, applied at the client because the lab's kernel has no netem
//! (`shared/docs/ENVIRONMENT.md`).
//!
//! What this module owns:
//! - [`PathConfig`]: what the path does in each direction, and the seed of its random decisions.
//! - [`Shaper`]: the fate of one datagram in one direction (dropped, or delivered after a delay).
//!   Pure and seeded, so it is tested without sockets.
//! - [`ImpairedSocket`]: a quinn [`AsyncUdpSocket`] around the real socket that applies the
//!   shapers. Every datagram is one packet to them, also when GSO or GRO carries several in one
//!   buffer.
//!   - Upstream (client to server), `try_send` decides each datagram's fate and hands the kept
//!     ones to a task of its own that sends each at its due time, so a delayed send never blocks
//!     quinn. With no base delay and no jitter, a datagram that is not held back goes straight out.
//!   - Downstream, `poll_recv` reads what the real socket has, decides, holds the kept datagrams
//!     and gives them to quinn once due; a tokio timer wakes quinn's endpoint driver then.
//! - [`PathStats`] (live counters, shared by every socket of a run) and [`PathReport`] (the
//!   configuration and the counts, for baton-load's summary).
//!
//! The model: a datagram's one-way delay is its direction's delay plus a uniform random extra in
//! `[0, jitter]`; with probability `reorder` it is also held back by `reorder_delay`, so datagrams
//! sent after it overtake it; loss is independent per datagram. Without jitter and reordering the
//! order is preserved. Timers are tokio's (1 ms resolution): a delay is never shorter than asked
//! and can be up to about a millisecond longer. The impairment adds to whatever the real path does.
use crate::splitmix64;
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use serde::{Deserialize, Serialize};
use std::collections::BinaryHeap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// One direction of the path.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DirectionConfig {
    /// Base one-way delay.
    pub delay: Duration,
    /// Fraction of datagrams dropped, 0 to 1.
    pub loss: f64,
}

/// The emulated path: each direction, plus what both share.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PathConfig {
    /// Client to server.
    pub up: DirectionConfig,
    /// Server to client.
    pub down: DirectionConfig,
    /// Largest random extra delay of a datagram (uniform in `[0, jitter]`), both directions.
    pub jitter: Duration,
    /// Fraction of datagrams held back by `reorder_delay`, both directions.
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Seed of every random decision (loss, jitter, reordering).
    pub seed: u64,
}

/// Which way a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

impl PathConfig {
    fn direction(&self, d: Direction) -> DirectionConfig {
        match d {
            Direction::Up => self.up,
            Direction::Down => self.down,
        }
    }

    /// Whether datagrams going `d` are touched at all.
    pub fn shapes(&self, d: Direction) -> bool {
        let c = self.direction(d);
        !c.delay.is_zero() || c.loss > 0.0 || !self.jitter.is_zero() || self.reorder > 0.0
    }

    /// Whether anything is emulated.
    pub fn is_impaired(&self) -> bool {
        self.shapes(Direction::Up) || self.shapes(Direction::Down)
    }

    /// One line for people, e.g. `RTT +40 ms (up 20 ms, down 20 ms), loss 1% up / 1% down`.
    pub fn describe(&self) -> String {
        if !self.is_impaired() {
            return "no emulated impairment".into();
        }
        let ms = |d: Duration| fmt_ms(d.as_secs_f64() * 1000.0);
        let mut parts = Vec::new();
        if !(self.up.delay + self.down.delay).is_zero() {
            parts.push(format!(
                "RTT +{} ms (up {} ms, down {} ms)",
                ms(self.up.delay + self.down.delay),
                ms(self.up.delay),
                ms(self.down.delay)
            ));
        }
        if !self.jitter.is_zero() {
            parts.push(format!("jitter 0-{} ms", ms(self.jitter)));
        }
        parts.push(if self.up.loss == self.down.loss {
            format!("loss {}% each way", fmt_pct(self.up.loss))
        } else {
            format!(
                "loss {}% up / {}% down",
                fmt_pct(self.up.loss),
                fmt_pct(self.down.loss)
            )
        });
        if self.reorder > 0.0 {
            parts.push(format!(
                "reorder {}% (held back {} ms)",
                fmt_pct(self.reorder),
                ms(self.reorder_delay)
            ));
        }
        parts.join(", ")
    }
}

fn fmt_ms(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_pct(fraction: f64) -> String {
    fmt_ms(fraction * 100.0)
}

/// Deterministic generator of the decisions (splitmix64).
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        out
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What happens to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    /// Delivered `delay` after it was sent (upstream) or received (downstream); `held_back` when
    /// that includes the reordering delay.
    Delivered {
        delay: Duration,
        held_back: bool,
    },
}

/// The decisions of one direction of one socket.
#[derive(Clone, Debug)]
pub struct Shaper {
    config: DirectionConfig,
    jitter: Duration,
    reorder: f64,
    reorder_delay: Duration,
    rng: Rng,
}

impl Shaper {
    /// The shaper of direction `d` of socket number `stream` (sockets of one run differ by it).
    pub fn new(path: &PathConfig, d: Direction, stream: u64) -> Shaper {
        let lane = stream.wrapping_mul(2) + u64::from(d == Direction::Down);
        Shaper {
            config: path.direction(d),
            jitter: path.jitter,
            reorder: path.reorder,
            reorder_delay: path.reorder_delay,
            rng: Rng(splitmix64(path.seed ^ splitmix64(lane))),
        }
    }

    /// The next datagram's fate.
    pub fn fate(&mut self) -> Fate {
        // Every datagram draws all three numbers, so one decision does not shift the others.
        let (lose, jitter, hold) = (self.rng.unit(), self.rng.unit(), self.rng.unit());
        if lose < self.config.loss {
            return Fate::Dropped;
        }
        let held_back = hold < self.reorder;
        let mut delay = self.config.delay + self.jitter.mul_f64(jitter);
        if held_back {
            delay += self.reorder_delay;
        }
        Fate::Delivered { delay, held_back }
    }
}

/// Items ordered by due time, first in first out among equal times.
struct DelayQueue<T> {
    heap: BinaryHeap<Due<T>>,
    seq: u64,
}

struct Due<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Due<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Due<T> {}
impl<T> PartialOrd for Due<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Due<T> {
    /// Reversed, so the max-heap pops the earliest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<T> DelayQueue<T> {
    fn new() -> Self {
        DelayQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
    fn push(&mut self, at: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Due {
            at,
            seq: self.seq,
            item,
        });
    }
    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|d| d.at)
    }
    fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_due()? <= now {
            self.heap.pop().map(|d| d.item)
        } else {
            None
        }
    }
}

/// Live counters of one direction.
#[derive(Debug, Default)]
pub struct DirectionStats {
    packets: AtomicU64,
    dropped: AtomicU64,
    delayed: AtomicU64,
    held_back: AtomicU64,
    send_errors: AtomicU64,
}

impl DirectionStats {
    fn count(&self, fate: Fate) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        match fate {
            Fate::Dropped => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Delivered { delay, held_back } => {
                if !delay.is_zero() {
                    self.delayed.fetch_add(1, Ordering::Relaxed);
                }
                if held_back {
                    self.held_back.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// A snapshot of the counters.
    pub fn counts(&self) -> DirectionCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirectionCounts {
            packets: get(&self.packets),
            dropped: get(&self.dropped),
            delayed: get(&self.delayed),
            held_back: get(&self.held_back),
            send_errors: get(&self.send_errors),
        }
    }
}

/// Live counters of both directions, shared by every socket of a run.
#[derive(Debug, Default)]
pub struct PathStats {
    pub up: DirectionStats,
    pub down: DirectionStats,
}

/// What one direction did to its datagrams.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DirectionCounts {
    /// Datagrams that went this way (each GSO/GRO segment counts).
    pub packets: u64,
    pub dropped: u64,
    /// Delivered after a non-zero delay.
    pub delayed: u64,
    /// Held back for reordering.
    pub held_back: u64,
    /// Delayed datagrams the real socket refused to send (upstream only).
    pub send_errors: u64,
}

/// The emulated path of a run and what it did, in baton-load's summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathReport {
    pub description: String,
    pub seed: u64,
    /// Added round trip: both one-way delays.
    pub rtt_ms: f64,
    pub up_delay_ms: f64,
    pub down_delay_ms: f64,
    pub jitter_ms: f64,
    pub up_loss_pct: f64,
    pub down_loss_pct: f64,
    pub reorder_pct: f64,
    pub reorder_delay_ms: f64,
    pub up: DirectionCounts,
    pub down: DirectionCounts,
}

impl PathReport {
    pub fn new(path: &PathConfig, stats: &PathStats) -> PathReport {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        PathReport {
            description: path.describe(),
            seed: path.seed,
            rtt_ms: ms(path.up.delay + path.down.delay),
            up_delay_ms: ms(path.up.delay),
            down_delay_ms: ms(path.down.delay),
            jitter_ms: ms(path.jitter),
            up_loss_pct: path.up.loss * 100.0,
            down_loss_pct: path.down.loss * 100.0,
            reorder_pct: path.reorder * 100.0,
            reorder_delay_ms: ms(path.reorder_delay),
            up: stats.up.counts(),
            down: stats.down.counts(),
        }
    }

    /// Lines for the text summary.
    pub fn human(&self) -> String {
        let dir = |name: &str, c: &DirectionCounts| {
            let pct = |n: u64| 100.0 * n as f64 / (c.packets.max(1)) as f64;
            format!(
                "  path {name:<8} {} datagrams: {} dropped ({:.2}%), {} delayed, {} held back (reordered), {} send errors\n",
                c.packets,
                c.dropped,
                pct(c.dropped),
                c.delayed,
                c.held_back,
                c.send_errors
            )
        };
        format!(
            "  path          emulated at the client: {} (seed {})\n{}{}",
            self.description,
            self.seed,
            dir("up", &self.up),
            dir("down", &self.down)
        )
    }
}

/// A datagram waiting to be sent.
struct Outgoing {
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    data: Vec<u8>,
}

/// A received datagram waiting to be handed to quinn.
struct Incoming {
    addr: SocketAddr,
    ecn: Option<EcnCodepoint>,
    dst_ip: Option<IpAddr>,
    data: Vec<u8>,
}

struct Upstream {
    shaper: Mutex<Shaper>,
    /// No base delay and no jitter: a datagram that is not held back goes straight out.
    direct: bool,
    /// To the task that sends delayed datagrams when due.
    queue: mpsc::UnboundedSender<(Instant, Outgoing)>,
}

struct Downstream {
    shaper: Shaper,
    queue: DelayQueue<Incoming>,
    /// Wakes the endpoint driver when the earliest held datagram is due.
    timer: Pin<Box<Sleep>>,
}

/// Most batches read from the real socket in one `poll_recv` before handing over.
const RECV_BATCHES_PER_POLL: usize = 16;

/// A quinn socket on an emulated path (see the module documentation).
pub struct ImpairedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    up: Option<Upstream>,
    down: Option<Mutex<Downstream>>,
    stats: Arc<PathStats>,
}

impl fmt::Debug for ImpairedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImpairedSocket")
            .field("inner", &self.inner)
            .field("up", &self.up.is_some())
            .field("down", &self.down.is_some())
            .finish()
    }
}

impl ImpairedSocket {
    /// Wraps the bound `socket` for quinn (tokio runtime) on `path`; `stream` numbers the sockets
    /// of a run so their random decisions differ; `stats` collects the counts. Call it within a
    /// tokio runtime.
    pub fn new(
        socket: std::net::UdpSocket,
        path: &PathConfig,
        stream: u64,
        stats: Arc<PathStats>,
    ) -> io::Result<Arc<ImpairedSocket>> {
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        Ok(Arc::new(ImpairedSocket::over(inner, path, stream, stats)))
    }

    /// The same around any quinn socket (within a tokio runtime too: it may spawn the upstream
    /// task and makes a timer).
    pub fn over(
        inner: Arc<dyn AsyncUdpSocket>,
        path: &PathConfig,
        stream: u64,
        stats: Arc<PathStats>,
    ) -> ImpairedSocket {
        let up = path.shapes(Direction::Up).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(send_when_due(inner.clone(), rx, stats.clone()));
            Upstream {
                shaper: Mutex::new(Shaper::new(path, Direction::Up, stream)),
                direct: path.up.delay.is_zero() && path.jitter.is_zero(),
                queue: tx,
            }
        });
        let down = path.shapes(Direction::Down).then(|| {
            Mutex::new(Downstream {
                shaper: Shaper::new(path, Direction::Down, stream),
                queue: DelayQueue::new(),
                timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            })
        });
        ImpairedSocket {
            inner,
            up,
            down,
            stats,
        }
    }

    fn enqueue(&self, up: &Upstream, now: Instant, fate: Fate, t: &Transmit, data: &[u8]) {
        self.stats.up.count(fate);
        if let Fate::Delivered { delay, .. } = fate {
            let out = Outgoing {
                destination: t.destination,
                ecn: t.ecn,
                src_ip: t.src_ip,
                data: data.to_vec(),
            };
            if up.queue.send((now + delay, out)).is_err() {
                self.stats.up.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The upstream task: sends each datagram when it is due. It ends once the socket is gone and
/// the datagrams still on the emulated wire are out.
async fn send_when_due(
    inner: Arc<dyn AsyncUdpSocket>,
    mut rx: mpsc::UnboundedReceiver<(Instant, Outgoing)>,
    stats: Arc<PathStats>,
) {
    let mut queue = DelayQueue::new();
    let mut poller = inner.clone().create_io_poller();
    let mut open = true;
    loop {
        while let Some(out) = queue.pop_due(Instant::now()) {
            send_now(&*inner, &mut poller, &out, &stats.up).await;
        }
        let next = queue.next_due();
        if !open && next.is_none() {
            return;
        }
        tokio::select! {
            got = rx.recv(), if open => match got {
                Some((at, out)) => queue.push(at, out),
                None => open = false,
            },
            _ = sleep_until(next) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends one datagram, waiting while the real socket is not writable.
async fn send_now(
    inner: &dyn AsyncUdpSocket,
    poller: &mut Pin<Box<dyn UdpPoller>>,
    out: &Outgoing,
    stats: &DirectionStats,
) {
    let t = Transmit {
        destination: out.destination,
        ecn: out.ecn,
        contents: &out.data,
        segment_size: None,
        src_ip: out.src_ip,
    };
    loop {
        match inner.try_send(&t) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await {
                    tracing::debug!("emulated path: socket not writable: {e}");
                    stats.send_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("emulated path: delayed send failed: {e}");
                stats.send_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // Only a direct send can report WouldBlock; it is the real socket's readiness.
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(up) = &self.up else {
            return self.inner.try_send(transmit);
        };
        let now = Instant::now();
        let len = transmit.contents.len();
        let segment = transmit.segment_size.filter(|&s| s > 0).unwrap_or(len);
        let mut shaper = up.shaper.lock().unwrap();
        if up.direct && len <= segment {
            let fate = shaper.fate();
            if let Fate::Delivered {
                held_back: false, ..
            } = fate
            {
                drop(shaper);
                // On WouldBlock quinn retries this datagram, which then draws a new fate.
                self.inner.try_send(transmit)?;
                self.stats.up.count(fate);
                return Ok(());
            }
            self.enqueue(up, now, fate, transmit, transmit.contents);
            return Ok(());
        }
        for data in transmit.contents.chunks(segment.max(1)) {
            let fate = shaper.fate();
            self.enqueue(up, now, fate, transmit, data);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Some(down) = &self.down else {
            return self.inner.poll_recv(cx, bufs, meta);
        };
        let mut d = down.lock().unwrap();
        let d = &mut *d;
        // Take in what the real socket has; each GRO segment is a datagram of its own.
        for batch in 0.. {
            if batch == RECV_BATCHES_PER_POLL {
                cx.waker().wake_by_ref(); // more may be waiting: come back soon
                break;
            }
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => {
                    let now = Instant::now();
                    for (buf, m) in bufs.iter().zip(meta.iter()).take(n) {
                        let stride = if m.stride == 0 { m.len } else { m.stride };
                        for data in buf[..m.len].chunks(stride.max(1)) {
                            let fate = d.shaper.fate();
                            self.stats.down.count(fate);
                            if let Fate::Delivered { delay, .. } = fate {
                                let held = Incoming {
                                    addr: m.addr,
                                    ecn: m.ecn,
                                    dst_ip: m.dst_ip,
                                    data: data.to_vec(),
                                };
                                d.queue.push(now + delay, held);
                            }
                        }
                    }
                }
            }
        }
        // Hand over what is due, one datagram per buffer.
        loop {
            let now = Instant::now();
            let mut n = 0;
            while n < bufs.len().min(meta.len()) {
                let Some(p) = d.queue.pop_due(now) else {
                    break;
                };
                let len = p.data.len().min(bufs[n].len());
                bufs[n][..len].copy_from_slice(&p.data[..len]);
                let m = &mut meta[n];
                m.addr = p.addr;
                m.len = len;
                m.stride = len;
                m.ecn = p.ecn;
                m.dst_ip = p.dst_ip;
                n += 1;
            }
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            let Some(due) = d.queue.next_due() else {
                return Poll::Pending;
            };
            d.timer.as_mut().reset(due);
            if d.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // Impaired upstream: one datagram per transmit (segments would be split anyway).
        if self.up.is_some() {
            1
        } else {
            self.inner.max_transmit_segments()
        }
    }

    fn max_receive_segments(&self) -> usize {
        // quinn sizes its buffers by this; the real socket fills them before they are split.
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn path(delay_ms: u64, loss: f64) -> PathConfig {
        PathConfig {
            up: DirectionConfig {
                delay: Duration::from_millis(delay_ms),
                loss,
            },
            down: DirectionConfig {
                delay: Duration::from_millis(delay_ms),
                loss,
            },
            seed: 42,
            ..Default::default()
        }
    }

    #[test]
    fn loss_fraction_is_near_the_one_asked() {
        for (loss, seed) in [(0.01, 1u64), (0.05, 2), (0.3, 3)] {
            let p = PathConfig {
                seed,
                ..path(0, loss)
            };
            for d in [Direction::Up, Direction::Down] {
                let mut s = Shaper::new(&p, d, 7);
                let n = 200_000;
                let dropped = (0..n).filter(|_| s.fate() == Fate::Dropped).count();
                let got = dropped as f64 / n as f64;
                assert!(
                    (got - loss).abs() < loss * 0.1,
                    "asked {loss}, dropped {got} ({d:?})"
                );
            }
        }
        let mut none = Shaper::new(&path(0, 0.0), Direction::Up, 0);
        assert!((0..10_000).all(|_| none.fate() != Fate::Dropped));
        let mut all = Shaper::new(&path(0, 1.0), Direction::Up, 0);
        assert!((0..10_000).all(|_| all.fate() == Fate::Dropped));
    }

    #[test]
    fn delays_are_at_least_the_asked_ones() {
        let p = PathConfig {
            jitter: Duration::from_millis(3),
            reorder: 0.1,
            reorder_delay: Duration::from_millis(5),
            ..path(20, 0.0)
        };
        let mut s = Shaper::new(&p, Direction::Down, 0);
        let (mut held, mut jittered) = (0, 0);
        for _ in 0..10_000 {
            let Fate::Delivered { delay, held_back } = s.fate() else {
                panic!("no loss asked");
            };
            let floor = Duration::from_millis(if held_back { 25 } else { 20 });
            assert!(delay >= floor && delay <= floor + Duration::from_millis(3));
            held += usize::from(held_back);
            jittered += usize::from(delay > floor);
        }
        assert!((800..1200).contains(&held), "held back {held} of 10000");
        assert!(jittered > 9_000);
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            path(20, 0.01).describe(),
            "RTT +40 ms (up 20 ms, down 20 ms), loss 1% each way"
        );
        assert_eq!(path(0, 0.01).describe(), "loss 1% each way");
        assert_eq!(path(0, 0.0).describe(), "no emulated impairment");
        let p = PathConfig {
            jitter: Duration::from_millis(2),
            reorder: 0.005,
            reorder_delay: Duration::from_millis(5),
            down: DirectionConfig {
                delay: Duration::from_micros(12_500),
                loss: 0.02,
            },
            ..path(5, 0.0)
        };
        assert_eq!(
            p.describe(),
            "RTT +17.5 ms (up 5 ms, down 12.5 ms), jitter 0-2 ms, loss 0% up / 2% down, reorder 0.5% (held back 5 ms)"
        );
    }

    #[test]
    fn same_seed_same_decisions_other_stream_others() {
        let p = path(1, 0.2);
        let run = |stream| {
            let mut s = Shaper::new(&p, Direction::Up, stream);
            (0..1000).map(|_| s.fate()).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn queue_keeps_order_without_jitter_or_reordering() {
        let mut s = Shaper::new(&path(20, 0.1), Direction::Up, 0);
        let mut q = DelayQueue::new();
        let t0 = Instant::now();
        // Datagrams "sent" 0.1 ms apart, several at the same instant.
        for i in 0..5000u64 {
            let at = t0 + Duration::from_micros(100 * (i / 3));
            if let Fate::Delivered { delay, .. } = s.fate() {
                q.push(at + delay, i);
            }
        }
        let out: Vec<u64> =
            std::iter::from_fn(|| q.pop_due(t0 + Duration::from_secs(60))).collect();
        assert!(out.len() > 4000);
        assert!(out.windows(2).all(|w| w[0] < w[1]), "reordered");
        // Nothing is handed out before it is due.
        q.push(t0 + Duration::from_millis(20), 1);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(19)), None);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(20)), Some(1));
    }

    /// A quinn socket with scripted receives that records sends.
    #[derive(Debug, Default)]
    struct Fake {
        incoming: Mutex<VecDeque<(RecvMeta, Vec<u8>)>>,
        sent: Mutex<Vec<(Instant, Vec<u8>)>>,
    }

    impl AsyncUdpSocket for Fake {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            #[derive(Debug)]
            struct Ready;
            impl UdpPoller for Ready {
                fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
                    Poll::Ready(Ok(()))
                }
            }
            Box::pin(Ready)
        }
        fn try_send(&self, t: &Transmit) -> io::Result<()> {
            assert!(t.segment_size.is_none(), "a split datagram is sent alone");
            self.sent
                .lock()
                .unwrap()
                .push((Instant::now(), t.contents.to_vec()));
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context,
            bufs: &mut [IoSliceMut<'_>],
            meta: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            // The wrapper re-polls after the timer; a real socket registers the waker here.
            match self.incoming.lock().unwrap().pop_front() {
                Some((m, data)) => {
                    bufs[0][..data.len()].copy_from_slice(&data);
                    meta[0] = m;
                    Poll::Ready(Ok(1))
                }
                None => Poll::Pending,
            }
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok("127.0.0.1:1".parse().unwrap())
        }
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    /// Receives from `sock` until `n` datagrams came, returning each with its arrival time.
    async fn recv_n(sock: &ImpairedSocket, n: usize) -> Vec<(Instant, Vec<u8>)> {
        let mut got = Vec::new();
        let mut storage = vec![vec![0u8; 4096]; 4];
        while got.len() < n {
            let mut bufs: Vec<IoSliceMut> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = [RecvMeta::default(); 4];
            let k = std::future::poll_fn(|cx| sock.poll_recv(cx, &mut bufs, &mut meta))
                .await
                .unwrap();
            for (b, m) in bufs.iter().zip(&meta).take(k) {
                assert_eq!(m.len, m.stride, "one datagram per buffer");
                got.push((Instant::now(), b[..m.len].to_vec()));
            }
        }
        got
    }

    // Paused clock: tokio's time moves only when every task waits, so "not before it is due" is
    // exact and a loaded machine cannot make the test late.
    #[tokio::test(start_paused = true)]
    async fn a_gro_batch_is_split_and_each_segment_delayed() {
        let fake = Arc::new(Fake::default());
        // One GRO buffer with three 100-byte datagrams and a 40-byte tail.
        let data: Vec<u8> = (0..340u32).map(|i| (i / 100) as u8).collect();
        fake.incoming.lock().unwrap().push_back((
            RecvMeta {
                addr: addr(),
                len: 340,
                stride: 100,
                ecn: None,
                dst_ip: None,
            },
            data,
        ));
        let stats = Arc::new(PathStats::default());
        let p = path(30, 0.0);
        let sock = ImpairedSocket::over(fake.clone(), &p, 0, stats.clone());
        assert_eq!(sock.max_transmit_segments(), 1);
        let t0 = Instant::now();
        let got = recv_n(&sock, 4).await;
        let lens: Vec<usize> = got.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(lens, [100, 100, 100, 40]);
        for (i, (at, d)) in got.iter().enumerate() {
            assert!(d.iter().all(|&b| b == i as u8), "segment {i} intact");
            assert!(*at - t0 >= Duration::from_millis(30));
        }
        let c = stats.down.counts();
        assert_eq!((c.packets, c.delayed, c.dropped), (4, 4, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn sends_are_delayed_without_blocking_and_gso_is_split() {
        let fake = Arc::new(Fake::default());
        let stats = Arc::new(PathStats::default());
        let sock = ImpairedSocket::over(fake.clone(), &path(40, 0.0), 0, stats.clone());
        let t0 = Instant::now();
        let contents: Vec<u8> = (0..250u32).map(|i| (i / 100) as u8).collect();
        sock.try_send(&Transmit {
            destination: addr(),
            ecn: None,
            contents: &contents,
            segment_size: Some(100),
            src_ip: None,
        })
        .unwrap();
        for i in 0..10u8 {
            sock.try_send(&Transmit {
                destination: addr(),
                ecn: None,
                contents: &[10 + i],
                segment_size: None,
                src_ip: None,
            })
            .unwrap();
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "try_send waited");
        tokio::time::sleep(Duration::from_millis(39)).await;
        assert!(fake.sent.lock().unwrap().is_empty(), "sent before due");
        let deadline = Instant::now() + Duration::from_secs(30);
        while fake.sent.lock().unwrap().len() < 13 {
            assert!(Instant::now() < deadline, "delayed datagrams never sent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sent = fake.sent.lock().unwrap();
        let first: Vec<u8> = sent.iter().map(|(_, d)| d[0]).collect();
        assert_eq!(first, [0, 1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
        assert_eq!(sent[2].1.len(), 50);
        assert!(
            sent.iter()
                .all(|(at, _)| *at - t0 >= Duration::from_millis(40))
        );
        assert_eq!(stats.up.counts().packets, 13);
    }

    #[tokio::test]
    async fn loss_only_upstream_sends_directly_and_drops_some() {
        let fake = Arc::new(Fake::default());
        let stats = Arc::new(PathStats::default());
        let sock = ImpairedSocket::over(fake.clone(), &path(0, 0.25), 0, stats.clone());
        for _ in 0..1000 {
            sock.try_send(&Transmit {
                destination: addr(),
                ecn: None,
                contents: &[1],
                segment_size: None,
                src_ip: None,
            })
            .unwrap();
        }
        // Sent synchronously: no queue, no delay.
        let sent = fake.sent.lock().unwrap().len() as u64;
        let c = stats.up.counts();
        assert_eq!(c.packets, 1000);
        assert_eq!(sent + c.dropped, 1000);
        assert!((150..350).contains(&c.dropped), "dropped {}", c.dropped);
        assert_eq!(c.delayed, 0);
    }
}
