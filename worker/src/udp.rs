//! The VIP socket through quinn-udp: GRO on receive, GSO and ECN on send, source address control.
use crate::core::Outgoing;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use tokio::io::Interest;

pub struct UdpIo {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
}

/// One received datagram.
pub struct Received {
    pub from: SocketAddr,
    pub ecn: Option<u8>,
    pub data: Vec<u8>,
}

impl UdpIo {
    /// Binds `addr` (the VIP and port) on the current tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        Ok(Self {
            socket: tokio::net::UdpSocket::from_std(std)?,
            state,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Datagrams a transmit may carry (GSO segments); 1 without GSO.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Whether the kernel may fragment what we send (then path MTU discovery stays off).
    pub fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    /// Receives at least one datagram (several with GRO) into `out`.
    pub async fn recv(&self, out: &mut Vec<Received>) -> io::Result<()> {
        let mut buf = vec![0u8; 65535 * self.state.gro_segments().clamp(1, 8)];
        let mut meta = [RecvMeta::default()];
        loop {
            self.socket.readable().await?;
            let mut bufs = [IoSliceMut::new(&mut buf)];
            match self.socket.try_io(Interest::READABLE, || {
                self.state.recv((&self.socket).into(), &mut bufs, &mut meta)
            }) {
                Ok(n) => {
                    for m in &meta[..n] {
                        let stride = m.stride.max(1);
                        for chunk in buf[..m.len].chunks(stride) {
                            out.push(Received {
                                from: m.addr,
                                ecn: m.ecn.map(|e| e as u8),
                                data: chunk.to_vec(),
                            });
                        }
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
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
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state.send((&self.socket).into(), &transmit)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
