//! Snapshot <-> bytes: bincode, then optional gzip/zstd, then chunk framing.
//!
//! Every stage is a streaming `Write`/`Read` adapter, so a large snapshot is never held twice
//! in memory: bincode writes into the compressor, which writes into the chunker, which writes
//! into the caller's sink (and the reverse when decoding). Wire layout: see
//! docs/MIGRATION-PIPELINE.md.
use bincode::Options;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::Mutex;
use zstd::zstd_safe::{CCtx, CParameter, DCtx};

use crate::protocol::{Corruption, MigrationError};
use crate::snapshot::{ConnectionStateSnapshot, SNAPSHOT_FORMAT_VERSION};

pub const STREAM_MAGIC: [u8; 4] = *b"BTNS";
pub const STREAM_VERSION: u8 = 1;
/// magic(4) version(1) compression(1) snapshot format(2) chunk size(4)
pub const STREAM_HEADER_LEN: usize = 12;
/// seq(4) flags(1) len(4)
pub const CHUNK_HEADER_LEN: usize = 9;
const FLAG_FINAL: u8 = 0x01;
pub const MIN_CHUNK_SIZE: u32 = 16;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// The encoder cuts the serialized stream into independent zstd frames of at most this many
/// bytes: each is compressed in one shot from the caller's buffer (no internal copy, no
/// wrapped-window slow path), and encoder and decoder memory stay bounded by it.
const ZSTD_SEGMENT: usize = 1 << 20;
/// A frame of at most `ZSTD_SEGMENT` bytes never needs a larger window; refusing larger ones
/// bounds what a hostile frame can make the decoder allocate.
const ZSTD_WINDOW_LOG_MAX: u32 = 20;
const MAX_ZSTD_LEVEL: i32 = 19;
/// Migration latency is the point. On mixed stream data (benches/benches/migration.rs) levels -3
/// to -7 give the same seal + 10 GbE transfer + open time, and -3 compresses best of them; level 1
/// saves 4% of the bytes but makes the 10 MiB round trip about 1.6x slower.
pub const DEFAULT_ZSTD_LEVEL: i32 = -3;
const READ_BUFFER: usize = 64 * 1024;
/// zstd contexts kept for reuse: creating one costs more than compressing a small snapshot.
const ZSTD_POOL: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    /// flate2 level 0..=9.
    Gzip {
        level: u32,
    },
    /// zstd level -7..=19 (negative levels trade ratio for speed).
    Zstd {
        level: i32,
    },
}

impl Compression {
    fn wire_id(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Gzip { .. } => 1,
            Self::Zstd { .. } => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip { .. } => "gzip",
            Self::Zstd { .. } => "zstd",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SerializationConfig {
    pub compression: Compression,
    /// Payload bytes per chunk (every chunk but the last is exactly this long).
    pub chunk_size: u32,
    /// Largest serialized (uncompressed) and largest encoded snapshot accepted, in bytes.
    pub max_state_size: u64,
}

impl Default for SerializationConfig {
    fn default() -> Self {
        Self {
            compression: Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
            chunk_size: 64 * 1024,
            max_state_size: 64 << 20,
        }
    }
}

/// What [`SerializationService::encode`] produced, for size metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeStats {
    /// bincode output before compression.
    pub serialized_len: u64,
    /// Bytes written to the sink (headers, framing and compressed payload).
    pub encoded_len: u64,
    pub chunks: u32,
}

pub struct SerializationService {
    config: SerializationConfig,
    cctx: Mutex<Vec<CCtx<'static>>>,
    dctx: Mutex<Vec<DCtx<'static>>>,
}

impl Clone for SerializationService {
    fn clone(&self) -> Self {
        Self::with_config(self.config)
    }
}

impl std::fmt::Debug for SerializationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerializationService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Takes a context from `pool` (or makes one) and puts it back after `f`.
fn with_pooled<T, R>(
    pool: &Mutex<Vec<T>>,
    create: impl FnOnce() -> T,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let taken = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let mut ctx = taken.unwrap_or_else(create);
    let result = f(&mut ctx);
    let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < ZSTD_POOL {
        pool.push(ctx);
    }
    result
}

impl SerializationService {
    pub fn new(config: SerializationConfig) -> Result<Self, MigrationError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&config.chunk_size) {
            return Err(MigrationError::Config(format!(
                "chunk_size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                config.chunk_size
            )));
        }
        if config.max_state_size == 0 {
            return Err(MigrationError::Config(
                "max_state_size must be positive".into(),
            ));
        }
        match config.compression {
            Compression::Gzip { level } if level > 9 => {
                return Err(MigrationError::Config(format!(
                    "gzip level {level} is outside 0..=9"
                )));
            }
            Compression::Zstd { level } if !(-7..=MAX_ZSTD_LEVEL).contains(&level) => {
                return Err(MigrationError::Config(format!(
                    "zstd level {level} is outside -7..={MAX_ZSTD_LEVEL}"
                )));
            }
            _ => {}
        }
        Ok(Self::with_config(config))
    }

    fn with_config(config: SerializationConfig) -> Self {
        Self {
            config,
            cctx: Mutex::new(Vec::new()),
            dctx: Mutex::new(Vec::new()),
        }
    }

    pub fn config(&self) -> &SerializationConfig {
        &self.config
    }

    fn bincode(&self) -> impl Options {
        bincode::DefaultOptions::new().with_limit(self.config.max_state_size)
    }

    /// Streams `snapshot` into `out`. Fails with `SnapshotTooLarge` before writing anything if the
    /// serialized form exceeds `max_state_size`.
    pub fn encode<W: Write>(
        &self,
        snapshot: &ConnectionStateSnapshot,
        out: &mut W,
    ) -> Result<EncodeStats, MigrationError> {
        let limit = self.config.max_state_size;
        let serialized_len = match self.bincode().serialized_size(snapshot) {
            Ok(n) => n,
            Err(_) => {
                return Err(MigrationError::SnapshotTooLarge {
                    size: snapshot.payload_len() as u64,
                    limit,
                });
            }
        };
        let mut header = [0u8; STREAM_HEADER_LEN];
        header[..4].copy_from_slice(&STREAM_MAGIC);
        header[4] = STREAM_VERSION;
        header[5] = self.config.compression.wire_id();
        header[6..8].copy_from_slice(&SNAPSHOT_FORMAT_VERSION.to_be_bytes());
        header[8..12].copy_from_slice(&self.config.chunk_size.to_be_bytes());
        out.write_all(&header).map_err(encode_error)?;

        let chunks = ChunkWriter::new(out, self.config.chunk_size as usize, limit);
        let chunks = match self.config.compression {
            Compression::None => {
                let mut w = chunks;
                self.bincode()
                    .serialize_into(&mut w, snapshot)
                    .map_err(|e| bincode_encode_error(*e, limit))?;
                w
            }
            Compression::Gzip { level } => {
                let mut w = flate2::write::GzEncoder::new(chunks, flate2::Compression::new(level));
                self.bincode()
                    .serialize_into(&mut w, snapshot)
                    .map_err(|e| bincode_encode_error(*e, limit))?;
                w.finish().map_err(encode_error)?
            }
            Compression::Zstd { level } => with_pooled(&self.cctx, CCtx::create, |cctx| {
                // A reused context keeps its parameters: set every one we rely on.
                cctx.set_parameter(CParameter::CompressionLevel(level))
                    .and_then(|_| cctx.set_parameter(CParameter::ChecksumFlag(false)))
                    .map_err(|code| {
                        MigrationError::Config(format!(
                            "zstd: {}",
                            zstd::zstd_safe::get_error_name(code)
                        ))
                    })?;
                let mut w = ZstdSegments::new(chunks, cctx, serialized_len);
                self.bincode()
                    .serialize_into(&mut w, snapshot)
                    .map_err(|e| bincode_encode_error(*e, limit))?;
                w.finish().map_err(encode_error)
            })?,
        };
        let (chunk_bytes, chunk_count) = chunks.finish().map_err(encode_error)?;
        Ok(EncodeStats {
            serialized_len,
            encoded_len: STREAM_HEADER_LEN as u64 + chunk_bytes,
            chunks: chunk_count,
        })
    }

    pub fn encode_to_vec(
        &self,
        snapshot: &ConnectionStateSnapshot,
    ) -> Result<Vec<u8>, MigrationError> {
        let mut out = Vec::new();
        self.encode(snapshot, &mut out)?;
        Ok(out)
    }

    /// Reads one snapshot from `input`, which must end right after it. Every length read from the
    /// input is checked against the chunk size or `max_state_size` before it is used.
    pub fn decode<R: Read>(&self, input: R) -> Result<ConnectionStateSnapshot, MigrationError> {
        self.decode_buffered(BufReader::with_capacity(READ_BUFFER, input))
    }

    fn decode_buffered<B: BufRead>(
        &self,
        mut input: B,
    ) -> Result<ConnectionStateSnapshot, MigrationError> {
        let (compression, chunk_size) = read_stream_header(&mut input)?;
        let mut chunks = ChunkReader::new(input, chunk_size, self.config.max_state_size);
        let limit = self.config.max_state_size;
        let snapshot: ConnectionStateSnapshot = match compression {
            0 => {
                let s = self
                    .bincode()
                    .deserialize_from(&mut chunks)
                    .map_err(|e| bincode_decode_error(*e, limit))?;
                chunks.finish()?;
                s
            }
            1 => {
                let mut d = flate2::bufread::GzDecoder::new(chunks);
                let s = self
                    .bincode()
                    .deserialize_from(&mut d)
                    .map_err(|e| bincode_decode_error(*e, limit))?;
                expect_end(&mut d)?;
                d.into_inner().finish()?;
                s
            }
            2 => with_pooled(&self.dctx, DCtx::create, |dctx| {
                // Several frames (one per segment) decode as one stream.
                let mut d = zstd::stream::read::Decoder::with_context(chunks, dctx);
                d.window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(|e| decode_io_error(e, "zstd"))?;
                let s = self
                    .bincode()
                    .deserialize_from(&mut d)
                    .map_err(|e| bincode_decode_error(*e, limit))?;
                expect_end(&mut d)?;
                d.finish().finish()?;
                Ok::<_, MigrationError>(s)
            })?,
            other => {
                return Err(MigrationError::corrupt(Corruption::BadHeader(format!(
                    "unknown compression id {other}"
                ))));
            }
        };
        snapshot.validate()?;
        Ok(snapshot)
    }

    /// Like [`decode`](Self::decode), reading the slice in place (no intermediate buffer).
    pub fn decode_slice(&self, bytes: &[u8]) -> Result<ConnectionStateSnapshot, MigrationError> {
        self.decode_buffered(bytes)
    }
}

fn read_stream_header<R: Read>(input: &mut R) -> Result<(u8, u32), MigrationError> {
    let mut header = [0u8; STREAM_HEADER_LEN];
    if read_full(input, &mut header).map_err(|e| decode_io_error(e, "stream header"))?
        < STREAM_HEADER_LEN
    {
        return Err(MigrationError::corrupt(Corruption::Truncated(
            "inside the stream header".into(),
        )));
    }
    if header[..4] != STREAM_MAGIC {
        return Err(MigrationError::corrupt(Corruption::BadHeader(
            "not a Baton snapshot stream (bad magic)".into(),
        )));
    }
    if header[4] != STREAM_VERSION {
        return Err(MigrationError::corrupt(Corruption::BadHeader(format!(
            "stream version {} (this build reads {STREAM_VERSION})",
            header[4]
        ))));
    }
    let format = u16::from_be_bytes([header[6], header[7]]);
    if format != SNAPSHOT_FORMAT_VERSION {
        return Err(MigrationError::UnsupportedVersion {
            found: format,
            supported: SNAPSHOT_FORMAT_VERSION,
        });
    }
    let chunk_size = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(MigrationError::corrupt(Corruption::BadHeader(format!(
            "chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        ))));
    }
    Ok((header[5], chunk_size))
}

/// The decompressor must have nothing left after the snapshot.
fn expect_end<R: Read>(r: &mut R) -> Result<(), MigrationError> {
    let mut probe = [0u8; 1];
    match r.read(&mut probe) {
        Ok(0) => Ok(()),
        Ok(_) => Err(MigrationError::corrupt(Corruption::TrailingData)),
        Err(e) => Err(decode_io_error(e, "decompression")),
    }
}

/// Reads until `buf` is full or EOF; returns the count.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Carries a typed error through `io::Error` (compressors and bincode only pass io errors on).
#[derive(Debug)]
struct Carried(MigrationError);

impl std::fmt::Display for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Carried {}

fn carry(e: MigrationError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Carried(e))
}

fn uncarry(e: &io::Error) -> Option<MigrationError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Carried>())
        .map(|c| c.0.clone())
}

fn encode_error(e: io::Error) -> MigrationError {
    uncarry(&e).unwrap_or_else(|| MigrationError::Output(e.to_string()))
}

fn bincode_encode_error(e: bincode::ErrorKind, limit: u64) -> MigrationError {
    match e {
        bincode::ErrorKind::Io(io) => encode_error(io),
        bincode::ErrorKind::SizeLimit => MigrationError::SnapshotTooLarge {
            size: limit + 1,
            limit,
        },
        other => MigrationError::InvalidSnapshot(format!("bincode: {other}")),
    }
}

fn decode_io_error(e: io::Error, stage: &str) -> MigrationError {
    uncarry(&e)
        .unwrap_or_else(|| MigrationError::corrupt(Corruption::Malformed(format!("{stage}: {e}"))))
}

fn bincode_decode_error(e: bincode::ErrorKind, limit: u64) -> MigrationError {
    match e {
        bincode::ErrorKind::Io(io)
            if io.kind() == io::ErrorKind::UnexpectedEof && uncarry(&io).is_none() =>
        {
            MigrationError::corrupt(Corruption::Malformed("snapshot content ended early".into()))
        }
        bincode::ErrorKind::Io(io) => decode_io_error(io, "decompression"),
        bincode::ErrorKind::SizeLimit => MigrationError::corrupt(Corruption::TooLarge { limit }),
        other => MigrationError::corrupt(Corruption::Malformed(format!("bincode: {other}"))),
    }
}

/// Compresses the serialized stream as a series of independent zstd frames, one per
/// `ZSTD_SEGMENT` bytes (the last may be shorter; an empty stream is one empty frame).
struct ZstdSegments<'c, W: Write> {
    out: W,
    cctx: &'c mut CCtx<'static>,
    segment: usize,
    pending: Vec<u8>,
    compressed: Vec<u8>,
    frames: usize,
}

impl<'c, W: Write> ZstdSegments<'c, W> {
    fn new(out: W, cctx: &'c mut CCtx<'static>, serialized_len: u64) -> Self {
        // Small snapshots get small buffers.
        let segment = ZSTD_SEGMENT.min(serialized_len.max(1) as usize);
        Self {
            out,
            cctx,
            segment,
            pending: Vec::with_capacity(segment),
            compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(segment)),
            frames: 0,
        }
    }

    fn compress(&mut self, src: &[u8]) -> io::Result<()> {
        self.cctx
            .compress2(&mut self.compressed, src)
            .map_err(|code| {
                io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
            })?;
        self.frames += 1;
        self.out.write_all(&self.compressed)
    }

    fn finish(mut self) -> io::Result<W> {
        if !self.pending.is_empty() || self.frames == 0 {
            let pending = std::mem::take(&mut self.pending);
            self.compress(&pending)?;
        }
        Ok(self.out)
    }
}

impl<W: Write> Write for ZstdSegments<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.pending.is_empty() && data.len() >= self.segment {
            // A whole segment in the caller's buffer: compress it in place.
            self.compress(&data[..self.segment])?;
            return Ok(self.segment);
        }
        let n = (self.segment - self.pending.len()).min(data.len());
        self.pending.extend_from_slice(&data[..n]);
        if self.pending.len() == self.segment {
            let pending = std::mem::take(&mut self.pending);
            let result = self.compress(&pending);
            self.pending = pending;
            self.pending.clear();
            result?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Splits the byte stream into `seq | flags | len | payload` frames of exactly `chunk_size`
/// payload bytes; the last frame carries the FINAL flag and may be shorter (or empty).
struct ChunkWriter<'a, W: Write> {
    out: &'a mut W,
    buf: Vec<u8>,
    chunk_size: usize,
    seq: u32,
    written: u64,
    limit: u64,
}

impl<'a, W: Write> ChunkWriter<'a, W> {
    fn new(out: &'a mut W, chunk_size: usize, limit: u64) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(chunk_size),
            chunk_size,
            seq: 0,
            written: 0,
            limit,
        }
    }

    fn emit(&mut self, final_chunk: bool) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let result = self.emit_from(&buf, final_chunk);
        self.buf = buf;
        self.buf.clear();
        result
    }

    fn emit_from(&mut self, payload: &[u8], final_chunk: bool) -> io::Result<()> {
        let len = payload.len() as u64;
        // The decoder refuses more than `limit` payload bytes; refuse to produce them too.
        if self.written + len > self.limit {
            return Err(carry(MigrationError::SnapshotTooLarge {
                size: self.written + len,
                limit: self.limit,
            }));
        }
        let mut header = [0u8; CHUNK_HEADER_LEN];
        header[..4].copy_from_slice(&self.seq.to_be_bytes());
        header[4] = if final_chunk { FLAG_FINAL } else { 0 };
        header[5..9].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(payload)?;
        self.written += len;
        self.seq = self.seq.checked_add(1).ok_or_else(|| {
            carry(MigrationError::SnapshotTooLarge {
                size: self.written,
                limit: self.limit,
            })
        })?;
        Ok(())
    }

    /// Emits the final chunk; returns (bytes written including frame headers, chunk count).
    fn finish(mut self) -> io::Result<(u64, u32)> {
        self.emit(true)?;
        self.out.flush()?;
        Ok((
            self.written + self.seq as u64 * CHUNK_HEADER_LEN as u64,
            self.seq,
        ))
    }
}

impl<W: Write> Write for ChunkWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.len() >= self.chunk_size {
            // A whole chunk at once: frame it straight from the caller's buffer, no copy.
            self.emit_from(&data[..self.chunk_size], false)?;
            return Ok(self.chunk_size);
        }
        let room = self.chunk_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk_size {
            self.emit(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks are only emitted when full or final, so there is nothing to push early.
        Ok(())
    }
}

/// Reassembles frames written by [`ChunkWriter`], passing payload bytes through from the
/// underlying buffer without copying a chunk, and refusing anything our encoder would not have
/// produced.
struct ChunkReader<R: BufRead> {
    input: R,
    chunk_size: u32,
    /// u64 so that a chunk numbered u32::MAX still leaves a distinct "next".
    next_seq: u64,
    remaining: u32,
    final_seen: bool,
    total: u64,
    limit: u64,
}

impl<R: BufRead> ChunkReader<R> {
    fn new(input: R, chunk_size: u32, limit: u64) -> Self {
        Self {
            input,
            chunk_size,
            next_seq: 0,
            remaining: 0,
            final_seen: false,
            total: 0,
            limit,
        }
    }

    fn next_chunk(&mut self) -> Result<(), MigrationError> {
        let mut header = [0u8; CHUNK_HEADER_LEN];
        let got = read_full(&mut self.input, &mut header)
            .map_err(|e| decode_io_error(e, "chunk header"))?;
        if got == 0 {
            return Err(MigrationError::corrupt(Corruption::Truncated(format!(
                "stream ended after {} chunk(s) without the final chunk",
                self.next_seq
            ))));
        }
        if got < CHUNK_HEADER_LEN {
            return Err(MigrationError::corrupt(Corruption::Truncated(format!(
                "inside the header of chunk {}",
                self.next_seq
            ))));
        }
        let seq = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
        let flags = header[4];
        let len = u32::from_be_bytes(header[5..9].try_into().expect("4 bytes"));
        if u64::from(seq) < self.next_seq {
            return Err(MigrationError::corrupt(Corruption::Duplicate { seq }));
        }
        if u64::from(seq) > self.next_seq {
            return Err(MigrationError::corrupt(Corruption::OutOfOrder {
                expected: self.next_seq as u32,
                found: seq,
            }));
        }
        if flags & !FLAG_FINAL != 0 {
            return Err(MigrationError::corrupt(Corruption::BadHeader(format!(
                "unknown flags {flags:#04x} on chunk {seq}"
            ))));
        }
        if len > self.chunk_size {
            return Err(MigrationError::corrupt(Corruption::ChunkTooLarge {
                len,
                limit: self.chunk_size,
            }));
        }
        let is_final = flags & FLAG_FINAL != 0;
        if !is_final && len != self.chunk_size {
            return Err(MigrationError::corrupt(Corruption::ShortChunk {
                seq,
                len,
                chunk_size: self.chunk_size,
            }));
        }
        self.total += len as u64;
        if self.total > self.limit {
            return Err(MigrationError::corrupt(Corruption::TooLarge {
                limit: self.limit,
            }));
        }
        self.next_seq = u64::from(seq) + 1;
        self.remaining = len;
        self.final_seen = is_final;
        Ok(())
    }

    /// After the snapshot: the final chunk must have been read completely and nothing may follow.
    fn finish(mut self) -> Result<(), MigrationError> {
        // The consumer may stop right before an empty final chunk (the payload ended on a chunk
        // boundary): read it now. Any payload left means the decompressor stopped early.
        if self.remaining == 0 && !self.final_seen {
            self.next_chunk()?;
        }
        if self.remaining > 0 || !self.final_seen {
            return Err(MigrationError::corrupt(Corruption::TrailingData));
        }
        let mut probe = [0u8; 1];
        match read_full(&mut self.input, &mut probe) {
            Ok(0) => Ok(()),
            Ok(_) => Err(MigrationError::corrupt(Corruption::TrailingData)),
            Err(e) => Err(decode_io_error(e, "input")),
        }
    }
}

impl<R: BufRead> BufRead for ChunkReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.remaining == 0 {
            if self.final_seen {
                return Ok(&[]);
            }
            self.next_chunk().map_err(carry)?;
        }
        let (remaining, seq) = (self.remaining as usize, self.next_seq - 1);
        let available = self.input.fill_buf()?;
        if available.is_empty() {
            return Err(carry(MigrationError::corrupt(Corruption::Truncated(
                format!("inside the payload of chunk {seq}"),
            ))));
        }
        Ok(&available[..available.len().min(remaining)])
    }

    fn consume(&mut self, amount: usize) {
        let amount = amount.min(self.remaining as usize);
        self.input.consume(amount);
        self.remaining -= amount as u32;
    }
}

impl<R: BufRead> Read for ChunkReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}
