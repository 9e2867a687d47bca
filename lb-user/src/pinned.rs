//! Typed handles to the maps pinned under the pin directory. The daemon writes through these and
//! the CLI reads (and edits overrides) through them, so both see exactly what the XDP program sees.
use crate::fastpath::FastPath;
use anyhow::{Context, Result, bail};
use aya::maps::{Array, DevMap, HashMap, Map, MapData, PerCpuArray};
use lb_common::encap::{EncapEntry, EncapError};
use lb_common::{
    AF_INET, AF_INET6, CidKey, LbConfig, STAT_COUNT, ServerIdKey, Stat, VipKey, VipValue,
    WorkerEntry, WorkerRef, map_names,
};
use std::io;
use std::path::{Path, PathBuf};

/// File name of the pinned XDP link inside the pin directory.
pub const LINK_PIN_NAME: &str = "baton_xdp_link";

/// Every map the controller pins, in the order they are written on start-up.
pub const ALL_MAPS: [&str; 10] = [
    map_names::CONFIG,
    map_names::VIPS,
    map_names::CID_OVERRIDE,
    map_names::SERVER_IDS,
    map_names::WORKERS,
    map_names::MAGLEV,
    map_names::TX_PORTS,
    map_names::STATS,
    map_names::VIP_ADDRS,
    map_names::WORKER_ENCAP,
];

pub struct PinnedMaps {
    pub dir: PathBuf,
    pub config: Array<MapData, LbConfig>,
    pub vips: HashMap<MapData, VipKey, VipValue>,
    pub overrides: HashMap<MapData, CidKey, WorkerRef>,
    pub server_ids: HashMap<MapData, ServerIdKey, WorkerRef>,
    pub workers: Array<MapData, WorkerEntry>,
    pub maglev: Array<MapData, u32>,
    pub tx_ports: DevMap<MapData>,
    pub stats: PerCpuArray<MapData, u64>,
    /// `None` when pinned by an older build without it.
    pub vip_addrs: Option<HashMap<MapData, VipKey, u32>>,
    /// The derived fast-path maps, when the object has them (see [`crate::fastpath`]).
    pub fastpath: Option<FastPath>,
    /// Per-worker encapsulation; `None` when pinned by an older build (layer 2 only).
    pub worker_encap: Option<Array<MapData, EncapEntry>>,
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<io::Error>().map(|e| e.kind()));
        match io {
            Some(io::ErrorKind::NotFound) => anyhow::anyhow!(
                "no Baton map is pinned at {} : baton-lb has not run here (or uses another --pin-dir)",
                path.display()
            ),
            Some(io::ErrorKind::PermissionDenied) => {
                anyhow::anyhow!("permission denied opening {}: run as root", path.display())
            }
            _ => anyhow::Error::new(e).context(format!("cannot open the pinned map {}", path.display())),
        }
    })?;
    Map::from_map_data(data)
        .with_context(|| format!("{} has an unexpected map type", path.display()))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open($dir, $name)?.try_into().with_context(|| {
            format!(
                "{} does not have the key/value layout this Baton build expects",
                $name
            )
        })?
    };
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            if !crate::sys::is_root() {
                bail!("cannot see {}: run as root", dir.display());
            }
            if crate::sys::in_private_mount_ns()
                && !crate::sys::is_bpffs(dir.parent().unwrap_or(dir))
            {
                bail!(
                    "{} is not visible in this mount namespace (`ip netns exec` hides the host's bpffs): \
                     run baton from the host namespace; it does not need to be inside the LB's netns",
                    dir.display()
                );
            }
            bail!(
                "{} does not exist: baton-lb has not run here (start it, or pass the --pin-dir it uses)",
                dir.display()
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config: typed!(dir, map_names::CONFIG),
            vips: typed!(dir, map_names::VIPS),
            overrides: typed!(dir, map_names::CID_OVERRIDE),
            server_ids: typed!(dir, map_names::SERVER_IDS),
            workers: typed!(dir, map_names::WORKERS),
            maglev: typed!(dir, map_names::MAGLEV),
            tx_ports: typed!(dir, map_names::TX_PORTS),
            stats: typed!(dir, map_names::STATS),
            vip_addrs: if dir.join(map_names::VIP_ADDRS).exists() {
                Some(typed!(dir, map_names::VIP_ADDRS))
            } else {
                None
            },
            fastpath: if dir.join(map_names::FASTPATH).exists() {
                Some(FastPath::open(dir)?)
            } else {
                None
            },
            worker_encap: if dir.join(map_names::WORKER_ENCAP).exists() {
                Some(typed!(dir, map_names::WORKER_ENCAP))
            } else {
                None
            },
        })
    }

    /// The encapsulation of worker slot `worker` (a zeroed entry, layer 2, without the map).
    pub fn worker_encap(&self, worker: u32) -> Result<EncapEntry> {
        match &self.worker_encap {
            Some(m) => Ok(m.get(&worker, 0)?),
            None => Ok(EncapEntry::default()),
        }
    }

    /// Writes slot `worker`'s encapsulation after checking it ([`check_encap`]). Refused on pins
    /// of an older build without the map unless the entry is layer 2 (which they do anyway).
    pub fn set_worker_encap(&mut self, worker: u32, entry: EncapEntry) -> Result<()> {
        check_encap(&entry)?;
        match &mut self.worker_encap {
            Some(m) => m
                .set(worker, entry, 0)
                .with_context(|| format!("cannot write {} slot {worker}", map_names::WORKER_ENCAP)),
            None if entry.mode == lb_common::encap::ENCAP_NONE => Ok(()),
            None => bail!(
                "{} is not pinned under {} (a baton-lb older than encapsulation): restart baton-lb with this build",
                map_names::WORKER_ENCAP,
                self.dir.display()
            ),
        }
    }

    pub fn lb_config(&self) -> Result<LbConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Counters summed over CPUs, in [`Stat::ALL`] order. Verdicts newer than the pinned map
    /// (pins of an older, still running build) are left out.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        let mut out = Vec::with_capacity(STAT_COUNT as usize);
        let slots = self.stats.len();
        for s in Stat::ALL.into_iter().filter(|s| (*s as u32) < slots) {
            let per_cpu = self.stats.get(&(s as u32), 0)?;
            out.push((s, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Worker slots in use: (index, entry).
    pub fn workers(&self) -> Result<Vec<(u32, WorkerEntry)>> {
        let mut out = Vec::new();
        for i in 0..self.workers.len() {
            let w = self.workers.get(&i, 0)?;
            if w.flags & lb_common::WORKER_IN_USE != 0 {
                out.push((i, w));
            }
        }
        Ok(out)
    }

    pub fn overrides(&self) -> Result<Vec<(CidKey, WorkerRef)>> {
        let mut out = Vec::new();
        for kv in self.overrides.iter() {
            out.push(kv?);
        }
        out.sort_by(|a, b| a.0.as_slice().cmp(b.0.as_slice()));
        Ok(out)
    }

    pub fn server_ids(&self) -> Result<Vec<(u64, u32)>> {
        let mut out = Vec::new();
        for kv in self.server_ids.iter() {
            let (k, v) = kv?;
            out.push((k.server_id, v.worker));
        }
        out.sort();
        Ok(out)
    }

    /// Sends `cid` to worker slot `worker`. Every override write goes through here (and
    /// [`Self::remove_override`]), so derived structures that must track overrides have one place
    /// to hook in.
    pub fn set_override(&mut self, key: CidKey, worker: u32) -> Result<()> {
        let value = WorkerRef { worker };
        match &self.fastpath {
            // Counts the override in its fast-path bucket before inserting it.
            Some(fp) => fp.insert_override(&mut self.overrides, key, value),
            None => self.overrides.insert(key, value, 0).map_err(Into::into),
        }
        .context("cannot write the override (is the override map full?)")
    }

    /// Removes the override for `key`; `Ok(false)` if there was none.
    pub fn remove_override(&mut self, key: &CidKey) -> Result<bool> {
        if let Some(fp) = &self.fastpath {
            return fp.remove_override(&mut self.overrides, key);
        }
        if self.overrides.get(key, 0).is_err() {
            return Ok(false);
        }
        self.overrides.remove(key)?;
        Ok(true)
    }

    pub fn vips(&self) -> Result<Vec<VipKey>> {
        let mut out = Vec::new();
        for k in self.vips.keys() {
            out.push(k?);
        }
        Ok(out)
    }
}

/// What the XDP program trusts about an encapsulation entry, checked before it is written:
/// [`EncapEntry::validate`], and the addresses of an IPv4 or IPv6 family set (not all zero).
/// Inner datagrams of either family are carried whatever the outer family.
pub fn check_encap(entry: &EncapEntry) -> Result<()> {
    entry
        .validate()
        .map_err(|e: EncapError| anyhow::anyhow!("invalid encapsulation entry: {e}"))?;
    if entry.mode != lb_common::encap::ENCAP_NONE {
        let n = if entry.family == AF_INET { 4 } else { 16 };
        debug_assert!(entry.family == AF_INET || entry.family == AF_INET6);
        if entry.src[..n].iter().all(|b| *b == 0) || entry.dst[..n].iter().all(|b| *b == 0) {
            bail!("invalid encapsulation entry: outer source and destination must be set");
        }
    }
    Ok(())
}

/// Removes every pin Baton made under `dir` (link first, so forwarding stops cleanly before the
/// maps go), then the directory itself. Missing pins are fine. Maps are recognised by their
/// `BATON_` prefix, so maps a newer object adds go too, and nothing else in a shared directory does.
pub fn unpin_all(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut names: Vec<String> = vec![LINK_PIN_NAME.to_string()];
    names.extend(ALL_MAPS.iter().map(|s| s.to_string()));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("BATON_") && !names.contains(&n) {
                names.push(n);
            }
        }
    }
    for name in &names {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "pin directory not removed (other pins in it?)")
        }
    }
    Ok(removed)
}

/// Makes `BATON_VIP_ADDRS` hold exactly the addresses of the enabled entries of `BATON_VIPS`,
/// each with its number of enabled ports. The program reads it only for packets to a VIP that
/// carry no port (IPv6 non-first fragments, over-long extension header chains), so an empty or
/// stale map only lets those pass as they did before it existed.
pub fn sync_vip_addrs<T, U>(
    vips: &HashMap<T, VipKey, VipValue>,
    addrs: &mut HashMap<U, VipKey, u32>,
) -> Result<()>
where
    T: std::borrow::Borrow<MapData>,
    U: std::borrow::BorrowMut<MapData>,
{
    let mut enabled = Vec::new();
    for kv in vips.iter() {
        let (k, v) = kv.context("reading BATON_VIPS")?;
        if v.flags & 1 != 0 {
            enabled.push(k);
        }
    }
    sync_vip_addrs_to(&enabled, addrs)
}

/// [`sync_vip_addrs`] from the enabled `BATON_VIPS` keys.
pub fn sync_vip_addrs_to<U: std::borrow::BorrowMut<MapData>>(
    enabled: &[VipKey],
    addrs: &mut HashMap<U, VipKey, u32>,
) -> Result<()> {
    let mut want: std::collections::HashMap<VipKey, u32> = std::collections::HashMap::new();
    for k in enabled {
        *want.entry(k.address()).or_default() += 1;
    }
    let have: Vec<(VipKey, u32)> = addrs
        .iter()
        .collect::<Result<_, _>>()
        .context("reading BATON_VIP_ADDRS")?;
    for (k, n) in &want {
        if !have.contains(&(*k, *n)) {
            addrs.insert(*k, *n, 0).context("writing BATON_VIP_ADDRS")?;
        }
    }
    for (k, _) in have {
        if !want.contains_key(&k) {
            addrs.remove(&k).context("writing BATON_VIP_ADDRS")?;
        }
    }
    Ok(())
}
