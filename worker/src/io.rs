//! The tokio I/O loop around [`WorkerCore`], and a handle to control it.
use crate::core::{ConnInfo, ExportFailure, Exported, Outgoing, WorkerCore};
use crate::udp::{Received, UdpIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use zeroize::Zeroizing;

/// Where the worker's datagrams come from: its own socket (bound to the VIP), or a channel (tests,
/// or a dispatcher in front of several workers). It always sends from the VIP socket.
pub enum Inbound {
    Socket,
    Channel(mpsc::Receiver<Received>),
}

enum Command {
    List(oneshot::Sender<Vec<ConnInfo>>),
    Migrate {
        id: usize,
        timeout: Duration,
        reply: oneshot::Sender<Result<Exported, String>>,
    },
    Import {
        bytes: Zeroizing<Vec<u8>>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Inject(Vec<(SocketAddr, Vec<u8>)>),
    TakeForward(oneshot::Sender<Vec<(SocketAddr, Vec<u8>)>>),
    TakeForwardFor(Vec<Vec<u8>>, oneshot::Sender<Vec<(SocketAddr, Vec<u8>)>>),
    Forget(Vec<Vec<u8>>),
}

/// Controls a running worker loop.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
}

fn gone<T>(_: T) -> String {
    "worker loop ended".into()
}

impl WorkerHandle {
    pub async fn connections(&self) -> Result<Vec<ConnInfo>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::List(reply)).await.map_err(gone)?;
        rx.await.map_err(gone)
    }

    /// Freeze connection `id`, wait (up to `timeout`) until it is quiescent, export it. On timeout
    /// the connection is un-frozen and carries on here.
    pub async fn migrate_out(&self, id: usize, timeout: Duration) -> Result<Exported, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Migrate { id, timeout, reply })
            .await
            .map_err(gone)?;
        rx.await.map_err(gone)?
    }

    /// Imports a connection another worker exported (the bytes hold secrets: zeroized on drop).
    pub async fn import(&self, bytes: Zeroizing<Vec<u8>>) -> Result<usize, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Import { bytes, reply })
            .await
            .map_err(gone)?;
        rx.await.map_err(gone)?
    }

    /// Hands this worker datagrams another worker kept for a connection now imported here.
    pub async fn inject(&self, datagrams: Vec<(SocketAddr, Vec<u8>)>) -> Result<(), String> {
        self.tx.send(Command::Inject(datagrams)).await.map_err(gone)
    }

    pub async fn take_forward(&self) -> Result<Vec<(SocketAddr, Vec<u8>)>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::TakeForward(reply))
            .await
            .map_err(gone)?;
        rx.await.map_err(gone)
    }

    /// Datagrams kept for one exported connection (addressed to `cids`).
    pub async fn take_forward_for(
        &self,
        cids: Vec<Vec<u8>>,
    ) -> Result<Vec<(SocketAddr, Vec<u8>)>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::TakeForwardFor(cids, reply))
            .await
            .map_err(gone)?;
        rx.await.map_err(gone)
    }

    pub async fn forget_exported(&self, cids: Vec<Vec<u8>>) -> Result<(), String> {
        self.tx.send(Command::Forget(cids)).await.map_err(gone)
    }
}

struct PendingExport {
    id: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<Exported, String>>,
}

/// Starts the loop on the current tokio runtime.
pub fn spawn(
    core: WorkerCore,
    socket: Arc<UdpIo>,
    inbound: Inbound,
) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(run(core, socket, inbound, rx));
    (WorkerHandle { tx }, task)
}

async fn send_all(socket: &UdpIo, out: &mut Vec<Outgoing>) {
    for o in out.drain(..) {
        if let Err(e) = socket.send(&o).await {
            debug!("send to {} failed: {e}", o.destination);
        }
    }
}

async fn run(
    mut core: WorkerCore,
    socket: Arc<UdpIo>,
    mut inbound: Inbound,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut received = Vec::new();
    let mut out = Vec::new();
    let gso = socket.max_gso_segments().max(1);
    let mut pending: Vec<PendingExport> = Vec::new();
    loop {
        let now = Instant::now();
        core.poll(now, gso, &mut out);
        // Freezes in progress: export when quiescent, roll back at the deadline.
        let mut still = Vec::new();
        for p in pending.drain(..) {
            match core.export(p.id, now) {
                Ok(exported) => {
                    let _ = p.reply.send(Ok(exported));
                }
                Err(ExportFailure::NotQuiescent(reason)) if now < p.deadline => {
                    debug!(id = p.id, %reason, "waiting for quiescence");
                    still.push(p);
                }
                Err(e) => {
                    core.unfreeze(p.id);
                    warn!(id = p.id, "migration rolled back: {e}");
                    let _ = p.reply.send(Err(e.to_string()));
                }
            }
        }
        pending = still;
        send_all(&socket, &mut out).await;

        let mut wake = core.next_timeout().unwrap_or(now + Duration::from_secs(1));
        if !pending.is_empty() {
            wake = wake.min(now + Duration::from_millis(1));
        }
        let sleep = tokio::time::sleep_until(wake.into());
        tokio::select! {
            r = async {
                match &mut inbound {
                    Inbound::Socket => socket.recv(&mut received).await.map(|()| true),
                    Inbound::Channel(rx) => Ok(match rx.recv().await {
                        Some(d) => {
                            received.push(d);
                            true
                        }
                        None => false,
                    }),
                }
            } => match r {
                Ok(true) => {
                    let now = Instant::now();
                    for d in received.drain(..) {
                        core.handle(now, d.from, d.ecn, &d.data, &mut out);
                    }
                }
                Ok(false) => return,
                Err(e) => warn!("receive failed: {e}"),
            },
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::List(reply)) => { let _ = reply.send(core.connections()); }
                Some(Command::Migrate { id, timeout, reply }) => {
                    if core.freeze(id) {
                        pending.push(PendingExport { id, deadline: Instant::now() + timeout, reply });
                    } else {
                        let _ = reply.send(Err(format!("no connection {id}")));
                    }
                }
                Some(Command::Import { bytes, reply }) => {
                    let _ = reply.send(core.import(&bytes, Instant::now()).map_err(|e| e.to_string()));
                }
                Some(Command::Inject(datagrams)) => {
                    for (from, data) in datagrams {
                        core.handle(Instant::now(), from, None, &data, &mut out);
                    }
                }
                Some(Command::TakeForward(reply)) => { let _ = reply.send(core.take_forward()); }
                Some(Command::TakeForwardFor(cids, reply)) => { let _ = reply.send(core.take_forward_for(&cids)); }
                Some(Command::Forget(cids)) => core.forget_exported(&cids),
            },
            _ = sleep => {}
        }
    }
}
