//! The bridge between a connection the worker drives itself (quinn-proto, sans-IO, in the core's
//! loop) and h3's QUIC traits (async, polled by the connection's tokio task).
//!
//! The core's [`Bridge::drive`] moves bytes between quinn's streams and the bridge's bounded
//! per-stream buffers, accepts and opens streams, and applies what h3 asked for (finish, reset,
//! stop, close); h3 reads and writes only those buffers, and every change it makes wakes the core
//! for that connection. Nothing here blocks the core on h3, or h3 on the network.
//!
//! Everything h3 knows about a connection comes from the streams it was handed. So an idle
//! connection (no request stream open) resumes on another worker by replay: the bridge records
//! every byte of the long-lived unidirectional streams (both control streams, the QPACK streams),
//! [`Bridge::capture`] carries them, and on the target a fresh h3 connection is handed the same
//! bytes: the peer's streams are read again from their start, and what h3 writes on its own
//! control and QPACK streams is checked against what was already sent and not sent again.
use crate::service::{ChunkQueue, WakeCore, read_within};
use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, WriteBuf};
use quinn_proto::{Connection, Dir, StreamId, VarInt};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;
use tracing::{debug, warn};

/// Bytes the bridge buffers per stream in each direction; beyond this, quinn keeps the received
/// bytes (its window stops opening) and h3's writes wait.
pub const STREAM_BUFFER: usize = 256 * 1024;
/// The most a recorded unidirectional stream (control, QPACK) may carry and still move: these
/// streams carry a SETTINGS frame and rarely anything else (a GOAWAY, MAX_PUSH_ID).
pub const MAX_RECORD: usize = 16 * 1024;

/// HTTP/3 error codes the bridge uses itself (RFC 9114 section 8.1).
pub const H3_NO_ERROR: u64 = 0x100;
pub const H3_INTERNAL_ERROR: u64 = 0x102;
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;

/// One connection's shared state: the core's side calls [`drive`](Self::drive), h3's side holds
/// [`BridgeConnection`] and the stream handles.
pub struct Bridge {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By raw stream ID.
    streams: BTreeMap<u64, Stream>,
    incoming_bidi: VecDeque<u64>,
    incoming_uni: VecDeque<u64>,
    accept_bidi_waker: Option<Waker>,
    accept_uni_waker: Option<Waker>,
    /// h3 is waiting for a unidirectional stream to be opened.
    open_uni_wanted: bool,
    opened_uni: VecDeque<u64>,
    open_waker: Option<Waker>,
    /// On a resumed connection: the streams h3's first opens are given instead of new ones,
    /// with the bytes already sent on them.
    replay_opens: VecDeque<(u64, Vec<u8>)>,
    /// The connection is gone (closed by either side, or lost).
    closed: Option<ConnectionErrorIncoming>,
    /// h3 asked to close the connection.
    close: Option<(u64, Bytes)>,
    /// The connection moved away or was discarded: h3's side of it is being torn down and must
    /// not touch the connection (its drop would close it).
    detached: bool,
    wake: Option<WakeCore>,
    remote: Option<SocketAddr>,
    /// h3 wrote bytes on a replayed stream that differ from those sent before the move (the two
    /// workers' HTTP/3 settings differ): the connection is closed.
    replay_mismatch: bool,
}

#[derive(Default)]
struct Stream {
    recv: Option<RecvHalf>,
    send: Option<SendHalf>,
}

#[derive(Default)]
struct RecvHalf {
    buf: VecDeque<Bytes>,
    len: usize,
    fin: bool,
    reset: Option<u64>,
    waker: Option<Waker>,
    /// h3 asked the peer to stop sending (applied at the next drive).
    stop: Option<u64>,
    stopped: bool,
    /// h3 holds a handle to it.
    held: bool,
    /// Every byte received (unidirectional streams only), for a move; None once past
    /// [`MAX_RECORD`] (the connection can no longer move).
    record: Option<Vec<u8>>,
}

#[derive(Default)]
struct SendHalf {
    queue: ChunkQueue,
    finish: bool,
    finished: bool,
    reset: Option<u64>,
    reset_done: bool,
    /// The peer asked us to stop (STOP_SENDING) with this code.
    stopped: Option<u64>,
    waker: Option<Waker>,
    held: bool,
    /// h3 wrote on it (a dropped stream is then finished, not reset).
    wrote: bool,
    record: Option<Vec<u8>>,
    /// Bytes already sent on this stream before a move: what h3 writes first must equal them,
    /// and is not sent again.
    replayed: Vec<u8>,
}

impl RecvHalf {
    fn done(&self) -> bool {
        !self.held && (self.stopped || self.reset.is_some() || (self.fin && self.len == 0))
    }
}

impl SendHalf {
    fn done(&self) -> bool {
        !self.held && (self.finished || self.reset_done || self.stopped.is_some())
    }
}

fn raw(id: StreamId) -> u64 {
    VarInt::from(id).into_inner()
}

fn stream_id(raw: u64) -> StreamId {
    StreamId::from(VarInt::from_u64(raw).expect("stream ids are varints"))
}

fn h3_id(raw: u64) -> quic::StreamId {
    quic::StreamId::try_from(raw).expect("stream ids are varints")
}

fn connection_gone(closed: &ConnectionErrorIncoming) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: closed.clone(),
    }
}

/// Appends to a stream's record; past [`MAX_RECORD`] the record is dropped (None: the connection
/// can no longer move).
fn record(rec: &mut Option<Vec<u8>>, bytes: &[u8]) {
    if let Some(r) = rec {
        if r.len() + bytes.len() > MAX_RECORD {
            *rec = None;
        } else {
            r.extend_from_slice(bytes);
        }
    }
}

/// What [`Bridge::capture`] carries: the unidirectional streams h3 holds, with every byte they
/// carried so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Captured {
    /// Streams this side opened (control, QPACK encoder and decoder), in the order h3 opened them.
    pub ours: Vec<(u64, Vec<u8>)>,
    /// Streams the peer opened, in stream-ID order (the order they were accepted).
    pub peers: Vec<(u64, Vec<u8>)>,
}

impl Captured {
    pub fn encode(&self, out: &mut Vec<u8>) {
        for list in [&self.ours, &self.peers] {
            out.extend((list.len() as u32).to_be_bytes());
            for (id, bytes) in list {
                out.extend(id.to_be_bytes());
                out.extend((bytes.len() as u32).to_be_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }

    /// Decodes what [`encode`](Self::encode) wrote at the start of `input`; returns the rest.
    pub fn decode(mut input: &[u8]) -> Result<(Self, &[u8]), &'static str> {
        fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
            if input.len() < n {
                return Err("truncated HTTP/3 stream record");
            }
            let (head, rest) = input.split_at(n);
            *input = rest;
            Ok(head)
        }
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = u32::from_be_bytes(take(&mut input, 4)?.try_into().unwrap());
            if n > 16 {
                return Err("too many HTTP/3 unidirectional streams in the record");
            }
            for _ in 0..n {
                let id = u64::from_be_bytes(take(&mut input, 8)?.try_into().unwrap());
                let len = u32::from_be_bytes(take(&mut input, 4)?.try_into().unwrap()) as usize;
                if len > MAX_RECORD {
                    return Err("an HTTP/3 stream record is too large");
                }
                VarInt::from_u64(id).map_err(|_| "a stream ID beyond 2^62")?;
                list.push((id, take(&mut input, len)?.to_vec()));
            }
        }
        let [ours, peers] = lists;
        Ok((Self { ours, peers }, input))
    }
}

impl Bridge {
    /// The bridge of a new connection.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The bridge of a connection that moved here, from what [`capture`](Self::capture) carried:
    /// h3 is handed the recorded streams again.
    pub fn resume(captured: Captured) -> Arc<Self> {
        let mut inner = Inner::default();
        for (id, bytes) in captured.peers {
            let len = bytes.len();
            let mut buf = VecDeque::new();
            if len > 0 {
                buf.push_back(Bytes::from(bytes.clone()));
            }
            inner.streams.insert(
                id,
                Stream {
                    recv: Some(RecvHalf {
                        buf,
                        len,
                        record: Some(bytes),
                        ..RecvHalf::default()
                    }),
                    send: None,
                },
            );
            inner.incoming_uni.push_back(id);
        }
        inner.replay_opens = captured.ours.into();
        Arc::new(Self {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How h3's side wakes the core for this connection.
    pub fn set_wake(&self, wake: WakeCore) {
        self.lock().wake = Some(wake);
    }

    /// h3's side of the connection.
    pub fn connection(self: &Arc<Self>) -> BridgeConnection {
        BridgeConnection {
            bridge: self.clone(),
        }
    }

    /// The client's address (as of the last drive).
    pub fn remote(&self) -> Option<SocketAddr> {
        self.lock().remote
    }

    /// h3's side is being torn down (the connection moved away or was discarded): from now on
    /// nothing it does reaches the connection.
    pub fn detach(&self) {
        let mut inner = self.lock();
        inner.detached = true;
        inner.close = None;
    }

    /// Moves bytes between quinn's streams and the bridge and applies what h3 asked for. While
    /// `frozen` no new request stream is accepted (they stay in quinn and move with it); requests
    /// already accepted go on until they are done.
    pub fn drive(&self, conn: &mut Connection, frozen: bool) {
        let mut inner = self.lock();
        let mut wakers = Vec::new();
        if inner.closed.is_none() {
            inner.drive(conn, frozen, &mut wakers);
        }
        drop(inner);
        for w in wakers {
            w.wake();
        }
    }

    /// Whether the connection can move now: no request stream open or waiting, everything h3
    /// wrote handed to quinn, h3's set-up done, the recorded streams small enough to carry.
    pub fn movable(&self) -> Result<(), &'static str> {
        let inner = self.lock();
        if inner.closed.is_some() || inner.close.is_some() {
            return Err("the connection is closing");
        }
        if !inner.incoming_bidi.is_empty() {
            return Err("a request stream is waiting to be accepted");
        }
        if !inner.replay_opens.is_empty() || inner.open_uni_wanted || !inner.opened_uni.is_empty() {
            return Err("HTTP/3 set-up is not finished");
        }
        let mut ours = 0;
        for (&id, s) in &inner.streams {
            if stream_id(id).dir() == Dir::Bi {
                return Err("requests in flight");
            }
            if let Some(r) = &s.recv {
                if r.record.is_none() {
                    return Err("a control stream carried more than can be moved");
                }
            }
            if let Some(w) = &s.send {
                ours += 1;
                if w.record.is_none() {
                    return Err("a control stream carried more than can be moved");
                }
                if !w.queue.is_empty() || !w.replayed.is_empty() {
                    return Err("HTTP/3 control data not yet written");
                }
            }
        }
        if ours == 0 {
            return Err("HTTP/3 set-up is not finished");
        }
        Ok(())
    }

    /// The recorded unidirectional streams (call when [`movable`](Self::movable)).
    pub fn capture(&self) -> Captured {
        let inner = self.lock();
        let mut captured = Captured::default();
        for (&id, s) in &inner.streams {
            if let Some(w) = &s.send {
                captured
                    .ours
                    .push((id, w.record.clone().unwrap_or_default()));
            } else if let Some(r) = &s.recv {
                captured
                    .peers
                    .push((id, r.record.clone().unwrap_or_default()));
            }
        }
        captured
    }

    fn with_stream<T>(
        &self,
        id: u64,
        f: impl FnOnce(&mut Stream, &Option<ConnectionErrorIncoming>) -> T,
    ) -> (T, Option<WakeCore>) {
        let mut inner = self.lock();
        let Inner {
            streams,
            closed,
            wake,
            ..
        } = &mut *inner;
        let s = streams.entry(id).or_default();
        (f(s, closed), wake.clone())
    }
}

impl Inner {
    fn drive(&mut self, conn: &mut Connection, frozen: bool, wakers: &mut Vec<Waker>) {
        let now = Instant::now();
        self.remote = Some(conn.remote_address());
        if !self.detached {
            if self.replay_mismatch {
                self.close = Some((
                    H3_INTERNAL_ERROR,
                    Bytes::from_static(b"HTTP/3 settings differ after a move"),
                ));
            }
            if let Some((code, reason)) = self.close.take() {
                conn.close(
                    now,
                    VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x102)),
                    reason,
                );
            }
        }
        if conn.is_closed() {
            self.closed = Some(ConnectionErrorIncoming::InternalError(
                "the QUIC connection is closed".into(),
            ));
            wakers.extend(self.accept_bidi_waker.take());
            wakers.extend(self.accept_uni_waker.take());
            wakers.extend(self.open_waker.take());
            for s in self.streams.values_mut() {
                wakers.extend(s.recv.as_mut().and_then(|r| r.waker.take()));
                wakers.extend(s.send.as_mut().and_then(|w| w.waker.take()));
            }
            return;
        }
        while let Some(id) = conn.streams().accept(Dir::Uni) {
            self.streams.insert(
                raw(id),
                Stream {
                    recv: Some(RecvHalf {
                        record: Some(Vec::new()),
                        ..RecvHalf::default()
                    }),
                    send: None,
                },
            );
            self.incoming_uni.push_back(raw(id));
            wakers.extend(self.accept_uni_waker.take());
        }
        if !frozen {
            while let Some(id) = conn.streams().accept(Dir::Bi) {
                self.streams.insert(
                    raw(id),
                    Stream {
                        recv: Some(RecvHalf::default()),
                        send: Some(SendHalf::default()),
                    },
                );
                self.incoming_bidi.push_back(raw(id));
                wakers.extend(self.accept_bidi_waker.take());
            }
        }
        if self.open_uni_wanted {
            if let Some(id) = conn.streams().open(Dir::Uni) {
                self.open_uni_wanted = false;
                self.opened_uni.push_back(raw(id));
                wakers.extend(self.open_waker.take());
            }
        }
        let mut done = Vec::new();
        for (&id, s) in &mut self.streams {
            let sid = stream_id(id);
            if let Some(r) = &mut s.recv {
                drive_recv(conn, sid, r, wakers);
            }
            if let Some(w) = &mut s.send {
                drive_send(conn, sid, w, wakers);
            }
            if s.recv.as_ref().is_none_or(RecvHalf::done)
                && s.send.as_ref().is_none_or(SendHalf::done)
            {
                done.push(id);
            }
        }
        for id in done {
            self.streams.remove(&id);
        }
    }
}

fn drive_recv(conn: &mut Connection, id: StreamId, r: &mut RecvHalf, wakers: &mut Vec<Waker>) {
    if r.stopped || r.fin || r.reset.is_some() {
        return;
    }
    if let Some(code) = r.stop.take() {
        let _ = conn
            .recv_stream(id)
            .stop(VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x100)));
        r.stopped = true;
        r.buf.clear();
        r.len = 0;
        return;
    }
    let room = STREAM_BUFFER.saturating_sub(r.len);
    let mut got = Vec::new();
    let read = read_within(conn, id, room, |b| got.push(b));
    for b in got {
        record(&mut r.record, &b);
        r.len += b.len();
        r.buf.push_back(b);
    }
    r.fin = read.fin;
    r.reset = read.reset.map(VarInt::into_inner);
    if read.bytes > 0 || read.fin || read.reset.is_some() {
        wakers.extend(r.waker.take());
    }
}

fn drive_send(conn: &mut Connection, id: StreamId, w: &mut SendHalf, wakers: &mut Vec<Waker>) {
    if w.finished || w.reset_done {
        return;
    }
    if w.stopped.is_none() {
        if let Ok(Some(code)) = conn.send_stream(id).stopped() {
            w.stopped = Some(code.into_inner());
            w.queue = ChunkQueue::default();
            wakers.extend(w.waker.take());
            return;
        }
    } else {
        return;
    }
    if let Some(code) = w.reset {
        let _ = conn
            .send_stream(id)
            .reset(VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x10c)));
        w.reset_done = true;
        w.queue = ChunkQueue::default();
        wakers.extend(w.waker.take());
        return;
    }
    let before = w.queue.len();
    w.queue.write_to(conn, id);
    if w.finish && w.queue.is_empty() {
        if let Err(e) = conn.send_stream(id).finish() {
            debug!(stream = %id, "finish: {e}");
        }
        w.finished = true;
        wakers.extend(w.waker.take());
    } else if w.queue.len() < before && w.queue.len() < STREAM_BUFFER {
        wakers.extend(w.waker.take());
    }
}

/// h3's view of the connection.
pub struct BridgeConnection {
    bridge: Arc<Bridge>,
}

/// h3's handle to open streams (a server only opens unidirectional ones).
#[derive(Clone)]
pub struct BridgeOpener {
    bridge: Arc<Bridge>,
}

/// The receiving half of a stream.
pub struct BridgeRecv {
    bridge: Arc<Bridge>,
    id: u64,
}

/// The sending half of a stream.
pub struct BridgeSend {
    bridge: Arc<Bridge>,
    id: u64,
}

/// A request stream (both halves).
pub struct BridgeBidi {
    send: BridgeSend,
    recv: BridgeRecv,
}

fn wake(w: Option<WakeCore>) {
    if let Some(w) = w {
        w();
    }
}

impl Bridge {
    fn accepted(self: &Arc<Self>, id: u64, bidi: bool) {
        let mut inner = self.lock();
        if let Some(s) = inner.streams.get_mut(&id) {
            if let Some(r) = &mut s.recv {
                r.held = true;
            }
            if bidi {
                if let Some(w) = &mut s.send {
                    w.held = true;
                }
            }
        }
    }

    fn poll_open_uni(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<u64, StreamErrorIncoming>> {
        let mut inner = self.lock();
        if let Some(closed) = &inner.closed {
            return Poll::Ready(Err(connection_gone(closed)));
        }
        let opened = if let Some((id, sent)) = inner.replay_opens.pop_front() {
            inner.streams.insert(
                id,
                Stream {
                    recv: None,
                    send: Some(SendHalf {
                        held: true,
                        record: Some(sent.clone()),
                        replayed: sent,
                        ..SendHalf::default()
                    }),
                },
            );
            Some(id)
        } else if let Some(id) = inner.opened_uni.pop_front() {
            inner.streams.insert(
                id,
                Stream {
                    recv: None,
                    send: Some(SendHalf {
                        held: true,
                        record: Some(Vec::new()),
                        ..SendHalf::default()
                    }),
                },
            );
            Some(id)
        } else {
            None
        };
        match opened {
            Some(id) => Poll::Ready(Ok(id)),
            None => {
                inner.open_uni_wanted = true;
                inner.open_waker = Some(cx.waker().clone());
                let w = inner.wake.clone();
                drop(inner);
                wake(w);
                Poll::Pending
            }
        }
    }
}

impl quic::Connection<Bytes> for BridgeConnection {
    type RecvStream = BridgeRecv;
    type OpenStreams = BridgeOpener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        let mut inner = self.bridge.lock();
        if let Some(id) = inner.incoming_uni.pop_front() {
            drop(inner);
            self.bridge.accepted(id, false);
            return Poll::Ready(Ok(BridgeRecv {
                bridge: self.bridge.clone(),
                id,
            }));
        }
        if let Some(closed) = &inner.closed {
            return Poll::Ready(Err(closed.clone()));
        }
        inner.accept_uni_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let mut inner = self.bridge.lock();
        if let Some(id) = inner.incoming_bidi.pop_front() {
            drop(inner);
            self.bridge.accepted(id, true);
            return Poll::Ready(Ok(BridgeBidi {
                send: BridgeSend {
                    bridge: self.bridge.clone(),
                    id,
                },
                recv: BridgeRecv {
                    bridge: self.bridge.clone(),
                    id,
                },
            }));
        }
        if let Some(closed) = &inner.closed {
            return Poll::Ready(Err(closed.clone()));
        }
        inner.accept_bidi_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn opener(&self) -> Self::OpenStreams {
        BridgeOpener {
            bridge: self.bridge.clone(),
        }
    }
}

fn close(bridge: &Bridge, code: h3::error::Code, reason: &[u8]) {
    let mut inner = bridge.lock();
    // The first close wins, as with quinn: h3 closes with the error's code, then its dropped
    // connection closes again with H3_NO_ERROR before the core has applied the first.
    if inner.detached || inner.closed.is_some() || inner.close.is_some() {
        return;
    }
    inner.close = Some((code.value(), Bytes::copy_from_slice(reason)));
    let w = inner.wake.clone();
    drop(inner);
    wake(w);
}

/// The connection opens streams as its opener does (h3 uses both).
impl quic::OpenStreams<Bytes> for BridgeConnection {
    type BidiStream = BridgeBidi;
    type SendStream = BridgeSend;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::poll_open_bidi(&mut self.opener_handle(), cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.opener_handle().poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.opener_handle().close(code, reason);
    }
}

impl BridgeConnection {
    fn opener_handle(&self) -> BridgeOpener {
        BridgeOpener {
            bridge: self.bridge.clone(),
        }
    }
}

impl quic::OpenStreams<Bytes> for BridgeOpener {
    type BidiStream = BridgeBidi;
    type SendStream = BridgeSend;

    fn poll_open_bidi(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        Poll::Ready(Err(StreamErrorIncoming::Unknown(
            "a server opens no bidirectional streams".into(),
        )))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.bridge.poll_open_uni(cx).map_ok(|id| BridgeSend {
            bridge: self.bridge.clone(),
            id,
        })
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        close(&self.bridge, code, reason);
    }
}

impl quic::RecvStream for BridgeRecv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        let (poll, wake_core) = self.bridge.with_stream(self.id, |s, closed| {
            let Some(r) = &mut s.recv else {
                return (Poll::Ready(Ok(None)), false);
            };
            if let Some(chunk) = r.buf.pop_front() {
                let was_full = r.len >= STREAM_BUFFER;
                r.len -= chunk.len();
                // Room again: the core reads more from quinn.
                return (Poll::Ready(Ok(Some(chunk))), was_full || r.len == 0);
            }
            if let Some(code) = r.reset {
                return (
                    Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
                        error_code: code,
                    })),
                    false,
                );
            }
            if r.fin {
                return (Poll::Ready(Ok(None)), true);
            }
            if let Some(closed) = closed {
                return (Poll::Ready(Err(connection_gone(closed))), false);
            }
            r.waker = Some(cx.waker().clone());
            (Poll::Pending, false)
        });
        let (poll, wake_now) = poll;
        if wake_now {
            wake(wake_core);
        }
        poll
    }

    fn stop_sending(&mut self, error_code: u64) {
        let ((), w) = self.bridge.with_stream(self.id, |s, _| {
            if let Some(r) = &mut s.recv {
                if !r.fin && r.reset.is_none() && !r.stopped {
                    r.stop = Some(error_code);
                }
            }
        });
        wake(w);
    }

    fn recv_id(&self) -> quic::StreamId {
        h3_id(self.id)
    }
}

impl Drop for BridgeRecv {
    fn drop(&mut self) {
        let ((), w) = self.bridge.with_stream(self.id, |s, _| {
            if let Some(r) = &mut s.recv {
                r.held = false;
                // Not read to its end: the peer need not send the rest.
                if !r.fin && r.reset.is_none() && !r.stopped && r.stop.is_none() {
                    r.stop = Some(H3_NO_ERROR);
                }
            }
        });
        wake(w);
    }
}

impl quic::SendStream<Bytes> for BridgeSend {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        let (poll, _) = self.bridge.with_stream(self.id, |s, closed| {
            let Some(w) = &mut s.send else {
                return Poll::Ready(Ok(()));
            };
            if let Some(code) = w.stopped {
                return Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
                    error_code: code,
                }));
            }
            if let Some(closed) = closed {
                return Poll::Ready(Err(connection_gone(closed)));
            }
            if w.queue.len() < STREAM_BUFFER {
                return Poll::Ready(Ok(()));
            }
            w.waker = Some(cx.waker().clone());
            Poll::Pending
        });
        poll
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        let mut data: WriteBuf<Bytes> = data.into();
        let mut mismatch = false;
        let (result, w) = self.bridge.with_stream(self.id, |s, closed| {
            let Some(w) = &mut s.send else {
                return Ok(());
            };
            if let Some(code) = w.stopped {
                return Err(StreamErrorIncoming::StreamTerminated { error_code: code });
            }
            if let Some(closed) = closed {
                return Err(connection_gone(closed));
            }
            w.wrote |= data.has_remaining();
            while data.has_remaining() {
                let n = data.chunk().len();
                let mut chunk = data.copy_to_bytes(n);
                if !w.replayed.is_empty() {
                    // Sent before the move: check it is the same, do not send it again.
                    let k = w.replayed.len().min(chunk.len());
                    if w.replayed[..k] != chunk[..k] {
                        mismatch = true;
                        w.replayed.clear();
                    } else {
                        w.replayed.drain(..k);
                        chunk.advance(k);
                        if chunk.is_empty() {
                            continue;
                        }
                    }
                }
                record(&mut w.record, &chunk);
                w.queue.push(chunk);
            }
            Ok(())
        });
        if mismatch {
            warn!(
                stream = self.id,
                "HTTP/3 wrote other bytes on a stream than before the move (the workers' HTTP/3 \
                 settings differ?): closing the connection"
            );
            self.bridge.lock().replay_mismatch = true;
        }
        wake(w);
        result
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        let (poll, w) = self.bridge.with_stream(self.id, |s, closed| {
            let Some(w) = &mut s.send else {
                return Poll::Ready(Ok(()));
            };
            if w.finished {
                return Poll::Ready(Ok(()));
            }
            if let Some(code) = w.stopped {
                return Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
                    error_code: code,
                }));
            }
            if let Some(closed) = closed {
                return Poll::Ready(Err(connection_gone(closed)));
            }
            w.finish = true;
            w.waker = Some(cx.waker().clone());
            Poll::Pending
        });
        wake(w);
        poll
    }

    fn reset(&mut self, reset_code: u64) {
        let ((), w) = self.bridge.with_stream(self.id, |s, _| {
            if let Some(w) = &mut s.send {
                if !w.finished && w.stopped.is_none() {
                    w.reset = Some(reset_code);
                }
            }
        });
        wake(w);
    }

    fn send_id(&self) -> quic::StreamId {
        h3_id(self.id)
    }
}

impl Drop for BridgeSend {
    fn drop(&mut self) {
        let ((), w) = self.bridge.with_stream(self.id, |s, _| {
            if let Some(w) = &mut s.send {
                w.held = false;
                if !w.finish && !w.finished && w.reset.is_none() && w.stopped.is_none() {
                    if w.wrote {
                        // Dropped after h3 wrote on it: finished after what was written, as
                        // quinn's streams do and h3 expects (its own 431 answer to oversized
                        // request headers is written, then the stream dropped). A response cut
                        // short is reset explicitly (`stop_stream`).
                        w.finish = true;
                    } else {
                        // Dropped with nothing written: the response is cut short.
                        w.reset = Some(H3_REQUEST_CANCELLED);
                    }
                }
            }
        });
        wake(w);
    }
}

impl quic::SendStream<Bytes> for BridgeBidi {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> quic::StreamId {
        self.send.send_id()
    }
}

impl quic::RecvStream for BridgeBidi {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> quic::StreamId {
        self.recv.recv_id()
    }
}

impl quic::BidiStream<Bytes> for BridgeBidi {
    type SendStream = BridgeSend;
    type RecvStream = BridgeRecv;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_round_trips_and_refuses_garbage() {
        let c = Captured {
            ours: vec![(3, vec![0, 4, 1, 2]), (7, vec![2]), (11, vec![3])],
            peers: vec![(2, vec![0, 4, 0]), (6, vec![2])],
        };
        let mut out = Vec::new();
        c.encode(&mut out);
        out.extend(b"rest");
        let (back, rest) = Captured::decode(&out).unwrap();
        assert_eq!(back, c);
        assert_eq!(rest, b"rest");
        for cut in 0..out.len() - 4 {
            assert!(Captured::decode(&out[..cut]).is_err(), "cut at {cut}");
        }
    }
}
