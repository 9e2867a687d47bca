//! Worker health checks. A worker that fails `fall` probes in a row leaves the Maglev table (new
//! connections stop going to it; connections it already owns keep routing by server ID); `rise`
//! successes bring it back.
use crate::config::{Health, HealthKind};
use crate::controller::Controller;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpStream, UdpSocket};

/// One probe: true if the worker answered in time.
pub async fn probe(h: &Health, addr: IpAddr) -> bool {
    let target = SocketAddr::new(addr, h.port);
    match h.kind {
        HealthKind::None => true,
        HealthKind::Tcp => matches!(
            tokio::time::timeout(h.timeout, TcpStream::connect(target)).await,
            Ok(Ok(_))
        ),
        HealthKind::Udp => {
            let bind: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(sock) = UdpSocket::bind(bind).await else {
                return false;
            };
            if sock.connect(target).await.is_err() || sock.send(&h.payload).await.is_err() {
                return false;
            }
            let mut buf = [0u8; 1500];
            // Any answer counts; an ICMP port-unreachable surfaces as an error.
            matches!(
                tokio::time::timeout(h.timeout, sock.recv(&mut buf)).await,
                Ok(Ok(_))
            )
        }
    }
}

/// Probes every worker once and takes the results as their state (used before the first sync of
/// a fresh start, so a dead worker never enters the table).
pub async fn initial_round(ctl: &Arc<Mutex<Controller>>) {
    let (h, targets) = {
        let c = ctl.lock().unwrap();
        if c.cfg.health.kind == HealthKind::None {
            return;
        }
        (
            c.cfg.health.clone(),
            c.workers
                .iter()
                .map(|w| (w.cfg.name.clone(), w.cfg.address))
                .collect::<Vec<_>>(),
        )
    };
    let results = probe_all(&h, targets.iter().map(|(_, a)| *a).collect()).await;
    let mut c = ctl.lock().unwrap();
    for ((name, _), ok) in targets.iter().zip(results) {
        if !ok {
            tracing::warn!(worker = %name, "worker failed its first health check: kept out of the Maglev table");
        }
        c.set_healthy(name, ok);
    }
}

/// Probes all addresses concurrently (sequential probes would multiply the timeout).
async fn probe_all(h: &Health, addrs: Vec<IpAddr>) -> Vec<bool> {
    let handles: Vec<_> = addrs
        .into_iter()
        .map(|a| {
            let h = h.clone();
            tokio::spawn(async move { probe(&h, a).await })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap_or(false));
    }
    out
}

/// Runs forever: probes on the configured interval, applies rise/fall, re-resolves MACs
/// configured as "auto" about every 5 s, and syncs the maps when anything changed. Workers and
/// settings are read afresh every round, so a config reload takes effect at the next probe.
pub async fn run(ctl: Arc<Mutex<Controller>>) {
    // Per worker name: (state the streak counts against, consecutive contrary results).
    let mut streaks: HashMap<String, (bool, u32)> = HashMap::new();
    let mut last_neigh = tokio::time::Instant::now();
    loop {
        let interval = ctl
            .lock()
            .unwrap()
            .cfg
            .health
            .interval
            .max(Duration::from_millis(50));
        tokio::time::sleep(interval).await;
        let (h, targets) = {
            let c = ctl.lock().unwrap();
            let targets: Vec<Target> = c
                .workers
                .iter()
                .map(|w| Target {
                    name: w.cfg.name.clone(),
                    address: w.cfg.address,
                    next_hop: w.next_hop,
                    tx_interface: w.tx_interface.clone(),
                    auto_mac: matches!(w.cfg.mac, crate::config::MacSetting::Auto),
                    healthy: w.healthy,
                })
                .collect();
            (c.cfg.health.clone(), targets)
        };
        streaks.retain(|name, _| targets.iter().any(|t| &t.name == name));
        let results = if h.kind == HealthKind::None {
            vec![true; targets.len()]
        } else {
            probe_all(&h, targets.iter().map(|t| t.address).collect()).await
        };
        let mut changed = false;
        {
            let mut c = ctl.lock().unwrap();
            for (t, ok) in targets.iter().zip(results) {
                let (state, n) = streaks.entry(t.name.clone()).or_insert((t.healthy, 0));
                if ok == *state {
                    *n = 0;
                    continue;
                }
                *n += 1;
                let needed = if ok { h.rise } else { h.fall };
                if *n >= needed {
                    *state = ok;
                    *n = 0;
                    if ok {
                        tracing::info!(worker = %t.name, "worker is healthy again: back in the Maglev table");
                    } else {
                        tracing::warn!(worker = %t.name, failures = needed, "worker failed its health checks: removed from the Maglev table");
                    }
                    changed |= c.set_healthy(&t.name, ok);
                }
            }
        }
        // Neighbour entries change when a worker is replaced; look again every ~5 s.
        if last_neigh.elapsed() >= Duration::from_secs(5) {
            last_neigh = tokio::time::Instant::now();
            for t in targets.iter().filter(|t| t.auto_mac) {
                let (addr, dev) = (t.next_hop, t.tx_interface.clone());
                let res = tokio::task::spawn_blocking(move || {
                    crate::neigh::resolve_mac(addr, &dev, Duration::from_millis(500))
                })
                .await;
                if let Ok(Ok(mac)) = res {
                    changed |= ctl.lock().unwrap().set_mac(&t.name, mac);
                }
            }
        }
        if changed {
            if let Err(e) = ctl.lock().unwrap().sync() {
                tracing::error!(error = %format!("{e:#}"), "writing the maps after a health change failed");
            }
        }
    }
}

struct Target {
    name: String,
    address: IpAddr,
    /// Whose MAC the worker's frames carry (the gateway, when encapsulated).
    next_hop: IpAddr,
    tx_interface: String,
    auto_mac: bool,
    healthy: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(kind: HealthKind, port: u16) -> Health {
        Health {
            kind,
            port,
            payload: b"ping".to_vec(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
            rise: 1,
            fall: 1,
        }
    }

    #[tokio::test]
    async fn tcp_and_udp_probes_tell_up_from_down() {
        let lo: IpAddr = [127, 0, 0, 1].into();
        let tcp = tokio::net::TcpListener::bind((lo, 0)).await.unwrap();
        let tcp_port = tcp.local_addr().unwrap().port();
        assert!(probe(&health(HealthKind::Tcp, tcp_port), lo).await);
        drop(tcp);
        assert!(
            !probe(&health(HealthKind::Tcp, tcp_port), lo).await,
            "closed TCP port must fail"
        );

        let udp = tokio::net::UdpSocket::bind((lo, 0)).await.unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], from).await;
            }
        });
        assert!(probe(&health(HealthKind::Udp, udp_port), lo).await);
        // A port nobody listens on answers with ICMP port unreachable.
        let silent = std::net::UdpSocket::bind((lo, 0)).unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        drop(silent);
        assert!(!probe(&health(HealthKind::Udp, silent_port), lo).await);
    }
}
