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
//! Re-using pinned maps is aya's pin-by-name re-adoption: the loader opens a map pinned under
//! its directory instead of creating one. That directory is a private one next to the live pin
//! directory, into which the live maps' fds are pinned a second time (the same kernel maps) and
//! where the loader creates and pins the private ones (the object pins every map by name); the
//! loader never sees the live directory, so nothing can be created or written there. The private
//! directory goes when the [`Simulator`] is dropped (the live maps' own pins stay).
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
            // Private maps (the counters, at least) are not the live ones: their size is ours.
            if private_maps.contains(&m.name) {
                continue;
            }
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
        // Every map the object pins: the live one if it is there (its fd re-pinned into the
        // private directory, so the loader never sees, let alone writes, the live directory), else
        // a fresh private one.
        let mut names: Vec<&str> = obj
            .maps
            .iter()
            .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
            .map(|(n, _)| n.as_str())
            .collect();
        names.sort();
        let parent = match live.parent() {
            Some(p) if crate::sys::is_bpffs(p) => p.to_path_buf(),
            _ => PathBuf::from("/sys/fs/bpf"),
        };
        let private_dir = PrivatePinDir::create(&parent, "route")?;
        for name in &names {
            if private_maps.iter().any(|p| p == name) {
                continue;
            }
            let shared = match MapData::from_pin(live.join(name)) {
                Ok(map) => map,
                Err(_) if !live.join(name).exists() => {
                    notes.push(format!(
                        "note: {name} is not pinned under {} (an older baton-lb): this run uses an empty one",
                        live.display()
                    ));
                    private_maps.push(name.to_string());
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot open the pinned map {}", live.join(name).display())
                    });
                }
            };
            shared.pin(private_dir.path().join(name)).with_context(|| {
                format!(
                    "cannot re-pin {name} under {}",
                    private_dir.path().display()
                )
            })?;
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(private_dir.path());
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

    /// The kernel's tag of the loaded program: a hash of its instructions that does not depend
    /// on which maps they use, so it names the build.
    pub fn program_tag(&self) -> Result<u64> {
        Ok(self.program()?.info()?.tag())
    }

    /// Which program the live pin directory's link has attached, compared with this one.
    pub fn attached(&self) -> Result<Attached> {
        let Some(link) = crate::sys::pinned_link_info(&self.live.join(LINK_PIN_NAME))? else {
            return Ok(Attached::Nothing);
        };
        let ours = self.program_tag()?;
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

/// The name `baton route` gives an XDP action.
pub fn action_name(action: u32) -> &'static str {
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
    let vip = pick_vip(&maps, q.vip, &mut notes);
    drop(maps);

    let frame = route_frame(cid, initial, vip);
    let verdict = run_on_live_maps(object, pin_dir, &frame, &mut notes)?;

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
    if routed.is_some() && worker_index.is_none() {
        notes.push(
            "note: no worker slot holds the MAC the program wrote (the maps changed meanwhile?)"
                .into(),
        );
    }
    let entry: Option<WorkerEntry> = worker_index.and_then(|i| maps.workers.get(&i, 0).ok());
    let why = Why {
        cid,
        key: &key,
        initial,
        lbc: &lbc,
        vip,
    };
    let (reason, detail) = why.explain(routed, entry.as_ref(), &verdict)?;
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

/// `want` if given (noting when it is not an enabled VIP), else the first enabled VIP in
/// (family, address, port) order; with none, a documentation address (the program passes it).
fn pick_vip(maps: &PinnedMaps, want: Option<SocketAddr>, notes: &mut Vec<String>) -> SocketAddr {
    let mut enabled: Vec<VipKey> = maps
        .vips
        .iter()
        .filter_map(|kv| kv.ok())
        .filter(|(_, v)| v.flags & 1 != 0)
        .map(|(k, _)| k)
        .collect();
    enabled.sort_by_key(|k| (k.family, k.addr, k.port));
    if let Some(v) = want {
        if !enabled.contains(&vip_key(v)) {
            notes.push(format!("note: {v} is not an enabled VIP here"));
        }
        return v;
    }
    match enabled.first() {
        Some(k) => vip_addr(k),
        None => {
            notes.push("note: no VIP is enabled: the data plane passes every packet".into());
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 443)
        }
    }
}

/// Loads a [`Simulator`] on the live maps, notes what it noticed and which program is attached,
/// and runs `frame` once.
fn run_on_live_maps(
    object: &[u8],
    pin_dir: &Path,
    frame: &[u8],
    notes: &mut Vec<String>,
) -> Result<Verdict> {
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
    sim.run(frame)
}

/// What explains a verdict to an operator. Explanation only: the decision is the program's.
struct Why<'a> {
    cid: &'a [u8],
    key: &'a CidKey,
    initial: bool,
    lbc: &'a LbConfig,
    vip: SocketAddr,
}

impl Why<'_> {
    /// `reason` (the counter the program bumped) and `detail` for the answer.
    fn explain(
        &self,
        routed: Option<(Stat, &'static str)>,
        entry: Option<&WorkerEntry>,
        verdict: &Verdict,
    ) -> Result<(&'static str, String)> {
        let size = self.lbc.maglev_size.min(MAGLEV_TABLE_SIZE);
        let (reason, mut detail) = match routed {
            Some((Stat::RoutedOverride, r)) => (r, "exact-CID override".to_string()),
            Some((Stat::RoutedServerId, r)) => {
                let s = self.server_id().or(entry.map(|e| e.server_id)).unwrap_or(0);
                (r, format!("server ID {s} (0x{s:x}) in the CID"))
            }
            Some((_, r)) => {
                let slot = lb_common::cid_hash(self.key) % size.max(1);
                (r, format!("{}; Maglev slot {slot}", self.hashed()))
            }
            None if verdict.counted(Stat::NoWorker) && size == 0 => (
                "no_worker",
                format!(
                    "{}; Maglev table empty (no healthy worker): dropped",
                    self.hashed()
                ),
            ),
            None if verdict.counted(Stat::NoWorker) => (
                "no_worker",
                format!(
                    "{}; the worker its Maglev slot names has no entry: dropped",
                    self.hashed()
                ),
            ),
            None if verdict.counted(Stat::Malformed) => (
                "malformed",
                "the data plane drops it as malformed".to_string(),
            ),
            None if verdict.counted(Stat::Passed) && self.lbc.ready == 0 => (
                "pass",
                "the data plane's tables are not ready: it passes every packet to the host stack"
                    .to_string(),
            ),
            None if verdict.counted(Stat::Passed) => (
                "pass",
                format!("not QUIC to a VIP ({}): passed to the host stack", self.vip),
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
        Ok((reason, detail))
    }

    fn server_id(&self) -> Option<u64> {
        CidLayout::new(self.lbc.cid_len, self.lbc.server_id_len)
            .ok()
            .and_then(|l| l.decode_server_id(self.cid))
    }

    /// Why a CID is hashed.
    fn hashed(&self) -> String {
        let (cid, lbc) = (self.cid, self.lbc);
        let client_chosen = self.initial
            && (cid.len() != lbc.cid_len as usize
                || cid
                    .first()
                    .is_none_or(|b| lb_common::self_described_len(*b) != cid.len()));
        if client_chosen {
            return "an Initial's client-chosen DCID".to_string();
        }
        match self.server_id() {
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
