//! Running the XDP programs on crafted frames with `BPF_PROG_TEST_RUN` (what `baton route`, see
//! [`crate::simulate`], the packet-fixture tests and the XDP benchmark use), plus the frame
//! builders and a fixture that loads the embedded object into a private pin directory.
//!
//! aya 0.14 has no test-run API, so this issues the raw bpf(2) command on the program's fd.
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use crate::simulate::remove_pin_dir;

use anyhow::{Context, Result, anyhow, bail};
use aya::Ebpf;
use aya::maps::{Array, DevMap, HashMap, MapData, PerCpuArray};
use aya::programs::Xdp;
use lb_common::encap::EncapEntry;
use lb_common::{
    CidKey, LbConfig, ServerIdKey, Stat, VipKey, VipValue, WorkerEntry, WorkerRef, map_names,
};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// The kernel refuses XDP test input shorter than an Ethernet header.
const ETH_HLEN: usize = 14;

/// `union bpf_attr`'s `test` member (include/uapi/linux/bpf.h), zero-padded: the kernel rejects
/// non-zero bytes past the fields it knows, and accepts a shorter or longer attr when they are 0.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` as test input: only `data` (metadata length) and `data_end` may be set.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// What one test run returned.
#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The XDP action (`XDP_PASS` = 2, ...).
    pub action: u32,
    /// The frame after the program ran (e.g. with rewritten MACs).
    pub frame: Vec<u8>,
    /// Average nanoseconds per run as the kernel measured it (over `repeat` runs).
    pub duration_ns: u32,
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Runs an XDP program `repeat` times (≥ 1) on `frame` through `BPF_PROG_TEST_RUN`.
///
/// Frames shorter than 14 bytes are refused as test input. Kernels that count XDP metadata
/// toward that minimum run them with metadata in front (the program still sees exactly `frame`
/// between `data` and `data_end`); newer ones (6.18 here) refuse them anyway with `EINVAL`,
/// which is returned as an error of kind `InvalidInput`.
pub fn run_xdp(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> io::Result<TestRunOutput> {
    // Metadata must be a multiple of 4 bytes, at most 32.
    let meta = if frame.len() < ETH_HLEN {
        (ETH_HLEN - frame.len()).div_ceil(4) * 4
    } else {
        0
    };
    let mut input = vec![0u8; meta];
    input.extend_from_slice(frame);
    let mut output = vec![0u8; input.len() + 256];
    let mut ctx = XdpMd {
        data: meta as u32,
        data_end: input.len() as u32,
        ..Default::default()
    };
    let mut ctx_out = XdpMd::default();
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: input.len() as u32,
        data_size_out: output.len() as u32,
        data_in: input.as_ptr() as u64,
        data_out: output.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..Default::default()
    };
    if meta > 0 {
        attr.ctx_size_in = size_of::<XdpMd>() as u32;
        attr.ctx_in = &mut ctx as *mut XdpMd as u64;
        attr.ctx_size_out = size_of::<XdpMd>() as u32;
        attr.ctx_out = &mut ctx_out as *mut XdpMd as u64;
    }
    // SAFETY: attr points to valid buffers that outlive the call; sizes match the buffers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr as *mut c_void,
            size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("BPF_PROG_TEST_RUN failed: {err} (needs root / CAP_BPF)"),
        ));
    }
    let out_len = (attr.data_size_out as usize).min(output.len());
    output.truncate(out_len);
    // Output starts at data_meta: strip the metadata we added.
    let frame = output.get(meta..).unwrap_or_default().to_vec();
    Ok(TestRunOutput {
        action: attr.retval,
        frame,
        duration_ns: attr.duration,
    })
}

/// Packet builders for fixtures and benchmarks.
pub mod frames {
    use std::net::IpAddr;

    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const IPPROTO_UDP: u8 = 17;
    pub const IPPROTO_TCP: u8 = 6;

    /// A UDP (or other protocol) datagram in an Ethernet frame.
    #[derive(Clone, Debug)]
    pub struct Datagram {
        pub src_mac: [u8; 6],
        pub dst_mac: [u8; 6],
        pub src: IpAddr,
        pub dst: IpAddr,
        pub src_port: u16,
        pub dst_port: u16,
        /// IPv4 options (padded to a multiple of 4 bytes); ignored for IPv6.
        pub ipv4_options: Vec<u8>,
        /// IPv6 extension headers between the fixed header and `protocol`, in order: each is its
        /// protocol number and its bytes (see [`ext_header`], [`fragment_header`]); the builder
        /// fills in every next-header byte. Ignored for IPv4.
        pub ipv6_ext_headers: Vec<(u8, Vec<u8>)>,
        /// IP protocol / next header; the payload is wrapped in a UDP header only for UDP.
        pub protocol: u8,
        pub payload: Vec<u8>,
    }

    impl Datagram {
        pub fn udp(src: IpAddr, dst: IpAddr, dst_port: u16, payload: Vec<u8>) -> Self {
            Self {
                src_mac: [0x02, 0, 0, 0, 0, 0x01],
                dst_mac: [0x02, 0, 0, 0, 0, 0xfe],
                src,
                dst,
                src_port: 40000,
                dst_port,
                ipv4_options: Vec::new(),
                ipv6_ext_headers: Vec::new(),
                protocol: IPPROTO_UDP,
                payload,
            }
        }

        /// Offset of the IP header, the layer-4 header and the payload (QUIC) in the frame.
        pub fn offsets(&self) -> (usize, usize, usize) {
            let ip_len = match self.dst {
                IpAddr::V4(_) => 20 + self.ipv4_options.len().div_ceil(4) * 4,
                IpAddr::V6(_) => {
                    40 + self
                        .ipv6_ext_headers
                        .iter()
                        .map(|(_, h)| h.len())
                        .sum::<usize>()
                }
            };
            let l4 = 14 + ip_len;
            let payload = if self.protocol == IPPROTO_UDP {
                l4 + 8
            } else {
                l4
            };
            (14, l4, payload)
        }

        pub fn build(&self) -> Vec<u8> {
            let mut l4 = Vec::new();
            if self.protocol == IPPROTO_UDP {
                l4.extend_from_slice(&self.src_port.to_be_bytes());
                l4.extend_from_slice(&self.dst_port.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]); // checksum: not inspected by the LB
            }
            l4.extend_from_slice(&self.payload);

            let mut f = Vec::with_capacity(14 + 60 + l4.len());
            f.extend_from_slice(&self.dst_mac);
            f.extend_from_slice(&self.src_mac);
            match (self.src, self.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    let mut opts = self.ipv4_options.clone();
                    opts.resize(opts.len().div_ceil(4) * 4, 0);
                    let ihl = 20 + opts.len();
                    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                    let start = f.len();
                    f.push(0x40 | (ihl / 4) as u8);
                    f.push(0);
                    f.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
                    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, DF
                    f.push(64);
                    f.push(self.protocol);
                    f.extend_from_slice(&[0, 0]);
                    f.extend_from_slice(&s.octets());
                    f.extend_from_slice(&d.octets());
                    f.extend_from_slice(&opts);
                    let csum = checksum(&f[start..start + ihl]);
                    f[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    let ext = &self.ipv6_ext_headers;
                    let ext_len: usize = ext.iter().map(|(_, h)| h.len()).sum();
                    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                    f.extend_from_slice(&[0x60, 0, 0, 0]);
                    f.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
                    f.push(ext.first().map_or(self.protocol, |(p, _)| *p));
                    f.push(64);
                    f.extend_from_slice(&s.octets());
                    f.extend_from_slice(&d.octets());
                    for (i, (_, h)) in ext.iter().enumerate() {
                        let start = f.len();
                        f.extend_from_slice(h);
                        f[start] = ext.get(i + 1).map_or(self.protocol, |(p, _)| *p);
                    }
                }
                _ => panic!("source and destination must be the same IP version"),
            }
            f.extend_from_slice(&l4);
            f
        }
    }

    pub const IPPROTO_HOPOPTS: u8 = 0;
    pub const IPPROTO_ROUTING: u8 = 43;
    pub const IPPROTO_FRAGMENT: u8 = 44;
    pub const IPPROTO_ESP: u8 = 50;
    pub const IPPROTO_AH: u8 = 51;
    pub const IPPROTO_DSTOPTS: u8 = 60;

    /// A hop-by-hop, destination options or routing header `8 * units` bytes long (units ≥ 1):
    /// the length byte set, options PadN-filled; for a routing header (type 4), `segments_left`
    /// in byte 3. The next-header byte is left for [`Datagram::build`].
    pub fn ext_header(kind: u8, units: usize, segments_left: u8) -> (u8, Vec<u8>) {
        assert!((1..=256).contains(&units));
        let mut h = vec![0u8; 8 * units];
        h[1] = (units - 1) as u8;
        if kind == IPPROTO_ROUTING {
            h[2] = 4;
            h[3] = segments_left;
        } else {
            // One PadN option covering the rest.
            h[2] = 1;
            h[3] = (8 * units - 4) as u8;
        }
        (kind, h)
    }

    /// An IPv6 fragment header: `offset` in 8-byte units, `more` = the M flag.
    pub fn fragment_header(offset: u16, more: bool) -> (u8, Vec<u8>) {
        let field = (offset << 3) | u16::from(more);
        let mut h = vec![0u8; 8];
        h[2..4].copy_from_slice(&field.to_be_bytes());
        h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        (IPPROTO_FRAGMENT, h)
    }

    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Long-header packet types, numbered as QUIC v1 does.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum LongType {
        Initial = 0,
        ZeroRtt = 1,
        Handshake = 2,
        Retry = 3,
    }

    /// A 1-RTT (short header) packet: first octet, DCID, then `rest` bytes of packet number and
    /// protected payload.
    pub fn quic_short(dcid: &[u8], rest: usize) -> Vec<u8> {
        let mut p = vec![0x40 | 0x01];
        p.extend_from_slice(dcid);
        p.extend((0..rest).map(|i| i as u8));
        p
    }

    /// A long-header packet of `total` bytes (Initials must be ≥ 1200 in a real datagram).
    /// Version 2 renumbers the types, which this applies.
    pub fn quic_long(
        kind: LongType,
        version: u32,
        dcid: &[u8],
        scid: &[u8],
        total: usize,
    ) -> Vec<u8> {
        let type_bits = if version == lb_common::QUIC_V2 {
            (kind as u8 + 1) & 3
        } else {
            kind as u8
        };
        let mut p = vec![0xc0 | (type_bits << 4)];
        p.extend_from_slice(&version.to_be_bytes());
        p.push(dcid.len() as u8);
        p.extend_from_slice(dcid);
        p.push(scid.len() as u8);
        p.extend_from_slice(scid);
        while p.len() < total {
            p.push(p.len() as u8);
        }
        p
    }
}

/// The embedded object loaded into the kernel with its maps pinned in a private directory
/// (never the daemon's), for tests and benchmarks. Dropping it unpins everything.
///
/// The setters write the authoritative maps and, as the controller does, keep the derived
/// fast-path maps ([`crate::fastpath`]) in step: [`XdpFixture::set_config`] rebuilds them, the
/// others update them incrementally. [`XdpFixture::disable_fastpath`] makes the program use the
/// hash maps only (the state of an object whose controller never filled the fast path).
pub struct XdpFixture {
    pub ebpf: Ebpf,
    pin_dir: PathBuf,
    /// `None` for an object without the fast-path maps (an older build, see [`Self::load_object`])
    /// or after [`Self::disable_fastpath`].
    fastpath: Option<crate::fastpath::FastPath>,
}

impl XdpFixture {
    /// Loads the object and all its programs; maps are pinned under
    /// `/sys/fs/bpf/baton-<tag>-<pid>` (a fresh directory).
    pub fn load(tag: &str) -> Result<Self> {
        let bytes = crate::object::try_bytes().ok_or_else(|| {
            anyhow!("lb-user was built with AYA_BUILD_SKIP=1: no XDP object to load")
        })?;
        Self::load_object(tag, bytes)
    }

    /// As [`Self::load`] for another build of the object (e.g. an older one, to benchmark side
    /// by side). Its fast-path maps are used if it has them.
    pub fn load_object(tag: &str, bytes: &[u8]) -> Result<Self> {
        if unsafe { libc::geteuid() } != 0 {
            bail!("loading XDP programs needs root: run the tests/benchmarks with sudo");
        }
        if !Path::new("/sys/fs/bpf").join(".").exists() {
            bail!("/sys/fs/bpf does not exist: mount bpffs (`mount -t bpf bpf /sys/fs/bpf`)");
        }
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/baton-{tag}-{}", std::process::id()));
        remove_pin_dir(&pin_dir);
        std::fs::create_dir_all(&pin_dir).with_context(|| {
            format!(
                "cannot create {} (is bpffs mounted at /sys/fs/bpf?)",
                pin_dir.display()
            )
        })?;
        let mut fixture = Self {
            ebpf: aya::EbpfLoader::new()
                .default_map_pin_directory(&pin_dir)
                .load(bytes)
                .context("loading the XDP object")?,
            pin_dir,
            fastpath: None,
        };
        if crate::fastpath::MAPS
            .iter()
            .all(|m| fixture.ebpf.map(m).is_some())
        {
            fixture.fastpath = Some(crate::fastpath::FastPath::from_ebpf(&fixture.ebpf)?);
        }
        for name in [
            crate::object::PROGRAM,
            crate::object::REFERENCE_PROGRAM,
            crate::object::PASS_PROGRAM,
            crate::object::FORWARD_FLOOR_PROGRAM,
        ] {
            // The floor is a benchmark aid that older builds (`load_object`) lack.
            let Some(prog) = fixture.ebpf.program_mut(name) else {
                if name == crate::object::FORWARD_FLOOR_PROGRAM {
                    continue;
                }
                bail!("program {name} is missing from the XDP object");
            };
            let prog: &mut Xdp = prog.try_into()?;
            prog.load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        Ok(fixture)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?)
    }

    /// Runs program `name` once on `frame`.
    pub fn run(&self, name: &str, frame: &[u8]) -> Result<TestRunOutput> {
        self.run_repeat(name, frame, 1)
    }

    pub fn run_repeat(&self, name: &str, frame: &[u8], repeat: u32) -> Result<TestRunOutput> {
        let fd = self.program(name)?.fd()?;
        Ok(run_xdp(fd.as_fd(), frame, repeat)?)
    }

    /// Writes `BATON_CONFIG` and rebuilds the fast-path maps for its layout from the
    /// authoritative maps (as the controller does at start-up and on a layout change).
    pub fn set_config(&mut self, cfg: LbConfig) -> Result<()> {
        let mut m: Array<&mut MapData, LbConfig> = Array::try_from(self.map(map_names::CONFIG)?)?;
        m.set(0, cfg, 0)?;
        self.rebuild_fastpath()
    }

    /// Rebuilds the fast-path maps from the authoritative ones (no-op when disabled).
    pub fn rebuild_fastpath(&mut self) -> Result<()> {
        let Some(fp) = self.fastpath.as_mut() else {
            return Ok(());
        };
        let get = |name: &str| {
            self.ebpf
                .map(name)
                .ok_or_else(|| anyhow!("no map {name} in the XDP object"))
        };
        let cfg: Array<&MapData, LbConfig> = Array::try_from(get(map_names::CONFIG)?)?;
        let vips: HashMap<&MapData, VipKey, VipValue> = HashMap::try_from(get(map_names::VIPS)?)?;
        let sids: HashMap<&MapData, ServerIdKey, WorkerRef> =
            HashMap::try_from(get(map_names::SERVER_IDS)?)?;
        let overrides: HashMap<&MapData, CidKey, WorkerRef> =
            HashMap::try_from(get(map_names::CID_OVERRIDE)?)?;
        fp.rebuild(&cfg.get(&0, 0)?, &vips, &sids, &overrides)
    }

    /// Clears the fast-path flags and stops maintaining the derived maps: the program runs on
    /// the authoritative hash maps alone.
    pub fn disable_fastpath(&mut self) {
        if let Some(fp) = self.fastpath.take() {
            fp.disable();
        }
    }

    /// Re-enables the fast-path maps (after [`Self::disable_fastpath`]) and rebuilds them.
    pub fn enable_fastpath(&mut self) -> Result<()> {
        if self.fastpath.is_none() {
            self.fastpath = Some(crate::fastpath::FastPath::from_ebpf(&self.ebpf)?);
        }
        self.rebuild_fastpath()
    }

    /// Writes `BATON_CONFIG` only, leaving the fast-path maps as they are (what a controller
    /// that changes the config without a rebuild leaves behind).
    pub fn set_config_only(&mut self, cfg: LbConfig) -> Result<()> {
        let mut m: Array<&mut MapData, LbConfig> = Array::try_from(self.map(map_names::CONFIG)?)?;
        Ok(m.set(0, cfg, 0)?)
    }

    /// Inserts into `BATON_CID_OVERRIDE` directly, bypassing the override counts (what a writer
    /// that ignores `fastpath`'s rules does). A test hook: only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub fn set_override_uncounted(&mut self, cid: &[u8], worker: u32) -> Result<()> {
        let key = CidKey::new(cid).ok_or_else(|| anyhow!("CID longer than 20 bytes"))?;
        let mut m: HashMap<&mut MapData, CidKey, WorkerRef> =
            HashMap::try_from(self.map(map_names::CID_OVERRIDE)?)?;
        Ok(m.insert(key, WorkerRef { worker }, 0)?)
    }

    /// The fast-path maps, unless disabled or absent.
    pub fn fastpath(&self) -> Option<&crate::fastpath::FastPath> {
        self.fastpath.as_ref()
    }

    pub fn add_vip(&mut self, vip: VipKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, VipKey, VipValue> =
            HashMap::try_from(self.map(map_names::VIPS)?)?;
        m.insert(vip, VipValue { flags: 1 }, 0)?;
        self.sync_vips()
    }

    pub fn del_vip(&mut self, vip: &VipKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, VipKey, VipValue> =
            HashMap::try_from(self.map(map_names::VIPS)?)?;
        m.remove(vip)?;
        self.sync_vips()
    }

    fn sync_vips(&mut self) -> Result<()> {
        let map = self
            .ebpf
            .map(map_names::VIPS)
            .ok_or_else(|| anyhow!("no map {}", map_names::VIPS))?;
        let vips: HashMap<&MapData, VipKey, VipValue> = HashMap::try_from(map)?;
        let enabled: Vec<VipKey> = vips
            .iter()
            .filter_map(|kv| kv.ok().filter(|(_, v)| v.flags & 1 != 0).map(|(k, _)| k))
            .collect();
        if let Some(fp) = self.fastpath.as_mut() {
            fp.sync_vips(&vips)?;
        }
        // As the controller does; an older object (see `load_object`) has no such map.
        if let Some(map) = self.ebpf.map_mut(map_names::VIP_ADDRS) {
            let mut addrs: HashMap<&mut MapData, VipKey, u32> = HashMap::try_from(map)?;
            crate::pinned::sync_vip_addrs_to(&enabled, &mut addrs)?;
        }
        Ok(())
    }

    pub fn set_worker(&mut self, index: u32, entry: WorkerEntry) -> Result<()> {
        let mut m: Array<&mut MapData, WorkerEntry> =
            Array::try_from(self.map(map_names::WORKERS)?)?;
        Ok(m.set(index, entry, 0)?)
    }

    /// Writes worker slot `index`'s encapsulation, checked as the controller must
    /// ([`crate::pinned::check_encap`]).
    pub fn set_worker_encap(&mut self, index: u32, entry: EncapEntry) -> Result<()> {
        crate::pinned::check_encap(&entry)?;
        self.set_worker_encap_unchecked(index, entry)
    }

    /// As [`Self::set_worker_encap`] without the check: what the program does with a bad entry.
    pub fn set_worker_encap_unchecked(&mut self, index: u32, entry: EncapEntry) -> Result<()> {
        let mut m: Array<&mut MapData, EncapEntry> =
            Array::try_from(self.map(map_names::WORKER_ENCAP)?)?;
        Ok(m.set(index, entry, 0)?)
    }

    pub fn set_server_id(&mut self, server_id: u64, worker: u32) -> Result<()> {
        let mut m: HashMap<&mut MapData, ServerIdKey, WorkerRef> =
            HashMap::try_from(self.map(map_names::SERVER_IDS)?)?;
        m.insert(ServerIdKey { server_id }, WorkerRef { worker }, 0)?;
        if let Some(fp) = &self.fastpath {
            fp.set_server_id(server_id, worker);
        }
        Ok(())
    }

    pub fn remove_server_id(&mut self, server_id: u64) -> Result<()> {
        let mut m: HashMap<&mut MapData, ServerIdKey, WorkerRef> =
            HashMap::try_from(self.map(map_names::SERVER_IDS)?)?;
        m.remove(&ServerIdKey { server_id })?;
        if let Some(fp) = &self.fastpath {
            fp.remove_server_id(server_id);
        }
        Ok(())
    }

    pub fn set_override(&mut self, cid: &[u8], worker: u32) -> Result<()> {
        let key = CidKey::new(cid).ok_or_else(|| anyhow!("CID longer than 20 bytes"))?;
        let map = self
            .ebpf
            .map_mut(map_names::CID_OVERRIDE)
            .ok_or_else(|| anyhow!("no map BATON_CID_OVERRIDE"))?;
        let mut m: HashMap<&mut MapData, CidKey, WorkerRef> = HashMap::try_from(map)?;
        match &self.fastpath {
            Some(fp) => fp.insert_override(&mut m, key, WorkerRef { worker }),
            None => Ok(m.insert(key, WorkerRef { worker }, 0)?),
        }
    }

    pub fn del_override(&mut self, cid: &[u8]) -> Result<()> {
        let key = CidKey::new(cid).ok_or_else(|| anyhow!("CID longer than 20 bytes"))?;
        let map = self
            .ebpf
            .map_mut(map_names::CID_OVERRIDE)
            .ok_or_else(|| anyhow!("no map BATON_CID_OVERRIDE"))?;
        let mut m: HashMap<&mut MapData, CidKey, WorkerRef> = HashMap::try_from(map)?;
        match &self.fastpath {
            Some(fp) => {
                if !fp.remove_override(&mut m, &key)? {
                    bail!("no override for {cid:02x?}");
                }
                Ok(())
            }
            None => Ok(m.remove(&key)?),
        }
    }

    /// Fills the first `entries.len()` Maglev slots.
    pub fn set_maglev(&mut self, entries: &[u32]) -> Result<()> {
        let mut m: Array<&mut MapData, u32> = Array::try_from(self.map(map_names::MAGLEV)?)?;
        for (i, w) in entries.iter().enumerate() {
            m.set(i as u32, *w, 0)?;
        }
        Ok(())
    }

    /// Points devmap slot `index` at interface `ifindex`.
    pub fn set_tx_port(&mut self, index: u32, ifindex: u32) -> Result<()> {
        let mut m: DevMap<&mut MapData> = DevMap::try_from(self.map(map_names::TX_PORTS)?)?;
        Ok(m.set(index, ifindex, None, 0)?)
    }

    /// A counter summed over CPUs.
    pub fn stat(&self, stat: Stat) -> Result<u64> {
        let map = self
            .ebpf
            .map(map_names::STATS)
            .ok_or_else(|| anyhow!("no map {}", map_names::STATS))?;
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        Ok(m.get(&(stat as u32), 0)?.iter().sum())
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("no map {name} in the XDP object"))
    }
}

impl Drop for XdpFixture {
    fn drop(&mut self) {
        remove_pin_dir(&self.pin_dir);
    }
}
