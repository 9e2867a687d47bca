//! What an application running on a worker implements, so its connections can move, and the
//! bounded way to read and write its streams ([`read_within`], [`ChunkQueue`]).
use bytes::Bytes;
use quinn_proto::{Connection, ReadError, StreamId, VarInt};
use std::collections::VecDeque;

/// An application protocol served by the worker (one ALPN).
pub trait Service: Send + Sync + 'static {
    /// The ALPN protocol id clients ask for.
    fn alpn(&self) -> &'static [u8];
    /// State for a new connection.
    fn new_session(&self) -> Box<dyn AppSession>;
    /// State for an imported connection, from what [`AppSession::capture`] produced on the source.
    fn restore(&self, state: &[u8]) -> Result<Box<dyn AppSession>, RestoreError>;
}

/// One connection's application state, including the stream data it has read but not yet
/// answered: all of it moves with the connection.
///
/// A session holds only a bounded amount of such data (the worker's [`crate::limits::Limits`]):
/// it reads a stream only as far as it has room ([`read_within`]), so what it has no room for
/// stays in quinn's receive buffer, the stream's flow-control window stops opening and the client
/// slows down. Reading everything that arrives would make the worker's memory the client's to fill.
pub trait AppSession: Send {
    /// Accept, read and write the connection's streams. While `frozen`, take no new work: read
    /// (so receive buffers drain into the session) but do not write.
    fn drive(&mut self, conn: &mut Connection, frozen: bool) -> Drive;
    /// Serializes the whole state (called at the export, after a drive with `frozen` set and
    /// [`movable`](Self::movable) said yes).
    fn capture(&self) -> Vec<u8>;
    /// Whether the state can be captured now. A service whose work finishes on its own (an HTTP
    /// request in flight) says no until it has: the export waits, up to the migration's bound,
    /// and is rolled back if it never can ([`crate::core::ExportFailure::Busy`]).
    fn movable(&self) -> Result<(), &'static str> {
        Ok(())
    }
    /// Called once the connection has its place in the worker, with what wakes the worker to
    /// drive it again: a session with work outside [`drive`](Self::drive) (tasks of its own)
    /// calls it when that work has something for the connection.
    fn attach(&mut self, _wake: WakeCore) {}
}

/// Wakes the worker to drive one connection at its next turn.
pub type WakeCore = std::sync::Arc<dyn Fn() + Send + Sync>;

/// What a [`AppSession::drive`] left undone.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drive {
    /// A stream had data to read but the worker's buffer budget had no room: drive the session
    /// again once other sessions gave some back (no packet of its own may come to wake it, as
    /// its client waits for flow-control credit).
    pub starved: bool,
}

/// The captured application state does not decode.
#[derive(Debug, thiserror::Error)]
#[error("application state does not decode: {0}")]
pub struct RestoreError(pub &'static str);

/// What [`read_within`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub bytes: usize,
    /// The stream's end was reached (everything before it was read).
    pub fin: bool,
    /// The peer reset the stream with this code.
    pub reset: Option<VarInt>,
}

/// Reads stream `id` in order, at most `room` bytes, handing each chunk to `sink` (no copy).
/// The rest stays in quinn's buffer; the stream's window reopens only by what was read.
pub fn read_within(
    conn: &mut Connection,
    id: StreamId,
    room: usize,
    mut sink: impl FnMut(Bytes),
) -> Read {
    let mut read = Read::default();
    if room == 0 {
        return read;
    }
    let mut stream = conn.recv_stream(id);
    let Ok(mut chunks) = stream.read(true) else {
        return read;
    };
    while read.bytes < room {
        match chunks.next(room - read.bytes) {
            Ok(Some(chunk)) => {
                read.bytes += chunk.bytes.len();
                sink(chunk.bytes);
            }
            Ok(None) => {
                read.fin = true;
                break;
            }
            Err(ReadError::Blocked) => break,
            Err(ReadError::Reset(code)) => {
                read.reset = Some(code);
                break;
            }
        }
    }
    // Flow-control credit for what was read goes out with the next packet.
    let _ = chunks.finalize();
    read
}

/// Bytes waiting to be written to a stream, kept as the chunks they arrived in (no copy in, no
/// copy out: [`write_to`](Self::write_to) hands them to quinn as they are).
#[derive(Debug, Default, Clone)]
pub struct ChunkQueue {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl ChunkQueue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Moves every chunk of `other` to the end of this queue.
    pub fn append(&mut self, other: &mut ChunkQueue) {
        self.len += std::mem::take(&mut other.len);
        self.chunks.append(&mut other.chunks);
    }

    /// Writes to stream `id` as much as it takes now; returns how many bytes it took.
    pub fn write_to(&mut self, conn: &mut Connection, id: StreamId) -> usize {
        if self.chunks.is_empty() {
            return 0;
        }
        let written = match conn
            .send_stream(id)
            .write_chunks(self.chunks.make_contiguous())
        {
            Ok(w) => w,
            Err(_) => return 0,
        };
        // quinn emptied the chunks it took whole and split the one it took part of.
        self.chunks.drain(..written.chunks);
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
        }
        self.len -= written.bytes;
        written.bytes
    }

    /// Appends the queued bytes to `out` (for a capture).
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
    }
}

impl PartialEq for ChunkQueue {
    /// Same bytes, however they are split into chunks.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .chunks
                .iter()
                .flat_map(|c| c.iter())
                .eq(other.chunks.iter().flat_map(|c| c.iter()))
    }
}

impl From<Vec<u8>> for ChunkQueue {
    fn from(v: Vec<u8>) -> Self {
        let mut q = Self::default();
        q.push(Bytes::from(v));
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_queue_compares_bytes_not_chunks() {
        let mut a = ChunkQueue::default();
        a.push(Bytes::from_static(b"ab"));
        a.push(Bytes::new());
        a.push(Bytes::from_static(b"c"));
        assert_eq!(a.len(), 3);
        assert_eq!(a, ChunkQueue::from(b"abc".to_vec()));
        let mut b = ChunkQueue::from(b"x".to_vec());
        b.append(&mut a);
        assert_eq!((b.len(), a.len()), (4, 0));
        let mut out = Vec::new();
        b.copy_to(&mut out);
        assert_eq!(out, b"xabc");
    }
}
