//! The demo service, ALPN `baton-demo/1` (wire protocol in `docs/DEMO-PROTOCOL.md`).
//!
//! Every client-opened bidirectional stream starts with a kind byte:
//! - `0x01` request: the body follows until FIN; the answer is the request's 8-byte big-endian
//!   sequence number within the connection (1, 2, ...), then the body, then FIN.
//! - `0x02` stream: long-lived echo; every byte after the kind byte comes back as it arrives; FIN
//!   is answered with FIN once everything is echoed.
//!
//! The per-connection session (request counter, every stream's unanswered bytes) is what moves
//! with a migrated connection.
use crate::limits::{BufferBudget, Limits};
use crate::service::{AppSession, ChunkQueue, Drive, RestoreError, Service, read_within};
use bytes::Bytes;
use quinn_proto::{Connection, Dir, StreamId, VarInt};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The wire constants, shared with the client (`baton_load`): one definition in lb-common.
pub use lb_common::demo::{ALPN, KIND_REQUEST, KIND_STREAM, MAX_REQUEST};
/// Application error code for a stream refused: unknown kind byte, no kind byte, or a request
/// body over [`MAX_REQUEST`].
pub const ERROR_REFUSED: u32 = 1;

/// The demo service; its sessions hold at most what `limits` allow and share one worker budget.
pub struct DemoService {
    limits: Limits,
    budget: Arc<BufferBudget>,
}

impl DemoService {
    pub fn new(limits: Limits, budget: Arc<BufferBudget>) -> Self {
        Self { limits, budget }
    }
}

impl Default for DemoService {
    /// The default limits, with a budget of its own.
    fn default() -> Self {
        let limits = Limits::default();
        let budget = BufferBudget::new(limits.memory_budget);
        Self::new(limits, budget)
    }
}

impl Service for DemoService {
    fn alpn(&self) -> &'static [u8] {
        ALPN
    }

    fn new_session(&self) -> Box<dyn AppSession> {
        Box::new(DemoSession::new(&self.limits, self.budget.clone()))
    }

    fn restore(&self, state: &[u8]) -> Result<Box<dyn AppSession>, RestoreError> {
        Ok(Box::new(DemoSession::decode(
            state,
            &self.limits,
            self.budget.clone(),
        )?))
    }
}

#[derive(Debug)]
pub struct DemoSession {
    served: u64,
    streams: BTreeMap<u64, StreamState>,
    /// Bytes held in every stream's inbox and outbox (taken from `budget`).
    held: usize,
    stream_buffer: usize,
    connection_buffer: usize,
    budget: Arc<BufferBudget>,
}

#[derive(Default, Debug, PartialEq)]
struct StreamState {
    kind: Option<u8>,
    /// A request's body so far
    inbox: ChunkQueue,
    /// Bytes to write: an echo stream's, or a request's answer
    outbox: ChunkQueue,
    fin_received: bool,
    fin_sent: bool,
}

impl StreamState {
    fn held(&self) -> usize {
        self.inbox.len() + self.outbox.len()
    }
}

impl PartialEq for DemoSession {
    fn eq(&self, other: &Self) -> bool {
        (self.served, &self.streams, self.held) == (other.served, &other.streams, other.held)
    }
}

impl Drop for DemoSession {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

impl DemoSession {
    fn new(limits: &Limits, budget: Arc<BufferBudget>) -> Self {
        Self {
            served: 0,
            streams: BTreeMap::new(),
            held: 0,
            stream_buffer: limits.stream_buffer,
            connection_buffer: limits.connection_buffer,
            budget,
        }
    }

    pub fn served(&self) -> u64 {
        self.served
    }

    /// Bytes the session holds (read, not yet written).
    pub fn held(&self) -> usize {
        self.held
    }

    fn take(&mut self, n: usize) {
        self.held += n;
        self.budget.take(n);
    }

    fn give_back(&mut self, n: usize) {
        self.held -= n;
        self.budget.give_back(n);
    }

    fn decode(
        mut b: &[u8],
        limits: &Limits,
        budget: Arc<BufferBudget>,
    ) -> Result<Self, RestoreError> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], RestoreError> {
            if b.len() < n {
                return Err(RestoreError("truncated"));
            }
            let (x, rest) = b.split_at(n);
            *b = rest;
            Ok(x)
        }
        fn u64(b: &mut &[u8]) -> Result<u64, RestoreError> {
            Ok(u64::from_be_bytes(take(b, 8)?.try_into().unwrap()))
        }
        fn len(b: &mut &[u8]) -> Result<usize, RestoreError> {
            usize::try_from(u64(b)?).map_err(|_| RestoreError("length beyond memory"))
        }
        let mut session = Self::new(limits, budget);
        session.served = u64(&mut b)?;
        let n = u64(&mut b)?;
        for _ in 0..n {
            let id = u64(&mut b)?;
            let kind = take(&mut b, 1)?[0];
            let flags = take(&mut b, 1)?[0];
            let n = len(&mut b)?;
            let inbox = ChunkQueue::from(take(&mut b, n)?.to_vec());
            let n = len(&mut b)?;
            let outbox = ChunkQueue::from(take(&mut b, n)?.to_vec());
            let state = StreamState {
                kind: (kind != 0).then_some(kind),
                inbox,
                outbox,
                fin_received: flags & 1 != 0,
                fin_sent: flags & 2 != 0,
            };
            // The source held these bytes within its limits; they count here from now on.
            session.take(state.held());
            session.streams.insert(id, state);
        }
        if !b.is_empty() {
            return Err(RestoreError("trailing bytes"));
        }
        Ok(session)
    }
}

/// What happened to a stream in one drive.
enum Outcome {
    Open,
    /// Answered completely (FIN sent): forget it.
    Done,
    /// Reset by the client: reset our side too (so quinn can close the stream and give the
    /// client its stream credit back), then forget it.
    Abandoned(VarInt),
    /// Refused with [`ERROR_REFUSED`].
    Refused,
}

impl AppSession for DemoSession {
    fn drive(&mut self, conn: &mut Connection, frozen: bool) -> Drive {
        while let Some(id) = conn.streams().accept(Dir::Bi) {
            self.streams
                .entry(VarInt::from(id).into_inner())
                .or_default();
        }
        let mut report = Drive::default();
        // The oldest request still arriving may always read its body (up to MAX_REQUEST), past
        // the connection's buffer: requests are answered only whole, so otherwise a client with
        // many partial requests in flight would wait forever for one of them to be answered.
        let oldest_request = self
            .streams
            .iter()
            .find(|(_, s)| !s.fin_received && s.kind != Some(KIND_STREAM))
            .map(|(&raw, _)| raw);
        let raws: Vec<u64> = self.streams.keys().copied().collect();
        for raw in raws {
            let id = StreamId::from(VarInt::from_u64(raw).expect("stream ids are varints"));
            let outcome = self.drive_stream(
                conn,
                raw,
                id,
                frozen,
                Some(raw) == oldest_request,
                &mut report,
            );
            match outcome {
                Outcome::Open => {}
                Outcome::Done | Outcome::Refused | Outcome::Abandoned(_) => {
                    if let Outcome::Refused = outcome {
                        let code = VarInt::from_u32(ERROR_REFUSED);
                        let _ = conn.recv_stream(id).stop(code);
                        let _ = conn.send_stream(id).reset(code);
                    }
                    if let Outcome::Abandoned(code) = outcome {
                        let _ = conn.send_stream(id).reset(code);
                    }
                    if let Some(s) = self.streams.remove(&raw) {
                        self.give_back(s.held());
                    }
                }
            }
        }
        report
    }

    fn capture(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.held + 26 * self.streams.len());
        out.extend(self.served.to_be_bytes());
        out.extend((self.streams.len() as u64).to_be_bytes());
        for (&id, s) in &self.streams {
            out.extend(id.to_be_bytes());
            out.push(s.kind.unwrap_or(0));
            out.push(s.fin_received as u8 | (s.fin_sent as u8) << 1);
            out.extend((s.inbox.len() as u64).to_be_bytes());
            s.inbox.copy_to(&mut out);
            out.extend((s.outbox.len() as u64).to_be_bytes());
            s.outbox.copy_to(&mut out);
        }
        out
    }
}

impl DemoSession {
    /// Reads what fits, answers a complete request, writes what the stream takes.
    fn drive_stream(
        &mut self,
        conn: &mut Connection,
        raw: u64,
        id: StreamId,
        frozen: bool,
        oldest_request: bool,
        report: &mut Drive,
    ) -> Outcome {
        let s = &self.streams[&raw];
        if !s.fin_received {
            if s.kind.is_none() {
                // The kind byte alone first: it decides how much more may be read.
                let mut kind = None;
                let read = read_within(conn, id, 1, |b| kind = b.first().copied());
                if let Some(code) = read.reset {
                    return Outcome::Abandoned(code);
                }
                let s = self.streams.get_mut(&raw).unwrap();
                s.kind = kind;
                match kind {
                    None if read.fin => return Outcome::Refused,
                    None => return Outcome::Open,
                    Some(KIND_REQUEST | KIND_STREAM) => {}
                    Some(_) => return Outcome::Refused,
                }
            }
            let s = &self.streams[&raw];
            let (stream_room, connection_room) = match s.kind {
                // One byte more than a request may have, so an oversized body is seen.
                Some(KIND_REQUEST) => (
                    (MAX_REQUEST + 1).saturating_sub(s.inbox.len()),
                    if oldest_request {
                        usize::MAX
                    } else {
                        self.connection_buffer.saturating_sub(self.held)
                    },
                ),
                _ => (
                    self.stream_buffer.saturating_sub(s.outbox.len()),
                    self.connection_buffer.saturating_sub(self.held),
                ),
            };
            let budget_room = self.budget.available();
            let room = stream_room.min(connection_room).min(budget_room);
            if room == 0 && budget_room == 0 && stream_room.min(connection_room) > 0 {
                self.budget.note_exhausted();
                report.starved = true;
            }
            let s = self.streams.get_mut(&raw).unwrap();
            let echo = s.kind == Some(KIND_STREAM);
            let read = read_within(conn, id, room, |b: Bytes| {
                if echo {
                    s.outbox.push(b)
                } else {
                    s.inbox.push(b)
                }
            });
            if let Some(code) = read.reset {
                // The client gave up on the stream: nothing more to answer.
                self.take(read.bytes);
                return Outcome::Abandoned(code);
            }
            s.fin_received = read.fin;
            let oversized = !echo && s.inbox.len() > MAX_REQUEST;
            self.take(read.bytes);
            if oversized {
                return Outcome::Refused;
            }
            let s = self.streams.get_mut(&raw).unwrap();
            if s.fin_received && s.kind == Some(KIND_REQUEST) {
                self.served += 1;
                let mut body = std::mem::take(&mut s.inbox);
                s.outbox
                    .push(Bytes::copy_from_slice(&self.served.to_be_bytes()));
                s.outbox.append(&mut body);
                // The 8-byte header is the only byte an answer adds.
                self.take(8);
            }
        }
        let s = self.streams.get_mut(&raw).unwrap();
        if frozen || s.fin_sent {
            return Outcome::Open;
        }
        let written = s.outbox.write_to(conn, id);
        let done = s.outbox.is_empty() && s.fin_received && s.kind.is_some();
        if done {
            let _ = conn.send_stream(id).finish();
            s.fin_sent = true;
        }
        self.give_back(written);
        if done { Outcome::Done } else { Outcome::Open }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_round_trips() {
        let limits = Limits::default();
        let budget = BufferBudget::new(1 << 20);
        let mut s = DemoSession::new(&limits, budget.clone());
        s.served = 7;
        s.streams.insert(
            4,
            StreamState {
                kind: Some(KIND_STREAM),
                outbox: vec![1, 2, 3].into(),
                fin_received: true,
                ..Default::default()
            },
        );
        s.streams.insert(
            8,
            StreamState {
                kind: Some(KIND_REQUEST),
                inbox: vec![9; 10].into(),
                ..Default::default()
            },
        );
        s.held = 13;
        budget.take(13);
        let bytes = s.capture();
        let restored = DemoSession::decode(&bytes, &limits, budget.clone()).unwrap();
        assert_eq!(restored, s);
        assert_eq!(budget.used(), 26, "the restored session counts its bytes");
        drop(restored);
        drop(s);
        assert_eq!(
            budget.used(),
            0,
            "sessions give their bytes back when dropped"
        );
        assert!(DemoSession::decode(&bytes[..bytes.len() - 1], &limits, budget).is_err());
    }
}
