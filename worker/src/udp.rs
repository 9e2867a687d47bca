//! The VIP sockets through quinn-udp: GRO on receive, GSO and ECN on send, source address control.
//!
//! A worker serving several VIPs (an IPv4 and an IPv6 one, say) binds one socket per VIP
//! ([`VipSockets`]) rather than one dual-stack socket on the wildcard address. A socket bound to
//! the VIP itself receives only what was sent to that VIP (not whatever else reaches the port on
//! the host's own addresses), sends from exactly that address without relying on a per-datagram
//! source-address option, and keeps IPv4 clients' addresses in their plain form instead of
//! IPv4-mapped IPv6 ones (which would also reach snapshots and the control API). Every connection
//! is sent for through the socket of the VIP it arrived on (quinn's `local_ip`), so it keeps
//! replying from the address its client talks to (direct server return).
use crate::core::Outgoing;
use bytes::BytesMut;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use std::collections::BTreeMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::Interest;

pub struct UdpIo {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// The address the socket is bound to (a VIP).
    local_ip: IpAddr,
    /// Receive buffers for one batch (recvmmsg), allocated once: [`quinn_udp::BATCH_SIZE`]
    /// slots of [`RECV_SLOT`] bytes. Allocating (and zeroing) them per datagram cost more than
    /// handling the datagram under load.
    recv_buf: std::sync::Mutex<Vec<u8>>,
}

/// One receive slot: the largest GRO-coalesced read (64 KiB) or one datagram.
const RECV_SLOT: usize = 64 * 1024;

/// One received datagram.
pub struct Received {
    pub from: SocketAddr,
    /// The address it was sent to (the VIP whose socket received it).
    pub to: IpAddr,
    pub ecn: Option<u8>,
    /// A slice of the buffer its whole receive (a GRO batch) was copied into once: quinn-proto
    /// keeps stream data as slices of it, so no datagram is copied again.
    pub data: BytesMut,
}

impl UdpIo {
    /// Binds `addr` (the VIP and port) on the current tokio runtime, with the kernel's default
    /// socket buffers.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::bind_with_buffers(addr, 0)
    }

    /// Like [`UdpIo::bind`], asking for `buffer` bytes of receive and send buffer (0: the
    /// kernel's default). Many connections burst more datagrams than the default (~200 KiB)
    /// holds while the loop is busy; the kernel then drops them (`UdpRcvbufErrors`). See
    /// [`set_buffer`] for how the size is applied; [`UdpIo::buffer_sizes`] tells what was granted.
    pub fn bind_with_buffers(addr: SocketAddr, buffer: usize) -> io::Result<Self> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        if buffer > 0 {
            use std::os::fd::AsRawFd;
            let fd = std.as_raw_fd();
            set_buffer(fd, libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, buffer)?;
            set_buffer(fd, libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, buffer)?;
        }
        let state = UdpSocketState::new((&std).into())?;
        let recv_buf = std::sync::Mutex::new(vec![0u8; RECV_SLOT * quinn_udp::BATCH_SIZE]);
        let local_ip = std.local_addr()?.ip();
        Ok(Self {
            socket: tokio::net::UdpSocket::from_std(std)?,
            state,
            local_ip,
            recv_buf,
        })
    }

    /// The receive and send buffer sizes the kernel reports (it doubles what was asked, for its
    /// bookkeeping, and caps unprivileged requests at net.core.rmem_max/wmem_max).
    pub fn buffer_sizes(&self) -> (usize, usize) {
        use std::os::fd::AsRawFd;
        let fd = self.socket.as_raw_fd();
        (
            get_int(fd, libc::SO_RCVBUF).unwrap_or(0),
            get_int(fd, libc::SO_SNDBUF).unwrap_or(0),
        )
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The address the socket is bound to.
    pub fn local_ip(&self) -> IpAddr {
        self.local_ip
    }

    /// Datagrams a transmit may carry (GSO segments); 1 without GSO.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Whether the kernel may fragment what we send (then path MTU discovery stays off).
    pub fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    /// Receives at least one datagram (a batch of them if several are waiting) into `out`.
    pub async fn recv(&self, out: &mut Vec<Received>) -> io::Result<()> {
        loop {
            self.socket.readable().await?;
            if self.try_recv(out)? > 0 {
                return Ok(());
            }
        }
    }

    /// Takes one batch of what is already waiting (recvmmsg, GRO) into `out` without blocking;
    /// returns how many datagrams it took (0: nothing was waiting).
    pub fn try_recv(&self, out: &mut Vec<Received>) -> io::Result<usize> {
        // Never held across an await.
        let mut buf = self.recv_buf.lock().unwrap_or_else(|e| e.into_inner());
        let mut bufs: Vec<IoSliceMut<'_>> =
            buf.chunks_mut(RECV_SLOT).map(IoSliceMut::new).collect();
        let mut meta = [RecvMeta::default(); quinn_udp::BATCH_SIZE];
        match self.socket.try_io(Interest::READABLE, || {
            self.state.recv((&self.socket).into(), &mut bufs, &mut meta)
        }) {
            Ok(n) => {
                let before = out.len();
                for (m, b) in meta[..n].iter().zip(bufs.iter()) {
                    let stride = m.stride.max(1);
                    // What the kernel says the datagram was sent to; the bound address when
                    // it does not say (they are the same for a socket bound to a VIP).
                    let to = m.dst_ip.unwrap_or(self.local_ip);
                    // One allocation and copy per receive, not per datagram (a GRO batch holds
                    // up to 64 KiB); the datagrams are split off it without copying.
                    let mut batch = BytesMut::from(&b[..m.len]);
                    while !batch.is_empty() {
                        let data = batch.split_to(stride.min(batch.len()));
                        out.push(Received {
                            from: m.addr,
                            to,
                            ecn: m.ecn.map(|e| e as u8),
                            data,
                        });
                    }
                }
                Ok(out.len() - before)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Sends one transmit (several datagrams if it has a segment size). Errors other than a full
    /// socket buffer are logged by quinn-udp and dropped: QUIC retransmits.
    pub async fn send(&self, o: &Outgoing) -> io::Result<()> {
        let transmit = Transmit {
            destination: o.destination,
            ecn: o.ecn.and_then(quinn_udp::EcnCodepoint::from_bits),
            contents: &o.data,
            segment_size: o.segment_size,
            src_ip: o.src_ip,
        };
        loop {
            self.socket.writable().await?;
            // try_send, not send: quinn-udp's send drops EMSGSIZE and other errors silently, and
            // the worker counts every one (VipSockets::send).
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The worker's sockets, one per VIP (see the module comment for why not one dual-stack socket).
pub struct VipSockets {
    sockets: Vec<UdpIo>,
    stats: SendStats,
    /// Tunnel sockets whose inner datagrams are received as if on the VIP sockets (`[decap]`).
    decap: Option<crate::decap::Decapsulator>,
}

/// What the worker's sends came to, for the metrics: every failed send is counted by its error
/// (a datagram the kernel refused is lost and retransmitted, and looks like congestion).
#[derive(Debug, Default)]
pub struct SendStats {
    /// Transmits handed to the kernel (one `sendmsg` each, several datagrams with GSO)
    pub sends: AtomicU64,
    pub datagrams: AtomicU64,
    pub bytes: AtomicU64,
    /// Failed sends by errno (0: an error without one, e.g. no socket for the source address)
    errors: Mutex<BTreeMap<i32, u64>>,
    /// When the last failure was logged (None: never)
    logged: Mutex<Option<Instant>>,
}

/// How often at most a failing send is logged after the first.
const SEND_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl SendStats {
    /// Failed sends so far, by errno.
    pub fn errors(&self) -> BTreeMap<i32, u64> {
        self.errors.lock().unwrap().clone()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.lock().unwrap().values().sum()
    }

    fn sent(&self, o: &Outgoing) {
        self.sends.fetch_add(1, Ordering::Relaxed);
        let datagrams = o
            .segment_size
            .map_or(1, |s| o.data.len().div_ceil(s.max(1)));
        self.datagrams
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        self.bytes.fetch_add(o.data.len() as u64, Ordering::Relaxed);
    }

    fn failed(&self, o: &Outgoing, e: &io::Error) {
        let errno = e.raw_os_error().unwrap_or(0);
        let total = {
            let mut errors = self.errors.lock().unwrap();
            *errors.entry(errno).or_default() += 1;
            errors.values().sum::<u64>()
        };
        let mut logged = self.logged.lock().unwrap();
        if logged.is_none_or(|at| at.elapsed() >= SEND_ERROR_LOG_INTERVAL) {
            *logged = Some(Instant::now());
            tracing::warn!(
                destination = %o.destination,
                bytes = o.data.len(),
                segment_size = ?o.segment_size,
                failed_sends = total,
                "a send failed: {e} (the datagrams are lost; counted in baton_worker_send_errors_total)"
            );
        }
    }
}

impl VipSockets {
    /// Binds `port` on every VIP in `vips`, asking for `buffer` bytes of socket buffer each
    /// (see [`UdpIo::bind_with_buffers`]).
    pub fn bind(vips: &[IpAddr], port: u16, buffer: usize) -> io::Result<Self> {
        let mut sockets = Vec::with_capacity(vips.len());
        for &ip in vips {
            let addr = SocketAddr::new(ip, port);
            let s = UdpIo::bind_with_buffers(addr, buffer)
                .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
            sockets.push(s);
        }
        Self::new(sockets)
    }

    /// Sockets already bound (each to one VIP).
    pub fn new(sockets: Vec<UdpIo>) -> io::Result<Self> {
        if sockets.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no VIP socket: at least one VIP is needed",
            ));
        }
        Ok(Self {
            sockets,
            stats: SendStats::default(),
            decap: None,
        })
    }

    /// Also receives what `decap`'s tunnel sockets bring (encapsulated by the load balancer).
    pub fn with_decap(mut self, decap: crate::decap::Decapsulator) -> Self {
        self.decap = Some(decap);
        self
    }

    pub fn decap(&self) -> Option<&crate::decap::Decapsulator> {
        self.decap.as_ref()
    }

    /// One socket.
    pub fn single(socket: UdpIo) -> Self {
        Self {
            sockets: vec![socket],
            stats: SendStats::default(),
            decap: None,
        }
    }

    pub fn stats(&self) -> &SendStats {
        &self.stats
    }

    pub fn sockets(&self) -> &[UdpIo] {
        &self.sockets
    }

    /// The VIPs, in the order they were bound.
    pub fn vips(&self) -> Vec<IpAddr> {
        self.sockets.iter().map(UdpIo::local_ip).collect()
    }

    /// Datagrams a transmit may carry (GSO segments): what every socket can take.
    pub fn max_gso_segments(&self) -> usize {
        self.sockets
            .iter()
            .map(UdpIo::max_gso_segments)
            .min()
            .unwrap_or(1)
    }

    /// Whether the kernel may fragment what any of the sockets sends.
    pub fn may_fragment(&self) -> bool {
        self.sockets.iter().any(UdpIo::may_fragment)
    }

    /// Receives at least one datagram, from whichever socket has some, into `out`.
    pub async fn recv(&self, out: &mut Vec<Received>) -> io::Result<()> {
        loop {
            std::future::poll_fn(|cx| self.poll_readable(cx)).await?;
            if self.try_recv(out)? > 0 {
                return Ok(());
            }
        }
    }

    /// Ready once any socket (tunnel sockets included) may have something to read.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        for s in &self.sockets {
            if let Poll::Ready(r) = s.socket.poll_recv_ready(cx) {
                return Poll::Ready(r);
            }
        }
        match &self.decap {
            Some(d) => d.poll_readable(cx),
            None => Poll::Pending,
        }
    }

    /// Takes one batch from each socket of what is already waiting, without blocking; returns
    /// how many datagrams it took.
    pub fn try_recv(&self, out: &mut Vec<Received>) -> io::Result<usize> {
        let mut n = 0;
        for s in &self.sockets {
            n += s.try_recv(out)?;
        }
        if let Some(d) = &self.decap {
            n += d.try_recv(out)?;
        }
        Ok(n)
    }

    /// The socket a transmit leaves through: the one bound to its source address (the VIP of its
    /// connection), else the first of the destination's address family.
    fn socket_for(&self, o: &Outgoing) -> Option<&UdpIo> {
        o.src_ip
            .and_then(|ip| self.sockets.iter().find(|s| s.local_ip == ip))
            .or_else(|| {
                self.sockets
                    .iter()
                    .find(|s| s.local_ip.is_ipv4() == o.destination.is_ipv4())
            })
    }

    /// Sends one transmit through the socket of its source VIP (see [`UdpIo::send`]), counting
    /// it, or its failure, in [`SendStats`].
    pub async fn send(&self, o: &Outgoing) -> io::Result<()> {
        let result = match self.socket_for(o) {
            Some(s) => s.send(o).await,
            None => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!(
                    "no VIP socket to send from {:?} to {}",
                    o.src_ip, o.destination
                ),
            )),
        };
        match &result {
            Ok(()) => self.stats.sent(o),
            Err(e) => self.stats.failed(o, e),
        }
        result
    }
}

fn get_int(fd: std::os::fd::RawFd, opt: libc::c_int) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket; `v` and `len` are valid for the call.
    let r =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &raw mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.max(0) as usize)
}

fn set_int(fd: std::os::fd::RawFd, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; `v` is a valid c_int for the call's duration.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for `bytes` of buffer with `opt` (SO_RCVBUF/SO_SNDBUF), which the kernel silently caps at
/// the net.core.{r,w}mem_max sysctl. If that left it short, tries `force` (SO_*BUFFORCE, which
/// ignores the cap but needs CAP_NET_ADMIN); without the capability the capped size stays.
fn set_buffer(
    fd: std::os::fd::RawFd,
    opt: libc::c_int,
    force: libc::c_int,
    bytes: usize,
) -> io::Result<()> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX / 2);
    set_int(fd, opt, want)?;
    // Linux reports twice the size set (the doubled value is what it accounts against).
    if get_int(fd, opt)? < bytes.saturating_mul(2) {
        match set_int(fd, force, want) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn vip_socket_gets_the_buffers_it_asks_for() {
        let want = 4 << 20;
        let big = UdpIo::bind_with_buffers("127.0.0.1:0".parse().unwrap(), want).unwrap();
        let (rcv, snd) = big.buffer_sizes();
        let plain = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (rcv0, _) = plain.buffer_sizes();
        // Root (CAP_NET_ADMIN) gets the full size whatever the sysctl cap; others get the cap.
        let root = unsafe { libc::geteuid() } == 0;
        let cap_r = if root {
            want
        } else {
            want.min(sysctl("rmem_max"))
        };
        let cap_w = if root {
            want
        } else {
            want.min(sysctl("wmem_max"))
        };
        assert!(rcv >= cap_r, "rcvbuf {rcv} < {cap_r} (default {rcv0})");
        assert!(snd >= cap_w, "sndbuf {snd} < {cap_w}");
        if root {
            assert!(rcv > rcv0, "rcvbuf {rcv} not above the default {rcv0}");
        }
    }
}
