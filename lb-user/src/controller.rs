//! The controller's view of the workers and how it is written into the pinned maps.
//!
//! Every write is ordered so the data plane never sees a half-made state: new entries go in
//! before anything points at them, and stale entries go only after nothing points at them. A
//! restarted controller computes the same state from the same config, so its writes are no-ops
//! for the XDP program: restarts cannot drop or misroute packets.
use crate::config::{Config, Encap, HealthKind, MacSetting, Worker, format_mac};
use crate::maglev;
use crate::pinned::PinnedMaps;
use crate::{neigh, sys};
use anyhow::{Context, Result};
use lb_common::encap::EncapEntry;
use lb_common::{
    CidKey, LbConfig, MAGLEV_TABLE_SIZE, ServerIdKey, TX_SAME_IFACE, VipKey, VipValue,
    WORKER_HEALTHY, WORKER_IN_USE, WorkerEntry, WorkerRef,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ResolvedWorker {
    pub cfg: Worker,
    /// Slot in `BATON_WORKERS` (stable across restarts: matched by server ID).
    pub index: u32,
    /// `None` until the MAC is known; such a worker receives nothing.
    pub mac: Option<[u8; 6]>,
    pub tx_interface: String,
    /// Whose MAC frames to it carry: the worker itself (layer 2) or the gateway towards it.
    pub next_hop: IpAddr,
    pub tx_ifindex: u32,
    /// Devmap slot, or [`TX_SAME_IFACE`].
    pub tx_port: u32,
    pub healthy: bool,
    /// Its `BATON_WORKER_ENCAP` entry (zeroed: layer 2).
    pub encap: EncapEntry,
}

impl ResolvedWorker {
    pub fn usable(&self) -> bool {
        self.healthy && self.mac.is_some()
    }
}

/// What `baton workers` shows.
pub use baton_protocol::daemon::WorkerStatus;

pub struct Controller {
    pub cfg: Config,
    pub maps: PinnedMaps,
    pub workers: Vec<ResolvedWorker>,
    lb_ifindex: u32,
    /// Our copy of `BATON_MAGLEV`, so updates write only the slots that change.
    maglev: Vec<u32>,
    maglev_slots: HashMap<u32, u32>,
    /// The fast-path maps still need their full rebuild (see [`crate::fastpath`]).
    fastpath_rebuild: bool,
    /// A cluster node that has not read its worker set from etcd yet: the worker maps stay as
    /// pinned (a restart while etcd is down keeps forwarding), only VIPs and the config are
    /// written. Cleared by [`Controller::new`] with the cluster's workers.
    pub hold_workers: bool,
    /// Notified when a worker's health changes (a cluster node publishes it in etcd). Carried
    /// over when a reload or a new worker set replaces the controller.
    pub health_changed: Option<Arc<tokio::sync::Notify>>,
}

fn vip_key(addr: IpAddr, port: u16) -> VipKey {
    let mut k = VipKey {
        port,
        ..Default::default()
    };
    match addr {
        IpAddr::V4(a) => {
            k.addr[..4].copy_from_slice(&a.octets());
            k.family = lb_common::AF_INET;
        }
        IpAddr::V6(a) => {
            k.addr = a.octets();
            k.family = lb_common::AF_INET6;
        }
    }
    k
}

/// GUE outer source ports are this plus 14 bits of the flow hash (49152..65535: the dynamic
/// range, so they never look like a service to the routers and firewalls on the way).
const GUE_SOURCE_PORT_BASE: u16 = 0xc000;

/// The encapsulation entry of an encapsulated worker reached by `route` out of `dev`: outer
/// source from the config or the route, MTU from the config or the interface.
fn encap_entry(w: &Worker, route: &neigh::Route, dev: &str) -> Result<EncapEntry> {
    let source = w.encap_source.or(route.source).with_context(|| {
        format!(
            "the route to {} picks no source address: set encap_source to this host's address towards it",
            w.address
        )
    })?;
    anyhow::ensure!(
        source.is_ipv4() == w.address.is_ipv4(),
        "the outer source {source} and the worker's address {} are of different families",
        w.address
    );
    let mtu = match w.mtu {
        Some(m) => m,
        None => neigh::interface_mtu(dev)?,
    };
    let mut e = EncapEntry {
        mtu,
        ..Default::default()
    };
    match w.encap {
        Encap::None => return Ok(EncapEntry::default()),
        Encap::Ipip => e.mode = lb_common::encap::ENCAP_IPIP,
        Encap::Gue { port } => {
            e.mode = lb_common::encap::ENCAP_GUE;
            e.gue_port = port;
            e.gue_sport_base = GUE_SOURCE_PORT_BASE;
        }
    }
    let put = |out: &mut [u8; 16], ip: IpAddr| match ip {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => *out = a.octets(),
    };
    e.family = if w.address.is_ipv4() {
        lb_common::AF_INET
    } else {
        lb_common::AF_INET6
    };
    put(&mut e.src, source);
    put(&mut e.dst, w.address);
    crate::pinned::check_encap(&e)?;
    Ok(e)
}

impl Controller {
    /// Resolves where each worker is (tx interface, MAC) and which slot it keeps. Health starts
    /// from the map (a restart keeps what the previous controller knew). Workers the map does not
    /// know start healthy on a fresh start (the caller probes them once before the first
    /// [`Controller::sync`]) and unhealthy otherwise (restart, reload): with health checks on,
    /// they join the Maglev table after `health.rise` successful probes.
    pub fn new(cfg: Config, maps: PinnedMaps, fresh: bool) -> Result<Self> {
        let lb_ifindex = sys::if_nametoindex(&cfg.interface).with_context(|| {
            format!(
                "interface {:?} (config `interface`) does not exist here",
                cfg.interface
            )
        })?;
        let existing = maps.workers()?;
        let by_sid: HashMap<u64, (u32, WorkerEntry)> = existing
            .iter()
            .map(|(i, e)| (e.server_id, (*i, *e)))
            .collect();
        let taken: HashSet<u32> = existing.iter().map(|(i, _)| *i).collect();
        let mut assigned = HashSet::new();
        let max = maps.workers.len();

        let mut workers = Vec::new();
        let mut tx_slots: BTreeMap<u32, u32> = BTreeMap::new();
        for w in &cfg.workers {
            // Layer 2: the worker is the next hop. Encapsulated: the route's gateway is.
            let (tx_interface, next_hop, encap) = if w.encap == Encap::None {
                let dev = match &w.interface {
                    Some(i) => i.clone(),
                    None => neigh::route_interface(w.address).with_context(|| {
                        format!("worker {:?}: cannot find its interface", w.name)
                    })?,
                };
                (dev, w.address, EncapEntry::default())
            } else {
                let route = neigh::route(w.address)
                    .with_context(|| format!("worker {:?}: cannot find its route", w.name))?;
                let dev = w.interface.clone().unwrap_or_else(|| route.dev.clone());
                let encap = encap_entry(w, &route, &dev).with_context(|| {
                    format!("worker {:?}: encap = {:?}", w.name, w.encap.name())
                })?;
                (dev, route.next_hop(w.address), encap)
            };
            let tx_ifindex = sys::if_nametoindex(&tx_interface).with_context(|| {
                format!(
                    "worker {:?}: interface {tx_interface:?} does not exist here",
                    w.name
                )
            })?;
            let tx_port = if tx_ifindex == lb_ifindex {
                TX_SAME_IFACE
            } else {
                let next = tx_slots.len() as u32;
                *tx_slots.entry(tx_ifindex).or_insert(next)
            };
            let previous = by_sid.get(&w.server_id);
            let index = match previous {
                Some((i, _)) => *i,
                None => (0..max)
                    .find(|i| !taken.contains(i) && !assigned.contains(i))
                    .or_else(|| (0..max).find(|i| !assigned.contains(i)))
                    .context("no free worker slot")?,
            };
            assigned.insert(index);
            let mac = match w.mac {
                MacSetting::Fixed(m) => Some(m),
                MacSetting::Auto => {
                    match neigh::resolve_mac(next_hop, &tx_interface, Duration::from_secs(3)) {
                        Ok(m) => Some(m),
                        Err(e) => {
                            // Keep what the previous controller used rather than dropping its traffic.
                            let kept = previous.map(|(_, e)| e.mac).filter(|m| *m != [0; 6]);
                            tracing::warn!(worker = %w.name, error = %format!("{e:#}"), kept = ?kept.map(|m| format_mac(&m)), "MAC not resolved");
                            kept
                        }
                    }
                }
            };
            let healthy = match (cfg.health.kind, previous) {
                (HealthKind::None, _) => true,
                (_, Some((_, e))) => e.flags & WORKER_HEALTHY != 0,
                (_, None) => fresh,
            };
            workers.push(ResolvedWorker {
                cfg: w.clone(),
                index,
                mac,
                tx_interface,
                next_hop,
                tx_ifindex,
                tx_port,
                healthy,
                encap,
            });
        }
        let dev_len = maps.tx_ports.len();
        if tx_slots.len() as u32 > dev_len {
            anyhow::bail!(
                "workers use {} tx interfaces but the devmap holds {dev_len}",
                tx_slots.len()
            );
        }
        // Start from what the data plane has, so the first sync only writes differences.
        let mut maglev = Vec::with_capacity(MAGLEV_TABLE_SIZE as usize);
        for i in 0..maps.maglev.len() {
            maglev.push(maps.maglev.get(&i, 0).unwrap_or(u32::MAX));
        }
        Ok(Self {
            cfg,
            maps,
            workers,
            lb_ifindex,
            maglev,
            maglev_slots: HashMap::new(),
            fastpath_rebuild: true,
            hold_workers: false,
            health_changed: None,
        })
    }

    /// Writes the whole state into the maps (idempotent).
    pub fn sync(&mut self) -> Result<()> {
        let size = if self.hold_workers {
            // Whatever the pinned config says: the pinned workers and table keep routing.
            self.maps.lb_config().map_or(0, |c| c.maglev_size)
        } else {
            self.sync_workers()?
        };
        self.sync_rest(size)
    }

    /// Steps 1 to 3 of [`Self::sync`]: the workers, their server IDs, the Maglev table. Returns
    /// the Maglev size.
    fn sync_workers(&mut self) -> Result<u32> {
        let m = &mut self.maps;
        // 1. Devmap slots and worker entries, before anything routes to them.
        for w in &self.workers {
            if w.tx_port != TX_SAME_IFACE {
                m.tx_ports
                    .set(w.tx_port, w.tx_ifindex, None, 0)
                    .with_context(|| {
                        format!("cannot set devmap slot {} to {}", w.tx_port, w.tx_interface)
                    })?;
            }
        }
        // The healthy bit is only raised after the Maglev table includes the worker (step 3b), so
        // whoever reads it (the CLI, a test) sees a state the data plane already routes by.
        self.write_worker_entries(false)?;
        let m = &mut self.maps;
        // 2. Server IDs.
        let current_sids: HashMap<u64, u32> = m.server_ids()?.into_iter().collect();
        for w in &self.workers {
            if w.mac.is_some() && current_sids.get(&w.cfg.server_id) != Some(&w.index) {
                m.server_ids.insert(
                    ServerIdKey {
                        server_id: w.cfg.server_id,
                    },
                    WorkerRef { worker: w.index },
                    0,
                )?;
                // Authoritative map first, then its fast-path mirror.
                if let Some(fp) = &m.fastpath {
                    fp.set_server_id(w.cfg.server_id, w.index);
                }
            }
        }
        // 3. Maglev over usable workers, then the healthy bits.
        let size = self.write_maglev()?;
        self.write_worker_entries(true)?;
        Ok(size)
    }

    /// Steps 4 to 7 of [`Self::sync`]: VIPs, the global config, removals, the fast path.
    fn sync_rest(&mut self, size: u32) -> Result<()> {
        // 4. VIPs.
        let m = &mut self.maps;
        let wanted: HashSet<VipKey> = self
            .cfg
            .vips
            .iter()
            .flat_map(|v| v.ports.iter().map(move |p| vip_key(v.address, *p)))
            .collect();
        let present: HashSet<VipKey> = m.vips()?.into_iter().collect();
        for k in wanted.difference(&present) {
            m.vips.insert(*k, VipValue { flags: 1 }, 0)?;
        }
        let vips_changed = wanted != present;
        if let (true, Some(fp)) = (vips_changed, m.fastpath.as_mut()) {
            fp.sync_vips(&m.vips)?;
        }
        // Every time, not only on change: a daemon upgraded over older pins starts it empty.
        if let Some(addrs) = m.vip_addrs.as_mut() {
            crate::pinned::sync_vip_addrs(&m.vips, addrs)?;
        }
        // 5. Global config last: this is what makes a fresh data plane start routing.
        let lbc = LbConfig {
            cid_len: self.cfg.layout.cid_len() as u8,
            server_id_len: self.cfg.layout.server_id_len() as u8,
            ready: 1,
            _pad: 0,
            maglev_size: size,
        };
        if m.lb_config().ok() != Some(lbc) {
            m.config.set(0, lbc, 0)?;
        }
        // 6. Removals, now that nothing new points at them.
        for k in present.difference(&wanted) {
            m.vips.remove(k)?;
        }
        if let (true, Some(fp)) = (vips_changed, m.fastpath.as_mut()) {
            fp.sync_vips(&m.vips)?;
        }
        if let (true, Some(addrs)) = (vips_changed, m.vip_addrs.as_mut()) {
            crate::pinned::sync_vip_addrs(&m.vips, addrs)?;
        }
        if !self.hold_workers {
            let live: HashMap<u32, &ResolvedWorker> =
                self.workers.iter().map(|w| (w.index, w)).collect();
            for (sid, idx) in m.server_ids()? {
                let keep = live
                    .get(&idx)
                    .is_some_and(|w| w.cfg.server_id == sid && w.mac.is_some());
                if !keep {
                    m.server_ids.remove(&ServerIdKey { server_id: sid })?;
                    if let Some(fp) = &m.fastpath {
                        fp.remove_server_id(sid);
                    }
                }
            }
            for (key, wref) in m.overrides()? {
                if !live.contains_key(&wref.worker) {
                    tracing::warn!(cid = %hex(key.as_slice()), worker = wref.worker, "removing an override to a worker that left the config");
                    m.remove_override(&key)?;
                }
            }
            for (i, _) in m.workers()? {
                if !live.contains_key(&i) {
                    m.workers.set(i, WorkerEntry::default(), 0)?;
                }
            }
        }
        // 7. The fast-path mirrors, rebuilt once per controller (start, restart, reload: the CID
        // layout may have changed); afterwards the steps above keep them current incrementally.
        if let (true, Some(fp)) = (self.fastpath_rebuild, m.fastpath.as_mut()) {
            fp.rebuild(&lbc, &m.vips, &m.server_ids, &m.overrides)
                .context("rebuilding the fast-path maps failed")?;
            self.fastpath_rebuild = false;
        }
        Ok(())
    }

    /// Writes each worker's slot. With `raise_healthy` false, a healthy bit is kept only where the
    /// map already has it (falling is immediate, rising waits for the table).
    fn write_worker_entries(&mut self, raise_healthy: bool) -> Result<()> {
        for w in &self.workers {
            let current = self.maps.workers.get(&w.index, 0).ok();
            // Without a MAC the worker cannot receive anything: leave the slot unused so the data
            // plane skips overrides to it instead of sending frames to 00:00:00:00:00:00.
            let mut flags = if w.mac.is_some() { WORKER_IN_USE } else { 0 };
            let was_healthy = current.is_some_and(|e| e.flags & WORKER_HEALTHY != 0);
            if w.usable() && (raise_healthy || was_healthy) {
                flags |= WORKER_HEALTHY;
            }
            // The encapsulation first: a slot never routes with another worker's (or no) outer
            // header.
            if self.maps.worker_encap(w.index)? != w.encap {
                self.maps.set_worker_encap(w.index, w.encap)?;
            }
            let entry = WorkerEntry {
                mac: w.mac.unwrap_or([0; 6]),
                flags,
                tx_port: w.tx_port,
                _pad: 0,
                server_id: w.cfg.server_id,
            };
            if current != Some(entry) {
                self.maps.workers.set(w.index, entry, 0)?;
            }
        }
        Ok(())
    }

    /// Rebuilds the Maglev table over usable workers and writes the slots that changed. Returns
    /// the usable size (0 when no worker is usable).
    fn write_maglev(&mut self) -> Result<u32> {
        let members: Vec<maglev::Member<'_>> = self
            .workers
            .iter()
            .filter(|w| w.usable())
            .map(|w| maglev::Member {
                key: &w.cfg.name,
                weight: w.cfg.weight,
                value: w.index,
            })
            .collect();
        let table = maglev::build(&members, MAGLEV_TABLE_SIZE);
        self.maglev_slots.clear();
        if table.is_empty() {
            tracing::error!("no worker is healthy: new connections are dropped until one recovers");
            return Ok(0);
        }
        let mut changed = 0;
        for (i, &v) in table.iter().enumerate() {
            *self.maglev_slots.entry(v).or_default() += 1;
            if self.maglev.get(i) != Some(&v) {
                self.maps.maglev.set(i as u32, v, 0)?;
                if i < self.maglev.len() {
                    self.maglev[i] = v;
                }
                changed += 1;
            }
        }
        if changed > 0 {
            tracing::info!(changed, workers = members.len(), "Maglev table updated");
        }
        Ok(MAGLEV_TABLE_SIZE)
    }

    /// Records a health change; returns true if it changed anything (then call [`Self::sync`]).
    pub fn set_healthy(&mut self, name: &str, healthy: bool) -> bool {
        match self.workers.iter_mut().find(|w| w.cfg.name == name) {
            Some(w) if w.healthy != healthy => {
                w.healthy = healthy;
                if let Some(n) = &self.health_changed {
                    n.notify_one();
                }
                true
            }
            _ => false,
        }
    }

    pub fn set_mac(&mut self, name: &str, mac: [u8; 6]) -> bool {
        match self.workers.iter_mut().find(|w| w.cfg.name == name) {
            Some(w) if w.mac != Some(mac) => {
                tracing::info!(worker = name, old = ?w.mac.map(|m| format_mac(&m)), new = %format_mac(&mac), "worker MAC changed");
                w.mac = Some(mac);
                true
            }
            _ => false,
        }
    }

    pub fn lb_ifindex(&self) -> u32 {
        self.lb_ifindex
    }

    pub fn status(&self) -> Vec<WorkerStatus> {
        self.workers
            .iter()
            .map(|w| WorkerStatus {
                name: w.cfg.name.clone(),
                index: w.index,
                server_id: w.cfg.server_id,
                address: w.cfg.address.to_string(),
                mac: w.mac.map(|m| format_mac(&m)),
                tx_interface: w.tx_interface.clone(),
                tx: if w.tx_port == TX_SAME_IFACE {
                    "XDP_TX".into()
                } else {
                    format!("redirect devmap[{}]", w.tx_port)
                },
                healthy: w.healthy,
                maglev_slots: self.maglev_slots.get(&w.index).copied().unwrap_or(0),
            })
            .collect()
    }
}

/// Lower-case hex (the one definition in lb-common).
pub use lb_common::hex;

/// Parses non-empty hex (optionally `0x`-prefixed); `None` for anything else.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    lb_common::unhex(s).filter(|b| !b.is_empty())
}

/// An exact-CID override key, checking the CID against the layout the data plane uses.
pub fn override_key(cid: &[u8], cid_len: usize) -> Result<CidKey> {
    if cid.len() != cid_len {
        anyhow::bail!(
            "the CID is {} bytes but this load balancer's CIDs are {cid_len} bytes (config cid.length): \
             an override for it would never match",
            cid.len()
        );
    }
    CidKey::new(cid).context("CID longer than 20 bytes")
}
