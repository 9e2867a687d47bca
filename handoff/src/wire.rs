//! The byte form of a [`Handoff`], for moving it between processes.
//!
//! A versioned, length-checked binary layout (little-endian integers, length-prefixed byte
//! strings). It includes the TLS secrets, so the buffer is zeroized on drop; the migration channel
//! encrypts and authenticates it (issue 5), this module only encodes.
use crate::Handoff;
use crate::capture::SessionSecrets;
use crate::handoff::{
    ConnectionSnapshot, FramesSnapshot, KeyUpdateSnapshot, PendingAcksSnapshot, RecoverySnapshot,
    RecvStreamSnapshot, SendBufferSnapshot, SendStreamSnapshot, SentPacketSnapshot,
    StreamsSnapshot,
};
use crate::schedule::Suite;
use crate::secret::Secret;
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, StreamId, VarInt};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Duration;
use zeroize::Zeroizing;

// BHO2: packets in flight, stream buffers and unread data move with the connection.
const MAGIC: &[u8; 4] = b"BHO2";

/// Why bytes do not decode to a [`Handoff`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a handoff (bad magic or version)")]
    Magic,
    #[error("truncated")]
    Truncated,
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    #[error("trailing bytes")]
    Trailing,
}

struct W(Zeroizing<Vec<u8>>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v)
            }
        }
    }
    fn dur(&mut self, d: Duration) {
        self.u64(d.as_nanos().min(u64::MAX as u128) as u64);
    }
    fn cid(&mut self, c: &ConnectionId) {
        self.bytes(c);
    }
    fn pair(&mut self, v: [u64; 2]) {
        self.u64(v[0]);
        self.u64(v[1]);
    }
    fn addr(&mut self, a: SocketAddr) {
        self.ip(a.ip());
        self.u16(a.port());
    }
    fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.0.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.0.extend_from_slice(&v6.octets());
            }
        }
    }
    fn stream_id(&mut self, id: StreamId) {
        self.u64(VarInt::from(id).into_inner());
    }
    fn ranges(&mut self, v: &[Range<u64>]) {
        self.u32(v.len() as u32);
        for r in v {
            self.u64(r.start);
            self.u64(r.end);
        }
    }
    fn chunks(&mut self, v: &[(u64, Vec<u8>)]) {
        self.u32(v.len() as u32);
        for (offset, data) in v {
            self.u64(*offset);
            self.bytes(data);
        }
    }
    fn stream_ids(&mut self, v: &[StreamId]) {
        self.u32(v.len() as u32);
        for id in v {
            self.stream_id(*id);
        }
    }
    fn frames(&mut self, f: &FramesSnapshot) {
        self.bool(f.max_data);
        self.bool(f.data_blocked);
        self.bool(f.max_stream_id[0]);
        self.bool(f.max_stream_id[1]);
        for list in [&f.reset_stream, &f.stop_sending] {
            self.u32(list.len() as u32);
            for (id, v) in list {
                self.stream_id(*id);
                self.u64(*v);
            }
        }
        self.stream_ids(&f.max_stream_data);
        self.stream_ids(&f.stream_data_blocked);
        self.chunks(&f.crypto);
        self.u32(f.new_cids.len() as u32);
        for (seq, cid, token) in &f.new_cids {
            self.u64(*seq);
            self.cid(cid);
            self.0.extend_from_slice(token);
        }
        self.u32(f.retire_cids.len() as u32);
        for s in &f.retire_cids {
            self.u64(*s);
        }
        self.bool(f.ack_frequency);
        self.bool(f.handshake_done);
        self.u32(f.new_tokens);
    }
    fn recovery(&mut self, rec: &RecoverySnapshot) {
        self.u32(rec.sent.len() as u32);
        for p in &rec.sent {
            self.u64(p.number);
            self.dur(p.age);
            self.u16(p.size);
            self.bool(p.ack_eliciting);
            self.opt(p.largest_acked, W::u64);
            self.opt(p.frames.as_ref(), W::frames);
            self.u32(p.stream_frames.len() as u32);
            for (id, offsets, fin) in &p.stream_frames {
                self.stream_id(*id);
                self.u64(offsets.start);
                self.u64(offsets.end);
                self.bool(*fin);
            }
        }
        self.frames(&rec.pending);
        self.bool(rec.ping_pending);
        self.bool(rec.immediate_ack_pending);
        self.u32(rec.loss_probes);
        self.u32(rec.pto_count);
        self.opt(rec.last_ack_eliciting_age, W::dur);
        self.dur(rec.largest_acked_sent_age);
        self.opt(rec.first_packet_after_rtt_sample, W::u64);
    }
    /// Stream IDs as runs: (type bits, first index, count), by type then index.
    fn runs(&mut self, ids: impl Iterator<Item = StreamId>) {
        let mut raw: Vec<u64> = ids.map(|id| VarInt::from(id).into_inner()).collect();
        raw.sort_by_key(|&x| (x & 3, x >> 2));
        let mut runs: Vec<(u8, u64, u64)> = Vec::new();
        for x in raw {
            let (ty, index) = ((x & 3) as u8, x >> 2);
            match runs.last_mut() {
                Some((t, start, count)) if *t == ty && *start + *count == index => *count += 1,
                _ => runs.push((ty, index, 1)),
            }
        }
        self.u32(runs.len() as u32);
        for (ty, start, count) in runs {
            self.u8(ty);
            self.u64(start);
            self.u64(count);
        }
    }
}

struct R<'a>(&'a [u8]);

type Res<T> = Result<T, DecodeError>;

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Res<[u8; N]> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Res<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("bool")),
        }
    }
    fn u16(&mut self) -> Res<u16> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Res<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn u128(&mut self) -> Res<u128> {
        Ok(u128::from_le_bytes(self.arr()?))
    }
    fn i32(&mut self) -> Res<i32> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    fn bytes(&mut self) -> Res<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Res<T>) -> Res<Option<T>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(f(self)?)),
            _ => Err(DecodeError::Invalid("option tag")),
        }
    }
    fn dur(&mut self) -> Res<Duration> {
        Ok(Duration::from_nanos(self.u64()?))
    }
    fn cid(&mut self) -> Res<ConnectionId> {
        let b = self.bytes()?;
        if b.len() > 20 {
            return Err(DecodeError::Invalid("connection ID length"));
        }
        Ok(ConnectionId::new(b))
    }
    fn pair(&mut self) -> Res<[u64; 2]> {
        Ok([self.u64()?, self.u64()?])
    }
    fn addr(&mut self) -> Res<SocketAddr> {
        let ip = self.ip()?;
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn ip(&mut self) -> Res<IpAddr> {
        match self.u8()? {
            4 => Ok(IpAddr::from(self.arr::<4>()?)),
            6 => Ok(IpAddr::from(self.arr::<16>()?)),
            _ => Err(DecodeError::Invalid("address family")),
        }
    }
    fn stream_id(&mut self) -> Res<StreamId> {
        let v = VarInt::from_u64(self.u64()?).map_err(|_| DecodeError::Invalid("stream id"))?;
        Ok(StreamId::from(v))
    }
    /// Appends `(id, None)` for every stream ID in the runs [`W::runs`] wrote.
    fn runs<T>(&mut self, out: &mut Vec<(StreamId, Option<T>)>) -> Res<()> {
        const MAX_STREAMS: u64 = 1 << 18;
        let n = self.count(1 << 16)?;
        let mut total = 0u64;
        for _ in 0..n {
            let ty = self.u8()?;
            let (start, count) = (self.u64()?, self.u64()?);
            total = total.saturating_add(count);
            if ty > 3
                || total > MAX_STREAMS
                || start.checked_add(count).is_none_or(|end| end > 1 << 60)
            {
                return Err(DecodeError::Invalid("stream run"));
            }
            for index in start..start + count {
                let id = VarInt::from_u64(index << 2 | ty as u64)
                    .map_err(|_| DecodeError::Invalid("stream id"))?;
                out.push((StreamId::from(id), None));
            }
        }
        Ok(())
    }
    fn ranges(&mut self) -> Res<Vec<Range<u64>>> {
        let n = self.count(1 << 20)?;
        let mut v = Vec::with_capacity(self.cap(n, 16));
        for _ in 0..n {
            let (start, end) = (self.u64()?, self.u64()?);
            if start > end {
                return Err(DecodeError::Invalid("range"));
            }
            v.push(start..end);
        }
        Ok(v)
    }
    fn chunks(&mut self) -> Res<Vec<(u64, Vec<u8>)>> {
        let n = self.count(1 << 20)?;
        let mut v = Vec::with_capacity(self.cap(n, 12));
        for _ in 0..n {
            v.push((self.u64()?, self.bytes()?.to_vec()));
        }
        Ok(v)
    }
    fn stream_ids(&mut self) -> Res<Vec<StreamId>> {
        let n = self.count(1 << 20)?;
        (0..n).map(|_| self.stream_id()).collect()
    }
    fn frames(&mut self) -> Res<FramesSnapshot> {
        let max_data = self.bool()?;
        let data_blocked = self.bool()?;
        let max_stream_id = [self.bool()?, self.bool()?];
        let mut lists = [Vec::new(), Vec::new()];
        for list in lists.iter_mut() {
            let n = self.count(1 << 20)?;
            for _ in 0..n {
                list.push((self.stream_id()?, self.u64()?));
            }
        }
        let [reset_stream, stop_sending] = lists;
        let max_stream_data = self.stream_ids()?;
        let stream_data_blocked = self.stream_ids()?;
        let crypto = self.chunks()?;
        let n = self.count(1 << 16)?;
        let mut new_cids = Vec::with_capacity(self.cap(n, 28));
        for _ in 0..n {
            new_cids.push((self.u64()?, self.cid()?, self.arr::<16>()?));
        }
        let n = self.count(1 << 16)?;
        let retire_cids = (0..n).map(|_| self.u64()).collect::<Res<Vec<_>>>()?;
        Ok(FramesSnapshot {
            max_data,
            data_blocked,
            max_stream_id,
            reset_stream,
            stop_sending,
            max_stream_data,
            stream_data_blocked,
            crypto,
            new_cids,
            retire_cids,
            ack_frequency: self.bool()?,
            handshake_done: self.bool()?,
            new_tokens: self.u32()?,
        })
    }
    fn recovery(&mut self) -> Res<RecoverySnapshot> {
        let n = self.count(1 << 17)?;
        let mut sent = Vec::with_capacity(self.cap(n, 25));
        for _ in 0..n {
            let number = self.u64()?;
            let age = self.dur()?;
            let size = self.u16()?;
            let ack_eliciting = self.bool()?;
            let largest_acked = self.opt(R::u64)?;
            let frames = self.opt(R::frames)?;
            let m = self.count(1 << 16)?;
            let mut stream_frames = Vec::with_capacity(self.cap(m, 25));
            for _ in 0..m {
                let id = self.stream_id()?;
                let (start, end) = (self.u64()?, self.u64()?);
                if start > end {
                    return Err(DecodeError::Invalid("stream frame offsets"));
                }
                stream_frames.push((id, start..end, self.bool()?));
            }
            sent.push(SentPacketSnapshot {
                number,
                age,
                size,
                ack_eliciting,
                largest_acked,
                frames,
                stream_frames,
            });
        }
        Ok(RecoverySnapshot {
            sent,
            pending: self.frames()?,
            ping_pending: self.bool()?,
            immediate_ack_pending: self.bool()?,
            loss_probes: self.u32()?,
            pto_count: self.u32()?,
            last_ack_eliciting_age: self.opt(R::dur)?,
            largest_acked_sent_age: self.dur()?,
            first_packet_after_rtt_sample: self.opt(R::u64)?,
        })
    }
    /// Capacity to reserve for `n` elements of at least `min_encoded` bytes each: never more than
    /// the bytes left could hold, so a forged count in a short input allocates nothing large
    /// (the reads that follow fail with `Truncated`).
    fn cap(&self, n: usize, min_encoded: usize) -> usize {
        n.min(self.0.len() / min_encoded.max(1))
    }
    fn count(&mut self, max: usize) -> Res<usize> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::Invalid("count"));
        }
        Ok(n)
    }
}

/// Encodes a handoff. The buffer holds secrets and is zeroized on drop.
pub fn encode(h: &Handoff) -> Zeroizing<Vec<u8>> {
    let mut w = W(Zeroizing::new(Vec::with_capacity(1024)));
    w.0.extend_from_slice(MAGIC);
    // Secrets
    let s = &h.secrets;
    w.u8(match s.suite {
        Suite::Aes128GcmSha256 => 1,
        Suite::Aes256GcmSha384 => 2,
    });
    w.bytes(s.client_secret_0.expose());
    w.bytes(s.server_secret_0.expose());
    w.bytes(s.client_secret.expose());
    w.bytes(s.server_secret.expose());
    w.bytes(s.exporter_secret.expose());
    w.u64(s.generation);
    w.opt(s.previous.as_ref(), |w, (client, server)| {
        w.bytes(client.expose());
        w.bytes(server.expose());
    });
    w.opt(s.alpn.as_deref(), |w, v| w.bytes(v));
    w.opt(s.server_name.as_deref(), |w, v| w.bytes(v.as_bytes()));
    // Connection
    let c = &h.connection;
    w.u32(c.version);
    w.addr(c.remote);
    w.opt(c.local_ip, |w, v| w.ip(v));
    w.cid(&c.handshake_cid);
    w.cid(&c.rem_handshake_cid);
    w.cid(&c.orig_rem_cid);
    w.cid(&c.initial_dst_cid);
    w.opt(c.retry_src_cid.as_ref(), |w, v| w.cid(v));
    let mut params = Vec::new();
    c.peer_params.write(&mut params);
    w.bytes(&params);
    w.u32(c.local_cids.len() as u32);
    for (seq, cid) in &c.local_cids {
        w.u64(*seq);
        w.cid(cid);
    }
    w.u64(c.cids_issued);
    w.u32(c.local_cid_active_seq.len() as u32);
    for s in &c.local_cid_active_seq {
        w.u64(*s);
    }
    w.u64(c.local_cid_prev_retire_seq);
    w.u64(c.local_cid_retire_seq);
    w.u64(c.remote_cid_offset);
    w.u32(c.remote_cids.len() as u32);
    for slot in &c.remote_cids {
        w.opt(slot.as_ref(), |w, (cid, token)| {
            w.cid(cid);
            w.opt(token.as_ref(), |w, t| w.0.extend_from_slice(t));
        });
    }
    w.u64(c.next_packet_number);
    w.u64(c.rx_packet);
    w.u128(c.dedup_window);
    w.u64(c.dedup_next);
    let p = &c.pending_acks;
    w.u32(p.ranges.len() as u32);
    for r in &p.ranges {
        w.u64(r.start);
        w.u64(r.end);
    }
    w.opt(p.largest_packet, |w, (pn, age)| {
        w.u64(pn);
        w.dur(age);
    });
    w.opt(p.largest_ack_eliciting_packet, W::u64);
    w.opt(p.largest_acked, W::u64);
    w.u64(p.ack_eliciting_since_last_ack_sent);
    w.u64(p.non_ack_eliciting_since_last_ack_sent);
    w.opt(c.largest_acked_packet, W::u64);
    w.u64(c.largest_ack_eliciting_sent);
    for v in c.ecn_counters.iter().chain(&c.ecn_feedback) {
        w.u64(*v);
    }
    w.u64(c.crypto_offset);
    w.u64(c.sent_with_keys);
    w.u64(c.pn_filter.0);
    w.opt(c.pn_filter.1, W::u64);
    w.u32(c.pn_filter.2);
    w.bool(c.key_phase);
    w.opt(c.key_update.as_ref(), |w, u| {
        w.opt(u.end_packet, |w, (pn, age)| {
            w.u64(pn);
            w.dur(age);
        });
        w.bool(u.update_unacked);
    });
    w.u64(c.key_phase_size);
    w.bool(c.path_validated);
    w.dur(c.rtt.0);
    w.opt(c.rtt.1, W::dur);
    w.dur(c.rtt.2);
    w.dur(c.rtt.3);
    w.bool(c.sending_ecn);
    w.u16(c.mtu);
    w.u64(c.congestion_window);
    w.opt(c.congestion_state, |w, (window, ssthresh)| {
        w.u64(window);
        w.u64(ssthresh);
    });
    w.bool(c.spin_enabled);
    w.bool(c.spin);
    w.bool(c.receiving_ecn);
    w.u64(c.total_authed_packets);
    let st = &c.streams;
    for pair in [
        st.next,
        st.max,
        st.max_remote,
        st.sent_max_remote,
        st.allocated_remote_count,
        st.max_concurrent_remote_count,
        st.next_remote,
        st.next_reported_remote,
    ] {
        w.pair(pair);
    }
    w.bool(st.flow_control_adjusted);
    w.u64(st.send_streams);
    w.u32(st.connection_blocked.len() as u32);
    for id in &st.connection_blocked {
        w.stream_id(*id);
    }
    for v in [
        st.max_data,
        st.receive_window,
        st.local_max_data,
        st.sent_max_data,
        st.data_sent,
        st.data_recvd,
        st.send_window,
        st.stream_receive_window,
        st.initial_max_stream_data_uni,
        st.initial_max_stream_data_bidi_local,
        st.initial_max_stream_data_bidi_remote,
        st.receive_window_shrink_debt,
    ] {
        w.u64(v);
    }
    w.opt(st.data_blocked_limit, W::u64);
    // Streams that exist (`Some`) one by one; the permitted-but-unopened ones (`None`, most of
    // the table) as runs of consecutive indices.
    let (send_some, send_none): (Vec<_>, Vec<_>) = st.send.iter().partition(|(_, s)| s.is_some());
    let mut send_some: Vec<_> = send_some
        .into_iter()
        .map(|(id, s)| (*id, s.as_ref().unwrap()))
        .collect();
    send_some.sort_by_key(|(id, _)| *id);
    w.u32(send_some.len() as u32);
    for (id, s) in send_some {
        w.stream_id(id);
        let b = &s.buffer;
        w.u64(b.offset);
        w.u64(b.unsent);
        w.bytes(&b.unacked);
        w.ranges(&b.acked);
        w.ranges(&b.lost);
        w.bool(s.fin_pending);
        w.u64(s.max_data);
        w.opt(s.finish_acked, W::bool);
        w.i32(s.priority);
        w.bool(s.connection_blocked);
        w.opt(s.data_blocked_limit, W::u64);
        w.opt(s.stop_reason, W::u64);
    }
    w.runs(send_none.iter().map(|(id, _)| *id));
    let (recv_some, recv_none): (Vec<_>, Vec<_>) = st.recv.iter().partition(|(_, r)| r.is_some());
    let mut recv_some: Vec<_> = recv_some
        .into_iter()
        .map(|(id, r)| (*id, r.as_ref().unwrap()))
        .collect();
    recv_some.sort_by_key(|(id, _)| *id);
    w.u32(recv_some.len() as u32);
    for (id, r) in recv_some {
        w.stream_id(id);
        w.bool(r.open);
        w.u64(r.bytes_read);
        w.u64(r.end);
        w.chunks(&r.unread);
        w.opt(r.final_size, W::u64);
        w.u64(r.sent_max_stream_data);
        w.bool(r.stopped);
    }
    w.runs(recv_none.iter().map(|(id, _)| *id));
    w.recovery(&c.recovery);
    w.0
}

/// Decodes what [`encode`] produced.
pub fn decode(bytes: &[u8]) -> Result<Handoff, DecodeError> {
    const MAX: usize = 1 << 20;
    let mut r = R(bytes);
    if r.take(4)? != MAGIC {
        return Err(DecodeError::Magic);
    }
    let suite = match r.u8()? {
        1 => Suite::Aes128GcmSha256,
        2 => Suite::Aes256GcmSha384,
        _ => return Err(DecodeError::Invalid("cipher suite")),
    };
    let secret = |r: &mut R<'_>| -> Res<Secret> {
        let b = r.bytes()?;
        if b.len() != suite.hash_len() {
            return Err(DecodeError::Invalid("secret length"));
        }
        Ok(Secret::new(b))
    };
    let client_secret_0 = secret(&mut r)?;
    let server_secret_0 = secret(&mut r)?;
    let client_secret = secret(&mut r)?;
    let server_secret = secret(&mut r)?;
    let exporter_secret = secret(&mut r)?;
    let generation = r.u64()?;
    let previous = r.opt(|r| Ok((secret(r)?, secret(r)?)))?;
    let alpn = r.opt(|r| Ok(r.bytes()?.to_vec()))?;
    let server_name = r.opt(|r| {
        String::from_utf8(r.bytes()?.to_vec()).map_err(|_| DecodeError::Invalid("server name"))
    })?;
    let secrets = SessionSecrets {
        suite,
        client_secret_0,
        server_secret_0,
        client_secret,
        server_secret,
        exporter_secret,
        generation,
        previous,
        alpn,
        server_name,
    };

    let version = r.u32()?;
    let remote = r.addr()?;
    let local_ip = r.opt(R::ip)?;
    let handshake_cid = r.cid()?;
    let rem_handshake_cid = r.cid()?;
    let orig_rem_cid = r.cid()?;
    let initial_dst_cid = r.cid()?;
    let retry_src_cid = r.opt(R::cid)?;
    let mut params = r.bytes()?;
    let peer_params =
        // Read as a client would: quinn keeps the reset token of the client CID in use in the
        // peer's parameters, which the server-side check would reject.
        TransportParameters::read(Side::Client, &mut params).map_err(|_| DecodeError::Invalid("transport parameters"))?;
    let n = r.count(MAX)?;
    let mut local_cids = Vec::with_capacity(r.cap(n, 12));
    for _ in 0..n {
        local_cids.push((r.u64()?, r.cid()?));
    }
    let cids_issued = r.u64()?;
    let n = r.count(MAX)?;
    let local_cid_active_seq = (0..n).map(|_| r.u64()).collect::<Res<Vec<_>>>()?;
    let local_cid_prev_retire_seq = r.u64()?;
    let local_cid_retire_seq = r.u64()?;
    let remote_cid_offset = r.u64()?;
    let n = r.count(64)?;
    let mut remote_cids = Vec::with_capacity(r.cap(n, 1));
    for _ in 0..n {
        remote_cids.push(r.opt(|r| Ok((r.cid()?, r.opt(|r| r.arr::<16>())?)))?);
    }
    let next_packet_number = r.u64()?;
    let rx_packet = r.u64()?;
    let dedup_window = r.u128()?;
    let dedup_next = r.u64()?;
    let n = r.count(MAX)?;
    let mut ranges = Vec::with_capacity(r.cap(n, 16));
    for _ in 0..n {
        let (start, end) = (r.u64()?, r.u64()?);
        if start > end {
            return Err(DecodeError::Invalid("ack range"));
        }
        ranges.push(start..end);
    }
    let pending_acks = PendingAcksSnapshot {
        ranges,
        largest_packet: r.opt(|r| Ok((r.u64()?, r.dur()?)))?,
        largest_ack_eliciting_packet: r.opt(R::u64)?,
        largest_acked: r.opt(R::u64)?,
        ack_eliciting_since_last_ack_sent: r.u64()?,
        non_ack_eliciting_since_last_ack_sent: r.u64()?,
    };
    let largest_acked_packet = r.opt(R::u64)?;
    let largest_ack_eliciting_sent = r.u64()?;
    let ecn_counters = [r.u64()?, r.u64()?, r.u64()?];
    let ecn_feedback = [r.u64()?, r.u64()?, r.u64()?];
    let crypto_offset = r.u64()?;
    let sent_with_keys = r.u64()?;
    let pn_filter = (r.u64()?, r.opt(R::u64)?, r.u32()?);
    let key_phase = r.bool()?;
    let key_update = r.opt(|r| {
        Ok(KeyUpdateSnapshot {
            end_packet: r.opt(|r| Ok((r.u64()?, r.dur()?)))?,
            update_unacked: r.bool()?,
        })
    })?;
    let key_phase_size = r.u64()?;
    let path_validated = r.bool()?;
    let rtt = (r.dur()?, r.opt(R::dur)?, r.dur()?, r.dur()?);
    let sending_ecn = r.bool()?;
    let mtu = r.u16()?;
    let congestion_window = r.u64()?;
    let congestion_state = r.opt(|r| Ok((r.u64()?, r.u64()?)))?;
    let spin_enabled = r.bool()?;
    let spin = r.bool()?;
    let receiving_ecn = r.bool()?;
    let total_authed_packets = r.u64()?;
    let next = r.pair()?;
    let max = r.pair()?;
    let max_remote = r.pair()?;
    let sent_max_remote = r.pair()?;
    let allocated_remote_count = r.pair()?;
    let max_concurrent_remote_count = r.pair()?;
    let next_remote = r.pair()?;
    let next_reported_remote = r.pair()?;
    let flow_control_adjusted = r.bool()?;
    let send_streams = r.u64()?;
    let n = r.count(MAX)?;
    let connection_blocked = (0..n).map(|_| r.stream_id()).collect::<Res<Vec<_>>>()?;
    let mut v = [0u64; 12];
    for x in v.iter_mut() {
        *x = r.u64()?;
    }
    let data_blocked_limit = r.opt(R::u64)?;
    let n = r.count(MAX)?;
    let mut send = Vec::with_capacity(r.cap(n, 8));
    for _ in 0..n {
        let id = r.stream_id()?;
        send.push((
            id,
            Some(SendStreamSnapshot {
                buffer: SendBufferSnapshot {
                    offset: r.u64()?,
                    unsent: r.u64()?,
                    unacked: r.bytes()?.to_vec(),
                    acked: r.ranges()?,
                    lost: r.ranges()?,
                },
                fin_pending: r.bool()?,
                max_data: r.u64()?,
                finish_acked: r.opt(R::bool)?,
                priority: r.i32()?,
                connection_blocked: r.bool()?,
                data_blocked_limit: r.opt(R::u64)?,
                stop_reason: r.opt(R::u64)?,
            }),
        ));
    }
    r.runs(&mut send)?;
    let n = r.count(MAX)?;
    let mut recv = Vec::with_capacity(r.cap(n, 8));
    for _ in 0..n {
        let id = r.stream_id()?;
        recv.push((
            id,
            Some(RecvStreamSnapshot {
                open: r.bool()?,
                bytes_read: r.u64()?,
                end: r.u64()?,
                unread: r.chunks()?,
                final_size: r.opt(R::u64)?,
                sent_max_stream_data: r.u64()?,
                stopped: r.bool()?,
            }),
        ));
    }
    r.runs(&mut recv)?;
    let recovery = r.recovery()?;
    if !r.0.is_empty() {
        return Err(DecodeError::Trailing);
    }
    let streams = StreamsSnapshot {
        next,
        max,
        max_remote,
        sent_max_remote,
        allocated_remote_count,
        max_concurrent_remote_count,
        flow_control_adjusted,
        next_remote,
        next_reported_remote,
        send_streams,
        connection_blocked,
        max_data: v[0],
        receive_window: v[1],
        local_max_data: v[2],
        sent_max_data: v[3],
        data_sent: v[4],
        data_recvd: v[5],
        send_window: v[6],
        stream_receive_window: v[7],
        initial_max_stream_data_uni: v[8],
        initial_max_stream_data_bidi_local: v[9],
        initial_max_stream_data_bidi_remote: v[10],
        receive_window_shrink_debt: v[11],
        data_blocked_limit,
        send,
        recv,
    };
    let connection = ConnectionSnapshot {
        version,
        remote,
        local_ip,
        handshake_cid,
        rem_handshake_cid,
        orig_rem_cid,
        initial_dst_cid,
        retry_src_cid,
        peer_params,
        local_cids,
        cids_issued,
        local_cid_active_seq,
        local_cid_prev_retire_seq,
        local_cid_retire_seq,
        remote_cid_offset,
        remote_cids,
        next_packet_number,
        rx_packet,
        dedup_window,
        dedup_next,
        pending_acks,
        largest_acked_packet,
        largest_ack_eliciting_sent,
        ecn_counters,
        ecn_feedback,
        crypto_offset,
        sent_with_keys,
        pn_filter,
        key_phase,
        key_update,
        key_phase_size,
        path_validated,
        rtt,
        sending_ecn,
        mtu,
        congestion_window,
        congestion_state,
        spin_enabled,
        spin,
        receiving_ecn,
        total_authed_packets,
        streams,
        recovery,
    };
    Ok(Handoff {
        connection,
        secrets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Records the largest allocation made on the current thread (tests run in parallel).
    struct Largest;
    thread_local! { static LARGEST: Cell<usize> = const { Cell::new(0) }; }
    fn note(size: usize) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
    // SAFETY: forwards to the system allocator unchanged; only records sizes.
    unsafe impl GlobalAlloc for Largest {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
    #[global_allocator]
    static ALLOC: Largest = Largest;

    fn largest_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        let out = f();
        (out, LARGEST.with(|l| l.get()))
    }

    #[test]
    fn huge_counts_in_tiny_inputs_allocate_by_the_bytes_left() {
        // A count at the limit, then one element's worth of bytes (or less).
        let input = |count: u32, tail: usize| {
            let mut b = count.to_le_bytes().to_vec();
            b.resize(4 + tail, 0);
            b
        };
        let b = input(1 << 20, 20);
        let (r, big) = largest_during(|| R(&b).ranges());
        assert_eq!(r.unwrap_err(), DecodeError::Truncated);
        assert!(
            big < 4096,
            "ranges: {big} bytes allocated for 24 bytes of input"
        );
        let (r, big) = largest_during(|| R(&b).chunks());
        assert_eq!(r.unwrap_err(), DecodeError::Truncated);
        assert!(big < 4096, "chunks: {big} bytes");
        let b = input(1 << 17, 30);
        let (r, big) = largest_during(|| R(&b).recovery());
        assert!(r.is_err());
        assert!(
            big < 4096,
            "recovery: {big} bytes allocated for 34 bytes of input"
        );
        // Counts above the limits are refused outright.
        let b = input(u32::MAX, 8);
        assert_eq!(R(&b).ranges().unwrap_err(), DecodeError::Invalid("count"));
    }

    #[test]
    fn capacity_follows_the_bytes_left() {
        let b = [0u8; 100];
        let r = R(&b);
        assert_eq!(r.cap(1 << 20, 16), 6);
        assert_eq!(r.cap(3, 16), 3);
        assert_eq!(r.cap(1 << 20, 0), 100);
    }
}
