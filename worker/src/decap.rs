//! Receiving datagrams the load balancer encapsulated (IPIP or GUE), so a worker can sit on
//! another subnet than the LB nodes: the worker takes the outer header off in userspace and hands
//! the inner datagram to its connections as if it had arrived on its VIP socket. Replies still
//! leave through the VIP sockets, from the VIP, straight to the client (direct server return).
//!
//! Why userspace and not the kernel's tunnel devices: those need the `ipip`, `ip6_tunnel`,
//! `sit` and `fou` modules, which many hosts (this project's CI kernel among them) do not have.
//! The sockets here need nothing but `CAP_NET_RAW` for IPIP:
//! - **GUE**: a UDP socket per family on `[decap] gue_port`; its payload is a GUE header
//!   (variant 0, any optional fields skipped; or variant 1, the bare inner IP header) and the
//!   inner IP datagram.
//! - **IPIP**: raw sockets for protocols 4 (IPv4 inside) and 41 (IPv6 inside), over IPv4 and
//!   over IPv6. An IPv4 raw socket's reads start with the outer header; an IPv6 one's with the
//!   payload. With a raw socket open the kernel does not answer "protocol unreachable".
//!
//! Every inner datagram is checked before a connection sees it: an IP header that holds
//! together, not a fragment, UDP to one of the worker's VIPs on its port, and a correct UDP
//! checksum (no NIC or kernel checked the inner one). Anything else is dropped and counted by
//! [`DropReason`] (`baton_worker_decap_dropped_total`), never answered.
use crate::udp::Received;
use bytes::BytesMut;
use lb_common::encap::csum_fold;
use serde::Deserialize;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::unix::AsyncFd;

/// `[decap]` in worker.toml: which encapsulations this worker accepts.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DecapConfig {
    /// Receive GUE on this UDP port (IPv4 and IPv6, every address of the host). It must match
    /// the LB's `gue_port` for this worker.
    #[serde(default)]
    pub gue_port: Option<u16>,
    /// Receive IPIP (protocols 4 and 41, over IPv4 and IPv6) with raw sockets; needs CAP_NET_RAW.
    #[serde(default)]
    pub ipip: bool,
}

impl DecapConfig {
    pub fn enabled(&self) -> bool {
        self.gue_port.is_some() || self.ipip
    }
}

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;
/// GUE's optional fields are at most 31 words; an inner datagram at most 64 KiB.
const RECV_BUF: usize = 64 * 1024 + 256;
/// Datagrams taken from one socket per call: bounded so one busy tunnel cannot starve the rest.
const RECV_BATCH: usize = 64;

/// Why an encapsulated datagram was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than the headers it claims, or lengths that disagree.
    Truncated,
    /// Not IPv4 or IPv6 inside, or the outer header names another inner family than it holds.
    BadHeader,
    /// A GUE header of an unknown version, a control message, or an inner protocol not 4/41.
    BadGue,
    /// An IP fragment (QUIC datagrams are never fragmented; reassembly is not ours to do).
    Fragment,
    /// Not UDP inside.
    NotUdp,
    /// Not addressed to one of this worker's VIPs and its port.
    NotVip,
    /// The inner UDP checksum is wrong (or zero over IPv6, which RFC 8200 forbids).
    Checksum,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Truncated,
        DropReason::BadHeader,
        DropReason::BadGue,
        DropReason::Fragment,
        DropReason::NotUdp,
        DropReason::NotVip,
        DropReason::Checksum,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadHeader => "bad_header",
            DropReason::BadGue => "bad_gue",
            DropReason::Fragment => "fragment",
            DropReason::NotUdp => "not_udp",
            DropReason::NotVip => "not_vip",
            DropReason::Checksum => "checksum",
        }
    }
}

/// The inner datagram of an encapsulated packet: where it came from and went to, its ECN bits,
/// and where its UDP payload lies in the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inner {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub ecn: u8,
    pub payload: std::ops::Range<usize>,
}

/// Parses the inner IP datagram at the start of `buf` (its first nibble says the family). When
/// `expect` is given (the outer protocol number, 4 or 41), the family must match it.
pub fn parse_inner(buf: &[u8], expect: Option<u8>) -> Result<Inner, DropReason> {
    let version = buf.first().ok_or(DropReason::Truncated)? >> 4;
    match (version, expect) {
        (4, None | Some(IPPROTO_IPIP)) => parse_ipv4(buf),
        (6, None | Some(IPPROTO_IPV6)) => parse_ipv6(buf),
        _ => Err(DropReason::BadHeader),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn parse_ipv4(buf: &[u8]) -> Result<Inner, DropReason> {
    if buf.len() < 20 {
        return Err(DropReason::Truncated);
    }
    let ihl = (buf[0] & 0x0f) as usize * 4;
    let total = be16(buf, 2) as usize;
    if ihl < 20 || total < ihl || total > buf.len() {
        return Err(if ihl < 20 {
            DropReason::BadHeader
        } else {
            DropReason::Truncated
        });
    }
    // More-fragments set or a non-zero offset (DF is fine).
    if be16(buf, 6) & 0x3fff != 0 {
        return Err(DropReason::Fragment);
    }
    if buf[9] != IPPROTO_UDP {
        return Err(DropReason::NotUdp);
    }
    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
    let udp = &buf[ihl..total];
    let (sport, dport, csum) = udp_header(udp)?;
    if csum != 0 {
        let mut sum = sum_bytes(&buf[12..20]);
        sum += IPPROTO_UDP as u64 + udp.len() as u64;
        sum += sum_bytes(udp);
        if csum_fold(sum) != 0xffff {
            return Err(DropReason::Checksum);
        }
    }
    Ok(Inner {
        from: SocketAddr::new(src.into(), sport),
        to: SocketAddr::new(dst.into(), dport),
        ecn: buf[1] & 0b11,
        payload: ihl + 8..total,
    })
}

fn parse_ipv6(buf: &[u8]) -> Result<Inner, DropReason> {
    if buf.len() < 40 {
        return Err(DropReason::Truncated);
    }
    let total = 40 + be16(buf, 4) as usize;
    if total > buf.len() {
        return Err(DropReason::Truncated);
    }
    let mut next = buf[6];
    let mut at = 40;
    // Hop-by-hop, routing and destination options are walked; a fragment header is refused.
    loop {
        match next {
            IPPROTO_UDP => break,
            0 | 43 | 60 => {
                if at + 8 > total {
                    return Err(DropReason::Truncated);
                }
                next = buf[at];
                at += (buf[at + 1] as usize + 1) * 8;
            }
            44 => return Err(DropReason::Fragment),
            _ => return Err(DropReason::NotUdp),
        }
    }
    if at > total {
        return Err(DropReason::Truncated);
    }
    let src: [u8; 16] = buf[8..24].try_into().expect("16 bytes");
    let dst: [u8; 16] = buf[24..40].try_into().expect("16 bytes");
    let udp = &buf[at..total];
    let (sport, dport, csum) = udp_header(udp)?;
    if csum == 0 {
        return Err(DropReason::Checksum);
    }
    let mut sum = sum_bytes(&buf[8..40]);
    sum += IPPROTO_UDP as u64 + udp.len() as u64;
    sum += sum_bytes(udp);
    if csum_fold(sum) != 0xffff {
        return Err(DropReason::Checksum);
    }
    let traffic_class = ((buf[0] & 0x0f) << 4) | (buf[1] >> 4);
    Ok(Inner {
        from: SocketAddr::new(Ipv6Addr::from(src).into(), sport),
        to: SocketAddr::new(Ipv6Addr::from(dst).into(), dport),
        ecn: traffic_class & 0b11,
        payload: at + 8..total,
    })
}

/// Source port, destination port and checksum of the UDP datagram `udp` (exactly its bytes).
fn udp_header(udp: &[u8]) -> Result<(u16, u16, u16), DropReason> {
    if udp.len() < 8 || be16(udp, 4) as usize != udp.len() {
        return Err(DropReason::Truncated);
    }
    Ok((be16(udp, 0), be16(udp, 2), be16(udp, 6)))
}

/// Ones'-complement sum of `b` as big-endian 16-bit words (RFC 1071), not yet folded.
fn sum_bytes(b: &[u8]) -> u64 {
    let mut chunks = b.chunks_exact(2);
    let mut sum: u64 = chunks.by_ref().map(|c| be16(c, 0) as u64).sum();
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

/// The inner datagram's offset in a GUE payload: variant 0's header and optional fields
/// skipped (its protocol field must be 4 or 41 and match the inner family), or variant 1's bare
/// IP header. Returns the offset and the protocol number the inner header must match.
pub fn gue_inner_offset(payload: &[u8]) -> Result<(usize, Option<u8>), DropReason> {
    let first = *payload.first().ok_or(DropReason::Truncated)?;
    match first >> 6 {
        0 => {
            if payload.len() < 4 {
                return Err(DropReason::Truncated);
            }
            // C (control) set: not a data message.
            if first & 0x20 != 0 {
                return Err(DropReason::BadGue);
            }
            let proto = payload[1];
            if proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                return Err(DropReason::BadGue);
            }
            let at = 4 + (first & 0x1f) as usize * 4;
            if at > payload.len() {
                return Err(DropReason::Truncated);
            }
            Ok((at, Some(proto)))
        }
        // Variant 1: the payload is the inner IP datagram (its version nibble 4 or 6).
        1 => Ok((0, None)),
        _ => Err(DropReason::BadGue),
    }
}

/// What decapsulation did, by outcome (read by the metrics page).
#[derive(Debug, Default)]
pub struct DecapStats {
    pub gue: AtomicU64,
    pub ipip: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl DecapStats {
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped[r as usize].load(Ordering::Relaxed)
    }

    fn drop(&self, r: DropReason) {
        self.dropped[r as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// How a socket's reads are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// UDP payload: GUE header, then the inner datagram.
    Gue,
    /// IPv4 raw socket of this protocol: outer IPv4 header, then the inner datagram.
    Ipip4(u8),
    /// IPv6 raw socket of this protocol: the inner datagram (the kernel strips the outer header).
    Ipip6(u8),
}

struct TunnelSocket {
    fd: AsyncFd<Socket>,
    kind: Kind,
}

/// The worker's tunnel sockets and the addresses inner datagrams must go to.
pub struct Decapsulator {
    sockets: Vec<TunnelSocket>,
    /// The worker's VIPs; inner datagrams must be sent to one of them on `port`.
    vips: Vec<IpAddr>,
    port: u16,
    buf: std::sync::Mutex<Vec<u8>>,
    pub stats: DecapStats,
}

/// A GUE socket: UDP on `port` of every address of one family (IPv6 only for `v6`, so both
/// families can hold the port).
fn gue_socket(v6: bool, port: u16) -> io::Result<Socket> {
    let (domain, any) = if v6 {
        (Domain::IPV6, IpAddr::from(Ipv6Addr::UNSPECIFIED))
    } else {
        (Domain::IPV4, IpAddr::from(Ipv4Addr::UNSPECIFIED))
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.bind(&SocketAddr::new(any, port).into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Decapsulator {
    /// Opens the sockets `cfg` asks for, on the current tokio runtime. `vips` and `port` are what
    /// the worker serves: inner datagrams to anything else are dropped.
    pub fn open(cfg: &DecapConfig, vips: &[IpAddr], port: u16) -> io::Result<Self> {
        let mut sockets = Vec::new();
        let mut add = |socket: Socket, kind: Kind| -> io::Result<()> {
            // SAFETY: the Socket owns its descriptor, and keeps the same one open, for as long
            // as the AsyncFd holds it.
            let fd =
                unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)?;
            sockets.push(TunnelSocket { fd, kind });
            Ok(())
        };
        if let Some(p) = cfg.gue_port {
            for v6 in [false, true] {
                let fd = gue_socket(v6, p).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "[decap] gue_port {p}: cannot bind UDP {} port {p}: {e}",
                            if v6 { "[::]" } else { "0.0.0.0" }
                        ),
                    )
                })?;
                add(fd, Kind::Gue)?;
            }
        }
        if cfg.ipip {
            for (domain, inner) in [
                (Domain::IPV4, IPPROTO_IPIP),
                (Domain::IPV4, IPPROTO_IPV6),
                (Domain::IPV6, IPPROTO_IPIP),
                (Domain::IPV6, IPPROTO_IPV6),
            ] {
                let raw = Socket::new(domain, Type::RAW, Some(Protocol::from(inner as i32)))
                    .and_then(|s| s.set_nonblocking(true).map(|()| s));
                let fd = raw.map_err(|e| {
                    let hint = if e.raw_os_error() == Some(libc::EPERM) {
                        " (raw sockets need CAP_NET_RAW: run the worker as root or grant it the capability)"
                    } else {
                        ""
                    };
                    io::Error::new(
                        e.kind(),
                        format!("[decap] ipip: cannot open a raw socket for protocol {inner}: {e}{hint}"),
                    )
                })?;
                let kind = if domain == Domain::IPV4 {
                    Kind::Ipip4(inner)
                } else {
                    Kind::Ipip6(inner)
                };
                add(fd, kind)?;
            }
        }
        Ok(Self {
            sockets,
            vips: vips.to_vec(),
            port,
            buf: std::sync::Mutex::new(vec![0; RECV_BUF]),
            stats: DecapStats::default(),
        })
    }

    /// Ready once any tunnel socket may have something to read.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for s in &self.sockets {
            // Readiness is cleared only when the socket is really empty: `try_recv` takes a
            // bounded batch, so a socket may still hold datagrams after it ran.
            while let Poll::Ready(r) = s.fd.poll_read_ready(cx) {
                let mut guard = r?;
                match s.fd.get_ref().peek(&mut [MaybeUninit::uninit()]) {
                    Ok(_) => return Poll::Ready(Ok(())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        Poll::Pending
    }

    /// Takes what the tunnel sockets hold (up to a batch from each) without blocking, delivering
    /// the inner datagrams to `out`; returns how many it delivered.
    pub fn try_recv(&self, out: &mut Vec<Received>) -> io::Result<usize> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let mut delivered = 0;
        for s in &self.sockets {
            for _ in 0..RECV_BATCH {
                // The socket is non-blocking: an empty one says WouldBlock.
                let n = match io::Read::read(&mut s.fd.get_ref(), &mut buf[..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                match self.unwrap(s.kind, &buf[..n]) {
                    Ok(r) => {
                        out.push(r);
                        delivered += 1;
                    }
                    Err(reason) => {
                        self.stats.drop(reason);
                        tracing::trace!(reason = reason.as_str(), kind = ?s.kind, "encapsulated datagram dropped");
                    }
                }
            }
        }
        Ok(delivered)
    }

    /// The inner datagram of one read from a socket of `kind`, if it is one for this worker.
    fn unwrap(&self, kind: Kind, read: &[u8]) -> Result<Received, DropReason> {
        let (at, expect) = match kind {
            Kind::Gue => gue_inner_offset(read)?,
            Kind::Ipip4(p) => {
                let ihl = (read.first().ok_or(DropReason::Truncated)? & 0x0f) as usize * 4;
                if ihl < 20 || read.len() < ihl {
                    return Err(DropReason::Truncated);
                }
                (ihl, Some(p))
            }
            Kind::Ipip6(p) => (0, Some(p)),
        };
        let inner_buf = &read[at..];
        let inner = parse_inner(inner_buf, expect)?;
        if inner.to.port() != self.port || !self.vips.contains(&inner.to.ip()) {
            return Err(DropReason::NotVip);
        }
        match kind {
            Kind::Gue => self.stats.gue.fetch_add(1, Ordering::Relaxed),
            _ => self.stats.ipip.fetch_add(1, Ordering::Relaxed),
        };
        Ok(Received {
            from: inner.from,
            to: inner.to.ip(),
            ecn: Some(inner.ecn),
            data: BytesMut::from(&inner_buf[inner.payload]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 UDP datagram with a correct checksum (RFC 768, computed here from the bytes).
    pub(crate) fn ipv4_udp(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        body: &[u8],
    ) -> Vec<u8> {
        let udp_len = 8 + body.len();
        let total = 20 + udp_len;
        let mut p = vec![0x45, 0x02];
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let hsum = !csum_fold(sum_bytes(&p[..20]));
        p[10..12].copy_from_slice(&hsum.to_be_bytes());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&(udp_len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(body);
        let sum = sum_bytes(&p[12..20]) + IPPROTO_UDP as u64 + udp_len as u64 + sum_bytes(&p[20..]);
        let c = match !csum_fold(sum) {
            0 => 0xffff,
            c => c,
        };
        p[26..28].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, body: &[u8]) -> Vec<u8> {
        let udp_len = 8 + body.len();
        let mut p = vec![0x60, 0x10, 0, 0];
        p.extend_from_slice(&(udp_len as u16).to_be_bytes());
        p.extend_from_slice(&[IPPROTO_UDP, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&(udp_len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(body);
        let sum = sum_bytes(&p[8..40]) + IPPROTO_UDP as u64 + udp_len as u64 + sum_bytes(&p[40..]);
        let c = match !csum_fold(sum) {
            0 => 0xffff,
            c => c,
        };
        p[46..48].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn an_ipv4_datagram_parses_to_its_addresses_ecn_and_payload() {
        let p = ipv4_udp([192, 0, 2, 7], [10, 0, 0, 1], 50000, 4433, b"quic!");
        let i = parse_inner(&p, Some(IPPROTO_IPIP)).unwrap();
        assert_eq!(i.from, "192.0.2.7:50000".parse().unwrap());
        assert_eq!(i.to, "10.0.0.1:4433".parse().unwrap());
        assert_eq!(i.ecn, 2);
        assert_eq!(&p[i.payload], b"quic!");
        // An odd-length body exercises the checksum's last byte.
        let p = ipv4_udp([192, 0, 2, 7], [10, 0, 0, 1], 1, 2, b"odd");
        assert!(parse_inner(&p, None).is_ok());
    }

    #[test]
    fn an_ipv6_datagram_parses_and_its_checksum_is_checked() {
        let (s, d) = ("2001:db8::7".parse().unwrap(), "fd00::1".parse().unwrap());
        let mut p = ipv6_udp(s, d, 50000, 4433, b"quic6");
        let i = parse_inner(&p, Some(IPPROTO_IPV6)).unwrap();
        assert_eq!(i.from, SocketAddr::new(s.into(), 50000));
        assert_eq!(i.to, SocketAddr::new(d.into(), 4433));
        assert_eq!(i.ecn, 1);
        assert_eq!(&p[i.payload], b"quic6");
        let last = p.len() - 1;
        p[last] ^= 1;
        assert_eq!(parse_inner(&p, None), Err(DropReason::Checksum));
        // Zero is no checksum, which IPv6 does not allow.
        let mut p = ipv6_udp(s, d, 1, 2, b"x");
        p[46..48].copy_from_slice(&[0, 0]);
        assert_eq!(parse_inner(&p, None), Err(DropReason::Checksum));
    }

    #[test]
    fn bad_inner_datagrams_are_refused_with_their_reason() {
        let good = ipv4_udp([192, 0, 2, 7], [10, 0, 0, 1], 5, 6, b"payload");
        // A corrupted byte of the payload.
        let mut p = good.clone();
        p[30] ^= 0x40;
        assert_eq!(parse_inner(&p, None), Err(DropReason::Checksum));
        // A checksum of zero is "none" over IPv4.
        let mut p = good.clone();
        p[26..28].copy_from_slice(&[0, 0]);
        p[30] ^= 0x40;
        assert!(parse_inner(&p, None).is_ok());
        // Cut short.
        assert_eq!(
            parse_inner(&good[..good.len() - 1], None),
            Err(DropReason::Truncated)
        );
        assert_eq!(parse_inner(&good[..10], None), Err(DropReason::Truncated));
        assert_eq!(parse_inner(&[], None), Err(DropReason::Truncated));
        // A fragment.
        let mut p = good.clone();
        p[6] = 0x20;
        assert_eq!(parse_inner(&p, None), Err(DropReason::Fragment));
        // Not UDP.
        let mut p = good.clone();
        p[9] = 6;
        assert_eq!(parse_inner(&p, None), Err(DropReason::NotUdp));
        // The outer header said IPv6 inside.
        assert_eq!(
            parse_inner(&good, Some(IPPROTO_IPV6)),
            Err(DropReason::BadHeader)
        );
        // Not IP at all.
        assert_eq!(parse_inner(&[0x15; 40], None), Err(DropReason::BadHeader));
        // A UDP length that disagrees with the IP length.
        let mut p = good.clone();
        p[25] += 1;
        assert_eq!(parse_inner(&p, None), Err(DropReason::Truncated));
    }

    #[test]
    fn gue_headers_of_both_variants_are_understood() {
        // Variant 0, no optional fields, IPv4 inside.
        assert_eq!(gue_inner_offset(&[0, 4, 0, 0, 0x45]), Ok((4, Some(4))));
        // Two words of optional fields.
        assert_eq!(
            gue_inner_offset(&[2, 41, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x60]),
            Ok((12, Some(41)))
        );
        // Variant 1: the bare inner header.
        assert_eq!(gue_inner_offset(&[0x45, 0]), Ok((0, None)));
        assert_eq!(gue_inner_offset(&[0x60, 0]), Ok((0, None)));
        // A control message, an unknown protocol, an unknown version, short.
        assert_eq!(gue_inner_offset(&[0x20, 4, 0, 0]), Err(DropReason::BadGue));
        assert_eq!(gue_inner_offset(&[0, 17, 0, 0]), Err(DropReason::BadGue));
        assert_eq!(gue_inner_offset(&[0x80, 4, 0, 0]), Err(DropReason::BadGue));
        assert_eq!(gue_inner_offset(&[0, 4]), Err(DropReason::Truncated));
        assert_eq!(gue_inner_offset(&[1, 4, 0, 0]), Err(DropReason::Truncated));
    }

    #[test]
    fn ipv6_extension_headers_are_walked_and_fragments_refused() {
        let (s, d): (Ipv6Addr, Ipv6Addr) =
            ("2001:db8::7".parse().unwrap(), "fd00::1".parse().unwrap());
        let plain = ipv6_udp(s, d, 50000, 4433, b"ext");
        // Insert an 8-byte destination-options header (next header UDP, length 0, PadN).
        let mut p = plain[..40].to_vec();
        p[6] = 60;
        let payload_len = be16(&plain, 4) + 8;
        p[4..6].copy_from_slice(&payload_len.to_be_bytes());
        p.extend_from_slice(&[IPPROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&plain[40..]);
        let i = parse_inner(&p, None).unwrap();
        assert_eq!(&p[i.payload], b"ext");
        p[6] = 44;
        assert_eq!(parse_inner(&p, None), Err(DropReason::Fragment));
    }

    /// Real sockets on loopback: a GUE datagram to the worker's port is delivered with the inner
    /// addresses; one to another address is counted, not delivered.
    #[tokio::test]
    async fn a_gue_socket_delivers_inner_datagrams_for_the_vip_only() {
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let vip: IpAddr = "10.9.9.9".parse().unwrap();
        let d = Decapsulator::open(
            &DecapConfig {
                gue_port: Some(port),
                ipip: false,
            },
            &[vip],
            4433,
        )
        .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut msg = vec![0, 4, 0, 0];
        msg.extend(ipv4_udp(
            [198, 51, 100, 3],
            [10, 9, 9, 9],
            40000,
            4433,
            b"hello",
        ));
        tx.send_to(&msg, ("127.0.0.1", port)).unwrap();
        let mut other = vec![0, 4, 0, 0];
        other.extend(ipv4_udp(
            [198, 51, 100, 3],
            [10, 9, 9, 8],
            40000,
            4433,
            b"nope",
        ));
        tx.send_to(&other, ("127.0.0.1", port)).unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.is_empty() || d.stats.dropped(DropReason::NotVip) == 0 {
            assert!(std::time::Instant::now() < deadline, "nothing arrived");
            std::future::poll_fn(|cx| d.poll_readable(cx))
                .await
                .unwrap();
            d.try_recv(&mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].from, "198.51.100.3:40000".parse().unwrap());
        assert_eq!(out[0].to, vip);
        assert_eq!(&out[0].data[..], b"hello");
        assert_eq!(d.stats.gue.load(Ordering::Relaxed), 1);
    }
}
