//! `stock-quinn`: the demo protocol (docs/DEMO-PROTOCOL.md) on crates.io quinn, written the
//! ordinary quinn/tokio way: a task per connection, a task per stream, `read_to_end` for a
//! request, a read-a-chunk/write-it loop for a long stream (so the peer's flow control pushes
//! back on us and ours on the client). The baseline `cargo xtask bench --only worker` compares
//! `baton-worker` against: same certificate, ALPN, cipher suites and socket buffers as the worker.
use anyhow::{Context, Result};
use clap::Parser;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lb_common::demo::{ALPN, KIND_REQUEST, KIND_STREAM, MAX_REQUEST as MAX_BODY};
/// Application error code of STOP_SENDING/RESET_STREAM for a bad stream.
const BAD_STREAM: u32 = 1;
/// Largest chunk a long stream reads before writing it back.
const CHUNK: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "The demo protocol (baton-demo/1) on stock quinn: a benchmark baseline")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// PEM certificate chain.
    #[arg(long)]
    cert: PathBuf,
    /// PEM private key.
    #[arg(long)]
    key: PathBuf,
    /// Receive and send buffer of the socket in bytes, applied like baton-worker's
    /// `socket_buffer` (SO_*BUFFORCE when the plain option is capped); 0: the kernel's default.
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let certs = rustls::pki_types::pem::PemObject::pem_file_iter(&args.cert)
        .with_context(|| format!("reading {}", args.cert.display()))?
        .collect::<Result<Vec<rustls::pki_types::CertificateDer<'static>>, _>>()?;
    let key: rustls::pki_types::PrivateKeyDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_file(&args.key)
            .with_context(|| format!("reading {}", args.key.display()))?;
    // The worker's TLS: 1.3 only, AES-GCM suites only, no 0-RTT.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));

    let socket = std::net::UdpSocket::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    if args.socket_buffer > 0 {
        let fd = socket.as_raw_fd();
        set_buffer(
            fd,
            libc::SO_RCVBUF,
            libc::SO_RCVBUFFORCE,
            args.socket_buffer,
        )?;
        set_buffer(
            fd,
            libc::SO_SNDBUF,
            libc::SO_SNDBUFFORCE,
            args.socket_buffer,
        )?;
    }
    eprintln!(
        "stock-quinn: listening on {} (socket buffers: receive {} B, send {} B)",
        socket.local_addr()?,
        get_int(socket.as_raw_fd(), libc::SO_RCVBUF)?,
        get_int(socket.as_raw_fd(), libc::SO_SNDBUF)?,
    );
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => { tokio::spawn(connection(incoming)); }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    endpoint.close(0u32.into(), b"bye");
    Ok(())
}

/// One connection: every bidirectional stream the client opens, each in its own task.
async fn connection(incoming: quinn::Incoming) {
    let Ok(conn) = incoming.await else { return };
    // The session's request counter: the number of the last completed request.
    let completed = Arc::new(AtomicU64::new(0));
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(stream(send, recv, completed.clone()));
    }
}

async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    completed: Arc<AtomicU64>,
) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    match kind[0] {
        KIND_REQUEST => match recv.read_to_end(MAX_BODY).await {
            Ok(body) => {
                // Numbered when its FIN arrived.
                let n = completed.fetch_add(1, Ordering::Relaxed) + 1;
                if send.write_all(&n.to_be_bytes()).await.is_ok()
                    && send.write_all(&body).await.is_ok()
                {
                    let _ = send.finish();
                }
            }
            Err(quinn::ReadToEndError::TooLong) => refuse(send, recv),
            Err(_) => {}
        },
        KIND_STREAM => loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    if send.write_chunk(chunk.bytes).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = send.finish();
                    return;
                }
                Err(_) => return,
            }
        },
        _ => refuse(send, recv),
    }
}

/// STOP_SENDING and RESET_STREAM with code 1.
fn refuse(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let _ = recv.stop(BAD_STREAM.into());
    let _ = send.reset(BAD_STREAM.into());
}

fn set_int(fd: i32, opt: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_int(fd: i32, opt: libc::c_int) -> std::io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own into a live c_int of the given size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(value.max(0) as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks for `bytes`; when the plain option is capped (net.core.rmem_max/wmem_max), the FORCE
/// variant (needs CAP_NET_ADMIN; without it the capped size stays). Linux reports twice the size.
fn set_buffer(fd: i32, opt: libc::c_int, force: libc::c_int, bytes: usize) -> std::io::Result<()> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX / 2);
    set_int(fd, opt, want)?;
    if get_int(fd, opt)? < bytes.saturating_mul(2) {
        match set_int(fd, force, want) {
            Err(e) if e.raw_os_error() != Some(libc::EPERM) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
