//! The tokio I/O loop around [`WorkerCore`], and a handle to control it.
use crate::core::{ConnInfo, ExportFailure, Exported, Outgoing, WorkerCore};
use crate::udp::{Received, VipSockets};
use bytes::BytesMut;
use migration::ConnectionState;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Where the worker's datagrams come from: its own sockets (one bound to each VIP), or a channel
/// (tests, or a dispatcher in front of several workers). It always sends from the VIP sockets.
pub enum Inbound {
    Socket,
    Channel(mpsc::Receiver<Received>),
}

enum Command {
    List(oneshot::Sender<Vec<ConnInfo>>),
    Migrate {
        id: usize,
        timeout: Duration,
        reply: oneshot::Sender<Result<Exported, ExportFailure>>,
    },
    Import {
        state: ConnectionState,
        held: bool,
        /// The server ID of the worker that sent it (None: a local rollback or a test).
        source: Option<u32>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Commit(usize, oneshot::Sender<bool>),
    Discard(usize),
    Inject(Vec<(SocketAddr, Vec<u8>)>),
    /// Datagrams another worker (this server ID) forwarded: checked before they are handled.
    InjectFromPeer(u32, Vec<(SocketAddr, Vec<u8>)>),
    TakeForward(oneshot::Sender<Vec<(SocketAddr, Vec<u8>)>>),
    TakeForwardFor(Vec<Vec<u8>>, oneshot::Sender<Vec<(SocketAddr, Vec<u8>)>>),
    Forget(Vec<Vec<u8>>),
    /// The end of one export's forwarding: its key and CIDs ([`WorkerCore::forget_export`]).
    ForgetExport(u64, Vec<Vec<u8>>),
    Find(Vec<u8>, oneshot::Sender<Option<usize>>),
    SubscribeForward(u64, mpsc::UnboundedSender<Vec<(SocketAddr, Vec<u8>)>>),
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

    /// Freeze connection `id`, wait (up to `timeout`) until it can be exported, export it. On timeout
    /// the connection is un-frozen and carries on here.
    pub async fn migrate_out(
        &self,
        id: usize,
        timeout: Duration,
    ) -> Result<Exported, ExportFailure> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Migrate { id, timeout, reply })
            .await
            .map_err(|_| ExportFailure::LoopEnded)?;
        rx.await.map_err(|_| ExportFailure::LoopEnded)?
    }

    /// Imports a connection another worker exported ([`Exported::state`], opened from its
    /// envelope; it holds secrets and is zeroized on drop). It is live at once: use this only
    /// when no other worker can send for it (a rollback).
    pub async fn import(&self, state: ConnectionState) -> Result<usize, String> {
        self.import_with(state, false, None).await
    }

    /// Imports a connection that sends nothing until [`commit`](Self::commit) (or is dropped
    /// silently by [`discard`](Self::discard)).
    pub async fn import_held(&self, state: ConnectionState) -> Result<usize, String> {
        self.import_with(state, true, None).await
    }

    /// [`import_held`](Self::import_held) of a connection the worker with server ID `source`
    /// sent: it may then forward the connection's late datagrams ([`inject_from_peer`](Self::inject_from_peer)).
    pub async fn import_held_from(
        &self,
        state: ConnectionState,
        source: u32,
    ) -> Result<usize, String> {
        self.import_with(state, true, Some(source)).await
    }

    async fn import_with(
        &self,
        state: ConnectionState,
        held: bool,
        source: Option<u32>,
    ) -> Result<usize, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Import {
                state,
                held,
                source,
                reply,
            })
            .await
            .map_err(gone)?;
        rx.await.map_err(gone)?
    }

    /// Makes a held import this worker's to send for. False if `id` is not a held import.
    pub async fn commit(&self, id: usize) -> Result<bool, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Commit(id, reply))
            .await
            .map_err(gone)?;
        rx.await.map_err(gone)
    }

    /// Drops a held import without it ever sending.
    pub async fn discard(&self, id: usize) -> Result<(), String> {
        self.tx.send(Command::Discard(id)).await.map_err(gone)
    }

    /// Hands this worker datagrams another worker kept for a connection now imported here.
    pub async fn inject(&self, datagrams: Vec<(SocketAddr, Vec<u8>)>) -> Result<(), String> {
        self.tx.send(Command::Inject(datagrams)).await.map_err(gone)
    }

    /// Datagrams the worker with server ID `source` forwarded over the peer channel: handled
    /// only if they are for a connection imported from it, from its client's address
    /// ([`WorkerCore::handle_forwarded`]); the rest are dropped.
    pub async fn inject_from_peer(
        &self,
        source: u32,
        datagrams: Vec<(SocketAddr, Vec<u8>)>,
    ) -> Result<(), String> {
        self.tx
            .send(Command::InjectFromPeer(source, datagrams))
            .await
            .map_err(gone)
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

    /// Forgets the CIDs of export `key` that still belong to it ([`WorkerCore::forget_export`]).
    pub async fn forget_export(&self, key: u64, cids: Vec<Vec<u8>>) -> Result<(), String> {
        self.tx
            .send(Command::ForgetExport(key, cids))
            .await
            .map_err(gone)
    }

    /// The worker-local id of the connection named `key` (the client's first Initial DCID).
    pub async fn find(&self, key: Vec<u8>) -> Result<Option<usize>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Find(key, reply))
            .await
            .map_err(gone)?;
        rx.await.map_err(gone)
    }

    /// Delivers the datagrams kept for one export (its [`Exported::forward_key`]) to `tx` as they
    /// arrive, until the receiver is dropped or the export is forgotten.
    pub async fn subscribe_forward(
        &self,
        forward_key: u64,
        tx: mpsc::UnboundedSender<Vec<(SocketAddr, Vec<u8>)>>,
    ) -> Result<(), String> {
        self.tx
            .send(Command::SubscribeForward(forward_key, tx))
            .await
            .map_err(gone)
    }
}

/// Starts the loop on the current tokio runtime.
pub fn spawn(
    core: WorkerCore,
    socket: Arc<VipSockets>,
    inbound: Inbound,
) -> (WorkerHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(run(core, socket, inbound, rx));
    (WorkerHandle { tx }, task)
}

async fn send_all(socket: &VipSockets, out: &mut Vec<Outgoing>) {
    for o in out.drain(..) {
        // Counted and logged by the sockets (SendStats).
        let _ = socket.send(&o).await;
    }
}

/// Receive batches taken from the socket before the connections are driven: enough to empty a
/// busy socket's queue in one go, few enough that commands and timers are not kept waiting.
const RECV_BATCHES_PER_TURN: usize = 16;
/// Commands handled per turn, for the same reason.
const COMMANDS_PER_TURN: usize = 256;

/// The loop: take what has arrived (datagrams in batches, commands), drive only the connections
/// that need it, send, sleep until the next input or timer.
async fn run(
    mut core: WorkerCore,
    socket: Arc<VipSockets>,
    mut inbound: Inbound,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut received = Vec::new();
    let mut out = Vec::new();
    let mut export_replies: HashMap<usize, oneshot::Sender<Result<Exported, ExportFailure>>> =
        HashMap::new();
    let woken = core.woken();
    let mut forwarders = Forwarders::new();
    loop {
        let now = Instant::now();
        // Read every turn: quinn-udp turns GSO off if the kernel refuses it.
        core.poll(now, socket.max_gso_segments().max(1), &mut out);
        for (id, result) in core.take_export_results() {
            if let Some(reply) = export_replies.remove(&id) {
                let _ = reply.send(result);
            }
        }
        send_all(&socket, &mut out).await;
        if core.has_work() {
            // The poll left work (a freeze rolled back un-freezes its connection): no sleep.
            tokio::task::yield_now().await;
        } else {
            let wake = core.next_timeout().unwrap_or(now + Duration::from_secs(1));
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
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => warn!("receive failed: {e}"),
                },
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(cmd) => command(&mut core, cmd, &mut export_replies, &mut forwarders, &mut out),
                },
                // A session's own task has something for its connection.
                () = woken.notify.notified() => {}
                _ = sleep => {}
            }
        }
        // Take everything else that is already waiting, without blocking.
        for _ in 0..RECV_BATCHES_PER_TURN {
            let more = match &mut inbound {
                Inbound::Socket => match socket.try_recv(&mut received) {
                    Ok(n) => n > 0,
                    Err(e) => {
                        warn!("receive failed: {e}");
                        false
                    }
                },
                Inbound::Channel(rx) => match rx.try_recv() {
                    Ok(d) => {
                        received.push(d);
                        true
                    }
                    Err(_) => false,
                },
            };
            if !more {
                break;
            }
        }
        let now = Instant::now();
        for d in received.drain(..) {
            core.handle(now, d.from, Some(d.to), d.ecn, d.data, &mut out);
        }
        for _ in 0..COMMANDS_PER_TURN {
            match commands.try_recv() {
                Ok(cmd) => command(
                    &mut core,
                    cmd,
                    &mut export_replies,
                    &mut forwarders,
                    &mut out,
                ),
                Err(_) => break,
            }
        }
        deliver_forwarded(&mut core, &mut forwarders);
    }
}

/// Where the late datagrams of each export go (the migration layer forwards them to the target).
type Forwarders = HashMap<u64, mpsc::UnboundedSender<Vec<(SocketAddr, Vec<u8>)>>>;

fn deliver_forwarded(core: &mut WorkerCore, forwarders: &mut Forwarders) {
    for key in core.forward_pending() {
        if let Some(tx) = forwarders.get(&key) {
            if tx.send(core.take_forward_of(key)).is_err() {
                forwarders.remove(&key);
            }
        }
    }
}

fn command(
    core: &mut WorkerCore,
    cmd: Command,
    export_replies: &mut HashMap<usize, oneshot::Sender<Result<Exported, ExportFailure>>>,
    forwarders: &mut Forwarders,
    out: &mut Vec<Outgoing>,
) {
    let now = Instant::now();
    match cmd {
        Command::List(reply) => {
            let _ = reply.send(core.connections());
        }
        Command::Migrate { id, timeout, reply } => {
            if core.begin_export(id, now + timeout) {
                export_replies.insert(id, reply);
            } else {
                let _ = reply.send(Err(ExportFailure::Unknown(id)));
            }
        }
        Command::Import {
            state,
            held,
            source,
            reply,
        } => {
            let _ = reply.send(
                core.import_from(&state, now, held, source)
                    .map_err(|e| e.to_string()),
            );
        }
        Command::Commit(id, reply) => {
            let _ = reply.send(core.commit(id));
        }
        Command::Discard(id) => {
            core.discard(id);
        }
        Command::Inject(datagrams) => {
            // This worker's own (the datagrams kept during a rolled-back export) or a test's:
            // trusted, handled as if just received. A connection replies from its own VIP
            // whatever is given here.
            for (from, data) in datagrams {
                core.handle(now, from, None, None, BytesMut::from(&data[..]), out);
            }
        }
        Command::InjectFromPeer(source, datagrams) => {
            for (from, data) in datagrams {
                core.handle_forwarded(now, source, from, BytesMut::from(&data[..]), out);
            }
        }
        Command::TakeForward(reply) => {
            let _ = reply.send(core.take_forward());
        }
        Command::TakeForwardFor(cids, reply) => {
            let _ = reply.send(core.take_forward_for(&cids));
        }
        Command::Forget(cids) => {
            for key in core.forget_exported(&cids) {
                forwarders.remove(&key);
            }
        }
        Command::ForgetExport(key, cids) => {
            core.forget_export(key, &cids);
            forwarders.remove(&key);
        }
        Command::Find(key, reply) => {
            let _ = reply.send(core.find_by_key(&key));
        }
        Command::SubscribeForward(key, tx) => {
            // What arrived before the subscription goes out at once.
            let kept = core.take_forward_of(key);
            if kept.is_empty() || tx.send(kept).is_ok() {
                forwarders.insert(key, tx);
            }
        }
    }
}
