//! Two worker loops behind one VIP socket on loopback, with a userspace stand-in for the XDP load
//! balancer: it routes by the CID's server ID, with per-CID overrides during a handoff (long
//! headers go to worker 0); the workers send straight from the VIP socket, like direct server
//! return. Any service: the demo's or the HTTP/3 proxy.
use baton_worker::core::{CoreConfig, Exported, WorkerCore};
use baton_worker::io::{Inbound, WorkerHandle, spawn};
use baton_worker::service::Service;
use baton_worker::udp::{UdpIo, VipSockets};
use lb_common::cid::CidLayout;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub struct Lab {
    pub vip: SocketAddr,
    pub workers: [WorkerHandle; 2],
    pub overrides: Arc<Mutex<HashMap<Vec<u8>, usize>>>,
    /// While set, the stand-in LB hands every datagram to the workers with this source address
    /// instead of the client's (a NAT rebinding to an address that never answers).
    pub rewrite_source: Arc<Mutex<Option<SocketAddr>>>,
    /// The service certificate (self-signed for `localhost`).
    pub cert: rustls::pki_types::CertificateDer<'static>,
}

impl Lab {
    /// Both workers serve `service` (one instance for both, as two processes would run the
    /// same configuration).
    pub async fn start(service: Arc<dyn Service>) -> Lab {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = certified.cert.der().clone();
        let key_der = certified.key_pair.serialize_der();
        let socket = Arc::new(VipSockets::single(
            UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
        ));
        let vip = socket.sockets()[0].local_addr().unwrap();
        let layout = CidLayout::default();
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for server_id in [1u64, 2] {
            let core = WorkerCore::new(
                CoreConfig {
                    server_id,
                    layout,
                    certs: vec![cert.clone()],
                    key: rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.clone().into()),
                    vips: vec![vip.ip()],
                    allow_mtud: !socket.may_fragment(),
                    limits: Default::default(),
                },
                service.clone(),
            )
            .unwrap();
            let (tx, rx) = mpsc::channel(4096);
            let (handle, _task) = spawn(core, socket.clone(), Inbound::Channel(rx));
            senders.push(tx);
            handles.push(handle);
        }
        let overrides: Arc<Mutex<HashMap<Vec<u8>, usize>>> = Arc::default();
        let routes = overrides.clone();
        let rewrite_source: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let rewrite = rewrite_source.clone();
        tokio::spawn(async move {
            let mut received = Vec::new();
            loop {
                if socket.recv(&mut received).await.is_err() {
                    return;
                }
                for mut d in received.drain(..) {
                    if let Some(from) = *rewrite.lock().unwrap() {
                        d.from = from;
                    }
                    let w = if d.data[0] & 0x80 != 0 {
                        0 // Initials and other long headers: worker A (the real LB hashes them)
                    } else {
                        let cid = &d.data[1..1 + layout.cid_len()];
                        match routes.lock().unwrap().get(cid) {
                            Some(&w) => w,
                            None => match layout.decode_server_id(cid) {
                                Some(2) => 1,
                                _ => 0,
                            },
                        }
                    };
                    let _ = senders[w].send(d).await;
                }
            }
        });
        let [a, b]: [WorkerHandle; 2] = handles.try_into().ok().unwrap();
        Lab {
            vip,
            workers: [a, b],
            overrides,
            rewrite_source,
            cert,
        }
    }

    /// Hands an exported connection to worker `to` and flips the stand-in LB: the import, the
    /// datagrams kept at the source meanwhile, the overrides, then what arrived during the flip.
    pub async fn hand_over(&self, from: usize, to: usize, exported: Exported) {
        self.workers[to].import(exported.state).await.unwrap();
        let kept = self.workers[from].take_forward().await.unwrap();
        self.workers[to].inject(kept).await.unwrap();
        {
            let mut routes = self.overrides.lock().unwrap();
            for c in &exported.cids {
                routes.insert(c.clone(), to);
            }
        }
        for _ in 0..3 {
            let kept = self.workers[from].take_forward().await.unwrap();
            self.workers[to].inject(kept).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.workers[from]
            .forget_exported(exported.cids)
            .await
            .unwrap();
    }
}
