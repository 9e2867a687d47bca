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
use crate::service::{AppSession, RestoreError, Service};
use quinn_proto::{Connection, Dir, StreamId, VarInt};
use std::collections::{BTreeMap, VecDeque};

pub const ALPN: &[u8] = b"baton-demo/1";
pub const KIND_REQUEST: u8 = 0x01;
pub const KIND_STREAM: u8 = 0x02;
/// Application error code for a stream whose kind byte is unknown.
pub const ERROR_UNKNOWN_KIND: u32 = 1;
/// Largest request body buffered.
pub const MAX_REQUEST: usize = 1 << 20;

pub struct DemoService;

impl Service for DemoService {
    fn alpn(&self) -> &'static [u8] {
        ALPN
    }

    fn new_session(&self) -> Box<dyn AppSession> {
        Box::new(DemoSession::default())
    }

    fn restore(&self, state: &[u8]) -> Result<Box<dyn AppSession>, RestoreError> {
        Ok(Box::new(DemoSession::decode(state)?))
    }
}

#[derive(Default, Debug, PartialEq)]
pub struct DemoSession {
    served: u64,
    streams: BTreeMap<u64, StreamState>,
}

#[derive(Default, Debug, PartialEq)]
struct StreamState {
    kind: Option<u8>,
    inbox: Vec<u8>,
    outbox: VecDeque<u8>,
    fin_received: bool,
    fin_sent: bool,
}

impl DemoSession {
    pub fn served(&self) -> u64 {
        self.served
    }

    fn decode(mut b: &[u8]) -> Result<Self, RestoreError> {
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
        let served = u64(&mut b)?;
        let n = u64(&mut b)?;
        let mut streams = BTreeMap::new();
        for _ in 0..n {
            let id = u64(&mut b)?;
            let kind = take(&mut b, 1)?[0];
            let flags = take(&mut b, 1)?[0];
            let len = u64(&mut b)? as usize;
            let inbox = take(&mut b, len)?.to_vec();
            let len = u64(&mut b)? as usize;
            let outbox = take(&mut b, len)?.iter().copied().collect();
            streams.insert(
                id,
                StreamState {
                    kind: (kind != 0).then_some(kind),
                    inbox,
                    outbox,
                    fin_received: flags & 1 != 0,
                    fin_sent: flags & 2 != 0,
                },
            );
        }
        if !b.is_empty() {
            return Err(RestoreError("trailing bytes"));
        }
        Ok(Self { served, streams })
    }
}

impl AppSession for DemoSession {
    fn drive(&mut self, conn: &mut Connection, frozen: bool) {
        while let Some(id) = conn.streams().accept(Dir::Bi) {
            self.streams
                .entry(VarInt::from(id).into_inner())
                .or_default();
        }
        let mut finished = Vec::new();
        for (&raw, s) in self.streams.iter_mut() {
            let id = StreamId::from(VarInt::from_u64(raw).expect("stream ids are varints"));
            if !s.fin_received {
                if let Ok(mut chunks) = conn.recv_stream(id).read(true) {
                    loop {
                        match chunks.next(usize::MAX) {
                            Ok(Some(chunk)) => {
                                let mut data = &chunk.bytes[..];
                                if s.kind.is_none() && !data.is_empty() {
                                    s.kind = Some(data[0]);
                                    data = &data[1..];
                                }
                                match s.kind {
                                    Some(KIND_STREAM) => s.outbox.extend(data),
                                    _ => s.inbox.extend_from_slice(data),
                                }
                            }
                            Ok(None) => {
                                s.fin_received = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let _ = chunks.finalize();
                }
                if s.fin_received && s.kind == Some(KIND_REQUEST) {
                    self.served += 1;
                    s.outbox.extend(self.served.to_be_bytes());
                    s.outbox.extend(s.inbox.drain(..));
                }
            }
            let bad_kind = matches!(s.kind, Some(k) if k != KIND_REQUEST && k != KIND_STREAM);
            if bad_kind || s.inbox.len() > MAX_REQUEST {
                let _ = conn
                    .recv_stream(id)
                    .stop(VarInt::from_u32(ERROR_UNKNOWN_KIND));
                let _ = conn
                    .send_stream(id)
                    .reset(VarInt::from_u32(ERROR_UNKNOWN_KIND));
                finished.push(raw);
                continue;
            }
            if frozen || s.fin_sent {
                continue;
            }
            while !s.outbox.is_empty() {
                let (a, _) = s.outbox.as_slices();
                match conn.send_stream(id).write(a) {
                    Ok(n) if n > 0 => {
                        s.outbox.drain(..n);
                    }
                    _ => break,
                }
            }
            if s.outbox.is_empty() && s.fin_received && s.kind.is_some() {
                let _ = conn.send_stream(id).finish();
                s.fin_sent = true;
                finished.push(raw);
            }
        }
        for raw in finished {
            self.streams.remove(&raw);
        }
    }

    fn capture(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(self.served.to_be_bytes());
        out.extend((self.streams.len() as u64).to_be_bytes());
        for (&id, s) in &self.streams {
            out.extend(id.to_be_bytes());
            out.push(s.kind.unwrap_or(0));
            out.push(s.fin_received as u8 | (s.fin_sent as u8) << 1);
            out.extend((s.inbox.len() as u64).to_be_bytes());
            out.extend(&s.inbox);
            out.extend((s.outbox.len() as u64).to_be_bytes());
            out.extend(s.outbox.iter());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_round_trips() {
        let mut s = DemoSession {
            served: 7,
            ..Default::default()
        };
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
                inbox: vec![9; 10],
                ..Default::default()
            },
        );
        let bytes = s.capture();
        assert_eq!(DemoSession::decode(&bytes).unwrap(), s);
        assert!(DemoSession::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
