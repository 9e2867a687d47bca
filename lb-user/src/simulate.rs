//! What the data plane does with a packet, answered by the data plane's own program: what
//! `baton route` runs.
//!
//! Katran's simulator does the same: a fresh instance of the embedded XDP object is loaded whose
//! maps are the live ones pinned under the pin directory (configuration, VIPs, overrides, server
//! IDs, workers, Maglev, devmap, fast-path mirrors), except the per-CPU counters
//! (`BATON_STATS`), which are a new map private to the run. `baton_xdp` then runs once on a
//! crafted frame through `BPF_PROG_TEST_RUN`. Its return code, the rewritten frame (the
//! destination MAC names the worker) and the private counters (which verdict it counted) are the
//! answer: nothing of the routing decision is re-implemented here, so the answer cannot disagree
//! with the program, and the running data plane's counters never move.
//!
//! Re-using pinned maps is aya's pin-by-name re-adoption (`EbpfLoader::map_pin_path` for each
//! map): a pinned map is opened, not created, so nothing under the live pin directory is written.
//! The private maps are pinned (the object pins every map by name) in a directory of their own
//! next to it, removed when the [`Simulator`] is dropped.
use std::collections::HashMap as StdHashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    AF_INET, AF_INET6, CR_UNROUTABLE, CidKey, CidLayout, LbConfig, MAGLEV_TABLE_SIZE, MAX_WORKERS,
    QUIC_V1, Stat, VipKey, WORKER_IN_USE, WorkerEntry, map_names,
};
use serde::Serialize;

use crate::config::format_mac;
use crate::controller::hex;
use crate::pinned::{LINK_PIN_NAME, PinnedMaps};
use crate::testrun::frames::{Datagram, LongType, quic_long, quic_short};
use crate::testrun::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, run_xdp};

/// A fresh directory under bpffs for pins private to one process, removed (with everything
/// pinned in it) when dropped.
pub struct PrivatePinDir {
    path: PathBuf,
}

impl PrivatePinDir {
    /// `parent/baton-<tag>-<pid>-<n>` (`n` counts this process's directories); `parent` must be
    /// on bpffs. A leftover of the same name (a killed process of this pid) is removed first.
    pub fn create(parent: &Path, tag: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = parent.join(format!("baton-{tag}-{}-{n}", std::process::id()));
        remove_pin_dir(&path);
        std::fs::create_dir_all(&path).with_context(|| {
            format!(
                "cannot create {} (is bpffs mounted at {}?)",
                path.display(),
                parent.display()
            )
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivatePinDir {
    fn drop(&mut self) {
        remove_pin_dir(&self.path);
    }
}

/// Unpins everything in a private pin directory (files under bpffs) and removes it.
pub(crate) fn remove_pin_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The program attached through the live pin directory's XDP link, compared with the instance
/// a [`Simulator`] loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// No link is pinned: nothing forwards with these maps right now.
    Nothing,
    /// The attached program has the same instructions (the kernel's program tag, which does
    /// not depend on map fds): this build's program.
    Same { prog_id: u32 },
    /// Another build of the program is attached: the answer is what this build would do.
    Other { prog_id: u32 },
}

/// A loaded instance of `baton_xdp` on the live pinned maps, with some maps private.
pub struct Simulator {
    ebpf: Ebpf,
    live: PathBuf,
    /// Maps this instance does not share with the live data plane: asked for, absent from the
    /// live directory, or of another layout (fast-path mirrors only).
    private_maps: Vec<String>,
    notes: Vec<String>,
    private_dir: PrivatePinDir,
}

/// What one run of the program did.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The XDP action (`XDP_PASS` = 2, ...).
    pub action: u32,
    /// The frame after the program ran.
    pub frame: Vec<u8>,
    /// The private counters this run moved, by how much (in [`Stat::ALL`] order).
    pub counted: Vec<(Stat, u64)>,
}

impl Verdict {
    pub fn counted(&self, stat: Stat) -> bool {
        self.counted.iter().any(|(s, n)| *s == stat && *n > 0)
    }
}

impl Simulator {
    /// Loads `object`'s `baton_xdp` on the maps pinned under `live`, with a private counters map.
    pub fn load(object: &[u8], live: &Path) -> Result<Self> {
        Self::load_with_private(object, live, &[map_names::STATS])
    }

    /// As [`Self::load`], with the maps named in `private` (besides `BATON_STATS`, which is
    /// always private) fresh and empty instead of the live ones, for the caller to fill.
    pub fn load_with_private(object: &[u8], live: &Path, private: &[&str]) -> Result<Self> {
        if !crate::sys::is_root() {
            bail!("running the XDP program (BPF_PROG_TEST_RUN) needs root: run baton as root");
        }
        let obj =
            aya_obj::Object::parse(object).context("the embedded XDP object does not parse")?;
        let mut notes = Vec::new();
        let mut private_maps: Vec<String> = vec![map_names::STATS.to_string()];
        for name in private {
            if !private_maps.iter().any(|p| p == name) {
                private_maps.push(name.to_string());
            }
        }
        for m in crate::dataplane::pinned_mismatches(&obj, live)? {
            if crate::fastpath::MAPS.contains(&m.name.as_str()) {
                // Derived mirrors only: without them the program decides the same from the
                // authoritative maps.
                notes.push(format!(
                    "note: {}: this run uses an empty one (the program then routes from the authoritative maps)",
                    m.describe
                ));
                private_maps.push(m.name);
                continue;
            }
            bail!(
                "{}: the pinned data plane was made by another Baton build, whose maps this build's \
                 program cannot use; run the `baton` of the same build as baton-lb",
                m.describe
            );
        }
        // Every map the object pins: the live one if it is there, else a private one.
        let mut names: Vec<&str> = obj
            .maps
            .iter()
            .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
            .map(|(n, _)| n.as_str())
            .collect();
        names.sort();
        for name in &names {
            if !private_maps.iter().any(|p| p == name) && !live.join(name).exists() {
                notes.push(format!(
                    "note: {name} is not pinned under {} (an older baton-lb): this run uses an empty one",
                    live.display()
                ));
                private_maps.push(name.to_string());
            }
        }
        let parent = match live.parent() {
            Some(p) if crate::sys::is_bpffs(p) => p.to_path_buf(),
            _ => PathBuf::from("/sys/fs/bpf"),
        };
        let private_dir = PrivatePinDir::create(&parent, "route")?;
        let paths: Vec<(&str, PathBuf)> = names
            .iter()
            .map(|name| {
                let dir = if private_maps.iter().any(|p| p == name) {
                    private_dir.path()
                } else {
                    live
                };
                (*name, dir.join(name))
            })
            .collect();
        let mut loader = EbpfLoader::new();
        // Nothing may be created under the live directory: every pinned map has its path above.
        loader.default_map_pin_directory(private_dir.path());
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(object)
            .context("loading the XDP object on the pinned maps failed")?;
        let prog: &mut Xdp = ebpf
            .program_mut(crate::object::PROGRAM)
            .ok_or_else(|| anyhow!("the XDP object has no program {}", crate::object::PROGRAM))?
            .try_into()?;
        prog.load()
            .context("the kernel rejected the XDP program (verifier)")?;
        Ok(Self {
            ebpf,
            live: live.to_path_buf(),
            private_maps,
            notes,
            private_dir,
        })
    }

    /// Maps this instance does not share with the live data plane.
    pub fn private_maps(&self) -> &[String] {
        &self.private_maps
    }

    /// Where the private maps are pinned (removed when `self` is dropped).
    pub fn private_dir(&self) -> &Path {
        self.private_dir.path()
    }

    /// What loading noticed (maps missing or replaced), one line each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    fn program(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(crate::object::PROGRAM)
            .ok_or_else(|| anyhow!("no program {}", crate::object::PROGRAM))?
            .try_into()?)
    }

    /// Which program the live pin directory's link has attached, compared with this one.
    pub fn attached(&self) -> Result<Attached> {
        let Some(link) = crate::sys::pinned_link_info(&self.live.join(LINK_PIN_NAME))? else {
            return Ok(Attached::Nothing);
        };
        let ours = self.program()?.info()?.tag();
        let theirs = aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == link.prog_id)
            .map(|p| p.tag());
        Ok(if theirs == Some(ours) {
            Attached::Same {
                prog_id: link.prog_id,
            }
        } else {
            Attached::Other {
                prog_id: link.prog_id,
            }
        })
    }

    /// Runs the program once on `frame`.
    pub fn run(&self, frame: &[u8]) -> Result<Verdict> {
        let before = self.stats()?;
        let fd = self.program()?.fd()?;
        let out = run_xdp(fd.as_fd(), frame, 1)?;
        let after = self.stats()?;
        let counted = Stat::ALL
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a > b)
            .map(|(s, (b, a))| (*s, a - b))
            .collect();
        Ok(Verdict {
            action: out.action,
            frame: out.frame,
            counted,
        })
    }

    /// The private counters, summed over CPUs, in [`Stat::ALL`] order.
    fn stats(&self) -> Result<Vec<u64>> {
        let map = self
            .ebpf
            .map(map_names::STATS)
            .ok_or_else(|| anyhow!("no map {}", map_names::STATS))?;
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Stat::ALL
            .iter()
            .map(|s| Ok(m.get(&(*s as u32), 0)?.iter().sum()))
            .collect()
    }

    /// A private map, to fill before [`Self::run`] (`None` for a shared one: those are never
    /// written through here).
    fn private_map_mut(&mut self, name: &str) -> Option<&mut aya::maps::Map> {
        if !self.private_maps.iter().any(|p| p == name) {
            return None;
        }
        self.ebpf.map_mut(name)
    }
}

/// What `baton route` is asked.
#[derive(Clone, Debug, Default)]
pub struct RouteQuery {
    /// The destination connection ID.
    pub cid: Vec<u8>,
    /// Ask about a QUIC v1 Initial carrying it instead of a short-header (1-RTT) packet. A CID
    /// of another length than the configured one is always asked about as an Initial: only a
    /// long header can carry it.
    pub initial: bool,
    /// The VIP and port the packet is sent to (default: the first enabled VIP).
    pub vip: Option<SocketAddr>,
}

/// `baton route`'s answer (its JSON shape).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RouteAnswer {
    pub cid: String,
    /// `override`, `server_id`, `hash` (the program's routed counters), `no_worker`,
    /// `malformed` (dropped), `pass` (not for the data plane: to the host stack).
    pub reason: String,
    pub detail: String,
    pub worker_index: Option<u32>,
    /// The worker's name, which only baton-lb knows (filled in by the CLI).
    pub worker: Option<String>,
    pub server_id: Option<u64>,
    pub mac: Option<String>,
    /// The program's verdict: `redirect`, `tx`, `drop`, `pass` or `aborted`.
    pub action: String,
    /// The packet the program ran on: `short` (1-RTT) or `initial`.
    pub packet: String,
}

/// The answer, and what the caller may want to say besides it.
#[derive(Clone, Debug)]
pub struct RouteReport {
    pub answer: RouteAnswer,
    /// Notes for the operator (stderr in the CLI), one line each.
    pub notes: Vec<String>,
    /// The program's run, as it happened.
    pub verdict: Verdict,
}

/// The client address the crafted frame comes from (documentation ranges).
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

fn vip_key(addr: SocketAddr) -> VipKey {
    let mut k = VipKey {
        port: addr.port(),
        ..Default::default()
    };
    match addr.ip() {
        IpAddr::V4(a) => {
            k.addr[..4].copy_from_slice(&a.octets());
            k.family = AF_INET;
        }
        IpAddr::V6(a) => {
            k.addr = a.octets();
            k.family = AF_INET6;
        }
    }
    k
}

fn vip_addr(k: &VipKey) -> SocketAddr {
    let ip = if k.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(k.addr))
    };
    SocketAddr::new(ip, k.port)
}

/// The frame `baton route` runs the program on: a short header (or an Initial) carrying `cid`,
/// from a client to `vip`.
pub fn route_frame(cid: &[u8], initial: bool, vip: SocketAddr) -> Vec<u8> {
    let payload = if initial {
        quic_long(LongType::Initial, QUIC_V1, cid, &[0xc1; 8], 1200)
    } else {
        quic_short(cid, 40)
    };
    let src = match vip.ip() {
        IpAddr::V4(_) => IpAddr::V4(CLIENT4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT6),
    };
    Datagram::udp(src, vip.ip(), vip.port(), payload).build()
}

fn action_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "aborted",
        XDP_DROP => "drop",
        XDP_PASS => "pass",
        XDP_TX => "tx",
        XDP_REDIRECT => "redirect",
        _ => "unknown",
    }
}

/// Marks worker slot `index` in a tagged copy of `BATON_WORKERS` (see [`route`]).
fn tag_mac(index: u32) -> [u8; 6] {
    let i = index.to_be_bytes();
    [0x02, 0xba, 0x70, i[1], i[2], i[3]]
}

/// Which worker a packet carrying `q.cid` reaches, and why, as the program decides it: see the
/// module docs. `object` is the XDP object to run (the embedded one), `pin_dir` the live pins.
pub fn route(object: &[u8], pin_dir: &Path, q: &RouteQuery) -> Result<RouteReport> {
    let maps = PinnedMaps::open(pin_dir)?;
    let lbc: LbConfig = maps.lb_config()?;
    let mut notes = Vec::new();
    let cid = &q.cid;
    let key =
        CidKey::new(cid).ok_or_else(|| anyhow!("a QUIC connection ID is at most 20 bytes"))?;

    let initial = q.initial || cid.len() != lbc.cid_len as usize;
    if !q.initial && initial {
        notes.push(format!(
            "note: short-header packets carry {}-byte CIDs here, so a {}-byte DCID arrives only in a long \
             header: answering for a QUIC v1 Initial",
            lbc.cid_len,
            cid.len()
        ));
    }
    let mut enabled: Vec<VipKey> = maps
        .vips
        .iter()
        .filter_map(|kv| kv.ok())
        .filter(|(_, v)| v.flags & 1 != 0)
        .map(|(k, _)| k)
        .collect();
    enabled.sort_by_key(|k| (k.family, k.addr, k.port));
    let vip = match q.vip {
        Some(v) => {
            if !enabled.contains(&vip_key(v)) {
                notes.push(format!("note: {v} is not an enabled VIP here"));
            }
            v
        }
        None => match enabled.first() {
            Some(k) => vip_addr(k),
            None => {
                notes.push("note: no VIP is enabled: the data plane passes every packet".into());
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 443)
            }
        },
    };
    drop(maps);

    let frame = route_frame(cid, initial, vip);
    let sim = Simulator::load(object, pin_dir)?;
    notes.extend(sim.notes().iter().cloned());
    match sim.attached()? {
        Attached::Same { .. } => {}
        Attached::Nothing => notes.push(format!(
            "note: no program is attached through {} (no pinned link): this is what it would do",
            pin_dir.display()
        )),
        Attached::Other { prog_id } => notes.push(format!(
            "note: the attached program (id {prog_id}) is another build than this baton's: this is what \
             this build's program does with the live maps"
        )),
    }
    let verdict = sim.run(&frame)?;
    drop(sim);

    // Re-read after the run: what the worker slot the program picked holds.
    let maps = PinnedMaps::open(pin_dir)?;
    let routed = [
        (Stat::RoutedOverride, "override"),
        (Stat::RoutedServerId, "server_id"),
        (Stat::RoutedHash, "hash"),
    ]
    .into_iter()
    .find(|(s, _)| verdict.counted(*s));
    let worker_index = match routed {
        Some(_) => worker_of(object, pin_dir, &maps, &frame, &verdict)?,
        None => None,
    };
    let entry: Option<WorkerEntry> = worker_index.and_then(|i| maps.workers.get(&i, 0).ok());

    let layout = CidLayout::new(lbc.cid_len, lbc.server_id_len).ok();
    let sid = layout.and_then(|l| l.decode_server_id(cid));
    // Why a CID is hashed (explanation only: the decision is the program's).
    let why_hashed = || {
        let client_chosen = initial
            && (cid.len() != lbc.cid_len as usize
                || cid
                    .first()
                    .is_none_or(|b| lb_common::self_described_len(*b) != cid.len()));
        if client_chosen {
            "an Initial's client-chosen DCID".to_string()
        } else {
            match sid {
                None if cid
                    .first()
                    .is_some_and(|b| lb_common::config_rotation(*b) == CR_UNROUTABLE) =>
                {
                    "config rotation 0b111 (unroutable)".to_string()
                }
                None => "too short to carry a server ID".to_string(),
                Some(s) => format!("server ID {s} (0x{s:x}) belongs to no worker"),
            }
        }
    };
    let size = lbc.maglev_size.min(MAGLEV_TABLE_SIZE);
    let (reason, mut detail) = match routed {
        Some((Stat::RoutedOverride, r)) => (r, "exact-CID override".to_string()),
        Some((Stat::RoutedServerId, r)) => {
            let s = sid.or(entry.map(|e| e.server_id)).unwrap_or(0);
            (r, format!("server ID {s} (0x{s:x}) in the CID"))
        }
        Some((_, r)) => {
            let slot = lb_common::cid_hash(&key) % size.max(1);
            (r, format!("{}; Maglev slot {slot}", why_hashed()))
        }
        None if verdict.counted(Stat::NoWorker) => (
            "no_worker",
            if size == 0 {
                format!(
                    "{}; Maglev table empty (no healthy worker): dropped",
                    why_hashed()
                )
            } else {
                format!(
                    "{}; the worker its Maglev slot names has no entry: dropped",
                    why_hashed()
                )
            },
        ),
        None if verdict.counted(Stat::Malformed) => (
            "malformed",
            "the data plane drops it as malformed".to_string(),
        ),
        None if verdict.counted(Stat::Passed) => (
            "pass",
            if lbc.ready == 0 {
                "the data plane's tables are not ready: it passes every packet to the host stack"
                    .to_string()
            } else {
                format!("not QUIC to a VIP ({vip}): passed to the host stack")
            },
        ),
        None => bail!(
            "the XDP program returned {} and counted {:?}: no verdict baton route knows",
            action_name(verdict.action),
            verdict.counted
        ),
    };
    if verdict.counted(Stat::RedirectError) {
        let port = entry.map(|e| e.tx_port).unwrap_or(0);
        detail.push_str(&format!(
            "; but BATON_TX_PORTS has no device at slot {port}: dropped (redirect_error)"
        ));
    }
    if routed.is_some() && worker_index.is_none() {
        notes.push(
            "note: no worker slot holds the MAC the program wrote (the maps changed meanwhile?)"
                .into(),
        );
    }
    let answer = RouteAnswer {
        cid: hex(cid),
        reason: reason.to_string(),
        detail,
        worker_index,
        worker: None,
        server_id: entry.map(|e| e.server_id),
        mac: entry.map(|e| format_mac(&e.mac)),
        action: action_name(verdict.action).to_string(),
        packet: if initial { "initial" } else { "short" }.to_string(),
    };
    Ok(RouteReport {
        answer,
        notes,
        verdict,
    })
}

/// The worker slot a routed run forwarded to: the one whose MAC the program wrote. Slots that
/// share a MAC are told apart by running again on a copy of `BATON_WORKERS` whose MACs name
/// their slots (the program's choice never depends on a MAC).
fn worker_of(
    object: &[u8],
    pin_dir: &Path,
    maps: &PinnedMaps,
    frame: &[u8],
    verdict: &Verdict,
) -> Result<Option<u32>> {
    let Some(dst) = verdict.frame.get(..6) else {
        return Ok(None);
    };
    let slots: Vec<(u32, WorkerEntry)> = maps.workers()?;
    let with_mac: Vec<u32> = slots
        .iter()
        .filter(|(_, e)| e.mac == dst)
        .map(|(i, _)| *i)
        .collect();
    if with_mac.len() <= 1 {
        return Ok(with_mac.first().copied());
    }
    let mut sim = Simulator::load_with_private(object, pin_dir, &[map_names::WORKERS])?;
    {
        let map = sim
            .private_map_mut(map_names::WORKERS)
            .ok_or_else(|| anyhow!("no private {}", map_names::WORKERS))?;
        let mut tagged: Array<&mut MapData, WorkerEntry> = Array::try_from(map)?;
        for i in 0..MAX_WORKERS {
            let mut e = maps.workers.get(&i, 0)?;
            if e.flags & WORKER_IN_USE != 0 {
                e.mac = tag_mac(i);
            }
            tagged.set(i, e, 0)?;
        }
    }
    let again = sim.run(frame)?;
    let by_tag: StdHashMap<[u8; 6], u32> = with_mac.iter().map(|i| (tag_mac(*i), *i)).collect();
    Ok(again
        .frame
        .get(..6)
        .and_then(|m| by_tag.get(m).copied())
        .or(with_mac.first().copied()))
}

#[cfg(test)]
mod tests {
    //! `baton route`'s answer against what the program does with the same frame, on a fixture
    //! loaded into a private pin directory (standing in for the daemon's). Need root; skipped
    //! (with a message) without it or without an embedded object.
    use super::*;
    use crate::testrun::XdpFixture;
    use lb_common::{TX_SAME_IFACE, WORKER_HEALTHY};

    const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
    const PORT: u16 = 443;
    const MACS: [[u8; 6]; 3] = [
        [0x02, 0xaa, 0, 0, 0, 0],
        [0x02, 0xbb, 0, 0, 0, 1],
        [0x02, 0xcc, 0, 0, 0, 2],
    ];
    /// Worker 0 is redirected through devmap slot 0, worker 1 is behind the receiving interface
    /// (XDP_TX), worker 2 names an empty devmap slot (redirect error).
    const SID: [u64; 3] = [0x0101, 0x0202, 0x0303];
    const TX: [u32; 3] = [0, TX_SAME_IFACE, 9];
    const MAGLEV_SIZE: u32 = 251;

    fn config(maglev_size: u32) -> LbConfig {
        LbConfig {
            cid_len: 8,
            server_id_len: 2,
            ready: 1,
            _pad: 0,
            maglev_size,
        }
    }

    fn fixture(test: &str) -> Option<XdpFixture> {
        if !crate::sys::is_root() || crate::object::try_bytes().is_none() {
            eprintln!("skipped: needs root and the embedded XDP object");
            return None;
        }
        let mut f = XdpFixture::load(&format!("route-{test}")).expect("load the XDP object");
        f.set_config(config(MAGLEV_SIZE)).unwrap();
        f.add_vip(vip_key(SocketAddr::new(IpAddr::V4(VIP4), PORT)))
            .unwrap();
        f.add_vip(vip_key(SocketAddr::new(IpAddr::V6(VIP6), PORT)))
            .unwrap();
        for w in 0..3 {
            f.set_worker(
                w as u32,
                WorkerEntry {
                    mac: MACS[w],
                    flags: WORKER_IN_USE | WORKER_HEALTHY,
                    tx_port: TX[w],
                    _pad: 0,
                    server_id: SID[w],
                },
            )
            .unwrap();
            f.set_server_id(SID[w], w as u32).unwrap();
        }
        // Devmap slot 0 → loopback (the test run does not transmit).
        f.set_tx_port(0, 1).unwrap();
        // Workers 0 and 1 only.
        let table: Vec<u32> = (0..MAGLEV_SIZE).map(|i| u32::from(i % 3 == 0)).collect();
        f.set_maglev(&table).unwrap();
        Some(f)
    }

    fn server_cid(cr: u8, server_id: u64, nonce: u8) -> Vec<u8> {
        let mut cid = [0u8; 8];
        // Config rotation 7 (unroutable) is never encoded: set it afterwards.
        CidLayout::default()
            .encode(cr.min(6), server_id, &[nonce, 1, 2, 3, nonce], &mut cid)
            .unwrap();
        cid[0] |= cr << 5;
        cid.to_vec()
    }

    fn live_stats(f: &XdpFixture) -> Vec<u64> {
        Stat::ALL.iter().map(|s| f.stat(*s).unwrap()).collect()
    }

    fn ask(f: &XdpFixture, cid: &[u8], initial: bool) -> RouteReport {
        let q = RouteQuery {
            cid: cid.to_vec(),
            initial,
            vip: None,
        };
        route(crate::object::bytes(), f.pin_dir(), &q).unwrap()
    }

    /// Asks `baton route`, checks the fixture's (live) counters did not move, then runs the
    /// fixture's own program on the same frame and checks the answer says what it did.
    fn check(f: &XdpFixture, cid: &[u8], initial: bool) -> RouteAnswer {
        let before = live_stats(f);
        let rep = ask(f, cid, initial);
        assert_eq!(
            live_stats(f),
            before,
            "a route query must not move the live counters"
        );
        // The default VIP is the first enabled one in (family, address, port) order: IPv4.
        let vip = SocketAddr::new(IpAddr::V4(VIP4), PORT);
        let frame = route_frame(cid, rep.answer.packet == "initial", vip);
        let out = f.run(crate::object::PROGRAM, &frame).unwrap();
        let after = live_stats(f);
        let moved: Vec<Stat> = Stat::ALL
            .iter()
            .copied()
            .filter(|s| after[*s as usize] > before[*s as usize])
            .collect();
        let a = rep.answer.clone();
        assert_eq!(rep.verdict.action, out.action, "{a:?}");
        assert_eq!(a.action, action_name(out.action), "{a:?}");
        let counted: Vec<Stat> = rep.verdict.counted.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            counted, moved,
            "the private counters moved as the live ones do: {a:?}"
        );
        let want_reason = if moved.contains(&Stat::RoutedOverride) {
            "override"
        } else if moved.contains(&Stat::RoutedServerId) {
            "server_id"
        } else if moved.contains(&Stat::RoutedHash) {
            "hash"
        } else if moved.contains(&Stat::NoWorker) {
            "no_worker"
        } else if moved.contains(&Stat::Malformed) {
            "malformed"
        } else {
            "pass"
        };
        assert_eq!(a.reason, want_reason, "{a:?}");
        let want_worker =
            if want_reason == "override" || want_reason == "server_id" || want_reason == "hash" {
                Some(
                    MACS.iter()
                        .position(|m| out.frame[..6] == m[..])
                        .expect("the program wrote a worker's MAC") as u32,
                )
            } else {
                None
            };
        assert_eq!(a.worker_index, want_worker, "{a:?}");
        if let Some(w) = want_worker {
            assert_eq!(a.mac, Some(format_mac(&MACS[w as usize])), "{a:?}");
            assert_eq!(a.server_id, Some(SID[w as usize]), "{a:?}");
        }
        assert_eq!(a.cid, hex(cid));
        a
    }

    #[test]
    fn route_answers_what_the_program_does() {
        let Some(mut f) = fixture("answers") else {
            return;
        };
        // Server ID in the CID.
        let a = check(&f, &server_cid(0, SID[1], 1), false);
        assert_eq!((a.reason.as_str(), a.worker_index), ("server_id", Some(1)));
        assert_eq!(a.action, "tx");
        // An override wins over the server ID; removing it restores the route.
        let moved = server_cid(0, SID[1], 2);
        f.set_override(&moved, 0).unwrap();
        let a = check(&f, &moved, false);
        assert_eq!((a.reason.as_str(), a.worker_index), ("override", Some(0)));
        assert_eq!(a.action, "redirect");
        f.del_override(&moved).unwrap();
        assert_eq!(check(&f, &moved, false).reason, "server_id");
        // A server ID no worker has, and an unroutable CID: Maglev.
        let a = check(&f, &server_cid(0, 0x0777, 3), false);
        assert_eq!(a.reason, "hash");
        assert!(a.detail.contains("belongs to no worker"), "{a:?}");
        let a = check(&f, &server_cid(7, SID[0], 4), false);
        assert_eq!(a.reason, "hash");
        assert!(a.detail.contains("unroutable"), "{a:?}");
        // A DCID of another length can only be an Initial's; --initial asks about one anyway.
        let a = check(&f, &[0x42; 12], false);
        assert_eq!((a.reason.as_str(), a.packet.as_str()), ("hash", "initial"));
        let a = check(&f, &server_cid(0, SID[0], 5), true);
        assert_eq!(a.packet, "initial");
        // The worker behind an empty devmap slot: chosen, then dropped.
        let a = check(&f, &server_cid(0, SID[2], 6), false);
        assert_eq!((a.reason.as_str(), a.worker_index), ("server_id", Some(2)));
        assert_eq!(a.action, "drop");
        assert!(a.detail.contains("redirect_error"), "{a:?}");
        // Without the fast-path mirrors the program (and so the answer) decides the same.
        f.disable_fastpath();
        let a = check(&f, &server_cid(0, SID[1], 7), false);
        assert_eq!((a.reason.as_str(), a.worker_index), ("server_id", Some(1)));
    }

    #[test]
    fn unroutable_and_unconfigured_answers() {
        let Some(mut f) = fixture("empty") else {
            return;
        };
        // No healthy worker: the Maglev table is empty.
        f.set_config(config(0)).unwrap();
        let a = check(&f, &server_cid(7, 1, 1), false);
        assert_eq!(
            (a.reason.as_str(), a.action.as_str()),
            ("no_worker", "drop")
        );
        assert!(a.detail.contains("Maglev table empty"), "{a:?}");
        // Tables not ready: everything passes.
        f.set_config(LbConfig {
            ready: 0,
            ..config(MAGLEV_SIZE)
        })
        .unwrap();
        let a = check(&f, &server_cid(0, SID[0], 2), false);
        assert_eq!((a.reason.as_str(), a.action.as_str()), ("pass", "pass"));
    }

    #[test]
    fn workers_sharing_a_mac_are_told_apart() {
        let Some(mut f) = fixture("shared-mac") else {
            return;
        };
        // Worker 2 gets worker 0's MAC and devmap slot: only a second run can tell them apart.
        f.set_worker(
            2,
            WorkerEntry {
                mac: MACS[0],
                flags: WORKER_IN_USE | WORKER_HEALTHY,
                tx_port: 0,
                _pad: 0,
                server_id: SID[2],
            },
        )
        .unwrap();
        for (sid, want) in [(SID[0], 0), (SID[2], 2)] {
            let before = live_stats(&f);
            let a = ask(&f, &server_cid(0, sid, 1), false).answer;
            assert_eq!(live_stats(&f), before);
            assert_eq!(
                (a.reason.as_str(), a.worker_index),
                ("server_id", Some(want))
            );
            assert_eq!(a.server_id, Some(sid));
        }
    }

    #[test]
    fn nothing_is_left_behind_and_the_live_pins_are_untouched() {
        let Some(f) = fixture("pins") else {
            return;
        };
        let list = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .map(|r| {
                    r.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        let pins = list(f.pin_dir());
        let sim = Simulator::load(crate::object::bytes(), f.pin_dir()).unwrap();
        // Every map but the counters is the live one.
        assert_eq!(sim.private_maps(), [map_names::STATS.to_string()]);
        assert!(sim.notes().is_empty(), "{:?}", sim.notes());
        assert_eq!(sim.attached().unwrap(), Attached::Nothing);
        // The kernel's tag ignores map fds: the attached-program check compares builds.
        let tag = |p: &Xdp| p.info().unwrap().tag();
        assert_eq!(
            tag(f.program(crate::object::PROGRAM).unwrap()),
            tag(sim.program().unwrap())
        );
        let private = sim.private_dir().to_path_buf();
        assert_eq!(list(&private), [map_names::STATS.to_string()]);
        drop(sim);
        assert!(!private.exists(), "the private pins go with the simulator");
        let a = ask(&f, &server_cid(0, SID[0], 1), false);
        assert!(
            a.notes.iter().any(|n| n.contains("no program is attached")),
            "{:?}",
            a.notes
        );
        assert_eq!(
            list(f.pin_dir()),
            pins,
            "nothing pinned in the live directory"
        );
    }
}
