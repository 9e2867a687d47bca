//! Admission on the worker's listeners while their callers are still unknown (control over TLS
//! and the peer channel until the handshake is done, the metrics endpoint for a whole request):
//! at most `total`
//! connections at once, and at most `per_source` from one source (an IPv4 address, an IPv6 /64).
//!
//! A connection beyond its address's share is refused: closed at once, nothing read from it. When
//! every place is taken, the oldest connection is cut off to make room for the new one, so a flood
//! of idle connections from many addresses cannot keep a real caller out: it would have to replace
//! all of its connections faster than the caller needs for its handshake or request.
//!
//! [`LogLimit`] keeps the refusals from flooding the log.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Places for unknown callers on one listener.
#[derive(Debug)]
pub struct Admission {
    total: usize,
    per_source: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Admitted connections by age (ids grow): their address, and the sender whose drop cuts them off.
    open: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    by_source: HashMap<IpAddr, usize>,
}

impl State {
    fn forget(&mut self, ip: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&ip);
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address already holds `per_source` places.
    SourceFull,
}

/// One admitted connection's place; given back on drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    cut_off: oneshot::Receiver<()>,
}

impl Ticket {
    /// Resolves when the connection was cut off to make room for a newer one.
    pub async fn cut_off(&mut self) {
        // The sender is never used: it is dropped when the place is taken away.
        let _ = (&mut self.cut_off).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.admission.lock();
        if let Some((ip, _)) = s.open.remove(&self.id) {
            s.forget(ip);
        }
    }
}

impl Admission {
    pub fn new(total: usize, per_source: usize) -> Arc<Self> {
        assert!(total > 0 && per_source > 0);
        Arc::new(Self {
            total,
            per_source,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds consistent counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`. Ok with its ticket and, if all places were taken, the
    /// address of the oldest connection, which was cut off to make room.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<(Ticket, Option<IpAddr>), Refused> {
        let ip = source(ip);
        let mut s = self.lock();
        if s.by_source.get(&ip).copied().unwrap_or(0) >= self.per_source {
            return Err(Refused::SourceFull);
        }
        let mut evicted = None;
        if s.open.len() >= self.total {
            if let Some((_, (old, cut))) = s.open.pop_first() {
                s.forget(old);
                drop(cut);
                evicted = Some(old);
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let (tx, rx) = oneshot::channel();
        s.open.insert(id, (ip, tx));
        *s.by_source.entry(ip).or_default() += 1;
        Ok((
            Ticket {
                admission: self.clone(),
                id,
                cut_off: rx,
            },
            evicted,
        ))
    }

    /// Connections admitted now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }
}

/// The source a connection counts against: its IPv4 address (also when it arrives IPv4-mapped on
/// an IPv6 socket), or its IPv6 /64 (one host usually holds a whole /64, so counting single
/// addresses would give it 2^64 shares).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Lets through a burst of [`LogLimit::BURST`] log lines, then one per [`LogLimit::INTERVAL`],
/// each saying how many were left out before it: a human's few failed attempts are all in the
/// log, a flood of them costs a line every ten seconds.
#[derive(Debug)]
pub struct LogLimit {
    state: Mutex<(f64, Instant, u64)>,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self {
            state: Mutex::new((Self::BURST, Instant::now(), 0)),
        }
    }
}

impl LogLimit {
    /// Lines let through at once.
    pub const BURST: f64 = 20.0;
    /// One more line per this much time.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// Some(lines left out since the last one let through) if this one may be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, last, left_out) = &mut *s;
        *tokens = (*tokens
            + now.duration_since(*last).as_secs_f64() / Self::INTERVAL.as_secs_f64())
        .min(Self::BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Some(std::mem::take(left_out))
        } else {
            *left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn per_source_share_is_refused_and_the_oldest_is_cut_off_when_full() {
        let a = Admission::new(3, 2);
        let (mut first, none) = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(none, None);
        let (_second, _) = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).unwrap_err(), Refused::SourceFull);
        let (_third, none) = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(none, None);
        // Full: the next one cuts off the oldest (the first), whose task is told.
        let (_fourth, evicted) = a.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(evicted, Some(ip("10.0.0.1")));
        tokio::time::timeout(Duration::from_secs(5), first.cut_off())
            .await
            .expect("the oldest is told it was cut off");
        assert_eq!(a.open(), 3);
        // Its address has a place again, and dropping its ticket frees nothing twice.
        drop(first);
        assert_eq!(a.open(), 3);
        let (_fifth, evicted) = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(evicted, Some(ip("10.0.0.1")));
        assert_eq!(a.open(), 3);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let a = Admission::new(8, 2);
        let _t1 = a.admit(ip("2001:db8::1")).unwrap();
        let _t2 = a.admit(ip("2001:db8::ffff:2")).unwrap();
        assert_eq!(a.admit(ip("2001:db8::3")).unwrap_err(), Refused::SourceFull);
        let _t3 = a.admit(ip("2001:db8:0:1::1")).unwrap();
        let _t4 = a.admit(ip("::ffff:192.0.2.1")).unwrap();
        let _t5 = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.1")).unwrap_err(), Refused::SourceFull);
    }

    #[tokio::test]
    async fn tickets_give_their_place_back() {
        let a = Admission::new(2, 1);
        let (t, _) = a.admit(ip("::1")).unwrap();
        assert!(a.admit(ip("::1")).is_err());
        drop(t);
        assert_eq!(a.open(), 0);
        let (mut t, evicted) = a.admit(ip("::1")).unwrap();
        assert_eq!(evicted, None);
        // Not cut off: still waiting.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), t.cut_off())
                .await
                .is_err()
        );
    }

    #[test]
    fn log_limit_lets_a_burst_through_then_counts() {
        let l = LogLimit::default();
        for _ in 0..LogLimit::BURST as usize {
            assert_eq!(l.allow(), Some(0));
        }
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        // Pretend an interval went by.
        l.state.lock().unwrap().1 -= LogLimit::INTERVAL;
        assert_eq!(l.allow(), Some(2));
        assert_eq!(l.allow(), None);
    }
}
